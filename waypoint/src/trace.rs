//! Distributed tracing (OpenTelemetry), as Istio's proxies trace: a server
//! span per request, a client span per upstream attempt (its child), with
//! Istio's span names and attributes, exported over OTLP (gRPC or HTTP) by a
//! batch processor on the runtime.
//!
//! The trace context comes in as W3C `traceparent`/`tracestate` (preferred)
//! or B3 (`b3`, or `x-b3-*`); it goes out as W3C and `x-b3-*`, plus `b3`
//! when the request carried it. A request without one starts a trace,
//! sampled at the configured rate; an incoming decision is honoured (B3's
//! "deferred" leaves it to the rate, "debug" samples).
//!
//! Off (no endpoint), the request path pays one branch: [`TRACING`] is unset
//! and every entry point returns `None`. On, the sampling decision comes
//! first: a request not sampled makes no SDK span at all, only carries its
//! context on (a new span id per attempt and the headers, written by hand).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use http::request::Parts;
use http::HeaderName;
use http::{HeaderMap, HeaderValue, Request, Response};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, SdkTracer, SdkTracerProvider,
    ShouldSample, Span,
};
use opentelemetry_sdk::Resource;

use crate::metrics::RequestRecord;
use crate::reply::ReplyReason;
use crate::retry::Outcome;
use crate::target::ServiceTarget;

/// The tracer of this process; unset when tracing is off.
static TRACING: OnceLock<Tracing> = OnceLock::new();

/// Spans waiting for export; past it new spans are dropped, never waited for.
const QUEUE: usize = 8_192;
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// B3's flag bits as the B3 propagator reports them (not W3C's).
const B3_DEFERRED: u8 = 0x02;
const B3_DEBUG: u8 = 0x04;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3_SINGLE: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (a collector's port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    Http,
}

/// Who the spans come from: Istio's proxy attributes.
#[derive(Clone, Debug)]
pub struct ProxyInfo {
    /// Envoy's node id (`waypoint~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub node_id: String,
    /// The waypoint's canonical service (its Gateway's name).
    pub canonical_service: String,
    pub namespace: String,
    /// The mesh id (the trust domain, Istio's default).
    pub mesh_id: String,
}

/// Why tracing cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("--tracing-endpoint {0:?}: only plain-text http:// endpoints are supported")]
    Scheme(String),
    #[error("tracing exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("bug: tracing installed twice")]
    Installed,
}

/// Starts exporting to `endpoint` and makes the request path trace,
/// sampling `percent` of new traces; the provider, to flush at shutdown.
pub fn install(
    endpoint: &str,
    protocol: OtlpProtocol,
    percent: f64,
    proxy: ProxyInfo,
) -> Result<SdkTracerProvider, TraceError> {
    if !endpoint.starts_with("http://") {
        return Err(TraceError::Scheme(endpoint.to_owned()));
    }
    let exporter = match protocol {
        OtlpProtocol::Grpc => {
            SpanExporter::builder().with_tonic().with_endpoint(endpoint).with_timeout(EXPORT_TIMEOUT).build()?
        }
        OtlpProtocol::Http => SpanExporter::builder()
            .with_http()
            .with_endpoint(http_traces_url(endpoint))
            .with_timeout(EXPORT_TIMEOUT)
            .build()?,
    };
    let batch = BatchConfigBuilder::default().with_max_queue_size(QUEUE).build();
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).with_batch_config(batch).build();
    let resource =
        Resource::builder_empty().with_service_name(format!("{}.{}", proxy.canonical_service, proxy.namespace)).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler())
        .with_resource(resource)
        .build();
    TRACING.set(Tracing::new(&provider, percent, proxy)).map_err(|_| TraceError::Installed)?;
    Ok(provider)
}

/// Exports the spans still queued (up to 5 s); the processor blocks while
/// it waits, so off the runtime's thread.
pub async fn shutdown(provider: SdkTracerProvider) {
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
}

/// OTLP/HTTP's traces path added to a bare `http://host:port` (an explicit path is kept).
pub fn http_traces_url(endpoint: &str) -> String {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest);
    match rest.find('/') {
        Some(i) if i + 1 < rest.len() => endpoint.to_owned(),
        _ => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
    }
}

