//! AuthorizationPolicy → `istio.security.Authorization`, as Istio converts
//! policies for ztunnel: only L4 attributes survive. A rule that needs L7
//! attributes cannot match at L4, so an ALLOW drops it (allowing less) and a
//! DENY ignores those attributes (denying more).

use std::net::IpAddr;

use ambit_api::security::{
    string_match::MatchType, Action, Address, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch,
    StringMatch,
};

use super::crd::{AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Condition, Operation, Source};
use super::index::validate_labels;

/// Istio's annotation that makes a policy report what it would do without
/// enforcing it.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Why a policy is rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The selector is not valid label syntax.
    #[error("bad selector: {0}")]
    BadSelector(String),
    /// An ipBlock or IP value is neither an address nor a CIDR.
    #[error("bad ipBlock {0:?}: want an IP address or CIDR")]
    BadIpBlock(String),
    /// A port is not a number in 1..=65535.
    #[error("bad port {0:?}: want 1-65535")]
    BadPort(String),
    /// A `when` condition has neither values nor notValues.
    #[error("condition {0:?} has neither values nor notValues")]
    EmptyCondition(String),
    /// A `when` key no proxy evaluates.
    #[error("unknown condition key {0:?}")]
    UnknownConditionKey(String),
    /// A service account is not `ns/sa` or `sa` (no wildcards, no empty parts).
    #[error("bad service account {0:?}: want namespace/name or name, without wildcards")]
    BadServiceAccount(String),
}

/// What a policy becomes at L4.
#[derive(Debug, Default, PartialEq)]
pub struct Converted {
    /// The resource; `None` when the policy does not act at L4 (AUDIT, CUSTOM, targetRefs).
    pub authorization: Option<Authorization>,
    /// Notes about parts that could not be enforced at L4.
    pub warnings: Vec<String>,
}

/// Converts one policy; `root_namespace` makes selector-less policies mesh-wide.
pub fn convert(p: &AuthorizationPolicy, root_namespace: &str) -> Result<Converted, PolicyError> {
    let namespace = p.metadata.namespace.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    let selector = p.spec.selector.as_ref().filter(|s| !s.match_labels.is_empty());
    if let Some(s) = selector {
        validate_labels(&s.match_labels).map_err(PolicyError::BadSelector)?;
    }
    let mut out = Converted::default();
    if !p.spec.target_refs.is_empty() || p.spec.target_ref.is_some() {
        // Attached to a waypoint or gateway, which enforces it; not ztunnel's.
        tracing::debug!(%namespace, %name, "policy with targetRefs is not enforced at L4");
        return Ok(out);
    }
    let action = match p.spec.action {
        AuthorizationAction::Allow => Action::Allow,
        AuthorizationAction::Deny => Action::Deny,
        a @ (AuthorizationAction::Audit | AuthorizationAction::Custom) => {
            out.warnings.push(format!("action {a:?} needs a waypoint; not enforced at L4"));
            return Ok(out);
        }
    };
    let scope = match selector {
        Some(_) => Scope::WorkloadSelector,
        None if namespace == root_namespace => Scope::Global,
        None => Scope::Namespace,
    };
    let mut rules = Vec::with_capacity(p.spec.rules.len());
    for (i, r) in p.spec.rules.iter().enumerate() {
        let (rule, l7) = convert_rule(r, &namespace)?;
        if l7.is_empty() {
            rules.push(rule);
        } else if action == Action::Allow {
            out.warnings.push(format!(
                "rule {i} uses L7 attributes ({}); dropped: an ALLOW rule cannot match at L4",
                l7.join(", ")
            ));
        } else {
            out.warnings.push(format!(
                "rule {i} uses L7 attributes ({}); ignored, so the DENY applies more broadly at L4",
                l7.join(", ")
            ));
            rules.push(rule);
        }
    }
    let dry_run = p.metadata.annotations.as_ref().and_then(|a| a.get(DRY_RUN_ANNOTATION)).is_some_and(|v| v == "true");
    if dry_run {
        tracing::debug!(%namespace, %name, "dry-run policy: ztunnel logs what it would do and enforces nothing");
    }
    out.authorization =
        Some(Authorization { name, namespace, scope: scope.into(), action: action.into(), rules, dry_run });
    Ok(out)
}

