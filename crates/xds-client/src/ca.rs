//! Certificates from the controller's CA service
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`): the key never
//! leaves the process; the client sends a CSR for the identity, names it in
//! the request metadata as `ImpersonatedIdentity` (as Istio's ztunnel does),
//! proves who it is with a bearer token (ztunnel: its node's; a waypoint:
//! its own service account's), and checks that what comes back is for that
//! identity.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use ambit_api::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use ambit_api::ca::IstioCertificateRequest;
use ambit_identity::{Identity, WorkloadCertificate};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::certs::{CertError, CertificateProvider};
use crate::token::TokenSource;

/// Metadata key carrying a ztunnel's node name: an extra for a controller
/// whose credential proves no node (one shared bootstrap token).
pub const NODE_METADATA_KEY: &str = "x-ambit-node";
/// Key of the request's `metadata` struct naming the identity asked for on
/// behalf of a pod (Istio's name for it).
pub const IMPERSONATED_IDENTITY_KEY: &str = "ImpersonatedIdentity";
/// How long to wait for the TCP and TLS connection to the controller.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one certificate request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a CA client or its channel cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    /// The endpoint address or the TLS settings are invalid.
    #[error("invalid controller endpoint {endpoint}: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection to the controller failed.
    #[error("cannot connect to the controller at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The token or node name cannot travel in gRPC metadata.
    #[error("the {0} holds characters not allowed in grpc metadata")]
    Metadata(&'static str),
}

/// An endpoint for the controller's TLS gRPC port (`https://host:15012`),
/// trusting only `root_pem` and expecting `server_name` in the serving
/// certificate. Use `connect_lazy()` to start without the controller up.
pub fn tls_endpoint(endpoint: &str, root_pem: &str, server_name: &str) -> Result<Endpoint, CaClientError> {
    let err = |source| CaClientError::Endpoint { endpoint: endpoint.to_owned(), source };
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root_pem)).domain_name(server_name);
    // No per-request timeout here: the same channel may carry long-lived xDS streams.
    Endpoint::from_shared(endpoint.to_owned())
        .map_err(err)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(tls)
        .map_err(err)
}

/// Connects to the controller's TLS gRPC port now (see [`tls_endpoint`]).
pub async fn connect_channel(endpoint: &str, root_pem: &str, server_name: &str) -> Result<Channel, CaClientError> {
    tls_endpoint(endpoint, root_pem, server_name)?
        .connect()
        .await
        .map_err(|source| CaClientError::Connect { endpoint: endpoint.to_owned(), source })
}