/// The SDK's sampler: a parent's decision is kept; a new trace is always
/// recorded, because [`Tracing`] applies the rate before it starts a span
/// (the SDK is only asked for the spans that will be recorded).
pub fn sampler() -> Sampler {
    Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
}

fn ratio(percent: f64) -> Sampler {
    Sampler::TraceIdRatioBased(percent.clamp(0.0, 100.0) / 100.0)
}

/// The server span of a request; [`server_end`] ends it.
pub struct ServerSpan(Span);

/// The client span of one upstream attempt; [`client_end`] ends it.
pub struct ClientSpan(Span);

/// The server span's context, carried in the request's extensions to the
/// forwarding code, which makes the client spans its children.
#[derive(Clone, Debug)]
struct ServerContext(SpanContext);

/// Starts the server span of a request to `host:port`, from its trace
/// headers; `None` when tracing is off.
pub fn server(parts: &mut Parts, host: &str, port: u16, request_id: &HeaderValue) -> Option<ServerSpan> {
    TRACING.get().and_then(|t| t.server(parts, host, port, request_id))
}

/// Ends the server span with what became of the request.
pub fn server_end(span: Option<ServerSpan>, record: &RequestRecord) {
    if let Some(ServerSpan(mut span)) = span {
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new("http.status_code", i64::from(record.response_code)),
                KeyValue::new("response_flags", record.response_flags),
                KeyValue::new("request_size", record.request_bytes as i64),
                KeyValue::new("response_size", record.response_bytes as i64),
            ]);
            if record.response_code >= 500 || record.response_code == 0 {
                span.set_status(Status::error(""));
            }
        }
        span.end();
    }
}

/// Starts the client span of an attempt to `endpoint` of `target` and
/// writes its context into the request's trace headers; `None` when off.
pub fn client<B>(req: &mut Request<B>, target: &ServiceTarget, endpoint: SocketAddr) -> Option<ClientSpan> {
    TRACING.get().and_then(|t| t.client(req, target, endpoint))
}

/// Ends an attempt's client span with its response, or why none came.
pub fn client_end<B>(span: Option<ClientSpan>, result: &Result<Response<B>, Outcome>) {
    let Some(ClientSpan(mut span)) = span else { return };
    if span.is_recording() {
        let (code, flags) = match result {
            Ok(r) => (r.status().as_u16(), "-"),
            Err(o) => (0, failure_flag(*o)),
        };
        span.set_attributes([
            KeyValue::new("http.status_code", i64::from(code)),
            KeyValue::new("response_flags", flags),
        ]);
        if code >= 500 || code == 0 {
            span.set_status(Status::error(""));
        }
    }
    span.end();
}

fn failure_flag(outcome: Outcome) -> &'static str {
    let reason = match outcome {
        Outcome::Timeout => ReplyReason::UpstreamTimeout,
        Outcome::ConnectFailure => ReplyReason::UpstreamConnectFailure,
        _ => ReplyReason::UpstreamReset,
    };
    reason.response_flag()
}

/// The tracer, its propagators and the proxy's attributes.
pub struct Tracing {
    tracer: SdkTracer,
    ids: RandomIdGenerator,
    w3c: TraceContextPropagator,
    b3: b3::B3,
    /// The rate, for a B3 context that leaves the decision to us.
    ratio: Sampler,
    proxy: [KeyValue; 5],
}

impl Tracing {
    pub fn new(provider: &SdkTracerProvider, percent: f64, p: ProxyInfo) -> Self {
        Tracing {
            tracer: provider.tracer("ambit-waypoint"),
            ids: RandomIdGenerator::default(),
            w3c: TraceContextPropagator::new(),
            b3: b3::B3::default(),
            ratio: ratio(percent),
            proxy: [
                KeyValue::new("component", "proxy"),
                KeyValue::new("node_id", p.node_id),
                KeyValue::new("istio.canonical_service", p.canonical_service),
                KeyValue::new("istio.namespace", p.namespace),
                KeyValue::new("istio.mesh_id", p.mesh_id),
            ],
        }
    }

