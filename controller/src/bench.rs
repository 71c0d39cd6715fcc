//! Parts of the controller scale benchmark (`bench-controller`): a synthetic
//! cluster as Kubernetes YAML, the changes the benchmark makes to it, and a
//! measuring delta-xDS client. Kept in the library so the pieces are tested
//! beside the code; the program only orchestrates and prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_api::discovery::{DeltaDiscoveryRequest, Node};
use ambit_api::security::Authorization;
use ambit_api::workload::Address;
use ambit_api::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::model::{parse, ClusterObject, ClusterObjects, ObjectKey};

/// Why a benchmark step failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The generated YAML did not give the expected object.
    #[error("bug: generated object {0} did not parse")]
    Generated(String),
    /// The gRPC channel could not be opened.
    #[error("connecting to xds: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The stream failed.
    #[error("xds stream: {0}")]
    Rpc(#[from] tonic::Status),
    /// A resource did not decode.
    #[error("decoding a resource: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The request channel closed (the stream is gone).
    #[error("request stream closed")]
    RequestClosed,
}

/// The shape of the synthetic cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Pods in all, captured and not.
    pub pods: u32,
    /// Nodes; pods are spread in contiguous blocks.
    pub nodes: u32,
    /// Services, each selecting `(pods - uncaptured) / services` captured pods.
    pub services: u32,
    /// AuthorizationPolicies, each selecting the pods of one service.
    pub policies: u32,
    /// Ambient namespaces (`ns-0`…); services and their pods are spread over them.
    pub namespaces: u32,
    /// Pods (of `pods`) in the non-ambient namespace `legacy`, backing no
    /// service: the workloads per-node scoping leaves out.
    pub uncaptured: u32,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self { pods: 10_000, nodes: 100, services: 1_000, policies: 500, namespaces: 10, uncaptured: 0 }
    }
}

/// Namespace of the pods that are not captured.
pub const LEGACY_NAMESPACE: &str = "legacy";

impl ClusterSpec {
    /// Node name of `i` (0-based).
    pub fn node_name(i: u32) -> String {
        format!("node-{i}")
    }

    /// Node of pod `i`: contiguous blocks, so a service's pods land on different nodes.
    pub fn node_of(&self, pod: u32) -> u32 {
        (u64::from(pod) * u64::from(self.nodes) / u64::from(self.pods.max(1))) as u32
    }

    /// Whether pod `i` is in an ambient namespace (the last `uncaptured` are not).
    pub fn captured(&self, pod: u32) -> bool {
        pod < self.pods - self.uncaptured.min(self.pods)
    }

    fn pod_namespace(&self, pod: u32) -> String {
        if self.captured(pod) {
            self.service_namespace(pod % self.services.max(1))
        } else {
            LEGACY_NAMESPACE.into()
        }
    }

    fn service_namespace(&self, svc: u32) -> String {
        format!("ns-{}", svc % self.namespaces.max(1))
    }

    /// (namespace, name) of pod `i`.
    pub fn pod_key(&self, pod: u32) -> ObjectKey {
        (self.pod_namespace(pod), format!("p{pod}"))
    }

    /// (namespace, name) of policy `k`.
    pub fn policy_key(&self, k: u32) -> ObjectKey {
        (self.service_namespace(k % self.services.max(1)), format!("ap{k}"))
    }

