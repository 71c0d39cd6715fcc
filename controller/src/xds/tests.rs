//! The xDS server over real gRPC on 127.0.0.1, against a raw tonic client
//! (to assert the exact responses) and ztunnel's real xDS client.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use ambit_api::security::Authorization;
use ambit_api::workload::{address, Address, Workload};
use ambit_api::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::Streaming;

use super::*;
use crate::ca::{AsyncCallerAuthenticator, BootstrapTokenAuthenticator, NodeTokenAuthenticator};
use crate::model::{Snapshot, SnapshotTx};

const WAIT: Duration = Duration::from_secs(5);
/// The bootstrap token every test server requires.
const TOKEN: &str = "xds-test-token";
/// The node every test client authenticates as (and declares).
const NODE: &str = "node-a";

/// Credentials of a ztunnel on [`NODE`].
fn bearer() -> ztunnel::xds::BearerToken {
    ztunnel::xds::BearerToken::new(Some(TOKEN)).unwrap().with_node(NODE).unwrap()
}

fn workload(uid: &str, ip: [u8; 4], name_pad: usize) -> Address {
    Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.into(),
            name: format!("{uid}{}", "x".repeat(name_pad)),
            namespace: "default".into(),
            addresses: vec![ip.to_vec()],
            // Captured, so that every node sees it (see `visible_to_node`).
            tunnel_protocol: ambit_api::workload::TunnelProtocol::Hbone.into(),
            ..Default::default()
        })),
    }
}

fn policy(name: &str) -> Authorization {
    Authorization { name: name.into(), namespace: "default".into(), ..Default::default() }
}

fn snapshot(version: u64, workloads: &[(&str, u8)], policies: &[&str]) -> Snapshot {
    Snapshot {
        version,
        addresses: workloads.iter().map(|(uid, last)| (uid.to_string(), workload(uid, [10, 0, 0, *last], 0))).collect(),
        authorizations: policies.iter().map(|p| (format!("default/{p}"), policy(p))).collect(),
        identities_by_node: BTreeMap::new(),
        ..Default::default()
    }
}

/// An xDS server on its own runtime, so that dropping it ends every
/// connection at once, as a controller exit does.
struct TestServer {
    addr: SocketAddr,
    tx: SnapshotTx,
    metrics: Arc<XdsMetrics>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_on(addr: SocketAddr, tx: SnapshotTx, metrics: Arc<XdsMetrics>) -> TestServer {
    serve_with(addr, tx, metrics, Arc::new(BootstrapTokenAuthenticator::new(TOKEN).unwrap()))
}

fn serve_with(
    addr: SocketAddr,
    tx: SnapshotTx,
    metrics: Arc<XdsMetrics>,
    auth: Arc<dyn AsyncCallerAuthenticator>,
) -> TestServer {
    let svc = XdsServer::new(tx.subscribe(), metrics.clone(), auth).into_service();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            tokio::spawn(Server::builder().add_service(svc).serve_with_incoming(TcpIncoming::from(listener)));
        });
        // Until the TestServer drops; then the runtime and every connection go.
        let _ = stopped.recv();
        drop(rt);
    });
    let addr = addr_rx.recv().unwrap();
    TestServer { addr, tx, metrics, stop: Some(stop), thread: Some(thread) }
}

fn start(initial: Snapshot) -> TestServer {
    let (tx, _) = watch::channel(Arc::new(initial));
    let metrics = XdsMetrics::new(&mut Registry::default());
    serve_on("127.0.0.1:0".parse().unwrap(), tx, metrics)
}

fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy()
}