/// Fetches workload certificates from the controller's CA.
#[derive(Clone)]
pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    authorization: TokenSource,
    node: Option<AsciiMetadataValue>,
    ttl: Duration,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient").field("node", &self.node).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl CaClient {
    /// A client over `channel` (TLS set up by the caller) presenting `token`
    /// and asking for certificates valid for `ttl`.
    pub fn new(channel: Channel, token: &str, ttl: Duration) -> Result<Self, CaClientError> {
        let source = TokenSource::fixed(token).map_err(|_| CaClientError::Metadata("bearer token"))?;
        Ok(CaClient::from_source(channel, source, ttl))
    }

    /// As [`CaClient::new`], with the token of `source` (read at every
    /// request when it is a file: projected tokens rotate).
    pub fn from_source(channel: Channel, source: TokenSource, ttl: Duration) -> Self {
        CaClient { client: IstioCertificateServiceClient::new(channel), authorization: source, node: None, ttl }
    }

    /// Also names the caller's node in [`NODE_METADATA_KEY`] (ztunnel).
    pub fn with_node(mut self, node: &str) -> Result<Self, CaClientError> {
        self.node = Some(MetadataValue::try_from(node).map_err(|_| CaClientError::Metadata("node name"))?);
        Ok(self)
    }

    async fn fetch_certificate(&self, id: &Identity) -> Result<WorkloadCertificate, String> {
        let (csr, key) = ambit_identity::generate_csr(id).map_err(|e| format!("cannot make a csr: {e}"))?;
        let validity_duration = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let metadata = prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY_KEY.to_owned(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
            )]
            .into(),
        };
        let mut request =
            tonic::Request::new(IstioCertificateRequest { csr, validity_duration, metadata: Some(metadata) });
        let authorization = self.authorization.header().map_err(|e| format!("no token to present: {e}"))?;
        request.metadata_mut().insert("authorization", authorization);
        if let Some(node) = &self.node {
            request.metadata_mut().insert(NODE_METADATA_KEY, node.clone());
        }
        request.set_timeout(REQUEST_TIMEOUT);
        let mut client = self.client.clone();
        let response = tokio::time::timeout(REQUEST_TIMEOUT, client.create_certificate(request))
            .await
            .map_err(|_| format!("ca did not answer within {REQUEST_TIMEOUT:?}"))?
            .map_err(|s| format!("ca refused ({:?}): {}", s.code(), s.message()))?;
        let chain = response.into_inner().cert_chain;
        let Some((root, leaf_chain)) = chain.split_last().filter(|(_, rest)| !rest.is_empty()) else {
            return Err(format!("ca returned {} certificates, want the leaf and the root", chain.len()));
        };
        let cert = WorkloadCertificate::from_pem(&leaf_chain.concat(), &key, root)
            .map_err(|e| format!("ca returned an unusable certificate: {e}"))?;
        if cert.identity() != id {
            return Err(format!("ca returned a certificate for {}", cert.identity()));
        }
        Ok(cert)
    }
}

impl CertificateProvider for CaClient {
    fn fetch<'a>(
        &'a self,
        id: &'a Identity,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CertError>> + Send + 'a>> {
        Box::pin(async move {
            self.fetch_certificate(id).await.map_err(|message| CertError::Provider { identity: id.clone(), message })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_api::ca::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
    use ambit_api::ca::IstioCertificateResponse;
    use ambit_identity::CertificateAuthority;

    const HOUR: Duration = Duration::from_secs(3600);

    /// A mock CA (the controller's real CA cannot be made to misbehave): it
    /// answers with a certificate of its own making for `answers_for`, or
    /// signs the CSR properly but leaves out the root.
    struct MisbehavingCa {
        ca: CertificateAuthority,
        answers_for: Option<Identity>,
    }

    #[tonic::async_trait]
    impl IstioCertificateService for MisbehavingCa {
        async fn create_certificate(
            &self,
            request: tonic::Request<IstioCertificateRequest>,
        ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
            let cert_chain = match &self.answers_for {
                Some(other) => {
                    let cert = self.ca.issue(other, HOUR).unwrap();
                    vec![cert.chain_pem(), self.ca.roots_pem()]
                }
                None => {
                    let id = Identity::new("cluster.local", "default", "client");
                    let mut chain = self.ca.sign_csr(&request.get_ref().csr, &id, HOUR).unwrap();
                    chain.pop();
                    chain
                }
            };
            Ok(tonic::Response::new(IstioCertificateResponse { cert_chain }))
        }
    }

    /// What a [`RecordingCa`] saw of a request: its `metadata` struct and gRPC headers.
    type Seen = std::sync::Arc<std::sync::Mutex<Option<(Option<prost_types::Struct>, tonic::metadata::MetadataMap)>>>;

    /// A CA that signs the CSR (for default/client) and records the request.
    struct RecordingCa {
        ca: CertificateAuthority,
        seen: Seen,
    }

    #[tonic::async_trait]
    impl IstioCertificateService for RecordingCa {
        async fn create_certificate(
            &self,
            request: tonic::Request<IstioCertificateRequest>,
        ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
            let id = Identity::new("cluster.local", "default", "client");
            let cert_chain = self.ca.sign_csr(&request.get_ref().csr, &id, HOUR).unwrap();
            *self.seen.lock().unwrap() = Some((request.get_ref().metadata.clone(), request.metadata().clone()));
            Ok(tonic::Response::new(IstioCertificateResponse { cert_chain }))
        }
    }

    #[tokio::test]
    async fn the_request_names_the_identity_as_istios_ztunnel_does_and_the_node_as_an_extra() {
        let seen = Seen::default();
        let (client, server) = client_of(RecordingCa { ca: ca(), seen: seen.clone() }).await;
        let id = Identity::new("cluster.local", "default", "client");
        let cert = client.fetch(&id).await.unwrap();
        server.abort();
        assert_eq!(cert.identity(), &id);
        let (metadata, headers) = seen.lock().unwrap().take().expect("the CA saw the request");
        let metadata = metadata.expect("a metadata struct");
        assert_eq!(metadata.fields.len(), 1, "{metadata:?}");
        assert_eq!(
            metadata.fields[IMPERSONATED_IDENTITY_KEY].kind,
            Some(prost_types::value::Kind::StringValue("spiffe://cluster.local/ns/default/sa/client".into()))
        );
        assert_eq!(headers.get("authorization").unwrap(), "Bearer t");
        assert_eq!(headers.get(NODE_METADATA_KEY).unwrap(), "node-a");
    }

    /// Serves `ca` in plaintext on 127.0.0.1:0 and returns a client for node-a.
    async fn client_of<S: IstioCertificateService>(ca: S) -> (CaClient, tokio::task::JoinHandle<()>) {
        let (client, server) = plain_client_of(ca).await;
        (client.with_node("node-a").unwrap(), server)
    }

    /// As [`client_of`], a client naming no node (a waypoint).
    async fn plain_client_of<S: IstioCertificateService>(ca: S) -> (CaClient, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming =
            futures::stream::unfold(listener, |l| async move { Some((l.accept().await.map(|(s, _)| s), l)) });
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(IstioCertificateServiceServer::new(ca))
                .serve_with_incoming(incoming)
                .await
                .unwrap()
        });
        let channel = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        (CaClient::new(channel, "t", HOUR).unwrap(), server)
    }

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate_root("cluster.local", 24 * HOUR).unwrap()
    }

