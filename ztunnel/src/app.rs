//! Wires ztunnel together: state, certificates, the HBONE pool, the pod
//! proxies driven by ZDS, and the admin, metrics and readiness endpoints.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

use ambit_telemetry::LogControl;

use crate::admin::{self, AdminInputs, Readiness};
use crate::ca_client::{tls_endpoint, CaClient, CaClientError};
use crate::certs::{CertError, CertManager, CertificateProvider, LocalCa};
use crate::config::{CertificateSource, Config, StateSource};
use crate::drain::Drain;
use crate::inpod::InPodManager;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::proxy::{close_denied_on_policy_change, InboundRegistry, ProxyInputs};
use crate::state::{LoadOptions, SharedState, StateError, StateFile};
use crate::xds::{BearerToken, ProxyNode, XdsClient, XdsConfig, XdsError};
use ambit_hbone::pool::{HbonePool, PoolSettings};
use ambit_hbone::workers::Workers;
use ambit_xds_client::token::TokenSource;

/// Why ztunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot load the state file: {0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Certs(#[from] CertError),
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: std::path::PathBuf, source: std::io::Error },
    #[error("{0}")]
    Token(#[from] ambit_xds_client::token::TokenError),
    #[error("controller connection: {0}")]
    Controller(#[from] CaClientError),
    #[error("xds: {0}")]
    Xds(#[from] XdsError),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
    #[error(
        "--hbone-congestion-control {name}: {source} (available: /proc/sys/net/ipv4/tcp_available_congestion_control)"
    )]
    CongestionControl { name: String, source: std::io::Error },
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|source| AppError::Bind { what, addr, source })
}

/// Refuses at startup a congestion control the kernel cannot set, which
/// would otherwise fail every HBONE connection.
fn check_congestion_control(name: Option<&str>) -> Result<(), AppError> {
    let Some(name) = name else { return Ok(()) };
    let err = |source| AppError::CongestionControl { name: name.to_owned(), source };
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(err)?;
    ambit_hbone::set_congestion_control((&probe).into(), Some(name)).map_err(err)
}