/// A hand-driven delta ADS stream.
struct RawClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(channel(addr), bearer());
        let rx = client.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
        RawClient { tx, rx }
    }

    async fn subscribe(&self, type_url: &str, initial: HashMap<String, String>) {
        let req = DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions: initial,
            ..Default::default()
        };
        self.tx.send(req).await.unwrap();
    }

    /// The next response, ACKed.
    async fn next(&mut self) -> DeltaDiscoveryResponse {
        let resp = tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response in time")
            .unwrap()
            .expect("stream ended");
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        self.tx.send(ack).await.unwrap();
        resp
    }

    /// Subscribes to both types and returns (addresses, authorizations).
    async fn sync(&mut self) -> (DeltaDiscoveryResponse, DeltaDiscoveryResponse) {
        self.subscribe(ADDRESS_TYPE_URL, HashMap::new()).await;
        self.subscribe(AUTHORIZATION_TYPE_URL, HashMap::new()).await;
        let a = self.next().await;
        let b = self.next().await;
        assert_eq!(a.type_url, ADDRESS_TYPE_URL);
        assert_eq!(b.type_url, AUTHORIZATION_TYPE_URL);
        (a, b)
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

fn versions(r: &DeltaDiscoveryResponse) -> HashMap<String, String> {
    r.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect()
}

/// Waits until `f` holds, polling.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn initial_sync_delivers_every_resource_of_both_types() {
    let srv = start(snapshot(1, &[("w1", 1), ("w2", 2)], &["p1"]));
    let mut c = RawClient::connect(srv.addr).await;
    let (a, p) = c.sync().await;
    assert_eq!(names(&a), ["w1", "w2"]);
    assert_eq!(names(&p), ["default/p1"]);
    assert_eq!(a.system_version_info, "1");
    assert_ne!(a.nonce, p.nonce);
    let any = a.resources[0].resource.as_ref().unwrap();
    assert_eq!(any.type_url, ADDRESS_TYPE_URL);
    assert_eq!(<Address as prost::Message>::decode(any.value.as_slice()).unwrap(), workload("w1", [10, 0, 0, 1], 0));
    assert_eq!(srv.metrics.connected_clients(), 1);
    eventually("two acks", || {
        srv.metrics.acks(ResourceType::Address) == 1 && srv.metrics.acks(ResourceType::Authorization) == 1
    })
    .await;
}

#[tokio::test]
async fn a_change_pushes_only_the_changed_and_new_resources() {
    let srv = start(snapshot(1, &[("w1", 1), ("w2", 2)], &["p1"]));
    let mut c = RawClient::connect(srv.addr).await;
    let (first, _) = c.sync().await;
    let mut s = snapshot(2, &[("w1", 1), ("w2", 2), ("w3", 3)], &["p1"]);
    s.addresses.insert("w2".into(), workload("w2", [10, 0, 0, 22], 0));
    srv.tx.send_replace(Arc::new(s));
    let d = c.next().await;
    assert_eq!(d.type_url, ADDRESS_TYPE_URL);
    assert_eq!(names(&d), ["w2", "w3"]);
    assert!(d.removed_resources.is_empty());
    assert_ne!(versions(&d)["w2"], versions(&first)["w2"]);
    // Policies did not change: the next response is the policy change below,
    // not a resend of anything.
    srv.tx.send_replace(Arc::new(snapshot(3, &[("w1", 1), ("w2", 22), ("w3", 3)], &["p1", "p2"])));
    let d = c.next().await;
    assert_eq!(d.type_url, AUTHORIZATION_TYPE_URL, "unchanged addresses are not resent");
    assert_eq!(names(&d), ["default/p2"]);
}

#[tokio::test]
async fn a_removal_sends_removed_resources() {
    let srv = start(snapshot(1, &[("w1", 1), ("w2", 2)], &["p1"]));
    let mut c = RawClient::connect(srv.addr).await;
    c.sync().await;
    srv.tx.send_replace(Arc::new(snapshot(2, &[("w1", 1)], &["p1"])));
    let d = c.next().await;
    assert_eq!(d.type_url, ADDRESS_TYPE_URL);
    assert!(d.resources.is_empty());
    assert_eq!(d.removed_resources, ["w2"]);
}

#[tokio::test]
async fn reconnect_with_initial_versions_gets_only_what_changed_meanwhile() {
    let srv = start(snapshot(1, &[("w1", 1), ("w2", 2), ("w3", 3)], &["p1"]));
    let mut c = RawClient::connect(srv.addr).await;
    let (a, p) = c.sync().await;
    drop(c);
    eventually("disconnect", || srv.metrics.connected_clients() == 0).await;
    // Meanwhile: w1 changes, w2 goes, w4 comes; policies unchanged.
    let mut s = snapshot(2, &[("w1", 1), ("w3", 3), ("w4", 4)], &["p1"]);
    s.addresses.insert("w1".into(), workload("w1", [10, 0, 0, 11], 0));
    srv.tx.send_replace(Arc::new(s));
    let mut c = RawClient::connect(srv.addr).await;
    c.subscribe(ADDRESS_TYPE_URL, versions(&a)).await;
    c.subscribe(AUTHORIZATION_TYPE_URL, versions(&p)).await;
    let a2 = c.next().await;
    assert_eq!(names(&a2), ["w1", "w4"]);
    assert_eq!(a2.removed_resources, ["w2"]);
    let p2 = c.next().await;
    assert!(p2.resources.is_empty() && p2.removed_resources.is_empty(), "{p2:?}");
}

