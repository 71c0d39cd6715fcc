//! Outbound: connections the pod's applications open, redirected to 15001.
//! The original destination picks the upstream: an HBONE tunnel to the
//! waypoint of the service or workload addressed, an HBONE tunnel to a mesh
//! workload, plain TCP to a workload outside the mesh, or passthrough.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_identity::Identity;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::conn::{relay_plain, Bytes, ConnMetrics};
use super::peers::fill_from_baggage;
use super::socket::{connect_from_pod, original_destination};
use super::{Pod, ProxyInputs};
use crate::metrics::{Direction, FailureReason, PeerLabels, Peers, Reporter, ServiceLabels, Value};
use crate::state::{Service, Upstream, Workload};
use ambit_hbone::headers::{connect_headers, parse_baggage, TraceParent};
use ambit_hbone::pool::{PoolError, PoolKey};
use ambit_hbone::{read_early, relay, HBONE_PORT};

pub(super) async fn handle(inputs: ProxyInputs, pod: Arc<Pod>, stream: TcpStream, peer: SocketAddr) {
    super::socket::pod_local(&socket2::SockRef::from(&stream));
    let dst = match original_destination(&stream) {
        Ok(d) if Some(d) != stream.local_addr().ok() => d,
        Ok(d) => {
            warn!(pod = %pod.uid, %peer, dst = %d, "connection addressed to the outbound listener itself; closing");
            inputs.metrics.failure(Direction::outbound, FailureReason::original_destination);
            return;
        }
        Err(e) => {
            warn!(pod = %pod.uid, %peer, error = %e, "no original destination; closing");
            inputs.metrics.failure(Direction::outbound, FailureReason::original_destination);
            return;
        }
    };
    // ZDS names the pod; the state knows its owner and canonical names.
    let source = inputs.state.snapshot().workload_by_ip(peer.ip()).filter(|w| pod.is(w)).cloned();
    let peers = Peers { source: source_labels(&pod, source.as_deref()), ..Default::default() };
    match inputs.state.resolve(peer.ip(), dst) {
        Upstream::Hbone { workload, service, target, guard: _guard } => {
            let peers = destination_peers(peers, &workload, service.as_deref());
            let src = Source { pod: &pod, workload: source.as_deref(), addr: peer };
            let to =
                TunnelTarget { dial: SocketAddr::new(target.ip(), HBONE_PORT), authority: target, via_waypoint: false };
            hbone(&inputs, src, stream, to, workload.identity(), service.as_deref(), peers).await
        }
        Upstream::Waypoint { waypoint, service, target, authority, guard: _guard } => {
            // Labelled as Istio's ztunnel does: the destination is the waypoint, the service the one addressed.
            let peers = destination_peers(peers, &waypoint, service.as_deref());
            let src = Source { pod: &pod, workload: source.as_deref(), addr: peer };
            let to = TunnelTarget { dial: target, authority, via_waypoint: true };
            debug!(pod = %pod.uid, %dst, waypoint = %waypoint.uid, %target, "through the destination's waypoint");
            hbone(&inputs, src, stream, to, waypoint.identity(), service.as_deref(), peers).await
        }
        Upstream::UnknownWaypoint { waypoint, service } => {
            warn!(
                pod = %pod.uid, %dst, %waypoint, service = service.as_ref().map(|s| s.hostname.as_str()),
                "the destination's waypoint is no known workload; closing"
            );
            inputs.metrics.failure(Direction::outbound, FailureReason::unreachable);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
        }
        Upstream::Direct { workload, service, target, guard: _guard } => {
            let peers = destination_peers(peers, &workload, service.as_deref());
            plain(&inputs, &pod, stream, peer, target, peers).await
        }
        Upstream::Passthrough => plain(&inputs, &pod, stream, peer, dst, peers).await,
        Upstream::NoHealthyEndpoint { service } => {
            warn!(pod = %pod.uid, %dst, service = %service.hostname, "no healthy endpoint; closing");
            inputs.metrics.failure(Direction::outbound, FailureReason::no_healthy_endpoint);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
        }
    }
}

/// The source's labels: from its workload in the state, else what ZDS says
/// of the pod. The principal is added only for mTLS, as Istio does.
fn source_labels(pod: &Pod, w: Option<&Workload>) -> PeerLabels {
    match w {
        Some(w) => PeerLabels::of(w),
        None => {
            PeerLabels { workload: Value::new(&pod.name), namespace: Value::new(&pod.namespace), ..Default::default() }
        }
    }
}

fn destination_peers(mut peers: Peers, w: &Workload, service: Option<&Service>) -> Peers {
    peers.destination = PeerLabels::of(w).with_principal(&w.identity());
    peers.service = service.map(ServiceLabels::of).unwrap_or_default();
    peers
}