/// Runs ztunnel until SIGTERM or SIGINT, then drains (see [`crate::drain`]).
pub async fn run(config: Config, log: Arc<LogControl>) -> Result<(), AppError> {
    let config = Arc::new(config);
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let readiness = Arc::new(Readiness::default());

    // The controller channel (xDS and CA share it), connected lazily so
    // ztunnel starts, and keeps serving, while the controller is away.
    let controller = match &config.controller {
        Some(c) => {
            let read = |what, path: &std::path::Path| {
                std::fs::read_to_string(path).map_err(|source| AppError::Read { what, path: path.to_owned(), source })
            };
            let root = read("the mesh root", &c.mesh_root)?;
            // Read again for every call: the kubelet rotates the projected token.
            let token = TokenSource::file(&c.token_file)?;
            let address = match (&config.state, &config.certificates) {
                (StateSource::Xds(a), _) | (_, CertificateSource::CaService(a)) => a.clone(),
                _ => unreachable!("bug: controller connection without an address"),
            };
            Some((tls_endpoint(&address, &root, &c.server_name)?.connect_lazy(), token))
        }
        None => None,
    };

    let state = Arc::new(SharedState::new(Default::default()));
    match &config.state {
        StateSource::File(path) => {
            let opts = LoadOptions {
                default_trust_domain: config.trust_domain.clone(),
                root_namespace: config.root_namespace.clone(),
            };
            let mut file = StateFile::new(path, opts);
            state.replace(file.poll()?.unwrap_or_default());
            readiness.set_state_loaded();
            tokio::spawn(watch_state(file, state.clone(), metrics.clone(), config.state_poll_interval));
        }
        StateSource::Xds(_) => {
            let (channel, token) = controller.clone().expect("bug: xds without a controller channel");
            let node = ProxyNode {
                node_name: config.node_name.clone(),
                pod_name: config.pod_name.clone(),
                pod_namespace: config.pod_namespace.clone(),
                instance_ip: config.instance_ip,
                cluster_id: config.cluster_id.clone(),
            };
            let xds_config = XdsConfig::new(node, &config.trust_domain);
            let auth = BearerToken::from_source(token).with_node(&config.node_name)?;
            let client = XdsClient::new(channel, auth, xds_config);
            let mut synced = client.synced();
            let (state, metrics, readiness) = (state.clone(), metrics.clone(), readiness.clone());
            tokio::spawn(async move {
                while synced.changed().await.is_ok() {
                    if *synced.borrow() {
                        readiness.set_state_loaded();
                        break;
                    }
                }
            });
            tokio::spawn(client.run(move |new| {
                state.replace(new);
                metrics.state_reloads.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
            }));
        }
    }

    let provider: Arc<dyn CertificateProvider> = match &config.certificates {
        CertificateSource::LocalCa { cert, key } => {
            warn!("development CA: this ztunnel signs workload certificates with a root key read from disk");
            Arc::new(LocalCa::from_files(cert, key, config.cert_ttl)?)
        }
        CertificateSource::CaService(_) => {
            let (channel, token) = controller.expect("bug: CA service without a controller channel");
            Arc::new(CaClient::from_source(channel, token, config.cert_ttl).with_node(&config.node_name)?)
        }
    };
    let certs = CertManager::new(provider, crate::certs::observer(metrics.clone()));
    let pool = HbonePool::new(
        PoolSettings {
            max_streams: config.pool_max_streams,
            max_connections: config.pool_max_connections,
            idle_timeout: config.pool_idle_timeout,
            connect_timeout: config.connect_timeout,
            congestion_control: config.hbone_congestion_control.clone(),
        },
        metrics.pool.clone(),
    );
    check_congestion_control(config.hbone_congestion_control.as_deref())?;
    let workers =
        Arc::new(Workers::start("ztunnel", config.worker_threads, config.busy_poll).map_err(AppError::Workers)?);
    let inbound = Arc::new(InboundRegistry::default());
    let drain = Drain::new();
    tokio::spawn(close_denied_on_policy_change(inbound.clone(), state.clone(), metrics.clone()));
    let inputs = ProxyInputs {
        config: config.clone(),
        state: state.clone(),
        certs: certs.clone(),
        pool: pool.clone(),
        metrics,
        workers,
        inbound,
        drain: drain.watch(),
    };

    let admin_l = bind(config.admin_addr, "admin").await?;
    let metrics_l = bind(config.metrics_addr, "metrics").await?;
    let ready_l = bind(config.readiness_addr, "readiness").await?;
    let pods = Arc::new(Mutex::new(Vec::new()));
    let admin_inputs = Arc::new(AdminInputs { config: config.clone(), state, certs, pods: pods.clone(), log });
    tokio::spawn(admin::serve_admin(admin_l, admin_inputs));
    tokio::spawn(admin::serve_metrics(metrics_l, Arc::new(registry)));
    tokio::spawn(admin::serve_readiness(ready_l, readiness.clone()));
    info!(node = %config.node_name, admin = %config.admin_addr, metrics = %config.metrics_addr, "ztunnel started");

    // Signals are caught from here on, so a second one can cut the drain short.
    let mut signals = Signals::new()?;
    let manager = InPodManager::new(inputs, pods);
    let first_signal = async {
        signals.recv().await;
        readiness.draining.store(true, Ordering::Relaxed);
        info!(drain_timeout = ?config.drain_timeout, "draining: closing the pods' listeners");
    };
    manager.run(&config.zds_socket, readiness.clone(), first_signal).await;
    // Only now, with the listeners closed, do peers learn to go elsewhere:
    // a new connection can then only reach the ztunnel that replaces this one.
    drain.start();
    pool.drain();
    info!(open = drain.active(), "draining: waiting for open connections to finish");
    tokio::select! {
        idle = drain.wait_idle(config.drain_timeout) => match idle {
            true => info!("drained; exiting"),
            false => warn!(open = drain.active(), "drain timeout; exiting with connections still open"),
        },
        () = signals.recv() => warn!(open = drain.active(), "second signal; exiting without draining"),
    }
    Ok(())
}

/// SIGTERM and SIGINT, either of which starts the drain (the first) or ends
/// the process (the second).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, AppError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(AppError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(AppError::Signals)?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

async fn watch_state(mut file: StateFile, state: Arc<SharedState>, metrics: Arc<Metrics>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match file.poll() {
            Ok(Some(new)) => {
                state.replace(new);
                metrics.state_reloads.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
                info!(
                    "state file changed; new state applies to new connections (and closes open inbound ones it denies)"
                );
            }
            Ok(None) => {}
            Err(e) => {
                metrics.state_reloads.get_or_create(&OutcomeLabels { outcome: "failure" }).inc();
                warn!(error = %e, "state file rejected; keeping the previous state");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_congestion_control_is_refused_at_startup_with_its_name() {
        assert!(check_congestion_control(None).is_ok());
        // reno is built into every kernel.
        assert!(check_congestion_control(Some("reno")).is_ok());
        let err = check_congestion_control(Some("nosuchcc")).unwrap_err();
        assert!(matches!(&err, AppError::CongestionControl { name, .. } if name == "nosuchcc"), "{err}");
        assert!(err.to_string().contains("tcp_available_congestion_control"), "{err}");
    }
}
