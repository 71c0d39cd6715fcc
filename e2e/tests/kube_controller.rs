//! The real `ambit-controller` binary in Kubernetes mode against a real kube-apiserver, with nothing but the
//! least-privilege identity of `manifests/core/rbac.yaml`: a kubeconfig holding only a token of service account
//! `ambit-system/ambit-controller` and the API server's CA.
//!
//! It shows the root kept in a Secret (and reused after a restart) and published in a ConfigMap, enrollment by
//! namespace label in the delta xDS answer to a ztunnel authenticated by TokenReview, policy status written back, the
//! CA signing only identities on the caller's node (one TokenReview for a burst of calls with one token), waypoint
//! deployment, Gateway API status (the waypoint GatewayClass accepted, an HTTPRoute's waypoint parent entry saying
//! it is not applied, another controller's entry kept), and no `forbidden` answer from the API server in the controller's log. A second test drives the
//! Secret root store directly: racing replicas end with one root, a broken Secret is an error and is left alone. A
//! third applies Istio VirtualServices and DestinationRules and SMI TrafficSplits through Ambit's CRDs and reads the
//! conditions the binary writes on them: invalid, without a waypoint, applied at a waypoint (in part, for a
//! DestinationRule's traffic policy).
//!
//! Needs the Kubernetes binaries (`e2e/kube/build.sh`) and the controller binary (`cargo build --release --bins`, or
//! `AMBIT_CONTROLLER_BIN`); without the former the test notes and returns, or fails under `CI`.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_api::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use ambit_api::ca::IstioCertificateRequest;
use ambit_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use ambit_api::ADDRESS_TYPE_URL;
use ambit_controller::ca::root::ROOT_VALIDITY;
use ambit_controller::ca::{load_or_create, SecretRootStore};
use ambit_e2e::check::poll_for;
use ambit_e2e::kube::{skip_without_kube, KubeCluster};
use ambit_e2e::ztunnel::workspace_binary;
use ambit_identity::{generate_csr, Identity};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;
use ztunnel::xds::BearerToken;

const NS: &str = "mesh";
const SERVER_NAME: &str = "ambit-controller.ambit-system.svc";
const WAIT: Duration = Duration::from_secs(30);

/// The controller binary, running until dropped (then killed by PID). Its output goes to a log file.
struct Controller {
    child: Child,
    log: PathBuf,
    grpc: SocketAddr,
}

impl Controller {
    /// Starts the binary in Kubernetes mode with `kubeconfig` on free loopback ports, logging to `log` (appended).
    fn start(kubeconfig: &Path, log: &Path) -> anyhow::Result<Controller> {
        let bin = workspace_binary("ambit-controller", "AMBIT_CONTROLLER_BIN")?;
        let grpc = free_port()?;
        let metrics = free_port()?;
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new(bin)
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--namespace=ambit-system")
            .arg(format!("--listen={grpc}"))
            .arg(format!("--metrics-addr={metrics}"))
            .arg(format!("--serving-dns-names={SERVER_NAME}"))
            .arg("--serving-ips=127.0.0.1")
            // No file-mode or unrelated settings may leak in from the test's environment.
            .env_remove("AMBIT_CONFIG_DIR")
            .env_remove("AMBIT_BOOTSTRAP_TOKEN_FILE")
            .env_remove("AMBIT_CA_DIR")
            .env_remove("POD_NAMESPACE")
            .env("RUST_LOG", "info,ambit_controller=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let mut c = Controller { child, log: log.to_owned(), grpc };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(grpc).is_err() {
            if let Some(status) = c.child.try_wait()? {
                anyhow::bail!("the controller exited ({status}):\n{}", c.log_text());
            }
            anyhow::ensure!(Instant::now() < deadline, "the controller does not listen on {grpc}:\n{}", c.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(c)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for assertion messages.
    fn tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn stop(&mut self) {
        // Child::kill signals exactly this PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- ambit-controller log (last lines) ---\n{}", self.tail());
        }
    }
}

/// A loopback port free now (the controller binds it right after).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e has a parent").to_path_buf()
}

/// The CRDs (`manifests/crds` as a kustomization, as the README installs them), the namespace and the RBAC of the
/// manifests (not the workloads), server-side.
fn install(cluster: &KubeCluster) {
    let m = repo().join("manifests");
    cluster.kubectl(["apply", "--server-side", "-k", &m.join("crds").display().to_string()]).expect("crds");
    cluster
        .kubectl(["apply", "--server-side", "-f", &m.join("gateway-api/crds.yaml").display().to_string()])
        .expect("gateway-api/crds.yaml");
    for f in ["core/namespace.yaml", "core/rbac.yaml"] {
        let path = m.join(f);
        cluster.kubectl(["apply", "--server-side", "-f", &path.display().to_string()]).expect(f);
    }
    cluster.wait_established(&["crd", "-l", "app.kubernetes.io/part-of=ambit"]).expect("CRDs established");
}

fn pod_yaml(ns: &str, name: &str, sa: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{app: {name}}}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  automountServiceAccountToken: false\n  \
         containers:\n  - name: c\n    image: x\n"
    )
}