/// The L4 rule and the names of the L7 attributes it had to leave out;
/// `namespace` is the policy's (where a bare service account name lives).
fn convert_rule(r: &AuthorizationRule, namespace: &str) -> Result<(Rule, Vec<&'static str>), PolicyError> {
    let mut l7 = Vec::new();
    let mut clauses = Vec::new();
    if !r.from.is_empty() {
        let matches =
            r.from.iter().map(|f| source_match(&f.source, namespace, &mut l7)).collect::<Result<Vec<_>, _>>()?;
        clauses.push(Clause { matches });
    }
    if !r.to.is_empty() {
        let matches = r.to.iter().map(|t| operation_match(&t.operation, &mut l7)).collect::<Result<Vec<_>, _>>()?;
        clauses.push(Clause { matches });
    }
    for c in &r.when {
        if let Some(m) = condition_match(c, &mut l7)? {
            clauses.push(Clause { matches: vec![m] });
        }
    }
    // A match with nothing left matches everything, and so does its clause.
    let empty = Match::default();
    clauses.retain(|c| !c.matches.contains(&empty));
    l7.dedup();
    Ok((Rule { clauses }, l7))
}

fn source_match(s: &Source, namespace: &str, l7: &mut Vec<&'static str>) -> Result<Match, PolicyError> {
    note(l7, !s.request_principals.is_empty(), "requestPrincipals");
    note(l7, !s.not_request_principals.is_empty(), "notRequestPrincipals");
    note(l7, !s.remote_ip_blocks.is_empty(), "remoteIpBlocks");
    note(l7, !s.not_remote_ip_blocks.is_empty(), "notRemoteIpBlocks");
    let service_accounts = |v: &[String]| v.iter().map(|v| service_account(v, namespace)).collect::<Result<_, _>>();
    Ok(Match {
        principals: s.principals.iter().map(|v| principal(v)).collect(),
        not_principals: s.not_principals.iter().map(|v| principal(v)).collect(),
        service_accounts: service_accounts(&s.service_accounts)?,
        not_service_accounts: service_accounts(&s.not_service_accounts)?,
        namespaces: s.namespaces.iter().map(|v| string_match(v)).collect(),
        not_namespaces: s.not_namespaces.iter().map(|v| string_match(v)).collect(),
        source_ips: ip_blocks(&s.ip_blocks)?,
        not_source_ips: ip_blocks(&s.not_ip_blocks)?,
        ..Default::default()
    })
}

fn operation_match(o: &Operation, l7: &mut Vec<&'static str>) -> Result<Match, PolicyError> {
    note(l7, !o.hosts.is_empty(), "hosts");
    note(l7, !o.not_hosts.is_empty(), "notHosts");
    note(l7, !o.methods.is_empty(), "methods");
    note(l7, !o.not_methods.is_empty(), "notMethods");
    note(l7, !o.paths.is_empty(), "paths");
    note(l7, !o.not_paths.is_empty(), "notPaths");
    Ok(Match { destination_ports: ports(&o.ports)?, not_destination_ports: ports(&o.not_ports)?, ..Default::default() })
}

/// A `when` condition on an L4 key as a match; `None` (noted in `l7`) for other keys.
fn condition_match(c: &Condition, l7: &mut Vec<&'static str>) -> Result<Option<Match>, PolicyError> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(PolicyError::EmptyCondition(c.key.clone()));
    }
    let (v, nv) = (&c.values, &c.not_values);
    let strings = |vals: &[String], f: fn(&str) -> StringMatch| vals.iter().map(|s| f(s)).collect();
    let m = match c.key.as_str() {
        "source.ip" => Match { source_ips: ip_blocks(v)?, not_source_ips: ip_blocks(nv)?, ..Default::default() },
        "source.namespace" => Match {
            namespaces: strings(v, string_match),
            not_namespaces: strings(nv, string_match),
            ..Default::default()
        },
        "source.principal" => {
            Match { principals: strings(v, principal), not_principals: strings(nv, principal), ..Default::default() }
        }
        "destination.ip" => {
            Match { destination_ips: ip_blocks(v)?, not_destination_ips: ip_blocks(nv)?, ..Default::default() }
        }
        "destination.port" => {
            Match { destination_ports: ports(v)?, not_destination_ports: ports(nv)?, ..Default::default() }
        }
        _ => {
            l7.push("when");
            return Ok(None);
        }
    };
    Ok(Some(m))
}

