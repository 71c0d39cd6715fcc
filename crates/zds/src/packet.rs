//! The socket layer shared by both sides: nonblocking `SOCK_SEQPACKET` unix
//! sockets driven by tokio, one protobuf message per packet, file descriptors
//! carried as `SCM_RIGHTS`.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, connect, listen, recvmsg, sendmsg, socket, AddressFamily, Backlog, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Largest packet either side sends or accepts. Real messages are a few
/// hundred bytes; 64 KiB leaves room for long names without truncation.
pub const MAX_PACKET: usize = 64 * 1024;

/// The kernel's per-message cap on passed descriptors (`SCM_MAX_FD`). Sizing
/// the control buffer for it means rights are never cut off by `MSG_CTRUNC`,
/// so every descriptor a peer sends reaches us as an `OwnedFd` and is closed.
const SCM_MAX_FD: usize = 253;

/// How long `connect` waits before retrying when the listener's backlog is full.
const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// Errors of the socket layer.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// `socket(2)` failed.
    #[error("cannot create a seqpacket socket")]
    Create(#[source] io::Error),
    /// The path does not fit in a unix socket address.
    #[error("invalid unix socket path {path}")]
    Address {
        /// The rejected path.
        path: PathBuf,
        /// Why it was rejected.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket sits where the socket should be bound.
    #[error("{path} exists and is not a socket; refusing to remove it")]
    NotASocket {
        /// The occupied path.
        path: PathBuf,
    },
    /// Preparing the path or binding and listening failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// Connecting to the server failed.
    #[error("cannot connect to {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// `accept4(2)` failed.
    #[error("cannot accept a connection")]
    Accept(#[source] io::Error),
    /// `sendmsg(2)` failed.
    #[error("cannot send a packet")]
    Send(#[source] io::Error),
    /// `recvmsg(2)` failed.
    #[error("cannot receive a packet")]
    Recv(#[source] io::Error),
    /// The message did not fit in the prepared buffer.
    #[error("cannot encode the message")]
    Encode(#[from] prost::EncodeError),
    /// An outgoing message exceeds [`MAX_PACKET`].
    #[error("message of {len} bytes exceeds the {MAX_PACKET}-byte packet limit")]
    TooLarge {
        /// Encoded length.
        len: usize,
    },
    /// The kernel sent fewer bytes than asked, which a seqpacket socket never does.
    #[error("bug: short send of {sent} of {len} bytes on a seqpacket socket")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Bytes asked.
        len: usize,
    },
    /// An incoming packet was larger than [`MAX_PACKET`] (`MSG_TRUNC`).
    #[error("received packet truncated: larger than {MAX_PACKET} bytes")]
    Truncated,
    /// The ancillary data of an incoming packet was cut off (`MSG_CTRUNC`).
    #[error("received packet's ancillary data truncated")]
    ControlTruncated,
}

impl PacketError {
    /// True when only the offending packet was lost and the socket still works:
    /// a seqpacket socket discards the rest of a truncated packet as a whole.
    pub fn is_packet_local(&self) -> bool {
        matches!(self, Self::Truncated | Self::ControlTruncated)
    }
}

/// One received packet: its bytes and the descriptors that came with it.
#[derive(Debug)]
pub struct Packet<'a> {
    /// The message bytes.
    pub bytes: &'a [u8],
    /// Descriptors received with the packet, owned and close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// A connected seqpacket socket with its reusable buffers.
#[derive(Debug)]
pub struct PacketSocket {
    fd: AsyncFd<OwnedFd>,
    recv_buf: Box<[u8]>,
    cmsg_buf: Vec<u8>,
    send_buf: Vec<u8>,
}

impl PacketSocket {
    /// Wraps a connected, nonblocking seqpacket socket. Needs a tokio runtime.
    fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(Self {
            fd: register(fd, Interest::READABLE | Interest::WRITABLE)?,
            recv_buf: vec![0u8; MAX_PACKET].into_boxed_slice(),
            cmsg_buf: nix::cmsg_space!([RawFd; SCM_MAX_FD]),
            send_buf: Vec::with_capacity(1024),
        })
    }

    /// Connects to the seqpacket socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, PacketError> {
        let connect_err = |source: io::Error| PacketError::Connect { path: path.to_owned(), source };
        let addr = unix_addr(path)?;
        let fd = new_socket()?;
        loop {
            match connect(fd.as_raw_fd(), &addr) {
                Ok(()) => break,
                // Unix sockets report a full listen backlog as EAGAIN, not EINPROGRESS.
                Err(Errno::EAGAIN) => tokio::time::sleep(CONNECT_RETRY).await,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(connect_err(e.into())),
            }
        }
        Self::new(fd).map_err(connect_err)
    }

    /// Sends `msg` as one packet, with `fd` attached as `SCM_RIGHTS` if given.
    pub async fn send<M: prost::Message>(&mut self, msg: &M, fd: Option<BorrowedFd<'_>>) -> Result<(), PacketError> {
        self.send_buf.clear();
        msg.encode(&mut self.send_buf)?;
        let len = self.send_buf.len();
        if len > MAX_PACKET {
            return Err(PacketError::TooLarge { len });
        }
        let raw = fd.map(|fd| [fd.as_raw_fd()]);
        let rights = raw.as_ref().map(|raw| [ControlMessage::ScmRights(raw)]);
        let cmsgs: &[ControlMessage<'_>] = rights.as_ref().map_or(&[], |r| &r[..]);
        let iov = [IoSlice::new(&self.send_buf)];
        let sent = self
            .fd
            .async_io(Interest::WRITABLE, |sock| {
                // MSG_NOSIGNAL: a vanished peer is an error to report, not a SIGPIPE.
                sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
            })
            .await
            .map_err(PacketError::Send)?;
        if sent != len {
            return Err(PacketError::ShortSend { sent, len });
        }
        Ok(())
    }

    /// Receives one packet. `None` means the peer closed the connection.
    ///
    /// Cancel safe: a packet is consumed only when this returns it.
    pub async fn recv(&mut self) -> Result<Option<Packet<'_>>, PacketError> {
        let Self { fd, recv_buf, cmsg_buf, .. } = self;
        let (len, flags, fds) = fd
            .async_io(Interest::READABLE, |sock| {
                let mut iov = [IoSliceMut::new(recv_buf)];
                let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(cmsg_buf), MsgFlags::MSG_CMSG_CLOEXEC)
                    .map_err(io::Error::from)?;
                // Take ownership of every descriptor before any check can return,
                // so that all of them are closed on every error path.
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for cmsg in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = cmsg {
                            // SAFETY: the kernel just installed these descriptors for us
                            // and nothing else refers to them.
                            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                        }
                    }
                }
                Ok((msg.bytes, msg.flags, fds))
            })
            .await
            .map_err(PacketError::Recv)?;
        if flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(PacketError::Truncated);
        }
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(PacketError::ControlTruncated);
        }
        // A zero-length read is end of stream (Istio's ztunnel reads it the same
        // way); no ZDS message encodes to zero bytes.
        if len == 0 && fds.is_empty() {
            return Ok(None);
        }
        Ok(Some(Packet { bytes: &recv_buf[..len], fds }))
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// A listening seqpacket socket bound to a path.
#[derive(Debug)]
pub struct PacketListener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
    /// Device and inode of the socket file we created, to unlink only our own.
    file_id: (u64, u64),
}

