//! Snapshots built from resources as the controller writes them (its
//! `model/services.rs`: a service's ports with 0 for a named targetPort, each
//! backing pod's own `services` port list).

use std::collections::HashMap;

use ambit_api::workload::{
    address, load_balancing, Address, LoadBalancing, NetworkAddress, Port, PortList, TunnelProtocol, WorkloadStatus,
};
use http::Request;

use super::*;
use crate::config::Protocol;

const WEB: &str = "web.mesh.svc.cluster.local";
const API: &str = "api.mesh.svc.cluster.local";

fn svc_address(name: &str, vip: [u8; 4], ports: &[(u32, u32)]) -> Address {
    Address {
        r#type: Some(address::Type::Service(wl::Service {
            name: name.into(),
            namespace: "mesh".into(),
            hostname: format!("{name}.mesh.svc.cluster.local"),
            addresses: vec![NetworkAddress { network: String::new(), address: vip.to_vec() }],
            ports: ports.iter().map(|&(service_port, target_port)| Port { service_port, target_port }).collect(),
            ..Default::default()
        })),
    }
}

fn pod(uid: &str, ip: [u8; 4], sa: &str, backs: &[(&str, &[(u32, u32)])]) -> Address {
    let services: HashMap<String, PortList> = backs
        .iter()
        .map(|(host, ports)| {
            let ports = ports.iter().map(|&(service_port, target_port)| Port { service_port, target_port }).collect();
            (format!("mesh/{host}"), PortList { ports })
        })
        .collect();
    Address {
        r#type: Some(address::Type::Workload(wl::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "mesh".into(),
            addresses: vec![ip.to_vec()],
            service_account: sa.into(),
            tunnel_protocol: TunnelProtocol::Hbone.into(),
            node: "node-a".into(),
            canonical_name: "web".into(),
            services,
            ..Default::default()
        })),
    }
}

fn routes(hostname: &str, ports: Vec<pb::PortRoutes>) -> pb::ServiceRoutes {
    pb::ServiceRoutes {
        hostname: hostname.into(),
        namespace: "mesh".into(),
        name: hostname.split('.').next().unwrap().into(),
        ports,
    }
}

