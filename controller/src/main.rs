use ambit_controller::config::{Args, Config};
use clap::Parser;

fn main() {
    let config = Config::from_args(Args::parse());
    if let Err(e) = config.validate() {
        eprintln!("ambit-controller: invalid configuration: {e}");
        std::process::exit(2);
    }
    if let Err(e) = ambit_telemetry::init_logging(ambit_telemetry::LogFormat::Plain) {
        eprintln!("ambit-controller: {e}");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap_or_else(|e| {
        eprintln!("ambit-controller: cannot start the runtime: {e}");
        std::process::exit(1);
    });
    if let Err(e) = runtime.block_on(ambit_controller::app::run(config)) {
        eprintln!("ambit-controller: {e}");
        std::process::exit(1);
    }
}
