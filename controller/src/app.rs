//! Wires the controller: the model fed by its source, the delta xDS server
//! and the CA on one TLS gRPC port (and optionally a plaintext one), and the
//! metrics endpoint. File mode reads a directory and admits bootstrap
//! tokens (per node, or one shared); Kubernetes mode watches the API server, keeps the root in a Secret,
//! publishes its certificate in a ConfigMap, admits ztunnels by TokenReview
//! and deploys waypoints.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_api::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tonic::transport::{Identity as TlsIdentity, Server, ServerTlsConfig};
use tracing::{info, warn};

use ambit_identity::CertificateAuthority;

use crate::ca::root::ROOT_VALIDITY;
use crate::ca::{
    load_or_create, load_or_create_root, publish_root_cert, serving_identity, AsyncCallerAuthenticator,
    BootstrapTokenAuthenticator, CaService, NodeTokenAuthenticator, SecretRootStore, TokenReviewAuthenticator,
    WorkloadTokenAuthenticator,
};
use crate::config::{Config, FileCredentials, KubeConfig, Mode};
use crate::model::{ModelOptions, Rejection, RejectionSink, Snapshot, SnapshotTx};
use crate::sources::file::FileSource;
use crate::sources::kube::{client_from_kubeconfig, KubeSource, KubeSourceError};
use crate::xds::{XdsMetrics, XdsServer};

