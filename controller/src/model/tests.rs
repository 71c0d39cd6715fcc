//! Whole-model tests: the example cluster of `e2e/testdata/cluster/` field by
//! field, enrollment, rejections, L7 rules, mTLS modes, EndpointSlices.

use std::collections::BTreeSet;
use std::path::Path;

use ambit_api::security::{string_match::MatchType, Action, Scope};
use ambit_api::workload::{gateway_address, Port, Service, TunnelProtocol, Workload, WorkloadStatus, WorkloadType};

use super::*;

fn objects_of(text: &str) -> ClusterObjects {
    let (parsed, rejections) = parse_documents(text, "test.yaml");
    assert!(rejections.is_empty(), "test YAML must parse: {rejections:?}");
    let mut objects = ClusterObjects::default();
    for o in parsed {
        assert!(objects.insert(o));
    }
    objects
}

fn example_objects() -> ClusterObjects {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/testdata/cluster");
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    let text: Vec<String> = names.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
    objects_of(&text.join("\n---\n"))
}

fn workload<'a>(s: &'a Snapshot, ns: &str, name: &str) -> &'a Workload {
    match s.addresses.get(&format!("Kubernetes//Pod/{ns}/{name}")).and_then(|a| a.r#type.as_ref()) {
        Some(address::Type::Workload(w)) => w,
        other => panic!("no workload {ns}/{name}: {other:?}"),
    }
}

fn service<'a>(s: &'a Snapshot, key: &str) -> &'a Service {
    match s.addresses.get(key).and_then(|a| a.r#type.as_ref()) {
        Some(address::Type::Service(svc)) => svc,
        other => panic!("no service {key}: {other:?}"),
    }
}

fn port(service_port: u32, target_port: u32) -> Port {
    Port { service_port, target_port }
}

fn build_ok(objects: &ClusterObjects) -> BuildReport {
    let r = build_report(objects, &ModelOptions::default(), 1);
    assert!(r.rejections.is_empty(), "{:?}", r.rejections);
    r
}

const AMBIENT_NS: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n---\n";

fn pod(ns: &str, name: &str, ip: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec: {{nodeName: node1, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n---\n"
    )
}

#[test]
fn example_cluster_workloads_have_every_field() {
    let r = build_ok(&example_objects());
    let s = &r.snapshot;
    assert_eq!(s.version, 1);
    let w = workload(s, "default", "server-0");
    assert_eq!(w.uid, "Kubernetes//Pod/default/server-0");
    assert_eq!((w.name.as_str(), w.namespace.as_str()), ("server-0", "default"));
    assert_eq!(w.addresses, vec![vec![10, 2, 0, 2]]);
    assert_eq!(w.node, "node2");
    assert_eq!(w.service_account, "server");
    assert_eq!(w.trust_domain, "cluster.local");
    assert_eq!(w.tunnel_protocol(), TunnelProtocol::Hbone);
    assert_eq!(w.status(), WorkloadStatus::Healthy);
    assert_eq!(w.canonical_name, "server");
    assert_eq!(w.canonical_revision, "v1");
    assert_eq!(w.workload_name, "server-0");
    assert_eq!(w.workload_type(), WorkloadType::Pod);
    assert_eq!(w.cluster_id, "Kubernetes");
    assert_eq!(w.waypoint, None, "the waypoint is for services only");
    let svc_ports = &w.services["default/server.default.svc.cluster.local"].ports;
    assert_eq!(svc_ports, &vec![port(80, 8080), port(9090, 9090)], "named target port resolved");
    assert_eq!(w.authorization_policies, vec!["default/allow-client"]);

    let w1 = workload(s, "default", "server-1");
    assert_eq!(w1.status(), WorkloadStatus::Unhealthy);
    assert_eq!(w1.node, "node1");
    let client = workload(s, "default", "client");
    assert!(client.services.is_empty());
    assert!(client.authorization_policies.is_empty());
    assert_eq!(client.canonical_name, "client");
    assert_eq!(client.canonical_revision, "latest");
}

#[test]
fn example_cluster_enrollment_follows_namespace_and_pod_labels() {
    let s = build_ok(&example_objects()).snapshot;
    assert_eq!(workload(&s, "default", "optout").tunnel_protocol(), TunnelProtocol::None);
    assert_eq!(workload(&s, "default", "optout").service_account, "default");
    assert_eq!(workload(&s, "legacy", "old").tunnel_protocol(), TunnelProtocol::None);
    assert!(!s.addresses.contains_key("Kubernetes//Pod/default/pending"), "unscheduled pods are skipped");
    let ids = |pairs: &[(&str, &str)]| -> BTreeSet<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    };
    assert_eq!(s.identities_by_node.len(), 2);
    assert_eq!(s.identities_by_node["node1"], ids(&[("default", "client"), ("default", "server")]));
    assert_eq!(s.identities_by_node["node2"], ids(&[("default", "server")]), "opted-out pods hold no identity");
    assert_eq!(s.addresses.len(), 5 + 2, "five workloads and two services");
}

