//! Prometheus metrics: Istio's L7 request metrics with `reporter="waypoint"`
//! and Istio's names, labels and buckets, so Istio's dashboards work
//! unchanged; and the waypoint's own (`ambit_waypoint_*`): traffic refused
//! before any request, configuration problems, the HBONE pool's.
//!
//! The labels of a workload or service are built once ([`WorkloadLabels`],
//! [`ServiceLabels`], shared strings) and cloned per request; a request is
//! recorded with [`Metrics::request`]. Unknown label values render as
//! `unknown`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ambit_hbone::headers::Baggage;
use ambit_hbone::pool::PoolMetrics;
use ambit_identity::Identity;
use http::header::CONTENT_TYPE;
use http::HeaderMap;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::{Service, Workload};

/// Istio's default buckets of `istio_request_duration_milliseconds` (Envoy's).
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Buckets of `istio_request_bytes` and `istio_response_bytes`: powers of ten.
pub const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// Envoy's `response_flags` the waypoint sets (see also
/// [`crate::ReplyReason::response_flag`]); Istio's dashboards know them.
pub mod response_flags {
    /// Nothing to report.
    pub const NONE: &str = "-";
    /// No healthy endpoint (503).
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    /// The endpoint could not be reached (503).
    pub const UPSTREAM_CONNECTION_FAILURE: &str = "UF";
    /// A DestinationRule `connectionPool` limit turned it away (503, or a TCP connection closed).
    pub const UPSTREAM_OVERFLOW: &str = "UO";
    /// The endpoint did not answer in time (504).
    pub const UPSTREAM_REQUEST_TIMEOUT: &str = "UT";
    /// Retries ran out; the last attempt's answer went back.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: &str = "URX";
    /// The endpoint reset the stream.
    pub const UPSTREAM_REMOTE_RESET: &str = "UR";
    /// The connection to the endpoint ended mid-request.
    pub const UPSTREAM_CONNECTION_TERMINATION: &str = "UC";
    /// The client went away before the response ended.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: &str = "DC";
    /// No route matched (404).
    pub const NO_ROUTE_FOUND: &str = "NR";
    /// A fault injection filter delayed the request ([`crate::fault`]).
    pub const DELAY_INJECTED: &str = "DI";
    /// A fault injection filter answered the request ([`crate::fault`]).
    pub const FAULT_INJECTED: &str = "FI";
    /// The route's backend does not resolve (a TCP connection is closed).
    pub const NO_CLUSTER_FOUND: &str = "NC";
}

pub use ambit_telemetry::Value;

/// The labels of one end of a request, built once per workload. As Istio
/// does, `app` and `version` repeat the canonical service and revision.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct WorkloadLabels {
    /// The owning workload's name (e.g. the Deployment's).
    pub workload: Value,
    pub canonical_service: Value,
    pub canonical_revision: Value,
    pub namespace: Value,
    /// `spiffe://…`: the identity its certificate carries.
    pub principal: Value,
    pub cluster: Value,
}

impl WorkloadLabels {
    /// A known workload, with the identity the configuration gives it.
    pub fn from_workload(w: &Workload) -> Self {
        WorkloadLabels {
            workload: Value::new(&w.workload_name),
            canonical_service: Value::new(&w.canonical_name),
            canonical_revision: Value::new(&w.canonical_revision),
            namespace: Value::new(&w.namespace),
            principal: Value::new(&w.identity.to_string()),
            cluster: Value::new(&w.cluster_id),
        }
    }

    /// A peer the waypoint knows only by its certificate: principal and
    /// namespace, the rest `unknown`.
    pub fn from_identity(id: &Identity) -> Self {
        WorkloadLabels {
            namespace: Value::new(&id.namespace),
            principal: Value::new(&id.to_string()),
            ..Default::default()
        }
    }

