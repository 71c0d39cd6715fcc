//! `ambit-node-agent`: see `ambit_cni::agent::app`.

use ambit_cni::agent::app::{self, Args};
use clap::Parser;

fn main() {
    let args = Args::parse();
    let log = match ambit_telemetry::init_logging(ambit_telemetry::LogFormat::Plain) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ambit-node-agent: {e}");
            std::process::exit(2);
        }
    };
    if let Some(level) = &args.log_level {
        if let Err(e) = log.set(level) {
            eprintln!("ambit-node-agent: invalid configuration: --log-level: {e}");
            std::process::exit(2);
        }
    }
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap_or_else(|e| {
            eprintln!("ambit-node-agent: cannot start the runtime: {e}");
            std::process::exit(1);
        });
    if let Err(e) = runtime.block_on(app::run(args, ambit_telemetry::shutdown_signal())) {
        eprintln!("ambit-node-agent: {e}");
        std::process::exit(1);
    }
}
