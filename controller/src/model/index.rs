//! Usable pods, indexed by namespace and by label, so that selectors of
//! services and policies look at the pods that carry one of their labels
//! instead of at every pod.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use super::objects::{ClusterObjects, ObjectKey};
use super::Rejection;

/// Label opting a namespace (or, with `none`, a pod out of it) into the mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// A pod that becomes a workload, with what the model needs pre-extracted.
#[derive(Debug)]
pub struct PodView<'a> {
    /// (namespace, name).
    pub key: &'a ObjectKey,
    /// The object.
    pub pod: &'a Pod,
    /// Pod IPs, primary first.
    pub ips: Vec<IpAddr>,
    /// Node it runs on.
    pub node: &'a str,
    /// Labels (empty when none).
    pub labels: &'a BTreeMap<String, String>,
    /// Service account, "default" when unset.
    pub service_account: &'a str,
    /// Whether ztunnel captures it (ambient namespace, not opted out, not host network).
    pub captured: bool,
    /// Whether it shares the node's network namespace.
    pub host_network: bool,
}

/// Pods of one namespace.
#[derive(Debug, Default)]
struct NamespacePods<'a> {
    all: Vec<usize>,
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
}

/// Pods by namespace and label.
#[derive(Debug, Default)]
pub struct PodIndex<'a> {
    /// Usable pods in (namespace, name) order.
    pub pods: Vec<PodView<'a>>,
    by_ns: HashMap<&'a str, NamespacePods<'a>>,
    by_ip: HashMap<IpAddr, usize>,
    by_key: HashMap<&'a ObjectKey, usize>,
}

impl<'a> PodIndex<'a> {
    /// Indexes the pods of `objects`; pods that claim an IP another pod has are rejected.
    pub fn new(objects: &'a ClusterObjects, rejections: &mut Vec<Rejection>) -> Self {
        let mut ambient_ns: HashMap<&str, bool> = HashMap::new();
        for ((_, name), ns) in &objects.namespaces {
            let labels = ns.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
            let ambient = labels.get(DATAPLANE_MODE_LABEL).is_some_and(|v| v == "ambient");
            ambient_ns.insert(name, ambient);
        }
        let mut index = Self::default();
        for (key, pod) in &objects.pods {
            let Some(view) = view(key, pod, &ambient_ns) else {
                continue;
            };
            let reject = |reason: String| Rejection {
                kind: "Pod".into(),
                namespace: key.0.clone(),
                name: key.1.clone(),
                reason,
            };
            if let Err(reason) = validate_labels(view.labels) {
                rejections.push(reject(format!("bad labels: {reason}")));
                continue;
            }
            // Host-network pods share their node's IPs by design.
            if !view.host_network {
                if let Some(other) = view.ips.iter().find_map(|ip| index.by_ip.get(ip).map(|&i| (ip, i))) {
                    let owner = index.pods[other.1].key;
                    rejections.push(reject(format!(
                        "duplicate pod IP {}: already used by pod {}/{}",
                        other.0, owner.0, owner.1
                    )));
                    continue;
                }
            }
            let i = index.pods.len();
            if !view.host_network {
                for ip in &view.ips {
                    index.by_ip.insert(*ip, i);
                }
            }
            index.by_key.insert(key, i);
            let ns = index.by_ns.entry(key.0.as_str()).or_default();
            ns.all.push(i);
            for (k, v) in view.labels {
                ns.by_label.entry((k.as_str(), v.as_str())).or_default().push(i);
            }
            index.pods.push(view);
        }
        index
    }

    /// Indices of the pods in `ns` (every namespace when `None`) that carry all of `labels`.
    /// Empty `labels` select every pod of the namespace.
    pub fn select(&self, ns: Option<&str>, labels: &BTreeMap<String, String>) -> Vec<usize> {
        let mut out = Vec::new();
        let mut in_ns = |pods: &NamespacePods<'a>| {
            if labels.is_empty() {
                out.extend_from_slice(&pods.all);
                return;
            }
            // Walk the shortest posting list and check the other labels on each pod.
            let mut shortest: Option<&Vec<usize>> = None;
            for (k, v) in labels {
                match pods.by_label.get(&(k.as_str(), v.as_str())) {
                    None => return,
                    Some(list) if shortest.is_none_or(|s| list.len() < s.len()) => shortest = Some(list),
                    Some(_) => {}
                }
            }
            let Some(list) = shortest else { return };
            out.extend(list.iter().copied().filter(|&i| {
                let have = self.pods[i].labels;
                labels.iter().all(|(k, v)| have.get(k) == Some(v))
            }));
        };
        match ns {
            Some(ns) => {
                if let Some(pods) = self.by_ns.get(ns) {
                    in_ns(pods);
                }
            }
            None => self.by_ns.values().for_each(in_ns),
        }
        out
    }

    /// The pod that owns `ip`.
    pub fn by_ip(&self, ip: &IpAddr) -> Option<usize> {
        self.by_ip.get(ip).copied()
    }

    /// The pod with this (namespace, name).
    pub fn by_key(&self, key: &ObjectKey) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    /// Namespaces that have at least one workload.
    pub fn namespaces(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.by_ns.keys().copied()
    }
}

/// The usable part of a pod; `None` for pods that are not scheduled, have no IP yet or have finished.
fn view<'a>(key: &'a ObjectKey, pod: &'a Pod, ambient_ns: &HashMap<&str, bool>) -> Option<PodView<'a>> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    for ip in status.pod_ip.as_deref().into_iter().chain(listed) {
        // An unparsable IP is skipped (the API server would not accept it).
        if let Ok(ip) = ip.parse() {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    if ips.is_empty() {
        return None;
    }
    let labels = pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
    let host_network = spec.host_network == Some(true);
    let ns_ambient = ambient_ns.get(key.0.as_str()).copied().unwrap_or(false);
    let opted_out = labels.get(DATAPLANE_MODE_LABEL).is_some_and(|v| v == "none");
    let service_account = spec.service_account_name.as_deref().filter(|s| !s.is_empty()).unwrap_or("default");
    Some(PodView {
        key,
        pod,
        ips,
        node,
        labels,
        service_account,
        captured: ns_ambient && !opted_out && !host_network,
        host_network,
    })
}

/// Checks keys and values against Kubernetes label syntax.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in labels {
        let (prefix, name) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k.as_str()),
        };
        if let Some(p) = prefix {
            let dns = !p.is_empty()
                && p.len() <= 253
                && p.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if !dns {
                return Err(format!("label key {k:?} has an invalid prefix"));
            }
        }
        if name.is_empty() || !label_value_ok(name) {
            return Err(format!("label key {k:?} is not a valid label name"));
        }
        if !v.is_empty() && !label_value_ok(v) {
            return Err(format!("label value {v:?} of {k:?} is not a valid label value"));
        }
    }
    Ok(())
}

/// ≤ 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_value_ok(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn label_syntax_follows_kubernetes() {
        assert!(validate_labels(&labels(&[("app", "a"), ("app.kubernetes.io/name", "x-1"), ("e", "")])).is_ok());
        assert!(validate_labels(&labels(&[("app", "*")])).is_err());
        assert!(validate_labels(&labels(&[("bad key", "a")])).is_err());
        assert!(validate_labels(&labels(&[("Bad_Prefix/a", "a")])).is_err());
        assert!(validate_labels(&labels(&[("a", &"x".repeat(64))])).is_err());
        assert!(validate_labels(&labels(&[("", "a")])).is_err());
    }
}