fn note(l7: &mut Vec<&'static str>, used: bool, what: &'static str) {
    if used {
        l7.push(what);
    }
}

/// Istio's string syntax: `*` any (present), `*x` suffix, `x*` prefix, else exact.
pub fn string_match(v: &str) -> StringMatch {
    let t = if v == "*" {
        MatchType::Presence(())
    } else if let Some(s) = v.strip_prefix('*') {
        MatchType::Suffix(s.into())
    } else if let Some(p) = v.strip_suffix('*') {
        MatchType::Prefix(p.into())
    } else {
        MatchType::Exact(v.into())
    };
    StringMatch { match_type: Some(t) }
}

/// A principal as Istio writes it, `td/ns/x/sa/y`: the peer's SPIFFE ID
/// without its scheme, which is how ztunnels compare it. A value written
/// with `spiffe://` keeps its meaning: exact and prefix patterns lose the
/// scheme, and a suffix that spells it pinned the whole ID, so it becomes
/// exact (a bare suffix would also match longer trust domains).
pub(super) fn principal(v: &str) -> StringMatch {
    const SCHEME: &str = "spiffe://";
    let mut m = string_match(v);
    match &mut m.match_type {
        Some(MatchType::Exact(s) | MatchType::Prefix(s)) if s.starts_with(SCHEME) => {
            s.replace_range(..SCHEME.len(), "")
        }
        Some(MatchType::Suffix(s)) if s.starts_with(SCHEME) => {
            m.match_type = Some(MatchType::Exact(s[SCHEME.len()..].to_owned()));
        }
        _ => {}
    }
    m
}

/// `ns/sa`, or a bare `sa` in the policy's `namespace` (as Istio converts
/// it); any trust domain. Both parts are compared exactly, so wildcards and
/// empty parts, which would silently match nobody, are rejected.
pub(super) fn service_account(v: &str, namespace: &str) -> Result<ServiceAccountMatch, PolicyError> {
    let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
    let bad = |p: &str| p.is_empty() || p.contains(['/', '*']);
    if bad(ns) || bad(sa) {
        return Err(PolicyError::BadServiceAccount(v.into()));
    }
    Ok(ServiceAccountMatch { namespace: ns.into(), service_account: sa.into() })
}

fn ip_blocks(values: &[String]) -> Result<Vec<Address>, PolicyError> {
    values.iter().map(|v| ip_block(v)).collect()
}

