//! How this ztunnel names itself to the control plane: the xDS `Node` exactly
//! as Istio's ztunnel builds it (its `src/xds/client.rs`), so that Ambit's
//! ztunnel can run against Istio's control plane and Ambit's controller sees
//! the same thing from either ztunnel.

use std::net::IpAddr;

use ambit_api::discovery::Node;
use prost_types::value::Kind;

/// The address Istio's ztunnel puts in its id when `INSTANCE_IP` is unset:
/// Istio's control plane refuses a node id without a valid IP.
const DEFAULT_IP: &str = "1.1.1.1";

/// Who this ztunnel is, from its flags or the pod's environment (`NODE_NAME`,
/// `POD_NAME`, `POD_NAMESPACE`, `INSTANCE_IP`, `CLUSTER_ID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyNode {
    /// Kubernetes node name, metadata `NODE_NAME`.
    pub node_name: String,
    /// This ztunnel's pod, metadata `NAME` (empty when unknown, as Istio's).
    pub pod_name: String,
    /// Its namespace, metadata `NAMESPACE`.
    pub pod_namespace: String,
    /// Its pod IP, metadata `INSTANCE_IPS`.
    pub instance_ip: Option<IpAddr>,
    /// The cluster's id, metadata `CLUSTER_ID`.
    pub cluster_id: String,
}

impl ProxyNode {
    /// A ztunnel on `node_name` whose pod is not known, in cluster `Kubernetes`
    /// (Istio's default cluster id).
    pub fn new(node_name: impl Into<String>) -> Self {
        ProxyNode {
            node_name: node_name.into(),
            pod_name: String::new(),
            pod_namespace: String::new(),
            instance_ip: None,
            cluster_id: "Kubernetes".to_owned(),
        }
    }

    fn ip(&self) -> String {
        self.instance_ip.map_or_else(|| DEFAULT_IP.to_owned(), |ip| ip.to_string())
    }

    /// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
    pub fn id(&self) -> String {
        let (ip, pod, ns) = (self.ip(), &self.pod_name, &self.pod_namespace);
        format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local")
    }

    /// The `Node` sent on every subscription.
    pub fn to_node(&self) -> Node {
        let mut metadata = prost_types::Struct::default();
        for (key, value) in [
            ("NAME", self.pod_name.clone()),
            ("NAMESPACE", self.pod_namespace.clone()),
            ("INSTANCE_IPS", self.ip()),
            ("NODE_NAME", self.node_name.clone()),
            ("CLUSTER_ID", self.cluster_id.clone()),
        ] {
            metadata.fields.insert(key.to_owned(), prost_types::Value { kind: Some(Kind::StringValue(value)) });
        }
        Node {
            id: self.id(),
            cluster: String::new(),
            metadata: Some(metadata),
            user_agent_name: "ambit-ztunnel".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field<'a>(node: &'a Node, key: &str) -> &'a str {
        match &node.metadata.as_ref().unwrap().fields[key].kind {
            Some(Kind::StringValue(s)) => s,
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn the_node_reads_as_istios_ztunnel_writes_it() {
        let p = ProxyNode {
            node_name: "node-a".into(),
            pod_name: "ztunnel-x7k2p".into(),
            pod_namespace: "ambit-system".into(),
            instance_ip: Some("10.0.0.7".parse().unwrap()),
            cluster_id: "east".into(),
        };
        let node = p.to_node();
        assert_eq!(node.id, "ztunnel~10.0.0.7~ztunnel-x7k2p.ambit-system~ambit-system.svc.cluster.local");
        for (key, want) in [
            ("NAME", "ztunnel-x7k2p"),
            ("NAMESPACE", "ambit-system"),
            ("INSTANCE_IPS", "10.0.0.7"),
            ("NODE_NAME", "node-a"),
            ("CLUSTER_ID", "east"),
        ] {
            assert_eq!(field(&node, key), want, "{key}");
        }
        assert_eq!(node.metadata.as_ref().unwrap().fields.len(), 5);
    }

    #[test]
    fn an_unknown_pod_gets_istios_placeholders() {
        let node = ProxyNode::new("node-a").to_node();
        assert_eq!(node.id, "ztunnel~1.1.1.1~.~.svc.cluster.local");
        assert_eq!(field(&node, "INSTANCE_IPS"), "1.1.1.1");
        assert_eq!(field(&node, "NAME"), "");
        assert_eq!(field(&node, "CLUSTER_ID"), "Kubernetes");
    }
}
