//! Where an outbound connection goes: the waypoint of the service or
//! workload addressed, service VIP load balancing, direct workload
//! addressing, passthrough. Cursors and connection counters are kept
//! beside the immutable [`ProxyState`], indexed like it, and carried over by
//! key when the state is replaced.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::model::{GatewayAddress, GatewayDestination, LoadBalancer, Service, TunnelProtocol, Workload};
use super::{Endpoint, ProxyState};

/// The chosen upstream of an outbound connection.
#[derive(Debug)]
pub enum Upstream {
    /// A mesh workload (protocol HBONE): tunnel to `workload`'s IP on 15008, CONNECT authority = `target`.
    Hbone { workload: Arc<Workload>, service: Option<Arc<Service>>, target: SocketAddr, guard: EndpointGuard },
    /// A known workload or service endpoint outside the mesh (protocol NONE): plain TCP to `target`.
    Direct { workload: Arc<Workload>, service: Option<Arc<Service>>, target: SocketAddr, guard: EndpointGuard },
    /// The service or workload addressed names a waypoint: tunnel to the waypoint's
    /// `target` (its IP and HBONE port), CONNECT authority = `authority` (the original
    /// destination), expecting `waypoint`'s identity. `service` is the service addressed.
    Waypoint {
        waypoint: Arc<Workload>,
        service: Option<Arc<Service>>,
        target: SocketAddr,
        authority: SocketAddr,
        guard: EndpointGuard,
    },
    /// The service or workload addressed names a waypoint that is no known workload
    /// (nor a service with an endpoint): the connection fails.
    UnknownWaypoint { waypoint: GatewayAddress, service: Option<Arc<Service>> },
    /// Not a known workload or service VIP: pass through to the original destination.
    Passthrough,
    /// A known service VIP whose port is not declared, or with no healthy endpoint.
    NoHealthyEndpoint { service: Arc<Service> },
}

/// Counts one active connection on an endpoint while alive; least-connections
/// load balancing reads the count. Keep it for the connection's lifetime.
#[derive(Debug)]
pub struct EndpointGuard {
    active: Arc<AtomicUsize>,
}

