//! The waypoint's routing resources: one `ambit.waypoint.v1.ServiceRoutes` per Service that has a waypoint (its
//! `istio.workload.Address` names one), with its ports' protocols and the HTTPRoutes and GRPCRoutes attached to it
//! (GAMMA: a parentRef to the Service). A route in the Service's namespace is a producer route, for every client; one
//! in another namespace a consumer route, which the waypoint applies only to clients of the route's namespace (it
//! tells them apart by the route's origin namespace). An invalid route is rejected on its own; the others still apply.

use std::collections::{BTreeMap, BTreeSet};

use ambit_api::waypoint::{Backend, PortRoutes, Protocol, Route, RouteKind, ServiceRoutes};
use ambit_api::workload::{address, Address};
use k8s_openapi::api::core::v1::ServicePort;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::objects::{ClusterObjects, ObjectKey};
use super::reference_grant::Grants;
use super::route_convert::{self, BackendResolver};
use super::route_crd::{BackendRef, ParentReference};
use super::{Rejection, Warning};

/// What the routes of one build came to.
#[derive(Debug, Default, PartialEq)]
pub struct RoutesReport {
    /// ServiceRoutes by xDS name `namespace/hostname` (the service's Address name).
    pub by_service: BTreeMap<String, ServiceRoutes>,
    /// Services `(namespace, name)` served by a waypoint: a route attached to one of them is applied.
    pub waypoint_services: BTreeSet<ObjectKey>,
    /// Invalid routes (kind `HTTPRoute`/`GRPCRoute`).
    pub rejections: Vec<Rejection>,
    /// Service parents a valid route is not applied to, and why (no waypoint, another namespace).
    pub warnings: Vec<Warning>,
    /// VirtualServices and TrafficSplits `(kind, namespace, name)` attached to at least one service port.
    pub mesh_routes_applied: BTreeSet<(String, String, String)>,
}

/// Resolves backendRefs against the services of the snapshot.
struct Services<'a> {
    addresses: &'a BTreeMap<String, Address>,
    domain_suffix: &'a str,
    grants: &'a Grants,
    /// `HTTPRoute` or `GRPCRoute`, for the grants.
    route_kind: &'static str,
    /// The route's [`consumer_parent`], the one Service of another namespace it may send to.
    consumer_parent: Option<ObjectKey>,
}

/// The Service of another namespace that a route in `route_ns` may name as a backend without a ReferenceGrant: its
/// parent, when the route is a consumer route with one parent Service (several parentRefs may name its ports). Such
/// a route shapes only its own namespace's requests to that Service and still sends them there, so it reaches nothing
/// its clients could not (the Gateway API's MeshConsumerRoute does this); any other cross-namespace backendRef needs
/// a ReferenceGrant. `service_parents` are the route's parentRefs of kind Service.
pub fn consumer_parent(route_ns: &str, service_parents: impl IntoIterator<Item = ObjectKey>) -> Option<ObjectKey> {
    let parents: BTreeSet<ObjectKey> = service_parents.into_iter().collect();
    match parents.into_iter().collect::<Vec<_>>()[..] {
        [ref only] if only.0 != route_ns => Some(only.clone()),
        _ => None,
    }
}

/// Whether a route of `route_kind` in `route_ns` may send to the Service `backend`: one of its own namespace, its
/// [`consumer_parent`] (`own_parent`), or one a ReferenceGrant in the backend's namespace opens to it.
pub fn backend_permitted(
    grants: &Grants,
    route_kind: &str,
    route_ns: &str,
    own_parent: Option<&ObjectKey>,
    backend: (&str, &str),
) -> bool {
    own_parent.is_some_and(|(pns, name)| pns == backend.0 && name == backend.1)
        || grants.permits_service(route_kind, route_ns, backend)
}

