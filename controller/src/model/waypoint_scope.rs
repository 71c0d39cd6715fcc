//! What each waypoint is sent: the ServiceRoutes of the services bound to it (their Address names it), the L7
//! policies that target it or those services, and the Address resources it needs to pick endpoints: those services,
//! their routes' backend services, the workloads behind any of them, and the workloads that name it as their own
//! waypoint. Computed once per build, so a waypoint's
//! xDS stream looks names up instead of walking routes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ambit_api::waypoint::{backend, filter, policy_target, AuthorizationPolicy, Backend, ServiceRoutes};
use ambit_api::workload::{address, gateway_address, Address};

use super::objects::ObjectKey;
use super::waypoint::WaypointGateway;

/// The resource names one waypoint's stream may receive, per type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointScope {
    /// `ambit.waypoint.v1.ServiceRoutes` names.
    pub service_routes: BTreeSet<String>,
    /// `ambit.waypoint.v1.AuthorizationPolicy` names.
    pub policies: BTreeSet<String>,
    /// `istio.workload.Address` names.
    pub addresses: BTreeSet<String>,
}

/// Which policies reach which waypoints: policy name → waypoint keys.
pub type PolicyWaypoints = BTreeMap<String, BTreeSet<ObjectKey>>;

/// The scope of every waypoint Gateway (also of those that serve nothing yet), and where each policy went.
pub fn build(
    gateways: &[WaypointGateway],
    addresses: &BTreeMap<String, Address>,
    routes: &BTreeMap<String, ServiceRoutes>,
    policies: &BTreeMap<String, AuthorizationPolicy>,
) -> (BTreeMap<ObjectKey, WaypointScope>, PolicyWaypoints) {
    let mut scopes: BTreeMap<ObjectKey, WaypointScope> =
        gateways.iter().map(|g| ((g.namespace.clone(), g.name.clone()), WaypointScope::default())).collect();
    let by_hostname: HashMap<(&str, &str), ObjectKey> = gateways
        .iter()
        .map(|g| ((g.namespace.as_str(), g.hostname.as_str()), (g.namespace.clone(), g.name.clone())))
        .collect();
    // Service name → its waypoint, from the Address (the one truth ztunnel also follows).
    let waypoint_of = |service_key: &str| -> Option<&ObjectKey> {
        let Some(address::Type::Service(s)) = addresses.get(service_key)?.r#type.as_ref() else { return None };
        let Some(gateway_address::Destination::Hostname(h)) = s.waypoint.as_ref()?.destination.as_ref() else {
            return None;
        };
        by_hostname.get(&(h.namespace.as_str(), h.hostname.as_str()))
    };
    // Services each waypoint needs the endpoints of.
    let mut needed_by: HashMap<String, BTreeSet<ObjectKey>> = HashMap::new();
    for (name, sr) in routes {
        let Some(wp) = waypoint_of(name) else { continue };
        let scope = scopes.entry(wp.clone()).or_default();
        scope.service_routes.insert(name.clone());
        let mut services = vec![name.clone()];
        for route in sr.ports.iter().flat_map(|p| &p.routes) {
            for rule in &route.rules {
                let mirrors = rule.filters.iter().chain(rule.backends.iter().flat_map(|b| &b.filters));
                let mirrored = mirrors.filter_map(|f| match &f.kind {
                    Some(filter::Kind::RequestMirror(m)) => m.backend.as_ref(),
                    _ => None,
                });
                services.extend(rule.backends.iter().chain(mirrored).filter_map(service_key));
            }
        }
        let tcp_backends = sr.ports.iter().filter_map(|p| p.tcp_route.as_ref()).flat_map(|t| &t.backends);
        services.extend(tcp_backends.filter_map(service_key));
        for s in services {
            scope.addresses.insert(s.clone());
            needed_by.entry(s).or_default().insert(wp.clone());
        }
    }
    for a in addresses.values() {
        let Some(address::Type::Workload(w)) = &a.r#type else { continue };
        // A workload addressed directly through its waypoint (`istio.io/waypoint-for: workload|all`).
        let own = w.waypoint.as_ref().and_then(|g| match g.destination.as_ref()? {
            gateway_address::Destination::Hostname(h) => by_hostname.get(&(h.namespace.as_str(), h.hostname.as_str())),
            _ => None,
        });
        if let Some(wp) = own {
            scopes.entry(wp.clone()).or_default().addresses.insert(w.uid.clone());
        }
        for s in w.services.keys() {
            for wp in needed_by.get(s).into_iter().flatten() {
                scopes.entry(wp.clone()).or_default().addresses.insert(w.uid.clone());
            }
        }
    }
    let mut bound = PolicyWaypoints::new();
    for (name, p) in policies {
        for t in p.targets.iter().filter_map(|t| t.kind.as_ref()) {
            let wp = match t {
                policy_target::Kind::Gateway(g) => {
                    Some((g.namespace.clone(), g.name.clone())).filter(|k| scopes.contains_key(k))
                }
                policy_target::Kind::Service(s) => waypoint_of(&format!("{}/{}", s.namespace, s.hostname)).cloned(),
            };
            if let Some(wp) = wp {
                scopes.entry(wp.clone()).or_default().policies.insert(name.clone());
                bound.entry(name.clone()).or_default().insert(wp);
            }
        }
    }
    (scopes, bound)
}

/// The Address name of a Service backend.
fn service_key(b: &Backend) -> Option<String> {
    match &b.kind {
        Some(backend::Kind::Service(s)) => Some(format!("{}/{}", s.namespace, s.hostname)),
        _ => None,
    }
}
