//! Attaches VirtualServices and TrafficSplits to the service ports of waypoint-served Services, after the Gateway API
//! routes ([`super::routes`]). One port runs one kind of routing, by a fixed order a user can predict:
//!
//! 1. HTTPRoute / GRPCRoute attached to the port: they win, as Istio documents for ambient; a VirtualService or
//!    TrafficSplit for that Service is not applied there, and its status says so;
//! 2. else the oldest VirtualService (then by name) whose `hosts` name the Service; younger ones are reported;
//! 3. else the oldest TrafficSplit whose apex is the Service.
//!
//! A VirtualService applies only to Services of its own namespace (its routes then run at their waypoint); a host in
//! another namespace is reported and left alone, so one namespace cannot re-route another's Service. Only mesh
//! traffic is routed: a VirtualService bound to gateways only has no effect here. TCP ports carry no HTTP routes.

use std::collections::BTreeMap;

use ambit_api::waypoint::{Backend, PortRoutes, Protocol, RouteKind};
use ambit_api::workload::{address, Address};
use k8s_openapi::api::core::v1::Service;

use super::mesh_route_convert::{self as convert, DestinationResolver, PortContext};
use super::mesh_route_crd::VsDestination;
use super::objects::{ClusterObjects, ObjectKey};
use super::route_convert;
use super::routes::RoutesReport;
use super::{Rejection, Warning};

const VIRTUAL_SERVICE: &str = "VirtualService";
const TRAFFIC_SPLIT: &str = "TrafficSplit";

/// Resolves destination hosts against the Services of the snapshot.
struct Destinations<'a> {
    objects: &'a ClusterObjects,
    addresses: &'a BTreeMap<String, Address>,
    domain_suffix: &'a str,
}

impl Destinations<'_> {
    /// `(namespace, name)` of the Service `host` names, seen from `ns`: `name`, `name.namespace`,
    /// `name.namespace.svc`, or the FQDN. `None` for a host that is not a Service name (external, wildcard).
    fn service_of(&self, ns: &str, host: &str) -> Option<ObjectKey> {
        let host = host.trim_end_matches('.');
        let host = host.strip_suffix(&format!(".svc.{}", self.domain_suffix)).unwrap_or(host);
        let host = host.strip_suffix(".svc").unwrap_or(host);
        match host.split('.').collect::<Vec<_>>()[..] {
            [name] if !name.is_empty() && name != "*" => Some((ns.into(), name.into())),
            [name, namespace] if !name.is_empty() && !namespace.is_empty() => Some((namespace.into(), name.into())),
            _ => None,
        }
    }
}

impl DestinationResolver for Destinations<'_> {
    fn resolve(&self, ns: &str, dest: &VsDestination, port: u32) -> Backend {
        let Some((bns, name)) = self.service_of(ns, &dest.host) else {
            return route_convert::invalid(format!("host {}: not a Service of the mesh", dest.host));
        };
        if let Some(subset) = &dest.subset {
            return route_convert::invalid(format!(
                "host {} subset {subset}: DestinationRule subsets are not applied yet",
                dest.host
            ));
        }
        let hostname = format!("{name}.{bns}.svc.{}", self.domain_suffix);
        let known = self.addresses.get(&format!("{bns}/{hostname}")).and_then(|a| a.r#type.as_ref());
        let (Some(address::Type::Service(_)), Some(svc)) = (known, self.objects.services.get(&(bns.clone(), name)))
        else {
            return route_convert::invalid(format!("host {}: no such Service", dest.host));
        };
        match dest.port.as_ref().map(|p| p.number).or_else(|| implied_port(svc, port)) {
            Some(p) if (1..=65535).contains(&p) => route_convert::service(&bns, hostname, p),
            _ => route_convert::invalid(format!("host {}: the Service has several ports; name one", dest.host)),
        }
    }
}

/// Istio's port for a destination without one: the Service's only port, else the port the request came in on (0 when
/// only validating, which any port satisfies).
fn implied_port(svc: &Service, request_port: u32) -> Option<u32> {
    let ports: Vec<u32> =
        svc.spec.iter().flat_map(|s| s.ports.iter().flatten()).filter_map(|p| u32::try_from(p.port).ok()).collect();
    match ports[..] {
        [only] => Some(only),
        _ if request_port == 0 => ports.first().copied(),
        _ => ports.contains(&request_port).then_some(request_port),
    }
}

