//! A pod → `istio.workload.Workload`, with Istio's uid, canonical names and
//! enrollment (HBONE for captured pods, NONE for the rest).

use std::collections::{BTreeMap, HashMap};

use ambit_api::workload::{NetworkMode, PortList, TunnelProtocol, Workload, WorkloadStatus, WorkloadType};
use k8s_openapi::api::core::v1::Pod;

use super::index::PodView;
use super::services::ip_bytes;
use super::waypoint::{Resolved, WaypointIndex};
use super::ModelOptions;

/// Label marking the pods of a waypoint Gateway (they never use a waypoint themselves).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// What a pod's workload gets from services and policies.
#[derive(Debug, Default)]
pub struct Extras {
    /// "namespace/hostname" → port mappings.
    pub services: HashMap<String, PortList>,
    /// Selector-scoped policies ("namespace/name") that select the pod.
    pub policies: Vec<String>,
}

/// Istio's workload uid for a pod: `<cluster>//Pod/<namespace>/<name>`.
pub fn pod_uid(cluster_id: &str, namespace: &str, name: &str) -> String {
    format!("{cluster_id}//Pod/{namespace}/{name}")
}

/// Builds the workload of `v`; a missing waypoint is returned as a warning.
pub fn build(
    v: &PodView<'_>,
    extras: Extras,
    ns_labels: Option<&BTreeMap<String, String>>,
    waypoints: &WaypointIndex<'_>,
    opts: &ModelOptions,
) -> (Workload, Option<String>) {
    let (ns, name) = (v.key.0.as_str(), v.key.1.as_str());
    let label = |keys: &[&str]| keys.iter().find_map(|k| v.labels.get(*k)).cloned();
    let mut warning = None;
    let waypoint = if v.captured && !v.labels.contains_key(GATEWAY_NAME_LABEL) {
        match waypoints.resolve(ns, Some(v.labels), ns_labels, true) {
            Resolved::NoWaypoint => None,
            Resolved::Waypoint(w) => Some(w),
            Resolved::Missing(gw) => {
                warning = Some(format!("waypoint {gw} does not exist; traffic goes direct"));
                None
            }
        }
    } else {
        None
    };
    let owner = workload_owner(v.pod, name);
    let mut policies = extras.policies;
    policies.sort_unstable();
    policies.dedup();
    let w = Workload {
        uid: pod_uid(&opts.cluster_id, ns, name),
        name: name.into(),
        namespace: ns.into(),
        addresses: v.ips.iter().map(ip_bytes).collect(),
        network: String::new(),
        tunnel_protocol: if v.captured { TunnelProtocol::Hbone } else { TunnelProtocol::None }.into(),
        trust_domain: opts.trust_domain.clone(),
        service_account: v.service_account.into(),
        waypoint,
        node: v.node.into(),
        canonical_name: label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
            .unwrap_or_else(|| name.into()),
        canonical_revision: label(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"])
            .unwrap_or_else(|| "latest".into()),
        workload_type: owner.1.into(),
        workload_name: owner.0,
        services: extras.services,
        authorization_policies: policies,
        status: if ready(v.pod) { WorkloadStatus::Healthy } else { WorkloadStatus::Unhealthy }.into(),
        cluster_id: opts.cluster_id.clone(),
        network_mode: if v.host_network { NetworkMode::HostNetwork } else { NetworkMode::Standard }.into(),
        ..Default::default()
    };
    (w, warning)
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The owning workload's name and kind, as Istio's control plane derives
/// them: a Deployment for ReplicaSet pods (the ReplicaSet name less its
/// `pod-template-hash`), a CronJob for the Jobs it names
/// `<cronjob>-<8 to 10 digits>`, a Job, else the pod itself.
fn workload_owner(pod: &Pod, pod_name: &str) -> (String, WorkloadType) {
    let owner = pod.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    let Some(owner) = owner else {
        return (pod_name.into(), WorkloadType::Pod);
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = pod.metadata.labels.as_ref().and_then(|l| l.get("pod-template-hash"));
            let base = hash.and_then(|h| owner.name.strip_suffix(h.as_str())).and_then(|b| b.strip_suffix('-'));
            match base {
                Some(base) => (base.into(), WorkloadType::Deployment),
                None => (owner.name.clone(), WorkloadType::Pod),
            }
        }
        "Job" => match owner.name.rsplit_once('-') {
            Some((cron, n)) if (8..=10).contains(&n.len()) && n.bytes().all(|c| c.is_ascii_digit()) => {
                (cron.into(), WorkloadType::Cronjob)
            }
            _ => (owner.name.clone(), WorkloadType::Job),
        },
        _ => (owner.name.clone(), WorkloadType::Pod),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_follows_istio() {
        assert_eq!(pod_uid("Kubernetes", "default", "client"), "Kubernetes//Pod/default/client");
    }

    #[test]
    fn workload_owner_strips_the_replicaset_hash_and_names_the_kind() {
        let pod: Pod = serde_yaml::from_str(
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9c-x2x
  labels: {pod-template-hash: 7d4b9c}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4b9c, uid: u, controller: true}]
"#,
        )
        .unwrap();
        assert_eq!(workload_owner(&pod, "web-7d4b9c-x2x"), ("web".into(), WorkloadType::Deployment));
        assert_eq!(workload_owner(&Pod::default(), "lonely"), ("lonely".into(), WorkloadType::Pod));
        let owned_by = |kind: &str, name: &str| {
            let yaml = format!("metadata: {{ownerReferences: [{{apiVersion: v1, kind: {kind}, name: {name}, uid: u, controller: true}}]}}");
            workload_owner(&serde_yaml::from_str(&yaml).unwrap(), "p")
        };
        assert_eq!(owned_by("Job", "backup-28391520"), ("backup".into(), WorkloadType::Cronjob));
        assert_eq!(owned_by("Job", "migrate"), ("migrate".into(), WorkloadType::Job));
        assert_eq!(owned_by("StatefulSet", "db"), ("db".into(), WorkloadType::Pod));
    }
}