/// `a.b.c.d`, `a.b.c.d/n`, or the IPv6 forms, as address bytes and prefix length.
pub fn ip_block(v: &str) -> Result<Address, PolicyError> {
    let bad = || PolicyError::BadIpBlock(v.into());
    let (ip, len) = match v.split_once('/') {
        Some((ip, len)) => (ip, Some(len.parse::<u32>().map_err(|_| bad())?)),
        None => (v, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let (address, max) = match ip {
        IpAddr::V4(a) => (a.octets().to_vec(), 32),
        IpAddr::V6(a) => (a.octets().to_vec(), 128),
    };
    let length = len.unwrap_or(max);
    if length > max {
        return Err(bad());
    }
    Ok(Address { address, length })
}

pub(super) fn ports(values: &[String]) -> Result<Vec<u32>, PolicyError> {
    values
        .iter()
        .map(|v| match v.parse::<u16>() {
            Ok(p) if p != 0 => Ok(u32::from(p)),
            _ => Err(PolicyError::BadPort(v.clone())),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml_spec: &str, namespace: &str) -> AuthorizationPolicy {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: {namespace}}}\nspec:\n{yaml_spec}"
        );
        serde_yaml::from_str(&text).unwrap()
    }

    fn exact(s: &str) -> StringMatch {
        StringMatch { match_type: Some(MatchType::Exact(s.into())) }
    }

    #[test]
    fn string_syntax_maps_to_presence_prefix_suffix_and_exact() {
        assert_eq!(string_match("*").match_type, Some(MatchType::Presence(())));
        assert_eq!(string_match("*-dev").match_type, Some(MatchType::Suffix("-dev".into())));
        assert_eq!(string_match("team-*").match_type, Some(MatchType::Prefix("team-".into())));
        assert_eq!(string_match("a"), exact("a"));
    }

    #[test]
    fn principals_are_written_without_the_scheme_whichever_form_the_user_wrote() {
        let m = |t| StringMatch { match_type: Some(t) };
        assert_eq!(principal("cluster.local/ns/a/sa/b"), exact("cluster.local/ns/a/sa/b"));
        assert_eq!(principal("spiffe://cluster.local/ns/a/sa/b"), exact("cluster.local/ns/a/sa/b"));
        assert_eq!(principal("spiffe://cluster.local/ns/a/*"), m(MatchType::Prefix("cluster.local/ns/a/".into())));
        assert_eq!(principal("cluster.local/ns/a/*"), m(MatchType::Prefix("cluster.local/ns/a/".into())));
        assert_eq!(principal("spiffe://*"), m(MatchType::Prefix(String::new())));
        assert_eq!(principal("*/sa/b"), m(MatchType::Suffix("/sa/b".into())));
        assert_eq!(principal("*spiffe://cluster.local/ns/a/sa/b"), exact("cluster.local/ns/a/sa/b"));
        assert_eq!(principal("*"), m(MatchType::Presence(())));
    }

    #[test]
    fn ip_blocks_become_bytes_and_length() {
        assert_eq!(ip_block("10.1.0.0/16").unwrap(), Address { address: vec![10, 1, 0, 0], length: 16 });
        assert_eq!(ip_block("10.1.2.3").unwrap().length, 32);
        assert_eq!(ip_block("fd00::1").unwrap().length, 128);
        for bad in ["10.1.0.0/33", "10.1.0", "x/8", "10.0.0.0/-1", ""] {
            assert_eq!(ip_block(bad), Err(PolicyError::BadIpBlock(bad.into())), "{bad}");
        }
    }

    #[test]
    fn the_dry_run_annotation_sets_dry_run() {
        let mut p = policy("  action: DENY\n  rules: [{}]\n", "default");
        let dry_run = |p: &AuthorizationPolicy| convert(p, "ambit-system").unwrap().authorization.unwrap().dry_run;
        assert!(!dry_run(&p));
        for (value, want) in [("true", true), ("false", false), ("yes", false)] {
            p.metadata.annotations = Some([(DRY_RUN_ANNOTATION.to_string(), value.to_string())].into());
            assert_eq!(dry_run(&p), want, "{value}");
        }
    }

    #[test]
    fn scope_follows_selector_and_root_namespace() {
        let scope =
            |spec: &str, ns: &str| convert(&policy(spec, ns), "ambit-system").unwrap().authorization.unwrap().scope();
        assert_eq!(scope("  action: ALLOW\n", "ambit-system"), Scope::Global);
        assert_eq!(scope("  action: ALLOW\n", "default"), Scope::Namespace);
        assert_eq!(scope("  selector: {matchLabels: {app: a}}\n", "default"), Scope::WorkloadSelector);
        assert_eq!(scope("  selector: {matchLabels: {app: a}}\n", "ambit-system"), Scope::WorkloadSelector);
    }

    #[test]
    fn from_to_and_when_become_anded_clauses_of_ored_matches() {
        let p = policy(
            r#"  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/client"]}
    - source: {namespaces: ["team-*"], notIpBlocks: ["10.9.0.0/16"]}
    to: [{operation: {ports: ["8080"], notPorts: ["15000"]}}]
    when:
    - {key: destination.ip, values: ["10.1.0.3"]}
    - {key: source.namespace, notValues: ["legacy"]}
"#,
            "default",
        );
        let a = convert(&p, "ambit-system").unwrap().authorization.unwrap();
        assert_eq!(a.action(), Action::Allow);
        let clauses = &a.rules[0].clauses;
        assert_eq!(clauses.len(), 4);
        assert_eq!(clauses[0].matches.len(), 2);
        assert_eq!(clauses[0].matches[0].principals, vec![exact("cluster.local/ns/default/sa/client")]);
        assert_eq!(clauses[0].matches[1].not_source_ips[0].length, 16);
        assert_eq!(clauses[1].matches[0].destination_ports, vec![8080]);
        assert_eq!(clauses[1].matches[0].not_destination_ports, vec![15000]);
        assert_eq!(clauses[2].matches[0].destination_ips[0].address, vec![10, 1, 0, 3]);
        assert_eq!(clauses[3].matches[0].not_namespaces, vec![exact("legacy")]);
    }

    #[test]
    fn allow_rule_with_l7_attributes_is_dropped_with_a_warning() {
        let p = policy(
            "  rules:\n  - to: [{operation: {methods: [GET]}}]\n  - from: [{source: {namespaces: [a]}}]\n",
            "default",
        );
        let c = convert(&p, "ambit-system").unwrap();
        let a = c.authorization.unwrap();
        assert_eq!(a.rules.len(), 1, "only the L4 rule is left");
        assert_eq!(a.rules[0].clauses[0].matches[0].namespaces, vec![exact("a")]);
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("methods") && c.warnings[0].contains("dropped"), "{:?}", c.warnings);
    }

    #[test]
    fn allow_policy_with_only_l7_rules_allows_nothing_at_l4() {
        let p = policy("  rules:\n  - to: [{operation: {paths: [/admin]}}]\n", "default");
        let a = convert(&p, "ambit-system").unwrap().authorization.unwrap();
        assert!(a.rules.is_empty(), "an ALLOW with no rules matches nothing");
    }

    #[test]
    fn deny_rule_ignores_l7_attributes_and_denies_more() {
        let p = policy(
            r#"  action: DENY
  rules:
  - from: [{source: {namespaces: [bad], requestPrincipals: ["*"]}}]
    to: [{operation: {methods: [POST]}}]
    when: [{key: "request.headers[x]", values: [y]}]
"#,
            "default",
        );
        let c = convert(&p, "ambit-system").unwrap();
        let a = c.authorization.unwrap();
        assert_eq!(a.action(), Action::Deny);
        // The operation had only a method, so its clause matches everything and goes away.
        assert_eq!(a.rules[0].clauses.len(), 1);
        assert_eq!(a.rules[0].clauses[0].matches[0].namespaces, vec![exact("bad")]);
        assert!(c.warnings[0].contains("ignored"), "{:?}", c.warnings);
        assert!(c.warnings[0].contains("requestPrincipals") && c.warnings[0].contains("when"));
    }

    #[test]
    fn audit_custom_and_target_ref_policies_are_not_enforced_at_l4() {
        for spec in [
            "  action: AUDIT\n",
            "  action: CUSTOM\n  provider: {name: ext}\n",
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n",
        ] {
            let c = convert(&policy(spec, "default"), "ambit-system").unwrap();
            assert_eq!(c.authorization, None, "{spec}");
        }
    }

    #[test]
    fn invalid_parts_reject_the_policy() {
        let cases = [
            ("  selector: {matchLabels: {app: '*'}}\n", "bad selector"),
            ("  rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]\n", "bad ipBlock"),
            ("  rules: [{to: [{operation: {ports: ['70000']}}]}]\n", "bad port"),
            ("  rules: [{to: [{operation: {notPorts: ['0']}}]}]\n", "bad port"),
            ("  rules: [{when: [{key: destination.port, values: [x]}]}]\n", "bad port"),
            ("  rules: [{when: [{key: source.ip}]}]\n", "neither values"),
            ("  rules: [{from: [{source: {serviceAccounts: ['ns/']}}]}]\n", "bad service account"),
            ("  rules: [{from: [{source: {serviceAccounts: ['/sa']}}]}]\n", "bad service account"),
            ("  rules: [{from: [{source: {notServiceAccounts: ['a/b/c']}}]}]\n", "bad service account"),
            ("  rules: [{from: [{source: {notServiceAccounts: ['ns/*']}}]}]\n", "bad service account"),
            ("  rules: [{from: [{source: {serviceAccounts: ['']}}]}]\n", "bad service account"),
        ];
        for (spec, want) in cases {
            let err = convert(&policy(spec, "default"), "ambit-system").unwrap_err();
            assert!(err.to_string().contains(want), "{spec}: {err}");
        }
    }

    #[test]
    fn empty_rule_matches_everything_and_service_accounts_become_service_account_matches() {
        let p = policy("  rules:\n  - {}\n  - from: [{source: {serviceAccounts: [other/sa1]}}]\n", "default");
        let a = convert(&p, "ambit-system").unwrap().authorization.unwrap();
        assert!(a.rules[0].clauses.is_empty());
        let m = &a.rules[1].clauses[0].matches[0];
        assert!(m.principals.is_empty(), "no longer principal suffixes");
        let want = ServiceAccountMatch { namespace: "other".into(), service_account: "sa1".into() };
        assert_eq!(m.service_accounts, vec![want]);
    }

    /// What the controller sends, as bytes on the wire and decoded by a peer,
    /// checked against the form Istio's control plane writes.
    #[test]
    fn emitted_authorization_decodes_field_by_field_in_istios_form() {
        use prost::Message;
        let p = policy(
            r#"  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/c/sa/d", "*"]
        notPrincipals: ["spiffe://cluster.local/ns/e/*"]
        serviceAccounts: ["x/y", "bare"]
        notServiceAccounts: ["z"]
    when:
    - {key: source.principal, values: ["spiffe://cluster.local/ns/w/sa/v"], notValues: ["*/sa/u"]}
"#,
            "team",
        );
        let sent = convert(&p, "ambit-system").unwrap().authorization.unwrap();
        let a = Authorization::decode(sent.encode_to_vec().as_slice()).unwrap();
        assert_eq!((a.name.as_str(), a.namespace.as_str()), ("p", "team"));
        assert_eq!((a.scope(), a.action()), (Scope::Namespace, Action::Deny));
        let clauses = &a.rules[0].clauses;
        assert_eq!(clauses.len(), 2, "from, then when");
        let from = &clauses[0].matches[0];
        let m = |t| StringMatch { match_type: Some(t) };
        assert_eq!(
            from.principals,
            vec![exact("cluster.local/ns/a/sa/b"), exact("cluster.local/ns/c/sa/d"), m(MatchType::Presence(()))]
        );
        assert_eq!(from.not_principals, vec![m(MatchType::Prefix("cluster.local/ns/e/".into()))]);
        let sa = |ns: &str, name: &str| ServiceAccountMatch { namespace: ns.into(), service_account: name.into() };
        assert_eq!(
            from.service_accounts,
            vec![sa("x", "y"), sa("team", "bare")],
            "a bare name is in the policy's namespace"
        );
        assert_eq!(from.not_service_accounts, vec![sa("team", "z")]);
        assert!(from.extensions.is_empty());
        let when = &clauses[1].matches[0];
        assert_eq!(when.principals, vec![exact("cluster.local/ns/w/sa/v")]);
        assert_eq!(when.not_principals, vec![m(MatchType::Suffix("/sa/u".into()))]);
        // On the wire: Match fields 11 and 12; ServiceAccountMatch field 1 namespace, 2 serviceAccount.
        let only = |m: Match| m.encode_to_vec()[0];
        assert_eq!(only(Match { service_accounts: vec![sa("n", "s")], ..Default::default() }), 11 << 3 | 2);
        assert_eq!(only(Match { not_service_accounts: vec![sa("n", "s")], ..Default::default() }), 12 << 3 | 2);
        assert_eq!(sa("ns", "sa").encode_to_vec(), [1 << 3 | 2, 2, b'n', b's', 2 << 3 | 2, 2, b's', b'a']);
    }
}
