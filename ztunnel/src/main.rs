use std::sync::Arc;

use clap::Parser;
use ztunnel::config::{Args, Config, LogFormat};

/// The data path allocates 128 KiB read buffers and frees them on other
/// threads; glibc would mmap/munmap each (a page fault per 4 KiB). Keep them
/// in the heap instead, and trim only large idle excess.
fn tune_malloc() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Every proxied connection holds two sockets: lift the soft limit on open
/// files to the hard limit.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    tune_malloc();
    raise_open_files_limit();
    let config = match Config::from_args(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ztunnel: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("ztunnel: invalid configuration: {e}");
        std::process::exit(2);
    }
    let format = match config.log_format {
        LogFormat::Json => ambit_telemetry::LogFormat::Json,
        LogFormat::Plain => ambit_telemetry::LogFormat::Plain,
    };
    let log = match ambit_telemetry::init_logging(format) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            eprintln!("ztunnel: {e}");
            std::process::exit(2);
        }
    };
    // The control plane (ZDS, xDS, certificates, admin) runs on this thread;
    // connections run on the data-plane workers (`ztunnel::workers`).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| {
        eprintln!("ztunnel: cannot start the runtime: {e}");
        std::process::exit(1);
    });
    if let Err(e) = runtime.block_on(ztunnel::app::run(config, log)) {
        eprintln!("ztunnel: {e}");
        std::process::exit(1);
    }
    // Drained: exit now rather than wait in the runtime's drop for tasks
    // (controller streams, connections cut by the drain timeout) to unwind.
    std::process::exit(0);
}
