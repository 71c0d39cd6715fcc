//! Waypoint streams over real gRPC on 127.0.0.1, authenticated as file mode does it (a workload token, next to
//! per-node tokens): a waypoint gets its own services' L7 configuration and addresses, a ztunnel none of it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambit_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambit_api::waypoint::{AuthorizationPolicy, ServiceRoutes};
use ambit_api::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, SERVICE_ROUTES_TYPE_URL, WAYPOINT_POLICY_TYPE_URL};
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Streaming};

use super::*;
use crate::ca::{NodeTokenAuthenticator, WorkloadTokenAuthenticator};
use crate::model::waypoint_tests::{waypoint_cluster, WAYPOINT_CLUSTER};
use crate::model::{self, ClusterObjects, ModelOptions, Snapshot, SnapshotTx};

const WAIT: Duration = Duration::from_secs(5);
const WEB: &str = "mesh/web.mesh.svc.cluster.local";
const TYPES: [&str; 4] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, SERVICE_ROUTES_TYPE_URL, WAYPOINT_POLICY_TYPE_URL];

/// Serves on a runtime of the test; the task ends with it.
async fn serve(tx: &SnapshotTx) -> SocketAddr {
    let nodes = NodeTokenAuthenticator::parse("node1-token node1\n", Path::new("nodes")).unwrap();
    let text = "waypoint-token mesh/waypoint\nother-token mesh/web\n";
    let auth = WorkloadTokenAuthenticator::parse(text, Path::new("workloads"), Arc::new(nodes)).unwrap();
    let svc = XdsServer::new(tx.subscribe(), XdsMetrics::new(&mut Registry::default()), Arc::new(auth));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Server::builder().add_service(svc.into_service()).serve_with_incoming(TcpIncoming::from(listener)));
    addr
}

struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    async fn connect(addr: SocketAddr, token: &str) -> Result<Self, tonic::Status> {
        let channel = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        let mut client =
            AggregatedDiscoveryServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", header.clone());
                Ok(r)
            });
        let (tx, rx) = mpsc::channel(16);
        let rx = client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Client { tx, rx })
    }

    /// Subscribes to every type (wildcard) and returns the first answer of each, by type URL.
    async fn sync(&mut self) -> HashMap<String, DeltaDiscoveryResponse> {
        for t in TYPES {
            let req = DeltaDiscoveryRequest { type_url: t.into(), ..Default::default() };
            self.tx.send(req).await.unwrap();
        }
        let mut out = HashMap::new();
        for _ in TYPES {
            let r = self.next().await;
            out.insert(r.type_url.clone(), r);
        }
        out
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        let r = tokio::time::timeout(WAIT, self.rx.message()).await.expect("in time").unwrap().expect("open");
        let ack = DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        };
        self.tx.send(ack).await.unwrap();
        r
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

fn snapshot_of(text: &str, version: u64) -> Snapshot {
    let (parsed, rejections) = model::parse_documents(text, "t.yaml");
    assert!(rejections.is_empty(), "{rejections:?}");
    let mut objects = ClusterObjects::default();
    parsed.into_iter().for_each(|o| assert!(objects.insert(o)));
    model::build_report(&objects, &ModelOptions::default(), version).snapshot
}

