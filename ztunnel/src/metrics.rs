//! Prometheus metrics with Istio's L4 names and labels, so dashboards built
//! for Istio's ztunnel work unchanged. Unknown label values render as
//! `unknown`.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

/// The labels of every `istio_tcp_*` series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: SecurityPolicy,
}

/// What ztunnel knows about the two ends of a connection, before labels.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    pub source_workload: Option<String>,
    pub source_namespace: Option<String>,
    pub source_principal: Option<String>,
    pub destination_workload: Option<String>,
    pub destination_namespace: Option<String>,
    pub destination_principal: Option<String>,
    pub destination_service: Option<String>,
}

impl ConnectionLabels {
    /// Labels for a connection; missing values become `unknown`.
    pub fn new(reporter: Reporter, peers: &Peers, mtls: bool) -> Self {
        fn v(o: &Option<String>) -> String {
            o.clone().unwrap_or_else(|| "unknown".to_owned())
        }
        ConnectionLabels {
            reporter,
            source_workload: v(&peers.source_workload),
            source_workload_namespace: v(&peers.source_namespace),
            source_principal: v(&peers.source_principal),
            destination_workload: v(&peers.destination_workload),
            destination_workload_namespace: v(&peers.destination_namespace),
            destination_principal: v(&peers.destination_principal),
            destination_service: v(&peers.destination_service),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if mtls { SecurityPolicy::mutual_tls } else { SecurityPolicy::unknown },
        }
    }
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
    pub pooled_connections: Gauge,
    pub certificates_issued: Family<OutcomeLabels, Counter>,
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
            pooled_connections: Gauge::default(),
            certificates_issued: Family::default(),
        };
        // prometheus-client appends `_total` to counters.
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("tcp_connections_opened", "TCP connections opened", m.connections_opened.clone());
        istio.register("tcp_connections_closed", "TCP connections closed", m.connections_closed.clone());
        istio.register("tcp_sent_bytes", "Bytes sent toward the destination", m.sent_bytes.clone());
        istio.register("tcp_received_bytes", "Bytes received from the destination", m.received_bytes.clone());
        let z = registry.sub_registry_with_prefix("ztunnel");
        z.register(
            "connection_failures",
            "Connections closed because of an error, by direction and reason",
            m.connection_failures.clone(),
        );
        z.register("state_reloads", "State file reloads, by outcome", m.state_reloads.clone());
        z.register("enrolled_pods", "Pods enrolled on this node over ZDS", m.enrolled_pods.clone());
        z.register("pooled_connections", "Open pooled HBONE connections", m.pooled_connections.clone());
        z.register("certificates", "Workload certificates requested, by outcome", m.certificates_issued.clone());
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

    #[test]
    fn metrics_render_with_istio_names_and_unknown_labels() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        let peers = Peers { source_workload: Some("client".into()), ..Default::default() };
        let l = ConnectionLabels::new(Reporter::source, &peers, true);
        m.connections_opened.get_or_create(&l).inc();
        m.sent_bytes.get_or_create(&l).inc_by(42);
        m.failure(Direction::inbound, FailureReason::policy_denied);
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        assert!(out.contains("istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"unknown\""), "{out}");
        assert!(out.contains("istio_tcp_sent_bytes_total{") && out.contains("} 42"), "{out}");
        assert!(out.contains("connection_security_policy=\"mutual_tls\""), "{out}");
        assert!(
            out.contains("ztunnel_connection_failures_total{direction=\"inbound\",reason=\"policy_denied\"} 1"),
            "{out}"
        );
    }
}