#[test]
fn example_cluster_services_have_every_field() {
    let s = build_ok(&example_objects()).snapshot;
    let svc = service(&s, "default/server.default.svc.cluster.local");
    assert_eq!((svc.name.as_str(), svc.namespace.as_str()), ("server", "default"));
    assert_eq!(svc.hostname, "server.default.svc.cluster.local");
    assert_eq!(svc.addresses.len(), 1);
    assert_eq!(svc.addresses[0].address, vec![10, 96, 0, 10]);
    assert_eq!(svc.addresses[0].network, "");
    assert_eq!(svc.ports, vec![port(80, 0), port(9090, 9090)], "a named target port is resolved per pod");
    let wp = svc.waypoint.as_ref().expect("server uses the waypoint");
    assert_eq!(wp.hbone_mtls_port, 15008);
    let Some(gateway_address::Destination::Hostname(h)) = &wp.destination else { panic!("{wp:?}") };
    assert_eq!((h.namespace.as_str(), h.hostname.as_str()), ("default", "waypoint.default.svc.cluster.local"));

    let old = service(&s, "legacy/old.legacy.svc.cluster.local");
    assert_eq!(old.ports, vec![port(8080, 8080)], "targetPort defaults to port");
    assert_eq!(old.waypoint, None);
    let w = workload(&s, "legacy", "old");
    assert_eq!(w.services["legacy/old.legacy.svc.cluster.local"].ports, vec![port(8080, 8080)]);
    let waypoints = waypoints(&example_objects(), "cluster.local");
    assert_eq!(waypoints.len(), 1);
    assert_eq!((waypoints[0].name.as_str(), waypoints[0].class.as_str()), ("waypoint", "istio-waypoint"));
}

#[test]
fn example_cluster_policies_have_every_field() {
    let s = build_ok(&example_objects()).snapshot;
    assert_eq!(
        s.authorizations.keys().collect::<Vec<_>>(),
        vec!["default/allow-client", "default/istio_converted_static_strict"]
    );
    let a = &s.authorizations["default/allow-client"];
    assert_eq!((a.name.as_str(), a.namespace.as_str()), ("allow-client", "default"));
    assert_eq!((a.scope(), a.action()), (Scope::WorkloadSelector, Action::Allow));
    assert_eq!(a.rules.len(), 1);
    let c = &a.rules[0].clauses;
    assert_eq!(c.len(), 2);
    assert_eq!(
        c[0].matches[0].principals[0].match_type,
        Some(MatchType::Exact("cluster.local/ns/default/sa/client".into()))
    );
    assert_eq!(c[1].matches[0].destination_ports, vec![8080]);
    let strict = &s.authorizations["default/istio_converted_static_strict"];
    assert_eq!((strict.scope(), strict.action()), (Scope::Namespace, Action::Deny));
    assert_eq!(strict.rules[0].clauses[0].matches[0].not_principals[0].match_type, Some(MatchType::Presence(())));
}

#[test]
fn pod_opt_out_and_non_ambient_namespace_are_not_captured() {
    let text = format!(
        "{AMBIENT_NS}{}{}{}",
        pod("default", "in", "10.0.0.1", "app: a"),
        pod("default", "out", "10.0.0.2", "istio.io/dataplane-mode: none"),
        pod("unlabelled", "plain", "10.0.0.3", "app: a"),
    );
    let s = build_ok(&objects_of(&text)).snapshot;
    assert_eq!(workload(&s, "default", "in").tunnel_protocol(), TunnelProtocol::Hbone);
    assert_eq!(workload(&s, "default", "out").tunnel_protocol(), TunnelProtocol::None);
    assert_eq!(workload(&s, "unlabelled", "plain").tunnel_protocol(), TunnelProtocol::None);
    assert_eq!(s.identities_by_node["node1"].len(), 1);
}

