//! PeerAuthentication → L4 DENY policies, the way Istio converts them for
//! ztunnel: a namespace whose effective mode is STRICT gets a namespace-scoped
//! DENY of peers without an identity; a selector-scoped PeerAuthentication
//! becomes a WORKLOAD_SELECTOR policy listed on the workloads it selects.

use std::collections::{BTreeMap, BTreeSet};

use ambit_api::security::{string_match::MatchType, Action, Authorization, Clause, Match, Rule, Scope, StringMatch};

use super::crd::{MtlsMode, PeerAuthentication};
use super::index::validate_labels;
use super::objects::ObjectKey;

/// Name of the generated namespace STRICT policy (Istio's, so tooling recognises it).
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
/// Prefix of policies converted from selector-scoped PeerAuthentications.
pub const CONVERTED_PREFIX: &str = "istio_converted_";

/// Why a PeerAuthentication is rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerAuthError {
    /// The selector is not valid label syntax.
    #[error("bad selector: {0}")]
    BadSelector(String),
    /// A portLevelMtls key is not a port.
    #[error("bad port {0} in portLevelMtls: want 1-65535")]
    BadPort(i64),
    /// portLevelMtls needs a selector (Istio's validation).
    #[error("portLevelMtls requires a selector")]
    PortLevelWithoutSelector,
    /// Another selector-less PeerAuthentication exists in the namespace.
    #[error("namespace already has PeerAuthentication {0:?}; only one without selector is allowed")]
    DuplicateNamespacePolicy(String),
}

/// Namespace-wide (selector-less) modes, by namespace.
#[derive(Debug, Default)]
pub struct NamespaceModes<'a> {
    modes: BTreeMap<&'a str, MtlsMode>,
    mesh: MtlsMode,
}

impl<'a> NamespaceModes<'a> {
    /// Collects the selector-less PeerAuthentications; the first by name in a namespace wins.
    pub fn new(
        pas: &'a BTreeMap<ObjectKey, PeerAuthentication>,
        root_namespace: &str,
        rejected: &mut Vec<(&'a ObjectKey, PeerAuthError)>,
    ) -> Self {
        let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
        let mut modes = BTreeMap::new();
        for (key, pa) in pas {
            if has_selector(pa) {
                continue;
            }
            if !pa.spec.port_level_mtls.is_empty() {
                rejected.push((key, PeerAuthError::PortLevelWithoutSelector));
                continue;
            }
            if let Some(first) = owners.get(key.0.as_str()) {
                rejected.push((key, PeerAuthError::DuplicateNamespacePolicy((*first).to_owned())));
                continue;
            }
            owners.insert(&key.0, &key.1);
            modes.insert(key.0.as_str(), mode(pa));
        }
        let mesh = modes.get(root_namespace).copied().unwrap_or_default();
        Self { modes, mesh }
    }

    /// The effective mode of namespace `ns`: its own, else the mesh's (UNSET means PERMISSIVE).
    pub fn effective(&self, ns: &str) -> MtlsMode {
        match self.modes.get(ns).copied().unwrap_or_default() {
            MtlsMode::Unset => self.mesh,
            own => own,
        }
    }

    /// The STRICT policies for `namespaces_with_workloads` plus every namespace
    /// whose own PeerAuthentication is STRICT.
    pub fn strict_policies<'n>(
        &'n self,
        namespaces_with_workloads: impl Iterator<Item = &'n str>,
    ) -> Vec<Authorization> {
        let own_strict = self.modes.iter().filter(|(_, m)| **m == MtlsMode::Strict).map(|(ns, _)| *ns);
        let all: BTreeSet<&'n str> = namespaces_with_workloads.chain(own_strict).collect();
        all.into_iter()
            .filter(|ns| self.effective(ns) == MtlsMode::Strict)
            .map(|ns| Authorization {
                name: STATIC_STRICT_POLICY.into(),
                namespace: ns.into(),
                scope: Scope::Namespace.into(),
                action: Action::Deny.into(),
                rules: vec![no_identity_rule(Vec::new(), Vec::new())],
                dry_run: false,
            })
            .collect()
    }
}