    /// A client the waypoint knows by its certificate and by the `baggage`
    /// its ztunnel sent (Istio's keys): the certificate gives principal and
    /// namespace; baggage that names another namespace is ignored, as
    /// Istio's ztunnel ignores it.
    pub fn from_baggage(id: &Identity, b: Option<&Baggage>) -> Self {
        let labels = WorkloadLabels::from_identity(id);
        let Some(b) = b.filter(|b| b.namespace.as_deref().is_none_or(|ns| ns == id.namespace)) else {
            return labels;
        };
        let value = |v: &Option<String>| Value::new(v.as_deref().unwrap_or_default());
        WorkloadLabels {
            workload: value(&b.workload_name),
            canonical_service: value(&b.service_name),
            canonical_revision: value(&b.revision),
            cluster: value(&b.cluster_id),
            ..labels
        }
    }

    /// These labels with another principal (the one the peer proved).
    pub fn with_principal(mut self, id: &Identity) -> Self {
        self.principal = Value::new(&id.to_string());
        self
    }
}

/// The destination service's labels, built once per service.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct ServiceLabels {
    /// The hostname (`destination_service`).
    pub hostname: Value,
    pub name: Value,
    pub namespace: Value,
}

impl ServiceLabels {
    pub fn new(hostname: &str, name: &str, namespace: &str) -> Self {
        ServiceLabels { hostname: Value::new(hostname), name: Value::new(name), namespace: Value::new(namespace) }
    }

    pub fn from_service(s: &Service) -> Self {
        ServiceLabels::new(&s.hostname, &s.name, &s.namespace)
    }
}

/// Istio's `request_protocol` of an HTTP request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RequestProtocol {
    Http,
    Grpc,
}

impl RequestProtocol {
    /// `grpc` for a gRPC content type (`application/grpc`, `+proto`, …), as
    /// Istio decides it.
    pub fn of(headers: &HeaderMap) -> Self {
        let grpc =
            headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"));
        if grpc {
            RequestProtocol::Grpc
        } else {
            RequestProtocol::Http
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
        }
    }
}

impl EncodeLabelValue for RequestProtocol {
    fn encode(&self, w: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        w.write_str(self.as_str())
    }
}

/// One finished request, as the metrics (and the access log) record it.
#[derive(Clone, Copy, Debug)]
pub struct RequestRecord<'a> {
    pub source: &'a WorkloadLabels,
    /// The endpoint's workload; `None` when no endpoint was chosen (no
    /// route, no healthy endpoint, a redirect).
    pub destination: Option<&'a WorkloadLabels>,
    pub service: &'a ServiceLabels,
    pub protocol: RequestProtocol,
    /// The status sent to the client; 0 when none was (Envoy's convention).
    pub response_code: u16,
    /// gRPC's status (trailers, or trailers-only headers); `None` renders
    /// empty, as Istio does for HTTP. A code above 16 counts as UNKNOWN (2).
    pub grpc_status: Option<u32>,
    /// Envoy's flags, `-` for none ([`response_flags`]).
    pub response_flags: &'static str,
    /// From the request's first byte to the response's last.
    pub duration: Duration,
    /// Body bytes received from the client.
    pub request_bytes: u64,
    /// Body bytes sent to the client.
    pub response_bytes: u64,
}

/// The labels of every `istio_request*` / `istio_response*` series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reporter: &'static str,
    source_workload: Value,
    source_canonical_service: Value,
    source_canonical_revision: Value,
    source_workload_namespace: Value,
    source_principal: Value,
    source_app: Value,
    source_version: Value,
    source_cluster: Value,
    destination_workload: Value,
    destination_workload_namespace: Value,
    destination_principal: Value,
    destination_app: Value,
    destination_version: Value,
    destination_service: Value,
    destination_service_name: Value,
    destination_service_namespace: Value,
    destination_canonical_service: Value,
    destination_canonical_revision: Value,
    destination_cluster: Value,
    request_protocol: RequestProtocol,
    response_code: u16,
    grpc_response_status: Option<u32>,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

