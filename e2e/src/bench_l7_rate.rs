//! The fixed-rate runs of the L7 benchmark: open-loop load at a set request rate from `oha` (`-q RATE
//! --latency-correction`, so a slow response does not hold back the next request and its wait is counted, not
//! omitted), `POST` of a 1 KiB body answered with 1 KiB, over HTTP/1.1 (kept-alive connections) or HTTP/2 (prior
//! knowledge, streams multiplexed on a few connections). Figures: the achieved rate and the latency p50 / p99 /
//! p99.9. A leaf: [`crate::bench_l7`] runs these along its paths.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::netns::NetNs;

/// The request rates measured on every path.
pub const RATES: [u32; 2] = [1_000, 5_000];
/// The path the load asks for: nginx answers it with [`BODY_BYTES`] bytes.
pub const PATH: &str = "/1k";
/// The size of each request body and each response body.
pub const BODY_BYTES: usize = 1024;

/// How the load generator speaks to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 over [`H1_CONNECTIONS`] kept-alive connections.
    Http1,
    /// HTTP/2 with prior knowledge, [`H2_CONNECTIONS`] connections × [`H2_STREAMS`] streams.
    Http2,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1",
            Protocol::Http2 => "HTTP/2",
        }
    }
}

/// A client certificate for `oha` (mutual TLS to the target).
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Enough concurrency that a few ms of latency at 5,000 req/s never makes the generator wait for a free worker.
const H1_CONNECTIONS: usize = 64;
const H2_CONNECTIONS: usize = 4;
const H2_STREAMS: usize = 16;

/// What one fixed-rate run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateFigures {
    pub achieved_rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub requests: u64,
    /// Responses other than 200, plus transport errors.
    pub errors: u64,
}

/// Checks that `oha` is installed; the error says how to install it.
pub fn require_oha() -> anyhow::Result<()> {
    match Command::new("oha").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => Ok(()),
        _ => bail!("oha not found in PATH: install it with `cargo install --locked oha@1.16.0` (README, bench-l7)"),
    }
}

/// Writes the request body file (`BODY_BYTES` bytes) into `dir`; its path.
pub fn write_body(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("body-1k");
    std::fs::write(&path, vec![b'x'; BODY_BYTES]).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// Runs `oha` in `ns` at `rate` requests per second for `duration` against `http://addr/1k` with `Host: host` (with
/// `tls`, `https://`, presenting that certificate; the server's is not verified: its cost is the client's, not the
/// proxy's); fails on any error or non-200 response.
#[allow(clippy::too_many_arguments)]
pub fn run(
    ns: &NetNs,
    addr: SocketAddr,
    host: &str,
    protocol: Protocol,
    tls: Option<&ClientCert>,
    rate: u32,
    duration: Duration,
    body: &Path,
) -> anyhow::Result<RateFigures> {
    let mut cmd = ns.command("oha");
    // -w: a request in flight at the deadline is completed, not counted as an error.
    cmd.args(["--no-tui", "--output-format", "json", "--latency-correction", "-w", "-t", "5s", "-m", "POST"]);
    cmd.args(["-q", &rate.to_string(), "-z", &format!("{}s", duration.as_secs().max(1))]);
    // The URL names `host`, resolved to `addr` by --connect-to: over HTTP/2 a --host header would come beside
    // `:authority`, which servers refuse as a duplicate Host.
    let port = addr.port();
    cmd.args(["--connect-to", &format!("{host}:{port}:{}:{port}", addr.ip())]);
    cmd.args(["-T", "application/octet-stream", "-D"]).arg(body);
    match protocol {
        Protocol::Http1 => cmd.args(["-c", &H1_CONNECTIONS.to_string()]),
        Protocol::Http2 => cmd.args(["--http2", "-c", &H2_CONNECTIONS.to_string(), "-p", &H2_STREAMS.to_string()]),
    };
    let scheme = match tls {
        Some(c) => {
            cmd.args(["--insecure", "--cert"]).arg(&c.cert).arg("--key").arg(&c.key);
            "https"
        }
        None => "http",
    };
    cmd.arg(format!("{scheme}://{host}:{port}{PATH}"));
    let what = format!("oha {} at {rate}/s to {addr}", protocol.name());
    let out = run_bounded(cmd, duration + Duration::from_secs(30), &what)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let f = parse(&text).with_context(|| format!("{what}: output:\n{text}"))?;
    if f.errors > 0 || f.requests == 0 {
        bail!("{what}: {} errors in {} requests:\n{text}", f.errors, f.requests);
    }
    Ok(f)
}

/// Parses `oha --output-format json`.
pub fn parse(json: &str) -> anyhow::Result<RateFigures> {
    let v: Value = serde_json::from_str(json).context("oha's JSON")?;
    let seconds = |p: &str| -> anyhow::Result<f64> {
        v["latencyPercentiles"][p].as_f64().with_context(|| format!("latencyPercentiles.{p}"))
    };
    // "aborted due to deadline" counts the workers still waiting for their turn when the run ends (over HTTP/2,
    // where requests in flight are completed; over HTTP/1.1 `-w` completes them): no request was sent or failed.
    let count = |o: &Value| {
        o.as_object().map_or(0, |m| {
            m.iter().filter(|(k, _)| *k != "aborted due to deadline").filter_map(|(_, v)| v.as_u64()).sum::<u64>()
        })
    };
    let statuses = &v["statusCodeDistribution"];
    let ok = statuses["200"].as_u64().unwrap_or(0);
    let responses = count(statuses);
    Ok(RateFigures {
        achieved_rps: v["summary"]["requestsPerSec"].as_f64().context("summary.requestsPerSec")?,
        p50_us: seconds("p50")? * 1e6,
        p99_us: seconds("p99")? * 1e6,
        p999_us: seconds("p99.9")? * 1e6,
        requests: responses,
        errors: responses - ok + count(&v["errorDistribution"]),
    })
}

/// Runs `cmd` to completion, killing it (by its PID) if it is still running after `limit`; fails when it exits
/// unsuccessfully. `what` names it in errors.
pub fn run_bounded(mut cmd: Command, limit: Duration, what: &str) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {what}"))?;
    let deadline = Instant::now() + limit;
    // The output pipes are read only at the end: both tools write a summary well under a pipe's capacity.
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what}: still running after {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        bail!("{what}: {}: {stdout}{stderr}", out.status);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_oha_json_and_counts_non_200_and_errors() {
        let json = r#"{"summary": {"requestsPerSec": 999.5, "successRate": 1.0},
            "latencyPercentiles": {"p50": 0.000412, "p99": 0.0011, "p99.9": 0.0031},
            "statusCodeDistribution": {"200": 9990, "503": 3},
            "errorDistribution": {"connection closed": 2, "aborted due to deadline": 64}}"#;
        let f = parse(json).unwrap();
        assert_eq!((f.requests, f.errors), (9993, 5));
        assert!((f.achieved_rps - 999.5).abs() < 1e-9);
        assert!((f.p50_us - 412.0).abs() < 1e-6 && (f.p99_us - 1100.0).abs() < 1e-6, "{f:?}");
        assert!((f.p999_us - 3100.0).abs() < 1e-6);
        assert!(parse("{}").is_err());
        assert!(parse("not json").is_err());
    }
}
