//! VirtualServices and TrafficSplits in a whole cluster: where they attach, and what their status is told.

use ambit_api::waypoint::{backend, RouteKind};

use super::super::waypoint_tests::{build_from, WAYPOINT_CLUSTER};
use super::super::BuildReport;

/// `shop` and `cart` use the waypoint and have no Gateway API route; `shop-v2` is a plain service; `other/foreign`
/// is a service of another namespace.
const MORE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: mesh, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.20, selector: {app: shop}, ports: [{name: http, port: 80, targetPort: 8080}, {name: db, port: 5432, appProtocol: tcp}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: mesh, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.21, selector: {app: cart}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: shop-v2, namespace: mesh}
spec: {clusterIP: 10.96.0.22, selector: {app: shop-v2}, ports: [{name: http, port: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: mesh, creationTimestamp: '2026-01-01T00:00:00Z'}
spec:
  hosts: [shop, web.mesh.svc.cluster.local, foreign.other, plain]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: shop-v2}}]
  - route: [{destination: {host: shop}, weight: 90}, {destination: {host: shop-v2}, weight: 10}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: shop-younger, namespace: mesh, creationTimestamp: '2026-02-01T00:00:00Z'}
spec:
  hosts: [shop]
  http: [{route: [{destination: {host: shop-v2}}]}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: broken, namespace: mesh}
spec:
  hosts: [cart]
  http: [{route: [{destination: {host: cart}}], timeout: soon}]
---
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: cart, namespace: mesh}
spec: {service: cart, backends: [{service: cart, weight: 90}, {service: shop-v2, weight: 10}]}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: shop, namespace: mesh}
spec: {service: shop, backends: [{service: shop-v2, weight: 1}]}
"#;

fn notes<'a>(r: &'a BuildReport, kind: &str, name: &str) -> Vec<&'a str> {
    r.warnings.iter().filter(|w| w.kind == kind && w.name == name).map(|w| w.reason.as_str()).collect()
}

fn applied(r: &BuildReport, kind: &str, name: &str) -> bool {
    r.mesh_routes_applied.contains(&(kind.into(), "mesh".into(), name.into()))
}

#[test]
fn a_virtual_service_routes_its_services_http_ports_in_order_and_reports_what_it_did_not() {
    let r = build_from(&[WAYPOINT_CLUSTER, MORE]);
    let shop = &r.snapshot.service_routes["mesh/shop.mesh.svc.cluster.local"];
    let http = shop.ports.iter().find(|p| p.port == 80).unwrap();
    let kinds: Vec<_> = http
        .routes
        .iter()
        .map(|r| (r.origin.as_ref().unwrap().kind(), r.origin.as_ref().unwrap().name.as_str()))
        .collect();
    assert_eq!(kinds, [(RouteKind::VirtualService, "shop")], "the oldest VirtualService, alone");
    let rules = &http.routes[0].rules;
    assert_eq!(rules[0].matches[0].headers[0].value, "jason", "rules in the order written");
    let weights: Vec<_> = rules[1].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [90, 10]);
    assert!(
        rules[1]
            .backends
            .iter()
            .all(|b| matches!(&b.kind, Some(backend::Kind::Service(s)) if s.port == 80 || s.port == 8080)),
        "shop on the request's port, shop-v2 on its only port: {:?}",
        rules[1].backends
    );
    assert!(shop.ports.iter().find(|p| p.port == 5432).unwrap().routes.is_empty(), "TCP ports carry no HTTP routes");
    assert!(applied(&r, "VirtualService", "shop"));

    let warned = notes(&r, "VirtualService", "shop").join("\n");
    assert!(warned.contains("HTTPRoute mesh/web applies there"), "{warned}");
    assert!(
        warned.contains("host foreign.other: a VirtualService applies only to Services of its own namespace"),
        "{warned}"
    );
    assert!(warned.contains("Service mesh/plain has no waypoint"), "{warned}");

    assert!(!applied(&r, "VirtualService", "shop-younger"));
    assert!(notes(&r, "VirtualService", "shop-younger")[0].contains("VirtualService mesh/shop applies there"));
    let broken: Vec<_> = r
        .rejections
        .iter()
        .filter(|x| x.kind == "VirtualService")
        .map(|x| (x.name.as_str(), x.reason.as_str()))
        .collect();
    assert!(matches!(broken[..], [("broken", why)] if why.contains("bad duration")), "{broken:?}");
}