/// The root PEM published in the ConfigMap (empty while there is none).
fn configmap_root(cluster: &KubeCluster) -> String {
    cluster
        .kubectl([
            "-n",
            "ambit-system",
            "get",
            "configmap",
            "ambit-ca-root-cert",
            "-o",
            "jsonpath={.data.root-cert\\.pem}",
        ])
        .unwrap_or_default()
}

/// (resourceVersion, ca-cert.pem decoded) of the root Secret, checking its type and that it holds a key.
fn secret_root(cluster: &KubeCluster) -> anyhow::Result<(String, String)> {
    let get = |template: &str| {
        cluster.kubectl([
            "-n",
            "ambit-system",
            "get",
            "secret",
            "ambit-ca-root",
            "-o",
            &format!("go-template={template}"),
        ])
    };
    let meta = get("{{.metadata.resourceVersion}} {{.type}} {{len (index .data \"ca-key.pem\")}}")?;
    let parts: Vec<&str> = meta.split(' ').collect();
    anyhow::ensure!(parts.len() == 3 && parts[1] == "Opaque" && parts[2] != "0", "unexpected secret: {meta}");
    let cert = get("{{index .data \"ca-cert.pem\" | base64decode}}")?;
    Ok((parts[0].to_string(), cert))
}

/// The sum of the API server's `apiserver_request_total` for TokenReview creations.
fn token_reviews(cluster: &KubeCluster) -> u64 {
    let metrics = cluster.kubectl(["get", "--raw", "/metrics"]).expect("apiserver metrics");
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{") && l.contains("resource=\"tokenreviews\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A delta ADS stream for addresses, as a ztunnel on `node` holds it.
struct XdsWatch {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    held: BTreeSet<String>,
    /// Every name received (with a new version) since the last [`XdsWatch::take_updated`].
    updated: BTreeSet<String>,
    removed: BTreeSet<String>,
}

impl XdsWatch {
    async fn open(channel: Channel, token: &str, node: &str) -> Result<XdsWatch, tonic::Status> {
        let auth = BearerToken::new(Some(token)).expect("token is header-safe");
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(channel, auth);
        let (tx, rx) = mpsc::channel(8);
        tx.send(DeltaDiscoveryRequest {
            // Without NODE_NAME metadata the node's name is its id.
            node: Some(Node { id: node.to_string(), ..Default::default() }),
            type_url: ADDRESS_TYPE_URL.into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        })
        .await
        .expect("request channel open");
        let rx = client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        Ok(XdsWatch { tx, rx, held: BTreeSet::new(), updated: BTreeSet::new(), removed: BTreeSet::new() })
    }

    /// Reads (and ACKs) responses until `f` holds on what is held, or fails after `WAIT`.
    async fn until(&mut self, what: &str, f: impl Fn(&XdsWatch) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !f(self) {
            let resp = match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Ok(Ok(Some(r))) => r,
                Ok(other) => panic!("xds stream ended waiting for {what}: {other:?}"),
                Err(_) => panic!("timed out waiting for {what}; held: {:?}", self.held),
            };
            for r in &resp.resources {
                self.held.insert(r.name.clone());
                self.updated.insert(r.name.clone());
            }
            for n in &resp.removed_resources {
                self.held.remove(n);
                self.removed.insert(n.clone());
            }
            let ack =
                DeltaDiscoveryRequest { type_url: resp.type_url, response_nonce: resp.nonce, ..Default::default() };
            self.tx.send(ack).await.expect("request channel open");
        }
    }
}

/// Workload uid of pod `ns/name`.
fn uid(ns: &str, name: &str) -> String {
    format!("Kubernetes//Pod/{ns}/{name}")
}

async fn create_certificate(channel: Channel, token: &str, identity: &Identity) -> Result<Vec<String>, tonic::Status> {
    let (csr, _key) = generate_csr(identity).expect("csr");
    let mut client = IstioCertificateServiceClient::new(channel);
    // As Istio's ztunnel asks: the identity named in the metadata, the node only in the token.
    let metadata = prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(identity.to_string())) },
        )]
        .into(),
    };
    let mut req =
        tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 3600, metadata: Some(metadata) });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header-safe"));
    client.create_certificate(req).await.map(|r| r.into_inner().cert_chain)
}

