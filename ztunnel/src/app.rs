//! Wires ztunnel together: state, certificates, the HBONE pool, the pod
//! proxies driven by ZDS, and the admin, metrics and readiness endpoints.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::{self, AdminInputs, LogControl, Readiness};
use crate::certs::{CertError, CertManager, LocalCa};
use crate::config::Config;
use crate::hbone::pool::{HbonePool, PoolSettings};
use crate::inpod::InPodManager;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::proxy::ProxyInputs;
use crate::state::{LoadOptions, SharedState, StateError, StateFile};

/// Why ztunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot load the state file: {0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Certs(#[from] CertError),
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|source| AppError::Bind { what, addr, source })
}

/// Runs ztunnel until SIGTERM or SIGINT.
pub async fn run(config: Config, log: Arc<LogControl>) -> Result<(), AppError> {
    let config = Arc::new(config);
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let readiness = Arc::new(Readiness::default());

    let opts = LoadOptions {
        default_trust_domain: config.trust_domain.clone(),
        root_namespace: config.root_namespace.clone(),
    };
    let mut state_file = StateFile::new(&config.state_file, opts);
    let initial = state_file.poll()?.unwrap_or_default();
    let state = Arc::new(SharedState::new(initial));
    readiness.state_loaded.store(true, Ordering::Relaxed);
    tokio::spawn(watch_state(state_file, state.clone(), metrics.clone(), config.state_poll_interval));

    let provider = LocalCa::from_files(&config.ca_cert, &config.ca_key, config.cert_ttl)?;
    warn!("development CA: this ztunnel signs workload certificates with a root key read from disk");
    let certs = CertManager::new(Arc::new(provider), metrics.clone());
    let pool = HbonePool::new(
        PoolSettings {
            max_streams: config.pool_max_streams,
            max_connections: config.pool_max_connections,
            idle_timeout: config.pool_idle_timeout,
            connect_timeout: config.connect_timeout,
        },
        metrics.clone(),
    );
    let inputs = ProxyInputs { config: config.clone(), state: state.clone(), certs: certs.clone(), pool, metrics };

    let admin_l = bind(config.admin_addr, "admin").await?;
    let metrics_l = bind(config.metrics_addr, "metrics").await?;
    let ready_l = bind(config.readiness_addr, "readiness").await?;
    let pods = Arc::new(Mutex::new(Vec::new()));
    let admin_inputs = Arc::new(AdminInputs { config: config.clone(), state, certs, pods: pods.clone(), log });
    tokio::spawn(admin::serve_admin(admin_l, admin_inputs));
    tokio::spawn(admin::serve_metrics(metrics_l, Arc::new(registry)));
    tokio::spawn(admin::serve_readiness(ready_l, readiness.clone()));
    info!(node = %config.node_name, admin = %config.admin_addr, metrics = %config.metrics_addr, "ztunnel started");

    let manager = InPodManager::new(inputs, pods);
    let zds_socket = config.zds_socket.clone();
    tokio::select! {
        _ = manager.run(&zds_socket, readiness) => {}
        _ = shutdown_signal() => info!("shutting down"),
    }
    Ok(())
}

async fn watch_state(mut file: StateFile, state: Arc<SharedState>, metrics: Arc<Metrics>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match file.poll() {
            Ok(Some(new)) => {
                state.replace(new);
                metrics.state_reloads.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
                info!("state file changed; new state applies to new connections");
            }
            Ok(None) => {}
            Err(e) => {
                metrics.state_reloads.get_or_create(&OutcomeLabels { outcome: "failure" }).inc();
                warn!(error = %e, "state file rejected; keeping the previous state");
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
