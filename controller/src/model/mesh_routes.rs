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
//! traffic is routed: a VirtualService bound to gateways only has no effect here. TCP ports carry no HTTP routes: a
//! VirtualService's `tcp[]` routes them instead (its first rule for the port), unless a route already holds the port.
//! A destination that does not resolve is reported in the object's status (its share of traffic fails).
//!
//! A destination's `subset` is looked up in the DestinationRules for its Service (those of the VirtualService's
//! namespace first, then the Service's) and resolved here to the workloads whose pods carry the subset's labels: the
//! waypoint never sees labels. A DestinationRule's load balancer and outlier detection go with every backend of its
//! Service (and with the Service's own traffic); its other traffic policies are not applied yet, and reported.

use std::collections::{BTreeMap, BTreeSet};

use ambit_api::waypoint::{
    backend, filter, Backend, PortRoutes, Protocol, Route, RouteKind, Subset, TcpRoute, TrafficPolicy,
};
use ambit_api::workload::{address, Address};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::destination_rule as dr_policy;
use super::mesh_route_convert::{self as convert, DestinationResolver, PortContext};
use super::mesh_route_crd::{DestinationRule, VsDestination};
use super::mesh_route_tcp::tcp_route;
use super::objects::{ClusterObjects, ObjectKey};
use super::route_convert;
use super::routes::RoutesReport;
use super::{Rejection, Warning};

const VIRTUAL_SERVICE: &str = "VirtualService";
const TRAFFIC_SPLIT: &str = "TrafficSplit";
const DESTINATION_RULE: &str = "DestinationRule";

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
        let hostname = format!("{name}.{bns}.svc.{}", self.domain_suffix);
        let known = self.addresses.get(&format!("{bns}/{hostname}")).and_then(|a| a.r#type.as_ref());
        let service = (bns, name);
        let (Some(address::Type::Service(_)), Some(svc)) = (known, self.objects.services.get(&service)) else {
            return route_convert::invalid(format!("host {}: no such Service", dest.host));
        };
        let port = match dest.port.as_ref().map(|p| p.number).or_else(|| implied_port(svc, port)) {
            Some(p) if (1..=65535).contains(&p) => p,
            _ => return route_convert::invalid(format!("host {}: the Service has several ports; name one", dest.host)),
        };
        let (subset, policy) = match &dest.subset {
            None => (None, self.rules_for(ns, &service).first().and_then(|dr| dr_policy::policy_for(dr, None, port))),
            Some(subset) => match self.subset(ns, &service, subset, port) {
                Some(found) => found,
                None => {
                    let (bns, name) = &service;
                    return route_convert::invalid(format!(
                        "host {} subset {subset}: no DestinationRule for Service {bns}/{name} (in namespace {ns} or \
                         {bns}) defines it",
                        dest.host
                    ));
                }
            },
        };
        let mut backend = route_convert::service(&service.0, hostname, port);
        if let Some(backend::Kind::Service(s)) = &mut backend.kind {
            (s.subset, s.policy) = (subset, policy);
        }
        backend
    }
}

impl Destinations<'_> {
    /// The DestinationRules whose host is `service`, those of the client's namespace `ns` first, then the
    /// Service's own; the oldest first within each.
    fn rules_for<'s>(&'s self, ns: &str, service: &ObjectKey) -> Vec<&'s DestinationRule> {
        let mut found: Vec<_> = self
            .objects
            .destination_rules
            .iter()
            .filter(|((dns, _), dr)| {
                (dns == ns || *dns == service.0)
                    && self.service_of(dns, &dr.spec.host).as_ref() == Some(service)
                    && dr_policy::check(dr).is_ok()
            })
            .collect();
        found.sort_by_key(|((dns, n), dr)| (dns != ns, age(&dr.metadata), n.clone()));
        found.into_iter().map(|(_, dr)| dr).collect()
    }

    /// Subset `name` of `service`, seen from namespace `ns`: the workloads of the Service's namespace whose pods carry
    /// the subset's labels (the waypoint keeps only the Service's endpoints among them), with the traffic policy at
    /// Service port `port` of the DestinationRule that defines it.
    fn subset(
        &self,
        ns: &str,
        service: &ObjectKey,
        name: &str,
        port: u32,
    ) -> Option<(Option<Subset>, Option<TrafficPolicy>)> {
        let (dr, rule) = self
            .rules_for(ns, service)
            .into_iter()
            .find_map(|dr| dr.spec.subsets.iter().find(|s| s.name == name).map(|s| (dr, s)))?;
        let pods: BTreeSet<&str> = self
            .objects
            .pods
            .iter()
            .filter(|((pns, _), pod)| {
                *pns == service.0
                    && rule.labels.iter().all(|(k, v)| pod.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
            })
            .map(|((_, pname), _)| pname.as_str())
            .collect();
        let workloads = self
            .addresses
            .values()
            .filter_map(|a| match &a.r#type {
                Some(address::Type::Workload(w)) if w.namespace == service.0 && pods.contains(w.name.as_str()) => {
                    Some(w.uid.clone())
                }
                _ => None,
            })
            .collect();
        Some((Some(Subset { name: name.to_owned(), workloads }), dr_policy::policy_for(dr, Some(name), port)))
    }
}

