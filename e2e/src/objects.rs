//! The Kubernetes objects a lab declares to the controller, written as users (and a kubelet) would: a Namespace per
//! pod namespace (labelled `istio.io/dataplane-mode=ambient` when enrolled in the mesh), a Pod per lab pod
//! (labels, `spec.nodeName`, service account, `status.podIP`, the Ready condition) and Services (cluster IP, ports,
//! selector). Policies are not generated here: tests write them as `security.istio.io/v1` YAML themselves.
//!
//! All YAML is produced through `serde_json` values, so names and labels are always quoted correctly.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde_json::{json, Value};

use crate::lab::{Lab, Pod, PodId};

/// The namespace label that enrolls a namespace's pods (and, set to `none` on a pod, opts that pod out).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// A Kubernetes Service of the lab (type ClusterIP, TCP ports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// `spec.clusterIP`.
    pub cluster_ip: Ipv4Addr,
    /// `(port, targetPort)` pairs.
    pub ports: Vec<(u16, u16)>,
    /// `spec.selector`: the pods with all these labels back the service.
    pub selector: BTreeMap<String, String>,
}

impl ServiceSpec {
    /// Service `name` in `namespace` at `cluster_ip`, with no ports and no selector yet.
    pub fn new(name: &str, namespace: &str, cluster_ip: Ipv4Addr) -> Self {
        ServiceSpec {
            name: name.into(),
            namespace: namespace.into(),
            cluster_ip,
            ports: Vec::new(),
            selector: BTreeMap::new(),
        }
    }

    /// Adds port `port` forwarding to `target_port` of the backends.
    pub fn port(mut self, port: u16, target_port: u16) -> Self {
        self.ports.push((port, target_port));
        self
    }

    /// Adds `key: value` to the selector.
    pub fn select(mut self, key: &str, value: &str) -> Self {
        self.selector.insert(key.into(), value.into());
        self
    }

    /// The DNS name ztunnel knows the service by.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    /// Whether `pod` is a backend: same namespace and every selector label matches (an empty selector selects
    /// nothing, as in Kubernetes).
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace
            && !self.selector.is_empty()
            && self.selector.iter().all(|(k, v)| pod_labels(pod).get(k) == Some(v))
    }

    /// The Service object.
    pub fn to_value(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|&(port, target)| json!({"name": format!("tcp-{port}"), "protocol": "TCP", "port": port, "targetPort": target}))
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {"type": "ClusterIP", "clusterIP": self.cluster_ip.to_string(), "ports": ports, "selector": self.selector},
        })
    }
}

/// What the lab declares besides its pods: which namespaces are ambient, services, and per-pod changes a test makes
/// (readiness, a declared service account that differs from the one the pod really runs as).
#[derive(Clone, Debug, Default)]
pub struct KubeObjects {
    ambient: BTreeSet<String>,
    services: Vec<ServiceSpec>,
    not_ready: BTreeSet<String>,
    service_accounts: BTreeMap<String, String>,
}

