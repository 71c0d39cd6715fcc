//! The error of the public ZDS API, shared by the server and client sides.

use std::time::Duration;

use crate::packet::PacketError;
use crate::request::RequestError;

/// Errors of the ZDS server and client.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// Socket-level failure.
    #[error("zds socket")]
    Packet(#[from] PacketError),
    /// Client side: the agent sent a request ztunnel cannot act on. The client
    /// has already acked it with this error's text; the connection stays usable.
    #[error("invalid zds request")]
    Request(#[from] RequestError),
    /// Server side: ztunnel acked the request with this error. The connection stays usable.
    #[error("ztunnel rejected the request: {0}")]
    Rejected(String),
    /// The first packet was not a `ZdsHello`.
    #[error("malformed zds hello")]
    BadHello(#[source] prost::DecodeError),
    /// The hello named a protocol version this side does not speak.
    #[error("unsupported zds version {0} in hello, expected 1 (V1)")]
    UnsupportedVersion(i32),
    /// The client sent no hello in time after connecting.
    #[error("no zds hello within {0:?}")]
    HelloTimeout(Duration),
    /// ztunnel did not ack a request in time; the connection is unusable.
    #[error("no ack from ztunnel within {0:?}")]
    AckTimeout(Duration),
    /// The peer closed the connection while an answer was due.
    #[error("peer closed the zds connection")]
    Closed,
    /// The server received something other than a `WorkloadResponse`.
    #[error("malformed zds response")]
    BadResponse(#[source] prost::DecodeError),
    /// The response names no payload this implementation knows.
    #[error("zds response has no known payload")]
    UnknownResponse,
    /// A hello or response carried descriptors (they are closed).
    #[error("{what} carries {count} descriptors, expected none")]
    UnexpectedFds {
        /// Which message.
        what: &'static str,
        /// Descriptors received.
        count: usize,
    },
    /// An earlier failure or an abandoned call left the connection out of step.
    #[error("zds connection unusable after an earlier failure")]
    Broken,
    /// Client side: `ack` called with no request waiting for one.
    #[error("ack without a pending request")]
    NoPendingRequest,
    /// Client side: `recv` called before the previous request was acked.
    #[error("previous request not acked yet")]
    AckPending,
}

impl ZdsError {
    /// True when the connection must be dropped (and, for ztunnel, re-established);
    /// false for errors about one request, after which the connection goes on.
    /// On the server side every error but `Rejected` also leaves the connection
    /// unusable: later calls return `Broken`.
    pub fn is_fatal(&self) -> bool {
        match self {
            Self::Request(_) | Self::Rejected(_) | Self::NoPendingRequest | Self::AckPending => false,
            Self::Packet(e) => !e.is_packet_local(),
            _ => true,
        }
    }
}

/// Renders an error and its sources as one line, `outer: inner: …`, the form
/// ZDS acks carry.
pub fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_joins_the_source_chain() {
        let err = ZdsError::from(RequestError::MissingFd { uid: "u1".into() });
        assert_eq!(error_text(&err), "invalid zds request: add for u1 carries no network namespace descriptor");
    }

    #[test]
    fn request_errors_and_truncation_are_not_fatal_but_closing_is() {
        assert!(!ZdsError::from(RequestError::UnknownPayload).is_fatal());
        assert!(!ZdsError::from(PacketError::Truncated).is_fatal());
        assert!(!ZdsError::Rejected("no".into()).is_fatal());
        assert!(ZdsError::Closed.is_fatal());
        assert!(ZdsError::AckTimeout(Duration::from_secs(1)).is_fatal());
    }
}
