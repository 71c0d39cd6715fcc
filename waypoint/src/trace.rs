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
//! and every entry point returns `None`.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request, Response};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, Sampler, SamplingDecision, SdkTracer, SdkTracerProvider, ShouldSample, Span,
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
        .with_sampler(sampler(percent))
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

/// Istio's sampling: a parent's decision is kept; a new trace is sampled
/// by its id at `percent`.
pub fn sampler(percent: f64) -> Sampler {
    Sampler::ParentBased(Box::new(ratio(percent)))
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
    TRACING.get().map(|t| t.server(parts, host, port, request_id))
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
            (false, true) => self.new_trace_sampled(&sc),
            (false, false) => sc.is_sampled(),
        };
        let flags = TraceFlags::default().with_sampled(sampled);
        Some(SpanContext::new(sc.trace_id(), sc.span_id(), flags, true, sc.trace_state().clone()))
    }

    fn new_trace_sampled(&self, sc: &SpanContext) -> bool {
        let r = self.ratio.should_sample(None, sc.trace_id(), "", &SpanKind::Server, &[], &[]);
        r.decision == SamplingDecision::RecordAndSample
    }

    /// Writes `sc` as the trace headers of an outgoing request.
    pub fn inject(&self, sc: &SpanContext, headers: &mut HeaderMap) {
        let cx = Context::new().with_remote_span_context(sc.clone());
        // Written for the caller's span: meaningless below ours.
        headers.remove("x-b3-parentspanid");
        headers.remove("x-b3-flags");
        let single = headers.contains_key("b3");
        let mut carrier = HeaderInjector(headers);
        self.w3c.inject_context(&cx, &mut carrier);
        self.b3.inject(&cx, &mut carrier, single);
    }

    fn start(&self, kind: SpanKind, parent: Option<SpanContext>) -> Span {
        let cx = match parent {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        // Named once known to be recorded: an unsampled span allocates no name.
        self.tracer.span_builder("-").with_kind(kind).start_with_context(&self.tracer, &cx)
    }

    pub fn server(&self, parts: &mut Parts, host: &str, port: u16, request_id: &HeaderValue) -> ServerSpan {
        let mut span = self.start(SpanKind::Server, self.extract(&parts.headers));
        if span.is_recording() {
            span.update_name(format!("{host}:{port}/*"));
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
        ServerSpan(span)
    }

    pub fn client<B>(&self, req: &mut Request<B>, target: &ServiceTarget, endpoint: SocketAddr) -> Option<ClientSpan> {
        let parent = req.extensions().get::<ServerContext>()?.0.clone();
        let mut span = self.start(SpanKind::Client, Some(parent));
        if span.is_recording() {
            let subset = target.policy.as_ref().and_then(|p| p.subset.as_ref()).map_or("", |s| s.name.as_str());
            let cluster = format!("outbound|{}|{subset}|{}", target.port, target.hostname);
            span.update_name(format!("{}:{}/*", target.hostname, target.port));
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
        self.inject(span.span_context(), req.headers_mut());
        Some(ClientSpan(span))
    }
}

/// A header's value, `-` (Envoy's empty) when absent or not text.
fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// B3 by the Zipkin crate's propagator: the crate is deprecated for its
/// exporter (OTLP replaces it), the propagator has no successor yet.
#[allow(deprecated)]
mod b3 {
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::Context;
    use opentelemetry_zipkin::{B3Encoding, Propagator};

    pub struct B3 {
        /// Reads `b3` before `x-b3-*`.
        incoming: Propagator,
        single: Propagator,
        multi: Propagator,
    }

    impl Default for B3 {
        fn default() -> Self {
            B3 {
                incoming: Propagator::with_encoding(B3Encoding::SingleAndMultiHeader),
                single: Propagator::with_encoding(B3Encoding::SingleHeader),
                multi: Propagator::with_encoding(B3Encoding::MultipleHeader),
            }
        }
    }

    impl B3 {
        pub fn extract(&self, carrier: &dyn Extractor) -> Context {
            self.incoming.extract(carrier)
        }

        /// `x-b3-*`, and `b3` too when `single`.
        pub fn inject(&self, cx: &Context, carrier: &mut dyn Injector, single: bool) {
            self.multi.inject_context(cx, carrier);
            if single {
                self.single.inject_context(cx, carrier);
            }
        }
    }
}

#[cfg(test)]
#[path = "trace_tests.rs"]
mod tests;