/// A selector-scoped PeerAuthentication converted.
#[derive(Debug, Default, PartialEq)]
pub struct Converted {
    /// The policy; `None` when the workload mode adds nothing at L4.
    pub authorization: Option<Authorization>,
    /// Notes about parts that cannot be enforced.
    pub warnings: Vec<String>,
}

/// Whether `pa` selects workloads (a non-empty matchLabels).
pub fn has_selector(pa: &PeerAuthentication) -> bool {
    pa.spec.selector.as_ref().is_some_and(|s| !s.match_labels.is_empty())
}

/// Converts a selector-scoped PeerAuthentication given its namespace's effective mode.
pub fn convert_selector(pa: &PeerAuthentication, namespace_mode: MtlsMode) -> Result<Converted, PeerAuthError> {
    let labels = pa.spec.selector.as_ref().map(|s| &s.match_labels);
    if let Some(l) = labels {
        validate_labels(l).map_err(PeerAuthError::BadSelector)?;
    }
    let mut out = Converted::default();
    let workload_mode = match mode(pa) {
        MtlsMode::Unset => namespace_mode,
        m => m,
    };
    let mut strict_ports = Vec::new();
    let mut open_ports = Vec::new();
    for (&port, m) in &pa.spec.port_level_mtls {
        let p = u16::try_from(port).ok().filter(|p| *p != 0).ok_or(PeerAuthError::BadPort(port))?;
        match m.mode {
            MtlsMode::Strict => strict_ports.push(u32::from(p)),
            MtlsMode::Permissive | MtlsMode::Disable => open_ports.push(u32::from(p)),
            MtlsMode::Unset => {}
        }
    }
    let namespace_strict = namespace_mode == MtlsMode::Strict;
    if namespace_strict && (workload_mode != MtlsMode::Strict || !open_ports.is_empty()) {
        // The namespace DENY applies to every workload of the namespace; a DENY cannot be lifted.
        out.warnings.push(
            "a workload or port PERMISSIVE cannot relax the namespace's STRICT mode at L4; STRICT applies".into(),
        );
    }
    let mut rules = Vec::new();
    if workload_mode == MtlsMode::Strict && !namespace_strict {
        rules.push(no_identity_rule(Vec::new(), open_ports));
    } else if !namespace_strict {
        rules.extend(strict_ports.into_iter().map(|p| no_identity_rule(vec![p], Vec::new())));
    }
    if rules.is_empty() {
        return Ok(out);
    }
    out.authorization = Some(Authorization {
        name: format!("{CONVERTED_PREFIX}{}", pa.metadata.name.as_deref().unwrap_or_default()),
        namespace: pa.metadata.namespace.clone().unwrap_or_default(),
        scope: Scope::WorkloadSelector.into(),
        action: Action::Deny.into(),
        rules,
        dry_run: false,
    });
    Ok(out)
}

fn mode(pa: &PeerAuthentication) -> MtlsMode {
    pa.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
}