/// The traffic policies of DestinationRules (of the Service's namespace) on every backend no VirtualService
/// destination set one on (HTTPRoute and TrafficSplit backends), and on each served Service's own traffic.
fn apply_traffic_policies(dests: &Destinations<'_>, report: &mut RoutesReport) {
    let policy_of = |ns: &str, name: &str, port: u32| {
        let service = (ns.to_owned(), name.to_owned());
        dests.rules_for(ns, &service).first().and_then(|dr| dr_policy::policy_for(dr, None, port))
    };
    for sr in report.by_service.values_mut() {
        for port in &mut sr.ports {
            port.policy = policy_of(&sr.namespace, &sr.name, port.port);
            let rules = port.routes.iter_mut().flat_map(|r| r.rules.iter_mut());
            let http = rules.flat_map(|rule| {
                let mirrors = rule.filters.iter_mut().filter_map(|f| match &mut f.kind {
                    Some(filter::Kind::RequestMirror(m)) => m.backend.as_mut(),
                    _ => None,
                });
                rule.backends.iter_mut().chain(mirrors)
            });
            let tcp = port.tcp_route.iter_mut().flat_map(|t| t.backends.iter_mut());
            for b in http.chain(tcp) {
                if let Some(backend::Kind::Service(s)) = &mut b.kind {
                    if s.policy.is_none() && s.subset.is_none() {
                        let name = s.hostname.split('.').next().unwrap_or_default();
                        s.policy = policy_of(&s.namespace, name, s.port);
                    }
                }
            }
        }
    }
}

/// `namespace/hostname` of every Service that a route of a served Service sends to (backends, mirrors, TCP routes).
fn backend_services(report: &RoutesReport) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for port in report.by_service.values().flat_map(|sr| sr.ports.iter()) {
        let rules = port.routes.iter().flat_map(|r| r.rules.iter());
        let http = rules.flat_map(|rule| {
            let mirrors = rule.filters.iter().filter_map(|f| match &f.kind {
                Some(filter::Kind::RequestMirror(m)) => m.backend.as_ref(),
                _ => None,
            });
            rule.backends.iter().chain(mirrors)
        });
        for b in http.chain(port.tcp_route.iter().flat_map(|t| t.backends.iter())) {
            if let Some(backend::Kind::Service(s)) = &b.kind {
                out.insert(format!("{}/{}", s.namespace, s.hostname));
            }
        }
    }
    out
}

fn age(meta: &ObjectMeta) -> i64 {
    meta.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second())
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
    let mut virtual_services: Vec<_> = objects.virtual_services.iter().collect();
    virtual_services.sort_by_key(|(key, vs)| (age(&vs.metadata), *key));
    for (key, vs) in virtual_services {
        let mut notes = Notes { kind: VIRTUAL_SERVICE, key, report: &mut *report };
        let any_port = PortContext { port: 0 };
        let valid = convert::virtual_service(vs, any_port, &dests).and_then(|_| tcp_route(vs, any_port, &dests));
        if let Err(e) = valid {
            notes.reject(e.to_string());
            continue;
        }
        if !vs.spec.gateways.is_empty() && !vs.spec.gateways.iter().any(|g| g == "mesh") {
            notes.warn("bound to gateways only (no `mesh` in gateways): not applied at waypoints".into());
            continue;
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
            let http = |port: u32| convert::virtual_service(vs, PortContext { port }, &dests).ok().flatten();
            let tcp = |port: u32| tcp_route(vs, PortContext { port }, &dests).ok().flatten();
            notes.attach(&service, domain_suffix, http, tcp);
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
        let http = |port| convert::traffic_split(ts, PortContext { port }, &dests).ok();
        notes.attach(&apex, domain_suffix, http, |_| None);
    }
    check_destination_rules(&dests, report);
    apply_traffic_policies(&dests, report);
}