impl BackendResolver for Services<'_> {
    fn resolve(&self, ns: &str, r: &BackendRef) -> Backend {
        let (group, kind) = (r.group.as_deref().unwrap_or(""), r.kind.as_deref().unwrap_or("Service"));
        if !matches!(group, "" | "core") || kind != "Service" {
            return route_convert::invalid(format!(
                "backendRef {group}/{kind} {}: only Services are supported",
                r.name
            ));
        }
        let bns = r.namespace.as_deref().unwrap_or(ns);
        if !backend_permitted(self.grants, self.route_kind, ns, self.consumer_parent.as_ref(), (bns, &r.name)) {
            let why = "RefNotPermitted (no ReferenceGrant in its namespace allows it)";
            return route_convert::invalid(format!("backendRef Service {bns}/{}: {why}", r.name));
        }
        let Some(port) = r.port.filter(|p| (1..=65535).contains(p)) else {
            return route_convert::invalid(format!("backendRef Service {bns}/{}: a valid port is required", r.name));
        };
        let hostname = format!("{}.{bns}.svc.{}", r.name, self.domain_suffix);
        match self.addresses.get(&format!("{bns}/{hostname}")).and_then(|a| a.r#type.as_ref()) {
            Some(address::Type::Service(_)) => route_convert::service(bns, hostname, port),
            _ => route_convert::invalid(format!("backendRef Service {bns}/{}: BackendNotFound", r.name)),
        }
    }
}

