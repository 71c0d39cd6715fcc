//! Prometheus metrics with Istio's L4 names and labels, so dashboards built
//! for Istio's ztunnel work unchanged. Unknown label values render as
//! `unknown`.

use std::sync::Arc;

use std::fmt::Write;

use ambit_identity::Identity;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::{Service, Workload};
use ambit_hbone::headers::Baggage;
use ambit_hbone::pool::PoolMetrics;

/// Which side of the connection reports (Istio's `reporter` label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

/// Istio's `connection_security_policy` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    unknown,
}

/// Istio's `response_flags` label: how a connection ended, set when it
/// closes (a connection is counted as opened with `-`).
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    /// `-`: nothing to report.
    #[default]
    None,
    /// `DENY`: an authorization policy denied it.
    Deny,
    /// `CONNECT`: the upstream (the application) could not be reached.
    Connect,
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, w: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        w.write_str(match self {
            ResponseFlags::None => "-",
            ResponseFlags::Deny => "DENY",
            ResponseFlags::Connect => "CONNECT",
        })
    }
}

pub use ambit_telemetry::Value;

/// The labels of one end of a connection. As Istio's ztunnel does, `app`
/// and `version` repeat the canonical service and revision.
#[derive(Clone, Debug, Default)]
pub struct PeerLabels {
    /// The owning workload's name (e.g. the Deployment's).
    pub workload: Value,
    pub canonical_service: Value,
    pub canonical_revision: Value,
    pub namespace: Value,
    /// `spiffe://…`; set only where the identity is proven (mTLS).
    pub principal: Value,
    pub cluster: Value,
}

impl PeerLabels {
    /// The labels the state gives a workload, without its principal.
    pub fn of(w: &Workload) -> Self {
        PeerLabels {
            workload: Value::new(&w.workload_name),
            canonical_service: Value::new(&w.canonical_name),
            canonical_revision: Value::new(&w.canonical_revision),
            namespace: Value::new(&w.namespace),
            principal: Value::default(),
            cluster: Value::new(&w.cluster_id),
        }
    }

    pub fn with_principal(mut self, id: &Identity) -> Self {
        self.principal = Value::new(&id.to_string());
        self
    }

    /// Fills what the state left unknown from the peer's baggage. The
    /// principal never comes from baggage.
    pub fn fill_from(self, b: &Baggage) -> Self {
        PeerLabels {
            workload: self.workload.or(b.workload_name.as_deref()),
            canonical_service: self.canonical_service.or(b.service_name.as_deref()),
            canonical_revision: self.canonical_revision.or(b.revision.as_deref()),
            namespace: self.namespace.or(b.namespace.as_deref()),
            principal: self.principal,
            cluster: self.cluster.or(b.cluster_id.as_deref()),
        }
    }
}

/// The destination service's labels.
#[derive(Clone, Debug, Default)]
pub struct ServiceLabels {
    /// The hostname (`destination_service`).
    pub hostname: Value,
    pub namespace: Value,
    pub name: Value,
}

impl ServiceLabels {
    pub fn of(s: &Service) -> Self {
        ServiceLabels {
            hostname: Value::new(&s.hostname),
            namespace: Value::new(&s.namespace),
            name: Value::new(&s.name),
        }
    }
}

/// What ztunnel knows about the two ends of a connection, before labels.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    pub source: PeerLabels,
    pub destination: PeerLabels,
    pub service: ServiceLabels,
}

/// The labels of every `istio_tcp_*` series, in Istio's order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: Value,
    pub source_canonical_service: Value,
    pub source_canonical_revision: Value,
    pub source_workload_namespace: Value,
    pub source_principal: Value,
    pub source_app: Value,
    pub source_version: Value,
    pub source_cluster: Value,
    pub destination_service: Value,
    pub destination_service_namespace: Value,
    pub destination_service_name: Value,
    pub destination_workload: Value,
    pub destination_canonical_service: Value,
    pub destination_canonical_revision: Value,
    pub destination_workload_namespace: Value,
    pub destination_principal: Value,
    pub destination_app: Value,
    pub destination_version: Value,
    pub destination_cluster: Value,
    pub request_protocol: &'static str,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