/// DestinationRules: their subsets are used by the routes that name them; what they carry that the waypoint does not
/// apply is reported, and one for a Service that no waypoint serves or sends to has no effect.
fn check_destination_rules(dests: &Destinations<'_>, report: &mut RoutesReport) {
    let backends = backend_services(report);
    for (key, dr) in &dests.objects.destination_rules {
        let mut notes = Notes { kind: DESTINATION_RULE, key, report: &mut *report };
        if let Err(why) = dr_policy::check(dr) {
            notes.reject(why);
            continue;
        }
        let left_out = dr_policy::not_applied_in(dr);
        if !left_out.is_empty() {
            notes.warn(format!("not applied yet: {}", left_out.join(", ")));
        }
        let Some((ns, name)) = dests.service_of(&key.0, &dr.spec.host) else {
            notes.warn(format!("host {}: not a Service name; not applied", dr.spec.host));
            continue;
        };
        let service = format!("{ns}/{name}.{ns}.svc.{}", dests.domain_suffix);
        if notes.report.by_service.contains_key(&service) || backends.contains(&service) {
            notes.report.mesh_routes_applied.insert((DESTINATION_RULE.into(), key.0.clone(), key.1.clone()));
        } else {
            notes.warn(format!(
                "Service {ns}/{name} has no waypoint and no route a waypoint serves sends to it (or it does not \
                 exist): not applied"
            ));
        }
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

    /// Attaches `http(port)` to every HTTP-capable port of `service`, and `tcp(port)` to every TCP port, that no
    /// other route holds; a destination that does not resolve is reported.
    fn attach(
        &mut self,
        service: &ObjectKey,
        domain_suffix: &str,
        http: impl Fn(u32) -> Option<Route>,
        tcp: impl Fn(u32) -> Option<TcpRoute>,
    ) {
        let (ns, name) = service;
        let Some(sr) = self.report.by_service.get_mut(&format!("{ns}/{name}.{ns}.svc.{domain_suffix}")) else {
            self.warn(format!("Service {ns}/{name} has no waypoint (or does not exist): not applied"));
            return;
        };
        let mut problems = Vec::new();
        let mut unresolved = BTreeSet::new();
        let mut applied = false;
        for port in &mut sr.ports {
            let routing = if port.protocol() == Protocol::Tcp {
                tcp(port.port).map(PortRouting::Tcp)
            } else {
                http(port.port).map(PortRouting::Http)
            };
            let Some(routing) = routing else { continue };
            if let Some(holder) = holder(port) {
                problems
                    .push(format!("Service {ns}/{name} port {}: {holder} applies there; not applied there", port.port));
                continue;
            }
            unresolved.extend(routing.unresolved());
            match routing {
                PortRouting::Http(r) => port.routes.push(r),
                PortRouting::Tcp(t) => port.tcp_route = Some(t),
            }
            applied = true;
        }
        for p in problems.into_iter().chain(unresolved) {
            self.warn(p);
        }
        if applied {
            let (namespace, name) = self.key.clone();
            self.report.mesh_routes_applied.insert((self.kind.into(), namespace, name));
        }
    }
}

/// What one object routes on one service port.
enum PortRouting {
    Http(Route),
    Tcp(TcpRoute),
}

impl PortRouting {
    /// Why each destination that does not resolve fails, and what that costs.
    fn unresolved(&self) -> Vec<String> {
        let (backends, cost): (Vec<&Backend>, _) = match self {
            PortRouting::Http(r) => {
                (r.rules.iter().flat_map(|r| &r.backends).collect(), "its share of requests is answered 500")
            }
            PortRouting::Tcp(t) => (t.backends.iter().collect(), "its share of connections is closed"),
        };
        backends
            .into_iter()
            .filter_map(|b| match &b.kind {
                Some(backend::Kind::Invalid(why)) => Some(format!("{why}: {cost}")),
                _ => None,
            })
            .collect()
    }
}

/// What already routes a port, in words: a Gateway API route wins over a VirtualService, which wins over a
/// TrafficSplit, and an older object of one kind over a younger one.
fn holder(port: &PortRoutes) -> Option<String> {
    let first = match port.routes.first() {
        Some(r) => r.origin.as_ref()?,
        None => port.tcp_route.as_ref()?.origin.as_ref()?,
    };
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