#[tokio::test]
async fn versions_survive_a_server_restart() {
    let s = snapshot(7, &[("w1", 1)], &["p1"]);
    let srv = start(s.clone());
    let mut c = RawClient::connect(srv.addr).await;
    let (a, _) = c.sync().await;
    drop((c, srv));
    // A second server: a fresh process as far as versions go.
    let srv = start(s);
    let mut c = RawClient::connect(srv.addr).await;
    c.subscribe(ADDRESS_TYPE_URL, versions(&a)).await;
    let a2 = c.next().await;
    assert!(a2.resources.is_empty(), "content hash versions are stable: {a2:?}");
}

fn bad_workload(uid: &str) -> Address {
    let mut a = workload(uid, [10, 0, 0, 9], 0);
    if let Some(address::Type::Workload(w)) = &mut a.r#type {
        w.addresses = vec![vec![1, 2, 3, 4, 5]];
    }
    a
}

/// ztunnel's client against the server: sync, NACK, recovery.
#[tokio::test]
async fn ztunnel_client_syncs_nacks_bad_config_and_keeps_the_last_good_state() {
    let srv = start(snapshot(1, &[("w1", 1), ("w2", 2)], &["p1"]));
    let cfg = ztunnel::xds::XdsConfig::new(ztunnel::xds::ProxyNode::new(NODE), "cluster.local");
    let client = ztunnel::xds::XdsClient::new(channel(srv.addr), bearer(), cfg);
    let mut synced = client.synced();
    let (state_tx, mut states) = mpsc::unbounded_channel();
    let task = tokio::spawn(client.run(move |st| {
        let _ = state_tx.send(st);
    }));
    tokio::time::timeout(WAIT, synced.wait_for(|s| *s)).await.unwrap().unwrap();
    let st = states.recv().await.unwrap();
    assert_eq!(st.workloads().count(), 2);
    assert_eq!(st.policies().count(), 1);
    assert!(states.try_recv().is_err(), "one state for the initial sync, not one per type");

    let mut bad = snapshot(2, &[("w1", 1), ("w2", 2)], &["p1"]);
    bad.addresses.insert("w3".into(), bad_workload("w3"));
    srv.tx.send_replace(Arc::new(bad));
    eventually("a nack", || srv.metrics.nacks(ResourceType::Address) == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(states.try_recv().is_err(), "a rejected update produces no state");

    srv.tx.send_replace(Arc::new(snapshot(3, &[("w1", 1), ("w3", 3)], &["p1"])));
    let st = tokio::time::timeout(WAIT, states.recv()).await.unwrap().unwrap();
    let mut uids: Vec<_> = st.workloads().map(|w| w.uid.clone()).collect();
    uids.sort();
    assert_eq!(uids, ["w1", "w3"]);
    assert_eq!(srv.metrics.nacks(ResourceType::Address), 1, "the bad content is not resent");
    task.abort();
}

/// The controller goes away and comes back on the same port: the client keeps
/// its state, reconnects and receives only the difference.
#[tokio::test]
async fn ztunnel_client_reconnects_and_catches_up() {
    let srv = start(snapshot(1, &[("w1", 1), ("w2", 2)], &["p1"]));
    let addr = srv.addr;
    let mut cfg = ztunnel::xds::XdsConfig::new(ztunnel::xds::ProxyNode::new(NODE), "cluster.local");
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(200);
    let client = ztunnel::xds::XdsClient::new(channel(addr), bearer(), cfg);
    let mut synced = client.synced();
    let (state_tx, mut states) = mpsc::unbounded_channel();
    let task = tokio::spawn(client.run(move |st| {
        let _ = state_tx.send(st);
    }));
    tokio::time::timeout(WAIT, synced.wait_for(|s| *s)).await.unwrap().unwrap();
    assert_eq!(states.recv().await.unwrap().workloads().count(), 2);
    let (tx, metrics) = (srv.tx.clone(), srv.metrics.clone());
    drop(srv);

    tx.send_replace(Arc::new(snapshot(2, &[("w1", 1), ("w2", 2), ("w3", 3)], &["p1"])));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(*synced.borrow(), "still serving the last state while the controller is away");
    let pushes_before = metrics.pushes(ResourceType::Address);
    let srv = serve_on(addr, tx, metrics);
    let st = tokio::time::timeout(WAIT, states.recv()).await.unwrap().unwrap();
    assert_eq!(st.workloads().count(), 3);
    assert_eq!(st.policies().count(), 1, "unchanged policies kept from before the reconnect");
    assert_eq!(srv.metrics.pushes(ResourceType::Address), pushes_before + 1);
    task.abort();
}

/// Large snapshots: a client that never reads fills its windows and buffer;
/// the other must still get every latest snapshot promptly.
#[tokio::test]
async fn a_stalled_client_does_not_delay_another() {
    fn big(version: u64) -> Snapshot {
        let mut s = Snapshot { version, ..Default::default() };
        for i in 0..200u32 {
            let uid = format!("w{i}-v{version}");
            let ip = [10, 1, (i / 250) as u8, (i % 250) as u8 + 1];
            s.addresses.insert(uid.clone(), workload(&uid, ip, 4000));
        }
        s
    }
    let srv = start(big(0));
    let stalled = RawClient::connect(srv.addr).await;
    stalled.subscribe(ADDRESS_TYPE_URL, HashMap::new()).await;
    let mut live = RawClient::connect(srv.addr).await;
    live.subscribe(ADDRESS_TYPE_URL, HashMap::new()).await;
    assert_eq!(live.next().await.resources.len(), 200);
    // ~800 KB per snapshot: the stalled stream's HTTP/2 windows and buffer
    // fill within the first few.
    for v in 1..=20u64 {
        let started = Instant::now();
        srv.tx.send_replace(Arc::new(big(v)));
        let d = live.next().await;
        assert_eq!(d.system_version_info, v.to_string());
        assert_eq!(d.resources.len(), 200);
        assert_eq!(d.removed_resources.len(), 200);
        assert!(started.elapsed() < Duration::from_secs(2), "live client delayed: {:?}", started.elapsed());
    }
    assert_eq!(srv.metrics.connected_clients(), 2, "the stalled client is still connected");
    let pushes = srv.metrics.pushes(ResourceType::Address);
    println!("stalled test: {pushes} address responses sent to both clients for 21 snapshots");
    assert!(pushes < 2 * 21, "the stalled client really stalled: {pushes}");
    drop(stalled);
}

/// Prints the push latency of a one-resource change (not an assertion).
#[tokio::test]
async fn push_latency_of_a_one_resource_change_is_printed() {
    let workloads: Vec<(String, u8)> = (1..=200u8).map(|i| (format!("w{i}"), i)).collect();
    let refs: Vec<(&str, u8)> = workloads.iter().map(|(n, i)| (n.as_str(), *i)).collect();
    let srv = start(snapshot(1, &refs, &["p1"]));
    let mut c = RawClient::connect(srv.addr).await;
    c.sync().await;
    let mut samples = Vec::new();
    for v in 2..22u64 {
        let mut s = snapshot(v, &refs, &["p1"]);
        s.addresses.insert("w1".into(), workload("w1", [10, 0, 0, 1], v as usize));
        let t = Instant::now();
        srv.tx.send_replace(Arc::new(s));
        let d = c.next().await;
        samples.push(t.elapsed());
        assert_eq!(names(&d), ["w1"]);
    }
    samples.sort();
    println!(
        "xds push latency, one changed resource of 200, publish -> client receive: median {:?}, max {:?}",
        samples[samples.len() / 2],
        samples[samples.len() - 1]
    );
}

/// Opens a stream with `auth`, declaring `node`, and returns the first answer.
async fn first_answer(
    addr: SocketAddr,
    auth: ztunnel::xds::BearerToken,
    node: &str,
) -> Result<DeltaDiscoveryResponse, tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    let mut md = prost_types::Struct::default();
    md.fields.insert(
        "NODE_NAME".into(),
        prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(node.into())) },
    );
    let req = DeltaDiscoveryRequest {
        node: Some(ambit_api::discovery::Node {
            id: format!("ztunnel~{node}"),
            metadata: Some(md),
            ..Default::default()
        }),
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    };
    tx.send(req).await.unwrap();
    let mut client = AggregatedDiscoveryServiceClient::with_interceptor(channel(addr), auth);
    let mut stream = client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    let first = tokio::time::timeout(WAIT, stream.message()).await.expect("no answer in time");
    drop(tx);
    first?.ok_or_else(|| tonic::Status::unknown("stream ended without an answer"))
}

