//! Authorization resources in exactly the form Istio's control plane writes
//! them for ztunnel (pilot's ambient conversion of AuthorizationPolicy and
//! PeerAuthentication: principals without the `spiffe://` scheme, `*` as
//! presence, `x*`/`*x` as prefix/suffix, `serviceAccounts` as
//! `ServiceAccountMatch` with a bare name in the policy's namespace, a
//! clause for `to`, then one for `from`, then one per `when`), carried over
//! the wire, converted and decided on.

use ambit_api::security as pb_sec;
use ambit_identity::Identity;
use pb_sec::string_match::MatchType;
use prost::Message;

use super::super::{ConnectionAttributes, ProxyState, Workload};
use super::*;

/// The destination: `foo/server`, listing the selector-scoped policies below.
fn server() -> Workload {
    Workload {
        uid: "cluster1//Pod/foo/server".into(),
        name: "server".into(),
        namespace: "foo".into(),
        service_account: "server".into(),
        addresses: vec!["10.1.0.3".parse().unwrap()],
        authorization_policies: vec![
            "foo/allow-sleep-sa".into(),
            "foo/allow-bare-sa".into(),
            "istio-system/istio_converted_static_strict".into(),
        ],
        ..Default::default()
    }
}

fn peer(ns: &str, sa: &str) -> Option<Identity> {
    Some(Identity { trust_domain: "cluster.local".into(), namespace: ns.into(), service_account: sa.into() })
}

fn conn(src: Option<Identity>) -> ConnectionAttributes {
    ConnectionAttributes {
        src_identity: src,
        src_ip: "10.1.0.2".parse().unwrap(),
        dst_ip: "10.1.0.3".parse().unwrap(),
        dst_port: 8080,
    }
}

/// Sent over the wire as xDS carries it, then converted as ztunnel does.
fn received(a: pb_sec::Authorization) -> Authorization {
    let bytes = a.encode_to_vec();
    Authorization::try_from(pb_sec::Authorization::decode(bytes.as_slice()).unwrap()).unwrap()
}

/// Whether `src` may reach the server under `policies` alone.
fn allowed(policies: &[pb_sec::Authorization], src: Option<Identity>) -> bool {
    let policies = policies.iter().cloned().map(received).collect();
    let state = ProxyState::new(vec![server()], vec![], policies, "cluster.local").unwrap();
    state.authorize(&conn(src), &server()).is_ok()
}

fn sm(t: MatchType) -> pb_sec::StringMatch {
    pb_sec::StringMatch { match_type: Some(t) }
}

fn exact(s: &str) -> pb_sec::StringMatch {
    sm(MatchType::Exact(s.into()))
}

fn service_account(ns: &str, sa: &str) -> pb_sec::ServiceAccountMatch {
    pb_sec::ServiceAccountMatch { namespace: ns.into(), service_account: sa.into() }
}

/// A policy whose rules each have the given clauses, each an OR of matches.
fn policy(
    ns: &str,
    name: &str,
    scope: pb_sec::Scope,
    action: pb_sec::Action,
    rules: Vec<Vec<Vec<pb_sec::Match>>>,
) -> pb_sec::Authorization {
    pb_sec::Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: scope as i32,
        action: action as i32,
        rules: rules
            .into_iter()
            .map(|clauses| pb_sec::Rule {
                clauses: clauses.into_iter().map(|matches| pb_sec::Clause { matches }).collect(),
            })
            .collect(),
        dry_run: false,
    }
}

/// One rule with one clause of one match (e.g. `from: [{source: {...}}]`), namespace-wide in `foo`.
fn from_rule(action: pb_sec::Action, m: pb_sec::Match) -> pb_sec::Authorization {
    policy("foo", "p", pb_sec::Scope::Namespace, action, vec![vec![vec![m]]])
}

/// An `extensions` entry as a control plane would write one: an embedded
/// message (here a `google.protobuf.Any`) that Ambit does not know.
fn extension() -> Vec<u8> {
    let mut any = Vec::new();
    prost::encoding::string::encode(1, &"type.googleapis.com/istio.security.SomeExtension".to_owned(), &mut any);
    prost::encoding::bytes::encode(2, &vec![0x0a, 0x03, b'a', b'b', b'c'], &mut any);
    any
}

const ALLOW: pb_sec::Action = pb_sec::Action::Allow;
const DENY: pb_sec::Action = pb_sec::Action::Deny;

#[test]
fn deny_by_principal_without_scheme_denies_that_peer_only() {
    // action: DENY, from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    let m = pb_sec::Match { principals: vec![exact("cluster.local/ns/default/sa/sleep")], ..Default::default() };
    let deny = [from_rule(DENY, m)];
    assert!(!allowed(&deny, peer("default", "sleep")));
    assert!(allowed(&deny, peer("default", "other")));
    assert!(allowed(&deny, peer("other", "sleep")));
    assert!(allowed(&deny, None));
}

#[test]
fn allow_by_principal_without_scheme_admits_that_peer_only() {
    let m = pb_sec::Match { principals: vec![exact("cluster.local/ns/default/sa/sleep")], ..Default::default() };
    let allow = [from_rule(ALLOW, m)];
    assert!(allowed(&allow, peer("default", "sleep")));
    assert!(!allowed(&allow, peer("default", "other")));
    assert!(!allowed(&allow, None));
}

