//! The waypoint's variants in the L7 benchmark ([`crate::bench_l7`]), measured in the same lab run right after the
//! waypoint path, with the same traffic (`wrk`, same settings, `GET /` to `echo`) and compared with that path (the
//! waypoint with an HTTPRoute per port: a path match and a 50/50 split over `echo-a` and `echo-b`):
//!
//! 1. Istio's APIs instead of the HTTPRoutes: a DestinationRule on each of the split's Services (`LEAST_REQUEST`,
//!    outlier detection after 5 consecutive 5xx, 5 s interval, 30 s base ejection) and a VirtualService on `echo`
//!    with the same path match and 50/50 split, with `retries: {attempts: 2, perTryTimeout: 1s}`. The HTTPRoutes
//!    are removed (on the same port an HTTPRoute wins over a VirtualService); the same waypoint process is
//!    reconfigured by the controller, and the run starts once its config dump shows the VirtualService on both of
//!    `echo`'s ports and nothing else (the DestinationRules are in the same file, so in the same snapshot);
//! 2. tracing: the HTTPRoutes back, the waypoint restarted with `--tracing-endpoint` (OTLP over gRPC to a receiver
//!    in the lab, [`crate::otlp`]) and `--tracing-sampling` 1 %, then 100 %; the receiver must have received spans;
//! 3. a control: the waypoint restarted once more as on its own path (HTTPRoutes, no tracing), to show how far the
//!    figures moved between the first run and the last (the machine's noise, a fresh process).
//!
//! Only the maximum rate (closed loop) and the waypoint's CPU seconds per 10,000 requests: no fixed-rate runs. A
//! variant that fails is reported as failed (the others still run); `bench-l7` then exits non-zero.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::bench_l7_setup::{self as l7, BenchOptions, WrkFigures, READY, WP_HOST, WP_VIP};
use crate::check::metric;
use crate::netns::NetNs;
use crate::otlp::OtlpReceiver;
use crate::waypoint::{WaypointArgs, WaypointProcess};
use crate::waypoint_lab::{WaypointMesh, GATEWAY, PROPAGATION};

/// What the variants need of the benchmark's lab.
pub(crate) struct Context<'a> {
    pub lab: &'a WaypointMesh,
    /// The client pod's namespace, where `wrk` runs.
    pub ns: &'a NetNs,
    /// nginx's PID (it must stay alive).
    pub server_pid: u32,
    pub opts: &'a BenchOptions,
}

/// One variant's figures.
#[derive(Clone, Debug, Default)]
pub struct VariantFigures {
    pub wrk: WrkFigures,
    /// CPU seconds of `ambit-waypoint` during the `wrk` run.
    pub cpu_seconds: f64,
    /// Requests the waypoint counted (`istio_requests_total`, 200) during the run.
    pub counted: f64,
    /// What else was seen (spans received, …).
    pub note: String,
    /// When the measured run started and ended (Unix time, ns).
    pub window: std::ops::Range<u64>,
}

/// One variant: its name, its figures or why it could not be measured.
#[derive(Clone, Debug)]
pub struct VariantRow {
    pub name: &'static str,
    pub result: Result<VariantFigures, String>,
}

const ISTIO: &str = "DestinationRule (LEAST_REQUEST, outlier detection) + VirtualService (path match, 50/50, retries)";
const TRACING_1: &str = "HTTPRoute + tracing, 1 % sampled (OTLP/gRPC)";
const TRACING_100: &str = "HTTPRoute + tracing, 100 % sampled (OTLP/gRPC)";
const CONTROL: &str = "HTTPRoute again, waypoint restarted (control)";
/// The file of the Istio objects in the controller's watched directory.
const ISTIO_FILE: &str = "bench-istio.yaml";
/// The VirtualService's name, and its route's in the waypoint's config dump.
const VS_NAME: &str = "echo-vs";
/// Where the OTLP receiver listens, in the waypoint's pod (OTLP/gRPC's usual port).
const OTLP_GRPC: &str = "127.0.0.1:4317";
/// How long to wait for a run's spans at most, and for more once none came for a while (export is batched, every
/// 5 s by default).
const SPANS_WAIT: Duration = Duration::from_secs(30);
const SPANS_QUIET: Duration = Duration::from_secs(11);
/// The HTTPRoutes of [`l7::split_routes`] in the config dump, by port.
const HTTP_ROUTES: [(u64, &str); 2] = [(80, "default/echo-split-h1"), (81, "default/echo-split-h2")];

