//! End-to-end tests of the waypoint's distributed tracing, in the waypoint lab ([`WaypointLab`]: the real controller,
//! ztunnels, `ambit-waypoint`, HBONE with mutual TLS, the echo server `echo-v1` behind the service `echo`): the
//! waypoint traces every request (100 % sampling) to a real OTLP receiver ([`OtlpReceiver`], the `opentelemetry-proto`
//! `TraceService`) in its pod's namespace, over gRPC in one lab and OTLP/HTTP in the other. Each request client →
//! waypoint → server must make one trace of a server span (the caller's span its parent, when it sent one) and a
//! client span (its child), with Istio's attributes; the echo server must see the client span's context in W3C
//! `traceparent` and in B3, as the caller used it. Needs root; fails (not skips) under CI.

use std::net::SocketAddr;
use std::time::Duration;

use ambit_e2e::http::HttpResponse;
use ambit_e2e::http_server::EchoReply;
use ambit_e2e::otlp::{OtlpReceiver, Received, Transport, KIND_CLIENT, KIND_SERVER};
use ambit_e2e::waypoint_lab::{WaypointLab, ECHO_HOST};

/// Where the receiver listens, inside the waypoint's pod (OTLP's usual ports).
const GRPC: &str = "127.0.0.1:4317";
const HTTP: &str = "127.0.0.1:4318";
/// Export is batched (every 5 s by default); this bounds it.
const EXPORT: Duration = Duration::from_secs(20);

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The lab with the waypoint tracing everything to `endpoint` over `protocol`, and the receiver there.
fn lab(test: &str, protocol: &str, listen: &str) -> Option<(WaypointLab, OtlpReceiver)> {
    let endpoint = format!("http://{listen}");
    let flags = ["--tracing-endpoint", &endpoint, "--tracing-protocol", protocol, "--tracing-sampling", "100"];
    let l = WaypointLab::start_with_flags(test, &[], &flags)?;
    let addr: SocketAddr = listen.parse().unwrap();
    let receiver = OtlpReceiver::start(l.ns(l.wp), addr).expect("otlp receiver");
    // Routing ready; this request's trace is not looked at.
    l.until_served_by(l.client, "/warm", &[], "echo-v1");
    Some((l, receiver))
}

/// `GET path` with `headers`, answered by `echo-v1`: what the server saw.
fn echo(l: &WaypointLab, path: &str, headers: &[(&str, &str)]) -> EchoReply {
    let r: HttpResponse = l.get(path, headers).expect("request");
    assert_eq!(r.status, 200, "{r:?}");
    EchoReply::parse(&r.body).expect("echo body")
}

/// The server and the client span of trace `trace`, checked to be the only two, the client the server's child.
fn pair(receiver: &OtlpReceiver, trace: &str) -> (Received, Received) {
    let spans = receiver.wait_trace(trace, 2, EXPORT).expect("the trace");
    assert_eq!(spans.len(), 2, "one server and one client span: {spans:#?}");
    let server = spans.iter().find(|s| s.kind() == KIND_SERVER).expect("a server span").clone();
    let client = spans.iter().find(|s| s.kind() == KIND_CLIENT).expect("a client span").clone();
    assert_eq!(client.parent_id(), server.span_id(), "the client span is the server span's child");
    (server, client)
}

/// `traceparent` as the waypoint writes it for `span` (sampled).
fn traceparent(span: &Received) -> String {
    format!("00-{}-{}-01", span.trace_id(), span.span_id())
}

/// Istio's attributes, on both spans of a request to `echo` answered 200.
fn check_attributes(server: &Received, client: &Received, seen: &EchoReply) {
    let name = format!("{ECHO_HOST}:80/*");
    for span in [server, client] {
        let kind = span.kind();
        assert_eq!(span.span.name, name, "span name ({kind})");
        assert_eq!(span.service_name.as_deref(), Some("waypoint.default"));
        for (key, want) in [
            ("http.method", "GET"),
            ("http.status_code", "200"),
            ("response_flags", "-"),
            ("component", "proxy"),
            ("upstream_cluster", "outbound|80||echo.default.svc.cluster.local"),
            ("istio.canonical_service", "waypoint"),
            ("istio.namespace", "default"),
            ("istio.mesh_id", "cluster.local"),
            ("downstream_cluster", "-"),
        ] {
            assert_eq!(span.attr(key).as_deref(), Some(want), "{key} ({kind}): {span:#?}");
        }
        assert_eq!(span.attr("guid:x-request-id").as_deref(), seen.header("x-request-id"), "({kind})");
        assert!(span.attr("node_id").is_some_and(|n| n.starts_with("waypoint~")), "({kind}) {span:#?}");
        assert!(span.attr("user_agent").is_some_and(|a| a != "-"), "({kind}) {span:#?}");
        assert!(span.attr("http.url").is_some_and(|u| u.contains(ECHO_HOST)), "({kind}) {span:#?}");
    }
    assert!(client.attr("peer.address").is_some_and(|a| a.ends_with(":8080")), "{client:#?}");
}

