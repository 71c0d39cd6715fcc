//! The CA service over real gRPC with TLS on 127.0.0.1, called by a raw
//! client (for hand-made CSRs) and by ztunnel's `CaClient`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_api::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use ambit_identity::{generate_csr, WorkloadCertificate};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tonic::transport::{Channel, Server, ServerTlsConfig};
use ztunnel::ca_client::{connect_channel, CaClient};
use ztunnel::certs::{CertError, CertificateProvider};

use super::*;
use crate::ca::auth::{AuthFuture, BootstrapTokenAuthenticator, Caller};
use crate::ca::node_tokens::NodeTokenAuthenticator;
use crate::ca::serving::serving_identity;
use crate::model::Snapshot;

const TD: &str = "cluster.local";
const TOKEN: &str = "bootstrap-token-for-tests";
/// node-a's token of [`Harness::per_node`].
const TOKEN_A: &str = "tok-a";
const CLIENT_URI: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_NAME: &str = "ambit-controller.ambit-system.svc";
const HOUR: Duration = Duration::from_secs(3600);

fn client_id() -> Identity {
    Identity::new(TD, "default", "client")
}

/// `node-a` runs `default/client`.
fn snapshot_with(node: &str, ns: &str, sa: &str) -> Arc<Snapshot> {
    let mut by_node = BTreeMap::new();
    by_node.insert(node.to_owned(), BTreeSet::from([(ns.to_owned(), sa.to_owned())]));
    Arc::new(Snapshot { version: 1, identities_by_node: by_node, ..Default::default() })
}

/// A CA service served over TLS on 127.0.0.1:0; stops on drop.
struct Harness {
    addr: SocketAddr,
    ca: Arc<CertificateAuthority>,
    registry: Registry,
    snapshots: tokio::sync::watch::Sender<Arc<Snapshot>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Harness {
    async fn start(max_ttl: Duration) -> Harness {
        Self::start_with(max_ttl, Arc::new(BootstrapTokenAuthenticator::new(TOKEN).unwrap())).await
    }

    /// With per-node tokens `tok-a` (node-a) and `tok-b` (node-b).
    async fn per_node() -> Harness {
        let auth = NodeTokenAuthenticator::parse("tok-a node-a\ntok-b node-b\n", std::path::Path::new("t")).unwrap();
        Self::start_with(DEFAULT_MAX_TTL, Arc::new(auth)).await
    }

    async fn start_with(max_ttl: Duration, authenticator: Arc<dyn AsyncCallerAuthenticator>) -> Harness {
        let ca = Arc::new(CertificateAuthority::generate_root(TD, 24 * HOUR).unwrap());
        let (snapshots, rx) = tokio::sync::watch::channel(snapshot_with("node-a", "default", "client"));
        let mut registry = Registry::default();
        let service =
            CaService::new(ca.clone(), TD, authenticator, rx, &mut registry).with_max_ttl(max_ttl).into_server();
        let (chain, key) = serving_identity(&ca, &[SERVER_NAME.to_string()], &["127.0.0.1".parse().unwrap()]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(s, _)| s);
            Some((conn, l))
        });
        let router = Server::builder()
            .tls_config(ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(chain, key)))
            .unwrap()
            .add_service(service);
        let server = tokio::spawn(async move { router.serve_with_incoming(incoming).await.unwrap() });
        Harness { addr, ca, registry, snapshots, server }
    }

    async fn channel(&self) -> Channel {
        connect_channel(&format!("https://{}", self.addr), &self.ca.roots_pem(), SERVER_NAME).await.unwrap()
    }

    /// Sends `csr` with `token` for `node`, asking for `validity`.
    async fn create(&self, token: &str, node: &str, csr: String, validity: Duration) -> Result<Vec<String>, Status> {
        let mut client = IstioCertificateServiceClient::new(self.channel().await);
        let mut req =
            Request::new(IstioCertificateRequest { csr, validity_duration: validity.as_secs() as i64, metadata: None });
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        req.metadata_mut().insert("x-ambit-node", node.parse().unwrap());
        client.create_certificate(req).await.map(|r| r.into_inner().cert_chain)
    }

    /// Sends `csr` as Istio's ztunnel does: the token, no node header, and
    /// `ImpersonatedIdentity` (when given) in the request's metadata struct.
    async fn create_istio(&self, token: &str, csr: String, impersonated: Option<&str>) -> Result<Vec<String>, Status> {
        let mut client = IstioCertificateServiceClient::new(self.channel().await);
        let metadata = impersonated.map(|id| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY_KEY.to_owned(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_owned())) },
            )]
            .into(),
        });
        let mut req = Request::new(IstioCertificateRequest { csr, validity_duration: 3600, metadata });
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        client.create_certificate(req).await.map(|r| r.into_inner().cert_chain)
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }
}