#[tokio::test]
async fn a_waypoint_stream_gets_only_its_services_config_and_addresses() {
    let (tx, _rx) = watch::channel(Arc::new(waypoint_cluster().snapshot));
    let addr = serve(&tx).await;
    let mut wp = Client::connect(addr, "waypoint-token").await.unwrap();
    let got = wp.sync().await;
    assert_eq!(
        names(&got[ADDRESS_TYPE_URL]),
        ["Kubernetes//Pod/mesh/web-0", "Kubernetes//Pod/mesh/web-v2-0", "mesh/web-v2.mesh.svc.cluster.local", WEB],
        "its service, the route's backend, their pods; not plain or elsewhere"
    );
    assert!(names(&got[AUTHORIZATION_TYPE_URL]).is_empty(), "L4 policies are ztunnel's");
    assert_eq!(names(&got[SERVICE_ROUTES_TYPE_URL]), [WEB]);
    assert_eq!(names(&got[WAYPOINT_POLICY_TYPE_URL]), ["mesh/at-waypoint", "mesh/at-web"]);
    let any = got[SERVICE_ROUTES_TYPE_URL].resources[0].resource.as_ref().unwrap();
    assert_eq!(any.type_url, "type.googleapis.com/ambit.waypoint.v1.ServiceRoutes");
    let routes = ServiceRoutes::decode(any.value.as_slice()).unwrap();
    assert_eq!(
        (routes.hostname.as_str(), routes.ports[0].routes[0].origin.as_ref().unwrap().name.as_str()),
        ("web.mesh.svc.cluster.local", "web")
    );
    let any = got[WAYPOINT_POLICY_TYPE_URL].resources[0].resource.as_ref().unwrap();
    assert_eq!(AuthorizationPolicy::decode(any.value.as_slice()).unwrap().name, "at-waypoint");
    let version = &got[SERVICE_ROUTES_TYPE_URL].resources[0].version;
    assert_eq!(version.len(), 16, "a content hash, as for the other types");

    // The route gains a backend: the waypoint is sent its Address and its pod (resources that did not change
    // themselves), and the new routes.
    let more =
        WAYPOINT_CLUSTER.replace("{name: missing, port: 80, weight: 1}", "{name: elsewhere, port: 80, weight: 1}");
    tx.send_replace(Arc::new(snapshot_of(&more, 2)));
    let a = wp.next().await;
    assert_eq!(a.type_url, ADDRESS_TYPE_URL);
    assert_eq!(names(&a), ["Kubernetes//Pod/mesh/elsewhere-0", "mesh/elsewhere.mesh.svc.cluster.local"]);
    let r = wp.next().await;
    assert_eq!((r.type_url.as_str(), names(&r)), (SERVICE_ROUTES_TYPE_URL, vec![WEB]));
    assert_ne!(&r.resources[0].version, version);

    // And loses it again: removed.
    tx.send_replace(Arc::new(snapshot_of(WAYPOINT_CLUSTER, 3)));
    let a = wp.next().await;
    assert_eq!(a.removed_resources, ["Kubernetes//Pod/mesh/elsewhere-0", "mesh/elsewhere.mesh.svc.cluster.local"]);
}

#[tokio::test]
async fn a_ztunnel_stream_gets_no_waypoint_configuration_and_keeps_its_l4_policies() {
    let (tx, _rx) = watch::channel(Arc::new(waypoint_cluster().snapshot));
    let addr = serve(&tx).await;
    let mut zt = Client::connect(addr, "node1-token").await.unwrap();
    let got = zt.sync().await;
    assert!(names(&got[SERVICE_ROUTES_TYPE_URL]).is_empty());
    assert!(names(&got[WAYPOINT_POLICY_TYPE_URL]).is_empty());
    assert_eq!(names(&got[AUTHORIZATION_TYPE_URL]), ["mesh/l4"], "the L4 policy, not the waypoint's");
    assert!(names(&got[ADDRESS_TYPE_URL]).contains(&"mesh/elsewhere.mesh.svc.cluster.local"), "every service");
}

#[tokio::test]
async fn a_workload_that_is_no_waypoint_gets_nothing_and_a_bad_token_is_refused() {
    let (tx, _rx) = watch::channel(Arc::new(waypoint_cluster().snapshot));
    let addr = serve(&tx).await;
    // mesh/web is a service account without a waypoint Gateway of that name.
    let mut other = Client::connect(addr, "other-token").await.unwrap();
    let got = other.sync().await;
    assert!(got.values().all(|r| r.resources.is_empty()), "{got:?}");
    let err = match Client::connect(addr, "nope").await {
        Err(e) => e,
        Ok(mut c) => c.rx.message().await.unwrap_err(),
    };
    assert_eq!(err.code(), Code::Unauthenticated);
}
