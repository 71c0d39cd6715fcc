//! bench-l7's lab configuration and load: the options, the Services and routes of the paths (their ports and
//! addresses), waiting for servers and routes, and `wrk` (run and parsed). The measuring modules
//! ([`crate::bench_l7`], [`crate::bench_l7_variants`]) build on it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench_l7_rate as rate;
use crate::netns::NetNs;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// How long `wrk` runs per path.
    pub duration: Duration,
    /// `wrk -t`.
    pub threads: usize,
    /// `wrk -c`.
    pub connections: usize,
    /// How long each fixed-rate run lasts; zero skips them.
    pub rate_duration: Duration,
    /// Whether to measure the waypoint's variants too (Istio config, tracing; [`crate::bench_l7_variants`]).
    pub variants: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            duration: Duration::from_secs(10),
            threads: 2,
            connections: 16,
            rate_duration: Duration::from_secs(10),
            variants: true,
        }
    }
}

/// What `wrk` reported for one path.
#[derive(Clone, Debug, Default)]
pub struct WrkFigures {
    pub requests_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    /// Non-2xx/3xx responses plus socket errors.
    pub errors: u64,
}

/// The port nginx listens on for each path: direct, HAProxy's backend, mesh L4, waypoint.
pub(crate) const DIRECT_PORT: u16 = 8080;
pub(crate) const HAPROXY_BACKEND_PORT: u16 = 8081;
pub(crate) const L4_PORT: u16 = 8082;
pub(crate) const WAYPOINT_PORT: u16 = 8083;
/// The same four, speaking h2c (HTTP/2 with prior knowledge).
pub(crate) const DIRECT_H2_PORT: u16 = 8084;
pub(crate) const HAPROXY_BACKEND_H2_PORT: u16 = 8085;
pub(crate) const L4_H2_PORT: u16 = 8086;
pub(crate) const WAYPOINT_H2_PORT: u16 = 8087;
pub(crate) const HAPROXY_PORT: u16 = 8090;
pub(crate) const HAPROXY_H2_PORT: u16 = 8091;
/// The Services' port for HTTP/2 (declared `kubernetes.io/h2c`, so the waypoint speaks HTTP/2 both ways).
pub(crate) const H2_SERVICE_PORT: u16 = 81;
/// Path names in the report.
pub(crate) const DIRECT: &str = "direct (not enrolled)";
pub(crate) const HAPROXY: &str = "HAProxy mode http, mutual TLS (no mesh)";
pub(crate) const MESH_L4: &str = "mesh L4 (2 ztunnels, HBONE)";
pub(crate) const WAYPOINT: &str = "waypoint (ztunnel → ambit-waypoint → ztunnel)";
pub(crate) const WP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub(crate) const L4_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
pub(crate) const WP_HOST: &str = "echo.default.svc.cluster.local";
pub(crate) const L4_HOST: &str = "echo-l4.default.svc.cluster.local";
/// How long a server, proxy or route may take to answer for the first time.
pub(crate) const READY: Duration = Duration::from_secs(20);

/// `echo-l4` (no waypoint), backed by the pod `server`; with `waypoint`, also `echo` (uses the waypoint) and the
/// backends of its split, `echo-a` and `echo-b`, backed by the same pod (no route: see [`split_routes`]). `echo` is
/// declared only after the mesh L4 run: once a waypoint serves the pod, its ztunnel refuses whoever is not that
/// waypoint (Istio's implicit allow-from-waypoint policy), `echo-l4`'s clients included.
pub(crate) fn services(waypoint: bool) -> String {
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: echo-l4, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {L4_VIP}
  selector: {{app: server}}
  ports:
  - {{name: http, port: 80, targetPort: {L4_PORT}, protocol: TCP}}
  - {{name: http2, port: {H2_SERVICE_PORT}, targetPort: {L4_H2_PORT}, protocol: TCP, appProtocol: kubernetes.io/h2c}}
"#
    );
    if waypoint {
        // `echo` and the two backends of its routes' split, all on the same pod and ports.
        for (name, labels, ip) in [
            ("echo", "{istio.io/use-waypoint: waypoint}", format!("clusterIP: {WP_VIP}")),
            ("echo-a", "{}", String::new()),
            ("echo-b", "{}", String::new()),
        ] {
            yaml.push_str(&format!(
                r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, labels: {labels}}}
spec:
  type: ClusterIP
  {ip}
  selector: {{app: server}}
  ports:
  - {{name: http, port: 80, targetPort: {WAYPOINT_PORT}, protocol: TCP}}
  - {{name: http2, port: {H2_SERVICE_PORT}, targetPort: {WAYPOINT_H2_PORT}, protocol: TCP, appProtocol: kubernetes.io/h2c}}
"#
            ));
        }
    }
    yaml
}

/// The routes of `echo`, one per port: a path match and a 50/50 split over `echo-a` and `echo-b` (the same pod), the
/// L7 work HAProxy's configuration repeats.
pub(crate) fn split_routes() -> String {
    [("h1", 80), ("h2", H2_SERVICE_PORT)]
        .map(|(name, port)| {
            format!(
                r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo-split-{name}, namespace: default}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, port: {port}}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /}}}}]
    backendRefs: [{{name: echo-a, port: {port}, weight: 50}}, {{name: echo-b, port: {port}, weight: 50}}]
