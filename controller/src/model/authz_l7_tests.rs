use super::*;
use prost::Message;

fn policy(spec: &str) -> PolicyCrd {
    let text = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: mesh}}\nspec:\n{spec}"
    );
    serde_yaml::from_str(&text).unwrap()
}

fn m(kind: string_match::Kind) -> StringMatch {
    StringMatch { kind: Some(kind) }
}

fn exact(s: &str) -> StringMatch {
    m(string_match::Kind::Exact(s.into()))
}

#[test]
fn a_waypoint_policy_decodes_field_by_field_with_every_l7_attribute() {
    let p = policy(
        r#"  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  - {kind: Service, group: "", name: web}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["spiffe://cluster.local/ns/a/sa/b", "cluster.local/ns/c/*"]
        notPrincipals: ["*"]
        namespaces: [team-*]
        notNamespaces: [legacy]
        ipBlocks: [10.0.0.0/8]
        notIpBlocks: [10.1.2.3]
        remoteIpBlocks: [192.168.0.0/16]
        notRemoteIpBlocks: [192.168.1.1]
        requestPrincipals: ["*"]
        serviceAccounts: [other/sa1, bare]
    to:
    - operation: {hosts: ["*.example.com"], notHosts: [evil.example.com], ports: ["8080"], notPorts: ["9090"], methods: [GET, POST], notMethods: [DELETE], paths: ["/api/*", /exact], notPaths: ["*/admin"]}
    when:
    - {key: "request.headers[x-token]", values: [secret]}
    - {key: source.ip, notValues: [10.9.0.0/16]}
    - {key: "request.auth.claims[groups]", values: [admins]}
"#,
    );
    let c = convert(&p, "cluster.local").unwrap();
    assert_eq!(c.problem, None);
    let sent = c.policy.unwrap();
    let a = AuthorizationPolicy::decode(sent.encode_to_vec().as_slice()).unwrap();
    assert_eq!((a.namespace.as_str(), a.name.as_str(), a.action()), ("mesh", "p", Action::Deny));
    assert_eq!(
        a.targets.iter().map(|t| t.kind.clone().unwrap()).collect::<Vec<_>>(),
        [
            policy_target::Kind::Gateway(GatewayTarget { namespace: "mesh".into(), name: "waypoint".into() }),
            policy_target::Kind::Service(ServiceTarget {
                namespace: "mesh".into(),
                hostname: "web.mesh.svc.cluster.local".into()
            }),
        ]
    );
    let from = &a.rules[0].from[0];
    assert_eq!(
        from.principals,
        [exact("cluster.local/ns/a/sa/b"), m(string_match::Kind::Prefix("cluster.local/ns/c/".into()))],
        "as Istio writes them: no spiffe://"
    );
    assert_eq!(from.not_principals, [m(string_match::Kind::Presence(true))]);
    assert_eq!(from.namespaces, [m(string_match::Kind::Prefix("team-".into()))]);
    assert_eq!(from.not_namespaces, [exact("legacy")]);
    assert_eq!((from.ip_blocks[0].address.as_slice(), from.ip_blocks[0].length), ([10, 0, 0, 0].as_slice(), 8));
    assert_eq!(from.not_ip_blocks[0].length, 32);
    assert_eq!(from.remote_ip_blocks[0].length, 16);
    assert_eq!(from.not_remote_ip_blocks[0].address, [192, 168, 1, 1]);
    assert_eq!(from.request_principals, [m(string_match::Kind::Presence(true))]);
    let sa = |ns: &str, name: &str| ServiceAccount { namespace: ns.into(), name: name.into() };
    assert_eq!(from.service_accounts, [sa("other", "sa1"), sa("mesh", "bare")]);
    let to = &a.rules[0].to[0];
    assert_eq!(to.hosts, [m(string_match::Kind::Suffix(".example.com".into()))]);
    assert_eq!(to.not_hosts, [exact("evil.example.com")]);
    assert_eq!((to.ports.as_slice(), to.not_ports.as_slice()), ([8080].as_slice(), [9090].as_slice()));
    assert_eq!(to.methods, [exact("GET"), exact("POST")]);
    assert_eq!(to.not_methods, [exact("DELETE")]);
    assert_eq!(to.paths, [m(string_match::Kind::Prefix("/api/".into())), exact("/exact")]);
    assert_eq!(to.not_paths, [m(string_match::Kind::Suffix("/admin".into()))]);
    let when = &a.rules[0].when;
    assert_eq!(
        (when[0].key.as_str(), when[0].values.as_slice()),
        ("request.headers[x-token]", ["secret".to_owned()].as_slice())
    );
    assert_eq!(when[1].not_values, ["10.9.0.0/16"]);
    assert_eq!(when[2].key, "request.auth.claims[groups]", "kept, so the waypoint fails closed");
}

#[test]
fn custom_and_audit_are_not_sent_and_say_why() {
    for action in ["CUSTOM\n  provider: {name: ext}", "AUDIT"] {
        let c = convert(
            &policy(&format!(
                "  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: w}}]\n  action: {action}\n"
            )),
            "cluster.local",
        )
        .unwrap();
        assert_eq!(c.policy, None);
        assert!(c.problem.unwrap().contains("not supported by Ambit's waypoint"));
    }
}

#[test]
fn other_targets_are_ignored_with_a_note_and_bad_values_reject_the_policy() {
    let c = convert(
        &policy("  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}, {kind: Service, name: web, namespace: elsewhere}]\n"),
        "cluster.local",
    )
    .unwrap();
    assert!(c.policy.unwrap().targets.is_empty());
    assert!(c.problem.unwrap().contains("GatewayClass"));
    let t = "  targetRefs: [{kind: Service, name: web}]\n";
    for (rules, want) in [
        ("  rules: [{when: [{key: source.ip, values: [nope]}]}]\n", "bad ipBlock"),
        ("  rules: [{when: [{key: destination.port, values: ['0']}]}]\n", "bad port"),
        ("  rules: [{when: [{key: request.colour, values: [red]}]}]\n", "unknown condition key"),
        ("  rules: [{when: [{key: \"request.headers[]\", values: [x]}]}]\n", "unknown condition key"),
        ("  rules: [{when: [{key: source.ip}]}]\n", "neither values"),
        ("  rules: [{from: [{source: {remoteIpBlocks: [x]}}]}]\n", "bad ipBlock"),
    ] {
        let err = convert(&policy(&format!("{t}{rules}")), "cluster.local").unwrap_err().to_string();
        assert!(err.contains(want), "{rules}: {err}");
    }
}
