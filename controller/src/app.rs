//! Wires the controller: the model fed by its source, the delta xDS server
//! and the CA on one TLS gRPC port (and optionally a plaintext one), and the
//! metrics endpoint.

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

use crate::ca::{load_or_create_root, serving_identity, AuthInterceptor, BootstrapTokenAuthenticator, CaService};
use crate::config::Config;
use crate::model::{ModelOptions, Rejection, RejectionSink, Snapshot};
use crate::sources::file::FileSource;
use crate::xds::{XdsMetrics, XdsServer};

/// Why the controller could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Root(#[from] crate::ca::CaError),
    #[error("{0}")]
    Serving(#[from] crate::ca::ServingError),
    #[error("{0}")]
    Auth(#[from] crate::ca::AuthError),
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
    tokio::spawn(FileSource::new(config.config_dir.clone(), opts).with_interval(config.config_poll).run(tx, sink));

    let ca = Arc::new(load_or_create_root(&config.ca_dir, &config.trust_domain)?);
    let (chain_pem, key_pem) = serving_identity(&ca, &config.serving_dns_names, &config.serving_ips)?;
    let auth = Arc::new(BootstrapTokenAuthenticator::from_file(&config.bootstrap_token_file)?);
    let xds = XdsServer::new(rx.clone(), XdsMetrics::new(&mut registry));
    let ca_service = CaService::new(ca, config.trust_domain.clone(), auth.clone(), rx, &mut registry)
        .with_max_ttl(config.cert_max_ttl);
    let interceptor = AuthInterceptor::new(auth);

    let metrics_l = bind(config.metrics_addr, "metrics").await?;
    tokio::spawn(ambit_telemetry::serve_metrics(metrics_l, Arc::new(registry)));

    let tls = ServerTlsConfig::new().identity(TlsIdentity::from_pem(chain_pem, key_pem));
    let grpc = |tls: Option<ServerTlsConfig>| -> Result<_, tonic::transport::Error> {
        let mut b = Server::builder();
        if let Some(tls) = tls {
            b = b.tls_config(tls)?;
        }
        Ok(b.add_service(AggregatedDiscoveryServiceServer::with_interceptor(xds.clone(), interceptor.clone()))
            .add_service(ca_service.clone().into_server()))
    };
    let listen = config.listen;
    let secure = grpc(Some(tls)).map_err(|source| AppError::Grpc { addr: listen, source })?;
    let secure_l = bind(listen, "xds and ca (tls)").await?;
    info!(%listen, config_dir = %config.config_dir.display(), "controller serving xds and ca over tls");
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

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|source| AppError::Bind { what, addr, source })
}