    #[tokio::test]
    async fn a_client_without_a_node_sends_only_its_token() {
        let seen = Seen::default();
        let (client, server) = plain_client_of(RecordingCa { ca: ca(), seen: seen.clone() }).await;
        let id = Identity::new("cluster.local", "default", "client");
        client.fetch(&id).await.unwrap();
        server.abort();
        let (_, headers) = seen.lock().unwrap().take().expect("the CA saw the request");
        assert_eq!(headers.get("authorization").unwrap(), "Bearer t");
        assert!(headers.get(NODE_METADATA_KEY).is_none());
    }

    #[tokio::test]
    async fn a_certificate_for_someone_else_is_refused() {
        let other = Identity::new("cluster.local", "kube-system", "admin");
        let (client, server) = client_of(MisbehavingCa { ca: ca(), answers_for: Some(other) }).await;
        let id = Identity::new("cluster.local", "default", "client");
        let err = client.fetch(&id).await.unwrap_err();
        server.abort();
        assert!(err.to_string().contains("unusable certificate"), "{err}");
    }

    #[tokio::test]
    async fn an_answer_without_the_root_is_refused() {
        let (client, server) = client_of(MisbehavingCa { ca: ca(), answers_for: None }).await;
        let id = Identity::new("cluster.local", "default", "client");
        let err = client.fetch(&id).await.unwrap_err();
        server.abort();
        assert!(err.to_string().contains("ca returned 1 certificates"), "{err}");
    }

    #[tokio::test]
    async fn a_node_name_that_cannot_be_metadata_is_refused() {
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let err = CaClient::new(channel, "t", HOUR).unwrap().with_node("node\na").unwrap_err();
        assert!(matches!(err, CaClientError::Metadata("node name")), "{err}");
    }
}
