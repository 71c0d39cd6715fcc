//! Starting the waypoint: the controller's configuration and certificate,
//! the HBONE listener, and the admin, metrics and readiness endpoints.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::pool::{HbonePool, PoolSettings};
use ambit_telemetry::LogControl;
use ambit_xds_client::ca::{tls_endpoint, CaClientError};
use ambit_xds_client::token::{TokenError, TokenSource};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::access_log::AccessLog;
use crate::admin::{serve_admin, serve_readiness, AdminInputs};
use crate::config::{certificates, ConfigClient, WaypointNode};
use crate::flags::Flags;
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::proxy::Shared;
use crate::upstream::{Upstream, UpstreamSettings};

/// Why the waypoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("controller endpoint: {0}")]
    Endpoint(#[from] CaClientError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Tracing(#[from] crate::trace::TraceError),
}

fn read(what: &'static str, path: &PathBuf) -> Result<String, AppError> {
    std::fs::read_to_string(path).map_err(|source| AppError::Read { what, path: path.clone(), source })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|source| AppError::Bind { what, addr, source })
}

/// Runs the waypoint until SIGTERM or SIGINT.
pub async fn run(flags: Flags, log: Arc<LogControl>) -> Result<(), AppError> {
    let root = read("the mesh root", &flags.mesh_root)?;
    // Read again for every call: the kubelet rotates the projected token.
    let token = TokenSource::file(&flags.token_file)?;
    // The Deployment the controller writes names it as `host:port`; TLS either way.
    let address = match flags.xds_address.contains("://") {
        true => flags.xds_address.clone(),
        false => format!("https://{}", flags.xds_address),
    };
    let channel = tls_endpoint(&address, &root, &flags.controller_server_name)?.connect_lazy();
    let identity = flags.identity();
    let node = WaypointNode {
        pod_name: flags.pod_name.clone(),
        namespace: flags.pod_namespace.clone(),
        instance_ip: Some(flags.instance_ip),
        cluster_id: flags.cluster_id.clone(),
    };
    let client = ConfigClient::new(channel.clone(), token.clone(), &node, &flags.trust_domain);
    let snapshots = client.snapshots();
    let synced = client.synced();
    let certs = certificates(channel, token, Duration::from_secs(flags.cert_ttl_secs));

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let pool = HbonePool::new(
        PoolSettings {
            max_streams: flags.pool_max_streams,
            max_connections: 2,
            idle_timeout: flags.pool_idle(),
            connect_timeout: flags.connect_timeout(),
            congestion_control: None,
        },
        metrics.pool(),
    );
    let upstream = Upstream::new(
        pool,
        certs.clone(),
        snapshots.clone(),
        UpstreamSettings {
            identity: identity.clone(),
            source_ip: flags.instance_ip,
            connect_timeout: flags.connect_timeout(),
            idle_timeout: flags.pool_idle(),
        },
    );
    tokio::spawn(count_config_problems(snapshots.clone(), metrics.clone()));
    let gateway = (flags.pod_namespace.clone(), flags.gateway_name().to_owned());
    let shared = Shared::new(
        snapshots.clone(),
        upstream,
        metrics,
        gateway.clone(),
        flags.xff_num_trusted_hops,
        AccessLog::new(flags.access_log),
        flags.max_mirror_requests,
    );

    let tracing = start_tracing(&flags)?;

    let hbone = bind("hbone", flags.hbone_addr).await?;
    let admin = bind("admin", flags.admin_addr).await?;
    let metrics_listener = bind("metrics", flags.metrics_addr).await?;
    let readiness = bind("readiness", flags.readiness_addr).await?;

    let (ready_tx, ready) = watch::channel(false);
    let (drain, draining) = watch::channel(false);
    let (active, mut drained) = mpsc::channel::<()>(1);
    tokio::spawn(become_ready(synced, certs.clone(), identity.clone(), ready_tx));
    tokio::spawn(client.run());
    tokio::spawn(serve_admin(
        admin,
        Arc::new(AdminInputs {
            snapshots,
            certs: certs.clone(),
            log,
            gateway: format!("{}/{}", gateway.0, gateway.1),
            identity: identity.to_string(),
            shared: shared.clone(),
        }),
    ));
    tokio::spawn(ambit_telemetry::serve_metrics(metrics_listener, Arc::new(registry)));
    tokio::spawn(serve_readiness(readiness, ready, draining.clone()));
    let listener = Listener {
        shared,
        certs,
        identity: identity.clone(),
        max_streams: flags.pool_max_streams as u32,
        draining,
        active,
    };
    tokio::spawn(Arc::new(listener).run(hbone));
    info!(%identity, hbone = %flags.hbone_addr, gateway = %format!("{}/{}", gateway.0, gateway.1), "waypoint started");
    ambit_telemetry::shutdown_signal().await;
    let timeout = Duration::from_secs(flags.drain_timeout_secs);
    info!(?timeout, "waypoint draining: not ready, no new connections, open ones finish");
    let _ = drain.send(true);
    match tokio::time::timeout(timeout, drained.recv()).await {
        Ok(_) => info!("waypoint drained"),
        Err(_) => warn!("drain timeout passed; closing the connections still open"),
    }
    if let Some(provider) = tracing {
        crate::trace::shutdown(provider).await;
    }
    Ok(())
}

/// Tracing to `--tracing-endpoint`, if set: the provider, to flush at exit.
fn start_tracing(flags: &Flags) -> Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>, AppError> {
    let Some(endpoint) = &flags.tracing_endpoint else { return Ok(None) };
    let ns = &flags.pod_namespace;
    let proxy = crate::trace::ProxyInfo {
        // Envoy's node id as Istio writes it for a waypoint.
        node_id: format!("waypoint~{}~{}.{ns}~{ns}.svc.cluster.local", flags.instance_ip, flags.pod_name),
        canonical_service: flags.gateway_name().to_owned(),
        namespace: ns.clone(),
        mesh_id: flags.trust_domain.clone(),
    };
    let provider = crate::trace::install(endpoint, flags.tracing_protocol, flags.tracing_sampling, proxy)?;
    info!(%endpoint, protocol = ?flags.tracing_protocol, sampling = flags.tracing_sampling, "tracing on");
    Ok(Some(provider))
}

/// Ready once the configuration arrived (every type at least once) and the
/// waypoint holds its certificate: before that it could only refuse traffic.
async fn become_ready(
    mut synced: watch::Receiver<bool>,
    certs: Arc<ambit_xds_client::certs::CertManager>,
    identity: ambit_identity::Identity,
    ready: watch::Sender<bool>,
) {
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        match certs.get(&identity).await {
            Ok(_) => break,
            Err(e) => {
                warn!(error = %e, "waypoint certificate not issued yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    info!("waypoint ready: configuration synced and certificate issued");
    let _ = ready.send(true);
}

/// Keeps `ambit_waypoint_config_problems` at what the current snapshot left out.
async fn count_config_problems(mut snapshots: crate::config::SnapshotHandle, metrics: Metrics) {
    loop {
        let report = snapshots.current().report().clone();
        metrics.config_problems(report.routes.len() + report.addresses.len());
        if snapshots.changed().await.is_none() {
            return;
        }
    }
}
