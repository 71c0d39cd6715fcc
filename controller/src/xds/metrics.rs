//! xDS server metrics (prometheus-client).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::version::ResourceType;

/// The `type` label: a resource type, `unknown` for type URLs this server
/// does not serve.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TypeLabel {
    /// `istio.workload.Address`.
    address,
    /// `istio.security.Authorization`.
    authorization,
    /// `ambit.waypoint.v1.ServiceRoutes`.
    service_routes,
    /// `ambit.waypoint.v1.AuthorizationPolicy`.
    waypoint_policy,
    /// Anything else.
    unknown,
}

impl From<Option<ResourceType>> for TypeLabel {
    fn from(t: Option<ResourceType>) -> Self {
        match t {
            Some(ResourceType::Address) => TypeLabel::address,
            Some(ResourceType::Authorization) => TypeLabel::authorization,
            Some(ResourceType::ServiceRoutes) => TypeLabel::service_routes,
            Some(ResourceType::WaypointPolicy) => TypeLabel::waypoint_policy,
            None => TypeLabel::unknown,
        }
    }
}

/// Labels of the per-type counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// The resource type.
    pub r#type: TypeLabel,
}

/// Counters and gauges of the xDS server.
#[derive(Debug)]
pub struct XdsMetrics {
    connected: Gauge,
    pushes: Family<TypeLabels, Counter>,
    acks: Family<TypeLabels, Counter>,
    nacks: Family<TypeLabels, Counter>,
    push_latency: Histogram,
}

impl XdsMetrics {
    /// Creates the metrics and registers them (prefix `ambit_xds_`).
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = XdsMetrics {
            connected: Gauge::default(),
            pushes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            // 100 µs .. ~13 s
            push_latency: Histogram::new(exponential_buckets(0.0001, 4.0, 9)),
        };
        let reg = registry.sub_registry_with_prefix("ambit_xds");
        reg.register("connected_clients", "Connected xDS streams", m.connected.clone());
        // prometheus-client appends `_total` to counters.
        reg.register("pushes", "xDS responses sent, by resource type", m.pushes.clone());
        reg.register("acks", "xDS responses acknowledged, by resource type", m.acks.clone());
        reg.register("nacks", "xDS responses rejected by the client, by resource type", m.nacks.clone());
        reg.register(
            "push_latency_seconds",
            "Time from a snapshot's publication to sending its delta to a client",
            m.push_latency.clone(),
        );
        Arc::new(m)
    }

    /// Counts a connected stream until the guard drops.
    pub(crate) fn connected(self: &Arc<Self>) -> ConnectedGuard {
        self.connected.inc();
        ConnectedGuard(self.clone())
    }

    pub(crate) fn push(&self, ty: ResourceType) {
        self.pushes.get_or_create(&labels(Some(ty))).inc();
    }

    pub(crate) fn ack(&self, ty: Option<ResourceType>) {
        self.acks.get_or_create(&labels(ty)).inc();
    }

    pub(crate) fn nack(&self, ty: Option<ResourceType>) {
        self.nacks.get_or_create(&labels(ty)).inc();
    }

    pub(crate) fn push_latency(&self, d: Duration) {
        self.push_latency.observe(d.as_secs_f64());
    }

    /// Currently connected streams.
    pub fn connected_clients(&self) -> i64 {
        self.connected.get()
    }

    /// Responses sent of one type.
    pub fn pushes(&self, ty: ResourceType) -> u64 {
        self.pushes.get_or_create(&labels(Some(ty))).get()
    }

    /// ACKs received for one type.
    pub fn acks(&self, ty: ResourceType) -> u64 {
        self.acks.get_or_create(&labels(Some(ty))).get()
    }

    /// NACKs received for one type.
    pub fn nacks(&self, ty: ResourceType) -> u64 {
        self.nacks.get_or_create(&labels(Some(ty))).get()
    }
}

fn labels(ty: Option<ResourceType>) -> TypeLabels {
    TypeLabels { r#type: ty.into() }
}

/// Decrements the connected gauge on drop, whatever ends the stream.
#[derive(Debug)]
pub(crate) struct ConnectedGuard(Arc<XdsMetrics>);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.connected.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn metrics_render_with_type_labels_and_total_suffix() {
        let mut reg = Registry::default();
        let m = XdsMetrics::new(&mut reg);
        m.push(ResourceType::Address);
        m.nack(None);
        let g = m.connected();
        m.push_latency(Duration::from_millis(2));
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        assert!(out.contains("ambit_xds_pushes_total{type=\"address\"} 1"), "{out}");
        assert!(out.contains("ambit_xds_nacks_total{type=\"unknown\"} 1"), "{out}");
        assert!(out.contains("ambit_xds_connected_clients 1"), "{out}");
        assert!(out.contains("ambit_xds_push_latency_seconds_count 1"), "{out}");
        drop(g);
        assert_eq!(m.connected_clients(), 0);
    }
}