    /// The incoming trace context, W3C before B3, with the sampling
    /// decision settled (only W3C's sampled bit left).
    pub fn extract(&self, headers: &HeaderMap) -> Option<SpanContext> {
        // Most requests come without one: no propagator asked.
        if ![&TRACEPARENT, &B3_SINGLE, &B3_TRACE_ID].iter().any(|h| headers.contains_key(*h)) {
            return None;
        }
        let carrier = HeaderExtractor(headers);
        let w3c = self.w3c.extract(&carrier);
        if w3c.has_active_span() {
            return Some(w3c.span().span_context().clone());
        }
        let b3 = self.b3.extract(&carrier);
        let sc = b3.span().span_context().clone();
        if !sc.is_valid() {
            return None;
        }
        let bits = sc.trace_flags().to_u8();
        // Debug samples; "deferred" (no decision yet) leaves it to the rate.
        let sampled = match (bits & B3_DEBUG != 0, bits & B3_DEFERRED != 0) {
            (true, _) => true,
            (false, true) => self.rate_samples(sc.trace_id()),
            (false, false) => sc.is_sampled(),
        };
        let flags = TraceFlags::default().with_sampled(sampled);
        Some(SpanContext::new(sc.trace_id(), sc.span_id(), flags, true, sc.trace_state().clone()))
    }

    /// Whether the rate samples a new trace with this id.
    fn rate_samples(&self, trace_id: TraceId) -> bool {
        let r = self.ratio.should_sample(None, trace_id, "", &SpanKind::Server, &[], &[]);
        r.decision == SamplingDecision::RecordAndSample
    }

