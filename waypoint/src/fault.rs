//! Fault injection (VirtualService `http[].fault`): a delay before the
//! request goes on, and/or an answer from the waypoint instead of the
//! backend's.
//!
//! As in Envoy, whose fault filter runs before the router: the faults of a
//! rule are drawn before its other filters act (header changes, redirects,
//! the backend choice); the delay and the abort are drawn independently,
//! the delay comes first; the route's timeouts start after the delay (it
//! does not count against them); an aborted request never reaches a backend
//! and is logged with status and response flag `FI`, a delayed one with
//! `DI`.
//!
//! [`Injected::draw`] is the pure decision (random draws by the caller's
//! [`Rng`]); [`delay`] is the wait, done by the proxy.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, StatusCode};
use rand::Rng;

use crate::filters::{sampled, Filter};
use crate::metrics::response_flags;
use crate::reply::{Reply, ReplyReason};

/// The body of an abort answer, Envoy's (also its `grpc-message`).
pub const ABORT_BODY: &str = "fault filter abort";

/// One FaultInjection filter.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultInjection {
    /// How long a delayed request waits; `None` (or zero): no delay.
    pub delay: Option<Duration>,
    /// Share of requests delayed, 0–100.
    pub delay_percent: f64,
    /// The answer of an aborted request; `None`: no abort.
    pub abort: Option<Abort>,
    /// Share of requests aborted, 0–100.
    pub abort_percent: f64,
}

/// What an aborted request is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// This HTTP status, body [`ABORT_BODY`].
    Http(StatusCode),
    /// This gRPC status, in trailers-only form (HTTP 200, `grpc-status`).
    Grpc(u32),
}

impl Abort {
    /// The waypoint's answer (reason [`ReplyReason::FaultInjected`]).
    pub fn reply(self) -> Reply {
        match self {
            Abort::Http(status) => {
                let mut reply = Reply {
                    status,
                    headers: Default::default(),
                    body: Bytes::from_static(ABORT_BODY.as_bytes()),
                    reason: ReplyReason::FaultInjected,
                };
                reply.headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                reply
            }
            Abort::Grpc(code) => {
                let mut reply = Reply::grpc_status(code, ReplyReason::FaultInjected);
                reply.headers.insert("grpc-message", HeaderValue::from_static(ABORT_BODY));
                reply
            }
        }
    }
}

impl FaultInjection {
    /// This request's share of the fault: the delay (one draw), then the
    /// abort (another, independent draw).
    pub fn draw(&self, rng: &mut impl Rng) -> Injected {
        let delay = self.delay.filter(|d| !d.is_zero()).filter(|_| sampled(self.delay_percent, rng));
        let abort = self.abort.filter(|_| sampled(self.abort_percent, rng));
        Injected { delay, abort }
    }
}

/// The faults drawn for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    /// Wait this long before going on.
    pub delay: Option<Duration>,
    /// Then answer this way instead of calling a backend.
    pub abort: Option<Abort>,
}

impl Injected {
    /// Draws the Fault filters among `filters` and adds them to what was
    /// drawn so far: delays add up, the first abort drawn stands.
    pub fn draw(&mut self, filters: &[Filter], rng: &mut impl Rng) {
        for filter in filters {
            if let Filter::Fault(fault) = filter {
                let this = fault.draw(rng);
                self.delay = match (self.delay, this.delay) {
                    (Some(a), Some(b)) => Some(a.saturating_add(b)),
                    (a, b) => a.or(b),
                };
                self.abort = self.abort.or(this.abort);
            }
        }
    }
}

/// Waits `delay` (the client may go away meanwhile: the request's future is
/// then dropped). Returns `start` moved later by the time waited: the start
/// of the route's timeouts, which in Envoy begin at the router, after the
/// fault filter's delay.
pub async fn delay(delay: Duration, start: Instant) -> Instant {
    // Tokio's clock, so that a test with paused time sees the wait.
    let before = tokio::time::Instant::now();
    tokio::time::sleep(delay).await;
    start.checked_add(before.elapsed()).unwrap_or(start)
}

/// The response flags of a delayed request: `DI` added to `flags` (in
/// Envoy's order and comma-joined, as Envoy writes several flags). Flags the
/// waypoint never sets are left as they are.
pub fn with_delay_flag(flags: &'static str) -> &'static str {
    match flags {
        response_flags::NONE => response_flags::DELAY_INJECTED,
        "UH" => "UH,DI",
        "UT" => "UT,DI",
        "UR" => "UR,DI",
        "UF" => "UF,DI",
        "UC" => "UC,DI",
        "NR" => "NR,DI",
        "FI" => "DI,FI",
        "DC" => "DI,DC",
        "URX" => "DI,URX",
        "DPE" => "DI,DPE",
        "NC" => "DI,NC",
        "DR" => "DI,DR",
        other => other,
    }
}

#[cfg(test)]
#[path = "fault_tests.rs"]
mod tests;