impl EndpointGuard {
    fn new(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        EndpointGuard { active: active.clone() }
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-service round-robin cursors and per-workload active-connection counts,
/// indexed like `ProxyState::services` / `ProxyState::workloads`.
#[derive(Debug, Default)]
pub(super) struct Counters {
    cursors: Vec<Arc<AtomicUsize>>,
    active: Vec<Arc<AtomicUsize>>,
}

impl Counters {
    /// Counters for `new`, reusing those of `old` for services (by key) and
    /// workloads (by uid) present in both. Guards of removed endpoints keep
    /// their own counter alive, so their drop stays harmless.
    pub(super) fn carry_over(new: &ProxyState, old: Option<(&ProxyState, &Counters)>) -> Counters {
        let (mut cursors, mut active) = (HashMap::new(), HashMap::new());
        if let Some((st, c)) = old {
            cursors.extend(st.services.iter().map(|s| s.key.as_str()).zip(&c.cursors));
            active.extend(st.workloads.iter().map(|w| w.uid.as_str()).zip(&c.active));
        }
        let reuse = |m: &HashMap<&str, &Arc<AtomicUsize>>, k: &str| m.get(k).map(|c| Arc::clone(c)).unwrap_or_default();
        Counters {
            cursors: new.services.iter().map(|s| reuse(&cursors, &s.key)).collect(),
            active: new.workloads.iter().map(|w| reuse(&active, &w.uid)).collect(),
        }
    }

    /// Active connections of the workload at `idx`.
    pub(super) fn active(&self, idx: usize) -> usize {
        self.active.get(idx).map_or(0, |a| a.load(Ordering::Relaxed))
    }
}

/// See [`super::SharedState::resolve`].
pub(super) fn resolve(st: &ProxyState, counters: &Counters, src: IpAddr, dst: SocketAddr) -> Upstream {
    if let Some(&sidx) = st.by_vip.get(&dst.ip()) {
        let service = &st.services[sidx].service;
        match &service.waypoint {
            Some(wp) if !is_waypoint(st, wp, src) => return via_waypoint(st, counters, wp, Some(service), dst),
            _ => return resolve_service(st, counters, sidx, dst),
        }
    }
    match st.by_ip.get(&dst.ip()) {
        // Addressed directly: health is not consulted, the client chose it.
        Some(&widx) => {
            let w = &st.workloads[widx];
            match &w.waypoint {
                Some(wp) if !is_waypoint(st, wp, src) => via_waypoint(st, counters, wp, None, dst),
                _ => upstream(w, None, dst, EndpointGuard::new(&counters.active[widx])),
            }
        }
        None => Upstream::Passthrough,
    }
}

/// Whether `src` is the waypoint `wp` itself (its IP, or a workload backing
/// the waypoint's service), whose traffic must not loop back to it.
fn is_waypoint(st: &ProxyState, wp: &GatewayAddress, src: IpAddr) -> bool {
    let backs = |sidx: usize| st.workload_by_ip(src).is_some_and(|w| w.services.contains_key(&st.services[sidx].key));
    match &wp.destination {
        GatewayDestination::Address { ip, .. } => *ip == src || st.by_vip.get(ip).is_some_and(|&s| backs(s)),
        GatewayDestination::Hostname { .. } => {
            wp.destination.service_key().and_then(|k| st.by_service_key.get(&k).copied()).is_some_and(backs)
        }
    }
}

/// The upstream of a connection to `dst` (of `service`, if it was addressed)
/// that goes through waypoint `wp`: a workload with the waypoint's IP, or an
/// endpoint of the waypoint's service (named by hostname or VIP).
fn via_waypoint(
    st: &ProxyState,
    counters: &Counters,
    wp: &GatewayAddress,
    service: Option<&Arc<Service>>,
    dst: SocketAddr,
) -> Upstream {
    let endpoint = |sidx| {
        let ep = pick_endpoint(st, counters, sidx)?;
        Some((ep.workload, pick_ip(&st.workloads[ep.workload], dst.ip())))
    };
    let picked = match &wp.destination {
        GatewayDestination::Address { ip, .. } => match st.by_ip.get(ip) {
            Some(&widx) => Some((widx, *ip)),
            None => st.by_vip.get(ip).and_then(|&sidx| endpoint(sidx)),
        },
        GatewayDestination::Hostname { .. } => {
            wp.destination.service_key().and_then(|k| st.by_service_key.get(&k).copied()).and_then(endpoint)
        }
    };
    let Some((widx, ip)) = picked else {
        return Upstream::UnknownWaypoint { waypoint: wp.clone(), service: service.cloned() };
    };
    Upstream::Waypoint {
        waypoint: st.workloads[widx].clone(),
        service: service.cloned(),
        target: SocketAddr::new(ip, wp.hbone_mtls_port),
        authority: dst,
        guard: EndpointGuard::new(&counters.active[widx]),
    }
}

fn resolve_service(st: &ProxyState, counters: &Counters, sidx: usize, dst: SocketAddr) -> Upstream {
    let service = &st.services[sidx].service;
    let Some(port) = service.ports.iter().find(|p| p.service_port == dst.port()) else {
        return Upstream::NoHealthyEndpoint { service: service.clone() };
    };
    let Some(ep) = pick_endpoint(st, counters, sidx) else {
        return Upstream::NoHealthyEndpoint { service: service.clone() };
    };
    let workload = &st.workloads[ep.workload];
    let nonzero = |p: u16| (p != 0).then_some(p);
    let target_port = ep
        .ports
        .iter()
        .find(|p| p.service_port == port.service_port)
        .and_then(|p| nonzero(p.target_port))
        .or(nonzero(port.target_port))
        .unwrap_or(port.service_port);
    let target = SocketAddr::new(pick_ip(workload, dst.ip()), target_port);
    upstream(workload, Some(service.clone()), target, EndpointGuard::new(&counters.active[ep.workload]))
}

/// One healthy endpoint of the service at `sidx`, by its load balancer.
fn pick_endpoint<'a>(st: &'a ProxyState, counters: &Counters, sidx: usize) -> Option<&'a Endpoint> {
    let entry = &st.services[sidx];
    let eps = &entry.endpoints;
    if eps.is_empty() {
        return None;
    }
    let start = counters.cursors[sidx].fetch_add(1, Ordering::Relaxed);
    let pick = match entry.service.load_balancer {
        LoadBalancer::RoundRobin => start % eps.len(),
        LoadBalancer::LeastConnections => {
            // Scan from the cursor so that ties rotate.
            let mut best = (usize::MAX, 0);
            for k in 0..eps.len() {
                let i = start.wrapping_add(k) % eps.len();
                let n = counters.active[eps[i].workload].load(Ordering::Relaxed);
                if n < best.0 {
                    best = (n, i);
                }
            }
            best.1
        }
    };
    Some(&eps[pick])
}