fn rejections_of(text: &str) -> Vec<Rejection> {
    build_report(&objects_of(text), &ModelOptions::default(), 1).rejections
}

fn assert_rejected(text: &str, kind: &str, name: &str, reason: &str) {
    let r = rejections_of(text);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!((r[0].kind.as_str(), r[0].name.as_str()), (kind, name), "{r:?}");
    assert!(r[0].reason.contains(reason), "want {reason:?} in {:?}", r[0].reason);
}

#[test]
fn duplicate_pod_ip_rejects_the_later_pod_and_keeps_the_first() {
    let text = format!("{}{}", pod("default", "b", "10.0.0.1", ""), pod("default", "a", "10.0.0.1", ""));
    assert_rejected(&text, "Pod", "b", "duplicate pod IP 10.0.0.1");
    let s = build_report(&objects_of(&text), &ModelOptions::default(), 1).snapshot;
    assert!(s.addresses.contains_key("Kubernetes//Pod/default/a"));
    assert!(!s.addresses.contains_key("Kubernetes//Pod/default/b"));
}

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: default}\nspec:\n";

#[test]
fn service_port_out_of_range_and_bad_selector_are_rejected_one_by_one() {
    let good = format!("{SVC}  clusterIP: 10.96.0.1\n  ports: [{{port: 80}}]\n---\n");
    let bad_port = format!("{}  ports: [{{port: 70000}}]\n---\n", SVC.replace("name: s,", "name: p,"));
    let bad_target = format!("{}  ports: [{{port: 80, targetPort: 0}}]\n---\n", SVC.replace("name: s,", "name: t,"));
    let bad_sel = format!("{}  selector: {{app: 'a b'}}\n---\n", SVC.replace("name: s,", "name: u,"));
    let text = format!("{good}{bad_port}{bad_target}{bad_sel}");
    let report = build_report(&objects_of(&text), &ModelOptions::default(), 1);
    let reasons: Vec<(&str, &str)> = report.rejections.iter().map(|r| (r.name.as_str(), r.reason.as_str())).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].0 == "p" && reasons[0].1.contains("port 70000 out of range"), "{reasons:?}");
    assert!(reasons[1].0 == "t" && reasons[1].1.contains("targetPort 0"), "{reasons:?}");
    assert!(reasons[2].0 == "u" && reasons[2].1.contains("bad selector"), "{reasons:?}");
    assert!(report.snapshot.addresses.contains_key("default/s.default.svc.cluster.local"), "the good one stays");
}

#[test]
fn duplicate_cluster_ip_rejects_the_later_service() {
    let a = format!("{}  clusterIP: 10.96.0.1\n---\n", SVC.replace("name: s,", "name: a,"));
    let b = format!("{}  clusterIP: 10.96.0.1\n---\n", SVC.replace("name: s,", "name: b,"));
    assert_rejected(&format!("{a}{b}"), "Service", "b", "duplicate clusterIP");
}

const AP: &str =
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: default}\nspec:\n";

#[test]
fn policy_with_bad_selector_or_ip_block_is_rejected_and_others_kept() {
    let bad_sel = format!("{AP}  selector: {{matchLabels: {{app: '*'}}}}\n---\n");
    assert_rejected(&bad_sel, "AuthorizationPolicy", "p", "bad selector");
    let bad_ip = format!("{AP}  rules: [{{from: [{{source: {{ipBlocks: [10.0.0.0/40]}}}}]}}]\n---\n");
    assert_rejected(&bad_ip, "AuthorizationPolicy", "p", "bad ipBlock");
    let bad_port = format!("{AP}  rules: [{{to: [{{operation: {{ports: ['0']}}}}]}}]\n---\n");
    assert_rejected(&bad_port, "AuthorizationPolicy", "p", "bad port");
    let good = AP.replace("name: p,", "name: q,");
    let report = build_report(&objects_of(&format!("{bad_ip}{good}")), &ModelOptions::default(), 1);
    assert_eq!(report.snapshot.authorizations.keys().collect::<Vec<_>>(), vec!["default/q"]);
}