/// Istio's objects doing the HTTPRoutes' work: a DestinationRule per backend Service and a VirtualService on `echo`
/// with the same path match and split, plus retries. Destinations name no port: Istio's rule (a Service with several
/// ports: the port the request came in on) sends port 80 to 80 and 81 to 81, as the HTTPRoutes do.
fn istio_objects() -> String {
    let rule = |host: &str| {
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}, namespace: default}}
spec:
  host: {host}
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 5s, baseEjectionTime: 30s}}
---
"#
        )
    };
    format!(
        r#"{}{}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {VS_NAME}, namespace: default}}
spec:
  hosts: [echo]
  http:
  - match: [{{uri: {{prefix: /}}}}]
    route:
    - destination: {{host: echo-a}}
      weight: 50
    - destination: {{host: echo-b}}
      weight: 50
    retries: {{attempts: 2, perTryTimeout: 1s}}
"#,
        rule("echo-a"),
        rule("echo-b")
    )
}

/// Measures every variant, starting with `waypoint` (the one of the waypoint path, still running; stopped here).
pub(crate) fn measure(cx: &Context<'_>, waypoint: WaypointProcess) -> Vec<VariantRow> {
    let mut rows = Vec::new();
    eprintln!("measuring the waypoint with a DestinationRule and a VirtualService instead of the HTTPRoutes ...");
    rows.push(VariantRow { name: ISTIO, result: istio(cx, &waypoint).map_err(|e| format!("{e:#}")) });
    // The HTTPRoutes back, whatever happened: the next variants run with them.
    let restored = restore_routes(cx, &waypoint).map_err(|e| format!("restoring the HTTPRoutes: {e:#}"));
    drop(waypoint);
    for (name, percent) in [(TRACING_1, "1"), (TRACING_100, "100")] {
        eprintln!("measuring the waypoint tracing {percent} % of the requests to an OTLP receiver ...");
        let result = restored.clone().and_then(|()| traced(cx, percent).map_err(|e| format!("{e:#}")));
        rows.push(VariantRow { name, result });
    }
    eprintln!("measuring the waypoint restarted as on its own path (control) ...");
    let result = restored.and_then(|()| restarted(cx, &[], &|_| Ok(())).map_err(|e| format!("{e:#}")));
    rows.push(VariantRow { name: CONTROL, result });
    rows
}

/// The Istio variant on the running `waypoint`.
fn istio(cx: &Context<'_>, waypoint: &WaypointProcess) -> anyhow::Result<VariantFigures> {
    let controller = cx.lab.mesh.controller().context("no controller")?;
    controller.write(ISTIO_FILE, &istio_objects())?;
    // The HTTPRoutes removed: on the same port an HTTPRoute wins over a VirtualService.
    cx.lab.declare(&l7::services(true))?;
    let vs = format!("default/{VS_NAME}");
    wait_for_echo_routes(waypoint, "the VirtualService alone on both of echo's ports", |port, routes| {
        HTTP_ROUTES.iter().any(|(p, _)| *p == port) && routes == [vs.as_str()]
    })?;
    l7::wait_http(cx.ns, SocketAddr::from((WP_VIP, 80)), WP_HOST, cx.server_pid)?;
    run_wrk(cx, waypoint)
}

/// Removes the Istio objects and declares the HTTPRoutes again; waits until `waypoint` has them (alone).
fn restore_routes(cx: &Context<'_>, waypoint: &WaypointProcess) -> anyhow::Result<()> {
    let controller = cx.lab.mesh.controller().context("no controller")?;
    if controller.cluster_dir().join(ISTIO_FILE).exists() {
        controller.remove(ISTIO_FILE)?;
    }
    cx.lab.declare(&(l7::services(true) + &l7::split_routes()))?;
    wait_for_echo_routes(waypoint, "the HTTPRoutes alone on echo's ports", |port, routes| {
        HTTP_ROUTES.iter().any(|(p, r)| *p == port && routes == [*r])
    })
}