impl PacketListener {
    /// Binds and listens on `path` with mode 0600, creating missing parent
    /// directories and first removing a stale socket file. Needs a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self, PacketError> {
        let bind_err = |source: io::Error| PacketError::Bind { path: path.to_owned(), source };
        let addr = unix_addr(path)?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(bind_err)?,
            Ok(_) => return Err(PacketError::NotASocket { path: path.to_owned() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(bind_err)?;
                }
            }
            Err(e) => return Err(bind_err(e)),
        }
        let fd = new_socket()?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| bind_err(e.into()))?;
        // Only root (ztunnel runs as root) may hand namespaces to or take them from us.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        listen(&fd, Backlog::MAXCONN).map_err(|e| bind_err(e.into()))?;
        Ok(Self {
            fd: register(fd, Interest::READABLE).map_err(bind_err)?,
            path: path.to_owned(),
            file_id: (meta.dev(), meta.ino()),
        })
    }

    /// The path this listener is bound to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection. Cancel safe.
    pub async fn accept(&self) -> Result<PacketSocket, PacketError> {
        let fd = self
            .fd
            .async_io(Interest::READABLE, |sock| {
                let raw = accept4(sock.as_raw_fd(), SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)?;
                // SAFETY: accept4 returned a new descriptor that only we hold.
                Ok(unsafe { OwnedFd::from_raw_fd(raw) })
            })
            .await
            .map_err(PacketError::Accept)?;
        PacketSocket::new(fd).map_err(PacketError::Accept)
    }
}

