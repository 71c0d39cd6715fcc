use std::collections::BTreeMap;

use ambit_api::waypoint::{policy_target, string_match};
use http::Request;

use super::*;

const SCOPE: Scope<'static> = Scope { gateway_namespace: "ns", gateway_name: "waypoint", xff_trusted_hops: 0 };
const HOSTNAME: &str = "echo.ns.svc.cluster.local";
/// The peer of [`Req::new`], as Istio writes principals.
const CLIENT: &str = "cluster.local/ns/a/sa/b";

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

/// A request and what the proxy knows of it; [`Req::info`] lends it out.
struct Req {
    peer: Option<Identity>,
    peer_ip: IpAddr,
    destination_ip: Option<IpAddr>,
    hostname: &'static str,
    port: u16,
    parts: Parts,
}

impl Req {
    /// `GET /api/items?x=1`, Host `echo.ns.svc.cluster.local:8080`, from
    /// `cluster.local/ns/a/sa/b` at 10.1.0.2 to the VIP 10.96.0.10:8080.
    fn new() -> Req {
        Req::http("GET", "/api/items?x=1", &[("host", "echo.ns.svc.cluster.local:8080")])
    }

    fn http(method: &str, uri: &str, headers: &[(&str, &str)]) -> Req {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        Req {
            peer: Some(id("a", "b")),
            peer_ip: ip("10.1.0.2"),
            destination_ip: Some(ip("10.96.0.10")),
            hostname: HOSTNAME,
            port: 8080,
            parts: b.body(()).unwrap().into_parts().0,
        }
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Req {
        self.parts.headers.append(name, http::HeaderValue::from_static(value));
        self
    }

    fn peer(mut self, peer: Option<Identity>) -> Req {
        self.peer = peer;
        self
    }

    fn at(mut self, addr: &str) -> Req {
        self.peer_ip = ip(addr);
        self
    }

    fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            peer: self.peer.as_ref(),
            peer_ip: self.peer_ip,
            destination_ip: self.destination_ip,
            service_namespace: "ns",
            service_hostname: self.hostname,
            port: self.port,
            parts: Some(&self.parts),
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn decide(policies: &[pb::AuthorizationPolicy], r: &Req) -> Verdict {
    authorize(policies, &SCOPE, &r.info())
}

fn gateway(ns: &str, name: &str) -> pb::PolicyTarget {
    let g = pb::GatewayTarget { namespace: ns.into(), name: name.into() };
    pb::PolicyTarget { kind: Some(policy_target::Kind::Gateway(g)) }
}

fn service(ns: &str, hostname: &str) -> pb::PolicyTarget {
    let s = pb::ServiceTarget { namespace: ns.into(), hostname: hostname.into() };
    pb::PolicyTarget { kind: Some(policy_target::Kind::Service(s)) }
}

/// A policy `ns/<name>` on this waypoint's Gateway.
fn policy(name: &str, action: pb::Action, rules: Vec<pb::PolicyRule>) -> pb::AuthorizationPolicy {
    pb::AuthorizationPolicy {
        namespace: "ns".into(),
        name: name.into(),
        targets: vec![gateway("ns", "waypoint")],
        action: action as i32,
        rules,
        dry_run: false,
    }
}

fn allow(rules: Vec<pb::PolicyRule>) -> pb::AuthorizationPolicy {
    policy("allow", pb::Action::Allow, rules)
}

fn deny(rules: Vec<pb::PolicyRule>) -> pb::AuthorizationPolicy {
    policy("deny", pb::Action::Deny, rules)
}

fn from(s: pb::Source) -> pb::PolicyRule {
    pb::PolicyRule { from: vec![s], ..Default::default() }
}

fn to(o: pb::Operation) -> pb::PolicyRule {
    pb::PolicyRule { to: vec![o], ..Default::default() }
}

fn when(key: &str, values: &[&str], not_values: &[&str]) -> pb::PolicyRule {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    let c = pb::Condition { key: key.into(), values: strings(values), not_values: strings(not_values) };
    pb::PolicyRule { when: vec![c], ..Default::default() }
}

/// Whether an ALLOW policy of this one rule admits `r`.
fn allowed(rule: pb::PolicyRule, r: &Req) -> bool {
    decide(&[allow(vec![rule])], r).allowed
}

/// Whether a DENY policy of this one rule refuses `r`.
fn denied(rule: pb::PolicyRule, r: &Req) -> bool {
    !decide(&[deny(vec![rule])], r).allowed
}

fn m(kind: string_match::Kind) -> pb::StringMatch {
    pb::StringMatch { kind: Some(kind) }
}

fn exact(s: &str) -> pb::StringMatch {
    m(string_match::Kind::Exact(s.into()))
}

fn prefix(s: &str) -> pb::StringMatch {
    m(string_match::Kind::Prefix(s.into()))
}

fn suffix(s: &str) -> pb::StringMatch {
    m(string_match::Kind::Suffix(s.into()))
}

fn presence() -> pb::StringMatch {
    m(string_match::Kind::Presence(true))
}

/// `a.b.c.d/n` or `x::y/n`.
fn block(cidr: &str) -> pb::IpBlock {
    let (addr, len) = cidr.split_once('/').unwrap();
    let address = match ip(addr) {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    pb::IpBlock { address, length: len.parse().unwrap() }
}

fn rule_all() -> pb::PolicyRule {
    pb::PolicyRule::default()
}

#[test]
fn without_policies_a_request_is_allowed() {
    assert_eq!(decide(&[], &Req::new()), Verdict { allowed: true, policy: None, dry_run: vec![] });
    assert_eq!(DENIED_BODY, "RBAC: access denied");
}

#[test]
fn a_matching_deny_wins_over_a_matching_allow() {
    let d = deny(vec![from(pb::Source { principals: vec![exact(CLIENT)], ..Default::default() })]);
    let v = decide(&[allow(vec![rule_all()]), d.clone()], &Req::new());
    assert_eq!(v, Verdict { allowed: false, policy: Some("ns/deny".into()), dry_run: vec![] });
    // Order does not matter.
    assert!(!decide(&[d.clone(), allow(vec![rule_all()])], &Req::new()).allowed);
    // A DENY that does not match, and no ALLOW: allowed.
    assert!(decide(&[d], &Req::new().peer(Some(id("a", "other")))).allowed);
}

#[test]
fn allow_policies_that_apply_must_have_one_matching() {
    let only_post = allow(vec![to(pb::Operation { methods: vec![exact("POST")], ..Default::default() })]);
    assert_eq!(
        decide(std::slice::from_ref(&only_post), &Req::new()),
        Verdict { allowed: false, policy: None, dry_run: vec![] }
    );
    // Another ALLOW that matches is enough (policies are OR-ed).
    let get =
        policy("get", pb::Action::Allow, vec![to(pb::Operation { methods: vec![exact("GET")], ..Default::default() })]);
    assert!(decide(&[only_post, get], &Req::new()).allowed);
}

#[test]
fn an_empty_rule_matches_every_request_and_a_policy_without_rules_none() {
    let r = Req::new().peer(None);
    assert!(allowed(rule_all(), &r));
    assert!(denied(rule_all(), &r));
    assert!(!decide(&[allow(vec![])], &Req::new()).allowed, "an ALLOW without rules admits nobody");
    assert!(decide(&[deny(vec![])], &Req::new()).allowed, "a DENY without rules refuses nobody");
}

#[test]
fn rules_are_ored_and_from_to_when_anded() {
    let r = Req::new();
    let mine = pb::Source { principals: vec![exact(CLIENT)], ..Default::default() };
    let other = pb::Source { principals: vec![exact("cluster.local/ns/x/sa/y")], ..Default::default() };
    let get = pb::Operation { methods: vec![exact("GET")], ..Default::default() };
    let post = pb::Operation { methods: vec![exact("POST")], ..Default::default() };
    let rule = |from: Vec<pb::Source>, to: Vec<pb::Operation>| pb::PolicyRule { from, to, when: vec![] };
    assert!(allowed(rule(vec![mine.clone()], vec![get.clone()]), &r));
    assert!(!allowed(rule(vec![mine.clone()], vec![post.clone()]), &r), "from and to are AND-ed");
    assert!(!allowed(rule(vec![other.clone()], vec![get.clone()]), &r));
    assert!(allowed(rule(vec![other.clone(), mine.clone()], vec![post.clone(), get.clone()]), &r), "entries OR-ed");
    let mut with_when = rule(vec![mine.clone()], vec![get.clone()]);
    with_when.when = when("destination.port", &["9090"], &[]).when;
    assert!(!allowed(with_when.clone(), &r), "when is AND-ed with from and to");
    // Two rules: either one.
    let p = allow(vec![with_when, rule(vec![], vec![get])]);
    assert!(decide(&[p], &r).allowed);
    // Fields of one Source are AND-ed, values of one field OR-ed.
    let both = pb::Source { principals: vec![exact(CLIENT)], namespaces: vec![exact("x")], ..Default::default() };
    assert!(!allowed(from(both), &r));
    let either = pb::Source { principals: vec![exact("nobody"), exact(CLIENT)], ..Default::default() };
    assert!(allowed(from(either), &r));
}

fn principals(ms: Vec<pb::StringMatch>) -> pb::PolicyRule {
    from(pb::Source { principals: ms, ..Default::default() })
}

#[test]
fn principals_match_the_peer_identity_without_its_scheme() {
    let r = Req::new();
    assert!(allowed(principals(vec![exact(CLIENT)]), &r));
    assert!(!allowed(principals(vec![exact("cluster.local/ns/a/sa/bb")]), &r));
    assert!(!allowed(principals(vec![exact("cluster.local/ns/a/sa/")]), &r));
    assert!(!allowed(principals(vec![exact("other.td/ns/a/sa/b")]), &r));
    assert!(allowed(principals(vec![prefix("cluster.local/ns/a/")]), &r));
    assert!(!allowed(principals(vec![prefix("cluster.local/ns/ab")]), &r));
    assert!(allowed(principals(vec![suffix("/sa/b")]), &r));
    assert!(!allowed(principals(vec![suffix("/sa/c")]), &r));
    assert!(allowed(principals(vec![presence()]), &r));
    let plain = Req::new().peer(None);
    assert!(!allowed(principals(vec![presence()]), &plain), "no identity matches no principal");
    assert!(!allowed(principals(vec![exact(CLIENT)]), &plain));
}

#[test]
fn a_principal_written_with_spiffe_means_the_same_id() {
    let r = Req::new();
    let full = format!("spiffe://{CLIENT}");
    assert_eq!(r.peer.as_ref().unwrap().to_string(), full, "what the certificate says");
    assert!(allowed(principals(vec![exact(&full)]), &r));
    assert!(allowed(principals(vec![prefix("spiffe://cluster.local/ns/a/")]), &r));
    assert!(allowed(principals(vec![suffix(&full)]), &r));
    // A suffix that spells the scheme pins the whole ID.
    let evil = Req::new().peer(Some(Identity::new("evil-cluster.local", "a", "b")));
    assert!(!allowed(principals(vec![suffix(&full)]), &evil));
    assert!(allowed(principals(vec![suffix(CLIENT)]), &evil), "a bare suffix does not");
}

#[test]
fn namespaces_match_the_peer_namespace() {
    let ns = |ms| from(pb::Source { namespaces: ms, ..Default::default() });
    let r = Req::new();
    assert!(allowed(ns(vec![exact("a")]), &r));
    assert!(!allowed(ns(vec![exact("ab")]), &r));
    assert!(allowed(ns(vec![prefix("team-")]), &Req::new().peer(Some(id("team-x", "b")))));
    assert!(!allowed(ns(vec![presence()]), &Req::new().peer(None)));
}

fn sa(ns: &str, name: &str) -> pb::ServiceAccount {
    pb::ServiceAccount { namespace: ns.into(), name: name.into() }
}

#[test]
fn service_accounts_match_namespace_and_name_and_a_bare_one_is_in_the_policy_namespace() {
    let accounts = |v| from(pb::Source { service_accounts: v, ..Default::default() });
    let r = Req::new();
    assert!(allowed(accounts(vec![sa("a", "b")]), &r));
    assert!(!allowed(accounts(vec![sa("a", "c")]), &r));
    assert!(!allowed(accounts(vec![sa("x", "b")]), &r));
    // Empty namespace: the policy's ("ns").
    assert!(!allowed(accounts(vec![sa("", "b")]), &r));
    assert!(allowed(accounts(vec![sa("", "b")]), &Req::new().peer(Some(id("ns", "b")))));
    // Any trust domain.
    assert!(allowed(accounts(vec![sa("a", "b")]), &Req::new().peer(Some(Identity::new("other.td", "a", "b")))));
    assert!(!allowed(accounts(vec![sa("a", "b")]), &Req::new().peer(None)));
    let not = |v| from(pb::Source { not_service_accounts: v, ..Default::default() });
    assert!(!allowed(not(vec![sa("a", "b")]), &r));
    assert!(allowed(not(vec![sa("a", "c")]), &r));
    assert!(allowed(not(vec![sa("a", "b")]), &Req::new().peer(None)), "no identity is excluded by nothing");
}

#[test]
fn not_fields_exclude_what_they_match() {
    let r = Req::new();
    let src = |s: pb::Source| allowed(from(s), &r);
    let op = |o: pb::Operation| allowed(to(o), &r);
    assert!(!src(pb::Source { not_principals: vec![exact(CLIENT)], ..Default::default() }));
    assert!(src(pb::Source { not_principals: vec![exact("x/ns/a/sa/b")], ..Default::default() }));
    assert!(!src(pb::Source { not_namespaces: vec![exact("a")], ..Default::default() }));
    assert!(src(pb::Source { not_namespaces: vec![exact("b")], ..Default::default() }));
    assert!(!src(pb::Source { not_ip_blocks: vec![block("10.1.0.0/16")], ..Default::default() }));
    assert!(src(pb::Source { not_ip_blocks: vec![block("10.2.0.0/16")], ..Default::default() }));
    assert!(!op(pb::Operation { not_hosts: vec![prefix("ECHO.")], ..Default::default() }));
    assert!(!op(pb::Operation { not_methods: vec![exact("GET")], ..Default::default() }));
    assert!(op(pb::Operation { not_methods: vec![exact("POST")], ..Default::default() }));
    assert!(!op(pb::Operation { not_paths: vec![prefix("/api")], ..Default::default() }));
    assert!(!op(pb::Operation { not_ports: vec![8080], ..Default::default() }));
    assert!(op(pb::Operation { not_ports: vec![80], ..Default::default() }));
    // The usual "deny anyone without an identity".
    let strict = from(pb::Source { not_principals: vec![presence()], ..Default::default() });
    assert!(denied(strict.clone(), &Req::new().peer(None)));
    assert!(!denied(strict, &r));
}

fn ip_blocks(cidrs: &[&str]) -> pb::PolicyRule {
    from(pb::Source { ip_blocks: cidrs.iter().map(|c| block(c)).collect(), ..Default::default() })
}

#[test]
fn ip_blocks_match_the_peer_address_v4_and_v6() {
    let r = Req::new();
    assert!(allowed(ip_blocks(&["10.0.0.0/8"]), &r));
    assert!(allowed(ip_blocks(&["10.1.0.2/32"]), &r));
    assert!(!allowed(ip_blocks(&["10.1.0.3/32"]), &r));
    assert!(!allowed(ip_blocks(&["10.2.0.0/16"]), &r));
    assert!(allowed(ip_blocks(&["192.168.0.0/16", "10.1.0.0/24"]), &r));
    assert!(allowed(ip_blocks(&["0.0.0.0/0"]), &r));
    let v6 = Req::new().at("fd00:1::5");
    assert!(allowed(ip_blocks(&["fd00::/8"]), &v6));
    assert!(allowed(ip_blocks(&["fd00:1::5/128"]), &v6));
    assert!(!allowed(ip_blocks(&["fd00:2::/32"]), &v6));
    assert!(!allowed(ip_blocks(&["0.0.0.0/0"]), &v6), "families do not mix");
    assert!(!allowed(ip_blocks(&["::/0"]), &r));
    assert!(allowed(ip_blocks(&["10.0.0.0/8"]), &Req::new().at("::ffff:10.1.0.2")), "v4-mapped is v4");
}

#[test]
fn a_malformed_ip_block_fails_closed() {
    let r = Req::new();
    for bad in [pb::IpBlock { address: vec![10, 0, 0], length: 8 }, pb::IpBlock { length: 33, ..block("10.0.0.0/8") }] {
        let rule = from(pb::Source { ip_blocks: vec![bad.clone()], ..Default::default() });
        assert!(!allowed(rule.clone(), &r));
        assert!(denied(rule, &r));
        let not = from(pb::Source { not_ip_blocks: vec![bad], ..Default::default() });
        assert!(!allowed(not.clone(), &r));
        assert!(denied(not, &r));
    }
}

fn remote(cidr: &str) -> pb::PolicyRule {
    from(pb::Source { remote_ip_blocks: vec![block(cidr)], ..Default::default() })
}

/// Whether an ALLOW of `rule` admits `r` at a waypoint that trusts `hops` proxies' `X-Forwarded-For`.
fn allowed_trusting(hops: u32, rule: pb::PolicyRule, r: &Req) -> bool {
    authorize(&[allow(vec![rule])], &Scope { xff_trusted_hops: hops, ..SCOPE }, &r.info()).allowed
}

#[test]
fn remote_ip_blocks_match_the_peer_unless_proxies_are_trusted() {
    // No trusted proxy (the default): the peer, whatever the client wrote.
    let forged = Req::new().header("x-forwarded-for", "203.0.113.7, 10.0.0.1");
    assert!(!allowed(remote("203.0.113.0/24"), &forged), "a client must not choose its remote IP");
    assert!(denied(remote("10.1.0.2/32"), &forged), "a DENY of the peer holds whatever the header says");
    assert!(allowed(remote("10.1.0.2/32"), &Req::new()), "without X-Forwarded-For, the peer");
    assert!(allowed(ip_blocks(&["10.1.0.2/32"]), &forged), "ip_blocks stay the peer's");
    assert!(allowed(when("remote.ip", &["10.1.0.2"], &[]), &forged));

    // One trusted proxy: the address it appended, the last; two: the one before.
    let r = Req::new().header("x-forwarded-for", "198.51.100.1, 203.0.113.7, 10.0.0.1");
    assert!(allowed_trusting(1, remote("10.0.0.1/32"), &r));
    assert!(allowed_trusting(2, remote("203.0.113.0/24"), &r));
    assert!(!allowed_trusting(2, remote("198.51.100.1/32"), &r), "only the trusted hops count");
    assert!(allowed_trusting(5, remote("10.1.0.2/32"), &r), "fewer addresses than trusted hops: the peer");
    assert!(allowed_trusting(1, remote("10.1.0.2/32"), &Req::new()), "without X-Forwarded-For, the peer");
    let with_ports = |v: &'static str| Req::new().header("x-forwarded-for", v);
    assert!(allowed_trusting(1, remote("2001:db8::/32"), &with_ports("[2001:db8::1]:443")));
    assert!(allowed_trusting(1, remote("203.0.113.7/32"), &with_ports("10.0.0.9, 203.0.113.7:5000")));
    assert!(allowed_trusting(1, when("remote.ip", &["203.0.113.7"], &[]), &with_ports("203.0.113.7")));

    // A trusted entry that does not parse fails closed.
    let junk = Req::new().header("x-forwarded-for", "unknown");
    assert!(!allowed_trusting(1, remote("0.0.0.0/0"), &junk));
    let deny = |rule| !authorize(&[deny(vec![rule])], &Scope { xff_trusted_hops: 1, ..SCOPE }, &junk.info()).allowed;
    assert!(deny(remote("192.0.2.0/24")));
    let not = from(pb::Source { not_remote_ip_blocks: vec![block("192.0.2.0/24")], ..Default::default() });
    assert!(!allowed_trusting(1, not.clone(), &junk));
    assert!(allowed_trusting(1, not, &Req::new()));
}

fn hosts(ms: Vec<pb::StringMatch>) -> pb::PolicyRule {
    to(pb::Operation { hosts: ms, ..Default::default() })
}

#[test]
fn hosts_match_without_port_and_case() {
    let r = Req::new();
    assert!(allowed(hosts(vec![exact("Echo.NS.svc.cluster.local")]), &r));
    assert!(!allowed(hosts(vec![exact("echo.ns.svc.cluster.local:8080")]), &r));
    assert!(allowed(hosts(vec![prefix("ECHO.")]), &r));
    assert!(allowed(hosts(vec![suffix(".svc.CLUSTER.local")]), &r));
    assert!(!allowed(hosts(vec![exact("other.ns.svc.cluster.local")]), &r));
    // HTTP/2: the authority is in the URI.
    let h2 = Req::http("GET", "http://ECHO.ns.svc.cluster.local:8080/x", &[]);
    assert!(allowed(hosts(vec![exact(HOSTNAME)]), &h2));
    let none = Req::http("GET", "/x", &[]);
    assert!(!allowed(hosts(vec![presence()]), &none));
    assert!(allowed(to(pb::Operation { not_hosts: vec![presence()], ..Default::default() }), &none));
}

#[test]
fn methods_match_exactly() {
    let methods = |ms| to(pb::Operation { methods: ms, ..Default::default() });
    assert!(allowed(methods(vec![exact("GET")]), &Req::new()));
    assert!(!allowed(methods(vec![exact("get")]), &Req::new()));
    assert!(!allowed(methods(vec![exact("POST")]), &Req::new()));
    assert!(allowed(methods(vec![exact("GET"), exact("POST")]), &Req::http("POST", "/", &[])));
}

#[test]
fn paths_match_without_the_query() {
    let paths = |ms| to(pb::Operation { paths: ms, ..Default::default() });
    let r = Req::new();
    assert!(allowed(paths(vec![exact("/api/items")]), &r));
    assert!(!allowed(paths(vec![exact("/api/items?x=1")]), &r));
    assert!(!allowed(paths(vec![exact("/api")]), &r));
    assert!(allowed(paths(vec![prefix("/api/")]), &r));
    assert!(!allowed(paths(vec![prefix("/admin")]), &r));
    assert!(allowed(paths(vec![suffix("/items")]), &r));
    assert!(!allowed(paths(vec![suffix("=1")]), &r));
}

#[test]
fn ports_are_the_service_port() {
    let ports = |v| to(pb::Operation { ports: v, ..Default::default() });
    assert!(allowed(ports(vec![80, 8080]), &Req::new()));
    assert!(!allowed(ports(vec![80]), &Req::new()));
    assert!(!allowed(ports(vec![8080 + 65536]), &Req::new()));
}

#[test]
fn header_conditions_use_istio_string_syntax() {
    let r = Req::new().header("x-team", "blue").header("x-team", "green");
    assert!(allowed(when("request.headers[x-team]", &["blue"], &[]), &r));
    assert!(allowed(when("request.headers[X-Team]", &["green"], &[]), &r), "names are case-insensitive");
    assert!(allowed(when("request.headers[x-team]", &["gr*"], &[]), &r));
    assert!(allowed(when("request.headers[x-team]", &["*ue"], &[]), &r));
    assert!(allowed(when("request.headers[x-team]", &["*"], &[]), &r));
    assert!(!allowed(when("request.headers[x-team]", &["red"], &[]), &r));
    assert!(!allowed(when("request.headers[x-team]", &["*"], &["green"]), &r), "not_values exclude");
    assert!(!allowed(when("request.headers[x-team]", &["Blue"], &[]), &r), "values are case-sensitive");
    // Absent: no value matches, no not_value excludes.
    assert!(!allowed(when("request.headers[x-other]", &["*"], &[]), &r));
    assert!(allowed(when("request.headers[x-other]", &[], &["*"]), &r));
    // The pseudo-headers and host.
    assert!(allowed(when("request.headers[:method]", &["GET"], &[]), &r));
    assert!(allowed(when("request.headers[:path]", &["/api/items?x=1"], &[]), &r));
    assert!(allowed(when("request.headers[:authority]", &["echo.ns.svc.cluster.local:8080"], &[]), &r));
    let h2 = Req::http("GET", "http://echo.ns:80/", &[]);
    assert!(denied(when("request.headers[host]", &["echo.ns*"], &[]), &h2));
    assert!(!allowed(when("request.headers[:scheme]", &["http"], &[]), &h2));
    assert!(denied(when("request.headers[:scheme]", &["https"], &[]), &h2), "other pseudo-headers fail closed");
}

#[test]
fn address_port_and_identity_conditions() {
    let r = Req::new();
    assert!(allowed(when("source.ip", &["10.1.0.0/16"], &[]), &r));
    assert!(allowed(when("source.ip", &["10.1.0.2"], &[]), &r));
    assert!(!allowed(when("source.ip", &["10.1.0.0/16"], &["10.1.0.2"]), &r));
    assert!(allowed(when("destination.ip", &["10.96.0.0/12"], &[]), &r));
    assert!(!allowed(when("destination.ip", &["10.0.0.0/16"], &[]), &r));
    assert!(allowed(when("destination.port", &["80", "8080"], &[]), &r));
    assert!(!allowed(when("destination.port", &["80"], &[]), &r));
    assert!(allowed(when("source.namespace", &["a"], &[]), &r));
    assert!(!allowed(when("source.namespace", &["b*"], &[]), &r));
    assert!(allowed(when("source.principal", &[CLIENT], &[]), &r));
    assert!(allowed(when("source.principal", &["spiffe://cluster.local/ns/a/*"], &[]), &r));
    assert!(!allowed(when("source.principal", &[], &["*/sa/b"]), &r));
    assert!(!allowed(when("source.principal", &["*"], &[]), &Req::new().peer(None)));
}

#[test]
fn conditions_that_cannot_be_evaluated_fail_closed() {
    let r = Req::new();
    let mut unknown_dst = Req::new();
    unknown_dst.destination_ip = None;
    let cases = [
        (when("request.auth.principal", &["*"], &[]), &r),
        (when("request.auth.claims[groups]", &[], &["admins"]), &r),
        (when("request.auth.audiences", &["x"], &[]), &r),
        (when("connection.sni", &["*"], &[]), &r),
        (when("no.such.key", &["*"], &[]), &r),
        (when("request.headers[]", &["*"], &[]), &r),
        (when("source.ip", &["not-an-ip"], &[]), &r),
        (when("source.ip", &["10.0.0.0/40"], &[]), &r),
        (when("destination.port", &["http"], &[]), &r),
        (when("destination.ip", &["0.0.0.0/0"], &[]), &unknown_dst),
        (when("source.ip", &[], &[]), &r),
    ];
    for (rule, req) in cases {
        let c = rule.when[0].clone();
        assert!(!allowed(rule.clone(), req), "an ALLOW on {c:?} admits nobody");
        assert!(denied(rule, req), "a DENY on {c:?} refuses everybody");
    }
    // In not_values as well.
    assert!(!allowed(when("source.ip", &[], &["bogus"]), &r));
    assert!(denied(when("source.ip", &[], &["bogus"]), &r));
}

#[test]
fn an_unevaluable_condition_does_not_widen_the_rest_of_a_deny_rule() {
    let mut rule = to(pb::Operation { paths: vec![prefix("/admin")], ..Default::default() });
    rule.when = when("request.auth.claims[groups]", &["banned"], &[]).when;
    assert!(denied(rule.clone(), &Req::http("GET", "/admin/x", &[])));
    assert!(!denied(rule, &Req::new()));
}

#[test]
fn request_principals_never_match_and_not_request_principals_always_do() {
    let r = Req::new();
    let rp = |ms| from(pb::Source { request_principals: ms, ..Default::default() });
    let not_rp = |ms| from(pb::Source { not_request_principals: ms, ..Default::default() });
    assert!(!allowed(rp(vec![presence()]), &r));
    assert!(!denied(rp(vec![exact("issuer/subject")]), &r));
    assert!(allowed(not_rp(vec![exact("issuer/subject")]), &r));
    assert!(denied(not_rp(vec![presence()]), &r), "\"deny requests without a JWT\" denies all");
}

#[test]
fn a_string_match_without_kind_or_an_unknown_action_fails_closed() {
    let r = Req::new();
    let unset = pb::StringMatch { kind: None };
    let rule = to(pb::Operation { methods: vec![unset.clone()], ..Default::default() });
    assert!(!allowed(rule.clone(), &r));
    assert!(denied(rule, &r));
    let not = to(pb::Operation { not_paths: vec![unset], ..Default::default() });
    assert!(!allowed(not.clone(), &r));
    assert!(denied(not, &r));
    let account = from(pb::Source { service_accounts: vec![sa("a", "")], ..Default::default() });
    assert!(!allowed(account.clone(), &r));
    assert!(denied(account, &r));
    let mut odd = allow(vec![rule_all()]);
    odd.action = 7;
    assert_eq!(decide(&[odd], &r).policy.as_deref(), Some("ns/allow"), "evaluated as a DENY");
}

#[test]
fn policies_apply_through_the_gateway_or_the_requested_service() {
    let r = Req::new();
    let refuse = |targets: Vec<pb::PolicyTarget>| pb::AuthorizationPolicy { targets, ..deny(vec![rule_all()]) };
    assert!(!decide(&[refuse(vec![gateway("ns", "waypoint")])], &r).allowed);
    assert!(!decide(&[refuse(vec![service("ns", HOSTNAME)])], &r).allowed);
    assert!(!decide(&[refuse(vec![service("other", "x"), service("ns", HOSTNAME)])], &r).allowed);
    for other in [
        vec![gateway("ns", "other-waypoint")],
        vec![gateway("other", "waypoint")],
        vec![service("ns", "other.ns.svc.cluster.local")],
        vec![service("other", HOSTNAME)],
        vec![pb::PolicyTarget { kind: None }],
        vec![],
    ] {
        assert!(decide(&[refuse(other.clone())], &r).allowed, "{other:?} does not apply");
        // Nor does an ALLOW there restrict anything.
        let unmatched = pb::AuthorizationPolicy { targets: other, ..allow(vec![]) };
        assert!(decide(&[unmatched], &r).allowed);
    }
}

#[test]
fn dry_run_policies_are_reported_never_enforced() {
    let r = Req::new();
    let dry = |p: pb::AuthorizationPolicy| pb::AuthorizationPolicy { dry_run: true, ..p };
    let everyone = deny(vec![rule_all()]);
    let v = decide(&[dry(everyone.clone())], &r);
    assert_eq!(v, Verdict { allowed: true, policy: None, dry_run: vec![("ns/deny".into(), false)] });
    assert!(decide(&[dry(deny(vec![]))], &r).dry_run.is_empty(), "one that does not match is not reported");
    // A dry-run ALLOW that matches nothing would have denied.
    let v = decide(&[dry(allow(vec![]))], &r);
    assert_eq!(v, Verdict { allowed: true, policy: None, dry_run: vec![("ns/allow".into(), false)] });
    assert!(decide(&[dry(allow(vec![rule_all()]))], &r).dry_run.is_empty());
    // A dry-run ALLOW that matches where the enforced ALLOW does not would have allowed.
    let post = policy(
        "post",
        pb::Action::Allow,
        vec![to(pb::Operation { methods: vec![exact("POST")], ..Default::default() })],
    );
    let v = decide(&[post.clone(), dry(allow(vec![rule_all()]))], &r);
    assert_eq!(v, Verdict { allowed: false, policy: None, dry_run: vec![("ns/allow".into(), true)] });
    // Already denied: a dry-run DENY changes nothing.
    let v = decide(&[everyone, dry(policy("d2", pb::Action::Deny, vec![rule_all()]))], &r);
    assert_eq!(v, Verdict { allowed: false, policy: Some("ns/deny".into()), dry_run: vec![] });
}

#[test]
fn the_snapshot_map_of_policies_is_taken_as_it_is() {
    let d = deny(vec![to(pb::Operation { paths: vec![prefix("/api")], ..Default::default() })]);
    let a = allow(vec![rule_all()]);
    let policies: BTreeMap<String, pb::AuthorizationPolicy> =
        [("ns/allow".to_string(), a), ("ns/deny".to_string(), d)].into_iter().collect();
    let v = authorize(policies.values(), &SCOPE, &Req::new().info());
    assert_eq!(v.policy.as_deref(), Some("ns/deny"));
    assert!(authorize(policies.values(), &SCOPE, &Req::http("GET", "/", &[]).info()).allowed);
}

/// `r` as an opaque TCP connection: the same peer and port, no request.
fn decide_tcp(policies: &[pb::AuthorizationPolicy], r: &Req) -> bool {
    authorize(policies, &SCOPE, &RequestInfo { parts: None, ..r.info() }).allowed
}

#[test]
fn on_tcp_http_fields_fail_closed_and_l4_fields_apply() {
    let r = Req::new();
    let op = |o: pb::Operation| to(o);
    let admin = || pb::Operation { paths: vec![prefix("/admin")], ..Default::default() };
    // An ALLOW rule with an HTTP field never matches a connection; one with only L4 fields does.
    assert!(!decide_tcp(&[allow(vec![op(admin())])], &r));
    assert!(decide_tcp(&[allow(vec![op(pb::Operation { ports: vec![8080], ..Default::default() })])], &r));
    assert!(!decide_tcp(&[allow(vec![op(pb::Operation { ports: vec![9090], ..Default::default() })])], &r));
    // A DENY rule ignores its HTTP fields (denies more), but its L4 fields still narrow it.
    assert!(!decide_tcp(&[deny(vec![op(admin())])], &r));
    let other_port = pb::Operation { ports: vec![9090], ..admin() };
    assert!(decide_tcp(&[deny(vec![op(other_port)])], &r));
    // Header conditions: unknown on TCP.
    assert!(!decide_tcp(&[allow(vec![when("request.headers[x-user]", &["*"], &[])])], &r));
    assert!(!decide_tcp(&[deny(vec![when("request.headers[x-user]", &["bob"], &[])])], &r));
    // Sources are L4: principals decide a connection as they decide a request.
    let client = from(pb::Source { principals: vec![exact(CLIENT)], ..Default::default() });
    assert!(decide_tcp(&[allow(vec![client.clone()])], &r));
    assert!(!decide_tcp(&[deny(vec![client])], &r));
}
