//! Running `nft` and `ip` inside a network namespace.
//!
//! Commands run under `nsenter --net=<path>`, which switches only the network
//! namespace; `ip netns exec` would also remount /sys and hide bpffs pins.

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

/// Failure to run a command inside a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The command could not be started (for example `nsenter` is missing).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line, for the operator.
        command: String,
        /// Why it could not be started.
        source: std::io::Error,
    },
    /// The command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line, for the operator.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
}

impl ExecError {
    /// The failed command's standard error, empty when it did not start.
    pub fn stderr(&self) -> &str {
        match self {
            ExecError::Spawn { .. } => "",
            ExecError::Failed { stderr, .. } => stderr,
        }
    }
}

/// Runs `program args..` inside the network namespace at `netns`, feeding it
/// `stdin`, and returns its standard output.
pub(super) fn run_in_netns(
    netns: &Path,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, ExecError> {
    let mut net_arg = std::ffi::OsString::from("--net=");
    net_arg.push(netns);
    let command = format!("nsenter --net={} {program} {}", netns.display(), args.join(" "));
    let spawn_err = |source| ExecError::Spawn { command: command.clone(), source };

    let mut child = Command::new("nsenter")
        .arg(&net_arg)
        .arg(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    // The pipe is taken so that it closes (EOF for `nft -f -`) before we wait.
    // A write error is reported only if the command then succeeds: a command
    // that fails early closes its stdin, and its stderr says more than EPIPE.
    let written = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => pipe.write_all(input.as_bytes()),
        (Some(_), None) => Err(std::io::Error::other("bug: stdin not piped")),
        (None, _) => Ok(()),
    };
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(ExecError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    written.map_err(spawn_err)?;
    tracing::debug!(%command, "ran in network namespace");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_the_command_and_its_stderr() {
        let err = run_in_netns(Path::new("/nonexistent-netns"), "ip", &["link"], None)
            .expect_err("entering a missing namespace must fail");
        let text = err.to_string();
        assert!(text.contains("nsenter --net=/nonexistent-netns ip link"), "{text}");
        assert!(!err.stderr().is_empty(), "{text}");
    }
}