fn csr_with_sans(sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// Checks `chain` as a TLS server would check a client: path to `root_pem`, client-auth usage.
fn verify_as_client_certificate(chain: &[String], root_pem: &str) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
    let leaf = CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
    verifier.verify_client_cert(&leaf, &[], rustls_pki_types::UnixTime::now()).unwrap();
}

#[tokio::test]
async fn a_node_with_the_right_token_gets_a_verifying_chain_for_an_identity_on_it() {
    let h = Harness::start(DEFAULT_MAX_TTL).await;
    let (csr, key) = generate_csr(&client_id()).unwrap();
    let chain = h.create(TOKEN, "node-a", csr, HOUR).await.unwrap();
    assert_eq!(chain.len(), 2, "leaf and root");
    assert_eq!(chain[1], h.ca.roots_pem(), "the root comes last");
    verify_as_client_certificate(&chain, &h.ca.roots_pem());
    let cert = WorkloadCertificate::from_pem(&chain[0], &key, &chain[1]).unwrap();
    assert_eq!(cert.identity(), &client_id());
    let ttl = cert.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(ttl <= HOUR && ttl > HOUR - Duration::from_secs(60), "{ttl:?}");
    assert!(h.metrics().contains("ambit_ca_requests_total{outcome=\"success\"} 1"), "{}", h.metrics());
}

#[tokio::test]
async fn a_wrong_token_is_unauthenticated() {
    let h = Harness::start(DEFAULT_MAX_TTL).await;
    let (csr, _) = generate_csr(&client_id()).unwrap();
    let status = h.create("not-the-token", "node-a", csr, HOUR).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(h.metrics().contains("ambit_ca_requests_total{outcome=\"unauthenticated\"} 1"), "{}", h.metrics());
}

#[tokio::test]
async fn an_identity_not_on_the_callers_node_is_permission_denied() {
    let h = Harness::start(DEFAULT_MAX_TTL).await;
    let (csr, _) = generate_csr(&client_id()).unwrap();
    let status = h.create(TOKEN, "node-b", csr, HOUR).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("node-b"), "{}", status.message());
    assert!(status.message().contains(&client_id().to_string()), "{}", status.message());

    let (csr, _) = generate_csr(&Identity::new(TD, "kube-system", "admin")).unwrap();
    let status = h.create(TOKEN, "node-a", csr, HOUR).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}

#[tokio::test]
async fn a_new_snapshot_changes_what_a_node_may_request() {
    let h = Harness::start(DEFAULT_MAX_TTL).await;
    let (csr, _) = generate_csr(&client_id()).unwrap();
    h.snapshots.send(snapshot_with("node-b", "default", "client")).unwrap();
    let status = h.create(TOKEN, "node-a", csr.clone(), HOUR).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    h.create(TOKEN, "node-b", csr, HOUR).await.unwrap();
}

#[tokio::test]
async fn a_csr_for_another_trust_domain_is_invalid() {
    let h = Harness::start(DEFAULT_MAX_TTL).await;
    let (csr, _) = generate_csr(&Identity::new("evil.example", "default", "client")).unwrap();
    let status = h.create(TOKEN, "node-a", csr, HOUR).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("trust domain"), "{}", status.message());
}