/// Builds the Gateway API routing resources from `objects`, given the snapshot's `addresses` (already built); the
/// routes of other APIs (VirtualService, TrafficSplit) are attached to the result afterwards, by `mesh_routes`.
pub fn build(objects: &ClusterObjects, addresses: &BTreeMap<String, Address>, domain_suffix: &str) -> RoutesReport {
    let mut report = RoutesReport::default();
    for ((ns, name), svc) in &objects.services {
        let hostname = format!("{name}.{ns}.svc.{domain_suffix}");
        let key = format!("{ns}/{hostname}");
        let has_waypoint = matches!(
            addresses.get(&key).and_then(|a| a.r#type.as_ref()),
            Some(address::Type::Service(s)) if s.waypoint.is_some()
        );
        if !has_waypoint {
            continue;
        }
        report.waypoint_services.insert((ns.clone(), name.clone()));
        let ports = svc.spec.iter().flat_map(|s| s.ports.iter().flatten()).filter_map(port_routes).collect();
        report.by_service.insert(key, ServiceRoutes { hostname, namespace: ns.clone(), name: name.clone(), ports });
    }
    let grants = Grants::new(objects.reference_grants.iter().map(|((ns, _), g)| (ns.as_str(), &g.spec)));
    let resolver = |route_kind, ns: &str, parents: &[ParentReference]| Services {
        addresses,
        domain_suffix,
        grants: &grants,
        route_kind,
        consumer_parent: consumer_parent(ns, parents.iter().filter(|p| p.is_service()).map(|p| p.key(ns))),
    };
    let mut reject = |kind: &str, key: &ObjectKey, reason: String| {
        report.rejections.push(Rejection { kind: kind.into(), namespace: key.0.clone(), name: key.1.clone(), reason })
    };
    let mut converted: Vec<(&ObjectKey, &[ParentReference], Route)> = Vec::new();
    for (key, r) in &objects.http_routes {
        match route_convert::http_route(r, &resolver("HTTPRoute", &key.0, &r.spec.parent_refs)) {
            Ok(route) => converted.push((key, &r.spec.parent_refs, route)),
            Err(e) => reject("HTTPRoute", key, e.to_string()),
        }
    }
    for (key, r) in &objects.grpc_routes {
        match route_convert::grpc_route(r, &resolver("GRPCRoute", &key.0, &r.spec.parent_refs)) {
            Ok(route) => converted.push((key, &r.spec.parent_refs, route)),
            Err(e) => reject("GRPCRoute", key, e.to_string()),
        }
    }
    for (key, parents, route) in converted {
        let kind = if route.origin.as_ref().is_some_and(|o| o.kind() == RouteKind::GrpcRoute) {
            "GRPCRoute"
        } else {
            "HTTPRoute"
        };
        let mut warn = |reason: String| {
            report.warnings.push(Warning { kind: kind.into(), namespace: key.0.clone(), name: key.1.clone(), reason })
        };
        for p in parents.iter().filter(|p| p.is_service()) {
            let (pns, name) = p.key(&key.0);
            let Some(sr) = report.by_service.get_mut(&format!("{pns}/{name}.{pns}.svc.{domain_suffix}")) else {
                warn(format!("parent Service {pns}/{name} has no waypoint (or does not exist): not applied"));
                continue;
            };
            for port in &mut sr.ports {
                let wanted =
                    p.port.is_none_or(|n| n == port.port) && p.section_name.as_deref().is_none_or(|n| n == port.name);
                // A route with two parentRefs to the same port is attached once.
                let origin = route.origin.as_ref();
                if wanted && !port.routes.iter().any(|r| r.origin.as_ref() == origin) {
                    port.routes.push(route.clone());
                }
            }
        }
    }
    report
}

/// A TCP service port and its protocol; `None` for other protocols or invalid ports (the Service's own build rejects
/// those).
fn port_routes(p: &ServicePort) -> Option<PortRoutes> {
    if !matches!(p.protocol.as_deref(), None | Some("TCP")) {
        return None;
    }
    let port = u32::try_from(p.port).ok().filter(|p| (1..=65535).contains(p))?;
    let target_port = match &p.target_port {
        None => port,
        Some(IntOrString::Int(t)) => u32::try_from(*t).unwrap_or(0),
        Some(IntOrString::String(s)) => s.parse().unwrap_or(0),
    };
    let name = p.name.clone().unwrap_or_default();
    Some(PortRoutes {
        port,
        target_port,
        protocol: protocol(p.app_protocol.as_deref(), &name).into(),
        name,
        routes: vec![],
        tcp_route: None,
        policy: None,
    })
}

/// The protocol of a port, from its `appProtocol`, else its name (`<protocol>` or `<protocol>-<suffix>`), as Istio
/// reads them. TLS is opaque to a waypoint: TCP.
pub fn protocol(app_protocol: Option<&str>, name: &str) -> Protocol {
    let of = |p: &str| match p.to_ascii_lowercase().as_str() {
        "http" | "kubernetes.io/ws" | "kubernetes.io/wss" => Some(Protocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "grpc" | "grpc-web" => Some(Protocol::Grpc),
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => Some(Protocol::Tcp),
        _ => None,
    };
    if let Some(p) = app_protocol.and_then(of) {
        return p;
    }
    let prefix = name.split_once('-').map_or(name, |(p, _)| p);
    if name.eq_ignore_ascii_case("grpc-web") {
        return Protocol::Grpc;
    }
    of(prefix).unwrap_or(Protocol::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_consumer_route_of_one_parent_service_may_name_it_across_namespaces() {
        let key = |ns: &str, n: &str| (ns.to_owned(), n.to_owned());
        let web = key("mesh", "web");
        assert_eq!(consumer_parent("client", [web.clone(), web.clone()]), Some(web.clone()), "two ports of one");
        assert_eq!(consumer_parent("mesh", [web.clone()]), None, "a producer route");
        assert_eq!(consumer_parent("client", [web, key("mesh", "api")]), None, "two parents");
        assert_eq!(consumer_parent("client", []), None);
    }

    #[test]
    fn the_protocol_comes_from_app_protocol_then_the_name() {
        assert_eq!(protocol(Some("kubernetes.io/h2c"), "web"), Protocol::Http2);
        assert_eq!(protocol(Some("grpc"), "http"), Protocol::Grpc, "appProtocol wins");
        assert_eq!(protocol(None, "http-web"), Protocol::Http);
        assert_eq!(protocol(None, "grpc"), Protocol::Grpc);
        assert_eq!(protocol(None, "grpc-web"), Protocol::Grpc);
        assert_eq!(protocol(None, "tcp-db"), Protocol::Tcp);
        assert_eq!(protocol(None, "https"), Protocol::Tcp);
        assert_eq!(protocol(None, "web"), Protocol::Unspecified);
        assert_eq!(protocol(Some("example.com/x"), ""), Protocol::Unspecified);
    }
}
