//! `ambit-cni`: Ambit's chained CNI plugin. The runtime runs it with the
//! `CNI_*` environment and the network configuration on stdin; see
//! `ambit_cni::plugin`.

use std::io::{Read, Write};

use ambit_cni::plugin::{self, config::CniEnv, error::CniError};

fn main() {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let version = plugin::answer_version(&stdin);
    let result = match read {
        Ok(_) => run(&stdin),
        Err(e) => Err(CniError::new(plugin::error::code::IO, "cannot read stdin", e)),
    };
    let mut out = std::io::stdout().lock();
    let code = match result {
        Ok(Some(json)) => {
            let _ = writeln!(out, "{json}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            tracing::error!(code = e.code, msg = %e.msg, details = %e.details, "CNI command failed");
            let _ = writeln!(out, "{}", e.to_json(&version));
            1
        }
    };
    let _ = out.flush();
    std::process::exit(code);
}

fn run(stdin: &[u8]) -> Result<Option<serde_json::Value>, CniError> {
    init_logging(stdin);
    let env = CniEnv::from_vars(|k| std::env::var(k).ok());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(plugin::error::code::IO, "cannot start the async runtime", e))?;
    runtime.block_on(plugin::run(&env, stdin))
}

/// Logs go to stderr (stdout is the CNI result), at the config's `log_level`.
fn init_logging(stdin: &[u8]) {
    let level = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("log_level")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&level).unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
}