#[tokio::test]
async fn a_csr_whose_name_is_not_spiffe_is_invalid() {
    let h = Harness::start(DEFAULT_MAX_TTL).await;
    for sans in [
        vec![SanType::DnsName("client.default.svc".try_into().unwrap())],
        vec![SanType::URI("https://client.default.svc/".try_into().unwrap())],
        vec![],
        vec![
            SanType::URI(client_id().to_string().try_into().unwrap()),
            SanType::DnsName("kubernetes.default.svc".try_into().unwrap()),
        ],
    ] {
        let status = h.create(TOKEN, "node-a", csr_with_sans(sans.clone()), HOUR).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{sans:?}: {status:?}");
    }
    let status = h.create(TOKEN, "node-a", "not a csr".into(), HOUR).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn validity_is_capped_at_the_max_ttl() {
    let h = Harness::start(Duration::from_secs(600)).await;
    let (csr, key) = generate_csr(&client_id()).unwrap();
    let chain = h.create(TOKEN, "node-a", csr, 10 * HOUR).await.unwrap();
    let cert = WorkloadCertificate::from_pem(&chain[0], &key, &chain[1]).unwrap();
    let ttl = cert.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(ttl <= Duration::from_secs(600), "{ttl:?}");
}

#[tokio::test]
async fn ztunnels_ca_client_gets_certificates_end_to_end_over_tls() {
    let h = Harness::start(DEFAULT_MAX_TTL).await;
    let client = CaClient::new(h.channel().await, TOKEN, HOUR).unwrap().with_node("node-a").unwrap();
    let cert = client.fetch(&client_id()).await.unwrap();
    assert_eq!(cert.identity(), &client_id());
    assert_eq!(cert.chain().len(), 1, "the root is kept apart from the chain");
    assert_eq!(cert.roots_pem(), h.ca.roots_pem());
    // The certificate works for mutual TLS as ztunnel uses it.
    ambit_identity::tls::server_config(&cert, &[b"h2"]).unwrap();

    let other = CaClient::new(h.channel().await, TOKEN, HOUR).unwrap().with_node("node-b").unwrap();
    match other.fetch(&client_id()).await.unwrap_err() {
        CertError::Provider { identity, message } => {
            assert_eq!(identity, client_id());
            assert!(message.contains("PermissionDenied") && message.contains("node-b"), "{message}");
        }
        e => panic!("unexpected error: {e}"),
    }
    let wrong = CaClient::new(h.channel().await, "wrong", HOUR).unwrap().with_node("node-a").unwrap();
    let err = wrong.fetch(&client_id()).await.unwrap_err();
    assert!(err.to_string().contains("Unauthenticated"), "{err}");
}

#[tokio::test]
async fn a_client_trusting_another_root_refuses_the_serving_certificate() {
    let h = Harness::start(DEFAULT_MAX_TTL).await;
    let other = CertificateAuthority::generate_root(TD, HOUR).unwrap();
    let r = connect_channel(&format!("https://{}", h.addr), &other.roots_pem(), SERVER_NAME).await;
    assert!(r.is_err(), "a serving certificate from another root was accepted");
}

#[tokio::test]
async fn a_per_node_token_alone_gets_identities_of_its_node_and_no_other() {
    let h = Harness::per_node().await;
    // Exactly Istio's ztunnel: token and ImpersonatedIdentity, no node anywhere in the request.
    let (csr, key) = generate_csr(&client_id()).unwrap();
    let chain = h.create_istio("tok-a", csr, Some(CLIENT_URI)).await.unwrap();
    let cert = WorkloadCertificate::from_pem(&chain[0], &key, &chain[1]).unwrap();
    assert_eq!(cert.identity(), &client_id());
    // Without ImpersonatedIdentity the CSR's name is the request.
    let (csr, _) = generate_csr(&client_id()).unwrap();
    h.create_istio("tok-a", csr, None).await.unwrap();
    // node-b's token: default/client runs on node-a only.
    let (csr, _) = generate_csr(&client_id()).unwrap();
    let status = h.create_istio("tok-b", csr, Some(CLIENT_URI)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("node-b"), "{}", status.message());
    // node-a's token naming node-b in the header: refused, the header cannot move the token to another node.
    let (csr, _) = generate_csr(&client_id()).unwrap();
    let status = h.create(TOKEN_A, "node-b", csr, HOUR).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let (csr, _) = generate_csr(&client_id()).unwrap();
    h.create(TOKEN_A, "node-a", csr, HOUR).await.expect("a header naming the token's own node is fine");
    // A token nobody was given.
    let (csr, _) = generate_csr(&client_id()).unwrap();
    let status = h.create_istio("tok-c", csr, Some(CLIENT_URI)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn an_impersonated_identity_must_be_the_csrs() {
    let h = Harness::per_node().await;
    for (impersonated, want) in [
        ("spiffe://cluster.local/ns/default/sa/other", "is not the csr's identity"),
        ("not a spiffe id", "ImpersonatedIdentity \"not a spiffe id\""),
    ] {
        let (csr, _) = generate_csr(&client_id()).unwrap();
        let status = h.create_istio("tok-a", csr, Some(impersonated)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(want), "{} does not say {want}", status.message());
    }
    // A CSR for an identity elsewhere does not pass by naming an allowed one.
    let (csr, _) = generate_csr(&Identity::new(TD, "kube-system", "admin")).unwrap();
    let status = h.create_istio("tok-a", csr, Some(CLIENT_URI)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn the_shared_token_without_a_node_header_gets_no_certificate() {
    let h = Harness::start(DEFAULT_MAX_TTL).await;
    let (csr, _) = generate_csr(&client_id()).unwrap();
    let status = h.create_istio(TOKEN, csr, Some(CLIENT_URI)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("--bootstrap-tokens"), "{}", status.message());
}

/// A caller as a TokenReview describes one (no API server here): on `node`, as `sa`.
struct FixedCaller(Caller);

impl AsyncCallerAuthenticator for FixedCaller {
    fn authenticate_async<'a>(&'a self, _: &'a tonic::metadata::MetadataMap) -> AuthFuture<'a> {
        Box::pin(std::future::ready(Ok(self.0.clone())))
    }
}

#[tokio::test]
async fn a_caller_may_have_its_own_identity_wherever_it_runs() {
    let ztunnel =
        Caller { node: Some("node-b".into()), service_account: Some(("ambit-system".into(), "ztunnel".into())) };
    let h = Harness::start_with(DEFAULT_MAX_TTL, Arc::new(FixedCaller(ztunnel))).await;
    let own = Identity::new(TD, "ambit-system", "ztunnel");
    let (csr, _) = generate_csr(&own).unwrap();
    h.create_istio("any", csr, Some(&own.to_string())).await.expect("its own identity");
    let (csr, _) = generate_csr(&client_id()).unwrap();
    let status = h.create_istio("any", csr, Some(CLIENT_URI)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "a pod on node-a: {status:?}");
}

#[tokio::test]
async fn a_waypoint_gets_its_own_identity_and_no_other_even_of_a_pod_on_its_node() {
    let waypoint = Caller::workload("default", "waypoint");
    let h = Harness::start_with(DEFAULT_MAX_TTL, Arc::new(FixedCaller(waypoint))).await;
    let own = Identity::new(TD, "default", "waypoint");
    let (csr, _) = generate_csr(&own).unwrap();
    let chain = h.create_istio("any", csr, Some(&own.to_string())).await.expect("its own identity");
    assert!(!chain.is_empty());
    for other in [client_id(), Identity::new(TD, "ambit-system", "ztunnel"), Identity::new(TD, "other", "waypoint")] {
        let (csr, _) = generate_csr(&other).unwrap();
        let status = h.create_istio("any", csr, Some(&other.to_string())).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{other}: {status:?}");
        assert!(status.message().contains("only its own identity"), "{}", status.message());
    }
}

#[tokio::test]
async fn file_mode_workload_tokens_get_their_own_identity_and_node_tokens_keep_theirs() {
    let nodes = NodeTokenAuthenticator::parse("tok-a node-a\n", std::path::Path::new("n")).unwrap();
    let auth = crate::ca::WorkloadTokenAuthenticator::parse(
        "wp-token default/waypoint\n",
        std::path::Path::new("w"),
        Arc::new(nodes),
    )
    .unwrap();
    let h = Harness::start_with(DEFAULT_MAX_TTL, Arc::new(auth)).await;
    let own = Identity::new(TD, "default", "waypoint");
    let (csr, _) = generate_csr(&own).unwrap();
    h.create_istio("wp-token", csr, Some(&own.to_string())).await.expect("the waypoint's own identity");
    let (csr, _) = generate_csr(&client_id()).unwrap();
    let status = h.create_istio("wp-token", csr, Some(CLIENT_URI)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "a pod's identity: {status:?}");
    let (csr, _) = generate_csr(&client_id()).unwrap();
    h.create_istio(TOKEN_A, csr, Some(CLIENT_URI)).await.expect("node-a's ztunnel still signs its pods");
}