impl ConnectionLabels {
    /// Labels for a connection; missing values render as `unknown`.
    pub fn new(reporter: Reporter, peers: Peers, mtls: bool) -> Self {
        let Peers { source: s, destination: d, service } = peers;
        ConnectionLabels {
            reporter,
            source_app: s.canonical_service.clone(),
            source_version: s.canonical_revision.clone(),
            source_workload: s.workload,
            source_canonical_service: s.canonical_service,
            source_canonical_revision: s.canonical_revision,
            source_workload_namespace: s.namespace,
            source_principal: s.principal,
            source_cluster: s.cluster,
            destination_service: service.hostname,
            destination_service_namespace: service.namespace,
            destination_service_name: service.name,
            destination_app: d.canonical_service.clone(),
            destination_version: d.canonical_revision.clone(),
            destination_workload: d.workload,
            destination_canonical_service: d.canonical_service,
            destination_canonical_revision: d.canonical_revision,
            destination_workload_namespace: d.namespace,
            destination_principal: d.principal,
            destination_cluster: d.cluster,
            request_protocol: "tcp",
            response_flags: ResponseFlags::None,
            connection_security_policy: if mtls { SecurityPolicy::mutual_tls } else { SecurityPolicy::unknown },
        }
    }
}

/// Labels of `istio_build`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub component: &'static str,
    pub tag: &'static str,
}

/// Direction of a failed connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    inbound,
    outbound,
}

/// Why a connection failed; one label value per failure class.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FailureReason {
    /// TLS handshake failed: no, expired, unknown or wrongly signed certificate.
    tls_handshake,
    /// The peer presented a certificate for another identity than expected.
    identity_mismatch,
    /// An authorization policy denied the connection.
    policy_denied,
    /// A malformed HBONE request (not CONNECT, bad authority, wrong target).
    bad_request,
    /// The upstream (ztunnel or application) could not be reached.
    unreachable,
    /// A service had no healthy endpoint.
    no_healthy_endpoint,
    /// A stream broke mid-way (reset, connection lost).
    stream_error,
    /// No certificate could be obtained for the workload.
    certificate,
    /// The original destination could not be determined, or pointed at ztunnel itself.
    original_destination,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: Direction,
    pub reason: FailureReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// All of ztunnel's metrics.