/// A tracing variant: a waypoint sampling `percent` % of the requests, exporting over OTLP/gRPC to a receiver
/// started for it in the waypoint's pod (as the tracing tests do; a collector Service would be reached over the
/// network instead). Once the run is over, waits for the spans of the measured requests (export is batched) and
/// notes how many came against the number expected (a server and a client span per sampled request); fails if
/// none came.
fn traced(cx: &Context<'_>, percent: &str) -> anyhow::Result<VariantFigures> {
    let receiver = OtlpReceiver::start(&cx.lab.mesh.lab().pod(cx.lab.wp).netns, OTLP_GRPC.parse()?)?;
    let flags = [
        "--tracing-endpoint".to_string(),
        format!("http://{}", receiver.addr()),
        "--tracing-protocol".into(),
        "grpc".into(),
        "--tracing-sampling".into(),
        percent.into(),
    ];
    let share: f64 = percent.parse::<f64>()? / 100.0;
    restarted(cx, &flags, &|v| {
        let expected = 2.0 * share * v.counted;
        let in_run = || receiver.spans().iter().filter(|s| v.window.contains(&s.span.start_time_unix_nano)).count();
        // Until they are all there, or none came for 2 export intervals (5 s each by default).
        let deadline = Instant::now() + SPANS_WAIT;
        let (mut seen, mut changed) = (in_run(), Instant::now());
        while (seen as f64) < 0.99 * expected && Instant::now() < deadline && changed.elapsed() < SPANS_QUIET {
            std::thread::sleep(Duration::from_millis(500));
            let now = in_run();
            if now != seen {
                (seen, changed) = (now, Instant::now());
            }
        }
        if seen == 0 {
            bail!("the receiver got no span of the run's requests (expected about {expected:.0})");
        }
        let all = receiver.spans().len();
        let cpu = receiver_cpu_seconds().map_or_else(|| "?".into(), |c| format!("{c:.2}"));
        v.note = format!(
            "{seen} spans of the run's requests received (2 per sampled request: about {expected:.0} expected), \
             {all} in all; the receiver (a thread of bench-l7) used {cpu} s of CPU in all"
        );
        Ok(())
    })
}

/// CPU seconds of the receiver's thread (`otlp-receiver`, in this process) so far.
fn receiver_cpu_seconds() -> Option<f64> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    tasks.flatten().find_map(|t| {
        let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
        let tid: u32 = t.file_name().to_str()?.parse().ok()?;
        (comm.trim() == "otlp-receiver").then(|| crate::proc_stats::cpu_seconds(tid))
    })
}

/// Starts a fresh waypoint (access log off, as on the waypoint path) with the flags `extra`, waits for the
/// HTTPRoutes and `echo` to answer through it, measures it, then runs `check` on the figures; stops it.
fn restarted(
    cx: &Context<'_>,
    extra: &[String],
    check: &dyn Fn(&mut VariantFigures) -> anyhow::Result<()>,
) -> anyhow::Result<VariantFigures> {
    let mut args = WaypointArgs::for_pod(&cx.lab.mesh, cx.lab.wp)?;
    args.waypoint_name = Some(GATEWAY.into());
    args.access_log = Some(false);
    args.extra = extra.to_vec();
    let waypoint = WaypointProcess::start_ready(&cx.lab.mesh, cx.lab.wp, args, PROPAGATION)
        .with_context(|| format!("the waypoint (with {extra:?}) is ready"))?;
    l7::wait_for_routes(&waypoint)?;
    l7::wait_http(cx.ns, SocketAddr::from((WP_VIP, 80)), WP_HOST, cx.server_pid)?;
    let mut figures = run_wrk(cx, &waypoint)?;
    check(&mut figures)?;
    Ok(figures)
}

/// A warm-up, then one measured `wrk` run through `waypoint`, with its CPU and what it counted.
fn run_wrk(cx: &Context<'_>, waypoint: &WaypointProcess) -> anyhow::Result<VariantFigures> {
    let ok = || -> anyhow::Result<f64> {
        let m = waypoint.metrics()?;
        Ok(metric(&m, "istio_requests_total", &[("reporter", "waypoint"), ("response_code", "200")]))
    };
    let target = SocketAddr::from((WP_VIP, 80));
    l7::warm_up(cx.ns, target, WP_HOST, cx.opts)?;
    let (counted, cpu, started) = (ok()?, waypoint.cpu_seconds(), unix_nanos());
    let wrk = l7::wrk(cx.ns, target, WP_HOST, cx.opts)?;
    let cpu_seconds = waypoint.cpu_seconds() - cpu;
    let window = started..unix_nanos();
    let counted = ok()? - counted;
    if counted < 1.0 {
        bail!("the waypoint counted none of the run's requests: it was not on the path");
    }
    Ok(VariantFigures { wrk, cpu_seconds, counted, note: String::new(), window })
}

