//! The waypoint's configuration from a real kube-apiserver: `KubeSource` (in-process) reads an HTTPRoute and a
//! GRPCRoute attached to a Service (GAMMA) and AuthorizationPolicies bound by `targetRefs`, publishes them as
//! `ambit.waypoint.v1` resources (never to ztunnel's L4 policies), and writes their status; a ReferenceGrant opens a
//! Service to another namespace's route and its deletion closes it again; a waypoint's own
//! service-account token, reviewed by the API server, makes it a workload caller with its own identity only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_api::waypoint::backend;
use ambit_controller::ca::{Caller, TokenReviewAuthenticator};
use ambit_controller::model::{ModelOptions, RejectionSink, Snapshot, SnapshotRx};
use ambit_controller::sources::kube::KubeSource;
use ambit_e2e::kube::{skip_without_kube, KubeCluster};

const NS: &str = "mesh";
const WEB: &str = "mesh/web.mesh.svc.cluster.local";

const OBJECTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: mesh}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh, labels: {istio.io/use-waypoint: waypoint}}
spec: {ports: [{name: http, port: 80}, {name: grpc, port: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: mesh}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules: [{matches: [{path: {type: PathPrefix, value: /v2}}], backendRefs: [{name: web-v2, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: web-grpc, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 9000}]
  rules: [{matches: [{method: {service: echo.Echo, method: Say}}], backendRefs: [{name: web, port: 9000}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-waypoint, namespace: mesh}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom, namespace: mesh}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: ext}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: mesh}
spec:
  rules: [{from: [{source: {namespaces: [mesh]}}]}]
"#;

/// A consumer route in `client` on `web` (port 80) sending to `web-v2` of `mesh`, and the grant that permits it.
const CROSS_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cross, namespace: client}
spec:
  parentRefs: [{group: "", kind: Service, name: web, namespace: mesh, port: 80}]
  rules: [{backendRefs: [{name: web-v2, namespace: mesh, port: 80}]}]
"#;
const GRANT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: client-routes, namespace: mesh}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: client}]
  to: [{group: "", kind: Service, name: web-v2}]
"#;

async fn wait_for(rx: &mut SnapshotRx, what: &str, f: impl Fn(&Snapshot) -> bool) {
    let found = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| f(s))).await.is_ok();
    assert!(found, "no snapshot where {what} within 30 s; last: {:#?}", rx.borrow());
}

