//! The waypoint's configuration client: the controller's delta ADS stream
//! (the loop shared with ztunnel, [`ambit_xds_client::ads`]) subscribed to
//! `istio.workload.Address`, `ambit.waypoint.v1.ServiceRoutes` and
//! `ambit.waypoint.v1.AuthorizationPolicy`, authenticated with the waypoint's
//! own service-account token, publishing a new [`Snapshot`] for every applied
//! response once all three types have arrived.
//!
//! A response that does not decode is NACKed and changes nothing; what
//! decodes but cannot be converted is left out of the snapshot on its own
//! (logged). When the controller goes away the last snapshot stays in force
//! while the client reconnects.
//!
//! Certificates: [`certificates`] makes the waypoint's certificate manager
//! (the controller's CA, the same token), shared with ztunnel's code: fetched
//! on first use, rotated at half-life.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_api::discovery::{DeltaDiscoveryResponse, Node, Resource};
use ambit_api::waypoint as pb;
use ambit_api::workload::Address;
use ambit_api::{ADDRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL, WAYPOINT_POLICY_TYPE_URL};
use ambit_xds_client::ads::{AdsClient, BearerToken, DeltaHandler};
use ambit_xds_client::ca::CaClient;
use ambit_xds_client::certs::CertManager;
use ambit_xds_client::token::TokenSource;
use prost::Message;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{info, warn};

use super::snapshot::{Resources, Snapshot, SnapshotHandle, SnapshotPublisher};

/// The types a waypoint subscribes to, in order.
pub const TYPE_URLS: [&str; 3] = [ADDRESS_TYPE_URL, SERVICE_ROUTES_TYPE_URL, WAYPOINT_POLICY_TYPE_URL];

/// Who this waypoint is, as its `Node` says it (the controller decides the
/// waypoint's scope from its token, not from this).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointNode {
    /// The waypoint's pod.
    pub pod_name: String,
    /// Its namespace (the waypoint Gateway's).
    pub namespace: String,
    /// Its pod IP.
    pub instance_ip: Option<IpAddr>,
    /// The cluster's id (`Kubernetes` when unset).
    pub cluster_id: String,
}

impl WaypointNode {
    /// `router~<ip>~<pod>.<ns>~<ns>.svc.cluster.local` (Istio's node id of a
    /// gateway proxy, which a waypoint is) with Istio's metadata keys.
    pub fn to_node(&self) -> Node {
        let ip = self.instance_ip.map_or_else(String::new, |ip| ip.to_string());
        let (pod, ns) = (&self.pod_name, &self.namespace);
        let cluster = if self.cluster_id.is_empty() { "Kubernetes" } else { &self.cluster_id };
        let mut metadata = prost_types::Struct::default();
        let fields = [
            ("NAME", pod.as_str()),
            ("NAMESPACE", ns.as_str()),
            ("INSTANCE_IPS", ip.as_str()),
            ("CLUSTER_ID", cluster),
        ];
        for (key, value) in fields {
            let value = prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(value.to_owned())) };
            metadata.fields.insert(key.to_owned(), value);
        }
        Node {
            id: format!("router~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
            cluster: String::new(),
            metadata: Some(metadata),
            user_agent_name: "ambit-waypoint".to_owned(),
        }
    }
}

/// The waypoint's configuration client. Create it, take
/// [`ConfigClient::snapshots`] (and [`ConfigClient::synced`] for readiness),
/// then spawn [`ConfigClient::run`].
#[derive(Debug)]
pub struct ConfigClient {
    ads: AdsClient,
    trust_domain: String,
    publisher: SnapshotPublisher,
}

impl ConfigClient {
    /// A client over `channel` (the controller's TLS gRPC port, set up by the
    /// caller; a lazy channel reconnects by itself) presenting `token`, the
    /// waypoint's own service-account token (read at every connection when
    /// it is a file). `trust_domain` is given to workloads that carry none.
    pub fn new(channel: Channel, token: TokenSource, node: &WaypointNode, trust_domain: &str) -> Self {
        let ads = AdsClient::new(channel, BearerToken::from_source(token), node.to_node());
        ConfigClient { ads, trust_domain: trust_domain.to_owned(), publisher: SnapshotPublisher::new() }
    }

    /// Reconnect delays: the first and the longest (default 1 s → 30 s).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.ads = self.ads.with_backoff(initial, max);
        self
    }

    /// The snapshots: empty (nothing served) until the first complete
    /// configuration.
    pub fn snapshots(&self) -> SnapshotHandle {
        self.publisher.handle()
    }

    /// `true` once every type has been received (readiness).
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.ads.synced()
    }

    /// Runs until the task is dropped.
    pub async fn run(self) {
        let handler = Handler {
            resources: Resources::default(),
            versions: HashMap::new(),
            trust_domain: self.trust_domain,
            publisher: self.publisher,
            generation: 0,
            problems: 0,
        };
        self.ads.run(handler).await
    }
}

