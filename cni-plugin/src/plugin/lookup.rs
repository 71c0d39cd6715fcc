//! Reading the pod and its namespace from the API server, to decide
//! membership as the agent's watcher does.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::membership::{membership, Membership, PodFacts};

/// How long the lookup (both reads) may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the plugin needs to know about the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFound {
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// Whether and why it is in the mesh.
    pub membership: Membership,
}

/// Reads pod `namespace/name` and its namespace with the credentials of
/// `kubeconfig`. The error is one line for the kubelet's event.
pub async fn look_up(kubeconfig: &Path, namespace: &str, name: &str) -> Result<PodFound, String> {
    let lookup = async {
        let kubeconfig =
            Kubeconfig::read_from(kubeconfig).map_err(|e| format!("read kubeconfig {}: {e}", kubeconfig.display()))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| format!("kubeconfig: {e}"))?;
        let client = Client::try_from(config).map_err(|e| format!("kube client: {e}"))?;
        let pod = Api::<Pod>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .map_err(|e| format!("get pod {namespace}/{name}: {e}"))?;
        let ns = Api::<Namespace>::all(client)
            .get(namespace)
            .await
            .map_err(|e| format!("get namespace {namespace}: {e}"))?;
        Ok(decide(&pod, &ns))
    };
    tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
        .await
        .unwrap_or_else(|_| Err(format!("the API server did not answer within {LOOKUP_TIMEOUT:?}")))
}

fn decide(pod: &Pod, ns: &Namespace) -> PodFound {
    let empty = BTreeMap::new();
    let spec = pod.spec.as_ref();
    let facts = PodFacts {
        namespace_labels: ns.metadata.labels.as_ref().unwrap_or(&empty),
        pod_labels: pod.metadata.labels.as_ref().unwrap_or(&empty),
        pod_annotations: pod.metadata.annotations.as_ref().unwrap_or(&empty),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    };
    PodFound {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
        membership: membership(facts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decide_reads_labels_uid_and_service_account() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "demo", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"containers": [], "serviceAccountName": "web"}
        }))
        .unwrap();
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}}
        }))
        .unwrap();
        let found = decide(&pod, &ns);
        assert_eq!(
            found,
            PodFound { uid: "u-1".into(), service_account: "web".into(), membership: Membership::Ambient }
        );
        let plain: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "demo"}})).unwrap();
        assert_eq!(decide(&pod, &plain).membership, Membership::NotAmbient);
    }
}
