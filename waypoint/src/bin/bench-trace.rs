//! Benchmark: what tracing adds to one request on the waypoint's path — the
//! server span, one client span, the trace headers written, both ended — at
//! each sampling rate and for each kind of incoming context, against the
//! same request handled with tracing off, in one run. Spans go to a provider
//! without exporter (the batch export runs off the request path; `bench-l7`
//! measures the whole). Usage: `bench-trace [requests-per-figure]`.

use std::time::{Duration, Instant};

use ambit_waypoint::metrics::{RequestProtocol, RequestRecord, ServiceLabels, WorkloadLabels};
use ambit_waypoint::retry::Outcome;
use ambit_waypoint::target::ServiceTarget;
use ambit_waypoint::trace::{client_end, sampler, server_end, ProxyInfo, Tracing};
use http::{HeaderValue, Request, Response};
use opentelemetry_sdk::trace::SdkTracerProvider;

const TRACEPARENT_SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACEPARENT_UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

const HOST: &str = "echo.default.svc.cluster.local";

fn main() {
    let n: u32 = std::env::args().nth(1).map_or(200_000, |s| s.parse().expect("requests-per-figure: a number"));
    let provider = SdkTracerProvider::builder().with_sampler(sampler()).build();
    let tracer = |percent| Tracing::new(&provider, percent, proxy());
    let cases: [(&str, Option<Tracing>, Option<&'static str>); 6] = [
        ("tracing off", None, None),
        ("new trace, 0 % sampled", Some(tracer(0.0)), None),
        ("new trace, 1 % sampled", Some(tracer(1.0)), None),
        ("new trace, 100 % sampled", Some(tracer(100.0)), None),
        ("caller's W3C context, not sampled", Some(tracer(1.0)), Some(TRACEPARENT_UNSAMPLED)),
        ("caller's W3C context, sampled", Some(tracer(1.0)), Some(TRACEPARENT_SAMPLED)),
    ];
    println!("{n} requests per figure (server span, one client span, headers written, both ended)\n");
    println!("| tracing | ns per request | added to tracing off (ns) |");
    println!("|---|---:|---:|");
    let mut off = 0.0;
    for (name, tracing, incoming) in &cases {
        // A warm-up of a tenth, then the best of three.
        one_run(tracing.as_ref(), *incoming, n / 10);
        let ns = (0..3).map(|_| one_run(tracing.as_ref(), *incoming, n)).min().expect("three runs");
        let ns = ns.as_nanos() as f64 / f64::from(n);
        if tracing.is_none() {
            off = ns;
        }
        println!("| {name} | {ns:.0} | {:+.0} |", ns - off);
    }
}

/// `n` requests through the tracing hooks as the proxy calls them.
fn one_run(tracing: Option<&Tracing>, incoming: Option<&'static str>, n: u32) -> Duration {
    let source = WorkloadLabels::default();
    let service = ServiceLabels::new(HOST, "echo", "default");
    let target = ServiceTarget { hostname: HOST.into(), namespace: "default".into(), port: 80, policy: None };
    let endpoint = "10.2.0.5:8080".parse().expect("an address");
    let request_id = HeaderValue::from_static("c0c1b5f4-6a4e-4b5e-9a53-5d3b1c1f0a7e");
    let start = Instant::now();
    for _ in 0..n {
        let mut req = Request::get("/api/x").body(()).expect("a request");
        let headers = req.headers_mut();
        headers.insert("host", HeaderValue::from_static(HOST));
        headers.insert("user-agent", HeaderValue::from_static("wrk"));
        if let Some(tp) = incoming {
            headers.insert("traceparent", HeaderValue::from_static(tp));
        }
        let (mut parts, body) = req.into_parts();
        let server = tracing.and_then(|t| t.server(&mut parts, HOST, 80, &request_id));
        let mut req = Request::from_parts(parts, body);
        let client = tracing.and_then(|t| t.client(&mut req, &target, endpoint));
        let response: Result<Response<()>, Outcome> = Ok(Response::new(()));
        client_end(client, &response);
        server_end(server, &record(&source, &service));
        std::hint::black_box(req);
    }
    start.elapsed()
}

fn record<'a>(source: &'a WorkloadLabels, service: &'a ServiceLabels) -> RequestRecord<'a> {
    RequestRecord {
        source,
        destination: None,
        service,
        protocol: RequestProtocol::Http,
        response_code: 200,
        grpc_status: None,
        response_flags: "-",
        duration: Duration::from_micros(500),
        request_bytes: 0,
        response_bytes: 2,
    }
}

fn proxy() -> ProxyInfo {
    ProxyInfo {
        node_id: "waypoint~10.1.0.4~waypoint.default~default.svc.cluster.local".into(),
        canonical_service: "waypoint".into(),
        namespace: "default".into(),
        mesh_id: "cluster.local".into(),
    }
}
