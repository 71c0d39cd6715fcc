//! Tests of the local state file (kept apart to keep `file.rs` short).

use super::*;
use crate::state::{ConnectionAttributes, STATIC_STRICT_POLICY};
use ambit_identity::Identity;

/// The example in this module's docs, extracted so that the docs stay valid.
fn doc_example() -> String {
    let src = include_str!("file.rs");
    let block = src.split("//! ```yaml\n").nth(1).and_then(|s| s.split("//! ```").next()).unwrap();
    block.lines().map(|l| l.strip_prefix("//! ").unwrap_or(l.trim_start_matches("//!"))).collect::<Vec<_>>().join("\n")
}

fn opts() -> LoadOptions {
    LoadOptions::default()
}

#[test]
fn the_documented_example_parses_with_every_field() {
    let yaml = doc_example();
    assert_eq!(yaml.trim(), include_str!("../../tests/data/state-example.yaml").trim(), "tests/data copy is stale");
    let st = parse_local_config(&yaml, &opts()).unwrap();

    let w = st.workload_by_ip("10.1.0.2".parse().unwrap()).unwrap();
    assert_eq!(w.uid, "lab/Pod/default/client");
    assert_eq!((w.name.as_str(), w.namespace.as_str(), w.node.as_str()), ("client", "default", "node1"));
    assert_eq!(w.protocol, TunnelProtocol::Hbone);
    assert_eq!(w.status, HealthStatus::Healthy);
    assert_eq!(w.canonical_name, "client");
    assert_eq!((w.canonical_revision.as_str(), w.workload_name.as_str()), ("v1", "client"));
    assert_eq!((w.workload_type, w.cluster_id.as_str()), (WorkloadType::Deployment, "Kubernetes"));
    assert_eq!(
        w.identity(),
        Identity {
            trust_domain: "cluster.local".into(),
            namespace: "default".into(),
            service_account: "client".into(),
        }
    );
    assert_eq!(
        w.services["default/echo.default.svc.cluster.local"],
        vec![PortMapping { service_port: 80, target_port: 8080 }]
    );
    assert_eq!(w.authorization_policies, vec!["default/allow-client".to_owned()]);

    let s = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
    assert_eq!(s.hostname, "echo.default.svc.cluster.local");
    assert_eq!(s.load_balancer, LoadBalancer::RoundRobin);
    assert_eq!(st.endpoints("default/echo.default.svc.cluster.local").count(), 1);

    let p = st.policy("default/allow-client").unwrap();
    assert_eq!((p.scope, p.action), (Scope::WorkloadSelector, Action::Allow));
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(m.principals, vec![StringMatch::Exact("cluster.local/ns/default/sa/client".into())]);
    let client = ServiceAccountMatch { namespace: "default".into(), service_account: "client".into() };
    assert_eq!((m.service_accounts.as_slice(), m.not_service_accounts.as_slice()), (&[client][..], &[][..]));
    assert_eq!(m.namespaces, vec![StringMatch::Prefix("team-".into())]);
    assert_eq!(m.not_principals, vec![StringMatch::Presence]);
    assert_eq!(m.not_namespaces, vec![StringMatch::Suffix("-dev".into())]);
    assert_eq!(m.source_ips, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    assert_eq!(m.destination_ips, vec!["10.1.0.3/32".parse::<IpNet>().unwrap()]);
    assert_eq!(m.not_source_ips, vec!["10.9.0.0/16".parse::<IpNet>().unwrap()]);
    assert_eq!((m.destination_ports.as_slice(), m.not_destination_ports.as_slice()), (&[8080][..], &[15000][..]));

    let strict = st.policy(&format!("default/{STATIC_STRICT_POLICY}")).unwrap();
    assert_eq!((strict.scope, strict.action), (Scope::Namespace, Action::Deny));
}

#[test]
fn omitted_fields_take_their_defaults() {
    let yaml = "
workloads:
- uid: u1
  namespace: ns
  addresses: [10.0.0.1]
services:
- {name: s, namespace: ns, hostname: s.ns, addresses: [10.96.0.1], ports: [{servicePort: 80}]}
";
    let o = LoadOptions { default_trust_domain: "example.org".into(), root_namespace: "root".into() };
    let st = parse_local_config(yaml, &o).unwrap();
    let w = st.workload_by_uid("u1").unwrap();
    assert_eq!((w.protocol, w.status), (TunnelProtocol::None, HealthStatus::Healthy));
    assert_eq!((w.trust_domain.as_str(), w.service_account.as_str()), ("example.org", "default"));
    let s = st.service_by_key("ns/s.ns").unwrap();
    assert_eq!(s.ports, vec![PortMapping { service_port: 80, target_port: 0 }]);
    assert_eq!(s.load_balancer, LoadBalancer::RoundRobin);
    assert_eq!(st.policies().count(), 0, "no PeerAuthentication means permissive: no generated policy");
    assert_eq!(parse_local_config("", &o).unwrap().workloads().count(), 0, "an empty file is an empty mesh");
}

#[test]
fn workload_types_are_istios_names_and_an_unknown_one_is_an_error() {
    let yaml = |t: &str| format!("workloads:\n- {{uid: u1, namespace: ns, workloadType: {t}}}\n");
    for (name, want) in [("pod", WorkloadType::Pod), ("cronjob", WorkloadType::CronJob), ("job", WorkloadType::Job)] {
        let st = parse_local_config(&yaml(name), &opts()).unwrap();
        assert_eq!(st.workload_by_uid("u1").unwrap().workload_type, want);
    }
    let err = parse_local_config(&yaml("daemonset"), &opts()).unwrap_err().to_string();
    assert!(err.contains("daemonset"), "{err}");
}

#[test]
fn an_unknown_field_is_an_error_with_its_line() {
    let yaml = "workloads:\n- uid: a\n  namespace: ns\n  colour: red\n";
    let err = parse_local_config(yaml, &opts()).unwrap_err().to_string();
    assert!(err.contains("unknown field `colour`"), "{err}");
    assert!(err.contains("line 4"), "{err}");
}

#[test]
fn a_string_match_must_name_exactly_one_known_kind() {
    let pol = |m: &str| {
        format!(
            "policies:\n- name: p\n  namespace: ns\n  rules: [{{clauses: [{{matches: [{{principals: [{m}]}}]}}]}}]\n"
        )
    };
    let err = parse_local_config(&pol("{exakt: a}"), &opts()).unwrap_err().to_string();
    assert!(err.contains("unknown variant `exakt`") && err.contains("line 4"), "{err}");
    assert!(parse_local_config(&pol("{exact: a, prefix: b}"), &opts()).is_err());
    assert!(parse_local_config(&pol("{suffix: a}"), &opts()).is_ok());
}

#[test]
fn an_ip_owned_by_two_workloads_is_an_error() {
    let yaml = "workloads:\n- {uid: a, addresses: [10.0.0.1]}\n- {uid: b, addresses: [10.0.0.1]}\n";
    let err = parse_local_config(yaml, &opts()).unwrap_err().to_string();
    assert_eq!(err, "address 10.0.0.1 is owned by both workload a and workload b");
}

#[test]
fn a_bad_cidr_is_an_error_naming_it_with_its_line() {
    let yaml = "policies:\n- name: p\n  namespace: ns\n  rules:\n  - clauses:\n    - matches:\n      - sourceIps: [10.0.0.0/33]\n";
    let err = parse_local_config(yaml, &opts()).unwrap_err().to_string();
    assert!(err.contains("bad CIDR \"10.0.0.0/33\""), "{err}");
    assert!(err.contains("line 7"), "{err}");
}

#[test]
fn port_zero_and_ports_above_65535_are_errors_naming_the_object() {
    let svc =
        |p: &str| format!("services:\n- {{name: s, namespace: ns, hostname: s.ns, ports: [{{servicePort: {p}}}]}}\n");
    let err = parse_local_config(&svc("0"), &opts()).unwrap_err().to_string();
    assert_eq!(err, "service ns/s.ns: servicePort 0 is not a port (1-65535)");
    let err = parse_local_config(&svc("70000"), &opts()).unwrap_err().to_string();
    assert_eq!(err, "service ns/s.ns: servicePort 70000 is not a port (1-65535)");
    let pol = "policies:\n- {name: p, namespace: ns, rules: [{clauses: [{matches: [{destinationPorts: [0]}]}]}]}\n";
    let err = parse_local_config(pol, &opts()).unwrap_err().to_string();
    assert_eq!(err, "policy ns/p: destinationPorts 0 is not a port (1-65535)");
}

#[test]
fn a_policy_referenced_by_a_workload_may_not_exist_yet() {
    let yaml = "workloads:\n- {uid: a, authorizationPolicies: [ns/later], services: {ns/gone.ns: []}}\n";
    let st = parse_local_config(yaml, &opts()).unwrap();
    let a = st.workload_by_uid("a").unwrap();
    let conn = ConnectionAttributes {
        src_identity: None,
        src_ip: "10.0.0.9".parse().unwrap(),
        dst_ip: "10.0.0.1".parse().unwrap(),
        dst_port: 80,
    };
    assert_eq!(st.authorize(&conn, a), Ok(()));
}

#[test]
fn mesh_strict_with_a_namespace_permissive_override_denies_plaintext_only_where_strict() {
    let yaml = "
workloads:
- {uid: s, namespace: secure, addresses: [10.0.0.1]}
- {uid: l, namespace: legacy, addresses: [10.0.0.2]}
peerAuthentications:
- {namespace: ambit-system, mode: STRICT}
- {namespace: legacy, mode: PERMISSIVE}
";
    let st = parse_local_config(yaml, &opts()).unwrap();
    let conn = |id: Option<Identity>, dst: &str| ConnectionAttributes {
        src_identity: id,
        src_ip: "10.0.0.9".parse().unwrap(),
        dst_ip: dst.parse().unwrap(),
        dst_port: 80,
    };
    let secure = st.workload_by_uid("s").unwrap();
    let legacy = st.workload_by_uid("l").unwrap();
    let denied = st.authorize(&conn(None, "10.0.0.1"), secure).unwrap_err();
    assert_eq!(denied.policy.as_deref(), Some("secure/istio_converted_static_strict"));
    assert_eq!(st.authorize(&conn(None, "10.0.0.2"), legacy), Ok(()));
    let peer = Identity { trust_domain: "cluster.local".into(), namespace: "x".into(), service_account: "y".into() };
    assert_eq!(st.authorize(&conn(Some(peer), "10.0.0.1"), secure), Ok(()));
}

#[test]
fn principals_work_with_or_without_the_scheme_and_service_accounts_pin_namespace_and_name() {
    let yaml = "
workloads:
- {uid: s, namespace: app, addresses: [10.0.0.1]}
policies:
- name: deny-old-form
  namespace: app
  action: Deny
  rules: [{clauses: [{matches: [{principals: [{exact: spiffe://cluster.local/ns/a/sa/old}]}]}]}]
- name: deny-istio-form
  namespace: app
  action: Deny
  rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/a/sa/new}]}]}]}]
- name: deny-by-account
  namespace: app
  action: Deny
  rules: [{clauses: [{matches: [{serviceAccounts: [{namespace: b, serviceAccount: x}]}]}]}]
";
    let st = parse_local_config(yaml, &opts()).unwrap();
    let s = st.workload_by_uid("s").unwrap();
    let from = |ns: &str, sa: &str| ConnectionAttributes {
        src_identity: Some(Identity {
            trust_domain: "cluster.local".into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }),
        src_ip: "10.0.0.9".parse().unwrap(),
        dst_ip: "10.0.0.1".parse().unwrap(),
        dst_port: 80,
    };
    let denied_by = |ns, sa| st.authorize(&from(ns, sa), s).err().and_then(|d| d.policy);
    assert_eq!(denied_by("a", "old").as_deref(), Some("app/deny-old-form"));
    assert_eq!(denied_by("a", "new").as_deref(), Some("app/deny-istio-form"));
    assert_eq!(denied_by("b", "x").as_deref(), Some("app/deny-by-account"));
    assert_eq!(denied_by("a", "x"), None);
    assert_eq!(denied_by("c", "x"), None);
}

/// A directory removed on drop, even when the test panics.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ambit-state-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn poll_reports_changes_only_and_recovers_after_a_broken_file() {
    let dir = TempDir::new("poll");
    let path = dir.0.join("state.yaml");
    let mut file = StateFile::new(&path, opts());
    assert!(matches!(file.poll(), Err(StateError::Read { .. })), "a missing file is a read error");

    std::fs::write(&path, "workloads:\n- {uid: a, addresses: [10.0.0.1]}\n").unwrap();
    let st = file.poll().unwrap().expect("first read loads");
    assert!(st.workload_by_uid("a").is_some());
    assert!(file.poll().unwrap().is_none(), "unchanged content is not reloaded");

    std::fs::write(&path, "workloads:\n- {uid: a, addresses: [10.0.0.1]\n").unwrap();
    assert!(matches!(file.poll(), Err(StateError::Parse(_))));
    assert!(file.poll().unwrap().is_none(), "the same broken content is reported once");

    std::fs::write(&path, "workloads:\n- {uid: b, addresses: [10.0.0.2]}\n").unwrap();
    let st = file.poll().unwrap().expect("fixed file loads");
    assert!(st.workload_by_uid("b").is_some());
    assert!(file.poll().unwrap().is_none());
}