fn unix_nanos() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// Polls the waypoint's config dump until every port of `echo` passes `ok(port, route names)`.
fn wait_for_echo_routes(
    waypoint: &WaypointProcess,
    what: &str,
    ok: impl Fn(u64, &[&str]) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY;
    loop {
        let dump = waypoint.config_dump()?;
        let ports = echo_ports(&dump);
        let routes = |p: &serde_json::Value| -> Vec<String> {
            p["routes"].as_array().into_iter().flatten().filter_map(|r| r.as_str().map(str::to_owned)).collect()
        };
        let all_ok = !ports.is_empty()
            && ports.iter().all(|p| {
                let names = routes(p);
                ok(p["port"].as_u64().unwrap_or(0), &names.iter().map(String::as_str).collect::<Vec<_>>())
            });
        if all_ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let seen: Vec<_> = ports.iter().map(|p| (p["port"].clone(), routes(p))).collect();
            bail!("the waypoint's routes of echo: not {what} within {READY:?}: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `echo`'s ports in a waypoint config dump.
fn echo_ports(dump: &serde_json::Value) -> Vec<serde_json::Value> {
    let services = dump["state"]["services"].as_array().cloned().unwrap_or_default();
    let echo = services.into_iter().find(|s| s["hostname"] == WP_HOST);
    echo.and_then(|s| s["ports"].as_array().cloned()).unwrap_or_default()
}

/// Appends the variants' table: each against the waypoint path's figures (`base`, with its CPU seconds).
pub(crate) fn render(variants: &[VariantRow], base: &WrkFigures, base_cpu_seconds: f64, out: &mut String) {
    if variants.is_empty() {
        return;
    }
    let per_10k = |cpu: f64, f: &WrkFigures| if f.requests > 0 { cpu / f.requests as f64 * 10_000.0 } else { 0.0 };
    let base_cpu = per_10k(base_cpu_seconds, base);
    let ratio = |m: f64, b: f64| if b > 0.0 { format!("{:.0} %", 100.0 * m / b) } else { "-".into() };
    out.push_str(
        "\nWaypoint variants (maximum rate, the same wrk runs, after the runs above; ratios to the waypoint path):\n\n\
         | waypoint | requests/s | vs HTTPRoute | p50 (µs) | p99 (µs) | p99 vs HTTPRoute | CPU s per 10k req | \
         CPU vs HTTPRoute |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    out.push_str(&format!(
        "| HTTPRoute: path match, 50/50 split (the waypoint path) | {:.0} | 100 % | {:.0} | {:.0} | 100 % | {base_cpu:.3} \
         | 100 % |\n",
        base.requests_per_sec, base.p50_us, base.p99_us
    ));
    let mut notes = String::new();
    for row in variants {
        match &row.result {
            Ok(v) => {
                let f = &v.wrk;
                let cpu = per_10k(v.cpu_seconds, f);
                out.push_str(&format!(
                    "| {} | {:.0} | {} | {:.0} | {:.0} | {} | {cpu:.3} | {} |\n",
                    row.name,
                    f.requests_per_sec,
                    ratio(f.requests_per_sec, base.requests_per_sec),
                    f.p50_us,
                    f.p99_us,
                    ratio(f.p99_us, base.p99_us),
                    ratio(cpu, base_cpu),
                ));
                notes.push_str(&format!(
                    "{}: CPU {:.2} s, counted {:.0} requests answered 200 (wrk: {}){}{}\n",
                    row.name,
                    v.cpu_seconds,
                    v.counted,
                    f.requests,
                    if v.note.is_empty() { "" } else { "; " },
                    v.note
                ));
            }
            Err(e) => {
                out.push_str(&format!("| {} | failed | | | | | | |\n", row.name));
                notes.push_str(&format!("{}: FAILED: {e}\n", row.name));
            }
        }
    }
    out.push('\n');
    out.push_str(&notes);
}

/// Whether every variant was measured.
pub fn all_measured(variants: &[VariantRow]) -> bool {
    variants.iter().all(|v| v.result.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_objects_name_both_backends_and_the_retries() {
        let y = istio_objects();
        assert_eq!(y.matches("kind: DestinationRule").count(), 2);
        assert!(y.contains("host: echo-a") && y.contains("host: echo-b"), "{y}");
        assert!(y.contains("simple: LEAST_REQUEST") && y.contains("consecutive5xxErrors: 5"), "{y}");
        assert!(y.contains("retries: {attempts: 2, perTryTimeout: 1s}"), "{y}");
    }
}