#[test]
fn a_traffic_split_applies_where_no_route_or_virtual_service_does() {
    let r = build_from(&[WAYPOINT_CLUSTER, MORE]);
    let cart = &r.snapshot.service_routes["mesh/cart.mesh.svc.cluster.local"];
    let route = &cart.ports[0].routes[0];
    assert_eq!(
        route.origin.as_ref().unwrap().kind(),
        RouteKind::TrafficSplit,
        "the broken VirtualService does not hold it"
    );
    let port = |b: &ambit_api::waypoint::Backend| match &b.kind {
        Some(backend::Kind::Service(s)) => s.port,
        _ => 0,
    };
    let split: Vec<_> = route.rules[0].backends.iter().map(|b| (b.weight, port(b))).collect();
    assert_eq!(split, [(90, 80), (10, 8080)], "the request's port, or a backend's only port (Istio)");
    assert!(applied(&r, "TrafficSplit", "cart"));
    assert!(!applied(&r, "TrafficSplit", "shop"));
    assert!(notes(&r, "TrafficSplit", "shop")[0].contains("VirtualService mesh/shop applies there"));
    let scope = &r.snapshot.waypoints[&("mesh".to_owned(), "waypoint".to_owned())];
    assert!(format!("{scope:?}").contains("shop-v2"), "the waypoint gets the addresses of the split's backends");
}

const SUBSETS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: shop-a, namespace: mesh, labels: {app: shop, version: v1}}
spec: {nodeName: node1, containers: [{name: c}]}
status: {podIP: 10.1.0.20}
---
apiVersion: v1
kind: Pod
metadata: {name: shop-b, namespace: mesh, labels: {app: shop, version: v2}}
spec: {nodeName: node2, containers: [{name: c}]}
status: {podIP: 10.1.0.21}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shop, namespace: mesh}
spec:
  host: shop.mesh.svc.cluster.local
  trafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: 100}}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: plain, namespace: mesh}
spec: {host: plain, subsets: [{name: v1, labels: {version: v1}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop-subsets, namespace: mesh, creationTimestamp: '2025-01-01T00:00:00Z'}
spec:
  hosts: [shop]
  http:
  - route:
    - {destination: {host: shop, subset: v1}, weight: 90}
    - {destination: {host: shop, subset: v2}, weight: 10}
    - {destination: {host: shop, subset: v3}, weight: 0}
"#;

#[test]
fn a_subset_is_the_workloads_whose_pods_carry_its_labels() {
    let r = build_from(&[WAYPOINT_CLUSTER, MORE, SUBSETS]);
    let shop = &r.snapshot.service_routes["mesh/shop.mesh.svc.cluster.local"];
    let route = &shop.ports[0].routes[0];
    assert_eq!(route.origin.as_ref().unwrap().name, "shop-subsets", "the oldest VirtualService");
    let subsets: Vec<_> = route.rules[0]
        .backends
        .iter()
        .map(|b| match &b.kind {
            Some(backend::Kind::Service(s)) => {
                let s = s.subset.as_ref().expect("a subset");
                format!("{}={}", s.name, s.workloads.join(","))
            }
            Some(backend::Kind::Invalid(why)) => why.clone(),
            None => String::new(),
        })
        .collect();
    assert_eq!(subsets[0], "v1=Kubernetes//Pod/mesh/shop-a");
    assert_eq!(subsets[1], "v2=Kubernetes//Pod/mesh/shop-b");
    assert!(subsets[2].contains("subset v3") && subsets[2].contains("no DestinationRule"), "{}", subsets[2]);
    assert!(applied(&r, "DestinationRule", "shop"));
    assert!(notes(&r, "DestinationRule", "shop").is_empty(), "every part applied");
    let pool = match &route.rules[0].backends[0].kind {
        Some(backend::Kind::Service(s)) => s.policy.as_ref().and_then(|p| p.connection_pool),
        _ => None,
    };
    assert_eq!(pool.map(|p| p.http1_max_pending_requests), Some(100), "the rule's pool goes with its subsets");
    assert!(!applied(&r, "DestinationRule", "plain"));
    assert!(notes(&r, "DestinationRule", "plain")[0].contains("has no waypoint"));
}

const BALANCERS: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: mesh}
spec:
  host: web
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shop, namespace: mesh}
spec:
  host: shop
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
  subsets:
  - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart-bad, namespace: mesh}