/// Checks `chain` as a TLS server checks a client: a path to `root_pem`, client-auth usage.
fn verify_chain(chain: &[String], root_pem: &str) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
    let leaf = CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
    let intermediates: Vec<CertificateDer<'static>> =
        chain[1..chain.len() - 1].iter().map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap()).collect();
    verifier.verify_client_cert(&leaf, &intermediates, rustls_pki_types::UnixTime::now()).expect("chain verifies");
}

#[test]
fn the_controller_binary_runs_the_mesh_in_kubernetes_mode_with_least_privilege() {
    let test = "kube_controller";
    let cluster = match KubeCluster::start("kube-controller") {
        Ok(c) => c,
        Err(e) if skip_without_kube(test, &e) => return,
        Err(e) => panic!("{e:#}"),
    };
    install(&cluster);
    cluster.create_node("node-1").unwrap();
    cluster.create_node("node-2").unwrap();
    cluster.kubectl(["create", "namespace", NS]).unwrap();
    cluster.kubectl(["-n", NS, "create", "serviceaccount", "sa-a"]).unwrap();
    cluster.kubectl(["-n", NS, "create", "serviceaccount", "sa-b"]).unwrap();
    cluster.apply_retrying(&pod_yaml(NS, "a", "sa-a", "node-1"));
    cluster.apply_retrying(&pod_yaml(NS, "b", "sa-b", "node-2"));
    cluster.set_pod_running(NS, "a", "10.1.0.5").unwrap();
    cluster.set_pod_running(NS, "b", "10.1.0.6").unwrap();
    // The ztunnel of node-1, whose token proves that node.
    cluster.apply_retrying(&pod_yaml("ambit-system", "ztunnel-node-1", "ztunnel", "node-1"));
    let bound = |audience: &str| {
        cluster
            .create_token(
                "ambit-system",
                "ztunnel",
                &["--bound-object-kind=Pod", "--bound-object-name=ztunnel-node-1", &format!("--audience={audience}")],
            )
            .unwrap()
    };
    let ztunnel_token = bound("ambit-ca");
    let burst_token = bound("ambit-ca");
    let wrong_audience = bound("istio-ca");

    let kubeconfig = cluster.dir().join("controller-kubeconfig");
    cluster.write_service_account_kubeconfig("ambit-system", "ambit-controller", &kubeconfig).unwrap();
    let log = cluster.dir().join("controller.log");

    // First start: the root is generated into the Secret and published in the ConfigMap.
    let mut controller = Controller::start(&kubeconfig, &log).unwrap();
    let (rv, secret_cert) = poll_for("the root Secret", WAIT, || secret_root(&cluster).map(Some));
    let root = poll_for("the root ConfigMap", WAIT, || Ok(Some(configmap_root(&cluster)).filter(|r| !r.is_empty())));
    assert_eq!(root.trim(), secret_cert.trim(), "the ConfigMap publishes the Secret's root");
    assert!(controller.log_text().contains("generated a new mesh root"), "{}", controller.tail());

    // A restart reuses the stored root, untouched.
    controller.stop();
    let controller = Controller::start(&kubeconfig, &log).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let url = format!("https://{}", controller.grpc);
    let channel = rt.block_on(async {
        // The restarted binary's serving certificate verifies against the published root.
        ztunnel::ca_client::connect_channel(&url, &root, SERVER_NAME).await.expect("TLS to the controller")
    });
    assert_eq!(secret_root(&cluster).unwrap(), (rv, secret_cert), "the Secret was rewritten");
    assert_eq!(configmap_root(&cluster), root, "the ConfigMap changed");
    assert_eq!(controller.log_text().matches("generated a new mesh root").count(), 1, "{}", controller.tail());
    assert!(controller.log_text().contains("loaded the mesh root"), "{}", controller.tail());

    rt.block_on(async {
        // Before the label, node-1's ztunnel sees pod a (its own node) but not pod b.
        let mut xds = XdsWatch::open(channel.clone(), &ztunnel_token, "node-1").await.expect("xds stream");
        xds.until("pod a", |x| x.held.contains(&uid(NS, "a"))).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        xds.until("nothing more", |_| true).await;
        assert!(!xds.held.contains(&uid(NS, "b")), "pod b is visible before its namespace is ambient: {:?}", xds.held);

        // The label enrolls the namespace: both pods arrive in a delta (b newly, a with its new tunnel protocol).
        xds.updated.clear();
        cluster.kubectl(["label", "namespace", NS, "istio.io/dataplane-mode=ambient"]).unwrap();
        xds.until("pods a and b enrolled", |x| x.updated.contains(&uid(NS, "a")) && x.updated.contains(&uid(NS, "b")))
            .await;

        // The CA: an identity with a pod on the caller's node is signed, up to the published root.
        let sa_a = Identity::new("cluster.local", NS, "sa-a");
        let chain = create_certificate(channel.clone(), &ztunnel_token, &sa_a).await.expect("sa-a signed");
        assert_eq!(chain.last().map(|r| r.trim()), Some(root.trim()), "the chain ends at the root");
        verify_chain(&chain, &root);
        // One only on another node is not.
        let sa_b = Identity::new("cluster.local", NS, "sa-b");
        let err = create_certificate(channel.clone(), &ztunnel_token, &sa_b).await.expect_err("sa-b refused");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        // A token for another audience is not a credential.
        let err = create_certificate(channel.clone(), &wrong_audience, &sa_a).await.expect_err("audience refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("audience"), "{}", err.message());
        let err = XdsWatch::open(channel.clone(), &wrong_audience, "node-1").await.err().expect("xds refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        // A workload's own token (as a waypoint has): its own identity, wherever it runs, and no other.
        let own_token = cluster.create_token(NS, "sa-b", &["--audience=ambit-ca"]).unwrap();
        let chain = create_certificate(channel.clone(), &own_token, &sa_b).await.expect("sa-b's own identity");
        verify_chain(&chain, &root);
        let err = create_certificate(channel.clone(), &own_token, &sa_a).await.expect_err("another identity");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("only its own identity"), "{}", err.message());

        // A burst of calls with one new token costs one TokenReview.
        let before = token_reviews(&cluster);
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let (channel, token, id) = (channel.clone(), burst_token.clone(), sa_a.clone());
                tokio::spawn(async move { create_certificate(channel, &token, &id).await })
            })
            .collect();
        for c in calls {
            c.await.unwrap().expect("burst call signed");
        }
        let reviews = token_reviews(&cluster) - before;
        println!("16 concurrent certificate requests with one new token: {reviews} TokenReview(s)");
        assert_eq!(reviews, 1, "one review for a burst with one token");

        // Deleting a pod removes it.
        cluster.kubectl(["-n", NS, "delete", "pod", "b", "--grace-period=0", "--force"]).unwrap();
        xds.until("pod b removed", |x| x.removed.contains(&uid(NS, "b"))).await;
        assert!(xds.held.contains(&uid(NS, "a")));
    });

    // An invalid policy gets Accepted=False from the binary.
    cluster
        .apply(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: bad-ipblock\n  namespace: {NS}\n\
             spec:\n  rules:\n  - from:\n    - source: {{ipBlocks: [not-an-ip]}}\n"
        ))
        .unwrap();
    let c = poll_for("the policy's Accepted condition", WAIT, || {
        Ok(Some(cluster.policy_accepted(NS, "bad-ipblock").unwrap_or_default()).filter(|c| c.starts_with("False|")))
    });
    assert!(c.contains("not-an-ip"), "{c}");

    // A waypoint Gateway gets its Deployment.
    cluster
        .apply(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n  namespace: {NS}\n\
             spec:\n  gatewayClassName: ambit-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n"
        ))
        .unwrap();
    let image = poll_for("the waypoint Deployment", WAIT, || {
        let out = cluster
            .kubectl([
                "-n",
                NS,
                "get",
                "deployment",
                "waypoint",
                "-o",
                "jsonpath={.spec.template.spec.containers[0].image}",
            ])
            .ok();
        Ok(out.filter(|i| !i.is_empty()))
    });
    assert_eq!(image, "ghcr.io/ambit-mesh/waypoint:latest");

    route_and_class_status(&cluster);

    let text = controller.log_text();
    let forbidden: Vec<&str> = text.lines().filter(|l| l.to_lowercase().contains("forbidden")).collect();
    assert!(forbidden.is_empty(), "the controller was refused by RBAC:\n{}", forbidden.join("\n"));
    drop(controller);
}

