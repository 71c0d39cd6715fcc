//! Small helpers the end-to-end tests share: echo round trips, waiting for a
//! condition that ztunnel applies asynchronously, and reading metrics.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::apps::connect;
use crate::netns::NetNs;

/// Connect and read timeout of the helpers.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `msg` on `s` and reads it back; an error if the connection is
/// reset or closed early, or the echo differs.
pub fn echo_on(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// [`echo_on`] a new connection from `ns` to `addr`.
pub fn round_trip(ns: &NetNs, addr: SocketAddr, msg: &[u8]) -> std::io::Result<()> {
    echo_on(&mut connect(ns, addr, TIMEOUT)?, msg)
}

/// Retries `f` until it returns true or `within` passes (for changes that
/// ztunnel applies on its next state poll).
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sum of the samples of metric `name` (Prometheus text) whose labels
/// include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `f` every 200 ms until it yields a value; panics after `timeout`
/// with `what` (and the last error, if any).
pub fn poll_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(Some(v)) => return v,
            Ok(None) | Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Ok(None) => panic!("timed out waiting for {what}"),
            Err(e) => panic!("timed out waiting for {what}: {e:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_the_samples_whose_labels_match() {
        let text =
            "a_total{x=\"1\",y=\"2\"} 3\na_total{x=\"1\",y=\"3\"} 4\nab_total{x=\"1\"} 100\n# a_total{x=\"1\"} 9\n";
        assert_eq!(metric(text, "a_total", &[("x", "1")]), 7.0);
        assert_eq!(metric(text, "a_total", &[("y", "3")]), 4.0);
        assert_eq!(metric(text, "a_total", &[("x", "2")]), 0.0);
    }
}
