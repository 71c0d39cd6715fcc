//! The lab with the control plane: `ambit-controller` in file mode on a host
//! of the fabric, ztunnels taking their state over delta xDS and their
//! certificates from the controller's CA (TLS, a bootstrap token per node).
//! Measures how fast a policy change and a new pod reach the ztunnels, and
//! checks that a client speaking only Istio's protocol is scoped to its node.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_api::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use ambit_api::ca::IstioCertificateRequest;
use ambit_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_api::discovery::DeltaDiscoveryRequest;
use ambit_api::workload::{address, Address};
use ambit_e2e::apps::EchoServer;
use ambit_e2e::check::{eventually, metric, round_trip, TIMEOUT};
use ambit_e2e::dump::has_captured_workload;
use ambit_e2e::fixture::{Cluster, APP_PORT};
use ambit_e2e::netns::NetNs;
use ambit_e2e::PodSpec;
use ambit_identity::{generate_csr, Identity};
use prost::Message;
use tonic::transport::Channel;
use ztunnel::ca_client::connect_channel;
use ztunnel::xds::{BearerToken, ProxyNode};

/// A generous bound for changes that should take well under a second: a
/// sanity check, not the figure (which is printed).
const SANITY_BOUND: Duration = Duration::from_secs(3);

#[test]
fn ztunnels_take_state_and_certificates_from_the_controller() {
    let Some(c) = Cluster::start("ctrl-mesh", |_| {}) else { return };
    let controller = c.mesh.controller().expect("controller mode");
    let [n1, n2] = c.nodes;
    let (client_ns, target) = (c.pod_ns(c.client), c.app(c.remote));
    round_trip(client_ns, target, b"via the controller").expect("pod to pod with xDS state and CA certificates");

    // The certificates come from the controller's CA, and no development CA exists.
    let dump = c.mesh.ztunnel(n1).admin_get("/config_dump").unwrap();
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let cert = v["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/default/sa/client")
        .expect("client certificate held")
        .clone();
    let controller_root = std::fs::read_to_string(controller.flags("node1").mesh_root).unwrap();
    let roots: Vec<&str> = cert["roots_pem"].as_array().unwrap().iter().filter_map(|r| r.as_str()).collect();
    assert_eq!(roots.len(), 1, "{cert}");
    assert_eq!(roots[0].trim(), controller_root.trim(), "certificate not rooted in the controller's CA");
    assert_eq!(c.mesh.ca().cert_pem().trim(), controller_root.trim(), "Mesh::ca is not the trusted root");
    assert!(!c.mesh.lab().dir().join("ca-key.pem").exists(), "a development CA was generated in controller mode");
    assert_eq!(v["state"]["workloads"].as_array().unwrap().len(), 3, "{dump}");

    // A policy written to the watched directory reaches the ztunnels: measure how fast.
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  namespace: default\n\
                spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/default/sa/client]\n";
    let start = Instant::now();
    controller.write("policy.yaml", deny).unwrap();
    assert!(
        eventually(TIMEOUT, || round_trip(client_ns, target, b"x").is_err()),
        "the DENY policy did not reach the destination ztunnel; controller log:\n{}",
        controller.log_text()
    );
    let applied = start.elapsed();
    c.remove("policy.yaml");
    assert!(eventually(TIMEOUT, || round_trip(client_ns, target, b"x").is_ok()), "removing the policy did not apply");
    println!("policy change to enforcement (controller poll 100 ms + xDS push + first denied connection): {applied:?}");
    assert!(applied < SANITY_BOUND, "policy took {applied:?}");

    let m2 = c.mesh.ztunnel(n2).metrics().unwrap();
    assert!(
        metric(&m2, "ztunnel_connection_failures_total", &[("direction", "inbound"), ("reason", "policy_denied")])
            >= 1.0,
        "{m2}"
    );
}

#[test]
fn a_new_pod_reaches_every_ztunnel_quickly() {
    let Some(mut c) = Cluster::start("ctrl-new-pod", |_| {}) else { return };
    let n2 = c.nodes[1];
    // The pod's sandbox and app exist first (the lab plays the kubelet); the clock starts at its object.
    let late = c.mesh.lab_mut().add_pod(n2, PodSpec::new("late", "default", "late")).unwrap();
    let _echo = EchoServer::start(&c.mesh.lab().pod(late).netns, SocketAddr::from(([0, 0, 0, 0], APP_PORT))).unwrap();
    let ip = c.ip(late);

    let start = Instant::now();
    // Writes the Pod object, waits until node 2's ztunnel knows it, installs capture and sends ZDS add.
    c.mesh.enroll(late).unwrap();
    let enrolled = start.elapsed();
    c.mesh.wait_for_config("the new pod", |d| has_captured_workload(d, ip)).unwrap();
    let in_every_dump = start.elapsed();
    assert!(
        eventually(TIMEOUT, || round_trip(c.pod_ns(c.client), c.app(late), b"hello newcomer").is_ok()),
        "no connection to the new pod"
    );
    let connected = start.elapsed();
    println!(
        "new pod: object to its node's ztunnel + enrolled {enrolled:?}, in both ztunnels' config {in_every_dump:?}, \
         first connection through the mesh {connected:?}"
    );
    assert!(connected < SANITY_BOUND, "a new pod took {connected:?} to be reachable");

    // It went through the mesh: node 2's ztunnel counted an mTLS inbound connection to it.
    let m2 = c.mesh.ztunnel(n2).metrics().unwrap();
    let inbound =
        [("reporter", "destination"), ("destination_workload", "late"), ("connection_security_policy", "mutual_tls")];
    assert!(metric(&m2, "istio_tcp_connections_opened_total", &inbound) >= 1.0, "{m2}");
}