/// The workload address of the same family as `like`, else its first one
/// (endpoints always have at least one address).
fn pick_ip(w: &Workload, like: IpAddr) -> IpAddr {
    let same = w.addresses.iter().find(|a| a.is_ipv4() == like.is_ipv4());
    *same.or(w.addresses.first()).expect("bug: endpoint without an address")
}

fn upstream(w: &Arc<Workload>, service: Option<Arc<Service>>, target: SocketAddr, guard: EndpointGuard) -> Upstream {
    let workload = w.clone();
    match w.protocol {
        TunnelProtocol::Hbone => Upstream::Hbone { workload, service, target, guard },
        TunnelProtocol::None => Upstream::Direct { workload, service, target, guard },
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::{HealthStatus, PortMapping};
    use super::super::SharedState;
    use super::*;
    use std::collections::BTreeMap;

    const SVC: &str = "ns/echo.ns.svc";
    /// The source of the connections the tests resolve (no workload of theirs).
    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 9, 9));

    fn backend(uid: &str, ip: &str, status: HealthStatus, ports: Vec<PortMapping>) -> Workload {
        Workload {
            uid: uid.into(),
            namespace: "ns".into(),
            addresses: vec![ip.parse().unwrap()],
            protocol: TunnelProtocol::Hbone,
            status,
            services: BTreeMap::from([(SVC.to_owned(), ports)]),
            ..Default::default()
        }
    }

    fn service(lb: LoadBalancer) -> Service {
        Service {
            name: "echo".into(),
            namespace: "ns".into(),
            hostname: "echo.ns.svc".into(),
            vips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![
                PortMapping { service_port: 80, target_port: 8080 },
                PortMapping { service_port: 90, target_port: 0 },
            ],
            load_balancer: lb,
            waypoint: None,
        }
    }

    fn shared(workloads: Vec<Workload>, lb: LoadBalancer) -> SharedState {
        SharedState::new(ProxyState::new(workloads, vec![service(lb)], vec![], "td").unwrap())
    }

    fn three(lb: LoadBalancer) -> SharedState {
        let ws =
            (1..=3).map(|i| backend(&format!("w{i}"), &format!("10.0.0.{i}"), HealthStatus::Healthy, vec![])).collect();
        shared(ws, lb)
    }

    fn vip(port: u16) -> SocketAddr {
        SocketAddr::new("10.96.0.10".parse().unwrap(), port)
    }

    fn pick(up: Upstream) -> (String, SocketAddr, EndpointGuard) {
        match up {
            Upstream::Hbone { workload, service: Some(_), target, guard } => (workload.uid.clone(), target, guard),
            other => panic!("expected an HBONE service endpoint, got {other:?}"),
        }
    }

    #[test]
    fn round_robin_spreads_connections_evenly_over_endpoints() {
        let st = three(LoadBalancer::RoundRobin);
        let mut counts = BTreeMap::<String, usize>::new();
        for _ in 0..300 {
            *counts.entry(pick(st.resolve(CLIENT, vip(80))).0).or_default() += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![100, 100, 100], "{counts:?}");
    }

    #[test]
    fn round_robin_cursor_survives_a_state_reload() {
        let st = three(LoadBalancer::RoundRobin);
        let first = pick(st.resolve(CLIENT, vip(80))).0;
        let ws =
            (1..=3).map(|i| backend(&format!("w{i}"), &format!("10.0.0.{i}"), HealthStatus::Healthy, vec![])).collect();
        st.replace(ProxyState::new(ws, vec![service(LoadBalancer::RoundRobin)], vec![], "td").unwrap());
        assert_ne!(pick(st.resolve(CLIENT, vip(80))).0, first, "cursor restarted after reload");
    }

    #[test]
    fn least_connections_prefers_the_idle_endpoint_and_follows_guard_drops() {
        let st = three(LoadBalancer::LeastConnections);
        let (a, _, ga) = pick(st.resolve(CLIENT, vip(80)));
        let (b, _, gb) = pick(st.resolve(CLIENT, vip(80)));
        let (c, _, _gc) = pick(st.resolve(CLIENT, vip(80)));
        let mut seen = vec![a.clone(), b.clone(), c.clone()];
        seen.sort();
        assert_eq!(seen, vec!["w1", "w2", "w3"], "each busy endpoint was avoided");
        drop(gb);
        assert_eq!(st.active_connections(&b), 0);
        assert_eq!(st.active_connections(&a), 1);
        for _ in 0..5 {
            let (d, _, _gd) = pick(st.resolve(CLIENT, vip(80)));
            assert_eq!(d, b, "the only idle endpoint is {b}");
        }
        drop(ga);
        // Now a and b are both idle: ties rotate between them.
        let (e, _, _ge) = pick(st.resolve(CLIENT, vip(80)));
        let (f, _, _gf) = pick(st.resolve(CLIENT, vip(80)));
        let mut pair = vec![e, f];
        pair.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(pair, want);
    }

    #[test]
    fn unhealthy_endpoints_are_skipped_by_load_balancing() {
        let ws = vec![
            backend("sick", "10.0.0.1", HealthStatus::Unhealthy, vec![]),
            backend("well", "10.0.0.2", HealthStatus::Healthy, vec![]),
        ];
        let st = shared(ws, LoadBalancer::RoundRobin);
        for _ in 0..4 {
            assert_eq!(pick(st.resolve(CLIENT, vip(80))).0, "well");
        }
    }

    #[test]
    fn an_unhealthy_workload_addressed_directly_is_still_reached() {
        let st = shared(vec![backend("sick", "10.0.0.1", HealthStatus::Unhealthy, vec![])], LoadBalancer::RoundRobin);
        let dst: SocketAddr = "10.0.0.1:9000".parse().unwrap();
        match st.resolve(CLIENT, dst) {
            Upstream::Hbone { workload, service: None, target, .. } => {
                assert_eq!(workload.uid, "sick");
                assert_eq!(target, dst);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_vip_without_healthy_endpoints_or_with_an_undeclared_port_has_no_healthy_endpoint() {
        let st = shared(vec![backend("sick", "10.0.0.1", HealthStatus::Unhealthy, vec![])], LoadBalancer::RoundRobin);
        assert!(matches!(st.resolve(CLIENT, vip(80)), Upstream::NoHealthyEndpoint { .. }));
        let st = three(LoadBalancer::RoundRobin);
        assert!(
            matches!(st.resolve(CLIENT, vip(81)), Upstream::NoHealthyEndpoint { service } if service.name == "echo")
        );
    }

    #[test]
    fn an_unknown_ip_passes_through() {
        let st = three(LoadBalancer::RoundRobin);
        assert!(matches!(st.resolve(CLIENT, "192.0.2.1:80".parse().unwrap()), Upstream::Passthrough));
    }

    #[test]
    fn target_port_prefers_workload_mapping_then_service_target_then_service_port() {
        let ws = vec![backend(
            "w",
            "10.0.0.1",
            HealthStatus::Healthy,
            vec![PortMapping { service_port: 80, target_port: 9999 }],
        )];
        let st = shared(ws, LoadBalancer::RoundRobin);
        assert_eq!(pick(st.resolve(CLIENT, vip(80))).1, "10.0.0.1:9999".parse().unwrap());
        assert_eq!(pick(st.resolve(CLIENT, vip(90))).1, "10.0.0.1:90".parse().unwrap());
        let st = three(LoadBalancer::RoundRobin);
        assert_eq!(pick(st.resolve(CLIENT, vip(80))).1.port(), 8080);
    }

    #[test]
    fn a_plaintext_workload_is_reached_directly() {
        let mut w = backend("plain", "10.0.0.1", HealthStatus::Healthy, vec![]);
        w.protocol = TunnelProtocol::None;
        let st = shared(vec![w], LoadBalancer::RoundRobin);
        match st.resolve(CLIENT, vip(80)) {
            Upstream::Direct { workload, service: Some(_), target, .. } => {
                assert_eq!(workload.uid, "plain");
                assert_eq!(target, "10.0.0.1:8080".parse().unwrap());
            }
            other => panic!("{other:?}"),
        }
    }

    const WAYPOINT_SVC: &str = "ns/waypoint.ns.svc";

    /// The waypoint's pod (10.0.0.50, service account `waypoint`) backing the
    /// service `waypoint.ns.svc` (VIP 10.96.0.50).
    fn waypoint_pod(ip: &str) -> Workload {
        Workload {
            uid: format!("waypoint-{ip}"),
            namespace: "ns".into(),
            service_account: "waypoint".into(),
            addresses: vec![ip.parse().unwrap()],
            services: BTreeMap::from([(WAYPOINT_SVC.to_owned(), vec![])]),
            ..Default::default()
        }
    }

    fn waypoint_service() -> Service {
        Service {
            name: "waypoint".into(),
            namespace: "ns".into(),
            hostname: "waypoint.ns.svc".into(),
            vips: vec!["10.96.0.50".parse().unwrap()],
            ports: vec![PortMapping { service_port: 15008, target_port: 0 }],
            ..Default::default()
        }
    }

    fn by_hostname(namespace: &str, hostname: &str) -> GatewayAddress {
        let destination = GatewayDestination::Hostname { namespace: namespace.into(), hostname: hostname.into() };
        GatewayAddress { destination, hbone_mtls_port: 15008 }
    }

    fn by_address(ip: &str) -> GatewayAddress {
        let destination = GatewayDestination::Address { network: String::new(), ip: ip.parse().unwrap() };
        GatewayAddress { destination, hbone_mtls_port: 15008 }
    }

    /// Three echo endpoints and the waypoint pods at `waypoints`; the echo
    /// service and the first endpoint use the given waypoints.
    fn with_waypoints(
        service_wp: Option<GatewayAddress>,
        workload_wp: Option<GatewayAddress>,
        waypoints: &[&str],
    ) -> SharedState {
        let mut ws: Vec<_> =
            (1..=3).map(|i| backend(&format!("w{i}"), &format!("10.0.0.{i}"), HealthStatus::Healthy, vec![])).collect();
        ws[0].waypoint = workload_wp;
        ws.extend(waypoints.iter().map(|ip| waypoint_pod(ip)));
        let echo = Service { waypoint: service_wp, ..service(LoadBalancer::RoundRobin) };
        SharedState::new(ProxyState::new(ws, vec![echo, waypoint_service()], vec![], "td").unwrap())
    }

    fn via_waypoint(up: Upstream) -> (Arc<Workload>, Option<Arc<Service>>, SocketAddr, SocketAddr) {
        match up {
            Upstream::Waypoint { waypoint, service, target, authority, .. } => (waypoint, service, target, authority),
            other => panic!("expected the waypoint, got {other:?}"),
        }
    }

    #[test]
    fn a_service_with_a_waypoint_goes_to_the_waypoint_with_the_vip_as_authority() {
        let st = with_waypoints(Some(by_hostname("ns", "waypoint.ns.svc")), None, &["10.0.0.50"]);
        for port in [80, 81] {
            let (wp, service, target, authority) = via_waypoint(st.resolve(CLIENT, vip(port)));
            assert_eq!(wp.uid, "waypoint-10.0.0.50");
            assert_eq!(wp.identity().to_string(), "spiffe://td/ns/ns/sa/waypoint");
            assert_eq!(service.unwrap().name, "echo", "the service addressed, not the waypoint's");
            assert_eq!(target, "10.0.0.50:15008".parse().unwrap());
            assert_eq!(authority, vip(port), "the original destination, even on a port the service lacks");
        }
        assert_eq!(st.active_connections("waypoint-10.0.0.50"), 0, "guards dropped");
    }

    #[test]
    fn a_waypoint_named_by_hostname_spreads_over_its_services_endpoints() {
        let st = with_waypoints(Some(by_hostname("ns", "waypoint.ns.svc")), None, &["10.0.0.50", "10.0.0.51"]);
        let mut targets: Vec<_> = (0..4).map(|_| via_waypoint(st.resolve(CLIENT, vip(80))).2.to_string()).collect();
        targets.sort();
        assert_eq!(targets, ["10.0.0.50:15008", "10.0.0.50:15008", "10.0.0.51:15008", "10.0.0.51:15008"]);
    }

    #[test]
    fn traffic_from_the_waypoint_itself_is_resolved_as_without_one() {
        let from_waypoint: IpAddr = "10.0.0.50".parse().unwrap();
        for wp in [by_hostname("ns", "waypoint.ns.svc"), by_address("10.0.0.50"), by_address("10.96.0.50")] {
            let st = with_waypoints(Some(wp.clone()), Some(wp.clone()), &["10.0.0.50"]);
            let (uid, target, _g) = pick(st.resolve(from_waypoint, vip(80)));
            assert!(uid.starts_with('w') && target.port() == 8080, "{wp}: {uid} {target}");
            match st.resolve(from_waypoint, "10.0.0.1:8080".parse().unwrap()) {
                Upstream::Hbone { workload, target, .. } => {
                    assert_eq!((workload.uid.as_str(), target), ("w1", "10.0.0.1:8080".parse().unwrap()), "{wp}")
                }
                other => panic!("{wp}: {other:?}"),
            }
            assert!(matches!(st.resolve(CLIENT, vip(80)), Upstream::Waypoint { .. }), "{wp}: others still use it");
        }
    }

    #[test]
    fn a_workload_waypoint_applies_to_its_own_ip_only() {
        let st = with_waypoints(None, Some(by_address("10.0.0.50")), &["10.0.0.50"]);
        let dst: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let (wp, service, target, authority) = via_waypoint(st.resolve(CLIENT, dst));
        assert_eq!((wp.uid.as_str(), service.is_none()), ("waypoint-10.0.0.50", true));
        assert_eq!((target, authority), ("10.0.0.50:15008".parse().unwrap(), dst));
        // Through the service (which has no waypoint) every endpoint, w1 too, is reached directly.
        let mut uids: Vec<_> = (0..3).map(|_| pick(st.resolve(CLIENT, vip(80))).0).collect();
        uids.sort();
        assert_eq!(uids, ["w1", "w2", "w3"]);
        // Another workload without a waypoint is reached directly.
        assert!(matches!(st.resolve(CLIENT, "10.0.0.2:8080".parse().unwrap()), Upstream::Hbone { .. }));
    }

    #[test]
    fn a_waypoint_that_is_no_known_workload_is_unknown() {
        let unknown = [
            by_address("10.0.0.77"),
            by_hostname("ns", "missing.ns.svc"),
            by_hostname("other", "waypoint.ns.svc"),
            // The waypoint service exists but has no endpoint.
            by_hostname("ns", "waypoint.ns.svc"),
        ];
        for wp in unknown {
            let st = with_waypoints(Some(wp.clone()), Some(wp.clone()), &[]);
            match st.resolve(CLIENT, vip(80)) {
                Upstream::UnknownWaypoint { waypoint, service: Some(s) } => {
                    assert_eq!((waypoint, s.name.as_str()), (wp.clone(), "echo"))
                }
                other => panic!("{wp}: {other:?}"),
            }
            let direct = st.resolve(CLIENT, "10.0.0.1:8080".parse().unwrap());
            assert!(matches!(direct, Upstream::UnknownWaypoint { service: None, .. }), "{wp}: {direct:?}");
        }
    }
}
