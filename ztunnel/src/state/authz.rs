//! L4 authorization with Istio's semantics: DENY first, then ALLOW if any
//! ALLOW applies. Principals are compared against the peer's SPIFFE ID
//! without its scheme (`<td>/ns/<ns>/sa/<sa>`), as Istio's ztunnel does.
//! Evaluation allocates nothing: principals are compared against the ID's
//! pieces without formatting it.
//!
//! A workload served by a waypoint also gets Istio's implicit ALLOW policy
//! for that waypoint's identity (istiod's `istio_allow_waypoint_<ns>_<name>`,
//! `PILOT_AUTO_ALLOW_WAYPOINT_POLICY`), here built into the state rather than
//! sent as a policy: a peer that is not the waypoint (a client that went
//! straight to the pod, plaintext included) is refused unless another ALLOW
//! policy admits it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ambit_identity::{Identity, PrincipalPattern};

use super::model::{
    Action, Authorization, GatewayAddress, GatewayDestination, Match, Rule, ServiceAccountMatch, StringMatch, Workload,
};
use super::ProxyState;

/// [`Denied::reason`] of a connection refused because it did not come from
/// the waypoint that serves its destination.
pub const NOT_FROM_WAYPOINT: &str = "not from the destination's waypoint";

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

impl Denied {
    /// Whether the connection was refused for not coming from the waypoint
    /// that serves its destination (no ALLOW policy of the user applied).
    pub fn not_from_waypoint(&self) -> bool {
        self.reason == NOT_FROM_WAYPOINT
    }
}

impl ProxyState {
    /// Decides whether `conn` may reach `dst`. Applicable policies: Global
    /// ones, Namespace ones in `dst`'s namespace, and those `dst` lists. Any
    /// matching DENY denies; otherwise, if an ALLOW applies, one must match.
    /// When a waypoint serves `dst` (see [`ProxyState::waypoint_identities`])
    /// an ALLOW of the waypoint's identity applies too, as Istio's implicit
    /// policy: the waypoint passes, anyone else needs another ALLOW.
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
        let waypoints = self.waypoint_peers.get(dst.uid.as_str());
        if let (Some(ids), Some(id)) = (waypoints, &conn.src_identity) {
            if ids.contains(id) {
                return Ok(());
            }
        }
        let mut allows = applicable().filter(|p| p.action == Action::Allow && !p.dry_run).peekable();
        let none_applies = allows.peek().is_none();
        if (none_applies && waypoints.is_none()) || allows.any(|p| policy_matches(p, conn)) {
            return Ok(());
        }
        let reason = if none_applies { NOT_FROM_WAYPOINT } else { "no allow policy matched" };
        Err(Denied { policy: None, reason })
    }
}