/// `kind` `name` (namespace `ns`, or cluster-scoped) as JSON.
fn get_json(cluster: &KubeCluster, kind: &str, ns: Option<&str>, name: &str) -> serde_json::Value {
    let mut args = vec!["get", kind, name, "-o", "json"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    serde_json::from_str(&cluster.kubectl(args).unwrap()).unwrap()
}

/// Honest Gateway API status: the waypoint class is accepted and a foreign one left alone; an HTTPRoute gets one
/// parent entry, for its waypoint parent, saying it is not applied, and another controller's entry is kept.
fn route_and_class_status(cluster: &KubeCluster) {
    cluster
        .apply(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: ambit-waypoint}\n\
             spec: {controllerName: ambit-mesh.github.io/mesh-controller}\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: other}\n\
             spec: {controllerName: example.com/gateway-controller}\n",
        )
        .unwrap();
    let class = poll_for("the waypoint class accepted", WAIT, || {
        let c = get_json(cluster, "gatewayclass", None, "ambit-waypoint");
        Ok(c["status"]["conditions"].as_array().and_then(|cs| cs.iter().find(|c| c["type"] == "Accepted")).cloned())
    });
    assert_eq!((class["status"].as_str(), class["reason"].as_str()), (Some("True"), Some("Accepted")), "{class}");
    assert_eq!(class["observedGeneration"], 1, "{class}");

    // A route attached only to a foreign Gateway gets nothing from Ambit; its controller writes its own entry.
    let route = |parents: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: {NS}}}\n\
             spec:\n  parentRefs: [{parents}]\n  rules: [{{matches: [{{path: {{type: PathPrefix, value: /}}}}]}}]\n"
        )
    };
    cluster
        .apply(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: {NS}}}\n\
             spec: {{gatewayClassName: other, listeners: [{{name: http, port: 80, protocol: HTTP}}]}}\n---\n{}",
            route("{name: edge}")
        ))
        .unwrap();
    let theirs = serde_json::json!({
        "parentRef": {"name": "edge"},
        "controllerName": "example.com/gateway-controller",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}],
    });
    let patch = serde_json::json!({"status": {"parents": [theirs]}}).to_string();
    cluster
        .kubectl(["-n", NS, "patch", "httproute", "r", "--subresource=status", "--type=merge", "-p", &patch])
        .unwrap();

    // Attached to the waypoint too: one entry of Ambit's joins the foreign one.
    cluster.apply(&route("{name: edge}, {name: waypoint}")).unwrap();
    let parents = poll_for("the route's waypoint parent entry", WAIT, || {
        let r = get_json(cluster, "httproute", Some(NS), "r");
        let parents = r["status"]["parents"].as_array().cloned().unwrap_or_default();
        Ok(Some(parents).filter(|p| p.iter().any(|e| e["parentRef"]["name"] == "waypoint")))
    });
    assert_eq!(parents.len(), 2, "{parents:?}");
    assert!(parents.contains(&theirs), "the foreign entry was changed: {parents:?}");
    let ours = parents.iter().find(|e| e["parentRef"] == serde_json::json!({"name": "waypoint"})).unwrap();
    assert_eq!(ours["controllerName"], "ambit-mesh.github.io/mesh-controller", "{ours}");
    let accepted = ours["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Accepted").unwrap();
    assert_eq!((accepted["status"].as_str(), accepted["reason"].as_str()), (Some("False"), Some("UnsupportedValue")));
    assert!(accepted["message"].as_str().unwrap().contains("does not apply HTTP routes"), "{accepted}");
    assert_eq!(accepted["observedGeneration"], 2, "{accepted}");
    assert!(ours["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "ResolvedRefs" && c["status"] == "True"));

    // The foreign class is not Ambit's: no status from it.
    let other = get_json(cluster, "gatewayclass", None, "other");
    assert!(other["status"]["conditions"].as_array().is_none_or(|c| c.is_empty()), "{other}");
}

/// The namespace of the VirtualService, TrafficSplit and DestinationRule test: ambient, with a waypoint, a Service that
/// uses it (`shop`) and two that do not (`reviews`, `shop-v2`).
const ROUTES_NS: &str = "routes";
const ROUTES_OBJECTS: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: routes}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: routes}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: routes, labels: {istio.io/use-waypoint: waypoint}}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: shop-v2, namespace: routes}
spec: {ports: [{name: http, port: 80}]}
";