pub struct Metrics {
    pub connections_opened: Family<ConnectionLabels, Counter>,
    pub connections_closed: Family<ConnectionLabels, Counter>,
    pub sent_bytes: Family<ConnectionLabels, Counter>,
    pub received_bytes: Family<ConnectionLabels, Counter>,
    pub connection_failures: Family<FailureLabels, Counter>,
    pub state_reloads: Family<OutcomeLabels, Counter>,
    pub enrolled_pods: Gauge,
    /// The HBONE pool's (`ztunnel_pooled_connections`, `ztunnel_hbone_retries`).
    pub pool: PoolMetrics,
    pub certificates_issued: Family<OutcomeLabels, Counter>,
    pub connections_closed_by_policy: Counter,
    pub build: Family<BuildLabels, Gauge>,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Metrics {
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            connection_failures: Family::default(),
            state_reloads: Family::default(),
            enrolled_pods: Gauge::default(),
            pool: PoolMetrics::default(),
            certificates_issued: Family::default(),
            connections_closed_by_policy: Counter::default(),
            build: Family::default(),
        };
        // Istio's `istio_build{component="ztunnel",tag="<version>"} 1`.
        m.build.get_or_create(&BuildLabels { component: "ztunnel", tag: env!("CARGO_PKG_VERSION") }).set(1);
        // prometheus-client appends `_total` to counters.
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("tcp_connections_opened", "TCP connections opened", m.connections_opened.clone());
        istio.register("tcp_connections_closed", "TCP connections closed", m.connections_closed.clone());
        istio.register("tcp_sent_bytes", "Bytes sent toward the destination", m.sent_bytes.clone());
        istio.register("tcp_received_bytes", "Bytes received from the destination", m.received_bytes.clone());
        istio.register("build", "Istio component build info", m.build.clone());
        let z = registry.sub_registry_with_prefix("ztunnel");
        z.register(
            "connection_failures",
            "Connections closed because of an error, by direction and reason",
            m.connection_failures.clone(),
        );
        z.register("state_reloads", "State file reloads, by outcome", m.state_reloads.clone());
        z.register("enrolled_pods", "Pods enrolled on this node over ZDS", m.enrolled_pods.clone());
        z.register("pooled_connections", "Open pooled HBONE connections", m.pool.pooled_connections.clone());
        z.register("certificates", "Workload certificates requested, by outcome", m.certificates_issued.clone());
        z.register(
            "connections_closed_by_policy",
            "Open inbound connections closed because a policy change denies them",
            m.connections_closed_by_policy.clone(),
        );
        z.register(
            "hbone_retries",
            "HBONE tunnel requests the peer did not process (GOAWAY, REFUSED_STREAM) and that were sent again on a new connection",
            m.pool.retries.clone(),
        );
        Arc::new(m)
    }

    /// Counts a failed connection.
    pub fn failure(&self, direction: Direction, reason: FailureReason) {
        self.connection_failures.get_or_create(&FailureLabels { direction, reason }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    /// Istio ztunnel's `istio_tcp_*` labels, in its order.
    const ISTIO_LABELS: [&str; 23] = [
        "reporter",
        "source_workload",
        "source_canonical_service",
        "source_canonical_revision",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_cluster",
        "destination_service",
        "destination_service_namespace",
        "destination_service_name",
        "destination_workload",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_cluster",
        "request_protocol",
        "response_flags",
        "connection_security_policy",
    ];

    fn workload(name: &str, canonical: &str, revision: &str) -> Workload {
        Workload {
            name: format!("{name}-0"),
            namespace: "default".into(),
            workload_name: name.into(),
            canonical_name: canonical.into(),
            canonical_revision: revision.into(),
            cluster_id: "Kubernetes".into(),
            ..Default::default()
        }
    }

    /// The label names of the first `metric{…}` line, in order.
    fn label_names<'a>(out: &'a str, metric: &str) -> Vec<&'a str> {
        let line = out.lines().find(|l| l.starts_with(&format!("{metric}{{"))).unwrap_or_else(|| panic!("{out}"));
        let inner = &line[metric.len() + 1..line.rfind('}').unwrap()];
        inner.split("\",").filter_map(|kv| kv.split_once('=')).map(|(k, _)| k.trim_start_matches(',')).collect()
    }

    #[test]
    fn connection_labels_are_istios_full_set_in_its_order() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        let client = workload("client", "client-app", "v1");
        let server = workload("server", "server-app", "");
        let svc = Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            ..Default::default()
        };
        let peers = Peers {
            source: PeerLabels::of(&client).with_principal(&client.identity()),
            destination: PeerLabels::of(&server).with_principal(&server.identity()),
            service: ServiceLabels::of(&svc),
        };
        let l = ConnectionLabels::new(Reporter::source, peers, true);
        m.connections_opened.get_or_create(&l).inc();
        m.sent_bytes.get_or_create(&l).inc_by(42);
        m.failure(Direction::inbound, FailureReason::policy_denied);
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        assert_eq!(label_names(&out, "istio_tcp_connections_opened_total"), ISTIO_LABELS, "{out}");
        let want = "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\",\
            source_canonical_service=\"client-app\",source_canonical_revision=\"v1\",source_workload_namespace=\"default\",\
            source_principal=\"spiffe://cluster.local/ns/default/sa/default\",source_app=\"client-app\",source_version=\"v1\",\
            source_cluster=\"Kubernetes\",destination_service=\"echo.default.svc.cluster.local\",\
            destination_service_namespace=\"default\",destination_service_name=\"echo\",destination_workload=\"server\",\
            destination_canonical_service=\"server-app\",destination_canonical_revision=\"unknown\",\
            destination_workload_namespace=\"default\",destination_principal=\"spiffe://cluster.local/ns/default/sa/default\",\
            destination_app=\"server-app\",destination_version=\"unknown\",destination_cluster=\"Kubernetes\",\
            request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 1";
        assert!(out.contains(want), "{out}");
        assert!(out.contains("istio_tcp_sent_bytes_total{") && out.contains("} 42"), "{out}");
        assert!(
            out.contains("ztunnel_connection_failures_total{direction=\"inbound\",reason=\"policy_denied\"} 1"),
            "{out}"
        );
        let build = format!("istio_build{{component=\"ztunnel\",tag=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert!(out.contains(&build), "{out}");
    }

    #[test]
    fn unknown_values_render_unknown_and_flags_render_istios_names() {
        let l = ConnectionLabels::new(Reporter::destination, Peers::default(), false);
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        m.connections_closed
            .get_or_create(&ConnectionLabels { response_flags: ResponseFlags::Deny, ..l.clone() })
            .inc();
        m.connections_closed.get_or_create(&ConnectionLabels { response_flags: ResponseFlags::Connect, ..l }).inc();
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        let line = out.lines().find(|l| l.contains("response_flags=\"DENY\"")).expect(&out);
        assert!(line.contains("source_workload=\"unknown\",source_canonical_service=\"unknown\""), "{line}");
        assert!(line.contains("connection_security_policy=\"unknown\""), "{line}");
        assert!(out.contains("response_flags=\"CONNECT\""), "{out}");
    }

    #[test]
    fn values_fill_only_unknowns() {
        assert_eq!(Value::new("a").or(Some("b")), Value::new("a"));
        assert_eq!(Value::new("").or(Some("b")), Value::new("b"));
        assert!(Value::new("").or(None).is_unknown());
    }
}