/// The waypoint's certificates from the controller's CA over `channel`,
/// proven with `token` (its own service-account token: the CA gives it only
/// its own identity), valid for `ttl`, rotated at half-life. The data path
/// calls [`CertManager::get`] with the waypoint's identity for its TLS
/// configurations.
pub fn certificates(channel: Channel, token: TokenSource, ttl: Duration) -> Arc<CertManager> {
    let ca = CaClient::from_source(channel, token, ttl);
    CertManager::new(
        Arc::new(ca),
        Box::new(|ok| {
            if !ok {
                warn!("waypoint: certificate request failed");
            }
        }),
    )
}

/// Resources by name with their versions, and the snapshot made of them.
struct Handler {
    resources: Resources,
    /// type URL → name → version.
    versions: HashMap<&'static str, HashMap<String, String>>,
    trust_domain: String,
    publisher: SnapshotPublisher,
    generation: u64,
    /// Problems of the last published snapshot (logged when they change).
    problems: usize,
}

/// A decoded resource of one response (most are addresses: boxing them
/// would not save memory).
#[allow(clippy::large_enum_variant)]
enum Decoded {
    Address(Address),
    Routes(pb::ServiceRoutes),
    Policy(pb::AuthorizationPolicy),
}

fn decode(type_url: &str, r: &Resource) -> Result<Decoded, String> {
    let any = r.resource.as_ref().ok_or_else(|| format!("resource {}: no payload", r.name))?;
    if any.type_url != type_url {
        return Err(format!("resource {}: payload type {}, expected {type_url}", r.name, any.type_url));
    }
    let bytes = any.value.as_slice();
    let err = |e: prost::DecodeError| format!("resource {}: decoding: {e}", r.name);
    Ok(match type_url {
        ADDRESS_TYPE_URL => Decoded::Address(Address::decode(bytes).map_err(err)?),
        SERVICE_ROUTES_TYPE_URL => Decoded::Routes(pb::ServiceRoutes::decode(bytes).map_err(err)?),
        _ => Decoded::Policy(pb::AuthorizationPolicy::decode(bytes).map_err(err)?),
    })
}