/// A VirtualService (Istio's v1alpha3, served by Ambit's CRD) for a Service without a waypoint, one with a field
/// Ambit does not apply (v1), and a TrafficSplit written as v1alpha2 (stored as v1alpha4), for the same Service.
const ROUTES_NOT_APPLIED: &str = "\
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews, namespace: routes}
spec:
  hosts: [reviews]
  http:
  - timeout: 3s
    route: [{destination: {host: reviews}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cors, namespace: routes}
spec:
  hosts: [reviews]
  http:
  - corsPolicy: {allowOrigins: [{exact: https://example.com}]}
    route: [{destination: {host: reviews}}]
---
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: reviews, namespace: routes}
spec:
  service: reviews
  backends: [{service: reviews, weight: 90}, {service: shop-v2, weight: 10}]
";

/// A VirtualService for the Service a waypoint serves.
const ROUTE_AT_WAYPOINT: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: routes}
spec:
  hosts: [shop]
  http:
  - route: [{destination: {host: shop}, weight: 90}, {destination: {host: shop-v2}, weight: 10}]
";

/// DestinationRules: for the Service a waypoint serves, with subsets, a connection pool and a TLS setting Ambit does
/// not apply (written as v1beta1, stored as v1), and for a Service without a waypoint (written as v1alpha3).
const DESTINATION_RULES: &str = "\
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: shop, namespace: routes}
spec:
  host: shop
  trafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: 100}}, tls: {mode: ISTIO_MUTUAL}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: routes}