/// `web` (served, port 80 → named targetPort `http`, 9090 → 9090) routes
/// `/api` to `api:8080`; `api` is only a backend.
fn resources() -> Resources {
    let to_api = pb::Route {
        origin: Some(pb::RouteOrigin {
            kind: pb::RouteKind::HttpRoute.into(),
            namespace: "mesh".into(),
            name: "to-api".into(),
            creation_timestamp: 0,
        }),
        hostnames: vec![],
        rules: vec![pb::Rule {
            matches: vec![pb::RouteMatch {
                path: Some(pb::PathMatch {
                    r#type: pb::path_match::Type::Prefix.into(),
                    value: "/api".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            backends: vec![pb::Backend {
                kind: Some(pb::backend::Kind::Service(pb::ServiceBackend {
                    hostname: API.into(),
                    namespace: "mesh".into(),
                    port: 8080,
                    ..Default::default()
                })),
                weight: 1,
                filters: vec![],
            }],
            ..Default::default()
        }],
    };
    let port = |port, target_port, protocol: pb::Protocol, routes| pb::PortRoutes {
        port,
        target_port,
        protocol: protocol.into(),
        name: String::new(),
        routes,
        ..Default::default()
    };
    let mut r = Resources::default();
    for (name, a) in [
        (format!("mesh/{WEB}"), svc_address("web", [10, 96, 0, 1], &[(80, 0), (9090, 9090)])),
        (format!("mesh/{API}"), svc_address("api", [10, 96, 0, 2], &[(8080, 8000)])),
        ("web-1".into(), pod("web-1", [10, 0, 0, 1], "web", &[(WEB, &[(80, 8081), (9090, 9090)])])),
        ("api-1".into(), pod("api-1", [10, 0, 0, 2], "api", &[(API, &[(8080, 8000)])])),
        ("api-2".into(), pod("api-2", [10, 0, 0, 3], "", &[(API, &[(8080, 8000)])])),
    ] {
        r.addresses.insert(name, a);
    }
    r.service_routes.insert(
        format!("mesh/{WEB}"),
        routes(WEB, vec![port(80, 0, pb::Protocol::Http, vec![to_api]), port(9090, 9090, pb::Protocol::Tcp, vec![])]),
    );
    r.policies.insert(
        "mesh/deny".into(),
        pb::AuthorizationPolicy {
            namespace: "mesh".into(),
            name: "deny".into(),
            action: pb::Action::Deny.into(),
            ..Default::default()
        },
    );
    r
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn a_served_vip_port_leads_to_its_table_and_the_backends_endpoints_with_their_identities() {
    let snap = Snapshot::build(&resources(), "cluster.local", 1);
    assert_eq!(snap.report(), &BuildReport::default());
    let served = snap.served(addr("10.96.0.1:80")).expect("web:80 is served");
    assert_eq!(served.service.service.hostname, WEB);
    assert_eq!((served.port.protocol, served.port.target_port), (Protocol::Http1, None));
    let req = Request::get("/api/x").header("host", WEB).body(()).unwrap().into_parts().0;
    let m = served.port.table.find(&req).unwrap();
    let crate::route::BackendTarget::Service(target) = &m.rule.backends[0].target else { panic!() };
    let endpoints = snap.endpoints(target);
    let seen: Vec<_> = endpoints.iter().map(|e| (e.target(target.port).unwrap(), e.identity().to_string())).collect();
    assert_eq!(
        seen,
        [
            (addr("10.0.0.2:8000"), "spiffe://cluster.local/ns/mesh/sa/api".to_owned()),
            (addr("10.0.0.3:8000"), "spiffe://cluster.local/ns/mesh/sa/default".to_owned()),
        ]
    );
    assert_eq!(endpoints[0].workload.tunnel, Tunnel::Hbone);
    // The same service by hostname; its TCP port has the default table.
    let tcp = snap.served_by_hostname(WEB, 9090).unwrap();
    assert_eq!((tcp.port.protocol, tcp.port.default_route), (Protocol::Tcp, true));
    assert_eq!(snap.policies().keys().collect::<Vec<_>>(), ["mesh/deny"]);
    assert_eq!(snap.workload_by_ip("10.0.0.1".parse().unwrap()).unwrap().uid, "web-1");
    assert_eq!(snap.version(), 1);
}

#[test]
fn what_the_waypoint_does_not_serve_is_refused() {
    let snap = Snapshot::build(&resources(), "cluster.local", 1);
    assert!(snap.served(addr("10.96.0.2:8080")).is_none(), "api is a backend, not served");
    assert!(snap.served(addr("10.96.0.1:81")).is_none(), "no such port");
    assert!(snap.served(addr("10.96.0.9:80")).is_none(), "unknown VIP");
    assert!(snap.served_by_hostname(API, 8080).is_none());
    let unknown =
        ServiceTarget { hostname: "x.mesh.svc.cluster.local".into(), namespace: "mesh".into(), port: 1, policy: None };
    assert!(snap.endpoints(&unknown).is_empty());
}

#[test]
fn a_named_target_port_resolves_per_endpoint() {
    let snap = Snapshot::build(&resources(), "cluster.local", 1);
    let web = snap.service(&format!("mesh/{WEB}")).unwrap();
    let e = &web.endpoints[0];
    assert_eq!(e.target(80), Some(addr("10.0.0.1:8081")), "the pod's own port for the named targetPort");
    assert_eq!(e.target(9090), Some(addr("10.0.0.1:9090")));
    assert_eq!(e.target(1), None);
}

#[test]
fn unhealthy_endpoints_are_left_out_unless_the_service_allows_all() {
    let mut r = resources();
    let Some(address::Type::Workload(w)) = &mut r.addresses.get_mut("api-2").unwrap().r#type else { panic!() };
    w.status = WorkloadStatus::Unhealthy.into();
    let snap = Snapshot::build(&r, "cluster.local", 1);
    let api = ServiceTarget { hostname: API.into(), namespace: "mesh".into(), port: 8080, policy: None };
    assert_eq!(snap.endpoints(&api).len(), 1);
    let Some(address::Type::Service(s)) = &mut r.addresses.get_mut(&format!("mesh/{API}")).unwrap().r#type else {
        panic!()
    };
    s.load_balancing =
        Some(LoadBalancing { health_policy: load_balancing::HealthPolicy::AllowAll.into(), ..Default::default() });
    let snap = Snapshot::build(&r, "cluster.local", 2);
    assert_eq!(snap.endpoints(&api).len(), 2);
    assert!(!snap.endpoints(&api)[1].workload.healthy);
}

#[test]
fn a_bad_address_is_left_out_alone_and_said() {
    let mut r = resources();
    let Some(address::Type::Workload(w)) = &mut r.addresses.get_mut("api-2").unwrap().r#type else { panic!() };
    w.addresses = vec![vec![1, 2, 3]];
    r.addresses.insert("empty".into(), Address { r#type: None });
    let snap = Snapshot::build(&r, "cluster.local", 1);
    assert_eq!(snap.report().addresses.len(), 2, "{:?}", snap.report());
    assert!(snap.report().addresses[0].contains("api-2"), "{:?}", snap.report());
    let api = ServiceTarget { hostname: API.into(), namespace: "mesh".into(), port: 8080, policy: None };
    assert_eq!(snap.endpoints(&api).len(), 1);
    assert!(snap.served(addr("10.96.0.1:80")).is_some());
}

#[tokio::test]
async fn a_handle_reads_the_current_snapshot_and_sees_the_next() {
    let publisher = SnapshotPublisher::new();
    let mut handle = publisher.handle();
    assert!(handle.current().served(addr("10.96.0.1:80")).is_none(), "nothing served before the first config");
    let held = handle.current();
    publisher.publish(Snapshot::build(&resources(), "cluster.local", 7));
    assert_eq!(handle.changed().await.unwrap().version(), 7);
    assert_eq!(handle.current().version(), 7);
    assert_eq!(held.version(), 0, "a snapshot held by a request does not change under it");
    drop(publisher);
    assert!(handle.changed().await.is_none());
    assert_eq!(handle.current().version(), 7, "the last snapshot stays");
}
