//! Opaque TCP through the waypoint: a port declared `tcp` (or a stream
//! detection found not to be HTTP) is relayed whole to one endpoint, over
//! HBONE like HTTP, with the L4 part of authorization. The connection goes
//! to the service itself, or, when a VirtualService `tcp[]` rule routes the
//! port, to one of its backends drawn by weight; the endpoint is then chosen
//! as for a request (the backend's subset, load balancer and outlier
//! ejections), with open connections as the load. One access-log line per
//! connection names where it went.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::access_log::ConnectionEntry;
use crate::authz::{self, RequestInfo};
use crate::balance::{pick_backend, EndpointPicker, NoBackend};
use crate::config::Snapshot;
use crate::lb::{self, HashKey};
use crate::metrics::{response_flags, RefusedReason, WorkloadLabels};
use crate::proxy::{Candidate, Downstream, Shared};
use crate::route::TcpRoute;
use crate::target::ServiceTarget;

/// Relays `stream` to an endpoint of the service the client called, or of the backend its TCP route chose.
pub async fn forward<S: AsyncRead + AsyncWrite + Unpin>(shared: &Shared, down: &Downstream, mut stream: S) {
    let start = Instant::now();
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
    let own = &served.port.own;
    let route = served.port.tcp.as_ref();
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let route_name = route.map(|r| format!("{}/{}", r.namespace, r.name));
    let mut log = Log { shared, down, start, route: route_name, target: None, upstream: None };
    let target = match destination(route, own, &mut rng) {
        Ok(t) => t.clone(),
        Err(why) => {
            warn!(service = %own, ?why, "tcp: the route sends this connection nowhere; closed");
            return log.done(response_flags::NO_CLUSTER_FOUND, (0, 0));
        }
    };
    log.target = Some(target.clone());
    let Some((addr, workload, _in_flight)) = endpoint(shared, &snapshot, &target, down.peer.ip(), &mut rng) else {
        warn!(service = %target, "tcp: no endpoint");
        return log.done(response_flags::NO_HEALTHY_UPSTREAM, (0, 0));
    };
    drop(snapshot);
    log.upstream = Some((addr, workload));
    // The backend's `tcp.maxConnections`: one over it is closed, as Envoy's TCP proxy does.
    let service_key = format!("{}/{}", target.namespace, target.hostname);
    let slot = target.pool().map(|p| shared.breaker(&service_key, &target, p.limits).connection());
    let _slot = match slot {
        Some(Err(limit)) => {
            shared.metrics.overflowed(&service_key, limit);
            return log.done(response_flags::UPSTREAM_OVERFLOW, (0, 0));
        }
        Some(Ok(held)) => held,
        None => None,
    };
    let conn = target.pool().map(|p| p.connection).unwrap_or_default();
    let mut upstream = match shared.upstream.connect(addr, &conn).await {
        Ok(u) => u,
        Err(e) => {
            warn!(%addr, error = %e, "tcp: cannot reach the endpoint");
            return log.done(response_flags::UPSTREAM_CONNECTION_FAILURE, (0, 0));
        }
    };
    match tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
        Ok(bytes) => log.done(response_flags::NONE, bytes),
        Err(e) => {
            debug!(%addr, error = %e, "tcp connection broke");
            log.done(response_flags::UPSTREAM_CONNECTION_TERMINATION, (0, 0));
        }
    }
}

/// Where one connection goes: a backend of the port's TCP route, drawn by weight, else the service itself.
fn destination<'a>(
    route: Option<&'a TcpRoute>,
    own: &'a ServiceTarget,
    rng: &mut impl Rng,
) -> Result<&'a ServiceTarget, NoBackend<'a>> {
    match route {
        Some(r) => pick_backend(&r.backends, rng).map(|chosen| chosen.target),
        None => Ok(own),
    }
}

/// An endpoint of `target` admitted by its subset and not ejected, by the target's load balancer (consistent hashing
/// by the client's address, the only key a connection has); its address, workload and in-flight count, held by the
/// caller while the connection lasts.
fn endpoint(
    shared: &Shared,
    snapshot: &Snapshot,
    target: &ServiceTarget,
    peer: IpAddr,
    rng: &mut impl Rng,
) -> Option<(SocketAddr, Arc<crate::config::Workload>, crate::balance::InFlightGuard)> {
    let picker: Arc<EndpointPicker> = shared.picker(&format!("{}/{}", target.namespace, target.hostname));
    let now = Instant::now();
    let candidates: Vec<Candidate<'_>> = snapshot
        .endpoints(target)
        .iter()
        .filter(|e| target.admits(&e.workload.uid))
        .filter_map(|e| {
            let addr = e.target(target.port)?;
            let ejected = target.outlier().is_some() && picker.is_ejected(addr, now);
            Some(Candidate { endpoint: e, addr, load: shared.load(addr), ejected })
        })
        .collect();
    let hash = match target.lb().and_then(|l| l.hash.as_ref()) {
        Some(HashKey::SourceIp) => Some(lb::hash(&peer)),
        _ => None,
    };
    let hashed = hash.and_then(|h| picker.pick_hashed(&candidates, |c| c.endpoint.workload.uid.as_str(), h));
    let policy = target.lb().map_or(picker.policy(), |l| l.simple);
    let chosen = &candidates[hashed.or_else(|| picker.pick_with(policy, &candidates, &[], rng))?];
    Some((chosen.addr, chosen.endpoint.workload.clone(), chosen.load.start()))
}

/// What the connection's access-log line needs, filled in as the connection goes.
struct Log<'a> {
    shared: &'a Shared,
    down: &'a Downstream,
    start: Instant,
    /// The VirtualService whose `tcp[]` routes the port, `namespace/name`.
    route: Option<String>,
    target: Option<ServiceTarget>,
    upstream: Option<(SocketAddr, Arc<crate::config::Workload>)>,
}

impl Log<'_> {
    /// Logs the connection's end; `bytes` (from the client, to it) as the relay counted them.
    fn done(self, flags: &'static str, (received, sent): (u64, u64)) {
        debug!(upstream = ?self.upstream.as_ref().map(|u| u.0), received, sent, flags, "tcp connection done");
        if !self.shared.access_log.is_enabled() {
            return;
        }
        let destination = self.upstream.as_ref().map(|(_, w)| WorkloadLabels::from_workload(w));
        self.shared.access_log.log_connection(&ConnectionEntry {
            source: &self.down.labels,
            service: &self.down.service,
            upstream_cluster: self.target.as_ref(),
            upstream: self.upstream.as_ref().map(|u| u.0),
            destination: destination.as_ref(),
            route: self.route.as_deref(),
            response_flags: flags,
            bytes_received: received,
            bytes_sent: sent,
            duration: self.start.elapsed(),
        });
    }
}

#[cfg(test)]
#[path = "tcp_tests.rs"]
mod tests;
