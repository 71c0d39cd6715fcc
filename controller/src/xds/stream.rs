//! The delta xDS state of one stream, without I/O: what the client holds,
//! what it subscribed to, which responses await an ACK. The task in `mod.rs`
//! feeds it requests and snapshots and sends what it returns.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ambit_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource};
use ambit_api::workload::{address, Address, TunnelProtocol};
use prost_types::value::Kind;
use tracing::{debug, warn};

use super::metrics::XdsMetrics;
use super::version::{parse_version, version_string, Prepared, ResourceType};
use crate::model::{ObjectKey, Snapshot};

/// How many unacknowledged nonces a stream remembers; older ones count as
/// neither ACK nor NACK when they come back.
const MAX_PENDING: usize = 16;

/// Who is on the other end of a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `node.id` as sent.
    pub id: String,
    /// Kubernetes node name: metadata `NODE_NAME`, else `node.id`.
    pub name: String,
}

impl NodeInfo {
    /// Metadata `NODE_NAME`, when set and not empty (Istio's ztunnel sends it
    /// empty when its `NODE_NAME` environment variable is unset).
    pub fn declared_name(node: &Node) -> Option<String> {
        node.metadata.as_ref().and_then(|m| m.fields.get("NODE_NAME")).and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            _ => None,
        })
    }

    /// Reads the node name from metadata `NODE_NAME`, falling back to the id.
    pub fn from_node(node: &Node) -> Self {
        let name = Self::declared_name(node).unwrap_or_else(|| node.id.clone());
        NodeInfo { id: node.id.clone(), name }
    }

    /// The node a stream serves when its caller is known to run on `known`
    /// (from its credential, or an earlier request) and it now declares
    /// `node`: `known`, which a declared `NODE_NAME` must agree with (else
    /// `Err` with the declared name); without `known`, what `node` declares.
    pub fn for_caller(known: Option<&str>, node: &Node) -> Result<Self, String> {
        match known {
            None => Ok(Self::from_node(node)),
            Some(known) => match Self::declared_name(node) {
                Some(declared) if declared != known => Err(declared),
                _ => Ok(NodeInfo { id: node.id.clone(), name: known.to_owned() }),
            },
        }
    }
}

/// Whether `node` should receive resource `name` of type `ty`.
///
/// A ztunnel gets every Service and every Authorization (any pod on its node
/// may call any service, and policies are few and small), the workloads of
/// its own node, and those workloads of other nodes it may meet:
/// - workloads that back a service, since it picks endpoints from them;
/// - captured (HBONE) workloads, since a captured pod can be reached by its
///   IP directly and ztunnel resolves a destination IP to a workload to learn
///   the identity to verify (and to tunnel at all rather than pass through).
///
/// Left out: workloads elsewhere that are not captured and back no service.
/// Traffic to them passes through untouched either way; the only loss is
/// source-workload labels on metrics for plaintext inbound from such a pod.
/// Removals follow automatically: a resource that stops being visible is sent
/// as removed. A name missing from the snapshot is not visible.
/// A ztunnel gets no waypoint configuration.
pub fn visible_to_node(node: &NodeInfo, ty: ResourceType, name: &str, snapshot: &Snapshot) -> bool {
    match ty {
        ResourceType::Authorization => snapshot.authorizations.contains_key(name),
        ResourceType::Address => snapshot.addresses.get(name).is_some_and(|a| address_visible(&node.name, a)),
        ResourceType::ServiceRoutes | ResourceType::WaypointPolicy => false,
    }
}

/// Whether waypoint `(namespace, name)` should receive resource `name` of type `ty`: what its
/// [`WaypointScope`](crate::model::WaypointScope) lists (its services' routes and addresses, their backends and
/// endpoints, the L7 policies bound to it), and no L4 policy: those are ztunnel's.
pub fn visible_to_waypoint(waypoint: &ObjectKey, ty: ResourceType, name: &str, snapshot: &Snapshot) -> bool {
    let Some(scope) = snapshot.waypoints.get(waypoint) else { return false };
    let listed = match ty {
        ResourceType::Address => &scope.addresses,
        ResourceType::ServiceRoutes => &scope.service_routes,
        ResourceType::WaypointPolicy => &scope.policies,
        ResourceType::Authorization => return false,
    };
    listed.contains(name) && present(ty, name, snapshot)
}