impl RequestLabels {
    fn new(r: &RequestRecord<'_>) -> Self {
        let (s, svc) = (r.source, r.service);
        let unknown = WorkloadLabels::default();
        let d = r.destination.unwrap_or(&unknown);
        RequestLabels {
            reporter: "waypoint",
            source_workload: s.workload.clone(),
            source_canonical_service: s.canonical_service.clone(),
            source_canonical_revision: s.canonical_revision.clone(),
            source_workload_namespace: s.namespace.clone(),
            source_principal: s.principal.clone(),
            source_app: s.canonical_service.clone(),
            source_version: s.canonical_revision.clone(),
            source_cluster: s.cluster.clone(),
            destination_workload: d.workload.clone(),
            destination_workload_namespace: d.namespace.clone(),
            destination_principal: d.principal.clone(),
            destination_app: d.canonical_service.clone(),
            destination_version: d.canonical_revision.clone(),
            destination_service: svc.hostname.clone(),
            destination_service_name: svc.name.clone(),
            destination_service_namespace: svc.namespace.clone(),
            destination_canonical_service: d.canonical_service.clone(),
            destination_canonical_revision: d.canonical_revision.clone(),
            destination_cluster: d.cluster.clone(),
            request_protocol: r.protocol,
            response_code: r.response_code,
            grpc_response_status: r.grpc_status.map(|c| if c > 16 { 2 } else { c }),
            response_flags: r.response_flags,
            // The waypoint takes only mutual-TLS HBONE.
            connection_security_policy: "mutual_tls",
        }
    }
}

/// Why traffic was refused before any request (`ambit_waypoint_refused_total{reason}`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusedReason {
    /// A CONNECT to a service or port the waypoint does not serve.
    unknown_target,
    /// Not a CONNECT, or a malformed authority.
    bad_request,
    /// The mutual-TLS handshake failed.
    tls_handshake,
    /// The waypoint has no certificate yet to present.
    no_certificate,
    /// An opaque TCP connection an authorization policy denied.
    policy_denied,
    /// A request's headers over [`crate::limits`] (answered 431), or an
    /// HTTP/1 head over hyper's own (a head larger than the read buffer, a
    /// URI too long: 431 or 414 before it became a request).
    head_too_large,
}

impl RefusedReason {
    pub const ALL: [RefusedReason; 6] = [
        RefusedReason::unknown_target,
        RefusedReason::bad_request,
        RefusedReason::tls_handshake,
        RefusedReason::no_certificate,
        RefusedReason::policy_denied,
        RefusedReason::head_too_large,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: RefusedReason,
}

/// `ambit_waypoint_outlier_ejections_total{service}`: the upstream service as `namespace/hostname`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

/// Why a mirror copy was not sent.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum MirrorDropped {
    /// `--max-mirror-requests` copies were in flight.
    in_flight,
    /// The mirror's service had no endpoint.
    no_endpoint,
}

/// `ambit_waypoint_mirror_dropped_total{service, reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MirrorDroppedLabels {
    service: String,
    reason: MirrorDropped,
}

/// `ambit_waypoint_upstream_overflow_total{service, limit}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OverflowLabels {
    service: String,
    /// `pending`, `requests` or `retries` ([`crate::circuit::Overflow`]).
    limit: &'static str,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The four metrics of one label set, looked up together.
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

struct Inner {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    /// One hash of the labels per request instead of one per family.
    series: RwLock<HashMap<RequestLabels, Series>>,
    refused: Family<RefusedLabels, Counter>,
    outlier_ejections: Family<ServiceLabel, Counter>,
    overflows: Family<OverflowLabels, Counter>,
    mirror_dropped: Family<MirrorDroppedLabels, Counter>,
    config_problems: Gauge,
    pool: PoolMetrics,
}

