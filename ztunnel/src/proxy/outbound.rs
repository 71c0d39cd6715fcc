//! Outbound: connections the pod's applications open, redirected to 15001.
//! The original destination picks the upstream: an HBONE tunnel to a mesh
//! workload, plain TCP to a workload outside the mesh, or passthrough.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::conn::{relay_plain, Bytes, ConnMetrics};
use super::socket::{connect_from_pod, original_destination};
use super::{Pod, ProxyInputs};
use crate::hbone::pool::{PoolError, PoolKey};
use crate::hbone::{relay, HBONE_PORT};
use crate::metrics::{Direction, FailureReason, Peers, Reporter};
use crate::state::{Service, Upstream, Workload};

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
    let peers = Peers {
        source_workload: Some(pod.name.clone()),
        source_namespace: Some(pod.namespace.clone()),
        source_principal: Some(pod.identity.to_string()),
        ..Default::default()
    };
    match inputs.state.resolve(dst) {
        Upstream::Hbone { workload, service, target, guard: _guard } => {
            let peers = destination_peers(peers, &workload, service.as_deref());
            hbone(&inputs, &pod, stream, peer, target, &workload, peers).await
        }
        Upstream::Direct { workload, service, target, guard: _guard } => {
            let peers = destination_peers(peers, &workload, service.as_deref());
            plain(&inputs, &pod, stream, target, peers).await
        }
        Upstream::Passthrough => plain(&inputs, &pod, stream, dst, peers).await,
        Upstream::NoHealthyEndpoint { service } => {
            warn!(pod = %pod.uid, %dst, service = %service.hostname, "no healthy endpoint; closing");
            inputs.metrics.failure(Direction::outbound, FailureReason::no_healthy_endpoint);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
        }
    }
}

fn destination_peers(mut peers: Peers, w: &Workload, service: Option<&Service>) -> Peers {
    peers.destination_workload = Some(w.name.clone());
    peers.destination_namespace = Some(w.namespace.clone());
    peers.destination_service = service.map(|s| s.hostname.clone());
    peers
}

async fn hbone(
    inputs: &ProxyInputs,
    pod: &Pod,
    stream: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    workload: &Workload,
    mut peers: Peers,
) {
    let dst_identity = workload.identity();
    peers.destination_principal = Some(dst_identity.to_string());
    let mut metrics = ConnMetrics::open(&inputs.metrics, Reporter::source, &peers, true);
    let certs = match inputs.certs.get(&pod.identity).await {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %pod.uid, error = %e, "no certificate for the source workload; closing");
            inputs.metrics.failure(Direction::outbound, FailureReason::certificate);
            return;
        }
    };
    let key = PoolKey {
        src: peer.ip(),
        src_identity: pod.identity.clone(),
        dst: SocketAddr::new(target.ip(), HBONE_PORT),
        dst_identity,
    };
    let tunnel = match inputs.pool.open(&key, &pod.netns, &certs, target).await {
        Ok(t) => t,
        Err(e) => {
            let reason = match &e {
                _ if e.is_identity_failure() => FailureReason::identity_mismatch,
                PoolError::Tls { .. } => FailureReason::tls_handshake,
                PoolError::Refused(s) if s.as_u16() == 401 || s.as_u16() == 403 => FailureReason::policy_denied,
                PoolError::Refused(s) if s.as_u16() == 400 => FailureReason::bad_request,
                _ => FailureReason::unreachable,
            };
            warn!(pod = %pod.uid, %target, peer_identity = %key.dst_identity, error = %e, reason = ?reason, "hbone tunnel failed; closing");
            inputs.metrics.failure(Direction::outbound, reason);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            return;
        }
    };
    debug!(pod = %pod.uid, %target, "hbone tunnel open");
    let (t, r) = relay(stream, tunnel.send, tunnel.recv).await;
    metrics.record(Bytes { received: t.to_tunnel, sent: t.from_tunnel });
    if let Err(e) = r {
        warn!(pod = %pod.uid, %target, error = %e, "hbone tunnel broke");
        inputs.metrics.failure(Direction::outbound, FailureReason::stream_error);
    }
}

async fn plain(inputs: &ProxyInputs, pod: &Pod, stream: TcpStream, target: SocketAddr, peers: Peers) {
    let mut metrics = ConnMetrics::open(&inputs.metrics, Reporter::source, &peers, false);
    let cfg = &inputs.config;
    let upstream = match connect_from_pod(&pod.netns, target, None, cfg.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            warn!(pod = %pod.uid, %target, error = %e, "upstream unreachable; closing");
            inputs.metrics.failure(Direction::outbound, FailureReason::unreachable);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            return;
        }
    };
    let (bytes, r) = relay_plain(stream, upstream).await;
    metrics.record(bytes);
    if let Err(e) = r {
        debug!(pod = %pod.uid, %target, error = %e, "plain connection broke");
        inputs.metrics.failure(Direction::outbound, FailureReason::stream_error);
    }
}
