//! The node agent's side: listen for ztunnel, send it pods, wait for acks.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::Duration;

use ambit_api::workload::zds::{
    workload_request::Payload, workload_response, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version,
    WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};
use prost::Message;

use crate::error::ZdsError;
use crate::packet::{PacketListener, PacketSocket};

/// How long a connected client has to send its hello, unless set otherwise.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the agent waits for each ack, unless set otherwise.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The listening side of ZDS, run by the CNI node agent.
#[derive(Debug)]
pub struct ZdsServer {
    listener: PacketListener,
    hello_timeout: Duration,
    ack_timeout: Duration,
}

impl ZdsServer {
    /// Listens on `path` (mode 0600, parent directories created). A stale
    /// socket file is removed first; any other file there is an error. The
    /// socket file is removed again when the server is dropped.
    ///
    /// Must be called inside a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self, ZdsError> {
        Ok(Self {
            listener: PacketListener::bind(path)?,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            ack_timeout: DEFAULT_ACK_TIMEOUT,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    /// Sets how long a new client has to send its hello.
    pub fn set_hello_timeout(&mut self, timeout: Duration) {
        self.hello_timeout = timeout;
    }

    /// Sets the ack timeout of connections accepted from now on.
    pub fn set_ack_timeout(&mut self, timeout: Duration) {
        self.ack_timeout = timeout;
    }

    /// Accepts one ztunnel and reads and checks its hello. On error only that
    /// client is dropped; call again to accept the next one. Cancelling drops a
    /// client whose hello was not read yet (it will reconnect).
    pub async fn accept(&self) -> Result<ZdsAgentConnection, ZdsError> {
        let mut sock = self.listener.accept().await?;
        let packet = tokio::time::timeout(self.hello_timeout, sock.recv())
            .await
            .map_err(|_| ZdsError::HelloTimeout(self.hello_timeout))??
            .ok_or(ZdsError::Closed)?;
        if !packet.fds.is_empty() {
            return Err(ZdsError::UnexpectedFds { what: "hello", count: packet.fds.len() });
        }
        let hello = ZdsHello::decode(packet.bytes).map_err(ZdsError::BadHello)?;
        if hello.version != Version::V1 as i32 {
            return Err(ZdsError::UnsupportedVersion(hello.version));
        }
        tracing::debug!(path = %self.path().display(), "zds client connected");
        Ok(ZdsAgentConnection { sock, ack_timeout: self.ack_timeout, broken: false })
    }
}

/// One connected ztunnel, seen from the node agent. Each call sends one
/// request and waits for its ack; calls are strictly one at a time.
#[derive(Debug)]
pub struct ZdsAgentConnection {
    sock: PacketSocket,
    ack_timeout: Duration,
    /// Set while a request is in flight and after any failure other than a
    /// rejection, so that an abandoned call cannot pair a late ack with the
    /// next request.
    broken: bool,
}

impl ZdsAgentConnection {
    /// Enrolls a pod, passing its network namespace. `Rejected` if ztunnel refuses.
    pub async fn add(&mut self, uid: &str, info: WorkloadInfo, netns: BorrowedFd<'_>) -> Result<(), ZdsError> {
        let add = AddWorkload { uid: uid.to_owned(), workload_info: Some(info) };
        self.request(Payload::Add(add), Some(netns)).await
    }

    /// During the snapshot: keeps a pod whose namespace cannot be opened.
    pub async fn keep(&mut self, uid: &str) -> Result<(), ZdsError> {
        self.request(Payload::Keep(KeepWorkload { uid: uid.to_owned() }), None).await
    }

    /// Releases a pod.
    pub async fn del(&mut self, uid: &str) -> Result<(), ZdsError> {
        self.request(Payload::Del(DelWorkload { uid: uid.to_owned() }), None).await
    }

    /// Ends the snapshot: ztunnel drops pods neither added nor kept since the hello.
    pub async fn snapshot_sent(&mut self) -> Result<(), ZdsError> {
        self.request(Payload::SnapshotSent(SnapshotSent {}), None).await
    }

    /// Sets how long each call waits for its ack.
    pub fn set_ack_timeout(&mut self, timeout: Duration) {
        self.ack_timeout = timeout;
    }

    /// Waits until ztunnel closes the connection (it never speaks unasked, so
    /// anything it sends between requests is an error). Cancel safe; use it
    /// between requests to notice a restarted ztunnel early.
    pub async fn closed(&mut self) -> Result<(), ZdsError> {
        if self.broken {
            return Err(ZdsError::Broken);
        }
        let received = self.sock.recv().await;
        self.broken = true;
        match received? {
            None => Ok(()),
            Some(_) => Err(ZdsError::UnknownResponse),
        }
    }

    async fn request(&mut self, payload: Payload, fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        if self.broken {
            return Err(ZdsError::Broken);
        }
        // Stays set if this future is dropped half-way.
        self.broken = true;
        let result = self.exchange(payload, fd).await;
        self.broken = matches!(&result, Err(e) if !matches!(e, ZdsError::Rejected(_)));
        result
    }

    async fn exchange(&mut self, payload: Payload, fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        self.sock.send(&WorkloadRequest { payload: Some(payload) }, fd).await?;
        let packet = tokio::time::timeout(self.ack_timeout, self.sock.recv())
            .await
            .map_err(|_| ZdsError::AckTimeout(self.ack_timeout))??
            .ok_or(ZdsError::Closed)?;
        if !packet.fds.is_empty() {
            return Err(ZdsError::UnexpectedFds { what: "response", count: packet.fds.len() });
        }
        let response = WorkloadResponse::decode(packet.bytes).map_err(ZdsError::BadResponse)?;
        match response.payload {
            Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
            Some(workload_response::Payload::Ack(ack)) => Err(ZdsError::Rejected(ack.error)),
            None => Err(ZdsError::UnknownResponse),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ZdsClient;
    use crate::request::ZdsRequest;
    use crate::testutil::{netns_fd, same_file, TestDir};
    use std::os::fd::AsFd;

    fn info(name: &str) -> WorkloadInfo {
        WorkloadInfo { name: name.into(), namespace: "default".into(), service_account: "sa".into() }
    }

    #[tokio::test]
    async fn full_flow_passes_the_netns_and_every_request_is_acked() {
        let dir = TestDir::new("server_full_flow");
        let server = ZdsServer::bind(&dir.path("ztunnel.sock")).unwrap();
        let path = server.path().to_owned();
        let ztunnel = tokio::spawn(async move {
            let mut client = ZdsClient::connect(&path).await.unwrap();
            let mut seen = Vec::new();
            while let Some(req) = client.recv().await.unwrap() {
                if let ZdsRequest::Add { netns, .. } = &req {
                    let expected = netns_fd();
                    assert!(same_file(netns.as_fd(), expected.as_fd()), "received fd is not our netns");
                    let flags = nix::fcntl::fcntl(netns, nix::fcntl::FcntlArg::F_GETFD).unwrap();
                    assert_ne!(flags & nix::libc::FD_CLOEXEC, 0, "received fd must be close-on-exec");
                }
                seen.push(format!("{req:?}").split([' ', '{']).next().unwrap().to_owned());
                client.ack(None).await.unwrap();
            }
            seen
        });
        let mut conn = server.accept().await.unwrap();
        let netns = netns_fd();
        conn.add("uid-1", info("pod-1"), netns.as_fd()).await.unwrap();
        conn.keep("uid-2").await.unwrap();
        conn.del("uid-1").await.unwrap();
        conn.snapshot_sent().await.unwrap();
        drop(conn);
        assert_eq!(ztunnel.await.unwrap(), ["Add", "Keep", "Del", "SnapshotSent"]);
    }

    #[tokio::test]
    async fn ack_with_an_error_surfaces_as_rejected_and_the_connection_goes_on() {
        let dir = TestDir::new("server_rejected");
        let server = ZdsServer::bind(&dir.path("ztunnel.sock")).unwrap();
        let path = server.path().to_owned();
        let ztunnel = tokio::spawn(async move {
            let mut client = ZdsClient::connect(&path).await.unwrap();
            client.recv().await.unwrap().unwrap();
            client.ack(Some("no such pod")).await.unwrap();
            client.recv().await.unwrap().unwrap();
            client.ack(None).await.unwrap();
        });
        let mut conn = server.accept().await.unwrap();
        let err = conn.del("uid-1").await.unwrap_err();
        assert!(matches!(&err, ZdsError::Rejected(m) if m == "no such pod"), "{err:?}");
        conn.snapshot_sent().await.unwrap();
        ztunnel.await.unwrap();
    }

    #[tokio::test]
    async fn server_rejects_a_wrong_hello_version() {
        let dir = TestDir::new("server_wrong_version");
        let server = ZdsServer::bind(&dir.path("ztunnel.sock")).unwrap();
        let mut raw = PacketSocket::connect(server.path()).await.unwrap();
        raw.send(&ZdsHello { version: 2 }, None).await.unwrap();
        let err = server.accept().await.unwrap_err();
        assert!(matches!(err, ZdsError::UnsupportedVersion(2)), "{err:?}");

        // Version 0 (NOT_USED) encodes to an empty packet, which on a seqpacket
        // socket reads exactly like end of stream.
        let mut raw = PacketSocket::connect(server.path()).await.unwrap();
        raw.send(&ZdsHello { version: Version::NotUsed as i32 }, None).await.unwrap();
        let err = server.accept().await.unwrap_err();
        assert!(matches!(err, ZdsError::Closed), "{err:?}");

        let mut raw = PacketSocket::connect(server.path()).await.unwrap();
        raw.send(&ZdsHello { version: 7 }, None).await.unwrap();
        let err = server.accept().await.unwrap_err();
        assert!(matches!(err, ZdsError::UnsupportedVersion(7)), "{err:?}");
    }

    #[tokio::test]
    async fn server_rejects_a_malformed_hello_and_accepts_the_next_client() {
        let dir = TestDir::new("server_bad_hello");
        let server = ZdsServer::bind(&dir.path("ztunnel.sock")).unwrap();
        let mut raw = PacketSocket::connect(server.path()).await.unwrap();
        // A WorkloadInfo whose name field (1) is a string: not a valid varint version.
        let junk = WorkloadInfo { name: "x".into(), ..Default::default() };
        raw.send(&junk, None).await.unwrap();
        let err = server.accept().await.unwrap_err();
        assert!(matches!(err, ZdsError::BadHello(_)), "{err:?}");

        let path = server.path().to_owned();
        let client = tokio::spawn(async move { ZdsClient::connect(&path).await.unwrap() });
        server.accept().await.unwrap();
        client.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_sends_no_hello_times_out() {
        let dir = TestDir::new("server_hello_timeout");
        let mut server = ZdsServer::bind(&dir.path("ztunnel.sock")).unwrap();
        server.set_hello_timeout(Duration::from_millis(100));
        let _silent = PacketSocket::connect(server.path()).await.unwrap();
        let err = server.accept().await.unwrap_err();
        assert!(matches!(err, ZdsError::HelloTimeout(_)), "{err:?}");
    }

    #[tokio::test]
    async fn missing_ack_times_out_and_leaves_the_connection_broken() {
        let dir = TestDir::new("server_ack_timeout");
        let mut server = ZdsServer::bind(&dir.path("ztunnel.sock")).unwrap();
        server.set_ack_timeout(Duration::from_millis(100));
        let client = ZdsClient::connect(server.path());
        let (client, conn) = tokio::join!(client, server.accept());
        let (_client, mut conn) = (client.unwrap(), conn.unwrap());
        let err = conn.del("uid-1").await.unwrap_err();
        assert!(matches!(err, ZdsError::AckTimeout(_)), "{err:?}");
        assert!(matches!(conn.del("uid-1").await, Err(ZdsError::Broken)));
    }

    #[tokio::test]
    async fn closed_returns_when_ztunnel_disconnects() {
        let dir = TestDir::new("server_closed");
        let server = ZdsServer::bind(&dir.path("ztunnel.sock")).unwrap();
        let (client, conn) = tokio::join!(ZdsClient::connect(server.path()), server.accept());
        let mut conn = conn.unwrap();
        drop(client.unwrap());
        tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap().unwrap();
        assert!(matches!(conn.snapshot_sent().await, Err(ZdsError::Broken)));
    }

    #[tokio::test]
    async fn request_to_a_vanished_ztunnel_fails() {
        let dir = TestDir::new("server_vanished");
        let server = ZdsServer::bind(&dir.path("ztunnel.sock")).unwrap();
        let (client, conn) = tokio::join!(ZdsClient::connect(server.path()), server.accept());
        let mut conn = conn.unwrap();
        drop(client.unwrap());
        let err = conn.del("uid-1").await.unwrap_err();
        assert!(err.is_fatal(), "{err:?}");
    }
}
