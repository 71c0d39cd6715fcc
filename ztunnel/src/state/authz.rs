//! L4 authorization with Istio's semantics: DENY first, then ALLOW if any
//! ALLOW applies. Principals are compared against the peer's SPIFFE ID
//! without its scheme (`<td>/ns/<ns>/sa/<sa>`), as Istio's ztunnel does.
//! Evaluation allocates nothing: principals are compared against the ID's
//! pieces without formatting it.

use std::net::IpAddr;

use ambit_identity::{Identity, PrincipalPattern};

use super::model::{Action, Authorization, Match, Rule, ServiceAccountMatch, StringMatch, Workload};
use super::ProxyState;

/// What authorization knows about a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionAttributes {
    /// The peer's identity from its certificate; `None` for plaintext.
    pub src_identity: Option<Identity>,
    /// Source IP.
    pub src_ip: IpAddr,
    /// Destination IP.
    pub dst_ip: IpAddr,
    /// Destination port.
    pub dst_port: u16,
}

/// A connection refused by policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}{}", policy.as_deref().map(|p| format!(" ({p})")).unwrap_or_default())]
pub struct Denied {
    /// `namespace/name` of the deciding DENY policy; `None` when no ALLOW matched.
    pub policy: Option<String>,
    /// Short reason for logs and metrics.
    pub reason: &'static str,
}

impl ProxyState {
    /// Decides whether `conn` may reach `dst`. Applicable policies: Global
    /// ones, Namespace ones in `dst`'s namespace, and those `dst` lists. Any
    /// matching DENY denies; otherwise, if an ALLOW applies, one must match.
    pub fn authorize(&self, conn: &ConnectionAttributes, dst: &Workload) -> Result<(), Denied> {
        let ns = self.namespace_policies.get(&dst.namespace).map(Vec::as_slice).unwrap_or_default();
        let applicable = || {
            let scoped = self.global_policies.iter().chain(ns).map(|&i| &*self.policies[i]);
            scoped.chain(dst.authorization_policies.iter().filter_map(|k| self.policy(k)).map(|p| &**p))
        };
        let deny = |p: &&Authorization| p.action == Action::Deny && policy_matches(p, conn);
        for p in applicable().filter(deny) {
            if !p.dry_run {
                return Err(Denied { policy: Some(p.key()), reason: "denied by policy" });
            }
            // A dry-run policy only says what it would have done.
            tracing::info!(policy = %p.key(), src = %conn.src_ip, dst = %conn.dst_ip, port = conn.dst_port,
                "dry-run DENY policy matches; not enforced");
        }
        let mut allows = applicable().filter(|p| p.action == Action::Allow && !p.dry_run).peekable();
        if allows.peek().is_none() || allows.any(|p| policy_matches(p, conn)) {
            return Ok(());
        }
        Err(Denied { policy: None, reason: "no allow policy matched" })
    }
}

/// Any rule; a rule matches when all its clauses do; a clause when any match
/// does, or when it has none (as in Istio's ztunnel).
fn policy_matches(p: &Authorization, conn: &ConnectionAttributes) -> bool {
    p.rules.iter().any(|r| {
        if has_unsupported(r) {
            // Fail closed: whatever the condition means, deny rather than allow.
            return p.action == Action::Deny;
        }
        r.clauses.iter().all(|c| c.matches.is_empty() || c.matches.iter().any(|m| match_matches(m, conn)))
    })
}

/// Whether the rule holds a condition ztunnel cannot evaluate.
fn has_unsupported(r: &Rule) -> bool {
    r.clauses.iter().flat_map(|c| &c.matches).any(|m| m.unsupported)
}

/// Identity-based fields need an identity: a plaintext peer matches no
/// positive one and is excluded by no negated one (as in Istio's ztunnel).
fn match_matches(m: &Match, conn: &ConnectionAttributes) -> bool {
    if m.is_empty() {
        // Istio's ztunnel skips a match with no condition: it matches nothing.
        return false;
    }
    let id = conn.src_identity.as_ref();
    let principal = |s: &StringMatch| id.is_some_and(|id| principal_matches(s, id));
    let namespace = |s: &StringMatch| id.is_some_and(|id| string_matches(s, &id.namespace));
    let service_account = |s: &ServiceAccountMatch| {
        id.is_some_and(|id| id.namespace == s.namespace && id.service_account == s.service_account)
    };
    let src = |n: &ipnet::IpNet| n.contains(&conn.src_ip);
    let dst = |n: &ipnet::IpNet| n.contains(&conn.dst_ip);
    let port = |p: &u16| *p == conn.dst_port;
    all_or_empty(&m.principals, principal)
        && all_or_empty(&m.namespaces, namespace)
        && all_or_empty(&m.service_accounts, service_account)
        && all_or_empty(&m.source_ips, src)
        && all_or_empty(&m.destination_ips, dst)
        && all_or_empty(&m.destination_ports, port)
        && !m.not_principals.iter().any(principal)
        && !m.not_namespaces.iter().any(namespace)
        && !m.not_service_accounts.iter().any(service_account)
        && !m.not_source_ips.iter().any(src)
        && !m.not_destination_ips.iter().any(dst)
        && !m.not_destination_ports.iter().any(port)
}

