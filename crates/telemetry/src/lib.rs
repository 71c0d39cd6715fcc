//! Telemetry shared by Ambit's processes: `tracing` logging whose level can
//! change at run time, and the small HTTP endpoints every process serves
//! (Prometheus metrics, admin, readiness), and the shared metric label value.

pub mod http;
pub mod label;
pub mod logging;

pub use http::{logging_endpoint, serve, serve_metrics, text, Body};
pub use label::Value;
pub use logging::{init_logging, LogControl, LogError, LogFormat};

/// Resolves on SIGTERM or SIGINT: how every Ambit process is asked to stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
