use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};

use super::*;
use crate::metrics::{RequestProtocol, ServiceLabels, WorkloadLabels};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN: &str = "00f067aa0ba902b7";

fn proxy() -> ProxyInfo {
    ProxyInfo {
        node_id: "waypoint~10.1.0.4~waypoint.default~default.svc.cluster.local".into(),
        canonical_service: "waypoint".into(),
        namespace: "default".into(),
        mesh_id: "cluster.local".into(),
    }
}

/// A tracer sampling `percent` of new traces, exporting to memory as spans end.
fn tracing(percent: f64) -> (Tracing, InMemorySpanExporter) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).with_sampler(sampler()).build();
    (Tracing::new(&provider, percent, proxy()), exporter)
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    pairs.iter().map(|(n, v)| (http::HeaderName::from_static(n), HeaderValue::from_str(v).unwrap())).collect()
}

fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

fn attr(span: &SpanData, key: &str) -> Option<Value> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.clone())
}

fn target() -> ServiceTarget {
    ServiceTarget {
        hostname: "echo.default.svc.cluster.local".into(),
        namespace: "default".into(),
        port: 80,
        policy: None,
    }
}

#[test]
fn w3c_context_is_read_with_its_decision_and_state() {
    let (t, _) = tracing(0.0);
    let tp = format!("00-{TRACE}-{SPAN}-01");
    let sc = t.extract(&headers(&[("traceparent", &tp), ("tracestate", "vendor=x")])).unwrap();
    assert_eq!(sc.trace_id(), TraceId::from_hex(TRACE).unwrap());
    assert_eq!(sc.span_id(), SpanId::from_hex(SPAN).unwrap());
    assert!(sc.is_sampled() && sc.is_remote());
    assert_eq!(sc.trace_state().get("vendor"), Some("x"));
    let tp = format!("00-{TRACE}-{SPAN}-00");
    assert!(!t.extract(&headers(&[("traceparent", &tp)])).unwrap().is_sampled());
    assert!(t.extract(&headers(&[("traceparent", "00-garbage")])).is_none());
    assert!(t.extract(&HeaderMap::new()).is_none());
}

#[test]
fn b3_single_header_decisions() {
    let (none, _) = tracing(0.0);
    let (all, _) = tracing(100.0);
    let b3 = |flag: &str| headers(&[("b3", &format!("{TRACE}-{SPAN}{flag}"))]);
    let sc = none.extract(&b3("-1")).unwrap();
    assert_eq!((sc.trace_id(), sc.span_id()), (TraceId::from_hex(TRACE).unwrap(), SpanId::from_hex(SPAN).unwrap()));
    assert!(sc.is_sampled());
    assert!(!all.extract(&b3("-0")).unwrap().is_sampled(), "a refusal is honoured");
    assert!(none.extract(&b3("-d")).unwrap().is_sampled(), "debug samples");
    // Deferred: the rate decides.
    assert!(all.extract(&b3("")).unwrap().is_sampled());
    assert!(!none.extract(&b3("")).unwrap().is_sampled());
    // Only W3C's sampled bit is kept, so W3C written from it stays version-00 clean.
    assert_eq!(all.extract(&b3("")).unwrap().trace_flags(), TraceFlags::SAMPLED);
}