spec:
  host: cart
  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop-subsets, namespace: mesh, creationTimestamp: '2025-01-01T00:00:00Z'}
spec:
  hosts: [shop]
  http: [{route: [{destination: {host: shop, subset: v1}, weight: 50}, {destination: {host: shop, subset: v2}, weight: 50}]}]
"#;

#[test]
fn a_destination_rules_load_balancer_goes_with_every_backend_of_its_service() {
    use ambit_api::waypoint::load_balancer::{HashKey, Simple};
    let r = build_from(&[WAYPOINT_CLUSTER, MORE, BALANCERS]);
    let lb_of = |b: &ambit_api::waypoint::Backend| match &b.kind {
        Some(backend::Kind::Service(s)) => s.policy.clone().and_then(|p| p.load_balancer),
        _ => None,
    };
    let web = &r.snapshot.service_routes["mesh/web.mesh.svc.cluster.local"];
    let own = web.ports[0].policy.as_ref().and_then(|p| p.load_balancer.as_ref());
    assert_eq!(own.map(|l| l.simple()), Some(Simple::RoundRobin), "web's own traffic");
    let http_route = &web.ports[0].routes[0];
    let last = http_route.rules.last().unwrap();
    assert_eq!(lb_of(&last.backends[0]).map(|l| l.simple()), Some(Simple::RoundRobin), "an HTTPRoute backend web");
    let v2 = &http_route.rules[0].backends[0];
    assert_eq!(lb_of(v2), None, "web-v2 has no DestinationRule");

    let shop = &r.snapshot.service_routes["mesh/shop.mesh.svc.cluster.local"];
    let backends = &shop.ports[0].routes[0].rules[0].backends;
    assert_eq!(lb_of(&backends[0]).map(|l| l.simple()), Some(Simple::Random), "subset v1's own policy");
    assert_eq!(lb_of(&backends[1]).and_then(|l| l.hash_key), Some(HashKey::HttpHeaderName("x-user".into())));

    let bad: Vec<_> = r.rejections.iter().filter(|x| x.kind == "DestinationRule").map(|x| x.name.as_str()).collect();
    assert_eq!(bad, ["cart-bad"], "PASSTHROUGH is refused; the rule's subsets are not used");
}

/// TCP routes for `shop`'s TCP port 5432: the older VirtualService splits it between subset v1 and `shop-db`, with a
/// destination that does not resolve; the younger one is held off. `db` has an HTTPRoute on every port.
const TCP: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop-tcp, namespace: mesh, creationTimestamp: '2025-06-01T00:00:00Z'}
spec:
  hosts: [shop]
  tcp:
  - match: [{port: 5432}]
    route:
    - {destination: {host: shop, subset: v1}, weight: 80}
    - {destination: {host: shop-db}, weight: 20}
    - {destination: {host: nowhere}, weight: 0}
