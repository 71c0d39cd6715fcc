//! Answers the waypoint gives itself, without calling a backend.
//!
//! Every phase that can end a request (no route, a redirect, an injected
//! abort, no usable backend) returns a [`Reply`], so the responding code has one shape to write.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderValue, StatusCode};

/// gRPC status UNIMPLEMENTED: what a gRPC client gets for a method nothing routes.
pub const GRPC_UNIMPLEMENTED: u32 = 12;

/// Why the waypoint answered by itself; the access log and the metrics'
/// `response_flags` need it (Envoy's flags, which Istio's dashboards know).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyReason {
    /// No route matched (Envoy's `NR`).
    NoRoute,
    /// A RequestRedirect filter answered.
    Redirect,
    /// The rule has no usable backend: none, every weight 0, or an invalid
    /// backendRef was chosen (Gateway API asks for 500).
    NoBackend,
    /// The backend service has no healthy endpoint: 503 (Envoy's `UH`).
    NoHealthyUpstream,
    /// The configuration cannot apply to this request (a rewrite that makes
    /// an invalid URI): 500, logged, never a panic.
    Misconfigured,
    /// The backend did not answer in time: 504 (Envoy's `UT`).
    UpstreamTimeout,
    /// No connection to the endpoint could be made: 503 (Envoy's `UF`).
    UpstreamConnectFailure,
    /// The endpoint's connection or stream broke before an answer: 503 (Envoy's `UR`).
    UpstreamReset,
    /// A DestinationRule `connectionPool` limit turned the request away: 503 (Envoy's `UO`).
    UpstreamOverflow,
    /// The client's request body broke off: 400 (Envoy's `DR`).
    DownstreamReset,
    /// The request path cannot be normalized (a malformed escape): 400
    /// (Envoy's `DPE`, downstream protocol error).
    BadPath,
    /// The request's headers are over [`crate::limits`]: 431 (Envoy's `DPE`).
    HeadersTooLarge,
    /// A fault injection filter aborted the request (Envoy's `FI`).
    FaultInjected,
}

impl ReplyReason {
    /// Envoy's response flag for the reason, `-` when it is not an error.
    pub fn response_flag(self) -> &'static str {
        match self {
            ReplyReason::NoRoute => "NR",
            ReplyReason::Redirect => "-",
            ReplyReason::NoBackend | ReplyReason::Misconfigured => "NC",
            ReplyReason::NoHealthyUpstream => "UH",
            ReplyReason::UpstreamTimeout => "UT",
            ReplyReason::UpstreamConnectFailure => "UF",
            ReplyReason::UpstreamReset => "UR",
            ReplyReason::UpstreamOverflow => "UO",
            ReplyReason::DownstreamReset => "DR",
            ReplyReason::BadPath | ReplyReason::HeadersTooLarge => "DPE",
            ReplyReason::FaultInjected => "FI",
        }
    }
}

/// A response made by the waypoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub reason: ReplyReason,
}

impl Reply {
    fn empty(status: StatusCode, reason: ReplyReason) -> Reply {
        Reply { status, headers: HeaderMap::new(), body: Bytes::new(), reason }
    }

    /// 404: no route matches the request (Gateway API).
    pub fn not_found() -> Reply {
        Reply::empty(StatusCode::NOT_FOUND, ReplyReason::NoRoute)
    }

    /// A gRPC error in trailers-only form (HTTP 200, `grpc-status` in the
    /// headers), so a gRPC client sees a status instead of a protocol error.
    pub fn grpc_status(code: u32, reason: ReplyReason) -> Reply {
        let mut reply = Reply::empty(StatusCode::OK, reason);
        reply.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        reply.headers.insert("grpc-status", HeaderValue::from(code));
        reply
    }

    /// 500: the rule has no backend that can take the request.
    pub fn no_backend() -> Reply {
        Reply::empty(StatusCode::INTERNAL_SERVER_ERROR, ReplyReason::NoBackend)
    }

    /// 503: the backend service has no endpoint that can take the request.
    pub fn no_healthy_upstream() -> Reply {
        Reply::empty(StatusCode::SERVICE_UNAVAILABLE, ReplyReason::NoHealthyUpstream)
    }

    /// 503 with `x-envoy-overloaded: true`, as Envoy's circuit breakers answer.
    pub fn overflow() -> Reply {
        let mut reply = Reply::empty(StatusCode::SERVICE_UNAVAILABLE, ReplyReason::UpstreamOverflow);
        reply.headers.insert("x-envoy-overloaded", HeaderValue::from_static("true"));
        reply
    }

    /// 500: a filter could not apply to this request.
    pub fn misconfigured() -> Reply {
        Reply::empty(StatusCode::INTERNAL_SERVER_ERROR, ReplyReason::Misconfigured)
    }

    /// 431: the request's headers are over [`crate::limits`].
    pub fn headers_too_large() -> Reply {
        Reply::empty(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, ReplyReason::HeadersTooLarge)
    }

    /// 400: the request path is malformed ([`crate::normalize`]).
    pub fn bad_path() -> Reply {
        Reply::empty(StatusCode::BAD_REQUEST, ReplyReason::BadPath)
    }

    /// A redirect to `location` with a 3xx status.
    pub fn redirect(status: StatusCode, location: HeaderValue) -> Reply {
        let mut reply = Reply::empty(status, ReplyReason::Redirect);
        reply.headers.insert(LOCATION, location);
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_reply_is_trailers_only_with_status() {
        let reply = Reply::grpc_status(GRPC_UNIMPLEMENTED, ReplyReason::NoRoute);
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers["grpc-status"], "12");
        assert_eq!(reply.headers[CONTENT_TYPE], "application/grpc");
        assert!(reply.body.is_empty());
    }
}
