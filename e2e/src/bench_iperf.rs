//! iperf3 (Debian's package) as a second opinion on bench-l4's throughput:
//! the same pods and path, measured by a load generator that is not ours.
//! The server runs for one test (`-1`) in the server pod; the client's
//! JSON report gives what the server received.

use std::net::IpAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::netns::NetNs;

/// iperf3's figures for one path.
#[derive(Clone, Copy, Debug, Default)]
pub struct IperfFigures {
    pub single_stream_gbps: f64,
    pub four_stream_gbps: f64,
}

/// The TCP port of iperf3's server (its control and data connections); the
/// caller adds an offset per path, as for the other servers.
pub const IPERF_PORT: u16 = 9303;

/// Fails with the package to install when iperf3 is missing.
pub fn require() -> anyhow::Result<()> {
    let found = std::process::Command::new("iperf3").arg("--version").stdout(Stdio::null()).status();
    match found {
        Ok(s) if s.success() => Ok(()),
        _ => anyhow::bail!("bench-l4 needs iperf3 (apt-get install iperf3, or scripts/install-deps.sh)"),
    }
}

/// One and four streams from `client` to `addr:port` in `server`, `d` each.
pub fn measure(client: &NetNs, server: &NetNs, addr: IpAddr, port: u16, d: Duration) -> anyhow::Result<IperfFigures> {
    Ok(IperfFigures {
        single_stream_gbps: run(client, server, addr, port, 1, d).context("iperf3, one stream")?,
        four_stream_gbps: run(client, server, addr, port, 4, d).context("iperf3, four streams")?,
    })
}

/// Kills the one-test server by PID if the client failed before ending it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn run(client: &NetNs, server: &NetNs, addr: IpAddr, port: u16, streams: usize, d: Duration) -> anyhow::Result<f64> {
    let port = port.to_string();
    let _server = Server(
        server
            .command("iperf3")
            .args(["-s", "-1", "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start iperf3 -s")?,
    );
    let (addr, streams, secs) = (addr.to_string(), streams.to_string(), d.as_secs().max(1).to_string());
    // Until the server listens, the client's connection is refused and it exits at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = client
            .command("iperf3")
            .args(["-c", &addr, "-p", &port, "-P", &streams, "-t", &secs, "-J"])
            .stdin(Stdio::null())
            .output()
            .context("run iperf3 -c")?;
        if out.status.success() {
            return received_gbps(&out.stdout);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains("Connection refused") || Instant::now() > deadline {
            anyhow::bail!("iperf3 -c failed ({}): {text}", out.status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Gbit/s the server received, from the client's JSON report.
fn received_gbps(json: &[u8]) -> anyhow::Result<f64> {
    let v: serde_json::Value = serde_json::from_slice(json).context("iperf3's JSON report")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received.bits_per_second (error: {})", v["error"]))?;
    Ok(bps / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_gives_what_the_server_received() {
        let json = br#"{"end":{"sum_sent":{"bits_per_second":9.9e9},"sum_received":{"bits_per_second":8.5e9}}}"#;
        assert_eq!(received_gbps(json).unwrap(), 8.5);
        assert!(received_gbps(br#"{"error":"unable to connect"}"#).is_err());
    }
}