#[test]
fn b3_multi_headers_and_w3c_precedence() {
    let (t, _) = tracing(0.0);
    let multi = headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "1")]);
    let sc = t.extract(&multi).unwrap();
    assert_eq!(sc.span_id(), SpanId::from_hex(SPAN).unwrap());
    assert!(sc.is_sampled());
    // A 64-bit B3 trace id is widened.
    let short = headers(&[("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", SPAN), ("x-b3-sampled", "0")]);
    assert_eq!(t.extract(&short).unwrap().trace_id(), TraceId::from_hex("0000000000000000a3ce929d0e0e4736").unwrap());
    let other = "1111111111111111";
    let tp = format!("00-{TRACE}-{other}-01");
    let both = headers(&[("traceparent", &tp), ("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]);
    assert_eq!(t.extract(&both).unwrap().span_id(), SpanId::from_hex(other).unwrap());
}

#[test]
fn injection_writes_w3c_and_b3_in_the_callers_encodings() {
    let sc = SpanContext::new(
        TraceId::from_hex(TRACE).unwrap(),
        SpanId::from_hex("2222222222222222").unwrap(),
        TraceFlags::SAMPLED,
        false,
        Default::default(),
    );
    let mut h = headers(&[("x-b3-parentspanid", SPAN), ("x-b3-flags", "1")]);
    inject(&sc, &mut h);
    assert_eq!(get(&h, "traceparent"), Some(format!("00-{TRACE}-2222222222222222-01").as_str()));
    assert_eq!(get(&h, "x-b3-traceid"), Some(TRACE));
    assert_eq!(get(&h, "x-b3-spanid"), Some("2222222222222222"));
    assert_eq!(get(&h, "x-b3-sampled"), Some("1"));
    assert_eq!(get(&h, "x-b3-parentspanid"), None, "the caller's parent is not ours");
    assert_eq!(get(&h, "x-b3-flags"), None);
    assert_eq!(get(&h, "b3"), None, "the single header only for a caller that used it");
    assert_eq!(get(&h, "tracestate"), None, "no empty tracestate");
    let mut h = headers(&[("b3", &format!("{TRACE}-{SPAN}-1"))]);
    inject(&sc, &mut h);
    assert_eq!(get(&h, "b3"), Some(format!("{TRACE}-2222222222222222-1").as_str()));
    let state = "vendor=x".parse().unwrap();
    let unsampled = SpanContext::new(sc.trace_id(), sc.span_id(), TraceFlags::default(), false, state);
    let mut h = headers(&[("b3", "1"), ("tracestate", "stale=1")]);
    inject(&unsampled, &mut h);
    assert_eq!(get(&h, "traceparent"), Some(format!("00-{TRACE}-2222222222222222-00").as_str()));
    assert_eq!(get(&h, "tracestate"), Some("vendor=x"));
    assert_eq!(get(&h, "b3"), Some(format!("{TRACE}-2222222222222222-0").as_str()));
    assert_eq!(get(&h, "x-b3-sampled"), Some("0"));
}

#[test]
fn an_unsampled_trace_goes_on_with_a_new_span_per_attempt_and_nothing_recorded() {
    let (t, exported) = tracing(100.0);
    let tp = format!("00-{TRACE}-{SPAN}-00");
    let mut parts = request(&[("traceparent", &tp), ("tracestate", "vendor=x")]);
    assert!(t.server(&mut parts, "echo.default.svc.cluster.local", 80, &HeaderValue::from_static("r")).is_none());
    let mut req = Request::from_parts(parts, ());
    let mut sent = Vec::new();
    for _ in 0..2 {
        assert!(t.client(&mut req, &target(), "10.2.0.5:8080".parse().unwrap()).is_none());
        let tp = get(req.headers(), "traceparent").unwrap().to_owned();
        let fields: Vec<&str> = tp.split('-').collect();
        assert_eq!((fields[1], fields[3]), (TRACE, "00"), "{tp}");
        assert_ne!(fields[2], SPAN, "the caller's span is not ours");
        assert_eq!(get(req.headers(), "tracestate"), Some("vendor=x"));
        assert_eq!(get(req.headers(), "x-b3-sampled"), Some("0"));
        sent.push(tp);
    }
    assert_ne!(sent[0], sent[1], "each attempt has its own span id");
    assert!(exported.get_finished_spans().unwrap().is_empty());
}

#[test]
fn the_rate_samples_about_its_share_of_new_traces() {
    let (t, exported) = tracing(25.0);
    for _ in 0..2_000 {
        one_request(&t, &[]);
    }
    // Two spans per sampled request: 1,000 expected; binomial sd ≈ 19 requests.
    let spans = exported.get_finished_spans().unwrap().len();
    assert!((800..1_200).contains(&spans), "{spans} spans for 2,000 requests at 25 %");
}

fn request(pairs: &[(&'static str, &str)]) -> Parts {
    let mut req = Request::get("/api/x?q=1").body(()).unwrap();
    *req.headers_mut() = headers(pairs);
    req.headers_mut().insert("host", HeaderValue::from_static("echo.default.svc.cluster.local"));
    req.headers_mut().insert("user-agent", HeaderValue::from_static("curl/8"));
    req.into_parts().0
}

fn record<'a>(source: &'a WorkloadLabels, service: &'a ServiceLabels, code: u16) -> RequestRecord<'a> {
    RequestRecord {
        source,
        destination: None,
        service,
        protocol: RequestProtocol::Http,
        response_code: code,
        grpc_status: None,
        response_flags: "-",
        duration: Duration::from_millis(1),
        request_bytes: 0,
        response_bytes: 5,
    }
}

/// One request through server and client spans, as the proxy makes them: the exported spans and the headers the
/// endpoint got.
fn one_request(t: &Tracing, incoming: &[(&'static str, &str)]) -> HeaderMap {
    let id = HeaderValue::from_static("req-1");
    let mut parts = request(incoming);
    let server = t.server(&mut parts, "echo.default.svc.cluster.local", 80, &id);
    let mut req = Request::from_parts(parts, ());
    req.headers_mut().insert("x-request-id", id);
    let client = t.client(&mut req, &target(), "10.2.0.5:8080".parse().unwrap());
    let ok: Result<Response<()>, Outcome> = Ok(Response::new(()));
    client_end(client, &ok);
    let (src, svc) =
        (WorkloadLabels::default(), ServiceLabels::new("echo.default.svc.cluster.local", "echo", "default"));
    server_end(server, &record(&src, &svc, 200));
    req.into_parts().0.headers
}

#[test]
fn client_span_is_the_server_spans_child_and_carries_istios_attributes() {
    let (t, exported) = tracing(0.0);
    let tp = format!("00-{TRACE}-{SPAN}-01");
    let sent = one_request(&t, &[("traceparent", &tp)]);
    let spans = exported.get_finished_spans().unwrap();
    assert_eq!(spans.len(), 2, "{spans:?}");
    let client = spans.iter().find(|s| s.span_kind == SpanKind::Client).unwrap();
    let server = spans.iter().find(|s| s.span_kind == SpanKind::Server).unwrap();
    assert_eq!(server.parent_span_id, SpanId::from_hex(SPAN).unwrap());
    assert_eq!(client.parent_span_id, server.span_context.span_id());
    assert_eq!(client.span_context.trace_id(), TraceId::from_hex(TRACE).unwrap());
    assert_eq!(server.name, "echo.default.svc.cluster.local:80/*");
    let carried = format!("00-{TRACE}-{}-01", client.span_context.span_id());
    assert_eq!(get(&sent, "traceparent"), Some(carried.as_str()));
    for (key, want) in [
        ("http.method", "GET"),
        ("http.url", "http://echo.default.svc.cluster.local/api/x?q=1"),
        ("upstream_cluster", "outbound|80||echo.default.svc.cluster.local"),
        ("guid:x-request-id", "req-1"),
        ("user_agent", "curl/8"),
        ("downstream_cluster", "-"),
        ("component", "proxy"),
        ("istio.canonical_service", "waypoint"),
        ("istio.namespace", "default"),
        ("istio.mesh_id", "cluster.local"),
        ("node_id", "waypoint~10.1.0.4~waypoint.default~default.svc.cluster.local"),
        ("response_flags", "-"),
    ] {
        for span in [client, server] {
            assert_eq!(attr(span, key), Some(Value::from(want)), "{key} on {:?}", span.span_kind);
        }
    }
    assert_eq!(attr(server, "http.status_code"), Some(Value::I64(200)));
    assert_eq!(attr(client, "peer.address"), Some(Value::from("10.2.0.5:8080")));
}

#[test]
fn sampling_by_rate_for_new_traces_and_by_the_caller_otherwise() {
    let (none, exported) = tracing(0.0);
    let sent = one_request(&none, &[]);
    assert!(exported.get_finished_spans().unwrap().is_empty());
    // Unsampled, the context still goes on, with the decision.
    assert!(get(&sent, "traceparent").unwrap().ends_with("-00"), "{sent:?}");
    let b3 = format!("{TRACE}-{SPAN}-1");
    one_request(&none, &[("b3", &b3)]);
    assert_eq!(exported.get_finished_spans().unwrap().len(), 2, "a sampled caller is followed");

    let (all, exported) = tracing(100.0);
    let tp = format!("00-{TRACE}-{SPAN}-00");
    one_request(&all, &[("traceparent", &tp)]);
    assert!(exported.get_finished_spans().unwrap().is_empty(), "a refusing caller is followed");
    one_request(&all, &[]);
    let spans = exported.get_finished_spans().unwrap();
    assert_eq!(spans.len(), 2);
    assert!(spans.iter().any(|s| s.span_kind == SpanKind::Server && s.parent_span_id == SpanId::INVALID));
}

#[test]
fn failed_attempts_and_5xx_are_errors_with_envoys_flags() {
    let (t, exported) = tracing(100.0);
    let mut parts = request(&[]);
    let server = t.server(&mut parts, "echo.default.svc.cluster.local", 80, &HeaderValue::from_static("r"));
    let mut req = Request::from_parts(parts, ());
    let timeout: Result<Response<()>, Outcome> = Err(Outcome::Timeout);
    client_end(t.client(&mut req, &target(), "10.2.0.5:8080".parse().unwrap()), &timeout);
    let (src, svc) =
        (WorkloadLabels::default(), ServiceLabels::new("echo.default.svc.cluster.local", "echo", "default"));
    let mut rec = record(&src, &svc, StatusCode::GATEWAY_TIMEOUT.as_u16());
    rec.response_flags = "UT";
    server_end(server, &rec);
    for span in exported.get_finished_spans().unwrap() {
        assert_eq!(attr(&span, "response_flags"), Some(Value::from("UT")), "{:?}", span.span_kind);
        assert!(matches!(span.status, Status::Error { .. }));
    }
}

#[test]
fn a_request_without_a_server_span_gets_no_client_span() {
    let (t, _) = tracing(100.0);
    let mut req = Request::get("/").body(()).unwrap();
    assert!(t.client(&mut req, &target(), "10.2.0.5:8080".parse().unwrap()).is_none());
    assert!(req.headers().is_empty());
}

#[test]
fn http_endpoints_get_the_traces_path() {
    assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
    assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
    assert_eq!(http_traces_url("http://c:4318/custom/traces"), "http://c:4318/custom/traces");
}

#[test]
fn tracing_off_makes_no_span() {
    // Nothing installed in this test binary.
    let mut parts = request(&[]);
    assert!(server(&mut parts, "h", 80, &HeaderValue::from_static("r")).is_none());
    assert!(parts.extensions.is_empty());
}