#[tokio::test]
async fn a_stream_without_the_token_is_unauthenticated_and_gets_nothing() {
    let srv = start(snapshot(1, &[("w1", 1)], &["p1"]));
    for (auth, what) in [
        (ztunnel::xds::BearerToken::default(), "no token"),
        (ztunnel::xds::BearerToken::new(Some("wrong")).unwrap().with_node(NODE).unwrap(), "a wrong token"),
    ] {
        let status = first_answer(srv.addr, auth, NODE).await.expect_err(what);
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{what}: {status:?}");
    }
    assert_eq!(srv.metrics.pushes(ResourceType::Address), 0);
    let ok = first_answer(srv.addr, bearer(), NODE).await.unwrap();
    assert_eq!(names(&ok), ["w1"]);
}

#[tokio::test]
async fn a_stream_declaring_another_node_than_its_callers_is_refused() {
    let srv = start(snapshot(1, &[("w1", 1)], &["p1"]));
    let status = first_answer(srv.addr, bearer(), "node-b").await.expect_err("another node");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("node-b") && status.message().contains(NODE), "{}", status.message());
    assert_eq!(srv.metrics.pushes(ResourceType::Address), 0);
}

#[tokio::test]
async fn with_the_shared_token_and_no_node_header_the_stream_serves_the_node_it_declares() {
    let srv = start(snapshot(1, &[("w1", 1)], &["p1"]));
    let auth = ztunnel::xds::BearerToken::new(Some(TOKEN)).unwrap();
    let ok = first_answer(srv.addr, auth, NODE).await.unwrap();
    assert_eq!(names(&ok), ["w1"]);
}