#[test]
fn grpc_export_w3c_and_b3_multi() {
    let Some((l, receiver)) = lab("wp-trace", "grpc", GRPC) else { return };

    // A caller's W3C context: the server span is its child.
    let incoming = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let seen = echo(&l, "/w3c", &[("traceparent", &incoming), ("tracestate", "vendor=x")]);
    let (server, client) = pair(&receiver, TRACE);
    assert_eq!(server.parent_id(), CALLER_SPAN, "the caller's span is the server span's parent");
    assert_eq!(seen.header("traceparent"), Some(traceparent(&client).as_str()), "{seen:?}");
    assert_eq!(seen.header("tracestate"), Some("vendor=x"));
    assert_eq!(server.via, Transport::Grpc);
    check_attributes(&server, &client, &seen);

    // No context: the waypoint starts the trace.
    let seen = echo(&l, "/fresh", &[]);
    let tp = seen.header("traceparent").expect("the waypoint starts a trace").to_owned();
    let trace = tp.split('-').nth(1).expect("traceparent's trace id").to_owned();
    let (server, client) = pair(&receiver, &trace);
    assert_eq!(server.parent_id(), "", "a new trace's server span is its root");
    assert_eq!(tp, traceparent(&client));
    check_attributes(&server, &client, &seen);

    // A caller's B3 (multiple headers): read, and written back for the server.
    let b3_trace = "a3ce929d0e0e47364bf92f3577b34da6";
    let b3_span = "1111111111111111";
    let seen = echo(&l, "/b3", &[("x-b3-traceid", b3_trace), ("x-b3-spanid", b3_span), ("x-b3-sampled", "1")]);
    let (server, client) = pair(&receiver, b3_trace);
    assert_eq!(server.parent_id(), b3_span);
    assert_eq!(seen.header("x-b3-traceid"), Some(b3_trace), "{seen:?}");
    assert_eq!(seen.header("x-b3-spanid"), Some(client.span_id().as_str()), "{seen:?}");
    assert_eq!(seen.header("x-b3-sampled"), Some("1"));
    assert_eq!(seen.header("traceparent"), Some(traceparent(&client).as_str()));
}

#[test]
fn http_export_and_b3_single_header() {
    let Some((l, receiver)) = lab("wp-trace-http", "http", HTTP) else { return };

    // A caller that decided not to sample: no spans, though the context goes on.
    let unsampled = "5555555555555555aaaaaaaaaaaaaaaa";
    let seen = echo(&l, "/b3-unsampled", &[("b3", &format!("{unsampled}-{CALLER_SPAN}-0"))]);
    assert!(seen.header("b3").is_some_and(|b3| b3.starts_with(unsampled) && b3.ends_with("-0")), "{seen:?}");

    let seen = echo(&l, "/b3-single", &[("b3", &format!("{TRACE}-{CALLER_SPAN}-1"))]);
    let (server, client) = pair(&receiver, TRACE);
    assert_eq!(server.parent_id(), CALLER_SPAN);
    assert_eq!((server.via, client.via), (Transport::Http, Transport::Http));
    assert_eq!(seen.header("b3"), Some(format!("{TRACE}-{}-1", client.span_id()).as_str()), "{seen:?}");
    assert_eq!(seen.header("traceparent"), Some(traceparent(&client).as_str()));
    check_attributes(&server, &client, &seen);
    // Spans are exported in the order they end: the unsampled request's would have come by now.
    assert!(receiver.spans().iter().all(|s| s.trace_id() != unsampled), "{:#?}", receiver.spans());
}