/// All of the waypoint's metrics; clones share them.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Inner {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            series: RwLock::new(HashMap::new()),
            refused: Family::default(),
            outlier_ejections: Family::default(),
            overflows: Family::default(),
            mirror_dropped: Family::default(),
            config_problems: Gauge::default(),
            pool: PoolMetrics::default(),
        };
        // Every reason shows from the start, so rate() sees the first one.
        for reason in RefusedReason::ALL {
            let _ = m.refused.get_or_create(&RefusedLabels { reason });
        }
        // prometheus-client appends `_total` to counters.
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("requests", "Requests handled", m.requests.clone());
        istio.register("request_duration_milliseconds", "Request durations", m.duration.clone());
        istio.register("request_bytes", "Request body sizes", m.request_bytes.clone());
        istio.register("response_bytes", "Response body sizes", m.response_bytes.clone());
        let w = registry.sub_registry_with_prefix("ambit_waypoint");
        w.register("refused", "Connections and tunnels refused before any request, by reason", m.refused.clone());
        w.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection (DestinationRule outlierDetection), by upstream service",
            m.outlier_ejections.clone(),
        );
        w.register(
            "upstream_overflow",
            "Requests a DestinationRule connectionPool limit turned away (503, flag UO) or did not retry, by upstream \
             service and limit",
            m.overflows.clone(),
        );
        w.register(
            "mirror_dropped",
            "Mirror copies not sent, by mirror service and reason (in_flight: --max-mirror-requests were; no_endpoint)",
            m.mirror_dropped.clone(),
        );
        w.register(
            "config_problems",
            "Parts of the configuration left out of the snapshot in force",
            m.config_problems.clone(),
        );
        w.register("pooled_connections", "Open pooled HBONE connections", m.pool.pooled_connections.clone());
        w.register(
            "hbone_retries",
            "HBONE tunnel requests the peer did not process (GOAWAY, REFUSED_STREAM) and that were sent again on a new connection",
            m.pool.retries.clone(),
        );
        Metrics(Arc::new(m))
    }

    /// The HBONE pool's metrics, for `ambit_hbone::pool::Pool::new`.
    pub fn pool(&self) -> PoolMetrics {
        self.0.pool.clone()
    }

    /// Counts traffic refused before any request.
    pub fn refused(&self, reason: RefusedReason) {
        self.0.refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// Counts an endpoint of `service` (`namespace/hostname`) ejected by outlier detection.
    pub fn outlier_ejected(&self, service: &str) {
        self.0.outlier_ejections.get_or_create(&ServiceLabel { service: service.to_owned() }).inc();
    }

    /// Counts a request of `service` (`namespace/hostname`) over a connection pool limit.
    pub fn overflowed(&self, service: &str, limit: crate::circuit::Overflow) {
        let labels = OverflowLabels { service: service.to_owned(), limit: limit.as_str() };
        self.0.overflows.get_or_create(&labels).inc();
    }

    /// Counts a mirror copy to `service` (its hostname) not sent.
    pub fn mirror_dropped(&self, service: &str, reason: MirrorDropped) {
        self.0.mirror_dropped.get_or_create(&MirrorDroppedLabels { service: service.to_owned(), reason }).inc();
    }

    /// Sets how many problems the configuration in force has (e.g. a
    /// [`crate::config::BuildReport`]'s routes and addresses left out).
    pub fn config_problems(&self, count: usize) {
        self.0.config_problems.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Records a finished request: counts it and observes its duration
    /// (milliseconds) and body sizes.
    pub fn request(&self, r: &RequestRecord<'_>) {
        let labels = RequestLabels::new(r);
        let observe = |s: &Series| {
            s.requests.inc();
            s.duration.observe(r.duration.as_nanos() as f64 / 1e6);
            s.request_bytes.observe(r.request_bytes as f64);
            s.response_bytes.observe(r.response_bytes as f64);
        };
        if let Some(s) = self.0.series.read().unwrap_or_else(|e| e.into_inner()).get(&labels) {
            observe(s);
            return;
        }
        let mut series = self.0.series.write().unwrap_or_else(|e| e.into_inner());
        let m = &self.0;
        let s = series.entry(labels).or_insert_with_key(|l| Series {
            requests: m.requests.get_or_create(l).clone(),
            duration: m.duration.get_or_create(l).clone(),
            request_bytes: m.request_bytes.get_or_create(l).clone(),
            response_bytes: m.response_bytes.get_or_create(l).clone(),
        });
        observe(s);
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