/// Attaches the VirtualServices and TrafficSplits of `objects` to `report.by_service`, reporting rejections,
/// warnings and what was applied.
pub fn attach(
    objects: &ClusterObjects,
    addresses: &BTreeMap<String, Address>,
    domain_suffix: &str,
    report: &mut RoutesReport,
) {
    let dests = Destinations { objects, addresses, domain_suffix };
    let age = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second())
    };
    let mut virtual_services: Vec<_> = objects.virtual_services.iter().collect();
    virtual_services.sort_by_key(|(key, vs)| (age(&vs.metadata), *key));
    for (key, vs) in virtual_services {
        let mut notes = Notes { kind: VIRTUAL_SERVICE, key, report: &mut *report };
        if let Err(e) = convert::virtual_service(vs, PortContext { port: 0 }, &dests) {
            notes.reject(e.to_string());
            continue;
        }
        if !vs.spec.gateways.is_empty() && !vs.spec.gateways.iter().any(|g| g == "mesh") {
            notes.warn("bound to gateways only (no `mesh` in gateways): not applied at waypoints".into());
            continue;
        }
        if !vs.spec.tcp.is_empty() {
            notes.warn("tcp routes are not applied yet: TCP traffic goes to the Service itself".into());
        }
        for host in &vs.spec.hosts {
            let Some(service) = dests.service_of(&key.0, host) else {
                notes.warn(format!("host {host}: not a Service name; not applied"));
                continue;
            };
            if service.0 != key.0 {
                notes.warn(format!(
                    "host {host}: a VirtualService applies only to Services of its own namespace; not applied"
                ));
                continue;
            }
            let convert = |port: u32| convert::virtual_service(vs, PortContext { port }, &dests).ok().flatten();
            notes.attach(&service, domain_suffix, convert);
        }
    }
    let mut splits: Vec<_> = objects.traffic_splits.iter().collect();
    splits.sort_by_key(|(key, ts)| (age(&ts.metadata), *key));
    for (key, ts) in splits {
        let mut notes = Notes { kind: TRAFFIC_SPLIT, key, report: &mut *report };
        if let Err(e) = convert::traffic_split(ts, PortContext { port: 0 }, &dests) {
            notes.reject(e.to_string());
            continue;
        }
        let apex = (key.0.clone(), ts.spec.service.clone());
        notes.attach(&apex, domain_suffix, |port| convert::traffic_split(ts, PortContext { port }, &dests).ok());
    }
}

/// What one object's attachment reports.
struct Notes<'r> {
    kind: &'static str,
    key: &'r ObjectKey,
    report: &'r mut RoutesReport,
}

impl Notes<'_> {
    fn reject(&mut self, reason: String) {
        let (namespace, name) = self.key.clone();
        self.report.rejections.push(Rejection { kind: self.kind.into(), namespace, name, reason });
    }

    fn warn(&mut self, reason: String) {
        let (namespace, name) = self.key.clone();
        self.report.warnings.push(Warning { kind: self.kind.into(), namespace, name, reason });
    }

    /// Attaches `route(port)` to every HTTP-capable port of `service` that no other route holds.
    fn attach(
        &mut self,
        service: &ObjectKey,
        domain_suffix: &str,
        route: impl Fn(u32) -> Option<ambit_api::waypoint::Route>,
    ) {
        let (ns, name) = service;
        let Some(sr) = self.report.by_service.get_mut(&format!("{ns}/{name}.{ns}.svc.{domain_suffix}")) else {
            self.warn(format!("Service {ns}/{name} has no waypoint (or does not exist): not applied"));
            return;
        };
        let mut problems = Vec::new();
        let mut applied = false;
        for port in sr.ports.iter_mut().filter(|p| p.protocol() != Protocol::Tcp) {
            if let Some(holder) = holder(port) {
                problems.push(format!("Service {ns}/{name} port {}: {holder} applies there", port.port));
                continue;
            }
            if let Some(r) = route(port.port) {
                port.routes.push(r);
                applied = true;
            }
        }
        for p in problems {
            self.warn(format!("{p}; not applied there"));
        }
        if applied {
            let (namespace, name) = self.key.clone();
            self.report.mesh_routes_applied.insert((self.kind.into(), namespace, name));
        }
    }
}

/// What already routes a port, in words: a Gateway API route wins over a VirtualService, which wins over a
/// TrafficSplit, and an older object of one kind over a younger one.
fn holder(port: &PortRoutes) -> Option<String> {
    let first = port.routes.first()?.origin.as_ref()?;
    let kind = match first.kind() {
        RouteKind::HttpRoute => "HTTPRoute",
        RouteKind::GrpcRoute => "GRPCRoute",
        RouteKind::VirtualService => VIRTUAL_SERVICE,
        RouteKind::TrafficSplit => TRAFFIC_SPLIT,
        RouteKind::Unspecified => "a route",
    };
    Some(format!("{kind} {}/{}", first.namespace, first.name))
}

#[cfg(test)]
#[path = "mesh_routes_tests.rs"]
mod tests;