spec:
  host: reviews.routes.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}]
";

/// The condition `type_` of `resource` (kubectl's `plural.version.group` form) `routes/name` as
/// "status|reason|message" (empty while none).
fn route_condition(cluster: &KubeCluster, resource: &str, name: &str, type_: &str) -> String {
    let path = format!(
        "jsonpath={{range .status.conditions[?(@.type==\"{type_}\")]}}{{.status}}|{{.reason}}|{{.message}}{{end}}"
    );
    cluster.kubectl(["-n", ROUTES_NS, "get", resource, name, "-o", &path]).unwrap_or_default()
}

/// Polls until the condition `type_` of `resource` `routes/name` starts with `prefix` ("status|reason|"); returns it.
fn await_condition(cluster: &KubeCluster, resource: &str, name: &str, type_: &str, prefix: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let c = route_condition(cluster, resource, name, type_);
        if c.starts_with(prefix) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {type_} {prefix}… on {resource} {ROUTES_NS}/{name}: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn virtual_services_traffic_splits_and_destination_rules_get_conditions_saying_what_ambit_made_of_them() {
    let test = "kube_controller_mesh_routes";
    let cluster = match KubeCluster::start("kube-controller-mesh-routes") {
        Ok(c) => c,
        Err(e) if skip_without_kube(test, &e) => return,
        Err(e) => panic!("{e:#}"),
    };
    install(&cluster);
    cluster.kubectl(["create", "namespace", ROUTES_NS]).unwrap();
    cluster.kubectl(["label", "namespace", ROUTES_NS, "istio.io/dataplane-mode=ambient"]).unwrap();
    cluster.apply(ROUTES_OBJECTS).unwrap();
    let kubeconfig = cluster.dir().join("controller-kubeconfig");
    cluster.write_service_account_kubeconfig("ambit-system", "ambit-controller", &kubeconfig).unwrap();
    let controller = Controller::start(&kubeconfig, &cluster.dir().join("controller.log")).unwrap();

    // The CRDs take what Istio's and SMI's take, and refuse what they refuse (a duration Istio's CEL rule rejects).
    cluster.apply(ROUTES_NOT_APPLIED).unwrap();
    let bad_duration =
        ROUTE_AT_WAYPOINT.replace("name: shop,", "name: slow,").replace("- route:", "- timeout: 3 seconds\n    route:");
    let err = cluster.apply(&bad_duration).expect_err("a bad duration is refused by the CRD");
    assert!(format!("{err:#}").contains("must be a valid duration"), "{err:#}");

    // A field Ambit does not apply: invalid, named.
    let vs = "virtualservices.v1.networking.istio.io";
    let c = await_condition(&cluster, vs, "cors", "Accepted", "False|Invalid|");
    assert!(c.contains("corsPolicy"), "{c}");
    assert!(route_condition(&cluster, vs, "cors", "WaypointAccepted").starts_with("False|Invalid|"));

    // Valid, but no waypoint serves its Service: accepted, and it says it has no effect.
    assert_eq!(await_condition(&cluster, vs, "reviews", "Accepted", "True|"), "True|Accepted|");
    let c = await_condition(&cluster, vs, "reviews", "WaypointAccepted", "False|NotApplied|");
    assert!(c.contains("reviews"), "{c}");

    // The TrafficSplit written as v1alpha2 is read (and stored) as v1alpha4; its conditions show at either version.
    let ts = "trafficsplits.v1alpha2.split.smi-spec.io";
    assert_eq!(await_condition(&cluster, ts, "reviews", "Accepted", "True|"), "True|Accepted|");
    let c = await_condition(&cluster, ts, "reviews", "WaypointAccepted", "False|NotApplied|");
    assert!(c.contains("reviews"), "{c}");
    let stored = cluster
        .kubectl(["-n", ROUTES_NS, "get", "trafficsplits.v1alpha4.split.smi-spec.io", "reviews", "-o", "json"])
        .unwrap();
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["spec"]["backends"][1], serde_json::json!({"service": "shop-v2", "weight": 10}), "{stored}");

    // At the Service a waypoint serves: applied there.
    cluster.apply(ROUTE_AT_WAYPOINT).unwrap();
    assert_eq!(await_condition(&cluster, vs, "shop", "Accepted", "True|"), "True|Accepted|");
    let c = await_condition(&cluster, vs, "shop", "WaypointAccepted", "True|");
    assert_eq!(c, "True|Accepted|applied at the waypoint");

    // DestinationRules, through Istio's schema: a duration its CEL rule rejects is refused.
    let shop_rule = DESTINATION_RULES.split("---\n").next().unwrap();
    let bad_duration = shop_rule
        .replace("name: shop,", "name: slow,")
        .replace("{http: {http1MaxPendingRequests: 100}}", "{tcp: {connectTimeout: 3 seconds}}");
    assert_ne!(bad_duration, shop_rule);
    let err = cluster.apply(&bad_duration).expect_err("a bad duration is refused by the CRD");
    assert!(format!("{err:#}").contains("must be a valid duration"), "{err:#}");
    cluster.apply(DESTINATION_RULES).unwrap();

    // At the Service a waypoint serves: accepted; its subsets and pool are applied, its `tls` not, and it says so.
    let dr = "destinationrules.v1.networking.istio.io";
    assert_eq!(await_condition(&cluster, dr, "shop", "Accepted", "True|"), "True|Accepted|");
    let c = await_condition(&cluster, dr, "shop", "WaypointAccepted", "True|UnsupportedValue|");
    assert!(c.contains("trafficPolicy.tls") && !c.contains("connectionPool"), "{c}");

    // For a Service without a waypoint (written as v1alpha3, its conditions show at either version): no effect.
    let dr_v1alpha3 = "destinationrules.v1alpha3.networking.istio.io";
    assert_eq!(await_condition(&cluster, dr_v1alpha3, "reviews", "Accepted", "True|"), "True|Accepted|");
    let c = await_condition(&cluster, dr, "reviews", "WaypointAccepted", "False|NotApplied|");
    assert!(c.contains("reviews"), "{c}");

    // The VirtualService now splits between the subsets: still applied at the waypoint, at its new generation.
    let by_subset = ROUTE_AT_WAYPOINT.replace(
        "[{destination: {host: shop}, weight: 90}, {destination: {host: shop-v2}, weight: 10}]",
        "[{destination: {host: shop, subset: v1}, weight: 90}, {destination: {host: shop, subset: v2}, weight: 10}]",
    );
    assert_ne!(by_subset, ROUTE_AT_WAYPOINT);
    cluster.apply(&by_subset).unwrap();
    let path = "jsonpath={.status.conditions[?(@.type==\"WaypointAccepted\")].observedGeneration}";
    poll_for("the VirtualService's conditions at generation 2", WAIT, || {
        let generation = cluster.kubectl(["-n", ROUTES_NS, "get", vs, "shop", "-o", path])?;
        Ok((generation == "2").then_some(()))
    });
    assert_eq!(route_condition(&cluster, vs, "shop", "WaypointAccepted"), "True|Accepted|applied at the waypoint");
    assert_eq!(route_condition(&cluster, vs, "shop", "Accepted"), "True|Accepted|");

    let text = controller.log_text();
    let forbidden: Vec<&str> = text.lines().filter(|l| l.to_lowercase().contains("forbidden")).collect();
    assert!(forbidden.is_empty(), "the controller was refused by RBAC:\n{}", forbidden.join("\n"));
}