#[test]
fn an_empty_file_is_an_error_and_an_explicit_empty_list_empties() {
    let dir = TempDir::new("poll-empty");
    let path = dir.0.join("state.yaml");
    let mut file = StateFile::new(&path, opts());
    for nothing in ["", "\n  \n", "# only a comment\n---\n"] {
        std::fs::write(&path, nothing).unwrap();
        let err = file.poll().unwrap_err();
        assert!(matches!(err, StateError::Empty { .. }), "{nothing:?}: {err}");
        assert!(err.to_string().contains("state.yaml"), "names the file: {err}");
    }
    std::fs::write(&path, "workloads: []\n").unwrap();
    assert_eq!(file.poll().unwrap().expect("an explicit empty list loads").workloads().count(), 0);
}

#[test]
fn waypoints_of_services_and_workloads_are_read_with_their_defaults() {
    let st = parse_local_config(&doc_example(), &opts()).unwrap();
    let s = st.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
    let wp = s.waypoint.as_ref().unwrap();
    assert_eq!(
        wp.destination,
        GatewayDestination::Hostname {
            namespace: "default".into(),
            hostname: "waypoint.default.svc.cluster.local".into()
        }
    );
    assert_eq!(wp.hbone_mtls_port, 15008);
    let w = st.workload_by_ip("10.1.0.2".parse().unwrap()).unwrap();
    let wp = w.waypoint.as_ref().unwrap();
    assert_eq!(wp.destination, GatewayDestination::Address { network: String::new(), ip: "10.1.0.9".parse().unwrap() });
    assert_eq!(wp.hbone_mtls_port, 15008);

    let yaml = "
workloads:
- {uid: u1, namespace: ns, addresses: [10.0.0.1], waypoint: {hostname: wp.ns.svc, hboneMtlsPort: 15009}}
- {uid: u2, namespace: ns, addresses: [10.0.0.2]}
";
    let st = parse_local_config(yaml, &opts()).unwrap();
    let wp = st.workload_by_uid("u1").unwrap().waypoint.clone().unwrap();
    assert_eq!(wp.destination, GatewayDestination::Hostname { namespace: "ns".into(), hostname: "wp.ns.svc".into() });
    assert_eq!(wp.hbone_mtls_port, 15009);
    assert_eq!(st.workload_by_uid("u2").unwrap().waypoint, None);
}

#[test]
fn a_waypoint_with_both_or_neither_address_and_hostname_or_port_zero_is_rejected() {
    for wp in ["{address: 10.0.0.9, hostname: wp.ns.svc}", "{hboneMtlsPort: 15008}"] {
        let yaml = format!("services:\n- {{name: s, namespace: ns, hostname: s.ns, waypoint: {wp}}}\n");
        let err = parse_local_config(&yaml, &opts()).unwrap_err();
        assert_eq!(err.to_string(), "service ns/s.ns: waypoint needs exactly one of address and hostname", "{wp}");
    }
    let yaml = "workloads:\n- {uid: u1, waypoint: {address: 10.0.0.9, hboneMtlsPort: 0}}\n";
    let err = parse_local_config(yaml, &opts()).unwrap_err();
    assert!(err.to_string().contains("waypoint.hboneMtlsPort 0 is not a port"), "{err}");
}