/// For each workload served by a waypoint, the identities that waypoint's
/// implicit ALLOW admits, following istiod (`implicitWaypointPolicies`): the
/// workload's own waypoint and the waypoint of every service it backs, each
/// resolved to the identities of its workloads (the one at its address, or
/// every workload backing its service, healthy or not: a waypoint pod that
/// is not ready may still be forwarding). A waypoint that is no known
/// workload admits no one: the workload is then reachable only as other
/// ALLOW policies say, as its clients cannot reach the waypoint either.
pub(super) fn waypoint_peers(st: &ProxyState) -> HashMap<String, Arc<[Identity]>> {
    let mut backers = vec![Vec::new(); st.services.len()];
    for (widx, w) in st.workloads.iter().enumerate() {
        for key in w.services.keys() {
            if let Some(&sidx) = st.by_service_key.get(key) {
                backers[sidx].push(widx);
            }
        }
    }
    let workloads_of = |wp: &GatewayAddress| -> &[usize] {
        let service = match &wp.destination {
            GatewayDestination::Address { ip, .. } => match st.by_ip.get(ip) {
                Some(widx) => return std::slice::from_ref(widx),
                None => st.by_vip.get(ip).copied(),
            },
            GatewayDestination::Hostname { .. } => {
                wp.destination.service_key().and_then(|k| st.by_service_key.get(&k).copied())
            }
        };
        service.map_or(&[], |sidx| &backers[sidx])
    };
    let mut resolved: HashMap<&GatewayDestination, &[usize]> = HashMap::new();
    let mut shared: HashMap<Vec<Identity>, Arc<[Identity]>> = HashMap::new();
    let mut peers = HashMap::new();
    for w in &st.workloads {
        let of_services = w.services.keys().filter_map(|k| st.service_by_key(k)?.waypoint.as_ref());
        let mut served = false;
        let mut ids = Vec::new();
        for wp in w.waypoint.iter().chain(of_services) {
            served = true;
            let widxs = *resolved.entry(&wp.destination).or_insert_with(|| workloads_of(wp));
            ids.extend(widxs.iter().map(|&i| st.workloads[i].identity()));
        }
        if !served {
            continue;
        }
        ids.sort();
        ids.dedup();
        let ids = shared.entry(ids).or_insert_with_key(|ids| ids.as_slice().into()).clone();
        peers.insert(w.uid.clone(), ids);
    }
    peers
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

    // Istio's implicit allow-from-waypoint policy.

    use super::super::model::{GatewayAddress, GatewayDestination, HealthStatus, Service};
    use std::collections::BTreeMap;

    const ECHO: &str = "default/echo.default.svc";
    const WAYPOINT_SVC: &str = "default/waypoint.default.svc";

    /// A workload of service account `sa` at `ip` backing `services`.
    fn pod(uid: &str, sa: &str, ip: &str, services: &[&str]) -> Workload {
        Workload {
            uid: uid.into(),
            namespace: "default".into(),
            service_account: sa.into(),
            addresses: vec![ip.parse().unwrap()],
            services: services.iter().map(|s| (s.to_string(), vec![])).collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    fn svc(name: &str, vip: &str, waypoint: Option<GatewayAddress>) -> Service {
        Service {
            name: name.into(),
            namespace: "default".into(),
            hostname: format!("{name}.default.svc"),
            vips: vec![vip.parse().unwrap()],
            waypoint,
            ..Default::default()
        }
    }

    fn by_host(hostname: &str) -> Option<GatewayAddress> {
        let destination = GatewayDestination::Hostname { namespace: "default".into(), hostname: hostname.into() };
        Some(GatewayAddress { destination, hbone_mtls_port: 15008 })
    }

    fn by_ip(ip: &str) -> Option<GatewayAddress> {
        let destination = GatewayDestination::Address { network: String::new(), ip: ip.parse().unwrap() };
        Some(GatewayAddress { destination, hbone_mtls_port: 15008 })
    }

    /// `server` (10.1.0.3) backs `echo`, whose waypoint is `echo_wp`, and has
    /// its own waypoint `own_wp`; `plain` (10.1.0.4) backs a service without
    /// one; the waypoint pod (service account `waypoint`, 10.1.0.50) backs
    /// the service `waypoint` (VIP 10.96.0.50); `wp2` (service account `wp2`,
    /// 10.1.0.60) is another waypoint's pod.
    fn mesh(
        echo_wp: Option<GatewayAddress>,
        own_wp: Option<GatewayAddress>,
        policies: Vec<Authorization>,
    ) -> ProxyState {
        let mut server = pod("server", "server", "10.1.0.3", &[ECHO]);
        server.waypoint = own_wp;
        server.authorization_policies = vec!["default/selected".into()];
        let workloads = vec![
            server,
            pod("plain", "plain", "10.1.0.4", &["default/plain.default.svc"]),
            pod("waypoint", "waypoint", "10.1.0.50", &[WAYPOINT_SVC]),
            pod("wp2", "wp2", "10.1.0.60", &[]),
        ];
        let services = vec![
            svc("echo", "10.96.0.10", echo_wp),
            svc("plain", "10.96.0.11", None),
            svc("waypoint", "10.96.0.50", None),
        ];
        ProxyState::new(workloads, services, policies, "cluster.local").unwrap()
    }

    fn to(st: &ProxyState, uid: &str, from: Option<Identity>) -> Result<(), Denied> {
        st.authorize(&conn(from), st.workload_by_uid(uid).unwrap())
    }

    #[test]
    fn a_workload_behind_its_services_waypoint_admits_only_that_waypoint() {
        let st = mesh(by_host("waypoint.default.svc"), None, vec![]);
        assert_eq!(st.waypoint_identities("server"), Some(&[id("default", "waypoint")][..]));
        assert_eq!(to(&st, "server", Some(id("default", "waypoint"))), Ok(()), "the waypoint's own connection");
        let bypass = to(&st, "server", Some(id("default", "client"))).unwrap_err();
        assert_eq!(bypass, Denied { policy: None, reason: NOT_FROM_WAYPOINT });
        assert!(bypass.not_from_waypoint());
        assert!(to(&st, "server", None).unwrap_err().not_from_waypoint(), "plaintext has no identity: refused");
        let other_td = Identity::new("evil.local", "default", "waypoint");
        assert!(to(&st, "server", Some(other_td)).is_err(), "the whole identity must match, trust domain too");
        // A workload no waypoint serves is unaffected, plaintext included.
        assert_eq!(st.waypoint_identities("plain"), None);
        assert_eq!(to(&st, "plain", Some(id("default", "client"))), Ok(()));
        assert_eq!(to(&st, "plain", None), Ok(()));
    }

    #[test]
    fn the_workloads_own_waypoint_and_its_services_waypoints_are_all_admitted() {
        // Own waypoint by address (a pod), the service's by VIP.
        let st = mesh(by_ip("10.96.0.50"), by_ip("10.1.0.60"), vec![]);
        let want = [id("default", "waypoint"), id("default", "wp2")];
        assert_eq!(st.waypoint_identities("server"), Some(&want[..]));
        for wp in want {
            assert_eq!(to(&st, "server", Some(wp.clone())), Ok(()), "{wp}");
        }
        assert!(to(&st, "server", Some(id("default", "client"))).unwrap_err().not_from_waypoint());
        // Only its own waypoint: the same rule, whichever way it is addressed.
        let st = mesh(None, by_host("waypoint.default.svc"), vec![]);
        assert_eq!(to(&st, "server", Some(id("default", "waypoint"))), Ok(()));
        assert!(to(&st, "server", Some(id("default", "wp2"))).is_err());
    }

    #[test]
    fn every_workload_behind_the_waypoints_service_counts_healthy_or_not() {
        let mut st = mesh(by_host("waypoint.default.svc"), None, vec![]);
        let mut workloads: Vec<Workload> = st.workloads().map(|w| (**w).clone()).collect();
        let mut draining = pod("waypoint-old", "waypoint-old", "10.1.0.51", &[WAYPOINT_SVC]);
        draining.status = HealthStatus::Unhealthy;
        workloads.push(draining);
        let services = st.services().map(|s| (**s).clone()).collect();
        st = ProxyState::new(workloads, services, vec![], "cluster.local").unwrap();
        assert_eq!(to(&st, "server", Some(id("default", "waypoint-old"))), Ok(()), "a waypoint pod not ready");
        assert_eq!(to(&st, "server", Some(id("default", "waypoint"))), Ok(()));
    }

    #[test]
    fn a_waypoint_that_is_no_known_workload_admits_no_one() {
        for wp in [by_ip("10.9.9.9"), by_host("missing.default.svc")] {
            let st = mesh(wp.clone(), None, vec![]);
            assert_eq!(st.waypoint_identities("server"), Some(&[][..]), "{wp:?}");
            assert!(to(&st, "server", Some(id("default", "waypoint"))).unwrap_err().not_from_waypoint());
            assert!(to(&st, "server", Some(id("default", "client"))).is_err());
        }
    }

    #[test]
    fn the_waypoint_rule_is_one_allow_among_the_others_and_deny_still_comes_first() {
        let by = |p: &str| Match { principals: vec![exact(p)], ..Default::default() };
        let allow_client = policy("selected", Scope::WorkloadSelector, Action::Allow, by(CLIENT));
        let st = mesh(by_host("waypoint.default.svc"), None, vec![allow_client]);
        // Istio's policies are OR-ed: an ALLOW of the user admits the client straight to the pod...
        assert_eq!(to(&st, "server", Some(id("default", "client"))), Ok(()));
        // ...and the waypoint passes though that ALLOW does not name it.
        assert_eq!(to(&st, "server", Some(id("default", "waypoint"))), Ok(()));
        let other = to(&st, "server", Some(id("default", "other"))).unwrap_err();
        assert_eq!(other.reason, "no allow policy matched", "an ALLOW of the user applied");
        assert!(!other.not_from_waypoint());

        let deny_waypoint = policy("deny", Scope::Namespace, Action::Deny, by("cluster.local/ns/default/sa/waypoint"));
        let st = mesh(by_host("waypoint.default.svc"), None, vec![deny_waypoint]);
        let denied = to(&st, "server", Some(id("default", "waypoint"))).unwrap_err();
        assert_eq!(denied.policy.as_deref(), Some("default/deny"), "a DENY applies to the waypoint too");
        // A dry-run ALLOW does not count as an ALLOW of the user: the waypoint rule decides.
        let dry =
            Authorization { dry_run: true, ..policy("selected", Scope::WorkloadSelector, Action::Allow, by(CLIENT)) };
        let st = mesh(by_host("waypoint.default.svc"), None, vec![dry]);
        assert!(to(&st, "server", Some(id("default", "client"))).unwrap_err().not_from_waypoint());
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