/// Whether the snapshot holds `name` of type `ty`.
fn present(ty: ResourceType, name: &str, snapshot: &Snapshot) -> bool {
    match ty {
        ResourceType::Address => snapshot.addresses.contains_key(name),
        ResourceType::Authorization => snapshot.authorizations.contains_key(name),
        ResourceType::ServiceRoutes => snapshot.service_routes.contains_key(name),
        ResourceType::WaypointPolicy => snapshot.waypoint_policies.contains_key(name),
    }
}

/// [`visible_to_node`] for an address already at hand.
fn address_visible(node: &str, a: &Address) -> bool {
    match &a.r#type {
        Some(address::Type::Workload(w)) => {
            // Cheap inline fields first: most workloads are captured.
            w.tunnel_protocol == i32::from(TunnelProtocol::Hbone) || !w.services.is_empty() || w.node == node
        }
        Some(address::Type::Service(_)) => true,
        None => false,
    }
}

/// Unique nonces: a per-process random prefix, so a restarted controller
/// never reuses one, and a counter.
fn next_nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static BOOT: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let boot = BOOT.get_or_init(rand_u32);
    format!("{boot:08x}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Process-unique enough: time and pid mixed, no RNG dependency needed.
fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (t as u32) ^ std::process::id().rotate_left(16)
}

/// One type's subscription on a stream.
#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// name → version the client holds (as far as the server knows); the
    /// names are those of the prepared snapshot, shared.
    known: HashMap<Arc<str>, u64>,
    /// The snapshot version `known` was last brought up to date with; a
    /// snapshot prepared against it needs only its changed names examined.
    synced_to: Option<u64>,
}

impl TypeState {
    fn subscribed(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    fn apply_subscriptions(&mut self, subscribe: &[String], unsubscribe: &[String]) {
        for n in subscribe {
            if n == "*" {
                self.wildcard = true;
            } else {
                self.names.insert(n.clone());
            }
        }
        for n in unsubscribe {
            if n == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(n);
            }
        }
        // The client drops what it unsubscribed from; forget it too, so a
        // later subscribe resends it.
        let (wildcard, names) = (self.wildcard, &self.names);
        self.known.retain(|n, _| wildcard || names.contains(&**n));
        self.synced_to = None;
    }
}

/// A response on its way out, with what the metrics need.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub ty: ResourceType,
    pub response: DeltaDiscoveryResponse,
}

/// The server side of one delta ADS stream.
#[derive(Debug)]
pub(crate) struct StreamState {
    node: Option<NodeInfo>,
    /// Set for a waypoint's stream: the waypoint Gateway `(namespace, name)` it serves, whose scope decides what
    /// the stream gets instead of a node.
    waypoint: Option<ObjectKey>,
    types: [Option<TypeState>; 4],
    pending: VecDeque<(String, ResourceType)>,
    metrics: Arc<XdsMetrics>,
}

impl StreamState {
    pub fn new(metrics: Arc<XdsMetrics>) -> Self {
        StreamState { node: None, waypoint: None, types: Default::default(), pending: VecDeque::new(), metrics }
    }

    /// Serves waypoint `(namespace, name)` from now on: its scope, not a node's view.
    pub fn set_waypoint(&mut self, waypoint: ObjectKey) {
        self.waypoint = Some(waypoint);
    }

    /// The waypoint this stream serves, if it is a waypoint's.
    pub fn waypoint(&self) -> Option<&ObjectKey> {
        self.waypoint.as_ref()
    }

    /// The node, once known (from the caller's credential or a request).
    pub fn node(&self) -> Option<&NodeInfo> {
        self.node.as_ref()
    }

    /// Serves `node` from now on (set before the requests that depend on it).
    pub fn set_node(&mut self, node: NodeInfo) {
        self.node = Some(node);
    }

