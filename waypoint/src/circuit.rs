//! DestinationRule `connectionPool`: Envoy's circuit breakers for one
//! upstream cluster (a service port, or one subset of it) of this waypoint,
//! and how its connections are made and kept.
//!
//! A request is admitted, or overflows: answered 503 at once with Envoy's
//! flag `UO` (and `x-envoy-overloaded`), so that a slow or failing service
//! sheds load instead of queueing it without bound. An HTTP/1.1 request holds
//! one connection while it runs (`tcp.maxConnections` of them); more wait as
//! pending requests (`http.http1MaxPendingRequests` of them), and one more
//! than that overflows. `http.http2MaxRequests` bounds the requests in flight
//! of any protocol; `http.maxRetries` the retries in flight (over it a
//! request is not retried, its answer goes back). A TCP connection relayed at
//! L4 holds one of `tcp.maxConnections` while it lasts; one more is closed.
//! 0 is no limit, as in Istio.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How connections to the cluster's endpoints are made and kept; `None` and 0: the waypoint's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionSettings {
    /// `tcp.connectTimeout`.
    pub connect_timeout: Option<Duration>,
    /// `http.idleTimeout`.
    pub idle_timeout: Option<Duration>,
    /// `http.maxRequestsPerConnection`: a connection is not reused after this many requests.
    pub max_requests_per_connection: u32,
}

/// The cluster's limits; 0: none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    /// `tcp.maxConnections`: HTTP/1.1 requests running at once.
    pub max_connections: u32,
    /// `http.http1MaxPendingRequests`: HTTP/1.1 requests waiting for a connection.
    pub max_pending: u32,
    /// `http.http2MaxRequests`: requests in flight, any protocol.
    pub max_requests: u32,
    /// `http.maxRetries`: retries in flight.
    pub max_retries: u32,
}

/// `trafficPolicy.connectionPool` as the waypoint applies it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionPool {
    pub limits: Limits,
    pub connection: ConnectionSettings,
}

/// Which limit a request ran into (the metric's `limit` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// Too many TCP connections open (Envoy's `upstream_cx_overflow`): the connection is closed.
    Connections,
    /// Too many HTTP/1.1 requests waiting for a connection (Envoy's `upstream_rq_pending_overflow`).
    Pending,
    /// Too many requests in flight (Envoy's `upstream_rq_overflow`).
    Requests,
    /// Too many retries in flight: the request was not retried (Envoy's `upstream_rq_retry_overflow`).
    Retries,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Connections => "connections",
            Overflow::Pending => "pending",
            Overflow::Requests => "requests",
            Overflow::Retries => "retries",
        }
    }
}

/// The live counts of one cluster against its limits.
pub struct Breaker {
    limits: Limits,
    /// HTTP/1.1 connection slots; `None`: no limit.
    connections: Option<Arc<Semaphore>>,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
}

/// A request admitted: holds its place until dropped (the end of its response body).
pub struct Admission {
    breaker: Arc<Breaker>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.breaker.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry in flight; dropped when the retried attempt is over.
pub struct RetryPermit(Arc<Breaker>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one more in `count` unless that passes `max` (0: no limit).
fn take(count: &AtomicU32, max: u32) -> bool {
    let taken = count.fetch_add(1, Ordering::Relaxed);
    if max != 0 && taken >= max {
        count.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}

impl Breaker {
    pub fn new(limits: Limits) -> Arc<Breaker> {
        Arc::new(Breaker {
            limits,
            connections: (limits.max_connections != 0)
                .then(|| Arc::new(Semaphore::new(limits.max_connections as usize))),
            pending: AtomicU32::new(0),
            requests: AtomicU32::new(0),
            retries: AtomicU32::new(0),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Admits a request, an HTTP/1.1 one waiting as pending for a connection
    /// slot when all are taken; `Err` when that would pass a limit. The wait
    /// has no end of its own: the caller bounds it by the request's timeout.
    pub async fn admit(self: &Arc<Self>, http2: bool) -> Result<Admission, Overflow> {
        if !take(&self.requests, self.limits.max_requests) {
            return Err(Overflow::Requests);
        }
        // From here the count is the Admission's to give back, whatever happens.
        let mut admission = Admission { breaker: self.clone(), _connection: None };
        let Some(slots) = self.connections.as_ref().filter(|_| !http2) else { return Ok(admission) };
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            admission._connection = Some(slot);
            return Ok(admission);
        }
        if !take(&self.pending, self.limits.max_pending) {
            return Err(Overflow::Pending);
        }
        let _pending = Pending(&self.pending);
        admission._connection = Some(slots.clone().acquire_owned().await.expect("bug: the semaphore is never closed"));
        Ok(admission)
    }

    /// Admits a TCP connection relayed at L4: one of `maxConnections`, held
    /// while it lasts; none waits (Envoy's TCP proxy closes one over the limit).
    pub fn connection(&self) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        match &self.connections {
            None => Ok(None),
            Some(slots) => slots.clone().try_acquire_owned().map(Some).map_err(|_| Overflow::Connections),
        }
    }

    /// A retry may start; `None` when `maxRetries` are in flight.
    pub fn retry(self: &Arc<Self>) -> Option<RetryPermit> {
        take(&self.retries, self.limits.max_retries).then(|| RetryPermit(self.clone()))
    }

    /// Requests in flight and waiting (the admin dump).
    pub fn counts(&self) -> (u32, u32) {
        (self.requests.load(Ordering::Relaxed), self.pending.load(Ordering::Relaxed))
    }
}

/// One pending request, counted until it gets its slot (or gives up waiting).
struct Pending<'a>(&'a AtomicU32);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[path = "circuit_tests.rs"]
mod tests;
