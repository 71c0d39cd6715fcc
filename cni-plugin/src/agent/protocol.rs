//! The CNI plugin ↔ node agent protocol: one JSON request and one JSON
//! response per connection on a unix stream socket. The client writes its
//! request and shuts its side down; the server answers and closes. No
//! framing beyond end of stream is needed, and a connection never carries
//! state, so either side may restart at any time.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use super::pod::PodInfo;

/// Where the agent listens by default (the plugin's `agent_socket`).
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambit/cni.sock";

/// The largest message either side reads; a GC list of a few hundred
/// container IDs is a few tens of KiB.
pub const MAX_MESSAGE: u64 = 4 << 20;

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// CNI ADD of an enrolled pod: capture it and hand it to ztunnel.
    Add {
        /// The pod.
        pod: PodInfo,
        /// `CNI_CONTAINERID`, the key of CNI GC.
        container_id: String,
    },
    /// CNI DEL: release the pod (by UID when the runtime passed one, else
    /// by container ID).
    Del {
        /// `K8S_POD_UID`, when present.
        uid: Option<String>,
        /// `CNI_CONTAINERID`.
        container_id: String,
    },
    /// CNI CHECK of an enrolled pod.
    Check {
        /// The pod's UID.
        uid: String,
    },
    /// CNI STATUS: is the agent there?
    Status,
    /// CNI GC: release CNI-enrolled pods whose container is not listed.
    Gc {
        /// The container IDs of `cni.dev/valid-attachments`.
        valid_container_ids: Vec<String>,
    },
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Ok {
        /// Whether a ztunnel is connected and has its snapshot (STATUS
        /// reports it in the log only; see the plugin).
        #[serde(default)]
        ztunnel_ready: bool,
    },
    /// Failed; `retryable` when the runtime should try again later.
    Error {
        /// Whether trying again later may succeed.
        retryable: bool,
        /// For the kubelet's event.
        message: String,
    },
}

/// Failure to exchange a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Nobody listens on the socket (the agent is down or not installed).
    #[error("cannot connect to the node agent at {socket}: {source}")]
    Connect {
        /// The socket path.
        socket: String,
        /// Why.
        source: std::io::Error,
    },
    /// The connection failed mid-way.
    #[error("node agent connection: {0}")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("no answer from the node agent at {socket} within {timeout:?}")]
    Timeout {
        /// The socket path.
        socket: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The message is not what the protocol says.
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
    /// The message is larger than [`MAX_MESSAGE`].
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
}

/// Sends `request` to the agent at `socket` and returns its response, all
/// within `timeout`.
pub async fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ProtocolError> {
    let name = socket.display().to_string();
    let exchange = async {
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ProtocolError::Connect { socket: name.clone(), source })?;
        write_message(&mut stream, request).await?;
        read_message(&mut stream).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProtocolError::Timeout { socket: name.clone(), timeout })?
}

/// Reads one message: everything up to end of stream.
pub async fn read_message<T: DeserializeOwned>(stream: &mut (impl AsyncRead + Unpin)) -> Result<T, ProtocolError> {
    let mut bytes = Vec::new();
    stream.take(MAX_MESSAGE + 1).read_to_end(&mut bytes).await?;
    if bytes.len() as u64 > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge);
    }
    Ok(serde_json::from_slice(&bytes)?)
}

/// Writes one message and ends the stream's write side.
pub async fn write_message<T: Serialize>(
    stream: &mut (impl AsyncWrite + Unpin),
    message: &T,
) -> Result<(), ProtocolError> {
    stream.write_all(&serde_json::to_vec(message)?).await?;
    stream.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_have_a_stable_json_form() {
        let del = Request::Del { uid: Some("u1".into()), container_id: "c1".into() };
        assert_eq!(serde_json::to_string(&del).unwrap(), r#"{"op":"del","uid":"u1","container_id":"c1"}"#);
        assert_eq!(serde_json::to_string(&Request::Status).unwrap(), r#"{"op":"status"}"#);
        let ok: Response = serde_json::from_str(r#"{"result":"ok"}"#).unwrap();
        assert_eq!(ok, Response::Ok { ztunnel_ready: false });
        let err = Response::Error { retryable: true, message: "no ztunnel".into() };
        let text = serde_json::to_string(&err).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), err);
    }

    #[tokio::test]
    async fn a_message_round_trips_over_a_socket_pair_and_oversize_is_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let gc = Request::Gc { valid_container_ids: vec!["c1".into()] };
        write_message(&mut a, &gc).await.unwrap();
        assert_eq!(read_message::<Request>(&mut b).await.unwrap(), gc);

        let (mut a, mut b) = UnixStream::pair().unwrap();
        let writer = tokio::spawn(async move {
            let _ = a.write_all(&vec![b' '; MAX_MESSAGE as usize + 10]).await;
        });
        assert!(matches!(read_message::<Request>(&mut b).await, Err(ProtocolError::TooLarge)));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn calling_a_missing_socket_is_a_connect_error_naming_it() {
        let err = call(Path::new("/nonexistent/ambit.sock"), &Request::Status, Duration::from_secs(1)).await;
        let err = err.unwrap_err();
        assert!(matches!(err, ProtocolError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/ambit.sock"), "{err}");
    }
}