    /// Handles one request: ACK/NACK bookkeeping, then subscription changes.
    /// Returns the response to send, if any.
    pub fn on_request(&mut self, req: DeltaDiscoveryRequest, prepared: &Prepared) -> Option<Outgoing> {
        if let Some(node) = &req.node {
            if self.node.is_none() && self.waypoint.is_none() {
                self.node = Some(NodeInfo::from_node(node));
            }
        }
        let ty = ResourceType::from_type_url(&req.type_url);
        if !req.response_nonce.is_empty() {
            self.on_reply(&req, ty);
        }
        let Some(ty) = ty else {
            warn!(type_url = %req.type_url, node = ?self.node_name(), "xds: ignoring request for an unknown type");
            return None;
        };
        match &mut self.types[ty.index()] {
            None => {
                // First request of this type: wildcard unless names are listed.
                let mut st = TypeState { wildcard: req.resource_names_subscribe.is_empty(), ..Default::default() };
                st.apply_subscriptions(&req.resource_names_subscribe, &req.resource_names_unsubscribe);
                // A version this server cannot have sent is left out: the resource is sent again.
                st.known = req
                    .initial_resource_versions
                    .into_iter()
                    .filter_map(|(name, v)| Some((Arc::from(name), parse_version(&v)?)))
                    .collect();
                // What it holds beyond its subscription is not ours to track.
                st.apply_subscriptions(&[], &[]);
                self.types[ty.index()] = Some(st);
                // Always answer the first request, even with nothing, so the
                // client knows it is in sync.
                self.delta(ty, prepared, true)
            }
            Some(st) => {
                if req.resource_names_subscribe.is_empty() && req.resource_names_unsubscribe.is_empty() {
                    return None;
                }
                st.apply_subscriptions(&req.resource_names_subscribe, &req.resource_names_unsubscribe);
                self.delta(ty, prepared, false)
            }
        }
    }

    fn on_reply(&mut self, req: &DeltaDiscoveryRequest, ty: Option<ResourceType>) {
        let Some(pos) = self.pending.iter().position(|(n, _)| *n == req.response_nonce) else {
            debug!(nonce = %req.response_nonce, "xds: reply to an unknown or expired nonce");
            return;
        };
        // Everything older than the acknowledged nonce is settled too.
        self.pending.drain(..=pos);
        match &req.error_detail {
            Some(err) => {
                self.metrics.nack(ty);
                // Not resent: the server keeps believing the client holds
                // what it sent, and the next change brings a new version.
                warn!(
                    node = ?self.node_name(),
                    type_url = %req.type_url,
                    nonce = %req.response_nonce,
                    code = err.code,
                    error = %err.message,
                    "xds: client rejected configuration (NACK)"
                );
            }
            None => self.metrics.ack(ty),
        }
    }

