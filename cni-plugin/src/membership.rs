//! Which pods are in the mesh, decided from labels and annotations as
//! Istio decides it, so users' namespaces and opt-outs carry over. Shared
//! by the CNI plugin (a pod that starts) and the node agent (pods that
//! already run when a namespace is labelled).

use std::collections::BTreeMap;

/// The label that puts a namespace (or one pod) in ambient mode, and takes
/// a pod out with the value `none`.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The value of [`DATAPLANE_MODE_LABEL`] that enrolls.
pub const AMBIENT: &str = "ambient";
/// The value of [`DATAPLANE_MODE_LABEL`] on a pod that opts out.
pub const NONE: &str = "none";
/// Set on pods that carry an Istio sidecar: they are never captured twice.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// What decides membership: the namespace's labels, the pod's labels and
/// annotations, and whether the pod shares the node's network.
#[derive(Debug, Clone, Copy)]
pub struct PodFacts<'a> {
    /// The namespace's labels.
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// The pod's labels.
    pub pod_labels: &'a BTreeMap<String, String>,
    /// The pod's annotations.
    pub pod_annotations: &'a BTreeMap<String, String>,
    /// `spec.hostNetwork`: such a pod has no namespace of its own to capture.
    pub host_network: bool,
}

/// Why a pod is in the mesh or not; logged and shown in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Enrolled: its namespace (or the pod itself) is labelled ambient.
    Ambient,
    /// Not in an ambient namespace, and not labelled ambient itself.
    NotAmbient,
    /// The pod is labelled `istio.io/dataplane-mode=none`.
    OptedOut,
    /// The pod runs on the node's network.
    HostNetwork,
    /// The pod has an Istio sidecar.
    Sidecar,
}

impl Membership {
    /// Whether the pod is captured.
    pub fn enrolled(self) -> bool {
        self == Membership::Ambient
    }
}

/// Decides whether a pod is in the mesh: opt-outs (host network, sidecar,
/// `dataplane-mode=none` on the pod) win over the namespace label.
pub fn membership(facts: PodFacts<'_>) -> Membership {
    let pod_mode = facts.pod_labels.get(DATAPLANE_MODE_LABEL).map(String::as_str);
    if facts.host_network {
        Membership::HostNetwork
    } else if facts.pod_annotations.contains_key(SIDECAR_STATUS_ANNOTATION) {
        Membership::Sidecar
    } else if pod_mode == Some(NONE) {
        Membership::OptedOut
    } else if pod_mode == Some(AMBIENT)
        || facts.namespace_labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(AMBIENT)
    {
        Membership::Ambient
    } else {
        Membership::NotAmbient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn decide(ns: &[(&str, &str)], pod: &[(&str, &str)], ann: &[(&str, &str)], host_network: bool) -> Membership {
        let (namespace_labels, pod_labels, pod_annotations) = (labels(ns), labels(pod), labels(ann));
        membership(PodFacts {
            namespace_labels: &namespace_labels,
            pod_labels: &pod_labels,
            pod_annotations: &pod_annotations,
            host_network,
        })
    }

    #[test]
    fn ambient_namespace_enrolls_its_pods() {
        assert_eq!(decide(&[(DATAPLANE_MODE_LABEL, AMBIENT)], &[], &[], false), Membership::Ambient);
        assert_eq!(decide(&[], &[], &[], false), Membership::NotAmbient);
        assert_eq!(decide(&[(DATAPLANE_MODE_LABEL, "sidecar")], &[], &[], false), Membership::NotAmbient);
    }

    #[test]
    fn a_pod_label_enrolls_or_opts_out() {
        assert_eq!(decide(&[], &[(DATAPLANE_MODE_LABEL, AMBIENT)], &[], false), Membership::Ambient);
        assert_eq!(
            decide(&[(DATAPLANE_MODE_LABEL, AMBIENT)], &[(DATAPLANE_MODE_LABEL, NONE)], &[], false),
            Membership::OptedOut
        );
    }

    #[test]
    fn host_network_and_sidecar_pods_are_never_enrolled() {
        let ns = [(DATAPLANE_MODE_LABEL, AMBIENT)];
        assert_eq!(decide(&ns, &[], &[], true), Membership::HostNetwork);
        assert_eq!(decide(&ns, &[], &[(SIDECAR_STATUS_ANNOTATION, "{}")], false), Membership::Sidecar);
        assert!(!Membership::Sidecar.enrolled() && Membership::Ambient.enrolled());
    }
}
