//! Writes ztunnel's local YAML state (the "local file" format of ztunnel's `state` module) from a lab's pods, plus
//! services, policies and peer authentications a test adds as raw YAML.
//!
//! Pods are generated as workloads: enrolled pods with `protocol: HBONE`, the others `NONE`. Anything the
//! generator does not know (service memberships, health, trust domain, ...) is merged into a pod's entry with
//! [`StateFile::set_workload_field`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_yaml::{Mapping, Value};

use crate::lab::{Lab, PodId};

/// Parses a YAML snippet (a test convenience for building services and policies).
pub fn yaml(text: &str) -> anyhow::Result<Value> {
    serde_yaml::from_str(text).with_context(|| format!("bad YAML:\n{text}"))
}

/// The state file of a lab and what tests add to it.
#[derive(Clone, Debug)]
pub struct StateFile {
    path: PathBuf,
    services: Vec<Value>,
    policies: Vec<Value>,
    peer_authentications: Vec<Value>,
    extra_workloads: Vec<Value>,
    /// Fields merged into generated workload entries, by pod uid.
    workload_fields: BTreeMap<String, Mapping>,
}

impl StateFile {
    /// A state file at `path` with no services or policies yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile {
            path: path.into(),
            services: Vec::new(),
            policies: Vec::new(),
            peer_authentications: Vec::new(),
            extra_workloads: Vec::new(),
            workload_fields: BTreeMap::new(),
        }
    }

    /// Where it is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a service entry (an item of `services:`).
    pub fn add_service(&mut self, service: Value) {
        self.services.push(service);
    }

    /// Adds an authorization policy (an item of `policies:`).
    pub fn add_policy(&mut self, policy: Value) {
        self.policies.push(policy);
    }

    /// Removes the policies named `namespace/name`; returns how many were removed.
    pub fn remove_policy(&mut self, namespace: &str, name: &str) -> usize {
        let before = self.policies.len();
        self.policies
            .retain(|p| !(p.get("namespace") == Some(&namespace.into()) && p.get("name") == Some(&name.into())));
        before - self.policies.len()
    }

    /// Adds a peer authentication (an item of `peerAuthentications:`).
    pub fn add_peer_authentication(&mut self, pa: Value) {
        self.peer_authentications.push(pa);
    }

    /// Removes every policy and peer authentication.
    pub fn clear_policies(&mut self) {
        self.policies.clear();
        self.peer_authentications.clear();
    }

    /// Adds a workload that is not a lab pod (e.g. an external host declared as a `NONE` workload).
    pub fn add_workload(&mut self, workload: Value) {
        self.extra_workloads.push(workload);
    }

    /// Sets `key: value` in the generated entry of the pod with this uid (overriding a generated field).
    pub fn set_workload_field(&mut self, uid: &str, key: &str, value: Value) {
        self.workload_fields.entry(uid.to_string()).or_default().insert(key.into(), value);
    }

    /// Sets `key: value` in the service entry with this hostname (e.g. its `waypoint`); false if there is none.
    pub fn set_service_field(&mut self, hostname: &str, key: &str, value: Value) -> bool {
        let entry = self.services.iter_mut().find(|s| s.get("hostname").and_then(Value::as_str) == Some(hostname));
        match entry {
            Some(Value::Mapping(m)) => {
                m.insert(key.into(), value);
                true
            }
            _ => false,
        }
    }

    /// Declares service `name.namespace.svc.cluster.local` with address `vip` and `(servicePort, targetPort)`
    /// pairs, backed by `backends` (their `services` field is extended to list it).
    pub fn add_service_for(
        &mut self,
        lab: &Lab,
        name: &str,
        namespace: &str,
        vip: Ipv4Addr,
        ports: &[(u16, u16)],
        backends: &[PodId],
    ) {
        let hostname = format!("{name}.{namespace}.svc.cluster.local");
        let port_list: Vec<Value> = ports
            .iter()
            .map(|&(sp, tp)| {
                let mut m = Mapping::new();
                m.insert("servicePort".into(), u64::from(sp).into());
                m.insert("targetPort".into(), u64::from(tp).into());
                Value::Mapping(m)
            })
            .collect();
        let mut svc = Mapping::new();
        svc.insert("name".into(), name.into());
        svc.insert("namespace".into(), namespace.into());
        svc.insert("hostname".into(), hostname.as_str().into());
        svc.insert("addresses".into(), Value::Sequence(vec![vip.to_string().into()]));
        svc.insert("ports".into(), Value::Sequence(port_list.clone()));
        self.services.push(Value::Mapping(svc));

        for &pod in backends {
            let uid = lab.pod(pod).uid.clone();
            let fields = self.workload_fields.entry(uid).or_default();
            let services = fields.entry("services".into()).or_insert_with(|| Value::Mapping(Mapping::new()));
            if let Value::Mapping(m) = services {
                m.insert(format!("{namespace}/{hostname}").into(), Value::Sequence(port_list.clone()));
            }
        }
    }

    /// The whole document for `lab`, with the pods in `enrolled` as HBONE workloads.
    pub fn render(&self, lab: &Lab, enrolled: &BTreeSet<PodId>) -> Value {
        let mut workloads = Vec::with_capacity(lab.pods().len() + self.extra_workloads.len());
        for (i, pod) in lab.pods().iter().enumerate() {
            let mut w = Mapping::new();
            w.insert("uid".into(), pod.uid.as_str().into());
            w.insert("name".into(), pod.name.as_str().into());
            w.insert("namespace".into(), pod.namespace.as_str().into());
            w.insert("addresses".into(), Value::Sequence(vec![pod.ip.to_string().into()]));
            w.insert("node".into(), lab.node(pod.node).name.as_str().into());
            w.insert("serviceAccount".into(), pod.service_account.as_str().into());
            let protocol = if enrolled.contains(&PodId(i)) { "HBONE" } else { "NONE" };
            w.insert("protocol".into(), protocol.into());
            if let Some(extra) = self.workload_fields.get(&pod.uid) {
                for (k, v) in extra {
                    w.insert(k.clone(), v.clone());
                }
            }
            workloads.push(Value::Mapping(w));
        }
        workloads.extend(self.extra_workloads.iter().cloned());
        let mut doc = Mapping::new();
        doc.insert("workloads".into(), Value::Sequence(workloads));
        doc.insert("services".into(), Value::Sequence(self.services.clone()));
        doc.insert("policies".into(), Value::Sequence(self.policies.clone()));
        doc.insert("peerAuthentications".into(), Value::Sequence(self.peer_authentications.clone()));
        Value::Mapping(doc)
    }

    /// Writes [`StateFile::render`] atomically: a temporary file in the same directory, then a rename, so ztunnel
    /// never reads half a file.
    pub fn write(&self, lab: &Lab, enrolled: &BTreeSet<PodId>) -> anyhow::Result<()> {
        let text = serde_yaml::to_string(&self.render(lab, enrolled)).context("bug: state is not serialisable")?;
        write_atomic(&self.path, &text)
    }
}

