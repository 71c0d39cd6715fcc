//! Outlier detection (DestinationRule `trafficPolicy.outlierDetection`), as
//! Envoy does it for Istio: an endpoint that answers `consecutive5xxErrors`
//! 5xx in a row (a failed connection or a reset counts as a 503), or
//! `consecutiveGatewayErrors` 502/503/504 in a row, is ejected from its
//! service's balancing for `baseEjectionTime` × the number of times it has
//! been ejected; a success resets its count. Ejection stops at
//! `maxEjectionPercent` of the service's endpoints (the one to eject
//! counted), and is suspended while fewer than `minHealthPercent` are
//! healthy. Every `interval` an endpoint that has not
//! been ejected again earns back one step of its ejection multiplier.
//!
//! One [`Outliers`] per upstream service and waypoint, beside its endpoint
//! picker; pure bookkeeping over [`Instant`]s, so tests drive the clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// `outlierDetection`, with Istio's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutlierConfig {
    /// 5xx in a row that eject; 0 disables.
    pub consecutive_5xx: u32,
    /// 502/503/504 in a row that eject; 0 disables.
    pub consecutive_gateway: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    /// 0–100.
    pub max_ejection_percent: u32,
    /// 0–100.
    pub min_health_percent: u32,
}

impl Default for OutlierConfig {
    /// Istio's defaults: 5 consecutive 5xx, 10 s interval, 30 s base
    /// ejection, at most 10 % ejected, no minimum health.
    fn default() -> Self {
        OutlierConfig {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

/// How an attempt to an endpoint ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// An HTTP status from the endpoint.
    Status(u16),
    /// No response: connect failure, reset, timeout (Envoy counts a 503).
    LocalFailure,
}

#[derive(Clone, Copy, Debug, Default)]
struct Endpoint {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Times ejected, less one per clean interval since.
    multiplier: u32,
    /// Ejected until then.
    ejected_until: Option<Instant>,
    last_sweep: Option<Instant>,
}

/// An ejected endpoint, for the admin dump and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ejection {
    pub endpoint: SocketAddr,
    /// When it comes back.
    pub until: Instant,
    /// Times ejected (its current multiplier).
    pub times: u32,
}

/// The outlier state of one upstream service's endpoints.
#[derive(Debug, Default)]
pub struct Outliers {
    endpoints: HashMap<SocketAddr, Endpoint>,
    /// Ejections so far (a metric).
    pub ejections_total: u64,
}

impl Outliers {
    /// Whether `endpoint` is out of balancing at `now`.
    pub fn is_ejected(&self, endpoint: SocketAddr, now: Instant) -> bool {
        self.endpoints.get(&endpoint).and_then(|e| e.ejected_until).is_some_and(|until| now < until)
    }

    /// Records how an attempt to `endpoint` ended; `total` is the number of
    /// the service's endpoints now. Returns whether this ejected it.
    pub fn record(
        &mut self,
        cfg: &OutlierConfig,
        endpoint: SocketAddr,
        result: Attempt,
        total: usize,
        now: Instant,
    ) -> bool {
        self.sweep(cfg, now);
        let status = match result {
            Attempt::Status(s) => s,
            Attempt::LocalFailure => 503,
        };
        let e = self.endpoints.entry(endpoint).or_default();
        if (500..600).contains(&status) {
            e.consecutive_5xx += 1;
        } else {
            e.consecutive_5xx = 0;
        }
        if matches!(status, 502..=504) {
            e.consecutive_gateway += 1;
        } else {
            e.consecutive_gateway = 0;
        }
        let tripped = (cfg.consecutive_5xx > 0 && e.consecutive_5xx >= cfg.consecutive_5xx)
            || (cfg.consecutive_gateway > 0 && e.consecutive_gateway >= cfg.consecutive_gateway);
        let already = e.ejected_until.is_some_and(|u| now < u);
        if !tripped || already || !self.may_eject(cfg, total, now) {
            return false;
        }
        let e = self.endpoints.get_mut(&endpoint).expect("inserted above");
        e.multiplier += 1;
        e.ejected_until = Some(now + cfg.base_ejection * e.multiplier);
        e.consecutive_5xx = 0;
        e.consecutive_gateway = 0;
        self.ejections_total += 1;
        true
    }

    /// Whether one more endpoint may be ejected, as Envoy decides: counting
    /// it, the ejected stay within `maxEjectionPercent` (so with Istio's 10 %
    /// a service of fewer than ten endpoints ejects none), and at least
    /// `minHealthPercent` are healthy before.
    fn may_eject(&self, cfg: &OutlierConfig, total: usize, now: Instant) -> bool {
        let total = total.max(1) as u64;
        let ejected = self.endpoints.values().filter(|e| e.ejected_until.is_some_and(|u| now < u)).count() as u64;
        let healthy_percent = 100 * (total - ejected.min(total)) / total;
        if healthy_percent < u64::from(cfg.min_health_percent) {
            return false;
        }
        100 * (ejected + 1) <= u64::from(cfg.max_ejection_percent) * total
    }

    /// Ends ejections that are over and, once per interval, takes one step
    /// off the multiplier of each endpoint not ejected.
    pub fn sweep(&mut self, cfg: &OutlierConfig, now: Instant) {
        for e in self.endpoints.values_mut() {
            if e.ejected_until.is_some_and(|u| now >= u) {
                e.ejected_until = None;
                e.last_sweep = Some(now);
            }
            if e.ejected_until.is_none() && e.multiplier > 0 {
                let last = *e.last_sweep.get_or_insert(now);
                if now.duration_since(last) >= cfg.interval {
                    e.multiplier -= 1;
                    e.last_sweep = Some(now);
                }
            }
        }
        self.endpoints.retain(|_, e| e.multiplier > 0 || e.consecutive_5xx > 0 || e.consecutive_gateway > 0);
    }

    /// The endpoints ejected at `now`.
    pub fn ejected(&self, now: Instant) -> Vec<Ejection> {
        let mut out: Vec<Ejection> = self
            .endpoints
            .iter()
            .filter_map(|(a, e)| {
                let until = e.ejected_until.filter(|u| now < *u)?;
                Some(Ejection { endpoint: *a, until, times: e.multiplier })
            })
            .collect();
        out.sort_by_key(|e| e.endpoint);
        out
    }
}

#[cfg(test)]
#[path = "outlier_tests.rs"]
mod tests;
