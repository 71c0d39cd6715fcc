//! When a failed attempt is tried again, how long to wait first, how many
//! retries the waypoint allows at once, and the deadlines of a request and of
//! each attempt.
//!
//! Gateway API's GEP-1731 (`retry.attempts`, `codes`, `backoff`) and, when a
//! rule sets none, Istio's waypoint default: 2 retries on connect-failure,
//! refused-stream, 503 and gRPC UNAVAILABLE/CANCELLED, on a different
//! endpoint when there is one (the endpoint choice is [`crate::balance`]'s).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use rand::Rng;

/// Request bodies are buffered for replay up to this size; a larger body is
/// streamed without a copy and its request is not retried.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// Whether a request whose body has so far put `buffered` bytes in the replay
/// buffer can still be sent again. Once over the limit the buffer is dropped
/// and the request stays non-replayable.
pub fn replayable(buffered: usize) -> bool {
    buffered <= REPLAY_LIMIT
}

/// How an attempt ended, as far as retrying cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered with this status.
    Status(StatusCode),
    /// The backend answered a gRPC error in its response headers
    /// (trailers-only form), so nothing of the response was streamed yet.
    GrpcStatus(u32),
    /// No connection (or tunnel) to the endpoint could be made.
    ConnectFailure,
    /// The endpoint refused the stream (HTTP/2 REFUSED_STREAM, GOAWAY before
    /// it): it never saw the request, so a retry is always safe.
    RefusedStream,
    /// The connection or stream broke after the request was (partly) sent.
    Reset,
    /// The attempt's own deadline (`backendRequest`) passed.
    Timeout,
}

/// A rule's retry policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retries.
    pub attempts: u32,
    /// Backend statuses that are retried.
    pub codes: Vec<u16>,
    /// gRPC statuses (trailers-only answers) that are retried.
    pub grpc_codes: Vec<u32>,
    /// The shortest wait before a retry; later retries wait exponentially
    /// longer, up to [`MAX_BACKOFF_FACTOR`] times this.
    pub backoff: Duration,
    pub on_connect_failure: bool,
    pub on_refused_stream: bool,
    /// Off by default: the backend may have acted on a request it got.
    pub on_reset: bool,
    /// Off by default (Istio's): a slow backend is usually slow for all.
    pub on_timeout: bool,
}

/// gRPC status CANCELLED.
pub const GRPC_CANCELLED: u32 = 1;
/// gRPC status UNAVAILABLE.
pub const GRPC_UNAVAILABLE: u32 = 14;

/// The longest backoff is this many times the base (Envoy's default).
pub const MAX_BACKOFF_FACTOR: u32 = 10;

/// Envoy's default base interval, which Istio's waypoint uses.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

impl Default for RetryPolicy {
    /// Istio's default (`connect-failure,refused-stream,unavailable,
    /// cancelled,retriable-status-codes` with 503): 2 retries.
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            codes: vec![503],
            grpc_codes: vec![GRPC_CANCELLED, GRPC_UNAVAILABLE],
            backoff: DEFAULT_BACKOFF,
            on_connect_failure: true,
            on_refused_stream: true,
            on_reset: false,
            on_timeout: false,
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        RetryPolicy { attempts: 0, ..RetryPolicy::default() }
    }

    /// A GEP-1731 `retry`: unset fields take Istio's defaults (2 attempts,
    /// code 503, 25 ms); connection failures, refused streams and gRPC
    /// UNAVAILABLE/CANCELLED are always retried, as Istio does for Gateway
    /// API routes.
    pub fn gateway(attempts: Option<u32>, codes: Vec<u16>, backoff: Option<Duration>) -> Self {
        let default = RetryPolicy::default();
        RetryPolicy {
            attempts: attempts.unwrap_or(default.attempts),
            codes: if codes.is_empty() { default.codes } else { codes },
            backoff: backoff.unwrap_or(default.backoff),
            ..default
        }
    }

    /// Whether to try again after attempt number `attempt` (1 for the first)
    /// ended with `outcome`. Never once response headers went downstream
    /// (the client already has an answer), never for a body that was not
    /// kept for replay, never beyond `attempts` retries. The retry budget is
    /// checked after this, by [`RetryBudget::next_retry`].
    pub fn should_retry(&self, attempt: u32, outcome: Outcome, response_started: bool, body_replayable: bool) -> bool {
        if response_started || !body_replayable || attempt == 0 || attempt > self.attempts {
            return false;
        }
        match outcome {
            Outcome::Status(code) => self.codes.contains(&code.as_u16()),
            Outcome::GrpcStatus(code) => self.grpc_codes.contains(&code),
            Outcome::ConnectFailure => self.on_connect_failure,
            Outcome::RefusedStream => self.on_refused_stream,
            Outcome::Reset => self.on_reset,
            Outcome::Timeout => self.on_timeout,
        }
    }

    /// The wait before retry number `retry` (1 for the first): uniform in
    /// `[backoff, min(backoff·2^retry, 10·backoff)]`, never below the base
    /// (GEP-1731 calls it a minimum), jittered so that clients that failed
    /// together do not retry together.
    pub fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let base = self.backoff;
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX).min(MAX_BACKOFF_FACTOR);
        let ceiling = base.saturating_mul(factor);
        if ceiling <= base {
            return base;
        }
        let spread = (ceiling - base).as_nanos().min(u64::MAX as u128) as u64;
        base + Duration::from_nanos(rng.random_range(0..=spread))
    }
}