impl KubeObjects {
    /// Objects with the namespaces in `ambient` enrolled in the mesh.
    pub fn new(ambient: &[&str]) -> Self {
        KubeObjects { ambient: ambient.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    /// Labels namespace `ns` ambient (or removes the label).
    pub fn set_ambient(&mut self, ns: &str, ambient: bool) {
        if ambient {
            self.ambient.insert(ns.into());
        } else {
            self.ambient.remove(ns);
        }
    }

    /// Whether a pod is captured, as the controller and the CNI node agent decide it: its namespace is ambient
    /// and the pod does not opt out with `istio.io/dataplane-mode=none`.
    pub fn is_captured(&self, pod: &Pod) -> bool {
        self.ambient.contains(&pod.namespace)
            && pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) != Some("none")
    }

    /// Sets the Ready condition of the pod with this uid (pods are Ready unless told otherwise).
    pub fn set_ready(&mut self, uid: &str, ready: bool) {
        if ready {
            self.not_ready.remove(uid);
        } else {
            self.not_ready.insert(uid.into());
        }
    }

    /// Declares `serviceAccountName` of the pod with this uid, whatever account its node's ztunnel was told about.
    pub fn set_service_account(&mut self, uid: &str, service_account: &str) {
        self.service_accounts.insert(uid.into(), service_account.into());
    }

    /// Adds (or replaces, by namespace and name) a service.
    pub fn add_service(&mut self, svc: ServiceSpec) {
        self.services.retain(|s| !(s.name == svc.name && s.namespace == svc.namespace));
        self.services.push(svc);
    }

    /// Removes the service `namespace/name`; whether it existed.
    pub fn remove_service(&mut self, namespace: &str, name: &str) -> bool {
        let before = self.services.len();
        self.services.retain(|s| !(s.name == name && s.namespace == namespace));
        before != self.services.len()
    }

    /// The services.
    pub fn services(&self) -> &[ServiceSpec] {
        &self.services
    }

    /// The Pod object of `pod`, scheduled, with its IP and readiness as a kubelet reports them.
    pub fn pod_value(&self, lab: &Lab, pod: PodId) -> Value {
        let p = lab.pod(pod);
        let sa = self.service_accounts.get(&p.uid).unwrap_or(&p.service_account);
        let ready = if self.not_ready.contains(&p.uid) { "False" } else { "True" };
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid.replace('/', "-"), "labels": pod_labels(p)},
            "spec": {
                "nodeName": lab.node(p.node).name,
                "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "lab"}],
            },
            "status": {
                "phase": "Running",
                "podIP": p.ip.to_string(),
                "podIPs": [{"ip": p.ip.to_string()}],
                "conditions": [{"type": "Ready", "status": ready}],
            },
        })
    }

    /// Every object: Namespaces (those of the pods and the ambient ones), Pods, Services.
    pub fn values(&self, lab: &Lab) -> Vec<Value> {
        let mut namespaces: BTreeSet<&str> = lab.pods().iter().map(|p| p.namespace.as_str()).collect();
        namespaces.extend(self.ambient.iter().map(String::as_str));
        namespaces.extend(self.services.iter().map(|s| s.namespace.as_str()));
        let mut out: Vec<Value> = namespaces
            .into_iter()
            .map(|ns| {
                let labels =
                    if self.ambient.contains(ns) { json!({DATAPLANE_MODE_LABEL: "ambient"}) } else { json!({}) };
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}})
            })
            .collect();
        out.extend((0..lab.pods().len()).map(|i| self.pod_value(lab, PodId(i))));
        out.extend(self.services.iter().map(ServiceSpec::to_value));
        out
    }

    /// [`KubeObjects::values`] as one multi-document YAML file.
    pub fn render(&self, lab: &Lab) -> String {
        to_yaml_documents(&self.values(lab))
    }
}

/// A pod's labels as declared: `app: <name>` (a Deployment's usual label) plus the lab spec's labels.
pub fn pod_labels(p: &Pod) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([("app".to_string(), p.name.clone())]);
    labels.extend(p.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
}

/// Objects as a multi-document YAML stream (`---` before each document).
pub fn to_yaml_documents(values: &[Value]) -> String {
    let mut out = String::new();
    for v in values {
        out.push_str("---\n");
        // A serde_json::Value always serialises; an error would be a serde_yaml bug.
        out.push_str(&serde_yaml::to_string(v).unwrap_or_else(|e| panic!("bug: YAML of a JSON value: {e}")));
    }
    out
}

/// The documents of a multi-document YAML stream (split on `---` lines); documents that do not parse are
/// skipped (the controller rejects them; callers only look for what it will accept).
pub fn documents(yaml: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(last) = docs.last_mut() {
            last.push_str(line);
            last.push('\n');
        }
    }
    docs.iter()
        .filter(|d| !d.trim().is_empty())
        .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