/// Why the controller could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Root(#[from] crate::ca::CaError),
    #[error("{0}")]
    SecretStore(#[from] crate::ca::SecretStoreError),
    #[error("{0}")]
    PublishRoot(#[from] crate::ca::PublishError),
    #[error("{0}")]
    Kube(#[from] KubeSourceError),
    #[error("bug: the root store task failed: {0}")]
    RootTask(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Serving(#[from] crate::ca::ServingError),
    #[error("{0}")]
    Auth(#[from] crate::ca::AuthError),
    #[error("{0}")]
    NodeTokens(#[from] crate::ca::NodeTokensError),
    #[error("{0}")]
    WorkloadTokens(#[from] crate::ca::WorkloadTokensError),
    #[error("--config-dir: {0}")]
    ConfigDir(#[from] crate::sources::file::SourceError),
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("grpc server on {addr}: {source}")]
    Grpc { addr: SocketAddr, source: tonic::transport::Error },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), AppError> {
    let mut registry = Registry::default();
    let opts = ModelOptions {
        trust_domain: config.trust_domain.clone(),
        root_namespace: config.root_namespace.clone(),
        cluster_id: config.cluster_id.clone(),
        domain_suffix: config.domain_suffix.clone(),
        auto_allow_waypoint_policy: config.auto_allow_waypoint_policy,
    };
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let rejected = Family::<KindLabels, Counter>::default();
    registry.register("ambit_controller_rejected_objects", "Objects left out of the model, by kind", rejected.clone());
    let sink: RejectionSink = Arc::new(move |rejections: &[Rejection]| {
        for r in rejections {
            warn!(kind = %r.kind, namespace = %r.namespace, name = %r.name, reason = %r.reason, "object rejected");
            rejected.get_or_create(&KindLabels { kind: r.kind.clone() }).inc();
        }
    });
    let (ca, auth) = match config.mode()? {
        Mode::File { config_dir, ca_dir, credentials } => {
            info!(config_dir = %config_dir.display(), "file mode");
            // A mistyped directory is a start-up error, not a mesh that stays empty.
            crate::sources::file::Files::read(config_dir)?;
            let ca = load_or_create_root(ca_dir, &config.trust_domain)?;
            let auth: Arc<dyn AsyncCallerAuthenticator> = match credentials {
                FileCredentials::NodeTokens(path) => {
                    let auth = NodeTokenAuthenticator::from_file(path)?;
                    info!(tokens = auth.len(), "callers prove their node with per-node bootstrap tokens");
                    Arc::new(auth)
                }
                FileCredentials::SharedToken(path) => {
                    warn!(
                        "one bootstrap token for all callers proves no node: each names its own \
                         (x-ambit-node); --bootstrap-tokens scopes a caller to its node by its token"
                    );
                    Arc::new(BootstrapTokenAuthenticator::from_file(path)?)
                }
            };
            let auth = match &config.workload_tokens {
                Some(path) => {
                    let auth = WorkloadTokenAuthenticator::from_file(path, auth)?;
                    info!(tokens = auth.len(), "workloads (waypoints) prove their identity with workload tokens");
                    Arc::new(auth)
                }
                None => auth,
            };
            tokio::spawn(FileSource::new(config_dir.to_owned(), opts).with_interval(config.config_poll).run(tx, sink));
            (Arc::new(ca), auth)
        }
        Mode::Kubernetes(kube) => start_kubernetes(kube, &config.trust_domain, opts, tx, sink).await?,
    };
    let (chain_pem, key_pem) = serving_identity(&ca, &config.serving_dns_names, &config.serving_ips)?;
    let xds = XdsServer::new(rx.clone(), XdsMetrics::new(&mut registry), auth.clone());
    let ca_service =
        CaService::new(ca, config.trust_domain.clone(), auth, rx, &mut registry).with_max_ttl(config.cert_max_ttl);

    let metrics_l = bind(config.metrics_addr, "metrics").await?;
    tokio::spawn(ambit_telemetry::serve_metrics(metrics_l, Arc::new(registry)));

    let tls = ServerTlsConfig::new().identity(TlsIdentity::from_pem(chain_pem, key_pem));
    let grpc = |tls: Option<ServerTlsConfig>| -> Result<_, tonic::transport::Error> {
        let mut b = Server::builder();
        if let Some(tls) = tls {
            b = b.tls_config(tls)?;
        }
        Ok(b.add_service(AggregatedDiscoveryServiceServer::new(xds.clone()))
            .add_service(ca_service.clone().into_server()))
    };
    let listen = config.listen;
    let secure = grpc(Some(tls)).map_err(|source| AppError::Grpc { addr: listen, source })?;
    let secure_l = bind(listen, "xds and ca (tls)").await?;
    info!(%listen, "controller serving xds and ca over tls");
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(secure_l);
        secure.serve_with_incoming(incoming).await.map_err(|source| AppError::Grpc { addr: listen, source })
    });
    if let Some(addr) = config.plaintext_listen {
        warn!(%addr, "plaintext xds and ca enabled: use only on a trusted network");
        let plain = grpc(None).map_err(|source| AppError::Grpc { addr, source })?;
        let l = bind(addr, "xds and ca (plaintext)").await?;
        servers.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
            plain.serve_with_incoming(incoming).await.map_err(|source| AppError::Grpc { addr, source })
        });
    }
    tokio::select! {
        Some(r) = servers.join_next() => r.unwrap_or(Ok(())),
        _ = ambit_telemetry::shutdown_signal() => {
            info!("shutting down");
            Ok(())
        }
    }
}

/// Kubernetes mode: the client, the root from its Secret (created on first
/// start), its certificate published for ztunnels, the source and the
/// waypoint controller running, and the TokenReview authenticator.
async fn start_kubernetes(
    kube: &KubeConfig,
    trust_domain: &str,
    opts: ModelOptions,
    tx: SnapshotTx,
    sink: RejectionSink,
) -> Result<(Arc<CertificateAuthority>, Arc<dyn AsyncCallerAuthenticator>), AppError> {
    let client = match &kube.kubeconfig {
        Some(path) => client_from_kubeconfig(path).await?,
        None => kube::Client::try_default().await.map_err(KubeSourceError::Client)?,
    };
    info!(namespace = %kube.namespace, kubeconfig = ?kube.kubeconfig, "kubernetes mode");
    let store = SecretRootStore::new(client.clone(), &kube.namespace)?;
    let td = trust_domain.to_owned();
    // The store blocks on this runtime: it must not run on one of its workers.
    let ca = tokio::task::spawn_blocking(move || load_or_create(&store, &td, ROOT_VALIDITY)).await??;
    let published = publish_root_cert(client.clone(), &kube.namespace, &ca.roots_pem()).await?;
    info!(namespace = %kube.namespace, ?published, "root certificate published for ztunnels");
    tokio::spawn(KubeSource::new(client.clone(), opts).run(tx, sink));
    tokio::spawn(crate::waypoints::run(client.clone(), kube.waypoint_settings(), ca.roots_pem()));
    // Detached: they live as long as the runtime, like the source above.
    drop(crate::sources::unsupported::spawn(&client, "ambit-controller"));
    let auth = TokenReviewAuthenticator::new(client)
        .with_audience(kube.token_audience.clone())
        .with_allowed_users(kube.allowed_users()?)
        .with_cache_ttl(kube.token_cache);
    Ok((Arc::new(ca), Arc::new(auth)))
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|source| AppError::Bind { what, addr, source })
}