/// A CreateCertificate call as Istio's ztunnel makes it: the token, `ImpersonatedIdentity`, no node anywhere.
async fn istio_create_certificate(channel: Channel, token: &str, id: &Identity) -> Result<Vec<String>, tonic::Status> {
    let (csr, _key) = generate_csr(id).expect("csr");
    let metadata = prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
        )]
        .into(),
    };
    let mut req =
        tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 3600, metadata: Some(metadata) });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header-safe"));
    IstioCertificateServiceClient::new(channel).create_certificate(req).await.map(|r| r.into_inner().cert_chain)
}

/// The IPs of the workloads in the first Address response of a stream opened with only `token` and `node`.
async fn istio_xds_workload_ips(channel: Channel, token: &str, node: ProxyNode) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let subscribe = DeltaDiscoveryRequest {
        node: Some(node.to_node()),
        type_url: ambit_api::ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    };
    tx.send(subscribe).await.expect("queue the subscription");
    let auth = BearerToken::new(Some(token)).expect("header-safe");
    let mut client = AggregatedDiscoveryServiceClient::with_interceptor(channel, auth);
    let mut stream =
        client.delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let first = tokio::time::timeout(TIMEOUT, stream.message()).await.expect("an answer in time")?.expect("a response");
    Ok(first
        .resources
        .iter()
        .filter_map(|r| Address::decode(r.resource.as_ref()?.value.as_slice()).ok())
        .filter_map(|a| match a.r#type {
            Some(address::Type::Workload(w)) => w.addresses.first().cloned(),
            _ => None,
        })
        .collect())
}

#[test]
fn a_client_speaking_only_istios_protocol_is_scoped_to_its_tokens_node() {
    let Some(c) = Cluster::start("ctrl-istio-id", |_| {}) else { return };
    let controller = c.mesh.controller().expect("controller mode");
    let node1 = c.mesh.lab().node(c.nodes[0]);
    let flags = controller.flags(&node1.name);
    let token = std::fs::read_to_string(&flags.token_file).unwrap();
    assert_eq!(token.trim_end(), token, "the lab writes its tokens without a trailing newline");
    let root = std::fs::read_to_string(&flags.mesh_root).unwrap();
    let proxy = ProxyNode {
        node_name: node1.name.clone(),
        pod_name: "ztunnel-istio".into(),
        pod_namespace: "istio-system".into(),
        instance_ip: Some(node1.ip.into()),
        cluster_id: "Kubernetes".into(),
    };
    let client_ip = c.ip(c.client).octets().to_vec();
    let netns = NetNs::borrowed(node1.netns.name());
    let address = flags.address.clone();
    let (ips, on_node, elsewhere, other_node) = netns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let channel = connect_channel(&address, &root, "ambit-controller.ambit-system.svc").await.expect("tls");
            let ips = istio_xds_workload_ips(channel.clone(), &token, proxy.clone()).await;
            // client runs on node 1, remote on node 2.
            let on_node =
                istio_create_certificate(channel.clone(), &token, &Identity::new("cluster.local", "default", "client"))
                    .await;
            let elsewhere =
                istio_create_certificate(channel.clone(), &token, &Identity::new("cluster.local", "default", "remote"))
                    .await;
            // The same token declaring node 2 in its Node.
            let other = ProxyNode { node_name: "node2".into(), ..proxy };
            let other_node = istio_xds_workload_ips(channel, &token, other).await;
            (ips, on_node, elsewhere, other_node)
        })
    });
    let ips = ips.expect("xds with only the token and an Istio Node");
    assert!(ips.contains(&client_ip), "the client pod is not in the stream's workloads: {ips:?}");
    let chain = on_node.expect("a certificate for a pod on the token's node");
    assert_eq!(chain.len(), 2, "leaf and root");
    let err = elsewhere.expect_err("a certificate for a pod on another node");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = other_node.expect_err("a Node declaring another node than the token's");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}