    /// A recorded span (the decision is already taken).
    fn start(&self, kind: SpanKind, parent: Option<SpanContext>, name: String) -> Span {
        let cx = match parent {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        self.tracer.span_builder(name).with_kind(kind).start_with_context(&self.tracer, &cx)
    }

    /// The server span of a request, or `None` when it is not sampled (its
    /// context still goes on, through the request's extensions, to [`Self::client`]).
    pub fn server(&self, parts: &mut Parts, host: &str, port: u16, request_id: &HeaderValue) -> Option<ServerSpan> {
        let parent = match self.extract(&parts.headers) {
            Some(sc) if !sc.is_sampled() => return carry(parts, sc),
            Some(sc) => Some(sc),
            None => {
                let trace_id = self.ids.new_trace_id();
                if !self.rate_samples(trace_id) {
                    let flags = TraceFlags::default();
                    return carry(
                        parts,
                        SpanContext::new(trace_id, self.ids.new_span_id(), flags, false, TraceState::NONE),
                    );
                }
                None
            }
        };
        let mut span = self.start(SpanKind::Server, parent, format!("{host}:{port}/*"));
        if span.is_recording() {
            let header = |name: &str| header_str(&parts.headers, name).to_owned();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let authority = crate::authority::request_host(parts).unwrap_or(host);
            let mut attrs = vec![
                KeyValue::new("http.method", parts.method.to_string()),
                KeyValue::new("http.url", format!("http://{authority}{path}")),
                KeyValue::new("http.protocol", format!("{:?}", parts.version)),
                KeyValue::new("upstream_cluster", format!("outbound|{port}||{host}")),
                KeyValue::new("guid:x-request-id", request_id.to_str().unwrap_or("-").to_owned()),
                KeyValue::new("downstream_cluster", header("x-envoy-downstream-service-cluster")),
                KeyValue::new("user_agent", header("user-agent")),
            ];
            attrs.extend(self.proxy.iter().cloned());
            span.set_attributes(attrs);
        }
        parts.extensions.insert(ServerContext(span.span_context().clone()));
        Some(ServerSpan(span))
    }

    pub fn client<B>(&self, req: &mut Request<B>, target: &ServiceTarget, endpoint: SocketAddr) -> Option<ClientSpan> {
        let parent = &req.extensions().get::<ServerContext>()?.0;
        if !parent.is_sampled() {
            // Envoy's unsampled span: a new id carried on, nothing recorded.
            let sc = SpanContext::new(
                parent.trace_id(),
                self.ids.new_span_id(),
                TraceFlags::default(),
                false,
                parent.trace_state().clone(),
            );
            inject(&sc, req.headers_mut());
            return None;
        }
        let parent = parent.clone();
        let name = format!("{}:{}/*", target.hostname, target.port);
        let mut span = self.start(SpanKind::Client, Some(parent), name);
        if span.is_recording() {
            let subset = target.policy.as_ref().and_then(|p| p.subset.as_ref()).map_or("", |s| s.name.as_str());
            let cluster = format!("outbound|{}|{subset}|{}", target.port, target.hostname);
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let headers = req.headers();
            let mut attrs = vec![
                KeyValue::new("http.method", req.method().to_string()),
                KeyValue::new("http.url", format!("http://{}{path}", header_str(headers, "host"))),
                KeyValue::new("upstream_cluster", cluster.clone()),
                KeyValue::new("upstream_cluster.name", cluster),
                KeyValue::new("peer.address", endpoint.to_string()),
                KeyValue::new("guid:x-request-id", header_str(headers, "x-request-id").to_owned()),
                KeyValue::new("user_agent", header_str(headers, "user-agent").to_owned()),
                KeyValue::new(
                    "downstream_cluster",
                    header_str(headers, "x-envoy-downstream-service-cluster").to_owned(),
                ),
            ];
            attrs.extend(self.proxy.iter().cloned());
            span.set_attributes(attrs);
        }
        inject(span.span_context(), req.headers_mut());
        Some(ClientSpan(span))
    }
}

/// An unsampled request: no span, its context kept for the client side.
fn carry(parts: &mut Parts, sc: SpanContext) -> Option<ServerSpan> {
    parts.extensions.insert(ServerContext(sc));
    None
}

/// Writes `sc` as the trace headers of an outgoing request: W3C, `x-b3-*`,
/// and `b3` when the caller used it. By hand, as the propagators would
/// (without their empty `tracestate`): they format a `String` and parse the
/// header's name per header, on every request that carries a trace.
pub fn inject(sc: &SpanContext, headers: &mut HeaderMap) {
    // Written for the caller's span: meaningless below ours.
    headers.remove(B3_PARENT_SPAN_ID);
    headers.remove(B3_FLAGS);
    let (trace, span) = (sc.trace_id(), sc.span_id());
    let sampled = if sc.is_sampled() { "1" } else { "0" };
    if headers.contains_key(B3_SINGLE) {
        headers.insert(B3_SINGLE, hex_value(format_args!("{trace}-{span}-{sampled}")));
    }
    headers.insert(TRACEPARENT, hex_value(format_args!("00-{trace}-{span}-0{sampled}")));
    match HeaderValue::try_from(sc.trace_state().header()) {
        Ok(state) if !state.is_empty() => headers.insert(TRACESTATE, state),
        _ => headers.remove(TRACESTATE),
    };
    headers.insert(B3_TRACE_ID, hex_value(format_args!("{trace}")));
    headers.insert(B3_SPAN_ID, hex_value(format_args!("{span}")));
    headers.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
}

/// A header value of ids in hex, formatted on the stack.
fn hex_value(args: std::fmt::Arguments) -> HeaderValue {
    use std::io::Write as _;
    let mut buf = [0u8; 64];
    let mut rest = &mut buf[..];
    rest.write_fmt(args).expect("bug: trace ids fit 64 bytes");
    let len = 64 - rest.len();
    HeaderValue::from_bytes(&buf[..len]).expect("bug: hex and dashes are a header value")
}

/// A header's value, `-` (Envoy's empty) when absent or not text.
fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// B3 by the Zipkin crate's propagator: the crate is deprecated for its
/// exporter (OTLP replaces it), the propagator has no successor yet.
#[allow(deprecated)]
mod b3 {
    use opentelemetry::propagation::{Extractor, TextMapPropagator};
    use opentelemetry::Context;
    use opentelemetry_zipkin::{B3Encoding, Propagator};

    /// Reads `b3` before `x-b3-*` (written by [`super::inject`]).
    pub struct B3(Propagator);

    impl Default for B3 {
        fn default() -> Self {
            B3(Propagator::with_encoding(B3Encoding::SingleAndMultiHeader))
        }
    }

    impl B3 {
        pub fn extract(&self, carrier: &dyn Extractor) -> Context {
            self.0.extract(carrier)
        }
    }
}

#[cfg(test)]
#[path = "trace_tests.rs"]
mod tests;
