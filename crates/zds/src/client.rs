//! ztunnel's side: connect to the node agent, receive pods, ack each request.

use std::path::Path;

use ambit_api::workload::zds::{workload_response, Ack, Version, WorkloadResponse, ZdsHello};

use crate::error::{error_text, ZdsError};
use crate::packet::PacketSocket;
use crate::request::ZdsRequest;

/// The connecting side of ZDS, run by ztunnel.
#[derive(Debug)]
pub struct ZdsClient {
    sock: PacketSocket,
    /// A request was handed out and not acked yet.
    ack_pending: bool,
}

impl ZdsClient {
    /// Connects to the node agent at `path` and sends the hello.
    ///
    /// Must be called inside a tokio runtime.
    pub async fn connect(path: &Path) -> Result<Self, ZdsError> {
        let mut sock = PacketSocket::connect(path).await?;
        sock.send(&ZdsHello { version: Version::V1 as i32 }, None).await?;
        Ok(Self { sock, ack_pending: false })
    }

    /// Receives the next request; `None` when the agent closed the connection.
    ///
    /// A request that cannot be acted on (malformed, unknown, an add without
    /// exactly one descriptor, a truncated packet) is acked here with the error
    /// text and returned as an error that is not [fatal](ZdsError::is_fatal):
    /// log it and call `recv` again. A valid request must be answered with
    /// [`ack`](Self::ack) before the next `recv`.
    ///
    /// Cancel safe while waiting for a packet.
    pub async fn recv(&mut self) -> Result<Option<ZdsRequest>, ZdsError> {
        if self.ack_pending {
            return Err(ZdsError::AckPending);
        }
        let decoded = match self.sock.recv().await {
            Ok(None) => return Ok(None),
            Ok(Some(packet)) => ZdsRequest::decode(packet.bytes, packet.fds).map_err(ZdsError::from),
            Err(e) if e.is_packet_local() => Err(ZdsError::from(e)),
            Err(e) => return Err(e.into()),
        };
        match decoded {
            Ok(request) => {
                self.ack_pending = true;
                Ok(Some(request))
            }
            Err(err) => {
                tracing::warn!(error = %error_text(&err), "rejecting zds request");
                self.send_ack(error_text(&err)).await?;
                Err(err)
            }
        }
    }

    /// Answers the request last returned by [`recv`](Self::recv): `None` for
    /// success, or the reason it failed.
    pub async fn ack(&mut self, error: Option<&str>) -> Result<(), ZdsError> {
        if !self.ack_pending {
            return Err(ZdsError::NoPendingRequest);
        }
        self.send_ack(error.unwrap_or_default().to_owned()).await?;
        self.ack_pending = false;
        Ok(())
    }

