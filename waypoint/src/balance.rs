//! Where a routed request goes: one of the rule's backends by weight, then
//! one endpoint of that backend service.
//!
//! Both take the caller's random source, so tests are repeatable and the
//! forwarding code can use a cheap thread-local generator.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rand::Rng;

use crate::filters::Filter;
pub use crate::lb::LbPolicy;
use crate::lb::{Maglev, TABLE_SIZE};
use crate::outlier::{Attempt, Ejection, OutlierConfig, Outliers};
use crate::reply::Reply;
use crate::route::{Backend, BackendTarget};
use crate::target::ServiceTarget;

/// The backend a request goes to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chosen<'a> {
    pub target: &'a ServiceTarget,
    /// The backend's own filters, applied after the rule's.
    pub filters: &'a [Filter],
    /// Position in the rule's backends (for logs).
    pub index: usize,
}

/// Why a rule could not send the request anywhere; every case is a 500
/// (Gateway API), [`NoBackend::reply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoBackend<'a> {
    /// The rule has no backendRefs.
    Empty,
    /// Every backend has weight 0.
    AllZero,
    /// The draw fell on a backendRef that does not resolve (its share of
    /// requests fails, the others' do not); the text says why.
    Invalid(&'a str),
}

impl NoBackend<'_> {
    pub fn reply(self) -> Reply {
        Reply::no_backend()
    }
}

/// Picks a backend with probability weight / sum of weights: weight 0 is
/// never chosen.
pub fn pick_backend<'a>(backends: &'a [Backend], rng: &mut impl Rng) -> Result<Chosen<'a>, NoBackend<'a>> {
    if backends.is_empty() {
        return Err(NoBackend::Empty);
    }
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return Err(NoBackend::AllZero);
    }
    let mut draw = rng.random_range(0..total);
    let (index, backend) = backends
        .iter()
        .enumerate()
        .find(|(_, b)| {
            let weight = u64::from(b.weight);
            if draw < weight {
                return true;
            }
            draw -= weight;
            false
        })
        .expect("a draw below the total falls on a backend");
    match &backend.target {
        BackendTarget::Service(target) => Ok(Chosen { target, filters: &backend.filters, index }),
        BackendTarget::Invalid(reason) => Err(NoBackend::Invalid(reason)),
    }
}

/// What endpoint choice needs to know of an endpoint.
pub trait Load {
    /// Requests in flight to it now.
    fn in_flight(&self) -> u64;
    /// `false` keeps it out of every choice (not ready, ejected).
    fn healthy(&self) -> bool {
        true
    }
}

/// Chooses endpoints of one backend service; holds the round-robin position,
/// so keep one per service.
#[derive(Debug, Default)]
pub struct EndpointPicker {
    policy: LbPolicy,
    next: AtomicUsize,
    /// The consistent-hash table of the last endpoint set hashed over.
    maglev: Mutex<Option<Arc<Maglev>>>,
    /// Outlier detection of this service's endpoints.
    outliers: Mutex<Outliers>,
}

impl EndpointPicker {
    pub fn new(policy: LbPolicy) -> Self {
        EndpointPicker { policy, ..EndpointPicker::default() }
    }

    pub fn policy(&self) -> LbPolicy {
        self.policy
    }

    /// The index of the endpoint to use, or `None` when no endpoint is
    /// healthy (503). Endpoints in `tried` (this request's earlier attempts)
    /// are skipped while another healthy one exists, so a retry lands
    /// elsewhere when it can.
    pub fn pick<E: Load>(&self, endpoints: &[E], tried: &[usize], rng: &mut impl Rng) -> Option<usize> {
        self.pick_with(self.policy, endpoints, tried, rng)
    }

    /// Whether outlier detection has `endpoint` out of balancing now.
    pub fn is_ejected(&self, endpoint: SocketAddr, now: Instant) -> bool {
        self.outliers.lock().expect("bug: poisoned").is_ejected(endpoint, now)
    }

