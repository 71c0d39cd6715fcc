//! ZDS, the node-local protocol between the CNI node agent and ztunnel.
//!
//! The agent is the server: it listens on a unix `SOCK_SEQPACKET` socket
//! (by default [`DEFAULT_SOCKET_PATH`]). ztunnel connects, says hello, and the
//! agent sends one request per pod — an add carries the pod's network
//! namespace as a descriptor — each answered by an ack. One protobuf message
//! travels per packet. The messages are Istio's (`istio.workload.zds`), so
//! either side interoperates with Istio's. See `docs/zds.md`.
//!
//! - [`ZdsServer`] / [`ZdsAgentConnection`]: the agent's side.
//! - [`ZdsClient`] / [`ZdsRequest`]: ztunnel's side.

mod client;
mod error;
mod packet;
mod request;
mod server;
#[cfg(test)]
mod testutil;

pub use ambit_api::workload::zds::WorkloadInfo;
pub use client::ZdsClient;
pub use error::{error_text, ZdsError};
pub use packet::{PacketError, MAX_PACKET};
pub use request::{RequestError, ZdsRequest};
pub use server::{ZdsAgentConnection, ZdsServer, DEFAULT_ACK_TIMEOUT, DEFAULT_HELLO_TIMEOUT};

/// Where Istio's CNI agent listens and ztunnel connects by default.
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/ztunnel/ztunnel.sock";
