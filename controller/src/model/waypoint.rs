//! Waypoints: Gateways of a waypoint class, and which one a service or
//! workload uses (`istio.io/use-waypoint` on the object, else its namespace).

use std::collections::{BTreeMap, HashMap};

use ambit_api::workload::{gateway_address, GatewayAddress, NamespacedHostname};

use super::objects::ClusterObjects;

/// Gateway classes that make a waypoint.
pub const WAYPOINT_CLASSES: [&str; 2] = ["ambit-waypoint", "istio-waypoint"];
/// `controllerName` of Ambit's own class (`ambit-waypoint`), and of the route status entries for GAMMA Service
/// parents. The shipped `manifests/core/gatewayclass.yaml` must use this value.
pub const AMBIT_CONTROLLER_NAME: &str = "ambit-mesh.github.io/mesh-controller";
/// `controllerName` of Istio's `istio-waypoint` class, kept so that manifests and tools written for Istio ambient see
/// the class they expect; Ambit serves it in Istio's place.
pub const ISTIO_MESH_CONTROLLER_NAME: &str = "istio.io/mesh-controller";
/// The `controllerName`s Ambit answers for: a waypoint GatewayClass naming one of them is accepted, and route status
/// entries carrying one of them are Ambit's to rewrite.
pub const CONTROLLER_NAMES: [&str; 2] = [AMBIT_CONTROLLER_NAME, ISTIO_MESH_CONTROLLER_NAME];

/// The `controllerName` a waypoint class is shipped with (`None`: not a waypoint class). Route status entries for a
/// Gateway of the class carry it, as the Gateway API asks (it "corresponds with the controllerName field on
/// GatewayClass").
pub fn class_controller(class: &str) -> Option<&'static str> {
    match class {
        "ambit-waypoint" => Some(AMBIT_CONTROLLER_NAME),
        "istio-waypoint" => Some(ISTIO_MESH_CONTROLLER_NAME),
        _ => None,
    }
}
/// Label naming the waypoint an object's traffic goes through (`none` opts out).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Label naming the namespace of that waypoint (default: the object's).
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Gateway label saying which traffic a waypoint handles.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// Port of a waypoint's HBONE listener.
pub const HBONE_PORT: u32 = 15008;

/// What traffic a waypoint handles (`istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointFor {
    /// Traffic addressed to services (the default).
    Service,
    /// Traffic addressed to workloads directly.
    Workload,
    /// Both.
    All,
    /// Neither.
    None,
}

impl WaypointFor {
    fn parse(v: Option<&str>) -> Self {
        match v {
            Some("workload") => Self::Workload,
            Some("all") => Self::All,
            Some("none") => Self::None,
            _ => Self::Service,
        }
    }
    fn services(self) -> bool {
        matches!(self, Self::Service | Self::All)
    }
    fn workloads(self) -> bool {
        matches!(self, Self::Workload | Self::All)
    }
}

/// A waypoint Gateway, as the waypoint deployment controller needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointGateway {
    /// Namespace of the Gateway.
    pub namespace: String,
    /// Name of the Gateway.
    pub name: String,
    /// Its class (`ambit-waypoint` or `istio-waypoint`).
    pub class: String,
    /// Which traffic it handles.
    pub waypoint_for: WaypointFor,
    /// The hostname ztunnels send its traffic to: `<name>.<ns>.svc.<suffix>`.
    pub hostname: String,
}

/// All waypoint Gateways of `objects`, in (namespace, name) order.
pub fn waypoints(objects: &ClusterObjects, domain_suffix: &str) -> Vec<WaypointGateway> {
    objects
        .gateways
        .iter()
        .filter(|(_, g)| WAYPOINT_CLASSES.contains(&g.spec.gateway_class_name.as_str()))
        .map(|((ns, name), g)| WaypointGateway {
            namespace: ns.clone(),
            name: name.clone(),
            class: g.spec.gateway_class_name.clone(),
            waypoint_for: WaypointFor::parse(
                g.metadata.labels.as_ref().and_then(|l| l.get(WAYPOINT_FOR_LABEL)).map(String::as_str),
            ),
            hostname: format!("{name}.{ns}.svc.{domain_suffix}"),
        })
        .collect()
}

/// Waypoints by (namespace, name), for resolving labels.
#[derive(Debug, Default)]
pub struct WaypointIndex<'a> {
    by_key: HashMap<(&'a str, &'a str), &'a WaypointGateway>,
}

/// The result of resolving an object's waypoint label.
#[derive(Debug, PartialEq)]
pub enum Resolved {
    /// No label (or `none`), or the waypoint does not handle this kind of traffic.
    NoWaypoint,
    /// The waypoint's address.
    Waypoint(GatewayAddress),
    /// The label names a Gateway that does not exist (or is not a waypoint).
    Missing(String),
}