/// Limits retries in flight to the larger of a floor and a share of the
/// requests in flight, so a failing backend gets at most that much extra
/// load instead of `attempts` times its traffic. Shared by every request of
/// a waypoint (lock-free).
#[derive(Debug)]
pub struct RetryBudget {
    active: AtomicU64,
    retrying: AtomicU64,
    percent: u64,
    min_retries: u64,
}

impl Default for RetryBudget {
    /// 20 % of active requests, at least 10 retries in flight.
    fn default() -> Self {
        RetryBudget::new(20, 10)
    }
}

impl RetryBudget {
    pub fn new(percent: u64, min_retries: u64) -> Self {
        RetryBudget { active: AtomicU64::new(0), retrying: AtomicU64::new(0), percent, min_retries }
    }

    /// Counts a request as active until the guard drops.
    pub fn request(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// A permit for one retry, held while it runs; `None` when the retries
    /// in flight already reach the budget.
    pub fn try_retry(self: &Arc<Self>) -> Option<RetryPermit> {
        let limit = self.limit();
        self.retrying.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).ok()?;
        Some(RetryPermit(self.clone()))
    }

    /// A permit for the next retry of a request, put in `held`; `false`
    /// (and `held` empty) when the budget is spent. The permit `held` had
    /// for the request's previous retry is given back first: that attempt
    /// has ended, so it is no longer a retry in flight (as Envoy counts
    /// them), and must not stand in its own request's way.
    pub fn next_retry(self: &Arc<Self>, held: &mut Option<RetryPermit>) -> bool {
        *held = None;
        *held = self.try_retry();
        held.is_some()
    }

    /// The most retries allowed in flight now.
    pub fn limit(&self) -> u64 {
        (self.active.load(Ordering::Relaxed) * self.percent / 100).max(self.min_retries)
    }

    /// Retries in flight now.
    pub fn retrying(&self) -> u64 {
        self.retrying.load(Ordering::Relaxed)
    }
}

/// A request in flight, for [`RetryBudget`].
#[derive(Debug)]
pub struct ActiveRequest(Arc<RetryBudget>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry in flight, for [`RetryBudget`].
#[derive(Debug)]
pub struct RetryPermit(Arc<RetryBudget>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `rules[].timeouts`; `None` (or zero, as the proto sends "disabled")
/// means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// From the request's start to the end of the response: 504 when passed.
    pub request: Option<Duration>,
    /// One attempt to a backend; each retry gets its own.
    pub backend_request: Option<Duration>,
}

impl Timeouts {
    /// The deadlines of a request that started at `start`.
    pub fn deadlines(&self, start: Instant) -> Deadlines {
        let nonzero = |d: Option<Duration>| d.filter(|d| !d.is_zero());
        Deadlines {
            overall: nonzero(self.request).and_then(|d| start.checked_add(d)),
            per_try: nonzero(self.backend_request),
        }
    }
}

/// The deadlines of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    overall: Option<Instant>,
    per_try: Option<Duration>,
}

impl Deadlines {
    /// When the whole request must be answered (504 after it).
    pub fn overall(&self) -> Option<Instant> {
        self.overall
    }

    /// When an attempt starting at `now` must have its answer: its own
    /// timeout, never past the request's.
    pub fn attempt(&self, now: Instant) -> Option<Instant> {
        let own = self.per_try.and_then(|d| now.checked_add(d));
        match (own, self.overall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a retry that first waits `backoff` from `now` would start
    /// before the request's deadline (else the client gets the failure now).
    pub fn retry_fits(&self, now: Instant, backoff: Duration) -> bool {
        self.overall.is_none_or(|end| now.checked_add(backoff).is_some_and(|start| start < end))
    }
}

#[cfg(test)]
#[path = "retry_tests.rs"]
mod tests;