/// A positive field: unset matches, set needs one value to match.
fn all_or_empty<T>(values: &[T], f: impl FnMut(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

fn string_matches(m: &StringMatch, v: &str) -> bool {
    match m {
        StringMatch::Exact(s) => v == s,
        StringMatch::Prefix(s) => v.starts_with(s.as_str()),
        StringMatch::Suffix(s) => v.ends_with(s.as_str()),
        StringMatch::Presence => !v.is_empty(),
    }
}

/// Matches against `<td>/ns/<ns>/sa/<sa>` (the SPIFFE ID without its scheme).
fn principal_matches(m: &StringMatch, id: &Identity) -> bool {
    id.principal_matches(match m {
        StringMatch::Exact(s) => PrincipalPattern::Exact(s),
        StringMatch::Prefix(s) => PrincipalPattern::Prefix(s),
        StringMatch::Suffix(s) => PrincipalPattern::Suffix(s),
        StringMatch::Presence => PrincipalPattern::Presence,
    })
}

#[cfg(test)]
mod tests {
    use super::super::model::{Clause, Rule, Scope};
    use super::*;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity { trust_domain: "cluster.local".into(), namespace: ns.into(), service_account: sa.into() }
    }

    fn conn(src: Option<Identity>) -> ConnectionAttributes {
        ConnectionAttributes {
            src_identity: src,
            src_ip: "10.1.0.2".parse().unwrap(),
            dst_ip: "10.1.0.3".parse().unwrap(),
            dst_port: 8080,
        }
    }

    fn policy(name: &str, scope: Scope, action: Action, m: Match) -> Authorization {
        let rules = vec![Rule { clauses: vec![Clause { matches: vec![m] }] }];
        Authorization { name: name.into(), namespace: "default".into(), scope, action, rules, dry_run: false }
    }

    /// Matches every connection of these tests (all IPv4); an empty `Match`
    /// would match none.
    fn any_connection() -> Match {
        Match { source_ips: vec!["0.0.0.0/0".parse().unwrap()], ..Default::default() }
    }

    fn dst() -> Workload {
        Workload {
            uid: "server".into(),
            namespace: "default".into(),
            addresses: vec!["10.1.0.3".parse().unwrap()],
            authorization_policies: vec!["default/selected".into()],
            ..Default::default()
        }
    }

    fn state(policies: Vec<Authorization>) -> ProxyState {
        ProxyState::new(vec![dst()], vec![], policies, "cluster.local").unwrap()
    }

    fn decide(policies: Vec<Authorization>, c: &ConnectionAttributes) -> Result<(), Denied> {
        state(policies).authorize(c, &dst())
    }

    fn exact(s: &str) -> StringMatch {
        StringMatch::Exact(s.into())
    }

    /// A principal as Istio writes it: the SPIFFE ID without its scheme.
    const CLIENT: &str = "cluster.local/ns/default/sa/client";

    #[test]
    fn no_policy_allows() {
        assert_eq!(decide(vec![], &conn(None)), Ok(()));
    }

    #[test]
    fn deny_policy_takes_precedence_over_allow() {
        let allow = policy("allow", Scope::Namespace, Action::Allow, any_connection());
        let deny = policy(
            "deny",
            Scope::Global,
            Action::Deny,
            Match { principals: vec![exact(CLIENT)], ..Default::default() },
        );
        let denied = decide(vec![allow, deny], &conn(Some(id("default", "client")))).unwrap_err();
        assert_eq!(denied, Denied { policy: Some("default/deny".into()), reason: "denied by policy" });
        assert_eq!(denied.to_string(), "denied by policy (default/deny)");
    }

    #[test]
    fn deny_that_does_not_match_and_no_allow_allows() {
        let deny = policy(
            "deny",
            Scope::Global,
            Action::Deny,
            Match { principals: vec![exact(CLIENT)], ..Default::default() },
        );
        assert_eq!(decide(vec![deny], &conn(Some(id("default", "other")))), Ok(()));
    }

    #[test]
    fn allow_that_matches_nothing_denies() {
        let allow = policy(
            "allow",
            Scope::Namespace,
            Action::Allow,
            Match { destination_ports: vec![1], ..Default::default() },
        );
        let denied = decide(vec![allow], &conn(None)).unwrap_err();
        assert_eq!(denied, Denied { policy: None, reason: "no allow policy matched" });
        let no_rules = Authorization { name: "empty".into(), namespace: "default".into(), ..Default::default() };
        assert!(decide(vec![no_rules], &conn(None)).is_err(), "a policy with no rules matches nothing");
    }

    #[test]
    fn a_rule_without_clauses_matches_everything() {
        let allow_all = Authorization {
            name: "all".into(),
            namespace: "default".into(),
            rules: vec![Rule::default()],
            ..Default::default()
        };
        assert_eq!(decide(vec![allow_all], &conn(None)), Ok(()));
    }

    #[test]
    fn policies_of_other_namespaces_and_unlisted_selectors_do_not_apply() {
        let mut other_ns = policy("n", Scope::Namespace, Action::Deny, any_connection());
        other_ns.namespace = "other".into();
        let unlisted = policy("unlisted", Scope::WorkloadSelector, Action::Deny, any_connection());
        assert_eq!(decide(vec![other_ns, unlisted], &conn(None)), Ok(()));
        let listed = policy("selected", Scope::WorkloadSelector, Action::Deny, any_connection());
        assert!(decide(vec![listed], &conn(None)).is_err());
    }

    fn allowed_by(m: Match, c: &ConnectionAttributes) -> bool {
        decide(vec![policy("p", Scope::Global, Action::Allow, m)], c).is_ok()
    }

    #[test]
    fn principals_match_the_spiffe_id_without_scheme_exactly_by_prefix_or_suffix() {
        let client = conn(Some(id("default", "client")));
        let m = |s: StringMatch| Match { principals: vec![s], ..Default::default() };
        assert!(allowed_by(m(exact(CLIENT)), &client));
        assert!(!allowed_by(m(exact("cluster.local/ns/default/sa/clien")), &client));
        assert!(!allowed_by(m(exact("cluster.local/ns/default/sa/clientx")), &client));
        assert!(!allowed_by(m(exact("other.td/ns/default/sa/client")), &client));
        assert!(allowed_by(m(StringMatch::Prefix("cluster.local/ns/def".into())), &client));
        assert!(allowed_by(m(StringMatch::Prefix(String::new())), &client));
        assert!(!allowed_by(m(StringMatch::Prefix(format!("{CLIENT}x"))), &client));
        assert!(allowed_by(m(StringMatch::Suffix("/sa/client".into())), &client));
        assert!(allowed_by(m(StringMatch::Suffix(CLIENT.into())), &client));
        assert!(!allowed_by(m(StringMatch::Suffix(format!("x{CLIENT}"))), &client));
        assert!(!allowed_by(m(StringMatch::Suffix("/sa/server".into())), &client));
        assert!(allowed_by(m(StringMatch::Presence), &client));
        assert!(!allowed_by(m(exact(CLIENT)), &conn(None)), "no identity fails a positive principal match");
        assert!(!allowed_by(m(StringMatch::Presence), &conn(None)));
    }

    #[test]
    fn a_pattern_with_the_scheme_matches_only_once_normalised() {
        // Evaluation compares without the scheme; conversion strips it (StringMatch::principal).
        let client = conn(Some(id("default", "client")));
        let m = |s: StringMatch| Match { principals: vec![s], ..Default::default() };
        let full = format!("spiffe://{CLIENT}");
        assert!(!allowed_by(m(exact(&full)), &client));
        assert!(allowed_by(m(exact(&full).principal()), &client));
        assert!(allowed_by(m(StringMatch::Prefix("spiffe://cluster.local/".into()).principal()), &client));
        assert!(allowed_by(m(StringMatch::Suffix(full.clone()).principal()), &client));
        let evil_td = conn(Some(Identity {
            trust_domain: "evil-cluster.local".into(),
            namespace: "default".into(),
            service_account: "client".into(),
        }));
        assert!(!allowed_by(m(StringMatch::Suffix(full).principal()), &evil_td), "a scheme suffix pins the whole ID");
    }

    #[test]
    fn principal_normalisation_strips_only_a_leading_scheme() {
        assert_eq!(exact("spiffe://td/ns/a/sa/b").principal(), exact("td/ns/a/sa/b"));
        assert_eq!(exact("td/ns/a/sa/b").principal(), exact("td/ns/a/sa/b"));
        assert_eq!(StringMatch::Prefix("spiffe://td/".into()).principal(), StringMatch::Prefix("td/".into()));
        assert_eq!(StringMatch::Prefix("spiffe://".into()).principal(), StringMatch::Prefix(String::new()));
        assert_eq!(StringMatch::Suffix("spiffe://td/ns/a/sa/b".into()).principal(), exact("td/ns/a/sa/b"));
        assert_eq!(StringMatch::Suffix("/sa/b".into()).principal(), StringMatch::Suffix("/sa/b".into()));
        assert_eq!(StringMatch::Presence.principal(), StringMatch::Presence);
    }

    fn sa(ns: &str, name: &str) -> ServiceAccountMatch {
        ServiceAccountMatch { namespace: ns.into(), service_account: name.into() }
    }

    #[test]
    fn service_accounts_match_namespace_and_name_exactly_and_need_an_identity() {
        let m = Match { service_accounts: vec![sa("default", "client")], ..Default::default() };
        assert!(allowed_by(m.clone(), &conn(Some(id("default", "client")))));
        assert!(!allowed_by(m.clone(), &conn(Some(id("other", "client")))));
        assert!(!allowed_by(m.clone(), &conn(Some(id("default", "clientx")))));
        assert!(!allowed_by(m, &conn(None)), "plaintext never matches a service account");
        let not = Match { not_service_accounts: vec![sa("default", "client")], ..Default::default() };
        assert!(!allowed_by(not.clone(), &conn(Some(id("default", "client")))));
        assert!(allowed_by(not.clone(), &conn(Some(id("default", "other")))));
        assert!(allowed_by(not, &conn(None)), "a peer without identity is not excluded (as in Istio's ztunnel)");
    }

    #[test]
    fn a_rule_with_an_unsupported_match_never_allows_and_always_denies() {
        let unsupported = Match { unsupported: true, ..Default::default() };
        let client = conn(Some(id("default", "client")));
        // Alone, or OR-ed with a match the peer satisfies: the rule is not used to allow.
        assert!(!allowed_by(unsupported.clone(), &client));
        let either = Rule {
            clauses: vec![Clause {
                matches: vec![Match { principals: vec![exact(CLIENT)], ..Default::default() }, unsupported.clone()],
            }],
        };
        let mut allow = policy("p", Scope::Global, Action::Allow, any_connection());
        allow.rules = vec![either.clone()];
        assert!(decide(vec![allow], &client).is_err());
        // In a DENY it matches every peer, even one its other fields would not.
        let mut deny = policy("d", Scope::Global, Action::Deny, any_connection());
        deny.rules = vec![either];
        assert!(decide(vec![deny.clone()], &conn(Some(id("other", "x")))).is_err());
        assert!(decide(vec![deny], &conn(None)).is_err());
        // Other rules of the ALLOW still work.
        let mut allow = policy("p", Scope::Global, Action::Allow, unsupported);
        let by_principal = Match { principals: vec![exact(CLIENT)], ..Default::default() };
        allow.rules.push(Rule { clauses: vec![Clause { matches: vec![by_principal] }] });
        assert_eq!(decide(vec![allow.clone()], &client), Ok(()));
        assert!(decide(vec![allow], &conn(Some(id("default", "other")))).is_err());
    }

    #[test]
    fn namespaces_match_the_source_identity_namespace() {
        let m = Match { namespaces: vec![StringMatch::Prefix("team-".into())], ..Default::default() };
        assert!(allowed_by(m.clone(), &conn(Some(id("team-a", "x")))));
        assert!(!allowed_by(m.clone(), &conn(Some(id("default", "x")))));
        assert!(!allowed_by(m, &conn(None)));
    }

    #[test]
    fn ip_blocks_and_ports_match_source_destination_and_port() {
        let c = conn(None);
        let net = |s: &str| vec![s.parse().unwrap()];
        assert!(allowed_by(Match { source_ips: net("10.0.0.0/8"), ..Default::default() }, &c));
        assert!(!allowed_by(Match { source_ips: net("10.2.0.0/16"), ..Default::default() }, &c));
        assert!(allowed_by(Match { destination_ips: net("10.1.0.3/32"), ..Default::default() }, &c));
        assert!(!allowed_by(Match { destination_ips: net("10.1.0.2/32"), ..Default::default() }, &c));
        assert!(allowed_by(Match { destination_ports: vec![9090, 8080], ..Default::default() }, &c));
        assert!(!allowed_by(Match { destination_ports: vec![9090], ..Default::default() }, &c));
        // Set fields are AND-ed.
        let both = Match { source_ips: net("10.0.0.0/8"), destination_ports: vec![9090], ..Default::default() };
        assert!(!allowed_by(both, &c));
    }

    #[test]
    fn not_fields_exclude_what_they_match() {
        let c = conn(Some(id("default", "client")));
        let net = |s: &str| vec![s.parse().unwrap()];
        assert!(!allowed_by(Match { not_principals: vec![exact(CLIENT)], ..Default::default() }, &c));
        assert!(allowed_by(Match { not_principals: vec![exact("x/ns/a/sa/b")], ..Default::default() }, &c));
        assert!(!allowed_by(Match { not_namespaces: vec![exact("default")], ..Default::default() }, &c));
        assert!(!allowed_by(Match { not_source_ips: net("10.1.0.0/24"), ..Default::default() }, &c));
        assert!(allowed_by(Match { not_source_ips: net("10.9.0.0/24"), ..Default::default() }, &c));
        assert!(!allowed_by(Match { not_destination_ips: net("10.1.0.3/32"), ..Default::default() }, &c));
        assert!(!allowed_by(Match { not_destination_ports: vec![8080], ..Default::default() }, &c));
        assert!(allowed_by(Match { not_destination_ports: vec![80], ..Default::default() }, &c));
    }

    #[test]
    fn not_principals_presence_denies_plaintext_and_passes_any_mtls_peer() {
        let strict = policy(
            "strict",
            Scope::Namespace,
            Action::Deny,
            Match { not_principals: vec![StringMatch::Presence], ..Default::default() },
        );
        assert!(decide(vec![strict.clone()], &conn(None)).is_err());
        assert_eq!(decide(vec![strict], &conn(Some(id("elsewhere", "anyone")))), Ok(()));
    }

    #[test]
    fn a_clause_needs_one_of_its_matches_and_a_rule_all_its_clauses() {
        let port = |p| Match { destination_ports: vec![p], ..Default::default() };
        let clause = |ms: Vec<Match>| Clause { matches: ms };
        let allow = |clauses| Authorization {
            name: "p".into(),
            namespace: "default".into(),
            rules: vec![Rule { clauses }],
            ..Default::default()
        };
        let c = conn(None);
        assert!(decide(vec![allow(vec![clause(vec![port(1), port(8080)])])], &c).is_ok());
        assert!(decide(vec![allow(vec![clause(vec![port(8080)]), clause(vec![port(1)])])], &c).is_err());
    }

    #[test]
    fn an_empty_clause_matches_everything_and_an_empty_match_nothing() {
        let with = |clauses: Vec<Clause>| Authorization {
            name: "p".into(),
            namespace: "default".into(),
            rules: vec![Rule { clauses }],
            ..Default::default()
        };
        let c = conn(Some(id("default", "client")));
        assert!(decide(vec![with(vec![Clause::default()])], &c).is_ok(), "a clause without matches matches");
        let empty_match = Clause { matches: vec![Match::default()] };
        assert!(decide(vec![with(vec![empty_match.clone()])], &c).is_err(), "an ALLOW of an empty match admits none");
        let deny = Authorization { action: Action::Deny, ..with(vec![empty_match]) };
        assert!(decide(vec![deny], &c).is_ok(), "a DENY of an empty match denies none");
    }

    #[test]
    fn dry_run_policies_are_not_enforced() {
        let client = conn(Some(id("default", "client")));
        let by_client = Match { principals: vec![exact(CLIENT)], ..Default::default() };
        let deny = Authorization { dry_run: true, ..policy("d", Scope::Global, Action::Deny, by_client) };
        assert_eq!(decide(vec![deny.clone()], &client), Ok(()), "a dry-run DENY that matches does not deny");
        assert!(decide(vec![Authorization { dry_run: false, ..deny }], &client).is_err());
        let nobody = Match { destination_ports: vec![1], ..Default::default() };
        let allow = Authorization { dry_run: true, ..policy("a", Scope::Global, Action::Allow, nobody) };
        assert_eq!(decide(vec![allow.clone()], &client), Ok(()), "a dry-run ALLOW restricts nothing");
        assert!(decide(vec![Authorization { dry_run: false, ..allow }], &client).is_err());
    }
}
