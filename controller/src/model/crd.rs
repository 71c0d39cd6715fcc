//! Serde types for the custom resources the model reads: Istio's
//! `AuthorizationPolicy` and `PeerAuthentication` (`security.istio.io/v1`) and
//! Gateway API's `Gateway`. They follow the published schemas; the Istio ones
//! are closed (unknown fields are errors, as the API server would reject them).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// A custom resource: the Kubernetes envelope around a spec.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource<S> {
    /// `group/version`.
    pub api_version: String,
    /// Kind, e.g. `AuthorizationPolicy`.
    pub kind: String,
    /// Name, namespace, labels…
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The spec; an absent spec is the default one.
    #[serde(default)]
    pub spec: S,
    /// Status written by controllers; ignored.
    #[serde(default)]
    pub status: Option<serde_yaml::Value>,
}

/// `security.istio.io/v1` AuthorizationPolicy.
pub type AuthorizationPolicy = Resource<AuthorizationPolicySpec>;
/// `security.istio.io/v1` PeerAuthentication.
pub type PeerAuthentication = Resource<PeerAuthenticationSpec>;
/// `gateway.networking.k8s.io/v1` Gateway.
pub type Gateway = Resource<GatewaySpec>;

/// Istio's `WorkloadSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Istio's `PolicyTargetReference` (policies attached to a waypoint or gateway).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// API group of the target.
    #[serde(default)]
    pub group: String,
    /// Kind of the target.
    #[serde(default)]
    pub kind: String,
    /// Name of the target.
    #[serde(default)]
    pub name: String,
    /// Namespace of the target (must be the policy's own).
    #[serde(default)]
    pub namespace: String,
}

/// AuthorizationPolicy action.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthorizationAction {
    /// Allow matching requests (the default).
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Log matching requests (needs an L7 proxy).
    Audit,
    /// Delegate to an external authorizer (needs an L7 proxy).
    Custom,
}

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to; none means the whole namespace.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single target reference.
    #[serde(default)]
    pub target_ref: Option<PolicyTargetReference>,
    /// Targets (waypoints, gateways, services); such policies are enforced by the waypoint, not at L4.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Rules, OR-ed.
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
    /// Action.
    #[serde(default)]
    pub action: AuthorizationAction,
    /// External authorizer for CUSTOM.
    #[serde(default)]
    pub provider: Option<ExtensionProvider>,
}

/// `AuthorizationPolicy.spec.provider`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    /// Provider name from the mesh config.
    #[serde(default)]
    pub name: String,
}

/// One rule: all of from, to and when must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationRule {
    /// Sources, OR-ed.
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    /// Operations, OR-ed.
    #[serde(default)]
    pub to: Vec<RuleTo>,
    /// Conditions, AND-ed.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// `rules[].from[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleFrom {
    /// The source.
    #[serde(default)]
    pub source: Source,
}

/// `rules[].to[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleTo {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
}

/// Who is calling. Fields are AND-ed, values of one field OR-ed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Peer identities `<trust-domain>/ns/<ns>/sa/<sa>` (a leading
    /// `spiffe://` is accepted and dropped).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Negated principals.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT principals (L7).
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// Negated JWT principals (L7).
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Negated namespaces.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Peer service accounts, `ns/sa`, or `sa` in the policy's namespace.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Negated service accounts.
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// Source addresses or CIDRs.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Negated source addresses.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Client addresses from X-Forwarded-For (L7).
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Negated client addresses (L7).
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

/// What is called. Only ports are visible at L4.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// HTTP hosts (L7).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Negated hosts (L7).
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Destination ports, as strings.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Negated ports.
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// HTTP methods (L7).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Negated methods (L7).
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// HTTP paths (L7).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Negated paths (L7).
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `rules[].when[]`: an attribute condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// Attribute name, e.g. `source.ip`.
    pub key: String,
    /// Accepted values.
    #[serde(default)]
    pub values: Vec<String>,
    /// Rejected values.
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// PeerAuthentication mutual-TLS mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the parent scope.
    #[default]
    Unset,
    /// Plaintext only (treated as PERMISSIVE at L4: ztunnel always accepts HBONE).
    Disable,
    /// mTLS and plaintext.
    Permissive,
    /// mTLS only.
    Strict,
}

/// `PeerAuthentication.spec.mtls`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    /// Mode.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// `PeerAuthentication.spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; none means the namespace (or the mesh in the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Mode for all ports.
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Per-port modes (needs a selector), keyed by the workload's port.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<i64, MutualTls>,
}

/// `Gateway.spec`. Gateway API evolves quickly, so unknown fields are accepted.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Class; `ambit-waypoint` or `istio-waypoint` make a waypoint.
    #[serde(default)]
    pub gateway_class_name: String,
    /// Listeners.
    #[serde(default)]
    pub listeners: Vec<Listener>,
}

/// `Gateway.spec.listeners[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// Listener name (`mesh` for waypoints).
    #[serde(default)]
    pub name: String,
    /// Port (15008 for waypoints).
    #[serde(default)]
    pub port: u32,
    /// Protocol (`HBONE` for waypoints).
    #[serde(default)]
    pub protocol: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_policy_reads_the_published_field_names() {
        let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
spec:
  selector: {matchLabels: {app: a}}
  action: DENY
  rules:
  - from: [{source: {principals: [x], notNamespaces: [y], ipBlocks: [10.0.0.0/8], remoteIpBlocks: [1.2.3.4]}}]
    to: [{operation: {ports: ["80"], notPorts: ["81"], methods: [GET], paths: [/x], hosts: [h]}}]
    when: [{key: source.ip, values: [1.1.1.1], notValues: [2.2.2.2]}]
"#;
        let p: AuthorizationPolicy = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(p.spec.action, AuthorizationAction::Deny);
        let rule = &p.spec.rules[0];
        assert_eq!(rule.from[0].source.not_namespaces, vec!["y"]);
        assert_eq!(rule.from[0].source.remote_ip_blocks, vec!["1.2.3.4"]);
        assert_eq!(rule.to[0].operation.not_ports, vec!["81"]);
        assert_eq!(rule.when[0].not_values, vec!["2.2.2.2"]);
    }

    #[test]
    fn unknown_action_and_unknown_field_are_errors() {
        let bad_action = "apiVersion: v\nkind: k\nspec: {action: MAYBE}\n";
        assert!(serde_yaml::from_str::<AuthorizationPolicy>(bad_action).is_err());
        let bad_field = "apiVersion: v\nkind: k\nspec: {rules: [{from: [{source: {principal: [x]}}]}]}\n";
        assert!(serde_yaml::from_str::<AuthorizationPolicy>(bad_field).is_err());
    }

    #[test]
    fn peer_authentication_reads_port_level_modes() {
        let yaml = "apiVersion: v\nkind: k\nspec:\n  selector: {matchLabels: {a: b}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls: {8080: {mode: STRICT}}\n";
        let p: PeerAuthentication = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(p.spec.mtls.unwrap().mode, MtlsMode::Permissive);
        assert_eq!(p.spec.port_level_mtls[&8080].mode, MtlsMode::Strict);
        let bad = "apiVersion: v\nkind: k\nspec: {mtls: {mode: LOOSE}}\n";
        assert!(serde_yaml::from_str::<PeerAuthentication>(bad).is_err());
    }
}
