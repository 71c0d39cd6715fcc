//! Opaque TCP through the waypoint: a port declared `tcp` (or a stream
//! detection found not to be HTTP) is relayed whole to one endpoint of the
//! service, over HBONE like HTTP, with the L4 part of authorization.

use std::net::SocketAddr;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::authz::{self, RequestInfo};
use crate::metrics::RefusedReason;

use crate::proxy::{Downstream, Shared};
use crate::target::ServiceTarget;

/// Relays `stream` to an endpoint of the service the client called.
pub async fn forward<S: AsyncRead + AsyncWrite + Unpin>(shared: &Shared, down: &Downstream, mut stream: S) {
    let snapshot = shared.snapshots.current();
    let Some(served) = snapshot.served(down.target) else { return };
    let svc = &served.service.service;
    let scope = shared.authz_scope();
    let connection = RequestInfo {
        peer: Some(&down.identity),
        peer_ip: down.peer.ip(),
        destination_ip: Some(down.target.ip()),
        service_namespace: &svc.namespace,
        service_hostname: &svc.hostname,
        port: served.port.port,
        parts: None,
    };
    let verdict = authz::authorize(snapshot.policies().values(), &scope, &connection);
    if !verdict.allowed {
        debug!(peer = %down.identity, service = %svc.hostname, policy = ?verdict.policy, "tcp connection denied");
        shared.metrics.refused(RefusedReason::policy_denied);
        return;
    }
    let target = ServiceTarget {
        hostname: svc.hostname.clone(),
        namespace: svc.namespace.clone(),
        port: served.port.port,
        policy: None,
    };
    let endpoints: Vec<SocketAddr> = snapshot.endpoints(&target).iter().filter_map(|e| e.target(target.port)).collect();
    drop(snapshot);
    if endpoints.is_empty() {
        warn!(service = %target, "tcp: no endpoint");
        return;
    }
    let addr = endpoints[SmallRng::from_rng(&mut rand::rng()).random_range(0..endpoints.len())];
    let mut upstream = match shared.upstream.connect(addr).await {
        Ok(u) => u,
        Err(e) => {
            warn!(%addr, error = %e, "tcp: cannot reach the endpoint");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
        Ok((up, downb)) => debug!(%addr, sent = up, received = downb, "tcp connection done"),
        Err(e) => debug!(%addr, error = %e, "tcp connection broke"),
    }
}