/// A workload only node `node` is sent: on it, not captured, backing no service.
fn node_local(uid: &str, node: &str) -> Address {
    let mut a = workload(uid, [10, 0, 0, 50], 0);
    if let Some(address::Type::Workload(w)) = &mut a.r#type {
        w.node = node.into();
        w.tunnel_protocol = ambit_api::workload::TunnelProtocol::None.into();
    }
    a
}

/// A server admitting per-node tokens `tok-a` (node-a) and `tok-b` (node-b),
/// with one workload seen only by node-a and one only by node-b.
fn start_per_node() -> TestServer {
    let mut s = snapshot(1, &[], &["p1"]);
    s.addresses.insert("only-a".into(), node_local("only-a", "node-a"));
    s.addresses.insert("only-b".into(), node_local("only-b", "node-b"));
    let (tx, _) = watch::channel(Arc::new(s));
    let auth = NodeTokenAuthenticator::parse("tok-a node-a\ntok-b node-b\n", std::path::Path::new("t")).unwrap();
    serve_with("127.0.0.1:0".parse().unwrap(), tx, XdsMetrics::new(&mut Registry::default()), Arc::new(auth))
}

/// Exactly what Istio's ztunnel sends: a token and its `Node`, no Ambit header.
fn istio_token(token: &str) -> ztunnel::xds::BearerToken {
    ztunnel::xds::BearerToken::new(Some(token)).unwrap()
}

#[tokio::test]
async fn a_per_node_token_alone_serves_its_node_whatever_node_metadata_is_missing() {
    let srv = start_per_node();
    // NODE_NAME agrees with the token.
    let ok = first_answer(srv.addr, istio_token("tok-a"), "node-a").await.unwrap();
    assert_eq!(names(&ok), ["only-a"]);
    // NODE_NAME empty (Istio's ztunnel without the variable): the token's node, not the id.
    let ok = first_answer(srv.addr, istio_token("tok-b"), "").await.unwrap();
    assert_eq!(names(&ok), ["only-b"]);
}

#[tokio::test]
async fn a_per_node_token_cannot_be_used_for_another_node() {
    let srv = start_per_node();
    // A Node declaring another node.
    let status = first_answer(srv.addr, istio_token("tok-a"), "node-b").await.expect_err("another node");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("node-b") && status.message().contains("node-a"), "{}", status.message());
    // An x-ambit-node header naming another node.
    let header = istio_token("tok-a").with_node("node-b").unwrap();
    let status = first_answer(srv.addr, header, "node-b").await.expect_err("header for another node");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // A token nobody was given.
    let status = first_answer(srv.addr, istio_token("tok-c"), "node-a").await.expect_err("unknown token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(srv.metrics.pushes(ResourceType::Address), 0);
}