#[test]
fn unknown_action_or_mode_is_rejected_when_parsed() {
    let text = format!(
        "{AP}  action: MAYBE\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa, namespace: default}}\nspec: {{mtls: {{mode: SOMETIMES}}}}\n"
    );
    let (objects, rejections) = parse_documents(&text, "x.yaml");
    assert!(objects.is_empty());
    let names: Vec<_> = rejections.iter().map(|r| (r.kind.as_str(), r.name.as_str())).collect();
    assert_eq!(names, vec![("AuthorizationPolicy", "p"), ("PeerAuthentication", "pa")]);
    assert!(rejections[0].reason.contains("MAYBE") && rejections[1].reason.contains("SOMETIMES"));
}

#[test]
fn selector_policies_are_listed_on_selected_workloads_and_root_selectors_reach_every_namespace() {
    let text = format!(
        "{AMBIENT_NS}{}{}{}{}---\n{}",
        pod("default", "a", "10.0.0.1", "app: a"),
        pod("default", "b", "10.0.0.2", "app: b"),
        pod("other", "c", "10.0.0.3", "app: a"),
        AP.to_owned() + "  selector: {matchLabels: {app: a}}\n",
        AP.replace("name: p, namespace: default", "name: mesh, namespace: ambit-system")
            + "  selector: {matchLabels: {app: a}}\n",
    );
    let s = build_ok(&objects_of(&text)).snapshot;
    assert_eq!(workload(&s, "default", "a").authorization_policies, vec!["ambit-system/mesh", "default/p"]);
    assert!(workload(&s, "default", "b").authorization_policies.is_empty());
    assert_eq!(workload(&s, "other", "c").authorization_policies, vec!["ambit-system/mesh"]);
}

#[test]
fn l7_rules_are_warnings_not_rejections() {
    let allow = format!("{AP}  rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]\n");
    let r = build_report(&objects_of(&allow), &ModelOptions::default(), 1);
    assert!(r.rejections.is_empty());
    assert_eq!(r.warnings.len(), 1);
    assert_eq!((r.warnings[0].kind.as_str(), r.warnings[0].name.as_str()), ("AuthorizationPolicy", "p"));
    assert!(r.snapshot.authorizations["default/p"].rules.is_empty(), "the ALLOW now matches nothing");
    let deny = format!("{AP}  action: DENY\n  rules: [{{from: [{{source: {{namespaces: [x]}}}}], to: [{{operation: {{paths: [/a]}}}}]}}]\n");
    let r = build_report(&objects_of(&deny), &ModelOptions::default(), 1);
    assert_eq!(r.warnings.len(), 1);
    assert_eq!(r.snapshot.authorizations["default/p"].rules[0].clauses.len(), 1, "only the L4 clause is left");
}

fn peer_auth(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n")
}

#[test]
fn mesh_wide_strict_applies_to_namespaces_with_workloads_unless_overridden() {
    let text = format!(
        "{}{}{}{}{}",
        pod("a", "p1", "10.0.0.1", ""),
        pod("b", "p2", "10.0.0.2", ""),
        pod("c", "p3", "10.0.0.3", ""),
        peer_auth("ambit-system", "mesh", "{mtls: {mode: STRICT}}"),
        peer_auth("b", "relaxed", "{mtls: {mode: PERMISSIVE}}"),
    );
    let s = build_ok(&objects_of(&text)).snapshot;
    let strict: Vec<_> = s.authorizations.keys().cloned().collect();
    assert_eq!(
        strict,
        vec![
            "a/istio_converted_static_strict",
            "ambit-system/istio_converted_static_strict",
            "c/istio_converted_static_strict"
        ]
    );
}

#[test]
fn selector_peer_authentication_is_listed_on_its_workloads() {
    let text = format!(
        "{}{}{}",
        pod("default", "web", "10.0.0.1", "app: web"),
        pod("default", "db", "10.0.0.2", "app: db"),
        peer_auth("default", "web-strict", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}"),
    );
    let s = build_ok(&objects_of(&text)).snapshot;
    let a = &s.authorizations["default/istio_converted_web-strict"];
    assert_eq!((a.scope(), a.action()), (Scope::WorkloadSelector, Action::Deny));
    assert_eq!(workload(&s, "default", "web").authorization_policies, vec!["default/istio_converted_web-strict"]);
    assert!(workload(&s, "default", "db").authorization_policies.is_empty());
}