#[test]
fn allow_by_service_account_admits_only_that_account() {
    // selector: {app: server}, from: [{source: {serviceAccounts: ["default/sleep"]}}]
    let m = pb_sec::Match { service_accounts: vec![service_account("default", "sleep")], ..Default::default() };
    let allow = [policy("foo", "allow-sleep-sa", pb_sec::Scope::WorkloadSelector, ALLOW, vec![vec![vec![m]]])];
    assert!(allowed(&allow, peer("default", "sleep")));
    assert!(!allowed(&allow, peer("default", "other")), "before fields 11/12 existed this admitted everyone");
    assert!(!allowed(&allow, peer("foo", "sleep")));
    assert!(!allowed(&allow, None));
}

#[test]
fn a_bare_service_account_is_written_in_the_policy_namespace() {
    // In namespace foo, serviceAccounts: ["sleep"] is written as {namespace: foo, serviceAccount: sleep}.
    let m = pb_sec::Match { service_accounts: vec![service_account("foo", "sleep")], ..Default::default() };
    let allow = [policy("foo", "allow-bare-sa", pb_sec::Scope::WorkloadSelector, ALLOW, vec![vec![vec![m]]])];
    assert!(allowed(&allow, peer("foo", "sleep")));
    assert!(!allowed(&allow, peer("default", "sleep")));
}

#[test]
fn deny_by_not_service_accounts_spares_the_listed_account_and_plaintext() {
    // action: DENY, from: [{source: {notServiceAccounts: ["default/sleep"]}}]
    let m = pb_sec::Match { not_service_accounts: vec![service_account("default", "sleep")], ..Default::default() };
    let deny = [from_rule(DENY, m)];
    assert!(allowed(&deny, peer("default", "sleep")));
    assert!(!allowed(&deny, peer("default", "other")));
    // As in Istio's ztunnel: a negated identity field does not exclude a peer without identity.
    assert!(!allowed(&deny, None));
}

#[test]
fn static_strict_policy_denies_plaintext_only() {
    // PeerAuthentication STRICT in the root namespace, as pilot writes it for ztunnel.
    let m = pb_sec::Match { not_principals: vec![sm(MatchType::Presence(()))], ..Default::default() };
    let strict = [policy(
        "istio-system",
        "istio_converted_static_strict",
        pb_sec::Scope::WorkloadSelector,
        DENY,
        vec![vec![vec![m]]],
    )];
    assert!(!allowed(&strict, None));
    assert!(allowed(&strict, peer("anywhere", "anyone")));
}

#[test]
fn principal_wildcards_become_presence_prefix_and_suffix() {
    let by = |t| [from_rule(ALLOW, pb_sec::Match { principals: vec![sm(t)], ..Default::default() })];
    // principals: ["*"]
    assert!(allowed(&by(MatchType::Presence(())), peer("x", "y")));
    assert!(!allowed(&by(MatchType::Presence(())), None));
    // principals: ["cluster.local/ns/default/*"]
    let prefix = by(MatchType::Prefix("cluster.local/ns/default/".into()));
    assert!(allowed(&prefix, peer("default", "a")));
    assert!(!allowed(&prefix, peer("defaultx", "a")));
    // principals: ["*/sa/sleep"]
    let suffix = by(MatchType::Suffix("/sa/sleep".into()));
    assert!(allowed(&suffix, peer("any", "sleep")));
    assert!(!allowed(&suffix, peer("any", "asleep")));
}

#[test]
fn to_from_and_when_clauses_are_anded() {
    // action: DENY, from: [{source: {namespaces: [bad]}}], to: [{operation: {ports: ["8080"]}}],
    // when: [{key: source.principal, notValues: ["cluster.local/ns/bad/sa/admin"]}]
    let to = pb_sec::Match { destination_ports: vec![8080], ..Default::default() };
    let from = pb_sec::Match { namespaces: vec![exact("bad")], ..Default::default() };
    let when = pb_sec::Match { not_principals: vec![exact("cluster.local/ns/bad/sa/admin")], ..Default::default() };
    let deny = [policy("foo", "p", pb_sec::Scope::Namespace, DENY, vec![vec![vec![to], vec![from], vec![when]]])];
    assert!(!allowed(&deny, peer("bad", "x")));
    assert!(allowed(&deny, peer("bad", "admin")));
    assert!(allowed(&deny, peer("good", "x")));
}

#[test]
fn an_extension_decodes_from_the_wire() {
    // Field 13 written as an embedded message by hand, as another implementation would send it.
    let mut bytes = pb_sec::Match { principals: vec![exact("td/ns/a/sa/b")], ..Default::default() }.encode_to_vec();
    prost::encoding::bytes::encode(13, &extension(), &mut bytes);
    let m = pb_sec::Match::decode(bytes.as_slice()).unwrap();
    assert_eq!(m.extensions, vec![extension()]);
    assert_eq!(m.principals, vec![exact("td/ns/a/sa/b")]);
}

#[test]
fn an_allow_rule_with_an_extension_never_matches() {
    let m = pb_sec::Match {
        principals: vec![exact("cluster.local/ns/default/sa/sleep")],
        extensions: vec![extension()],
        ..Default::default()
    };
    let allow = [from_rule(ALLOW, m)];
    assert!(!allowed(&allow, peer("default", "sleep")));
    assert!(!allowed(&allow, None));
    // An extension with nothing else is not an empty match that admits everyone.
    let only = [from_rule(ALLOW, pb_sec::Match { extensions: vec![extension()], ..Default::default() })];
    assert!(!allowed(&only, peer("default", "sleep")));
}

#[test]
fn a_deny_rule_with_an_extension_always_matches() {
    let m = pb_sec::Match { namespaces: vec![exact("nobody")], extensions: vec![extension()], ..Default::default() };
    let deny = [from_rule(DENY, m)];
    assert!(!allowed(&deny, peer("default", "sleep")));
    assert!(!allowed(&deny, None));
}