impl Drop for PacketListener {
    fn drop(&mut self) {
        // Unlink the socket file unless another server has replaced it since.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Registers a socket with the tokio reactor. Needs a tokio runtime.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and keeps its descriptor number until the
    // AsyncFd that owns it is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

fn unix_addr(path: &Path) -> Result<UnixAddr, PacketError> {
    UnixAddr::new(path).map_err(|e| PacketError::Address { path: path.to_owned(), source: e.into() })
}

fn new_socket() -> Result<OwnedFd, PacketError> {
    socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| PacketError::Create(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestDir;
    use ambit_api::workload::zds::{Version, ZdsHello};
    use prost::Message;

    #[tokio::test]
    async fn packet_round_trips_bytes_and_descriptor() {
        let dir = TestDir::new("packet_round_trip");
        let listener = PacketListener::bind(&dir.path("s.sock")).unwrap();
        let mut client = PacketSocket::connect(listener.path()).await.unwrap();
        let mut server = listener.accept().await.unwrap();
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let hello = ZdsHello { version: Version::V1 as i32 };
        client.send(&hello, Some(netns.as_fd())).await.unwrap();
        let packet = server.recv().await.unwrap().unwrap();
        assert_eq!(ZdsHello::decode(packet.bytes).unwrap(), hello);
        assert_eq!(packet.fds.len(), 1);
    }

    #[tokio::test]
    async fn oversized_packet_is_reported_as_truncated_and_the_next_one_arrives() {
        let dir = TestDir::new("packet_truncated");
        let listener = PacketListener::bind(&dir.path("s.sock")).unwrap();
        let client = PacketSocket::connect(listener.path()).await.unwrap();
        let mut server = listener.accept().await.unwrap();
        let big = vec![7u8; MAX_PACKET + 1];
        sendmsg::<()>(client.fd.as_raw_fd(), &[IoSlice::new(&big)], &[], MsgFlags::empty(), None).unwrap();
        sendmsg::<()>(client.fd.as_raw_fd(), &[IoSlice::new(&[1, 2])], &[], MsgFlags::empty(), None).unwrap();
        assert!(matches!(server.recv().await, Err(PacketError::Truncated)));
        assert_eq!(server.recv().await.unwrap().unwrap().bytes, &[1, 2]);
    }

    #[tokio::test]
    async fn sending_more_than_the_packet_limit_fails() {
        let dir = TestDir::new("packet_too_large");
        let listener = PacketListener::bind(&dir.path("s.sock")).unwrap();
        let mut client = PacketSocket::connect(listener.path()).await.unwrap();
        let info = ambit_api::workload::zds::WorkloadInfo { name: "x".repeat(MAX_PACKET), ..Default::default() };
        assert!(matches!(client.send(&info, None).await, Err(PacketError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_and_sets_mode_0600() {
        let dir = TestDir::new("packet_stale");
        let path = dir.path("nested/dir/s.sock");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // A std listener leaves its socket file behind when dropped, like a crashed agent.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let listener = PacketListener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        PacketSocket::connect(listener.path()).await.unwrap();
    }

    #[tokio::test]
    async fn bind_creates_missing_parent_directories() {
        let dir = TestDir::new("packet_parents");
        let path = dir.path("a/b/s.sock");
        let _listener = PacketListener::bind(&path).unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    }

    #[tokio::test]
    async fn bind_refuses_to_remove_a_regular_file() {
        let dir = TestDir::new("packet_regular_file");
        let path = dir.path("s.sock");
        std::fs::write(&path, b"keep me").unwrap();
        assert!(matches!(PacketListener::bind(&path), Err(PacketError::NotASocket { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn dropping_the_listener_removes_only_its_own_socket_file() {
        let dir = TestDir::new("packet_drop");
        let path = dir.path("s.sock");
        drop(PacketListener::bind(&path).unwrap());
        assert!(!path.exists());

        let first = PacketListener::bind(&path).unwrap();
        let second = PacketListener::bind(&path).unwrap();
        drop(first);
        assert!(path.exists(), "the newer server's socket must survive");
        drop(second);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn connecting_to_a_missing_socket_fails() {
        let dir = TestDir::new("packet_missing");
        let err = PacketSocket::connect(&dir.path("nope.sock")).await.unwrap_err();
        assert!(matches!(err, PacketError::Connect { .. }), "{err:?}");
    }
}