/// Runs `load_or_create` on a Secret store on a blocking thread, as the binary does.
async fn load_root(
    client: kube::Client,
    secret: &str,
) -> Result<ambit_identity::CertificateAuthority, ambit_controller::ca::CaError> {
    let store = SecretRootStore::new(client, "ambit-system").expect("inside a runtime").with_name(secret);
    tokio::task::spawn_blocking(move || load_or_create(&store, "cluster.local", ROOT_VALIDITY)).await.unwrap()
}

#[test]
fn the_secret_root_store_keeps_one_root_across_racing_writers_and_never_replaces_a_broken_one() {
    let test = "secret_root_store";
    let cluster = match KubeCluster::start("secret-root-store") {
        Ok(c) => c,
        Err(e) if skip_without_kube(test, &e) => return,
        Err(e) => panic!("{e:#}"),
    };
    cluster.kubectl(["create", "namespace", "ambit-system"]).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let client = cluster.client().await.unwrap();
        // Eight replicas start at once: one creates the Secret, the others lose the race and load its root.
        let starts: Vec<_> = (0..8).map(|_| tokio::spawn(load_root(client.clone(), "raced"))).collect();
        let mut roots = BTreeSet::new();
        for s in starts {
            roots.insert(s.await.unwrap().expect("root loaded or created").cert_pem());
        }
        assert_eq!(roots.len(), 1, "replicas ended with different roots");
        let stored = cluster
            .kubectl([
                "-n",
                "ambit-system",
                "get",
                "secret",
                "raced",
                "-o",
                "go-template={{index .data \"ca-cert.pem\" | base64decode}}",
            ])
            .unwrap();
        assert_eq!(roots.first().unwrap(), &stored);

        // A Secret missing its key, or holding garbage, is an error naming it, and stays as it was.
        cluster
            .kubectl(["-n", "ambit-system", "create", "secret", "generic", "half", "--from-literal=ca-cert.pem=x"])
            .unwrap();
        let err = load_root(client.clone(), "half").await.expect_err("half a root");
        assert!(matches!(err, ambit_controller::ca::CaError::Incomplete { .. }), "{err}");
        assert!(err.to_string().contains("ambit-system/half") && err.to_string().contains("ca-key.pem"), "{err}");
        cluster
            .kubectl([
                "-n",
                "ambit-system",
                "create",
                "secret",
                "generic",
                "garbage",
                "--from-literal=ca-cert.pem=garbage",
                "--from-literal=ca-key.pem=garbage",
            ])
            .unwrap();
        let err = load_root(client.clone(), "garbage").await.expect_err("a corrupt root");
        assert!(matches!(err, ambit_controller::ca::CaError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("secret ambit-system/garbage"), "{err}");
        for (name, keys) in [("half", "ca-cert.pem"), ("garbage", "ca-cert.pem ca-key.pem")] {
            let held = cluster
                .kubectl([
                    "-n",
                    "ambit-system",
                    "get",
                    "secret",
                    name,
                    "-o",
                    "go-template={{range $k, $v := .data}}{{$k}} {{end}}",
                ])
                .unwrap();
            assert_eq!(held.trim(), keys, "{name} was changed");
        }
        let value = cluster
            .kubectl([
                "-n",
                "ambit-system",
                "get",
                "secret",
                "garbage",
                "-o",
                "go-template={{index .data \"ca-cert.pem\" | base64decode}}",
            ])
            .unwrap();
        assert_eq!(value, "garbage");
    });
}