    /// The YAML of pod `i`, Ready or not.
    pub fn pod_yaml(&self, pod: u32, ready: bool) -> String {
        let (ns, name) = self.pod_key(pod);
        let app = if self.captured(pod) { format!("app{}", pod % self.services.max(1)) } else { format!("batch{pod}") };
        // Skip x.x.x.0 and keep every pod's address distinct.
        let n = pod + 256;
        let ip = format!("10.{}.{}.{}", 1 + (n >> 16), (n >> 8) & 255, n & 255);
        let node = Self::node_name(self.node_of(pod));
        let ready = if ready { "True" } else { "False" };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}, version: v1}}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: sa-{app}, containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}\n\
             status: {{podIP: {ip}, conditions: [{{type: Ready, status: '{ready}'}}]}}\n---\n"
        )
    }

    /// The YAML of policy `k`; `variant` changes its rule (the policy change).
    pub fn policy_yaml(&self, k: u32, variant: u32) -> String {
        let (ns, name) = self.policy_key(k);
        let svc = k % self.services.max(1);
        let from = self.service_namespace(svc + 1 + variant);
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  action: ALLOW\n  selector: {{matchLabels: {{app: app{svc}}}}}\n\
             \x20 rules: [{{from: [{{source: {{namespaces: [{from}], principals: [cluster.local/ns/{from}/sa/client-{variant}]}}}}], to: [{{operation: {{ports: ['8080']}}}}]}}]\n---\n"
        )
    }

    /// The whole cluster as multi-document YAML.
    pub fn yaml(&self) -> String {
        let mut out = String::with_capacity(self.pods as usize * 400);
        for n in 0..self.namespaces {
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n"
            );
        }
        if self.uncaptured > 0 {
            let _ = write!(out, "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {LEGACY_NAMESPACE}}}\n---\n");
        }
        for i in 0..self.pods {
            out += &self.pod_yaml(i, true);
        }
        for j in 0..self.services {
            let ns = self.service_namespace(j);
            let ip = j + 1;
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{j}, namespace: {ns}}}\n\
                 spec: {{clusterIP: 10.96.{}.{}, selector: {{app: app{j}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n",
                ip >> 8,
                ip & 255
            );
        }
        for k in 0..self.policies {
            out += &self.policy_yaml(k, 0);
        }
        out
    }
}

/// Replaces (or adds) the object `yaml` describes, as a changed file would.
pub fn apply_yaml(objects: &mut ClusterObjects, yaml: &str) -> Result<(), BenchError> {
    let (mut parsed, rejected) = parse::parse_documents(yaml, "bench.yaml");
    let (Some(obj), true) = (parsed.pop(), rejected.is_empty() && parsed.is_empty()) else {
        return Err(BenchError::Generated(yaml.lines().take(3).collect()));
    };
    let key = obj.key();
    match obj {
        ClusterObject::Pod(p) => {
            objects.pods.insert(key, *p);
        }
        ClusterObject::AuthorizationPolicy(p) => {
            objects.authorization_policies.insert(key, *p);
        }
        other => {
            objects.insert(other);
        }
    }
    Ok(())
}

/// This process's resident set size (`VmRSS` of /proc/self/status), in bytes.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The `p`-th percentile (0..=100) of sorted samples, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One response as a benchmark client saw it.
#[derive(Clone, Debug)]
pub struct Received {
    /// Index of the client.
    pub client: usize,
    /// Whether it carried Addresses (else Authorizations).
    pub addresses: bool,
    /// The snapshot version it came from (`system_version_info`).
    pub version: u64,
    /// Resources added or changed.
    pub resources: usize,
    /// Resources removed.
    pub removed: usize,
    /// Encoded size of the response message.
    pub bytes: usize,
    /// When it arrived.
    pub at: Instant,
}

/// The `NODE_NAME` metadata a ztunnel sends.
fn node(name: &str) -> Node {
    let mut md = prost_types::Struct::default();
    md.fields.insert(
        "NODE_NAME".into(),
        prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(name.into())) },
    );
    Node {
        id: format!("ztunnel~10.0.0.1~ztunnel-{name}.ambit-system~ambit-system.svc.cluster.local"),
        metadata: Some(md),
        ..Default::default()
    }
}

/// The bootstrap token [`run_client`] presents (the benchmark's server admits it).
pub const BENCH_TOKEN: &str = "ambit-bench-token";

