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

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Parses `RUST_LOG` directives, refusing what is almost surely a typo: `EnvFilter` reads a bare word that is
/// not a level (`debgu`) as "everything from target `debgu`", so a mistyped level would be accepted and change
/// nothing. A bare word must be a level; a target needs `target=level`.
fn parse(directives: &str) -> Result<EnvFilter, LogError> {
    let bad = |message: String| LogError::BadLevel { directives: directives.to_owned(), message };
    for d in directives.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !d.contains('=') && !d.contains('[') && !LEVELS.iter().any(|l| d.eq_ignore_ascii_case(l)) {
            return Err(bad(format!("{d:?} is not a level ({}); for a target write {d}=<level>", LEVELS.join(", "))));
        }
    }
    EnvFilter::try_new(directives).map_err(|e| bad(e.to_string()))
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

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn levels_and_target_directives_parse() {
        for ok in ["info", "DEBUG", "warn,ztunnel::proxy=debug", "ztunnel=trace", "off", "info,h2=warn,"] {
            assert!(parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn a_mistyped_level_is_refused_with_a_hint() {
        let e = parse("debgu").unwrap_err().to_string();
        assert!(e.contains("debgu") && e.contains("not a level") && e.contains("debgu=<level>"), "{e}");
        assert!(parse("info,wran").is_err());
        assert!(parse("ztunnel=lots").is_err(), "EnvFilter's own checks still apply");
    }
}
