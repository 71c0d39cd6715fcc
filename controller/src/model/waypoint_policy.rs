//! Istio's implicit allow-from-waypoint policy (istiod's
//! `PILOT_AUTO_ALLOW_WAYPOINT_POLICY`, off by default there and here:
//! `--auto-allow-waypoint-policy`).
//!
//! When on, each waypoint gets an ALLOW policy for its own identity, named
//! `istio_allow_waypoint_<namespace>_<name>` (an `_` no Kubernetes name can
//! hold), and every workload a waypoint serves — its own waypoint, or the
//! waypoint of a service it backs — lists that policy. The workload then has
//! an ALLOW policy, so a client that goes straight to it around the waypoint
//! is refused by its ztunnel unless another ALLOW admits it; DENY policies
//! still apply first. Sent as an ordinary `istio.security.Authorization`, as
//! istiod does, so Istio's ztunnel enforces it too.

use std::collections::{BTreeMap, HashMap};

use ambit_api::security::{string_match::MatchType, Action, Authorization, Clause, Match, Rule, Scope, StringMatch};
use ambit_api::workload::{address, gateway_address, Address, GatewayAddress, Workload};

use super::waypoint::WaypointGateway;

/// The implicit policies of `gateways`, and which workloads list them.
pub struct ImplicitPolicies<'a> {
    by_hostname: HashMap<(&'a str, &'a str), &'a WaypointGateway>,
    trust_domain: &'a str,
}

impl<'a> ImplicitPolicies<'a> {
    /// For the waypoints `gateways`, whose identities are in `trust_domain`.
    pub fn new(gateways: &'a [WaypointGateway], trust_domain: &'a str) -> Self {
        let by_hostname = gateways.iter().map(|g| ((g.namespace.as_str(), g.hostname.as_str()), g)).collect();
        Self { by_hostname, trust_domain }
    }

    /// Adds to `w` the implicit policy of each waypoint that serves it (its
    /// own, and those of the services in `addresses` it backs), and those
    /// policies to `policies`.
    pub fn attach(
        &self,
        w: &mut Workload,
        addresses: &BTreeMap<String, Address>,
        policies: &mut BTreeMap<String, Authorization>,
    ) {
        let of_services = w.services.keys().filter_map(|key| match addresses.get(key)?.r#type.as_ref()? {
            address::Type::Service(s) => s.waypoint.as_ref(),
            address::Type::Workload(_) => None,
        });
        let mut added = false;
        for wp in w.waypoint.iter().chain(of_services) {
            let Some(g) = self.gateway(wp) else { continue };
            let key = format!("{}/{}", g.namespace, policy_name(g));
            if !w.authorization_policies.contains(&key) {
                w.authorization_policies.push(key.clone());
                added = true;
            }
            policies.entry(key).or_insert_with(|| policy(g, self.trust_domain));
        }
        if added {
            w.authorization_policies.sort_unstable();
        }
    }

    /// The waypoint Gateway an address names (the controller names waypoints by hostname).
    fn gateway(&self, wp: &GatewayAddress) -> Option<&'a WaypointGateway> {
        match wp.destination.as_ref()? {
            gateway_address::Destination::Hostname(h) => {
                self.by_hostname.get(&(h.namespace.as_str(), h.hostname.as_str())).copied()
            }
            gateway_address::Destination::Address(_) => None,
        }
    }
}

/// `istio_allow_waypoint_<namespace>_<name>`, as istiod names it.
pub fn policy_name(g: &WaypointGateway) -> String {
    format!("istio_allow_waypoint_{}_{}", g.namespace, g.name)
}

/// ALLOW from the waypoint's identity (its service account is named after
/// the Gateway, as the controller deploys it), principal without the
/// `spiffe://` scheme, as Istio writes it.
fn policy(g: &WaypointGateway, trust_domain: &str) -> Authorization {
    let principal = format!("{trust_domain}/ns/{}/sa/{}", g.namespace, g.name);
    Authorization {
        name: policy_name(g),
        namespace: g.namespace.clone(),
        scope: Scope::WorkloadSelector.into(),
        action: Action::Allow.into(),
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    principals: vec![StringMatch { match_type: Some(MatchType::Exact(principal)) }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}
