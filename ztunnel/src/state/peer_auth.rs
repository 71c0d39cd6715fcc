//! PeerAuthentication (mTLS mode) compiled to L4 authorization the way Istio
//! does for ztunnel: each namespace whose effective mode is STRICT gets a
//! Namespace-scoped DENY of connections without a peer identity.

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;

use super::model::{Action, Authorization, Clause, Match, Rule, Scope, StringMatch};
use super::StateError;

/// Name of the generated STRICT policy (Istio's name, so tooling recognises it).
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";

/// Mutual-TLS mode of a PeerAuthentication.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the mesh-wide setting.
    #[default]
    Unset,
    /// Accept mTLS and plaintext (also the mode when nothing is set).
    Permissive,
    /// Accept only mTLS.
    Strict,
}

/// A namespace-wide or (in the root namespace) mesh-wide mTLS mode.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthentication {
    /// Namespace it applies to; the root namespace means the whole mesh.
    pub namespace: String,
    /// Mode; `UNSET` inherits.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// The DENY policies that enforce `peer_auths` in `namespaces` (every
/// namespace the state knows; a mesh-wide STRICT reaches only those).
pub fn compile<'a>(
    peer_auths: &'a [PeerAuthentication],
    namespaces: impl IntoIterator<Item = &'a str>,
    root_namespace: &str,
) -> Result<Vec<Authorization>, StateError> {
    let mut by_ns = HashMap::new();
    for pa in peer_auths {
        if by_ns.insert(pa.namespace.as_str(), pa.mode).is_some() {
            return Err(StateError::DuplicatePeerAuthentication(pa.namespace.clone()));
        }
    }
    let mesh = by_ns.get(root_namespace).copied().unwrap_or_default();
    let namespaces: BTreeSet<&str> = namespaces.into_iter().chain(by_ns.keys().copied()).collect();
    let strict = namespaces.into_iter().filter(|ns| {
        let own = by_ns.get(ns).copied().unwrap_or_default();
        let effective = if own == MtlsMode::Unset { mesh } else { own };
        effective == MtlsMode::Strict
    });
    Ok(strict.map(strict_policy).collect())
}

fn strict_policy(namespace: &str) -> Authorization {
    let no_identity = Match { not_principals: vec![StringMatch::Presence], ..Default::default() };
    Authorization {
        name: STATIC_STRICT_POLICY.to_owned(),
        namespace: namespace.to_owned(),
        scope: Scope::Namespace,
        action: Action::Deny,
        rules: vec![Rule { clauses: vec![Clause { matches: vec![no_identity] }] }],
        dry_run: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pa(ns: &str, mode: MtlsMode) -> PeerAuthentication {
        PeerAuthentication { namespace: ns.into(), mode }
    }

    fn strict_namespaces(pas: &[PeerAuthentication], nss: &[&str]) -> Vec<String> {
        compile(pas, nss.iter().copied(), "ambit-system").unwrap().into_iter().map(|p| p.namespace).collect()
    }

    #[test]
    fn no_peer_authentication_is_permissive() {
        assert!(strict_namespaces(&[], &["a", "b"]).is_empty());
    }

    #[test]
    fn mesh_strict_applies_everywhere_except_a_permissive_namespace() {
        let pas = [pa("ambit-system", MtlsMode::Strict), pa("legacy", MtlsMode::Permissive), pa("b", MtlsMode::Unset)];
        assert_eq!(strict_namespaces(&pas, &["a", "b", "legacy"]), vec!["a", "ambit-system", "b"]);
    }

    #[test]
    fn namespace_strict_applies_only_there() {
        let policies = compile(&[pa("a", MtlsMode::Strict)], ["a", "b"], "ambit-system").unwrap();
        assert_eq!(policies, vec![strict_policy("a")]);
        assert_eq!(policies[0].name, STATIC_STRICT_POLICY);
        assert_eq!((policies[0].scope, policies[0].action), (Scope::Namespace, Action::Deny));
    }

    #[test]
    fn two_peer_authentications_for_one_namespace_are_an_error() {
        let err = compile(&[pa("a", MtlsMode::Strict), pa("a", MtlsMode::Permissive)], [], "r").unwrap_err();
        assert_eq!(err.to_string(), "duplicate peer authentication for namespace a");
    }
}
