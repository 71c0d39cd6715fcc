//! What capture needs of a pod's network namespace: its cookie (the key every
//! program filters by) and its addresses.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use nix::sched::CloneFlags;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::EbpfError;

/// A pod's network namespace as the programs see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NetnsInfo {
    /// The kernel's cookie for the namespace (`SO_NETNS_COOKIE`).
    pub cookie: u64,
    /// Its first global IPv4 address.
    pub ipv4: Option<Ipv4Addr>,
    /// Its first global IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
}

/// Reads the cookie and addresses of the network namespace at `path`, from a
/// short-lived thread that enters it (the caller's threads stay where they
/// are).
pub(crate) fn inspect_netns(path: &Path) -> Result<NetnsInfo, EbpfError> {
    let io = |what| move |source| EbpfError::Io { what, path: path.to_path_buf(), source };
    let ns = File::open(path).map_err(io("cannot open network namespace"))?;
    let entered = std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<NetnsInfo> {
            nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
            let probe = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
            let cookie = netns_cookie(probe.as_fd())?;
            let (mut ipv4, mut ipv6) = (None, None);
            for ifa in nix::ifaddrs::getifaddrs()? {
                match ifa.address.as_ref().and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|a| IpAddr::V4(a.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
                }) {
                    Some(IpAddr::V4(a)) if ipv4.is_none() && !a.is_loopback() && !a.is_link_local() => ipv4 = Some(a),
                    Some(IpAddr::V6(a)) if ipv6.is_none() && !a.is_loopback() && !a.is_unicast_link_local() => {
                        ipv6 = Some(a)
                    }
                    _ => {}
                }
            }
            Ok(NetnsInfo { cookie, ipv4, ipv6 })
        })
        .join()
        .expect("bug: netns inspection thread panicked")
    });
    entered.map_err(io("cannot inspect network namespace"))
}

/// The cookie of the network namespace `sock` belongs to.
pub(crate) fn netns_cookie(sock: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd; the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