/// Writes `text` to `path` through a temporary file in the same directory
/// and a rename, so a process watching `path` never reads half a file.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut tmp = path.to_path_buf().into_os_string();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::PodSpec;

    #[test]
    fn enrolled_pods_are_hbone_and_services_list_their_backends() {
        if !crate::require_root("enrolled_pods_are_hbone_and_services_list_their_backends") {
            return;
        }
        let mut lab = Lab::new("statefile-unit").unwrap();
        let n = lab.add_node("node1").unwrap();
        let a = lab.add_pod(n, PodSpec::new("a", "default", "sa-a")).unwrap();
        let b = lab.add_pod(n, PodSpec::new("b", "default", "sa-b")).unwrap();
        let mut state = StateFile::new(lab.dir().join("state.yaml"));
        state.add_service_for(&lab, "echo", "default", Ipv4Addr::new(10, 96, 0, 10), &[(80, 8080)], &[b]);
        state.add_policy(
            yaml("{name: deny-all, namespace: default, scope: Namespace, action: Deny, rules: [{}]}").unwrap(),
        );
        state.set_workload_field(&lab.pod(a).uid, "status", "Unhealthy".into());
        assert!(state.set_service_field(
            "echo.default.svc.cluster.local",
            "waypoint",
            yaml("{address: 10.1.0.9}").unwrap()
        ));
        assert!(!state.set_service_field("missing.default.svc.cluster.local", "waypoint", Value::Null));
        state.write(&lab, &BTreeSet::from([a])).unwrap();

        let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(state.path()).unwrap()).unwrap();
        let w = &doc["workloads"];
        assert_eq!(w[0]["uid"], Value::from("lab/default/a"));
        assert_eq!(w[0]["protocol"], Value::from("HBONE"));
        assert_eq!(w[0]["status"], Value::from("Unhealthy"));
        assert_eq!(w[0]["addresses"][0], Value::from("10.1.0.2"));
        assert_eq!(w[0]["node"], Value::from("node1"));
        assert_eq!(w[0]["serviceAccount"], Value::from("sa-a"));
        assert_eq!(w[1]["protocol"], Value::from("NONE"));
        assert_eq!(w[1]["services"]["default/echo.default.svc.cluster.local"][0]["targetPort"], Value::from(8080));
        assert_eq!(doc["services"][0]["addresses"][0], Value::from("10.96.0.10"));
        assert_eq!(doc["services"][0]["waypoint"]["address"], Value::from("10.1.0.9"));
        assert_eq!(doc["policies"][0]["name"], Value::from("deny-all"));
        assert_eq!(state.remove_policy("default", "deny-all"), 1);
        let leftovers: Vec<_> = std::fs::read_dir(lab.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("state.yaml")], "temporary file left behind");
    }
}
