//! Sockets inside a pod's network namespace. A socket belongs to the netns
//! of the thread that created it, for life; so each enrolled pod gets one
//! dedicated OS thread that entered the pod's netns once (`setns`) and
//! creates sockets on request. Tokio workers never change namespace.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::oneshot;

/// Errors entering or using a pod's network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot start the netns thread for pod {pod}: {source}")]
    Spawn { pod: String, source: std::io::Error },
    #[error("cannot enter the network namespace of pod {pod}: {source}")]
    Setns { pod: String, source: nix::Error },
    #[error("the netns thread of pod {0} has stopped")]
    Stopped(String),
    #[error("socket operation in pod {pod}'s netns failed: {source}")]
    Socket { pod: String, source: std::io::Error },
}

type Job = Box<dyn FnOnce() + Send>;

/// A handle on one pod's network namespace and its socket-creating thread.
/// Dropping it stops the thread (and closes the netns fd).
#[derive(Debug)]
pub struct PodNetns {
    pod: String,
    jobs: mpsc::Sender<Job>,
    inode: u64,
    mark: u32,
    /// IPv4 TCP sockets made ahead of need, so a new connection does not
    /// wait for a round trip to the netns thread.
    spare: Arc<Mutex<Vec<Socket>>>,
}

/// Spare sockets kept per pod; refilled when half are used.
const SPARE_SOCKETS: usize = 16;

impl ambit_hbone::pool::Dialer for PodNetns {
    async fn socket(&self, peer: SocketAddr) -> std::io::Result<Socket> {
        self.tcp_socket(peer).await.map_err(std::io::Error::other)
    }
}

impl PodNetns {
    /// Starts the thread that lives in `netns` (an open `/proc/*/ns/net` or
    /// `/var/run/netns/*` file).
    pub fn new(pod: &str, netns: OwnedFd, mark: u32) -> Result<Self, NetnsError> {
        let inode = nix::sys::stat::fstat(netns.as_fd()).map(|s| s.st_ino).unwrap_or_default();
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let name = pod.to_owned();
        thread::Builder::new()
            .name(format!("netns-{}", short(pod)))
            .stack_size(256 * 1024)
            .spawn(move || {
                let entered = setns(&netns, CloneFlags::CLONE_NEWNET);
                drop(netns);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|source| NetnsError::Spawn { pod: name.clone(), source })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {
                let ns = PodNetns { pod: pod.to_owned(), jobs, inode, mark, spare: Arc::default() };
                ns.refill();
                Ok(ns)
            }
            Ok(Err(source)) => Err(NetnsError::Setns { pod: pod.to_owned(), source }),
            Err(_) => Err(NetnsError::Stopped(pod.to_owned())),
        }
    }

