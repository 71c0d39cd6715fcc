//! The per-pod proxies. For each enrolled pod ztunnel listens inside the
//! pod's network namespace on 15001 (outbound, REDIRECT target), 15006
//! (inbound plaintext, TPROXY target) and 15008 (inbound HBONE).

mod access_log;
mod conn;
mod inbound;
mod outbound;
mod peers;
mod plaintext;
mod registry;
mod socket;

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_identity::Identity;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::certs::CertManager;
use crate::config::Config;
use crate::drain::DrainWatch;
use crate::metrics::Metrics;
use crate::netns::{ListenOpts, NetnsError, PodNetns};
use crate::state::SharedState;
use ambit_hbone::pool::HbonePool;
use ambit_hbone::workers::Workers;
use ambit_hbone::HBONE_PORT;

pub use registry::{close_denied_on_policy_change, InboundRegistry};
pub use socket::original_destination;

/// Outbound capture port, inside each pod.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port, inside each pod.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// What every proxy needs, shared by all pods of the node.
#[derive(Clone)]
pub struct ProxyInputs {
    pub config: Arc<Config>,
    pub state: Arc<SharedState>,
    pub certs: Arc<CertManager>,
    pub pool: Arc<HbonePool>,
    pub metrics: Arc<Metrics>,
    pub workers: Arc<Workers>,
    /// The open inbound connections, which a policy change may close.
    pub inbound: Arc<InboundRegistry>,
    /// Counts the open connections and says when ztunnel drains.
    pub drain: DrainWatch,
}

/// One enrolled pod, as the node agent described it.
#[derive(Debug)]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
    pub netns: PodNetns,
}

impl ProxyInputs {
    /// The ends an access log names, when access logs are on.
    fn access_log(&self, src: SocketAddr, dst: SocketAddr) -> Option<access_log::Ends> {
        self.config.access_log.then_some(access_log::Ends { src, dst, hbone_addr: None })
    }
}

impl Pod {
    /// True when `w` (from the state) is this pod.
    pub fn is(&self, w: &crate::state::Workload) -> bool {
        w.uid == self.uid || (w.name == self.name && w.namespace == self.namespace)
    }
}

/// The running listeners of one pod; dropping it stops them. Connections
/// already accepted run to completion (or until a policy change denies them).
pub struct PodProxies {
    tasks: JoinSet<()>,
}

/// Errors starting a pod's proxies.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot open listener {addr} in pod {pod}: {source}")]
    Listen { pod: String, addr: SocketAddr, source: NetnsError },
    #[error("cannot give pod {pod}'s plaintext listener to its eBPF capture: {source}")]
    Ebpf { pod: String, source: ambit_ebpf::EbpfError },
    #[error("cannot register listener with the runtime: {0}")]
    Register(#[from] std::io::Error),
}

impl PodProxies {
    /// Opens the three listeners in `pod`'s netns and starts serving, each
    /// accept loop on a worker (see [`Workers`]).
    pub async fn start(inputs: ProxyInputs, pod: Arc<Pod>) -> Result<Self, ProxyError> {
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        let workers = inputs.workers.clone();
        // A listener is registered with the runtime of the worker that polls it.
        let listen = |addr: SocketAddr, opts: ListenOpts| {
            let (pod, workers) = (pod.clone(), workers.clone());
            async move {
                let l = pod.netns.listener(addr, opts).await.map_err(|source| ProxyError::Listen {
                    pod: pod.uid.clone(),
                    addr,
                    source,
                })?;
                let worker = workers.pick();
                let registered = workers.spawn_on(worker, async move { tokio::net::TcpListener::from_std(l) });
                let l = registered.await.expect("bug: listener registration panicked")?;
                Ok::<_, ProxyError>((worker, l))
            }
        };
        let (w_out, outbound_l) = listen(any(OUTBOUND_PORT), ListenOpts::default()).await?;
        let transparent = ListenOpts { transparent: true, ..ListenOpts::default() };
        let (w_plain, plaintext_l) = listen(any(INBOUND_PLAINTEXT_PORT), transparent).await?;
        // With eBPF capture the pod's inbound program steers connections to this listener, once it is in the
        // pod's listener map (until then they are refused); with nftables there is no map and nothing to do.
        match ambit_ebpf::register_inbound_listener(&inputs.config.bpf_pin_root, &plaintext_l) {
            Ok(true) => debug!(pod = %pod.uid, "plaintext listener registered for eBPF capture"),
            Ok(false) => {}
            Err(source) => return Err(ProxyError::Ebpf { pod: pod.uid.clone(), source }),
        }
        // Accepted tunnels carry ztunnel's mark, so they route by its
        // quickack table (see the capture rules), as dialled ones do.
        let tunnels = ListenOpts {
            marked: true,
            congestion_control: inputs.config.hbone_congestion_control.clone(),
            ..ListenOpts::default()
        };
        let (w_hbone, hbone_l) = listen(any(HBONE_PORT), tunnels).await?;

        let mut tasks = JoinSet::new();
        let outbound = accept_loop(outbound_l, "outbound", inputs.clone(), pod.clone(), outbound::handle);
        let plaintext = accept_loop(plaintext_l, "inbound-plaintext", inputs.clone(), pod.clone(), plaintext::handle);
        let hbone = accept_loop(hbone_l, "inbound-hbone", inputs, pod.clone(), inbound::handle_connection);
        tasks.spawn_on(outbound, workers.handle(w_out));
        tasks.spawn_on(plaintext, workers.handle(w_plain));
        tasks.spawn_on(hbone, workers.handle(w_hbone));
        info!(pod = %pod.uid, identity = %pod.identity, "pod proxies listening on 15001, 15006, 15008");
        Ok(PodProxies { tasks })
    }

    /// Stops accepting connections for the pod.
    pub fn stop(mut self) {
        self.tasks.abort_all();
    }

    /// Stops accepting and returns once the listeners are closed, so that
    /// from then on the kernel gives new connections to another ztunnel's
    /// listeners on the same ports (see `crate::drain`).
    pub async fn close(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Accept loop shared by the three listeners. Each connection goes to the
/// next worker (round robin), which then runs everything the connection
/// needs. A failed accept (for example out of file descriptors) is logged
/// and retried after a short pause rather than ending the listener.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    inputs: ProxyInputs,
    pod: Arc<Pod>,
    handle: F,
) where
    F: Fn(ProxyInputs, Arc<Pod>, tokio::net::TcpStream, SocketAddr) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                // Counted until it ends: a draining ztunnel waits for it.
                let guard = inputs.drain.track();
                let worker = inputs.workers.pick();
                if Workers::current() == Some(worker) {
                    let conn = handle(inputs.clone(), pod.clone(), stream, peer);
                    tokio::spawn(async move {
                        conn.await;
                        drop(guard);
                    });
                    continue;
                }
                // Re-register the socket with the other worker's runtime.
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(pod = %pod.uid, listener = what, error = %e, "cannot hand a connection to a worker");
                        continue;
                    }
                };
                let (inputs_, pod) = (inputs.clone(), pod.clone());
                inputs.workers.spawn_on(worker, async move {
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => handle(inputs_, pod, stream, peer).await,
                        Err(e) => warn!(pod = %pod.uid, listener = what, error = %e, "cannot register a connection"),
                    }
                    drop(guard);
                });
            }
            Err(e) => {
                warn!(pod = %pod.uid, listener = what, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