#[test]
fn peer_authentication_rejections_are_reported() {
    let text = format!(
        "{}{}{}",
        peer_auth("default", "a", "{mtls: {mode: STRICT}}"),
        peer_auth("default", "b", "{mtls: {mode: STRICT}}"),
        peer_auth("default", "c", "{selector: {matchLabels: {'a b': x}}, mtls: {mode: STRICT}}"),
    );
    let r = rejections_of(&text);
    let names: Vec<_> = r.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["b", "c"], "{r:?}");
}

#[test]
fn endpoint_slices_define_endpoints_instead_of_the_selector() {
    let text = format!(
        "{}{}{SVC}  clusterIP: 10.96.0.1\n  selector: {{app: a}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n---\n{}",
        pod("default", "sel", "10.0.0.1", "app: a"),
        pod("default", "listed", "10.0.0.2", "app: b"),
        r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-abc, namespace: default, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{name: http, port: 8081}]
endpoints: [{addresses: [10.0.0.2]}, {addresses: [10.9.9.9]}]
"#
    );
    let s = build_ok(&objects_of(&text)).snapshot;
    let key = "default/s.default.svc.cluster.local";
    assert!(workload(&s, "default", "sel").services.is_empty(), "slices replace the selector");
    assert_eq!(workload(&s, "default", "listed").services[key].ports, vec![port(80, 8081)]);
}

#[test]
fn unresolvable_named_target_port_leaves_the_pod_out() {
    let text = format!(
        "{}{SVC}  selector: {{app: a}}\n  ports: [{{port: 80, targetPort: web}}]\n",
        pod("default", "a", "10.0.0.1", "app: a"),
    );
    let s = build_ok(&objects_of(&text)).snapshot;
    assert!(workload(&s, "default", "a").services.is_empty());
}

#[test]
fn missing_waypoint_is_a_warning_and_traffic_goes_direct() {
    let text = format!(
        "{}  clusterIP: 10.96.0.1\n",
        SVC.replace("namespace: default}", "namespace: default, labels: {istio.io/use-waypoint: gone}}")
    );
    let r = build_ok(&objects_of(&text));
    assert_eq!(r.warnings.len(), 1);
    assert!(r.warnings[0].reason.contains("default/gone"));
    assert_eq!(service(&r.snapshot, "default/s.default.svc.cluster.local").waypoint, None);
}

#[test]
fn same_objects_give_the_same_content_and_a_change_differs() {
    let objects = example_objects();
    let a = build(&objects, &ModelOptions::default(), 1).0;
    let b = build(&objects, &ModelOptions::default(), 2).0;
    assert!(a.same_content(&b));
    assert_ne!(a, b, "versions differ");
    let mut changed = objects.clone();
    changed.pods.retain(|k, _| k.1 != "client");
    assert!(!a.same_content(&build(&changed, &ModelOptions::default(), 2).0));
}

/// Scale check (the issue's benchmark size); prints the time, asserts only the counts.
#[test]
fn ten_thousand_pods_thousand_services_and_five_hundred_policies_build() {
    let mut text = String::from(AMBIENT_NS);
    for i in 0..10_000u32 {
        let ip = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        text += &pod("default", &format!("p{i}"), &ip, &format!("app: app{}, tier: t{}", i % 1000, i % 7));
    }
    for i in 0..1000u32 {
        text += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec: {{clusterIP: 10.96.{}.{}, selector: {{app: app{i}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n",
            i >> 8,
            i & 255
        );
    }
    for i in 0..500u32 {
        text += &format!("{}  selector: {{matchLabels: {{app: app{i}, tier: t{}}}}}\n  rules: [{{from: [{{source: {{namespaces: [n{i}]}}}}]}}]\n---\n", AP.replace("name: p,", &format!("name: p{i},")), i % 7);
    }
    let start = std::time::Instant::now();
    let objects = objects_of(&text);
    println!("parsed {} bytes of YAML in {:?}", text.len(), start.elapsed());
    let start = std::time::Instant::now();
    let s = build_ok(&objects).snapshot;
    println!("built 10000 pods, 1000 services, 500 policies in {:?}", start.elapsed());
    assert_eq!(s.addresses.len(), 11_000);
    assert_eq!(s.authorizations.len(), 500);
}
