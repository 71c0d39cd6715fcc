//! `ambit-waypoint`: see [`ambit_waypoint::app`].

use std::sync::Arc;

use ambit_waypoint::flags::Flags;
use clap::Parser;

fn main() {
    let flags = Flags::parse();
    let format = match flags.log_format.as_str() {
        "json" => ambit_telemetry::LogFormat::Json,
        "plain" => ambit_telemetry::LogFormat::Plain,
        other => {
            eprintln!("ambit-waypoint: invalid --log-format {other:?}: expected plain or json");
            std::process::exit(2);
        }
    };
    let log = match ambit_telemetry::init_logging(format) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            eprintln!("ambit-waypoint: {e}");
            std::process::exit(2);
        }
    };
    let mut builder = match flags.worker_threads {
        0 => {
            eprintln!("ambit-waypoint: --worker-threads must be at least 1");
            std::process::exit(2);
        }
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let runtime = builder.enable_all().build().unwrap_or_else(|e| {
        eprintln!("ambit-waypoint: cannot start the runtime: {e}");
        std::process::exit(1);
    });
    if let Err(e) = runtime.block_on(ambit_waypoint::app::run(flags, log)) {
        eprintln!("ambit-waypoint: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}