/// Where an HBONE tunnel goes.
struct TunnelTarget {
    /// The HBONE listener to connect to: the destination's ztunnel, or a waypoint.
    dial: SocketAddr,
    /// The CONNECT `:authority`: the workload's IP and port, or (through a
    /// waypoint) the original destination.
    authority: SocketAddr,
    /// Whether `dial` is a waypoint.
    via_waypoint: bool,
}

/// The client side of an outbound connection.
struct Source<'a> {
    pod: &'a Pod,
    workload: Option<&'a Workload>,
    /// The application's address.
    addr: SocketAddr,
}

async fn hbone(
    inputs: &ProxyInputs,
    src: Source<'_>,
    stream: TcpStream,
    to: TunnelTarget,
    dst_identity: Identity,
    service: Option<&Service>,
    mut peers: Peers,
) {
    let pod = src.pod;
    let target = to.authority;
    peers.source = peers.source.with_principal(&pod.identity);
    // Counted once the tunnel is up, so the labels can take the
    // destination's response baggage; a failure is counted open and closed.
    let log = match to.via_waypoint {
        false => inputs.access_log(src.addr, target),
        true => inputs.access_log(src.addr, to.dial).map(|e| e.with_hbone_addr(to.authority)),
    };
    let counted = |peers, error: Option<FailureReason>| {
        let mut m = ConnMetrics::open(&inputs.metrics, Reporter::source, peers, true, log);
        if let Some(e) = error {
            m.error(e);
        }
        m
    };
    let certs = match inputs.certs.get(&pod.identity).await {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %pod.uid, error = %e, "no certificate for the source workload; closing");
            inputs.metrics.failure(Direction::outbound, FailureReason::certificate);
            drop(counted(peers, Some(FailureReason::certificate)));
            return;
        }
    };
    let key = PoolKey { src: src.addr.ip(), src_identity: pod.identity.clone(), dst: to.dial, dst_identity };
    let headers = connect_headers(
        src.workload.map(Workload::baggage),
        src.addr,
        service.map(|s| s.hostname.as_str()),
        TraceParent::new(),
    );
    let early = match read_early(&stream) {
        Ok(b) => b,
        Err(e) => {
            debug!(pod = %pod.uid, %target, error = %e, "source connection broke before its tunnel opened");
            inputs.metrics.failure(Direction::outbound, FailureReason::stream_error);
            drop(counted(peers, Some(FailureReason::stream_error)));
            return;
        }
    };
    let early_len = early.len() as u64;
    let tunnel = match inputs.pool.open(&key, &pod.netns, &*certs, target, headers, early).await {
        Ok(t) => t,
        Err(e) => {
            let reason = match &e {
                _ if e.is_identity_failure() => FailureReason::identity_mismatch,
                PoolError::Tls { .. } => FailureReason::tls_handshake,
                PoolError::Refused(s) if s.as_u16() == 401 || s.as_u16() == 403 => FailureReason::policy_denied,
                PoolError::Refused(s) if s.as_u16() == 400 => FailureReason::bad_request,
                _ => FailureReason::unreachable,
            };
            warn!(pod = %pod.uid, %target, via = %to.dial, peer_identity = %key.dst_identity, error = %e, reason = ?reason, "hbone tunnel failed; closing");
            inputs.metrics.failure(Direction::outbound, reason);
            drop(counted(peers, Some(reason)));
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            return;
        }
    };
    if let Some(b) = parse_baggage(&tunnel.response) {
        peers.destination = fill_from_baggage(peers.destination, &b, &key.dst_identity);
    }
    let mut metrics = counted(peers, None);
    debug!(pod = %pod.uid, %target, "hbone tunnel open");
    let (t, r) = relay(stream, tunnel.send, tunnel.recv).await;
    metrics.record(Bytes { received: early_len + t.to_tunnel, sent: t.from_tunnel });
    if let Err(e) = r {
        warn!(pod = %pod.uid, %target, error = %e, "hbone tunnel broke");
        metrics.error(FailureReason::stream_error);
        inputs.metrics.failure(Direction::outbound, FailureReason::stream_error);
    }
}

async fn plain(inputs: &ProxyInputs, pod: &Pod, stream: TcpStream, src: SocketAddr, target: SocketAddr, peers: Peers) {
    let log = inputs.access_log(src, target);
    let mut metrics = ConnMetrics::open(&inputs.metrics, Reporter::source, peers, false, log);
    let cfg = &inputs.config;
    let upstream = match connect_from_pod(&pod.netns, target, None, cfg.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            warn!(pod = %pod.uid, %target, error = %e, "upstream unreachable; closing");
            metrics.error(FailureReason::unreachable);
            inputs.metrics.failure(Direction::outbound, FailureReason::unreachable);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            return;
        }
    };
    let (bytes, r) = relay_plain(stream, upstream).await;
    metrics.record(bytes);
    if let Err(e) = r {
        debug!(pod = %pod.uid, %target, error = %e, "plain connection broke");
        metrics.error(FailureReason::stream_error);
        inputs.metrics.failure(Direction::outbound, FailureReason::stream_error);
    }
}
