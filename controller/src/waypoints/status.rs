//! The status a waypoint Gateway should carry, computed from what is observed,
//! and whether that differs from what it carries now (status is written only
//! on a change, so idle reconciles cost one read and no write).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Condition type: the Gateway is valid and this controller handles it.
pub const ACCEPTED: &str = "Accepted";
/// Condition type: the waypoint is running (the Deployment has available replicas).
pub const PROGRAMMED: &str = "Programmed";

/// The part of `Gateway.status` this controller writes.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// Where the waypoint can be reached: the Service's ClusterIP.
    #[serde(default)]
    pub addresses: Vec<GatewayStatusAddress>,
    /// Conditions, ours (`Accepted`, `Programmed`) and any others left as they are.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// `Gateway.status.addresses[]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct GatewayStatusAddress {
    /// `IPAddress` or `Hostname`.
    #[serde(rename = "type", default)]
    pub type_: Option<String>,
    /// The address.
    pub value: String,
}

/// What the reconcile observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The Gateway's `metadata.generation`.
    pub generation: Option<i64>,
    /// The waypoint Service's ClusterIP, once allocated.
    pub cluster_ip: Option<String>,
    /// The Deployment's `status.availableReplicas`.
    pub available_replicas: i32,
}

/// The status to write, or `None` when `current` already says the same.
/// Unchanged conditions keep their `lastTransitionTime`.
pub fn desired(current: &GatewayStatus, observed: &Observed, now: Timestamp) -> Option<GatewayStatus> {
    let programmed = observed.available_replicas >= 1;
    let (p_status, p_reason, p_message) = if programmed {
        ("True", "Programmed", "the waypoint deployment has available replicas")
    } else {
        ("False", "Pending", "waiting for the waypoint deployment to have an available replica")
    };
    let ours = [
        (ACCEPTED, "True", "Accepted", "the waypoint is deployed by ambit-controller"),
        (PROGRAMMED, p_status, p_reason, p_message),
    ];
    let mut conditions: Vec<Condition> =
        current.conditions.iter().filter(|c| !ours.iter().any(|(t, ..)| *t == c.type_)).cloned().collect();
    for (type_, status, reason, message) in ours {
        let old = current.conditions.iter().find(|c| c.type_ == type_);
        // Kubernetes convention: the transition time moves only when the status flips.
        let last_transition_time = match old {
            Some(o) if o.status == status => o.last_transition_time.clone(),
            _ => Time(now),
        };
        conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: observed.generation,
            last_transition_time,
        });
    }
    let addresses = observed
        .cluster_ip
        .iter()
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .map(|ip| GatewayStatusAddress { type_: Some("IPAddress".into()), value: ip.clone() })
        .collect();
    let next = GatewayStatus { addresses, conditions };
    (!same(current, &next)).then_some(next)
}

/// Equal up to the order of conditions.
fn same(a: &GatewayStatus, b: &GatewayStatus) -> bool {
    a.addresses == b.addresses
        && a.conditions.len() == b.conditions.len()
        && b.conditions.iter().all(|c| a.conditions.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn observed(replicas: i32) -> Observed {
        Observed { generation: Some(1), cluster_ip: Some("10.96.0.7".into()), available_replicas: replicas }
    }

    fn condition<'a>(s: &'a GatewayStatus, type_: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn a_new_gateway_is_accepted_but_pending_until_a_replica_is_available() {
        let s = desired(&GatewayStatus::default(), &observed(0), t(100)).unwrap();
        assert_eq!(condition(&s, ACCEPTED).status, "True");
        assert_eq!(condition(&s, ACCEPTED).reason, "Accepted");
        let p = condition(&s, PROGRAMMED);
        assert_eq!((p.status.as_str(), p.reason.as_str()), ("False", "Pending"));
        assert_eq!(p.observed_generation, Some(1));
        assert_eq!(s.addresses[0].value, "10.96.0.7");
        assert_eq!(s.addresses[0].type_.as_deref(), Some("IPAddress"));
    }

    #[test]
    fn an_unchanged_status_is_not_written_again() {
        let s = desired(&GatewayStatus::default(), &observed(0), t(100)).unwrap();
        assert_eq!(desired(&s, &observed(0), t(200)), None);
    }

    #[test]
    fn programmed_flips_with_a_new_transition_time_while_accepted_keeps_its_own() {
        let s = desired(&GatewayStatus::default(), &observed(0), t(100)).unwrap();
        let s2 = desired(&s, &observed(1), t(200)).unwrap();
        let p = condition(&s2, PROGRAMMED);
        assert_eq!((p.status.as_str(), p.reason.as_str()), ("True", "Programmed"));
        assert_eq!(p.last_transition_time, Time(t(200)));
        assert_eq!(condition(&s2, ACCEPTED).last_transition_time, Time(t(100)));
    }

    #[test]
    fn foreign_conditions_are_kept_and_a_missing_cluster_ip_gives_no_address() {
        let mut current = GatewayStatus::default();
        current.conditions.push(Condition {
            type_: "Other".into(),
            status: "True".into(),
            reason: "X".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(t(1)),
        });
        let obs = Observed { cluster_ip: None, ..observed(0) };
        let s = desired(&current, &obs, t(100)).unwrap();
        assert!(s.addresses.is_empty());
        assert_eq!(s.conditions.len(), 3);
        assert_eq!(condition(&s, "Other").reason, "X");
    }

    #[test]
    fn a_new_generation_is_written() {
        let s = desired(&GatewayStatus::default(), &observed(1), t(100)).unwrap();
        let obs = Observed { generation: Some(2), ..observed(1) };
        let s2 = desired(&s, &obs, t(200)).unwrap();
        assert_eq!(condition(&s2, PROGRAMMED).observed_generation, Some(2));
        assert_eq!(condition(&s2, PROGRAMMED).last_transition_time, Time(t(100)));
    }
}
