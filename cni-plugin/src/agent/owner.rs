//! Whether the agent's exit is an uninstall or a restart, told from its own
//! DaemonSet: gone or being deleted means uninstall.
//!
//! Why it matters: while the plugin is in the node's conflist and no agent
//! runs, a mesh pod that starts gets a retryable CNI error and waits for the
//! next agent: it never starts uncaptured. That is right for a restart (a
//! rolling update, a deleted agent pod), and wrong for an uninstall, where no
//! agent comes back and such pods would never start.

use std::str::FromStr;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;

/// The agent's DaemonSet, written `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerDaemonSet {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl FromStr for OwnerDaemonSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(OwnerDaemonSet { namespace: ns.into(), name: name.into() })
            }
            _ => Err(format!("{s:?}: want namespace/name")),
        }
    }
}

impl OwnerDaemonSet {
    /// True unless the API server shows the DaemonSet standing and not being
    /// deleted. Any failure to tell (its service account already deleted, no
    /// API server) counts as going away: a plugin left behind with no agent
    /// would keep every mesh pod of the node from starting.
    pub async fn going_away(&self, client: &kube::Client) -> bool {
        let api = kube::Api::<DaemonSet>::namespaced(client.clone(), &self.namespace);
        match tokio::time::timeout(Duration::from_secs(5), api.get_opt(&self.name)).await {
            Ok(Ok(Some(ds))) if ds.metadata.deletion_timestamp.is_none() => false,
            Ok(Ok(Some(_))) => true,
            Ok(Ok(None)) => true,
            Ok(Err(e)) => {
                tracing::warn!(daemonset = %self, error = %e, "cannot read the agent's DaemonSet; uninstalling");
                true
            }
            Err(_) => {
                tracing::warn!(daemonset = %self, "no answer about the agent's DaemonSet in 5 s; uninstalling");
                true
            }
        }
    }
}

impl std::fmt::Display for OwnerDaemonSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespace_slash_name_only() {
        let o: OwnerDaemonSet = "ambit-system/ambit-node".parse().unwrap();
        assert_eq!(o, OwnerDaemonSet { namespace: "ambit-system".into(), name: "ambit-node".into() });
        assert_eq!(o.to_string(), "ambit-system/ambit-node");
        for bad in ["ambit-node", "/ambit-node", "ambit-system/", "a/b/c", ""] {
            assert!(bad.parse::<OwnerDaemonSet>().is_err(), "{bad}");
        }
    }
}