"#
            )
        })
        .concat()
}

/// Polls the waypoint's config dump until both of [`split_routes`] are in it.
pub(crate) fn wait_for_routes(waypoint: &crate::waypoint::WaypointProcess) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY;
    loop {
        let dump = waypoint.config_dump()?.to_string();
        if ["default/echo-split-h1", "default/echo-split-h2"].iter().all(|r| dump.contains(r)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the waypoint did not get echo's routes within {READY:?}: {dump}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `addr` from `ns` until it accepts a TCP connection (the server `pid` must stay alive).
pub(crate) fn wait_tcp(ns: &NetNs, addr: SocketAddr, pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY;
    loop {
        match crate::apps::connect(ns, addr, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(_) if !Path::new(&format!("/proc/{pid}")).exists() => bail!("the server (pid {pid}) is gone"),
            Err(e) if Instant::now() >= deadline => bail!("{addr} not accepting within {READY:?}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Polls `GET /` with `Host: host` at `addr` from `ns` until it answers 200 (the server `pid` must stay alive).
pub(crate) fn wait_http(ns: &NetNs, addr: SocketAddr, host: &str, pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY;
    loop {
        let last = match crate::http::HttpConnection::connect(ns, addr, Duration::from_secs(2))
            .and_then(|mut c| c.send(&crate::http::Request::get(host, "/").close()))
        {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => format!("status {}: {}", r.status, r.body.trim()),
            Err(e) => format!("{e:#}"),
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("the server (pid {pid}) is gone while waiting for {addr}");
        }
        if Instant::now() >= deadline {
            bail!("http://{addr}/ (Host {host}) not answering 200 within {READY:?}: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where `wrk` sends its load: `http://addr/`, or with `tls` `https://addr/` (wrk cannot present a client
/// certificate: TLS without one).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Url {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: bool,
}

impl From<SocketAddr> for Url {
    fn from(addr: SocketAddr) -> Self {
        Url { addr, tls: false }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}/", if self.tls { "https" } else { "http" }, self.addr)
    }
}

/// A 1 s `wrk` run, not measured: connections, pools and caches warm up.
pub(crate) fn warm_up(ns: &NetNs, url: impl Into<Url>, host: &str, opts: &BenchOptions) -> anyhow::Result<()> {
    run_wrk(ns, url.into(), host, opts, Duration::from_secs(1)).map(drop)
}

/// Runs `wrk` in `ns` against `url` with `Host: host`; its figures. Fails on any error response or socket error. wrk
/// is killed (by its PID) if it runs 30 s past its duration.
pub(crate) fn wrk(ns: &NetNs, url: impl Into<Url>, host: &str, opts: &BenchOptions) -> anyhow::Result<WrkFigures> {
    let url = url.into();
    let text = run_wrk(ns, url, host, opts, opts.duration)?;
    let f = parse_wrk(&text).with_context(|| format!("wrk output:\n{text}"))?;
    if f.errors > 0 || f.requests == 0 {
        bail!("wrk to {url}: {} errors in {} requests:\n{text}", f.errors, f.requests);
    }
    Ok(f)
}

pub(crate) fn run_wrk(ns: &NetNs, url: Url, host: &str, opts: &BenchOptions, d: Duration) -> anyhow::Result<String> {
    let mut cmd = ns.command("wrk");
    cmd.args([
        format!("-t{}", opts.threads),
        format!("-c{}", opts.connections),
        format!("-d{}s", d.as_secs().max(1)),
        "--timeout".into(),
        "5s".into(),
        "--latency".into(),
        "-H".into(),
        format!("Host: {host}"),
        url.to_string(),
    ]);
    let out = rate::run_bounded(cmd, d + Duration::from_secs(30), &format!("wrk to {url}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(text)
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(text: &str) -> anyhow::Result<WrkFigures> {
    let mut f = WrkFigures::default();
    let mut in_dist = false;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            match words.as_slice() {
                ["50%", v] => f.p50_us = duration_us(v)?,
                ["99%", v] => f.p99_us = duration_us(v)?,
                [p, _] if p.ends_with('%') => {}
                _ => in_dist = false,
            }
        }
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            f.requests_per_sec = v.trim().parse().context("Requests/sec")?;
        } else if line.contains(" requests in ") {
            f.requests = words.first().context("requests")?.parse().context("requests")?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            f.errors += v.trim().parse::<u64>().context("non-2xx")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            for part in v.split(',') {
                f.errors += part.split_whitespace().last().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    if f.requests_per_sec == 0.0 || f.p50_us == 0.0 || f.p99_us == 0.0 {
        bail!("no Requests/sec or latency distribution in wrk's output");
    }
    Ok(f)
}

/// `123.45us`, `1.23ms`, `1.00s`, `2.00m` in µs.
pub(crate) fn duration_us(v: &str) -> anyhow::Result<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic()).with_context(|| format!("no unit in {v}"))?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().with_context(|| format!("latency {v}"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("unit {unit} in {v}"),
    };
    Ok(n * scale)
}
