//! A VirtualService's `tcp[]` → the `ambit.waypoint.v1.TcpRoute` of one TCP service port, as Istio routes at L4: the
//! rules are tried in the order written and the first whose `match` names the port (or that has no `match`) takes
//! every connection to it; `port` is the only L4 match attribute applied (the others fail the parse by name).
//! Destinations resolve as for `http[]` ([`DestinationResolver`]): a destination without a port takes the
//! connection's port, or the Service's only one; a subset is the workloads of a DestinationRule's subset; one that
//! does not resolve becomes an invalid backend, whose share of connections is closed.

use ambit_api::waypoint::{Backend, RouteKind, TcpRoute};

use super::mesh_route_convert::{weight, DestinationResolver, MeshRouteError, PortContext};
use super::mesh_route_crd::{VirtualService, VsTcpRoute};
use super::route_convert::origin;

/// Converts `vs.tcp[]` for the TCP port `at`: the first rule that applies to it, or `None` when none does. Every
/// rule is checked whatever the port, so an invalid one refuses the object as a whole.
pub fn tcp_route(
    vs: &VirtualService,
    at: PortContext,
    dests: &dyn DestinationResolver,
) -> Result<Option<TcpRoute>, MeshRouteError> {
    for (i, r) in vs.spec.tcp.iter().enumerate() {
        check(i, r)?;
    }
    let Some((i, r)) = vs.spec.tcp.iter().enumerate().find(|(_, r)| applies(r, at.port)) else {
        return Ok(None);
    };
    let o = origin(RouteKind::VirtualService, &vs.metadata);
    let all_unweighted = r.route.iter().all(|d| d.weight.is_none());
    let backends = r
        .route
        .iter()
        .map(|d| Backend {
            weight: weight(d.weight, all_unweighted),
            ..dests.resolve(&o.namespace, &d.destination, at.port)
        })
        .collect();
    let rule = u32::try_from(i).unwrap_or(u32::MAX);
    Ok(Some(TcpRoute { origin: Some(o), rule, backends }))
}

fn check(i: usize, r: &VsTcpRoute) -> Result<(), MeshRouteError> {
    if r.route.is_empty() {
        return Err(MeshRouteError::BadTcpRule(i, "a route is required".into()));
    }
    match r.matches.iter().filter_map(|m| m.port).find(|p| !(1..=65535).contains(p)) {
        Some(p) => Err(MeshRouteError::BadTcpRule(i, format!("match port {p} is outside 1-65535"))),
        None => Ok(()),
    }
}

/// Whether rule `r` takes connections to `port` (0, when only validating, takes any).
fn applies(r: &VsTcpRoute, port: u32) -> bool {
    r.matches.is_empty() || r.matches.iter().any(|m| m.port.is_none_or(|p| p == port || port == 0))
}

#[cfg(test)]
#[path = "mesh_route_tcp_tests.rs"]
mod tests;