    /// Identifies the namespace (inode of its nsfs file).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` on the pod's netns thread. Keep `f` short: it serialises
    /// socket creation for this pod.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::Stopped(self.pod.clone()))?;
        rx.await.map_err(|_| NetnsError::Stopped(self.pod.clone()))
    }

    /// A non-blocking TCP socket in the pod's netns carrying ztunnel's mark,
    /// so the pod's capture rules do not redirect it again.
    pub async fn tcp_socket(&self, peer: SocketAddr) -> Result<Socket, NetnsError> {
        if peer.is_ipv4() {
            let (sock, low) = {
                let mut spare = self.spare.lock().expect("bug: poisoned spare sockets");
                (spare.pop(), spare.len() < SPARE_SOCKETS / 2)
            };
            if low {
                self.refill();
            }
            if let Some(s) = sock {
                return Ok(s);
            }
        }
        let (domain, mark) = (Domain::for_address(peer), self.mark);
        let r = self.run(move || new_tcp_socket(domain, mark)).await?;
        r.map_err(|source| NetnsError::Socket { pod: self.pod.clone(), source })
    }

    /// Tops up the spare sockets from the netns thread (in the background).
    fn refill(&self) {
        let (spare, mark, pod) = (self.spare.clone(), self.mark, self.pod.clone());
        let _ = self.jobs.send(Box::new(move || {
            let missing = SPARE_SOCKETS.saturating_sub(spare.lock().expect("bug: poisoned spare sockets").len());
            let mut made = Vec::with_capacity(missing);
            for _ in 0..missing {
                match new_tcp_socket(Domain::IPV4, mark) {
                    Ok(s) => made.push(s),
                    Err(e) => {
                        tracing::warn!(pod = %pod, error = %e, "cannot create spare sockets");
                        break;
                    }
                }
            }
            spare.lock().expect("bug: poisoned spare sockets").extend(made);
        }));
    }

    /// A listening socket in the pod's netns, set up as `opts` says.
    pub async fn listener(&self, addr: SocketAddr, opts: ListenOpts) -> Result<std::net::TcpListener, NetnsError> {
        let mark = self.mark;
        let r = self
            .run(move || -> std::io::Result<std::net::TcpListener> {
                let s =
                    Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
                s.set_reuse_address(true)?;
                // A replacement ztunnel binds the same ports while this one
                // still serves; when this one closes its listener, the kernel
                // (net.ipv4.tcp_migrate_req=1) hands the connections waiting
                // in its queue to the replacement's (see `crate::drain`).
                s.set_reuse_port(true)?;
                if opts.transparent {
                    s.set_ip_transparent(true)?;
                }
                if opts.marked {
                    s.set_mark(mark)?;
                }
                if let Some(cc) = &opts.congestion_control {
                    s.set_tcp_congestion(cc.as_bytes())?;
                }
                s.bind(&SockAddr::from(addr))?;
                s.listen(1024)?;
                Ok(s.into())
            })
            .await?;
        r.map_err(|source| NetnsError::Socket { pod: self.pod.clone(), source })
    }
}

/// How a pod listener is set up; accepted connections inherit the mark and
/// the congestion control.
#[derive(Debug, Clone, Default)]
pub struct ListenOpts {
    /// Accept connections TPROXY'd to it for any destination address.
    pub transparent: bool,
    /// Carry ztunnel's mark, as the sockets ztunnel opens do.
    pub marked: bool,
    /// `None`: the kernel's default.
    pub congestion_control: Option<String>,
}

fn new_tcp_socket(domain: Domain, mark: u32) -> std::io::Result<Socket> {
    let s = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    s.set_mark(mark)?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn short(pod: &str) -> &str {
    let tail = pod.rsplit('/').next().unwrap_or(pod);
    &tail[..tail.len().min(8)]
}

/// Marks `sock` as allowed to bind a non-local address (the client's IP),
/// binding the port only at connect time.
pub fn bind_transparent(sock: &Socket, src: std::net::IpAddr) -> std::io::Result<()> {
    sock.set_ip_transparent(true)?;
    // IP_BIND_ADDRESS_NO_PORT: pick the source port at connect(), so the
    // same spoofed source IP can reach many destinations.
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option pointer and length of a c_int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    sock.bind(&SockAddr::from(SocketAddr::new(src, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[tokio::test]
    async fn sockets_are_created_in_the_given_namespace() {
        // Our own netns is a valid target: the socket's netns inode matches.
        let own = File::open("/proc/self/ns/net").unwrap();
        let ino = nix::sys::stat::fstat(own.as_fd()).unwrap().st_ino;
        let ns = match PodNetns::new("default/test", OwnedFd::from(own), 0x400) {
            Ok(ns) => ns,
            Err(e) if std::env::var_os("CI").is_none() && !nix::unistd::geteuid().is_root() => {
                eprintln!("skipping (needs root): {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(ns.inode(), ino);
        let l = ns.listener("127.0.0.1:0".parse().unwrap(), ListenOpts::default()).await.unwrap();
        let addr = l.local_addr().unwrap();
        // A replacement ztunnel binds the same port while this one listens.
        let again = ns.listener(addr, ListenOpts::default()).await.expect("SO_REUSEPORT lets a second listener bind");
        assert_eq!(again.local_addr().unwrap(), addr);
        let s = ns.tcp_socket(addr).await.unwrap();
        assert_eq!(s.mark().unwrap(), 0x400);
        let stream = tokio::net::TcpSocket::from_std_stream(s.into()).connect(addr).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), addr);
    }
}