    fn node_name(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.name.as_str())
    }

    /// Responses for a new snapshot: per subscribed type, what changed.
    pub fn on_snapshot(&mut self, prepared: &Prepared) -> Vec<Outgoing> {
        ResourceType::ALL.into_iter().filter_map(|ty| self.delta(ty, prepared, false)).collect()
    }

    /// What the client of type `ty` lacks or holds in excess; `None` when
    /// nothing differs (unless `always`).
    fn delta(&mut self, ty: ResourceType, prepared: &Prepared, always: bool) -> Option<Outgoing> {
        let default_node = NodeInfo::default();
        let node = self.node.as_ref().unwrap_or(&default_node);
        let waypoint = self.waypoint.as_ref();
        let st = self.types[ty.index()].as_mut()?;
        let current = prepared.resources(ty);
        let snapshot = &prepared.snapshot;
        let visible_to = |name: &str| match waypoint {
            Some(wp) => visible_to_waypoint(wp, ty, name, snapshot),
            None => visible_to_node(node, ty, name, snapshot),
        };
        // Visibility per resource without a lookup: the prepared map and the
        // snapshot's map of the same type have the same keys in the same order.
        let visible: Box<dyn Iterator<Item = bool>> = match (waypoint, ty) {
            (Some(_), _) => Box::new(current.keys().map(|n| visible_to(n))),
            (None, ResourceType::Address) => {
                debug_assert_eq!(current.len(), snapshot.addresses.len(), "bug: prepared and snapshot differ");
                Box::new(snapshot.addresses.values().map(|a| address_visible(&node.name, a)))
            }
            (None, ResourceType::Authorization) => Box::new(std::iter::repeat(true)),
            (None, ResourceType::ServiceRoutes | ResourceType::WaypointPolicy) => Box::new(std::iter::repeat(false)),
        };
        let mut resources = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        let mut send = |st: &mut TypeState, name: &Arc<str>, enc: &crate::xds::version::Encoded| {
            if st.known.get(name) == Some(&enc.version) {
                return;
            }
            st.known.insert(name.clone(), enc.version);
            resources.push(Resource {
                name: name.to_string(),
                version: version_string(enc.version),
                resource: Some(enc.any.clone()),
                aliases: Vec::new(),
                ttl: None,
            });
        };
        // A waypoint's scope changes without its resources changing (a new route brings a backend), so its streams
        // always compare in full; they are few.
        if !always && waypoint.is_none() && st.synced_to.is_some() && st.synced_to == prepared.base {
            // Up to date with the snapshot this one was diffed against: only
            // the changed names can differ (visibility changes only with the
            // resource itself).
            for name in prepared.changed(ty) {
                match current.get_key_value(name.as_str()) {
                    Some((shared, enc)) if st.subscribed(name) && visible_to(name) => send(st, shared, enc),
                    _ => {
                        if st.known.remove(name.as_str()).is_some() {
                            removed.push(name.clone());
                        }
                    }
                }
            }
        } else {
            // How many of the names the client is known to hold stay visible;
            // when that is all of them, nothing is to be removed.
            let mut kept = 0;
            for ((name, enc), visible) in current.iter().zip(visible) {
                if !visible || !st.subscribed(name) {
                    continue;
                }
                kept += 1;
                send(st, name, enc);
            }
            if st.known.len() != kept {
                removed = st
                    .known
                    .keys()
                    .filter(|n| !current.contains_key(*n) || !visible_to(n))
                    .map(|n| n.to_string())
                    .collect();
            }
            for n in &removed {
                st.known.remove(n.as_str());
            }
        }
        removed.sort();
        st.synced_to = Some(snapshot.version);
        if resources.is_empty() && removed.is_empty() && !always {
            return None;
        }
        let nonce = next_nonce();
        if self.pending.len() == MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back((nonce.clone(), ty));
        Some(Outgoing {
            ty,
            response: DeltaDiscoveryResponse {
                system_version_info: snapshot.version.to_string(),
                resources,
                type_url: ty.type_url().to_owned(),
                nonce,
                removed_resources: removed,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_api::discovery::Status;
    use ambit_api::security::Authorization;
    use prometheus_client::registry::Registry;
    use std::collections::BTreeMap;

    fn policy(name: &str) -> Authorization {
        Authorization { name: name.into(), namespace: "ns".into(), ..Default::default() }
    }

    fn prepared(version: u64, names: &[&str]) -> Prepared {
        let authorizations: BTreeMap<_, _> = names.iter().map(|n| (format!("ns/{n}"), policy(n))).collect();
        let s = Snapshot { version, authorizations, ..Default::default() };
        Prepared::build(Arc::new(s), None)
    }

    fn subscribe(ty: ResourceType) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest { type_url: ty.type_url().into(), ..Default::default() }
    }

    fn state() -> (StreamState, Arc<XdsMetrics>) {
        let m = XdsMetrics::new(&mut Registry::default());
        (StreamState::new(m.clone()), m)
    }

    #[test]
    fn node_name_comes_from_metadata_and_falls_back_to_the_id() {
        let mut node = Node { id: "ztunnel~10.0.0.1~z.ns~ns.svc.cluster.local".into(), ..Default::default() };
        assert_eq!(NodeInfo::from_node(&node).name, node.id);
        let mut md = prost_types::Struct::default();
        md.fields.insert("NODE_NAME".into(), prost_types::Value { kind: Some(Kind::StringValue("node-a".into())) });
        node.metadata = Some(md);
        assert_eq!(NodeInfo::from_node(&node).name, "node-a");
    }

    /// The Node Istio's ztunnel sends (src/xds/client.rs): id and metadata from its environment.
    fn istio_node(node_name: &str) -> Node {
        let mut md = prost_types::Struct::default();
        for (k, v) in [
            ("NAME", "ztunnel-x7k2p"),
            ("NAMESPACE", "istio-system"),
            ("INSTANCE_IPS", "10.0.0.1"),
            ("NODE_NAME", node_name),
            ("CLUSTER_ID", "Kubernetes"),
        ] {
            md.fields.insert(k.into(), prost_types::Value { kind: Some(Kind::StringValue(v.into())) });
        }
        Node {
            id: "ztunnel~10.0.0.1~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local".into(),
            metadata: Some(md),
            ..Default::default()
        }
    }

    #[test]
    fn an_istio_node_is_parsed_and_a_known_node_wins_over_what_it_declares() {
        let node = istio_node("node-a");
        assert_eq!(NodeInfo::declared_name(&node).as_deref(), Some("node-a"));
        // Unknown caller node (a shared token): the declared NODE_NAME.
        assert_eq!(NodeInfo::for_caller(None, &node).unwrap().name, "node-a");
        // Known: it must agree, and the id is kept for logs.
        let info = NodeInfo::for_caller(Some("node-a"), &node).unwrap();
        assert_eq!((info.id.as_str(), info.name.as_str()), (node.id.as_str(), "node-a"));
        assert_eq!(NodeInfo::for_caller(Some("node-b"), &node).unwrap_err(), "node-a");
        // An empty NODE_NAME (Istio's ztunnel without the variable) declares nothing: the known node stands.
        let unnamed = istio_node(" ");
        assert_eq!(NodeInfo::declared_name(&unnamed), None);
        assert_eq!(NodeInfo::for_caller(Some("node-b"), &unnamed).unwrap().name, "node-b");
    }

    #[test]
    fn a_stream_up_to_date_with_the_base_gets_exactly_the_changes() {
        let (mut s, _) = state();
        let p1 = prepared(1, &["a", "b", "c"]);
        s.on_request(subscribe(ResourceType::Authorization), &p1).unwrap();
        // v2 against v1: "b" changed, "c" removed, "d" added, "a" untouched.
        let mut s2 = (*p1.snapshot).clone();
        s2.version = 2;
        s2.authorizations.get_mut("ns/b").unwrap().action = 1;
        s2.authorizations.remove("ns/c");
        s2.authorizations.insert("ns/d".into(), policy("d"));
        let p2 = Prepared::build(Arc::new(s2), Some(&p1));
        assert_eq!(p2.base, Some(1));
        let mut changed = p2.changed(ResourceType::Authorization).to_vec();
        changed.sort();
        assert_eq!(changed, ["ns/b", "ns/c", "ns/d"]);
        let out = s.on_snapshot(&p2);
        assert_eq!(out.len(), 1);
        let names: Vec<_> = out[0].response.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["ns/b", "ns/d"]);
        assert_eq!(out[0].response.removed_resources, ["ns/c"]);
        // A stream that missed v2 gets the same result from the full walk at v3.
        let (mut late, _) = state();
        late.on_request(subscribe(ResourceType::Authorization), &p1).unwrap();
        let mut s3 = (*p2.snapshot).clone();
        s3.version = 3;
        let p3 = Prepared::build(Arc::new(s3), Some(&p2));
        let out = late.on_snapshot(&p3);
        let names: Vec<_> = out[0].response.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["ns/b", "ns/d"]);
        assert_eq!(out[0].response.removed_resources, ["ns/c"]);
        assert!(s.on_snapshot(&p3).is_empty(), "nothing changed between v2 and v3");
    }

    #[test]
    fn first_request_is_answered_even_when_empty() {
        let (mut s, _) = state();
        let out = s.on_request(subscribe(ResourceType::Address), &prepared(1, &[])).unwrap();
        assert!(out.response.resources.is_empty());
        assert_eq!(out.response.type_url, ambit_api::ADDRESS_TYPE_URL);
    }

    #[test]
    fn nack_is_counted_and_nothing_is_resent_until_a_change() {
        let (mut s, m) = state();
        let p1 = prepared(1, &["a"]);
        let out = s.on_request(subscribe(ResourceType::Authorization), &p1).unwrap();
        let mut nack = subscribe(ResourceType::Authorization);
        nack.response_nonce = out.response.nonce.clone();
        nack.error_detail = Some(Status { code: 3, message: "bad".into(), details: vec![] });
        assert!(s.on_request(nack, &p1).is_none());
        assert_eq!(m.nacks(ResourceType::Authorization), 1);
        assert!(s.on_snapshot(&p1).is_empty());
        let p2 = prepared(2, &["a", "b"]);
        let out = s.on_snapshot(&p2);
        assert_eq!(out.len(), 1);
        let names: Vec<_> = out[0].response.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["ns/b"]);
    }

    #[test]
    fn explicit_subscription_receives_only_named_resources_and_unsubscribe_forgets_them() {
        let (mut s, _) = state();
        let p = prepared(1, &["a", "b"]);
        let mut req = subscribe(ResourceType::Authorization);
        req.resource_names_subscribe = vec!["ns/a".into()];
        let out = s.on_request(req, &p).unwrap();
        assert_eq!(out.response.resources.len(), 1);
        assert_eq!(out.response.resources[0].name, "ns/a");
        let mut more = subscribe(ResourceType::Authorization);
        more.resource_names_subscribe = vec!["ns/b".into()];
        more.resource_names_unsubscribe = vec!["ns/a".into()];
        let out = s.on_request(more, &p).unwrap();
        assert_eq!(out.response.resources[0].name, "ns/b");
        assert!(out.response.removed_resources.is_empty(), "unsubscribed names are not 'removed'");
    }

    fn pod(node: &str, captured: bool, service: Option<&str>) -> Address {
        use ambit_api::workload::{PortList, Workload};
        Address {
            r#type: Some(address::Type::Workload(Workload {
                node: node.into(),
                tunnel_protocol: if captured { TunnelProtocol::Hbone } else { TunnelProtocol::None }.into(),
                services: service.map(|s| (s.to_owned(), PortList::default())).into_iter().collect(),
                ..Default::default()
            })),
        }
    }

    /// Pods on nodes a and b, captured or not, backing a service or not.
    fn cluster(version: u64, b_plain_captured: bool) -> Snapshot {
        let mut s =
            Snapshot { version, authorizations: [("ns/p".to_owned(), policy("p"))].into(), ..Default::default() };
        let svc = Address { r#type: Some(address::Type::Service(Default::default())) };
        s.addresses.insert("ns/svc.ns.svc.cluster.local".into(), svc);
        s.addresses.insert("a-plain".into(), pod("a", false, None));
        s.addresses.insert("b-plain".into(), pod("b", b_plain_captured, None));
        s.addresses.insert("b-captured".into(), pod("b", true, None));
        s.addresses.insert("b-backend".into(), pod("b", false, Some("ns/svc.ns.svc.cluster.local")));
        s
    }

    fn node(name: &str) -> NodeInfo {
        NodeInfo { id: format!("ztunnel~{name}"), name: name.into() }
    }

    #[test]
    fn a_node_sees_services_policies_its_own_pods_and_captured_or_backing_pods_elsewhere() {
        let s = cluster(1, false);
        let seen = |n: &str| -> Vec<&str> {
            s.addresses
                .keys()
                .filter(|k| visible_to_node(&node(n), ResourceType::Address, k, &s))
                .map(String::as_str)
                .collect()
        };
        assert_eq!(
            seen("a"),
            ["a-plain", "b-backend", "b-captured", "ns/svc.ns.svc.cluster.local"],
            "b-plain is neither captured nor a backend, nor on node a"
        );
        assert_eq!(
            seen("b"),
            ["a-plain", "b-backend", "b-captured", "b-plain", "ns/svc.ns.svc.cluster.local"]
                .into_iter()
                .filter(|n| *n != "a-plain")
                .collect::<Vec<_>>()
        );
        assert!(visible_to_node(&node("a"), ResourceType::Authorization, "ns/p", &s));
        assert!(!visible_to_node(&node("a"), ResourceType::Address, "missing", &s));
    }

    #[test]
    fn a_stream_gets_only_visible_workloads_and_one_that_becomes_hidden_is_removed() {
        let (mut s, _) = state();
        let mut req = subscribe(ResourceType::Address);
        req.node = Some(Node {
            // No NODE_NAME metadata: the id is the node name.
            id: "a".into(),
            ..Default::default()
        });
        let p1 = Prepared::build(Arc::new(cluster(1, true)), None);
        let out = s.on_request(req, &p1).unwrap();
        let names: Vec<_> = out.response.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a-plain", "b-backend", "b-captured", "b-plain", "ns/svc.ns.svc.cluster.local"]);
        // b-plain leaves the mesh: node a no longer needs it.
        let p2 = Prepared::build(Arc::new(cluster(2, false)), Some(&p1));
        let out = s.on_snapshot(&p2);
        assert_eq!(out.len(), 1);
        assert!(out[0].response.resources.is_empty());
        assert_eq!(out[0].response.removed_resources, ["b-plain"]);
        // Back in the mesh: sent again.
        let p3 = Prepared::build(Arc::new(cluster(3, true)), Some(&p2));
        let out = s.on_snapshot(&p3);
        assert_eq!(out[0].response.resources[0].name, "b-plain");
        assert!(out[0].response.removed_resources.is_empty());
    }

    #[test]
    fn nonces_are_unique() {
        let a = next_nonce();
        let b = next_nonce();
        assert_ne!(a, b);
    }
}
