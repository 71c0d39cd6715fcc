use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter};
use ztunnel::admin::LogControl;
use ztunnel::config::{Args, Config, LogFormat};

fn main() {
    let config = Config::from_args(Args::parse());
    if let Err(e) = config.validate() {
        eprintln!("ztunnel: invalid configuration: {e}");
        std::process::exit(2);
    }
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("ztunnel: invalid RUST_LOG {directives:?}: {e}");
        std::process::exit(2);
    });
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json()).init(),
        LogFormat::Plain => registry.with(tracing_subscriber::fmt::layer()).init(),
    }
    let log = Arc::new(LogControl::new(handle, directives));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("ztunnel: cannot start the runtime: {e}");
            std::process::exit(1);
        });
    if let Err(e) = runtime.block_on(ztunnel::app::run(config, log)) {
        eprintln!("ztunnel: {e}");
        std::process::exit(1);
    }
}