/// Denies peers without an identity (on `ports`, or all ports but `not_ports`).
fn no_identity_rule(ports: Vec<u32>, not_ports: Vec<u32>) -> Rule {
    let presence = StringMatch { match_type: Some(MatchType::Presence(())) };
    Rule {
        clauses: vec![Clause {
            matches: vec![Match {
                not_principals: vec![presence],
                destination_ports: ports,
                not_destination_ports: not_ports,
                ..Default::default()
            }],
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pa(ns: &str, name: &str, spec: &str) -> (ObjectKey, PeerAuthentication) {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
        );
        ((ns.into(), name.into()), serde_yaml::from_str(&text).unwrap())
    }

    fn namespaces_of(policies: &[Authorization]) -> Vec<&str> {
        policies.iter().map(|p| p.namespace.as_str()).collect()
    }

    #[test]
    fn mesh_wide_strict_covers_namespaces_with_workloads_unless_overridden() {
        let pas = BTreeMap::from([
            pa("ambit-system", "default", "{mtls: {mode: STRICT}}"),
            pa("legacy", "default", "{mtls: {mode: PERMISSIVE}}"),
            pa("other", "default", "{mtls: {mode: UNSET}}"),
        ]);
        let mut rejected = Vec::new();
        let modes = NamespaceModes::new(&pas, "ambit-system", &mut rejected);
        assert!(rejected.is_empty());
        let policies = modes.strict_policies(["default", "legacy", "other"].into_iter());
        assert_eq!(namespaces_of(&policies), vec!["ambit-system", "default", "other"]);
        let p = &policies[1];
        assert_eq!(p.name, STATIC_STRICT_POLICY);
        assert_eq!((p.scope(), p.action()), (Scope::Namespace, Action::Deny));
        let m = &p.rules[0].clauses[0].matches[0];
        assert_eq!(m.not_principals[0].match_type, Some(MatchType::Presence(())));
    }

    #[test]
    fn namespace_strict_without_mesh_strict_covers_only_that_namespace() {
        let pas = BTreeMap::from([pa("secure", "default", "{mtls: {mode: STRICT}}")]);
        let modes = NamespaceModes::new(&pas, "ambit-system", &mut Vec::new());
        let policies = modes.strict_policies(["default"].into_iter());
        assert_eq!(namespaces_of(&policies), vec!["secure"]);
    }

    #[test]
    fn second_namespace_policy_and_port_level_without_selector_are_rejected() {
        let pas = BTreeMap::from([
            pa("a", "first", "{mtls: {mode: STRICT}}"),
            pa("a", "second", "{mtls: {mode: PERMISSIVE}}"),
            pa("b", "ports", "{portLevelMtls: {80: {mode: STRICT}}}"),
        ]);
        let mut rejected = Vec::new();
        let modes = NamespaceModes::new(&pas, "ambit-system", &mut rejected);
        assert_eq!(modes.effective("a"), MtlsMode::Strict);
        assert_eq!(rejected.len(), 2);
        assert_eq!(rejected[0].0 .1, "second");
        assert_eq!(rejected[0].1, PeerAuthError::DuplicateNamespacePolicy("first".into()));
        assert_eq!(rejected[1].1, PeerAuthError::PortLevelWithoutSelector);
    }

    #[test]
    fn selector_strict_with_a_permissive_port_denies_plaintext_on_the_other_ports() {
        let (_, p) = pa(
            "default",
            "web",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8081: {mode: PERMISSIVE}}}",
        );
        let c = convert_selector(&p, MtlsMode::Permissive).unwrap();
        let a = c.authorization.unwrap();
        assert_eq!(a.name, "istio_converted_web");
        assert_eq!(a.scope(), Scope::WorkloadSelector);
        let m = &a.rules[0].clauses[0].matches[0];
        assert_eq!(m.not_destination_ports, vec![8081]);
        assert!(m.destination_ports.is_empty());
    }

    #[test]
    fn selector_port_level_strict_denies_plaintext_on_that_port_only() {
        let (_, p) =
            pa("default", "web", "{selector: {matchLabels: {app: web}}, portLevelMtls: {9000: {mode: STRICT}}}");
        let a = convert_selector(&p, MtlsMode::Unset).unwrap().authorization.unwrap();
        assert_eq!(a.rules[0].clauses[0].matches[0].destination_ports, vec![9000]);
    }

    #[test]
    fn selector_permissive_under_namespace_strict_warns_and_adds_nothing() {
        let (_, p) = pa("default", "web", "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}}");
        let c = convert_selector(&p, MtlsMode::Strict).unwrap();
        assert_eq!(c.authorization, None);
        assert_eq!(c.warnings.len(), 1);
    }

    #[test]
    fn bad_selector_and_bad_port_are_rejected() {
        let (_, p) = pa("default", "x", "{selector: {matchLabels: {'a b': c}}, mtls: {mode: STRICT}}");
        assert!(matches!(convert_selector(&p, MtlsMode::Unset), Err(PeerAuthError::BadSelector(_))));
        let (_, p) = pa("default", "x", "{selector: {matchLabels: {a: c}}, portLevelMtls: {70000: {mode: STRICT}}}");
        assert_eq!(convert_selector(&p, MtlsMode::Unset), Err(PeerAuthError::BadPort(70000)));
    }
}
