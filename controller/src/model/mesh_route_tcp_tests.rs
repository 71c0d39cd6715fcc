use super::*;
use ambit_api::waypoint::{backend, Subset};

use super::super::mesh_route_crd::VsDestination;
use super::super::route_convert;

/// Resolves a host of namespace `mesh` to `<host>.mesh.svc.cluster.local` on the destination's port, else the
/// connection's, with its subset named; `gone` does not resolve.
struct Fake;

impl DestinationResolver for Fake {
    fn resolve(&self, ns: &str, d: &VsDestination, port: u32) -> Backend {
        if d.host == "gone" {
            return route_convert::invalid(format!("host {}: no such Service", d.host));
        }
        let port = d.port.as_ref().map_or(port, |p| p.number);
        let mut b = route_convert::service(ns, format!("{}.mesh.svc.cluster.local", d.host), port);
        if let Some(backend::Kind::Service(s)) = &mut b.kind {
            s.subset = d.subset.clone().map(|name| Subset { name, workloads: Vec::new() });
        }
        b
    }
}

fn tcp(spec: &str, port: u32) -> Result<Option<TcpRoute>, MeshRouteError> {
    let text = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: mesh}}\nspec:\n{spec}"
    );
    tcp_route(&serde_yaml::from_str(&text).unwrap(), PortContext { port }, &Fake)
}

/// (host, port, subset, weight) of each backend, or the reason it does not resolve.
fn backends(t: &TcpRoute) -> Vec<String> {
    t.backends
        .iter()
        .map(|b| match &b.kind {
            Some(backend::Kind::Service(s)) => {
                let subset = s.subset.as_ref().map_or("-", |s| s.name.as_str());
                format!("{}:{} {subset} {}", s.hostname.split('.').next().unwrap(), s.port, b.weight)
            }
            Some(backend::Kind::Invalid(why)) => format!("invalid {why} {}", b.weight),
            None => "none".into(),
        })
        .collect()
}

const BY_PORT: &str = r#"  hosts: [db]
  tcp:
  - match: [{port: 5432}]
    route:
    - destination: {host: db}
      weight: 80
    - destination: {host: db-v2, port: {number: 6432}}
      weight: 20
  - match: [{port: 5432}, {port: 6000}]
    route: [{destination: {host: never-first}}]
  - route:
    - destination: {host: db, subset: v1}
    - destination: {host: db, subset: v2}
"#;

#[test]
fn the_first_rule_whose_match_names_the_port_takes_it_with_its_weights() {
    let t = tcp(BY_PORT, 5432).unwrap().expect("a rule for 5432");
    assert_eq!(t.rule, 0);
    assert_eq!(backends(&t), ["db:5432 - 80", "db-v2:6432 - 20"], "the connection's port unless one is named");
    let o = t.origin.unwrap();
    assert_eq!((o.kind(), o.namespace.as_str(), o.name.as_str()), (RouteKind::VirtualService, "mesh", "v"));

    let t = tcp(BY_PORT, 6000).unwrap().unwrap();
    assert_eq!((t.rule, backends(&t)), (1, vec!["never-first:6000 - 1".to_owned()]), "any of a rule's matches");
}

#[test]
fn a_rule_without_match_takes_every_other_tcp_port_with_equal_shares_of_its_subsets() {
    let t = tcp(BY_PORT, 7000).unwrap().unwrap();
    assert_eq!((t.rule, backends(&t)), (2, vec!["db:7000 v1 1".to_owned(), "db:7000 v2 1".to_owned()]));
}

#[test]
fn no_rule_for_the_port_routes_nothing() {
    let only_5432 = "  hosts: [db]\n  tcp: [{match: [{port: 5432}], route: [{destination: {host: db}}]}]\n";
    assert_eq!(tcp(only_5432, 7000), Ok(None));
    assert_eq!(tcp("  hosts: [db]\n  http: [{route: [{destination: {host: db}}]}]\n", 5432), Ok(None));
}

#[test]
fn a_weight_left_out_beside_weighted_destinations_gets_nothing_and_an_unknown_host_keeps_its_share() {
    let spec = "  tcp:\n  - route:\n    - {destination: {host: db}, weight: 70}\n    - {destination: {host: gone}, \
                weight: 30}\n    - {destination: {host: db-v2}}\n";
    let t = tcp(spec, 5432).unwrap().unwrap();
    assert_eq!(backends(&t), ["db:5432 - 70", "invalid host gone: no such Service 30", "db-v2:5432 - 0"]);
}

#[test]
fn an_invalid_rule_refuses_the_object_whatever_the_port() {
    let empty = "  tcp:\n  - route: [{destination: {host: db}}]\n  - match: [{port: 5432}]\n";
    assert_eq!(tcp(empty, 80).unwrap_err().to_string(), "tcp[1]: a route is required");
    let bad_port = "  tcp: [{match: [{port: 70000}], route: [{destination: {host: db}}]}]\n";
    assert_eq!(tcp(bad_port, 0).unwrap_err().to_string(), "tcp[0]: match port 70000 is outside 1-65535");
}

#[test]
fn l4_match_attributes_other_than_port_and_tls_routes_are_refused_by_name() {
    let text = |spec: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: mesh}}\nspec:\n{spec}")
    };
    let labels = text("  tcp: [{match: [{sourceLabels: {app: a}}], route: [{destination: {host: db}}]}]\n");
    let err = serde_yaml::from_str::<VirtualService>(&labels).unwrap_err().to_string();
    assert!(err.contains("sourceLabels"), "{err}");

    let tls = text("  hosts: [db]\n  tls: [{match: [{sniHosts: [db]}], route: [{destination: {host: db}}]}]\n");
    let vs: VirtualService = serde_yaml::from_str(&tls).unwrap();
    let err = super::super::mesh_route_convert::virtual_service(&vs, PortContext { port: 0 }, &Fake).unwrap_err();
    assert!(err.to_string().starts_with("tls routes (by SNI) are not applied"), "{err}");
}