/// The `(namespace, name)` of every L4 authorization a set of `security.istio.io/v1` objects produces at a
/// ztunnel, to wait for it: an AuthorizationPolicy with action ALLOW or DENY (the default ALLOW) and no
/// `targetRefs`; a selector-less PeerAuthentication in mode STRICT becomes Istio's
/// `istio_converted_static_strict`. Other objects yield nothing to wait for.
pub fn expected_authorizations(yaml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in documents(yaml) {
        let ns = v["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let name = v["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let spec = &v["spec"];
        match v["kind"].as_str() {
            Some("AuthorizationPolicy") => {
                let action = spec["action"].as_str().unwrap_or("ALLOW");
                let targeted = !spec["targetRefs"].is_null() || !spec["targetRef"].is_null();
                if matches!(action, "ALLOW" | "DENY") && !targeted {
                    out.push((ns, name));
                }
            }
            Some("PeerAuthentication") => {
                let selector = spec["selector"]["matchLabels"].as_object().is_some_and(|m| !m.is_empty());
                if !selector && spec["mtls"]["mode"].as_str() == Some("STRICT") {
                    out.push((ns, "istio_converted_static_strict".into()));
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::PodSpec;

    #[test]
    fn policies_name_what_a_ztunnel_will_hold() {
        let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-x, namespace: a}\n\
                    spec: {action: DENY, rules: [{}]}\n---\n\
                    apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit, namespace: a}\n\
                    spec: {action: AUDIT}\n---\n\
                    apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: b}\n\
                    spec: {mtls: {mode: STRICT}}\n";
        assert_eq!(
            expected_authorizations(yaml),
            vec![("a".into(), "deny-x".into()), ("b".into(), "istio_converted_static_strict".into())]
        );
    }

    #[test]
    fn the_lab_is_rendered_as_namespaces_pods_and_services() {
        if !crate::require_root("the_lab_is_rendered_as_namespaces_pods_and_services") {
            return;
        }
        let mut lab = Lab::new("objects-unit").unwrap();
        let n = lab.add_node("node1").unwrap();
        let mut spec = PodSpec::new("web", "default", "web-sa");
        spec.labels.insert("role".into(), "echo".into());
        let web = lab.add_pod(n, spec).unwrap();
        let mut spec = PodSpec::new("legacy", "default", "legacy");
        spec.labels.insert(DATAPLANE_MODE_LABEL.into(), "none".into());
        let legacy = lab.add_pod(n, spec).unwrap();
        let other = lab.add_pod(n, PodSpec::new("x", "plain", "x")).unwrap();
        let mut objects = KubeObjects::new(&["default"]);
        objects.add_service(
            ServiceSpec::new("echo", "default", Ipv4Addr::new(10, 96, 0, 10)).port(80, 8080).select("role", "echo"),
        );
        objects.set_ready(&lab.pod(web).uid, false);
        objects.set_service_account(&lab.pod(web).uid, "impostor");

        assert!(objects.is_captured(lab.pod(web)));
        assert!(!objects.is_captured(lab.pod(legacy)), "a pod opting out is not captured");
        assert!(!objects.is_captured(lab.pod(other)), "a namespace without the label is not captured");
        assert!(objects.services()[0].selects(lab.pod(web)) && !objects.services()[0].selects(lab.pod(legacy)));

        let docs = documents(&objects.render(&lab));
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["Namespace", "Namespace", "Pod", "Pod", "Pod", "Service"]);
        assert_eq!(docs[0]["metadata"]["labels"][DATAPLANE_MODE_LABEL], "ambient");
        assert_eq!(docs[1]["metadata"]["labels"], json!({}));
        let pod = &docs[2];
        assert_eq!(pod["metadata"]["labels"], json!({"app": "web", "role": "echo"}));
        assert_eq!(pod["spec"]["nodeName"], "node1");
        assert_eq!(pod["spec"]["serviceAccountName"], "impostor");
        assert_eq!(pod["status"]["podIP"], lab.pod(web).ip.to_string());
        assert_eq!(pod["status"]["conditions"][0]["status"], "False");
        assert_eq!(docs[5]["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(docs[5]["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(docs[5]["spec"]["selector"], json!({"role": "echo"}));
    }
}