    async fn send_ack(&mut self, error: String) -> Result<(), ZdsError> {
        let response = WorkloadResponse { payload: Some(workload_response::Payload::Ack(Ack { error })) };
        Ok(self.sock.send(&response, None).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{PacketListener, MAX_PACKET};
    use crate::request::RequestError;
    use crate::server::ZdsServer;
    use crate::testutil::{netns_fd, TestDir};
    use ambit_api::workload::zds::{workload_request::Payload, AddWorkload, DelWorkload, WorkloadRequest};
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use prost::Message;
    use std::io::IoSlice;
    use std::os::fd::{AsFd, AsRawFd};
    use std::time::Duration;

    /// A hand-driven agent that can send what a correct one never would.
    struct RawAgent {
        _listener: PacketListener,
        sock: PacketSocket,
    }

    impl RawAgent {
        async fn start(dir: &TestDir) -> (Self, ZdsClient) {
            let listener = PacketListener::bind(&dir.path("ztunnel.sock")).unwrap();
            let (client, sock) = tokio::join!(ZdsClient::connect(listener.path()), listener.accept());
            let mut sock = sock.unwrap();
            let hello = ZdsHello::decode(sock.recv().await.unwrap().unwrap().bytes).unwrap();
            assert_eq!(hello.version, Version::V1 as i32);
            (Self { _listener: listener, sock }, client.unwrap())
        }

        /// Sends raw bytes with the given descriptors (possibly several).
        fn send_raw(&self, bytes: &[u8], fds: &[std::os::fd::RawFd]) {
            let rights = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
            let fd = self.sock_fd();
            sendmsg::<()>(fd, &[IoSlice::new(bytes)], cmsgs, MsgFlags::empty(), None).unwrap();
        }

        fn sock_fd(&self) -> std::os::fd::RawFd {
            self.sock.as_fd().as_raw_fd()
        }

        async fn ack_error(&mut self) -> String {
            let packet = self.sock.recv().await.unwrap().expect("client closed instead of acking");
            match WorkloadResponse::decode(packet.bytes).unwrap().payload {
                Some(workload_response::Payload::Ack(ack)) => ack.error,
                None => panic!("response without an ack"),
            }
        }
    }

    fn encode(payload: Payload) -> Vec<u8> {
        WorkloadRequest { payload: Some(payload) }.encode_to_vec()
    }

    fn del(uid: &str) -> Vec<u8> {
        encode(Payload::Del(DelWorkload { uid: uid.into() }))
    }

    #[tokio::test]
    async fn add_without_a_descriptor_is_reported_and_acked_with_an_error() {
        let dir = TestDir::new("client_add_no_fd");
        let (mut agent, mut client) = RawAgent::start(&dir).await;
        agent.send_raw(&encode(Payload::Add(AddWorkload { uid: "u1".into(), workload_info: None })), &[]);
        let err = client.recv().await.unwrap_err();
        assert!(matches!(err, ZdsError::Request(RequestError::MissingFd { .. })), "{err:?}");
        assert!(!err.is_fatal());
        assert!(agent.ack_error().await.contains("u1 carries no network namespace descriptor"));

        agent.send_raw(&del("u1"), &[]);
        assert!(matches!(client.recv().await.unwrap(), Some(ZdsRequest::Del { uid }) if uid == "u1"));
        client.ack(None).await.unwrap();
        assert_eq!(agent.ack_error().await, "");
    }

    #[tokio::test]
    async fn a_malformed_packet_is_reported_without_closing_the_connection() {
        let dir = TestDir::new("client_malformed");
        let (mut agent, mut client) = RawAgent::start(&dir).await;
        agent.send_raw(&[0xff, 0xff, 0xff], &[]);
        let err = client.recv().await.unwrap_err();
        assert!(matches!(err, ZdsError::Request(RequestError::Decode(_))), "{err:?}");
        assert!(agent.ack_error().await.starts_with("invalid zds request: malformed request"));

        // An unknown payload (field 9) is reported the same way.
        agent.send_raw(&[0x48, 0x01], &[]);
        let err = client.recv().await.unwrap_err();
        assert!(matches!(err, ZdsError::Request(RequestError::UnknownPayload)), "{err:?}");
        assert!(!agent.ack_error().await.is_empty());

        agent.send_raw(&del("u2"), &[]);
        assert!(matches!(client.recv().await.unwrap(), Some(ZdsRequest::Del { .. })));
    }

    #[tokio::test]
    async fn a_truncated_packet_is_reported_without_closing_the_connection() {
        let dir = TestDir::new("client_truncated");
        let (mut agent, mut client) = RawAgent::start(&dir).await;
        agent.send_raw(&vec![0u8; MAX_PACKET + 100], &[]);
        let err = client.recv().await.unwrap_err();
        assert!(!err.is_fatal(), "{err:?}");
        assert!(agent.ack_error().await.contains("truncated"));
        agent.send_raw(&del("u3"), &[]);
        assert!(matches!(client.recv().await.unwrap(), Some(ZdsRequest::Del { .. })));
    }

    #[tokio::test]
    async fn extra_descriptors_are_closed() {
        let dir = TestDir::new("client_extra_fds");
        let (mut agent, mut client) = RawAgent::start(&dir).await;
        // Send the write end of a pipe twice; once every copy is closed the read end sees EOF.
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        let add = encode(Payload::Add(AddWorkload { uid: "u1".into(), workload_info: None }));
        agent.send_raw(&add, &[write_end.as_raw_fd(), write_end.as_raw_fd()]);
        drop(write_end);
        let err = client.recv().await.unwrap_err();
        assert!(matches!(err, ZdsError::Request(RequestError::TooManyFds { count: 2, .. })), "{err:?}");
        assert!(agent.ack_error().await.contains("2 descriptors"));

        let mut buf = [0u8; 1];
        for _ in 0..100 {
            match nix::unistd::read(read_end.as_fd(), &mut buf) {
                Ok(0) => return,
                Err(nix::errno::Errno::EAGAIN) => tokio::time::sleep(Duration::from_millis(10)).await,
                other => panic!("unexpected read result {other:?}"),
            }
        }
        panic!("received descriptors were not closed");
    }

    #[tokio::test]
    async fn a_descriptor_on_a_del_is_rejected() {
        let dir = TestDir::new("client_del_fd");
        let (mut agent, mut client) = RawAgent::start(&dir).await;
        let netns = netns_fd();
        agent.send_raw(&del("u1"), &[netns.as_raw_fd()]);
        let err = client.recv().await.unwrap_err();
        assert!(matches!(err, ZdsError::Request(RequestError::UnexpectedFds { kind: "del", count: 1 })), "{err:?}");
        assert!(!agent.ack_error().await.is_empty());
    }

    #[tokio::test]
    async fn client_sees_none_when_the_server_closes() {
        let dir = TestDir::new("client_none");
        let server = ZdsServer::bind(&dir.path("ztunnel.sock")).unwrap();
        let (client, conn) = tokio::join!(ZdsClient::connect(server.path()), server.accept());
        let mut client = client.unwrap();
        drop(conn.unwrap());
        let next = tokio::time::timeout(Duration::from_secs(5), client.recv()).await.unwrap();
        assert!(next.unwrap().is_none());
    }

    #[tokio::test]
    async fn ack_without_a_request_and_recv_before_ack_are_refused() {
        let dir = TestDir::new("client_misuse");
        let (agent, mut client) = RawAgent::start(&dir).await;
        assert!(matches!(client.ack(None).await, Err(ZdsError::NoPendingRequest)));
        agent.send_raw(&del("u1"), &[]);
        client.recv().await.unwrap().unwrap();
        assert!(matches!(client.recv().await, Err(ZdsError::AckPending)));
        client.ack(None).await.unwrap();
    }

    #[tokio::test]
    async fn connect_sends_the_v1_hello_bytes() {
        let dir = TestDir::new("client_hello_bytes");
        let listener = PacketListener::bind(&dir.path("ztunnel.sock")).unwrap();
        let (_client, sock) = tokio::join!(ZdsClient::connect(listener.path()), listener.accept());
        let mut sock = sock.unwrap();
        // field 1 (version), varint 1 (V1): what Istio's agent expects.
        assert_eq!(sock.recv().await.unwrap().unwrap().bytes, &[0x08, 0x01]);
    }
}