impl DeltaHandler for Handler {
    fn type_urls(&self) -> Vec<&'static str> {
        TYPE_URLS.to_vec()
    }

    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.versions.get(type_url).cloned().unwrap_or_default()
    }

    fn apply(&mut self, resp: &DeltaDiscoveryResponse, complete: bool) -> Result<(), String> {
        let Some(type_url) = TYPE_URLS.into_iter().find(|t| *t == resp.type_url) else {
            return Err(format!("unsupported type {}", resp.type_url));
        };
        let decoded = resp
            .resources
            .iter()
            .map(|r| Ok((r.name.clone(), r.version.clone(), decode(type_url, r)?)))
            .collect::<Result<Vec<_>, String>>()?;
        // All or nothing: nothing changes until every resource decoded.
        let versions = self.versions.entry(type_url).or_default();
        for name in &resp.removed_resources {
            versions.remove(name);
            match type_url {
                ADDRESS_TYPE_URL => self.resources.addresses.remove(name).map(|_| ()),
                SERVICE_ROUTES_TYPE_URL => self.resources.service_routes.remove(name).map(|_| ()),
                _ => self.resources.policies.remove(name).map(|_| ()),
            };
        }
        for (name, version, resource) in decoded {
            versions.insert(name.clone(), version);
            match resource {
                Decoded::Address(a) => {
                    self.resources.addresses.insert(name, a);
                }
                Decoded::Routes(r) => {
                    self.resources.service_routes.insert(name, r);
                }
                Decoded::Policy(p) => {
                    self.resources.policies.insert(name, p);
                }
            }
        }
        if complete {
            self.generation += 1;
            let snapshot = Snapshot::build(&self.resources, &self.trust_domain, self.generation);
            let report = snapshot.report();
            let problems = report.routes.len() + report.addresses.len();
            if problems != 0 || self.problems != 0 {
                for p in &report.routes {
                    warn!(problem = %p, "waypoint config: left out");
                }
                for p in &report.addresses {
                    warn!(problem = %p, "waypoint config: address left out");
                }
            }
            self.problems = problems;
            info!(
                version = self.generation,
                services = self.resources.service_routes.len(),
                addresses = self.resources.addresses.len(),
                policies = self.resources.policies.len(),
                "waypoint config: new snapshot"
            );
            self.publisher.publish(snapshot);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ambit_api::workload::address;

    use super::*;

    fn handler() -> (Handler, SnapshotHandle) {
        let publisher = SnapshotPublisher::new();
        let handle = publisher.handle();
        let h = Handler {
            resources: Resources::default(),
            versions: HashMap::new(),
            trust_domain: "cluster.local".into(),
            publisher,
            generation: 0,
            problems: 0,
        };
        (h, handle)
    }

    fn resource<M: Message>(type_url: &str, name: &str, version: &str, m: &M) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(prost_types::Any { type_url: type_url.into(), value: m.encode_to_vec() }),
            ..Default::default()
        }
    }

    fn routes(name: &str) -> pb::ServiceRoutes {
        pb::ServiceRoutes {
            hostname: format!("{name}.mesh.svc.cluster.local"),
            namespace: "mesh".into(),
            name: name.into(),
            ports: vec![pb::PortRoutes { port: 80, ..Default::default() }],
        }
    }

    fn response(type_url: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources,
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_snapshot_is_published_only_once_complete_and_removals_apply() {
        let (mut h, handle) = handler();
        let web = resource(SERVICE_ROUTES_TYPE_URL, "mesh/web.mesh.svc.cluster.local", "v1", &routes("web"));
        h.apply(&response(SERVICE_ROUTES_TYPE_URL, vec![web], &[]), false).unwrap();
        assert_eq!(handle.current().version(), 0, "not complete: nothing published");
        let svc = Address {
            r#type: Some(address::Type::Service(ambit_api::workload::Service {
                name: "web".into(),
                namespace: "mesh".into(),
                hostname: "web.mesh.svc.cluster.local".into(),
                addresses: vec![ambit_api::workload::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 96, 0, 1],
                }],
                ..Default::default()
            })),
        };
        let a = resource(ADDRESS_TYPE_URL, "mesh/web.mesh.svc.cluster.local", "a1", &svc);
        h.apply(&response(ADDRESS_TYPE_URL, vec![a], &[]), true).unwrap();
        let snap = handle.current();
        assert_eq!(snap.version(), 1);
        assert!(snap.served("10.96.0.1:80".parse().unwrap()).is_some());
        assert_eq!(h.versions(SERVICE_ROUTES_TYPE_URL)["mesh/web.mesh.svc.cluster.local"], "v1");
        h.apply(&response(SERVICE_ROUTES_TYPE_URL, vec![], &["mesh/web.mesh.svc.cluster.local"]), true).unwrap();
        assert!(handle.current().served("10.96.0.1:80".parse().unwrap()).is_none());
        assert!(h.versions(SERVICE_ROUTES_TYPE_URL).is_empty());
    }

    #[test]
    fn a_response_that_does_not_decode_changes_nothing() {
        let (mut h, handle) = handler();
        let good = resource(SERVICE_ROUTES_TYPE_URL, "mesh/a.mesh.svc.cluster.local", "v1", &routes("a"));
        h.apply(&response(SERVICE_ROUTES_TYPE_URL, vec![good], &[]), true).unwrap();
        let mut bad = resource(SERVICE_ROUTES_TYPE_URL, "mesh/b.mesh.svc.cluster.local", "v1", &routes("b"));
        bad.resource.as_mut().unwrap().value = vec![0xff, 0xff, 0xff];
        let also = resource(SERVICE_ROUTES_TYPE_URL, "mesh/c.mesh.svc.cluster.local", "v1", &routes("c"));
        let err = h
            .apply(&response(SERVICE_ROUTES_TYPE_URL, vec![also, bad], &["mesh/a.mesh.svc.cluster.local"]), true)
            .unwrap_err();
        assert!(err.contains("mesh/b.mesh.svc.cluster.local"), "{err}");
        let wrong = resource(ADDRESS_TYPE_URL, "mesh/d.mesh.svc.cluster.local", "v1", &routes("d"));
        assert!(h
            .apply(&response(SERVICE_ROUTES_TYPE_URL, vec![wrong], &[]), true)
            .unwrap_err()
            .contains("payload type"));
        assert_eq!(h.resources.service_routes.keys().collect::<Vec<_>>(), ["mesh/a.mesh.svc.cluster.local"]);
        assert_eq!(handle.current().version(), 1);
    }

    #[test]
    fn the_node_names_a_router_with_istios_metadata() {
        let node = WaypointNode {
            pod_name: "waypoint-1".into(),
            namespace: "mesh".into(),
            instance_ip: Some("10.1.0.9".parse().unwrap()),
            cluster_id: String::new(),
        }
        .to_node();
        assert_eq!(node.id, "router~10.1.0.9~waypoint-1.mesh~mesh.svc.cluster.local");
        let fields = &node.metadata.unwrap().fields;
        assert_eq!(fields["CLUSTER_ID"].kind, Some(prost_types::value::Kind::StringValue("Kubernetes".into())));
    }
}