impl<'a> WaypointIndex<'a> {
    /// Indexes `gateways`.
    pub fn new(gateways: &'a [WaypointGateway]) -> Self {
        let by_key = gateways.iter().map(|g| ((g.namespace.as_str(), g.name.as_str()), g)).collect();
        Self { by_key }
    }

    /// The waypoint of an object in `ns` with `labels`, whose namespace has `ns_labels`;
    /// `for_workload` picks which `waypoint-for` values apply.
    pub fn resolve(
        &self,
        ns: &str,
        labels: Option<&BTreeMap<String, String>>,
        ns_labels: Option<&BTreeMap<String, String>>,
        for_workload: bool,
    ) -> Resolved {
        // The object's own label wins over its namespace's, including `none`.
        let source = [labels, ns_labels].into_iter().flatten().find(|l| l.contains_key(USE_WAYPOINT_LABEL));
        let Some(l) = source else {
            return Resolved::NoWaypoint;
        };
        let name = l[USE_WAYPOINT_LABEL].as_str();
        if name == "none" || name.is_empty() {
            return Resolved::NoWaypoint;
        }
        let wp_ns = l.get(USE_WAYPOINT_NAMESPACE_LABEL).map_or(ns, String::as_str);
        let Some(g) = self.by_key.get(&(wp_ns, name)) else {
            return Resolved::Missing(format!("{wp_ns}/{name}"));
        };
        let applies = if for_workload { g.waypoint_for.workloads() } else { g.waypoint_for.services() };
        if !applies {
            return Resolved::NoWaypoint;
        }
        Resolved::Waypoint(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: g.namespace.clone(),
                hostname: g.hostname.clone(),
            })),
            hbone_mtls_port: HBONE_PORT,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(ns: &str, name: &str, waypoint_for: WaypointFor) -> WaypointGateway {
        WaypointGateway {
            namespace: ns.into(),
            name: name.into(),
            class: "istio-waypoint".into(),
            waypoint_for,
            hostname: format!("{name}.{ns}.svc.cluster.local"),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_waypoint_class_has_a_controller_name_of_ours() {
        for class in WAYPOINT_CLASSES {
            assert!(class_controller(class).is_some_and(|c| CONTROLLER_NAMES.contains(&c)), "{class}");
        }
        assert_eq!(class_controller("istio"), None);
    }

    #[test]
    fn object_label_beats_namespace_label_and_none_opts_out() {
        let gws = [gw("default", "wp", WaypointFor::Service), gw("default", "other", WaypointFor::Service)];
        let idx = WaypointIndex::new(&gws);
        let ns = labels(&[(USE_WAYPOINT_LABEL, "wp")]);
        let own = labels(&[(USE_WAYPOINT_LABEL, "other")]);
        let Resolved::Waypoint(a) = idx.resolve("default", Some(&own), Some(&ns), false) else {
            panic!("want a waypoint")
        };
        let Some(gateway_address::Destination::Hostname(h)) = a.destination else { panic!() };
        assert_eq!(h.hostname, "other.default.svc.cluster.local");
        assert_eq!(a.hbone_mtls_port, 15008);
        let none = labels(&[(USE_WAYPOINT_LABEL, "none")]);
        assert_eq!(idx.resolve("default", Some(&none), Some(&ns), false), Resolved::NoWaypoint);
    }

    #[test]
    fn waypoint_for_decides_between_services_and_workloads() {
        let gws = [gw("default", "svc", WaypointFor::Service), gw("default", "wl", WaypointFor::Workload)];
        let idx = WaypointIndex::new(&gws);
        let svc = labels(&[(USE_WAYPOINT_LABEL, "svc")]);
        let wl = labels(&[(USE_WAYPOINT_LABEL, "wl")]);
        assert!(matches!(idx.resolve("default", Some(&svc), None, false), Resolved::Waypoint(_)));
        assert_eq!(idx.resolve("default", Some(&svc), None, true), Resolved::NoWaypoint);
        assert!(matches!(idx.resolve("default", Some(&wl), None, true), Resolved::Waypoint(_)));
        assert_eq!(idx.resolve("default", Some(&wl), None, false), Resolved::NoWaypoint);
    }

    #[test]
    fn missing_gateway_is_reported_and_namespace_label_moves_the_lookup() {
        let gws = [gw("infra", "wp", WaypointFor::All)];
        let idx = WaypointIndex::new(&gws);
        let l = labels(&[(USE_WAYPOINT_LABEL, "wp")]);
        assert_eq!(idx.resolve("default", Some(&l), None, false), Resolved::Missing("default/wp".into()));
        let l = labels(&[(USE_WAYPOINT_LABEL, "wp"), (USE_WAYPOINT_NAMESPACE_LABEL, "infra")]);
        assert!(matches!(idx.resolve("default", Some(&l), None, false), Resolved::Waypoint(_)));
    }
}
