//! The waypoint's configuration from a whole cluster: which services get routes, which policies go to the waypoint
//! and not to ztunnel, and what each waypoint is scoped to.

use ambit_api::security::{string_match, Action, Scope};
use ambit_api::waypoint::{backend, policy_target, Protocol};

use super::*;

/// An ambient namespace with a waypoint `waypoint` (and `wl-waypoint` for workloads, which pod `direct-0` uses); `web` (two pods, named http port and a grpc port) uses it,
/// `plain` does not; `web-v2` is a backend of web's route; `elsewhere` is an unrelated service. Routes: one HTTPRoute
/// and one GRPCRoute on `web`, one on `plain`, one invalid; policies: one targeting the waypoint Gateway, one
/// targeting `web`, one targeting `plain`, one CUSTOM, and one L4 policy with a selector.
pub(crate) const WAYPOINT_CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: mesh}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wl-waypoint, namespace: mesh, labels: {istio.io/waypoint-for: workload}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: direct-0, namespace: mesh, labels: {istio.io/use-waypoint: wl-waypoint}}
spec: {nodeName: node1, containers: [{name: c}]}
status: {podIP: 10.1.0.6}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: rpc, port: 9000, appProtocol: grpc}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: mesh}
spec: {clusterIP: 10.96.0.11, selector: {app: web-v2}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: mesh}
spec: {clusterIP: 10.96.0.12, selector: {app: plain}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere, namespace: mesh}
spec: {clusterIP: 10.96.0.13, selector: {app: elsewhere}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: mesh, labels: {app: web}}
spec: {nodeName: node1, containers: [{name: c}]}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v2-0, namespace: mesh, labels: {app: web-v2}}
spec: {nodeName: node2, containers: [{name: c}]}
status: {podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-0, namespace: mesh, labels: {app: plain}}
spec: {nodeName: node1, containers: [{name: c}]}
status: {podIP: 10.1.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: elsewhere-0, namespace: mesh, labels: {app: elsewhere}}
spec: {nodeName: node2, containers: [{name: c}]}
status: {podIP: 10.1.0.5}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: web-v2, port: 80, weight: 10}, {name: missing, port: 80, weight: 1}]
  - backendRefs: [{name: web, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: web-grpc, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: web, sectionName: rpc}]
  rules: [{matches: [{method: {service: echo.Echo}}], backendRefs: [{name: web, port: 9000}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: plain, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: plain}]
  rules: [{backendRefs: [{name: elsewhere, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{filters: [{type: CORS}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-waypoint, namespace: mesh}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: [/admin/*]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-web, namespace: mesh}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}], to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-plain, namespace: mesh}
spec:
  targetRefs: [{kind: Service, group: "", name: plain}]
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom, namespace: mesh}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: ext-authz}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: mesh}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {namespaces: [mesh]}}]}]
"#;

pub(crate) fn waypoint_cluster() -> BuildReport {
    build_from(&[WAYPOINT_CLUSTER])
}

/// The model of the objects of `texts` (YAML documents, each valid).
pub(crate) fn build_from(texts: &[&str]) -> BuildReport {
    let mut objects = ClusterObjects::default();
    for text in texts {
        let (parsed, rejections) = parse_documents(text, "waypoint.yaml");
        assert!(rejections.is_empty(), "{rejections:?}");
        parsed.into_iter().for_each(|o| assert!(objects.insert(o)));
    }
    build_report(&objects, &ModelOptions::default(), 1)
}

const WEB: &str = "mesh/web.mesh.svc.cluster.local";

#[test]
fn a_service_with_a_waypoint_gets_its_routes_and_ports_and_others_get_none() {
    let r = waypoint_cluster();
    let s = &r.snapshot;
    assert_eq!(s.service_routes.keys().collect::<Vec<_>>(), [WEB], "only the service with a waypoint");
    let web = &s.service_routes[WEB];
    assert_eq!((web.namespace.as_str(), web.name.as_str()), ("mesh", "web"));
    let ports: Vec<_> = web.ports.iter().map(|p| (p.port, p.target_port, p.protocol(), p.name.as_str())).collect();
    assert_eq!(ports, [(80, 8080, Protocol::Http, "http"), (9000, 9000, Protocol::Grpc, "rpc")]);
    let names =
        |i: usize| web.ports[i].routes.iter().map(|r| r.origin.as_ref().unwrap().name.clone()).collect::<Vec<_>>();
    assert_eq!(names(0), ["web"], "the HTTPRoute binds port 80 only; the broken one is left out");
    assert_eq!(names(1), ["web-grpc"], "the GRPCRoute binds the port named rpc");
    let rule = &web.ports[0].routes[0].rules[0];
    assert!(
        matches!(&rule.backends[0].kind, Some(backend::Kind::Service(b)) if b.hostname == "web-v2.mesh.svc.cluster.local")
    );
    assert!(matches!(&rule.backends[1].kind, Some(backend::Kind::Invalid(why)) if why.contains("BackendNotFound")));
    assert_eq!(r.waypoint_services.iter().collect::<Vec<_>>(), [&("mesh".to_owned(), "web".to_owned())]);
    let broken: Vec<_> = r.rejections.iter().map(|r| (r.kind.as_str(), r.name.as_str())).collect();
    assert_eq!(broken, [("HTTPRoute", "broken")], "an invalid route stops no other");
    let plain = r.warnings.iter().find(|w| w.kind == "HTTPRoute" && w.name == "plain").expect("told, in file mode too");
    assert!(plain.reason.contains("has no waypoint"), "{plain:?}");
}

#[test]
fn targeted_policies_go_to_the_waypoint_and_never_to_ztunnel() {
    let r = waypoint_cluster();
    let s = &r.snapshot;
    assert_eq!(s.authorizations.keys().collect::<Vec<_>>(), ["mesh/l4"], "ztunnel keeps only the L4 policy");
    assert_eq!(
        s.waypoint_policies.keys().collect::<Vec<_>>(),
        ["mesh/at-plain", "mesh/at-waypoint", "mesh/at-web"],
        "CUSTOM is not sent"
    );
    let bound = |n: &str| r.policy_bindings[&("mesh".to_owned(), n.to_owned())].clone();
    assert_eq!(bound("at-waypoint").waypoints, ["mesh/waypoint"]);
    assert_eq!(bound("at-web").waypoints, ["mesh/waypoint"], "through the service's waypoint");
    assert!(bound("at-plain").waypoints.is_empty(), "plain has no waypoint: the policy has no effect");
    assert!(bound("custom").problem.unwrap().contains("CUSTOM"));
    let warned = |n: &str| r.warnings.iter().filter(|w| w.name == n).map(|w| w.reason.clone()).collect::<Vec<_>>();
    assert!(warned("at-plain")[0].contains("no effect"), "logged in file mode: {:?}", r.warnings);
    assert_eq!(warned("custom").len(), 1, "only why it is not sent");
    assert!(warned("custom")[0].contains("CUSTOM"));
    assert!(warned("at-web").is_empty());
    let t = &s.waypoint_policies["mesh/at-web"].targets[0];
    assert!(matches!(&t.kind, Some(policy_target::Kind::Service(svc)) if svc.hostname == "web.mesh.svc.cluster.local"));
}

#[test]
fn a_waypoint_is_scoped_to_its_services_their_backends_and_their_endpoints() {
    let s = waypoint_cluster().snapshot;
    let scope = &s.waypoints[&("mesh".to_owned(), "waypoint".to_owned())];
    assert_eq!(scope.service_routes.iter().collect::<Vec<_>>(), [WEB]);
    assert_eq!(scope.policies.iter().collect::<Vec<_>>(), ["mesh/at-waypoint", "mesh/at-web"]);
    assert_eq!(
        scope.addresses.iter().collect::<Vec<_>>(),
        ["Kubernetes//Pod/mesh/web-0", "Kubernetes//Pod/mesh/web-v2-0", "mesh/web-v2.mesh.svc.cluster.local", WEB,],
        "not plain, not elsewhere, not their pods"
    );
    let direct = &s.waypoints[&("mesh".to_owned(), "wl-waypoint".to_owned())];
    assert_eq!(direct.addresses.iter().collect::<Vec<_>>(), ["Kubernetes//Pod/mesh/direct-0"], "its own workload");
    assert!(direct.service_routes.is_empty() && direct.policies.is_empty());
}

#[test]
fn the_implicit_allow_from_waypoint_policy_lists_the_waypoints_own_identity_on_the_workloads_it_serves() {
    let (parsed, _) = parse_documents(WAYPOINT_CLUSTER, "waypoint.yaml");
    let mut objects = ClusterObjects::default();
    for o in parsed {
        objects.insert(o);
    }
    let opts = ModelOptions { auto_allow_waypoint_policy: true, ..ModelOptions::default() };
    let s = build_report(&objects, &opts, 1).snapshot;
    let policies = |pod: &str| match &s.addresses[&format!("Kubernetes//Pod/mesh/{pod}")].r#type {
        Some(address::Type::Workload(w)) => w.authorization_policies.clone(),
        other => panic!("{pod}: {other:?}"),
    };
    let wp = "mesh/istio_allow_waypoint_mesh_waypoint";
    assert_eq!(policies("web-0"), [wp, "mesh/l4"], "behind its service's waypoint, with its own L4 policy");
    assert_eq!(policies("direct-0"), ["mesh/istio_allow_waypoint_mesh_wl-waypoint"], "its own waypoint");
    assert!(policies("plain-0").is_empty() && policies("web-v2-0").is_empty(), "no waypoint serves them");
    let p = &s.authorizations[wp];
    assert_eq!((p.name.as_str(), p.namespace.as_str()), ("istio_allow_waypoint_mesh_waypoint", "mesh"));
    assert_eq!((p.action(), p.scope(), p.dry_run), (Action::Allow, Scope::WorkloadSelector, false));
    let principals = &p.rules[0].clauses[0].matches[0].principals;
    assert_eq!(principals.len(), 1);
    assert_eq!(
        principals[0].match_type,
        Some(string_match::MatchType::Exact("cluster.local/ns/mesh/sa/waypoint".into())),
        "Istio's form: no spiffe:// scheme"
    );
    // Off (the default, as in Istio): nothing implicit; see targeted_policies_go_to_the_waypoint_and_never_to_ztunnel.
    assert!(!waypoint_cluster().snapshot.authorizations.keys().any(|k| k.contains("istio_allow_waypoint")));
}

/// Consumer routes in namespace `client` on `web`: one back to `web` itself (allowed without a ReferenceGrant), one
/// to `web-v2` (another Service of `mesh`: refused, no grant is read).
const CONSUMER_ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: client}
spec:
  parentRefs: [{group: "", kind: Service, name: web, namespace: mesh, port: 80}]
  rules: [{backendRefs: [{name: web, namespace: mesh, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: sneaky, namespace: client}
spec:
  parentRefs: [{group: "", kind: Service, name: web, namespace: mesh, port: 80}]
  rules: [{backendRefs: [{name: web-v2, namespace: mesh, port: 80}]}]
"#;

#[test]
fn a_consumer_route_joins_the_services_routes_and_may_send_only_to_its_parent() {
    let r = build_from(&[WAYPOINT_CLUSTER, CONSUMER_ROUTES]);
    let port80 = &r.snapshot.service_routes[WEB].ports[0];
    let route = |name: &str| {
        port80.routes.iter().find(|r| r.origin.as_ref().unwrap().name == name).unwrap_or_else(|| panic!("{name}"))
    };
    assert_eq!(route("mine").origin.as_ref().unwrap().namespace, "client", "the waypoint tells consumers by it");
    let backend = |name: &str| route(name).rules[0].backends[0].kind.clone();
    assert!(
        matches!(backend("mine"), Some(backend::Kind::Service(b)) if b.hostname == "web.mesh.svc.cluster.local"),
        "{:?}",
        backend("mine")
    );
    assert!(matches!(backend("sneaky"), Some(backend::Kind::Invalid(why)) if why.contains("RefNotPermitted")));
    assert!(!r.warnings.iter().any(|w| w.namespace == "client"), "{:?}", r.warnings);
}

#[test]
fn a_reference_grant_opens_another_namespaces_service_to_a_route() {
    const GRANT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: client-routes, namespace: mesh}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: client}]
  to: [{group: "", kind: Service, name: web-v2}]
"#;
    let r = build_from(&[WAYPOINT_CLUSTER, CONSUMER_ROUTES, GRANT]);
    let port80 = &r.snapshot.service_routes[WEB].ports[0];
    let sneaky = port80.routes.iter().find(|r| r.origin.as_ref().unwrap().name == "sneaky").unwrap();
    assert!(
        matches!(&sneaky.rules[0].backends[0].kind, Some(backend::Kind::Service(b)) if b.hostname == "web-v2.mesh.svc.cluster.local"),
        "{sneaky:?}"
    );
}