---
apiVersion: v1
kind: Service
metadata: {name: shop-db, namespace: mesh}
spec: {clusterIP: 10.96.0.24, selector: {app: shop-db}, ports: [{name: tcp, port: 6432}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop-tcp-younger, namespace: mesh, creationTimestamp: '2025-07-01T00:00:00Z'}
spec:
  hosts: [shop]
  tcp: [{route: [{destination: {host: shop-v2}}]}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: mesh, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.23, selector: {app: db}, ports: [{name: tcp-pg, port: 5432}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: db-http, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: db}]
  rules: [{backendRefs: [{name: db, port: 5432}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: mesh}
spec:
  hosts: [db]
  tcp: [{route: [{destination: {host: shop-v2}}]}]
"#;

#[test]
fn a_virtual_service_tcp_route_splits_a_tcp_port_and_reports_what_it_could_not_resolve() {
    let r = build_from(&[WAYPOINT_CLUSTER, MORE, SUBSETS, TCP]);
    let shop = &r.snapshot.service_routes["mesh/shop.mesh.svc.cluster.local"];
    let db_port = shop.ports.iter().find(|p| p.port == 5432).unwrap();
    assert!(db_port.routes.is_empty(), "no HTTP route on a TCP port");
    let t = db_port.tcp_route.as_ref().expect("the tcp route");
    assert_eq!(t.origin.as_ref().unwrap().name, "shop-tcp", "the oldest VirtualService");
    let split: Vec<_> = t
        .backends
        .iter()
        .map(|b| match &b.kind {
            Some(backend::Kind::Service(s)) => {
                let subset = s.subset.as_ref().map(|s| s.workloads.join(",")).unwrap_or_default();
                format!("{}:{} {subset} {}", s.hostname, s.port, b.weight)
            }
            Some(backend::Kind::Invalid(why)) => format!("{why} {}", b.weight),
            None => String::new(),
        })
        .collect();
    assert_eq!(
        split,
        [
            "shop.mesh.svc.cluster.local:5432 Kubernetes//Pod/mesh/shop-a 80",
            "shop-db.mesh.svc.cluster.local:6432  20",
            "host nowhere: no such Service 0"
        ]
    );
    assert!(shop.ports.iter().filter(|p| p.port != 5432).all(|p| p.tcp_route.is_none()), "HTTP ports get none");
    let scope = &r.snapshot.waypoints[&("mesh".to_owned(), "waypoint".to_owned())];
    assert!(format!("{scope:?}").contains("shop-db"), "the waypoint gets the addresses of the tcp route's backends");
    assert!(applied(&r, "VirtualService", "shop-tcp"));
    assert_eq!(
        notes(&r, "VirtualService", "shop-tcp"),
        ["host nowhere: no such Service: its share of connections is closed"]
    );
    assert!(!applied(&r, "VirtualService", "shop-tcp-younger"));
    assert!(notes(&r, "VirtualService", "shop-tcp-younger")[0].contains("port 5432: VirtualService mesh/shop-tcp"));

    let db = &r.snapshot.service_routes["mesh/db.mesh.svc.cluster.local"];
    assert!(db.ports[0].tcp_route.is_none(), "the HTTPRoute holds the port");
    assert!(!applied(&r, "VirtualService", "db"));
    assert!(notes(&r, "VirtualService", "db")[0].contains("HTTPRoute mesh/db-http applies there"));
}

#[test]
fn a_destination_rule_for_a_backend_without_a_waypoint_applies_through_the_routes_that_send_to_it() {
    const BACKEND_RULE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shop-v2, namespace: mesh}
spec: {host: shop-v2, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
"#;
    let r = build_from(&[WAYPOINT_CLUSTER, MORE, BACKEND_RULE]);
    assert!(applied(&r, "DestinationRule", "shop-v2"), "{:?}", notes(&r, "DestinationRule", "shop-v2"));
    assert!(notes(&r, "DestinationRule", "shop-v2").is_empty());
    let shop = &r.snapshot.service_routes["mesh/shop.mesh.svc.cluster.local"];
    let to_v2 = &shop.ports[0].routes[0].rules[0].backends[0];
    let lb = match &to_v2.kind {
        Some(backend::Kind::Service(s)) if s.hostname.starts_with("shop-v2.") => {
            s.policy.as_ref().and_then(|p| p.load_balancer.clone())
        }
        other => panic!("not shop-v2: {other:?}"),
    };
    assert_eq!(lb.map(|l| l.simple()), Some(ambit_api::waypoint::load_balancer::Simple::Random));
}