/// A raw delta-ADS client for node `node_name`: subscribes to both types,
/// decodes every resource (as a ztunnel would), keeps the name → version
/// map a reconnect needs, ACKs, and reports each response to `report`.
/// Returns when the server or the report receiver goes away.
pub async fn run_client(
    addr: SocketAddr,
    node_name: String,
    client: usize,
    report: mpsc::UnboundedSender<Received>,
) -> Result<(), BenchError> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let (tx, rx) = mpsc::channel(8);
    let mut grpc = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    for (i, type_url) in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL].into_iter().enumerate() {
        let req = DeltaDiscoveryRequest {
            node: (i == 0).then(|| node(&node_name)),
            type_url: type_url.into(),
            ..Default::default()
        };
        tx.send(req).await.map_err(|_| BenchError::RequestClosed)?;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    // The server authenticates as in file mode; a header that cannot be built is a bug of the benchmark.
    let md = request.metadata_mut();
    md.insert("authorization", format!("Bearer {BENCH_TOKEN}").parse().expect("bug: token is header-safe"));
    md.insert("x-ambit-node", node_name.parse().expect("bug: node names are header-safe"));
    let mut stream = grpc.delta_aggregated_resources(request).await?.into_inner();
    let mut held: BTreeMap<String, String> = BTreeMap::new();
    while let Some(resp) = stream.message().await? {
        let at = Instant::now();
        let addresses = resp.type_url == ADDRESS_TYPE_URL;
        for r in &resp.resources {
            if let Some(any) = &r.resource {
                if addresses {
                    Address::decode(any.value.as_slice())?;
                } else {
                    Authorization::decode(any.value.as_slice())?;
                }
            }
            held.insert(r.name.clone(), r.version.clone());
        }
        for n in &resp.removed_resources {
            held.remove(n);
        }
        let seen = Received {
            client,
            addresses,
            version: resp.system_version_info.parse().unwrap_or(0),
            resources: resp.resources.len(),
            removed: resp.removed_resources.len(),
            bytes: resp.encoded_len(),
            at,
        };
        let ack = DeltaDiscoveryRequest { type_url: resp.type_url, response_nonce: resp.nonce, ..Default::default() };
        tx.send(ack).await.map_err(|_| BenchError::RequestClosed)?;
        if report.send(seen).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{build_report, ModelOptions};
    use ambit_api::workload::address;

    fn small() -> ClusterSpec {
        ClusterSpec { pods: 40, nodes: 4, services: 10, policies: 5, namespaces: 2, uncaptured: 10 }
    }

    fn objects(spec: &ClusterSpec) -> ClusterObjects {
        let (parsed, rejected) = parse::parse_documents(&spec.yaml(), "bench.yaml");
        assert!(rejected.is_empty(), "{rejected:?}");
        let mut objects = ClusterObjects::default();
        for o in parsed {
            assert!(objects.insert(o));
        }
        objects
    }

    #[test]
    fn the_synthetic_cluster_builds_without_rejections_and_has_the_requested_shape() {
        let spec = small();
        let r = build_report(&objects(&spec), &ModelOptions::default(), 1);
        assert!(r.rejections.is_empty(), "{:?}", r.rejections);
        let s = r.snapshot;
        assert_eq!(s.addresses.len(), 50);
        assert_eq!(s.authorizations.len(), 5);
        let workloads: Vec<_> = s
            .addresses
            .values()
            .filter_map(|a| match &a.r#type {
                Some(address::Type::Workload(w)) => Some(w),
                _ => None,
            })
            .collect();
        let backing = workloads.iter().filter(|w| !w.services.is_empty()).count();
        assert_eq!(backing, 30, "every captured pod backs its service");
        let nodes: std::collections::BTreeSet<_> = workloads.iter().map(|w| &w.node).collect();
        assert_eq!(nodes.len(), 4);
        let selected = workloads.iter().filter(|w| !w.authorization_policies.is_empty()).count();
        assert_eq!(selected, 15, "5 policies select the 3 pods of 5 services");
    }

    fn changed<T: PartialEq>(a: &BTreeMap<String, T>, b: &BTreeMap<String, T>) -> usize {
        a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count()
    }

    #[test]
    fn a_readiness_flip_and_a_policy_change_change_exactly_one_resource() {
        let spec = small();
        let mut objects = objects(&spec);
        let opts = ModelOptions::default();
        let before = build_report(&objects, &opts, 1).snapshot;
        apply_yaml(&mut objects, &spec.pod_yaml(3, false)).unwrap();
        apply_yaml(&mut objects, &spec.policy_yaml(2, 1)).unwrap();
        let after = build_report(&objects, &opts, 2).snapshot;
        assert_eq!(changed(&after.addresses, &before.addresses), 1);
        assert_eq!(changed(&after.authorizations, &before.authorizations), 1);
        assert_eq!(after.addresses.len(), before.addresses.len());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<_> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v[..1], 99.0), Duration::from_millis(1));
    }
}