    /// Records how an attempt to `endpoint` ended, for outlier detection
    /// by `cfg` over `total` endpoints; whether this ejected it.
    pub fn record(
        &self,
        cfg: &OutlierConfig,
        endpoint: SocketAddr,
        attempt: Attempt,
        total: usize,
        now: Instant,
    ) -> bool {
        self.outliers.lock().expect("bug: poisoned").record(cfg, endpoint, attempt, total, now)
    }

    /// The endpoints ejected now (the admin dump), and ejections so far.
    pub fn ejections(&self, now: Instant) -> (Vec<Ejection>, u64) {
        let o = self.outliers.lock().expect("bug: poisoned");
        (o.ejected(now), o.ejections_total)
    }

    /// [`EndpointPicker::pick`] by `policy` instead of the picker's own.
    pub fn pick_with<E: Load>(
        &self,
        policy: LbPolicy,
        endpoints: &[E],
        tried: &[usize],
        rng: &mut impl Rng,
    ) -> Option<usize> {
        let fresh = |i: usize, e: &E| e.healthy() && !tried.contains(&i);
        let healthy = |_: usize, e: &E| e.healthy();
        if endpoints.iter().enumerate().any(|(i, e)| fresh(i, e)) {
            self.pick_among(policy, endpoints, fresh, rng)
        } else {
            self.pick_among(policy, endpoints, healthy, rng)
        }
    }

    /// The endpoint the request hash `hash` maps to in the Maglev table of
    /// `endpoints` (named by `name`, in a stable order), when it is healthy;
    /// `None` sends the caller to [`EndpointPicker::pick_with`]. Every
    /// attempt of a request maps to the same endpoint, as Envoy's hash
    /// balancers do.
    pub fn pick_hashed<E: Load>(&self, endpoints: &[E], name: impl Fn(&E) -> &str, hash: u64) -> Option<usize> {
        if endpoints.is_empty() || endpoints.len() >= TABLE_SIZE {
            return None;
        }
        let fingerprint = Maglev::fingerprint(endpoints.iter().map(&name));
        let cached = self.maglev.lock().expect("bug: poisoned").clone();
        let table = match cached {
            Some(t) if t.fingerprint == fingerprint => t,
            _ => {
                let names: Vec<&str> = endpoints.iter().map(&name).collect();
                let t = Arc::new(Maglev::build(&names, TABLE_SIZE));
                *self.maglev.lock().expect("bug: poisoned") = Some(t.clone());
                t
            }
        };
        let i = table.lookup(hash);
        endpoints[i].healthy().then_some(i)
    }

    /// Chooses among the endpoints `eligible` accepts, without allocating:
    /// candidates are addressed by rank.
    fn pick_among<E: Load>(
        &self,
        policy: LbPolicy,
        endpoints: &[E],
        eligible: impl Fn(usize, &E) -> bool,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        let nth = |rank: usize| endpoints.iter().enumerate().filter(|(i, e)| eligible(*i, e)).nth(rank).map(|(i, _)| i);
        let count = endpoints.iter().enumerate().filter(|(i, e)| eligible(*i, e)).count();
        match (count, policy) {
            (0, _) => None,
            (1, _) => nth(0),
            (_, LbPolicy::RoundRobin) => nth(self.next.fetch_add(1, Ordering::Relaxed) % count),
            (_, LbPolicy::Random) => nth(rng.random_range(0..count)),
            (_, LbPolicy::LeastRequest) => {
                let a = rng.random_range(0..count);
                let mut b = rng.random_range(0..count - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(a)?, nth(b)?);
                Some(if endpoints[b].in_flight() < endpoints[a].in_flight() { b } else { a })
            }
        }
    }
}

/// A requests-in-flight counter an endpoint can embed to implement [`Load`].
#[derive(Debug, Default)]
pub struct InFlight(AtomicU64);

impl InFlight {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts one request until the guard drops (also on a cancelled
    /// request, which a manual decrement would miss).
    pub fn start(self: &Arc<Self>) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }
}

#[derive(Debug)]
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[path = "balance_tests.rs"]
mod tests;
