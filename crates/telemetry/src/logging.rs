//! Logging: `tracing` to stderr, plain or JSON, with the filter taken from
//! `RUST_LOG` (default `info`) and changeable at run time.

use std::io::IsTerminal;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Why logging could not start or a level was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log level {directives:?}: {message}")]
    BadLevel { directives: String, message: String },
    #[error("bug: cannot reload the log filter: {0}")]
    Reload(String),
}

/// Changes the log filter at run time (`RUST_LOG` syntax).
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl LogControl {
    /// Sets the filter, e.g. `debug` or `info,ztunnel::proxy=debug`.
    pub fn set(&self, directives: &str) -> Result<(), LogError> {
        let filter = parse(directives)?;
        self.handle.reload(filter).map_err(|e| LogError::Reload(e.to_string()))?;
        *self.current.lock().expect("bug: poisoned log level") = directives.to_owned();
        Ok(())
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current.lock().expect("bug: poisoned log level").clone()
    }
}

fn parse(directives: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(directives)
        .map_err(|e| LogError::BadLevel { directives: directives.to_owned(), message: e.to_string() })
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init_logging(format: LogFormat) -> Result<LogControl, LogError> {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let (filter, handle) = reload::Layer::new(parse(&directives)?);
    let registry = tracing_subscriber::registry().with(filter);
    // Colour codes only for a person at a terminal, never in collected logs.
    let layer =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => registry.with(layer.json()).init(),
        LogFormat::Plain => registry.with(layer).init(),
    }
    Ok(LogControl { handle, current: Mutex::new(directives) })
}
