//! Socket helpers: the original destination of a redirected connection, and
//! connecting from inside a pod (optionally as another source address).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::netns::{bind_transparent, NetnsError, PodNetns};

/// Errors connecting from a pod.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Netns(#[from] NetnsError),
    #[error("cannot bind source address {src}: {source}")]
    Bind { src: IpAddr, source: std::io::Error },
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
}

/// Original destination of a connection captured by REDIRECT
/// (`SO_ORIGINAL_DST` from conntrack).
pub fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    let local = stream.local_addr()?;
    if local.is_ipv4() {
        // SAFETY: sockaddr_in is plain data; the kernel fills at most `len` bytes.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                libc::SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::new(ip.into(), u16::from_be(addr.sin_port)))
    } else {
        // SAFETY: as above, for sockaddr_in6 and IP6T_SO_ORIGINAL_DST (80).
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(fd, libc::SOL_IPV6, 80, (&mut addr as *mut libc::sockaddr_in6).cast(), &mut len)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = std::net::Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Ok(SocketAddr::new(ip.into(), u16::from_be(addr.sin6_port)))
    }
}

/// Connects to `addr` from inside the pod's netns with ztunnel's mark. With
/// `as_source`, the connection carries that (non-local) source address, so
/// the application sees the real client.
pub async fn connect_from_pod(
    netns: &PodNetns,
    addr: SocketAddr,
    as_source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let sock = netns.tcp_socket(addr).await?;
    pod_local(&socket2::SockRef::from(&sock));
    if let Some(src) = as_source {
        bind_transparent(&sock, src).map_err(|source| ConnectError::Bind { src, source })?;
    }
    let fut = tokio::net::TcpSocket::from_std_stream(sock.into()).connect(addr);
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(ConnectError::Connect { addr, source }),
        Err(_) => Err(ConnectError::Timeout(addr)),
    }
}

/// Tunes a connection that never leaves the pod (between an application and
/// ztunnel, both inside the pod's network namespace): a congestion control
/// that paces (BBR, a common default) only costs timers on such a path.
pub fn pod_local(sock: &socket2::SockRef<'_>) {
    let _ = sock.set_tcp_congestion(b"cubic");
}