/// Polls `f` (a kubectl read) until it says what `ok` wants.
async fn wait_text(what: &str, f: impl Fn() -> String, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = f();
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v:?} after 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_targeted_policies_reach_the_waypoint_config_with_true_status() {
    let cluster = match KubeCluster::start("kube-waypoint-config") {
        Ok(c) => c,
        Err(e) if skip_without_kube("kube_waypoint_config", &e) => return,
        Err(e) => panic!("{e:#}"),
    };
    cluster.apply(include_str!("../testdata/crds.yaml")).unwrap();
    let gateway_api = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/gateway-api/crds.yaml");
    cluster.kubectl(["apply", "--server-side", "-f", gateway_api]).unwrap();
    cluster
        .wait_established(&[
            "crd/authorizationpolicies.security.istio.io",
            "crd/httproutes.gateway.networking.k8s.io",
            "crd/grpcroutes.gateway.networking.k8s.io",
            "crd/gateways.gateway.networking.k8s.io",
            "crd/referencegrants.gateway.networking.k8s.io",
        ])
        .unwrap();
    cluster.kubectl(["create", "namespace", NS]).unwrap();
    cluster.kubectl(["label", "namespace", NS, "istio.io/dataplane-mode=ambient"]).unwrap();
    cluster.apply_retrying(OBJECTS);

    let sink: RejectionSink = Arc::new(|_: &[ambit_controller::model::Rejection]| {});
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let source = tokio::spawn(KubeSource::new(cluster.client().await.unwrap(), ModelOptions::default()).run(tx, sink));
    wait_for(&mut rx, "web's routes", |s| {
        s.service_routes.get(WEB).is_some_and(|r| r.ports.iter().all(|p| p.routes.len() == 1))
    })
    .await;
    {
        let s = rx.borrow();
        let web = &s.service_routes[WEB];
        let route_names: Vec<_> =
            web.ports.iter().map(|p| p.routes[0].origin.as_ref().unwrap().name.as_str()).collect();
        assert_eq!(route_names, ["web", "web-grpc"]);
        assert!(web.ports[0].routes[0].origin.as_ref().unwrap().creation_timestamp > 0, "from the API server");
        assert_eq!(s.authorizations.keys().collect::<Vec<_>>(), ["mesh/l4"], "ztunnel: the L4 policy only");
        assert_eq!(s.waypoint_policies.keys().collect::<Vec<_>>(), ["mesh/at-waypoint"]);
        let scope = &s.waypoints[&(NS.to_owned(), "waypoint".to_owned())];
        assert!(scope.addresses.contains("mesh/web-v2.mesh.svc.cluster.local"), "{scope:?}");
    }

    // Status: the Service parents accepted (a waypoint routes them), the policies say where they went.
    let parent = |kind: &str, name: &str| {
        let path = "jsonpath={range .status.parents[*].conditions[?(@.type==\"Accepted\")]}{.status}|{.reason}{end}";
        cluster.kubectl(["-n", NS, "get", kind, name, "-o", path]).unwrap()
    };
    wait_text("HTTPRoute web Accepted", || parent("httproute", "web"), |c| c == "True|Accepted").await;
    wait_text("GRPCRoute web-grpc Accepted", || parent("grpcroute", "web-grpc"), |c| c == "True|Accepted").await;
    let cond = |name: &str| cluster.policy_condition(NS, name, "WaypointAccepted").unwrap();
    let c = wait_text("at-waypoint", || cond("at-waypoint"), |c| c.starts_with("True|Accepted|")).await;
    assert!(c.contains("mesh/waypoint"), "{c}");
    wait_text("custom", || cond("custom"), |c| c.starts_with("False|UnsupportedValue|")).await;
    assert_eq!(cluster.policy_condition(NS, "at-waypoint", "ZtunnelAccepted").unwrap(), "");

    // A consumer route from namespace `client` to web-v2 of `mesh`: refused until a ReferenceGrant in `mesh` opens
    // web-v2 to it, refused again once the grant is deleted.
    cluster.kubectl(["create", "namespace", "client"]).unwrap();
    cluster.apply_retrying(CROSS_ROUTE);
    let cross_backend = |s: &Snapshot| {
        let port80 = s.service_routes.get(WEB).map(|r| &r.ports[0])?;
        let route = port80.routes.iter().find(|r| r.origin.as_ref().is_some_and(|o| o.namespace == "client"))?;
        route.rules[0].backends[0].kind.clone()
    };
    let resolved = |s: &Snapshot| matches!(cross_backend(s), Some(backend::Kind::Service(b)) if b.namespace == NS);
    let refused =
        |s: &Snapshot| matches!(cross_backend(s), Some(backend::Kind::Invalid(why)) if why.contains("RefNotPermitted"));
    wait_for(&mut rx, "the cross-namespace backend refused", refused).await;
    let refs = || {
        let path =
            "jsonpath={range .status.parents[*].conditions[?(@.type==\"ResolvedRefs\")]}{.status}|{.reason}{end}";
        cluster.kubectl(["-n", "client", "get", "httproute", "cross", "-o", path]).unwrap()
    };
    wait_text("cross RefNotPermitted", refs, |c| c == "False|RefNotPermitted").await;
    cluster.apply_retrying(GRANT);
    wait_for(&mut rx, "the granted backend resolved", resolved).await;
    wait_text("cross ResolvedRefs", refs, |c| c == "True|ResolvedRefs").await;
    cluster.kubectl(["-n", NS, "delete", "referencegrant", "client-routes"]).unwrap();
    wait_for(&mut rx, "the grant revoked", refused).await;
    wait_text("cross RefNotPermitted again", refs, |c| c == "False|RefNotPermitted").await;

    // The Service loses its waypoint: no more routes for it, and the route's status says why.
    cluster.kubectl(["-n", NS, "label", "service", "web", "istio.io/use-waypoint-"]).unwrap();
    wait_for(&mut rx, "web's routes are withdrawn", |s| !s.service_routes.contains_key(WEB)).await;
    wait_text("HTTPRoute web not accepted", || parent("httproute", "web"), |c| c == "False|UnsupportedValue").await;
    source.abort();

    // A waypoint's own token (audience ambit-ca) makes it a workload caller: its identity, no node.
    cluster.kubectl(["-n", NS, "create", "serviceaccount", "waypoint"]).unwrap();
    let token = cluster.create_token(NS, "waypoint", &["--audience", "ambit-ca"]).unwrap();
    let auth = TokenReviewAuthenticator::new(cluster.client().await.unwrap());
    assert_eq!(auth.review(&token).await.unwrap(), Caller::workload(NS, "waypoint"));
    let wrong = cluster.create_token(NS, "waypoint", &["--audience", "other"]).unwrap();
    assert_eq!(auth.review(&wrong).await.unwrap_err().code(), tonic::Code::Unauthenticated);
}
