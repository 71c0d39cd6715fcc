//! The status conditions an Istio policy, a VirtualService or a TrafficSplit should carry, as Istio writes them,
//! computed from what the model made of it; pure, so the Kubernetes source only compares and writes.
//!
//! - `Accepted`: the object is valid (`True`/`Accepted`) or not (`False`/`Invalid` with the reasons).
//! - `ZtunnelAccepted` (AuthorizationPolicy bound to workloads, as istiod writes it): `True`/`Accepted` "attached to
//!   ztunnel"; `True`/`UnsupportedValue` with what ztunnel left out (L7 attributes, AUDIT/CUSTOM actions), so a
//!   policy that does less than it says never reads as plainly accepted; `False`/`Invalid` for an invalid one.
//! - `WaypointAccepted` (AuthorizationPolicy with `targetRefs`, which only a waypoint enforces): `True`/`Accepted`
//!   naming the waypoints it is sent to; `True`/`UnsupportedValue` when part of it is not enforced (a target of
//!   another kind); `False`/`TargetNotFound` when no waypoint serves its targets (it has no effect);
//!   `False`/`UnsupportedValue` for an action the waypoint does not enforce (CUSTOM, AUDIT); `False`/`Invalid`.
//! - `WaypointAccepted` (VirtualService and TrafficSplit, which only a waypoint applies): `True`/`Accepted` "applied at
//!   the waypoint" when a waypoint applies it whole; `True`/`UnsupportedValue` with the model's warnings (what was
//!   left out: a host without a waypoint, a subset, a port an HTTPRoute takes…) when a waypoint applies part of it;
//!   `False`/`NotApplied` with the warnings, or "no waypoint serves its hosts", when no waypoint applies any of it (it
//!   has no effect); `False`/`Invalid` for an invalid one, as for a targeted AuthorizationPolicy.

use serde_json::Value;

use super::conditions::Cond;
use crate::model::PolicyBinding;

/// Condition types this module owns; others on the object are left alone.
pub const OWNED: [&str; 3] = ["Accepted", "ZtunnelAccepted", "WaypointAccepted"];

/// What the model made of one policy.
#[derive(Debug, Default)]
pub struct Outcome<'a> {
    /// Why it was rejected (empty: valid).
    pub rejected: Vec<&'a str>,
    /// What was left out at L4 (empty: enforced as written).
    pub warnings: Vec<&'a str>,
    /// Where a valid policy with `targetRefs` went.
    pub binding: Option<&'a PolicyBinding>,
    /// A VirtualService or TrafficSplit: whether a waypoint applies it (for one service port or more).
    pub applied: bool,
}

/// The conditions `kind` (`AuthorizationPolicy`, `PeerAuthentication`, `VirtualService` or `TrafficSplit`) should
/// carry. `spec` is the object's spec as stored (for `targetRefs`).
pub fn desired(kind: &str, spec: &Value, generation: Option<i64>, o: &Outcome<'_>) -> Vec<Cond> {
    let cond = |type_, status, reason, message: String| Cond { type_, status, reason, message, generation };
    let invalid = (!o.rejected.is_empty()).then(|| o.rejected.join("; "));
    let mut out = vec![match &invalid {
        Some(why) => cond("Accepted", "False", "Invalid", why.clone()),
        None => cond("Accepted", "True", "Accepted", String::new()),
    }];
    if matches!(kind, "VirtualService" | "TrafficSplit" | "DestinationRule") {
        out.push(mesh_route_applied(kind, invalid, o, cond));
        return out;
    }
    if kind != "AuthorizationPolicy" {
        return out;
    }
    let targeted = spec.get("targetRefs").and_then(Value::as_array).is_some_and(|a| !a.is_empty())
        || spec.get("targetRef").is_some_and(|t| !t.is_null());
    out.push(match (invalid, targeted) {
        (Some(why), true) => cond("WaypointAccepted", "False", "Invalid", why),
        (None, true) => waypoint_accepted(o.binding, cond),
        (Some(why), false) => cond("ZtunnelAccepted", "False", "Invalid", why),
        (None, false) if o.warnings.is_empty() => {
            cond("ZtunnelAccepted", "True", "Accepted", "attached to ztunnel".into())
        }
        (None, false) => cond(
            "ZtunnelAccepted",
            "True",
            "UnsupportedValue",
            format!(
                "ztunnel enforces only L4 attributes: {}. In ambient mode a waypoint proxy enforces HTTP rules",
                o.warnings.join("; ")
            ),
        ),
    });
    out
}

/// `WaypointAccepted` of a VirtualService or TrafficSplit (`why` it is invalid, if it is).
fn mesh_route_applied(
    kind: &str,
    why: Option<String>,
    o: &Outcome<'_>,
    cond: impl Fn(&'static str, &'static str, &'static str, String) -> Cond,
) -> Cond {
    let t = "WaypointAccepted";
    if let Some(why) = why {
        return cond(t, "False", "Invalid", why);
    }
    let warnings = o.warnings.join("; ");
    match (o.applied, o.warnings.is_empty()) {
        (true, true) => cond(t, "True", "Accepted", "applied at the waypoint".into()),
        (true, false) => cond(t, "True", "UnsupportedValue", warnings),
        (false, false) => cond(t, "False", "NotApplied", warnings),
        (false, true) => {
            let what = match kind {
                "TrafficSplit" => "its service",
                "DestinationRule" => "its host",
                _ => "its hosts",
            };
            cond(t, "False", "NotApplied", format!("no waypoint serves {what}: it has no effect"))
        }
    }
}

/// `WaypointAccepted` of a valid targeted policy.
fn waypoint_accepted(
    b: Option<&PolicyBinding>,
    cond: impl Fn(&'static str, &'static str, &'static str, String) -> Cond,
) -> Cond {
    let t = "WaypointAccepted";
    let default = PolicyBinding::default();
    let b = b.unwrap_or(&default);
    let bound = format!("bound to waypoint {}", b.waypoints.join(", "));
    match (&b.problem, b.waypoints.is_empty()) {
        (Some(p), true) => cond(t, "False", "UnsupportedValue", format!("{p}: this policy has no effect")),
        (None, true) => cond(
            t,
            "False",
            "TargetNotFound",
            "no waypoint serves the policy's targets (a waypoint Gateway, or a Service with istio.io/use-waypoint): \
             this policy has no effect"
                .into(),
        ),
        (Some(p), false) => cond(t, "True", "UnsupportedValue", format!("{bound}; {p}")),
        (None, false) => cond(t, "True", "Accepted", bound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::conditions::merge;
    use serde_json::json;

    fn kinds(c: &[Cond]) -> Vec<(&str, &str, &str)> {
        c.iter().map(|c| (c.type_, c.status, c.reason)).collect()
    }

    #[test]
    fn a_plain_l4_policy_is_accepted_and_attached_to_ztunnel() {
        let c = desired("AuthorizationPolicy", &json!({"action": "DENY"}), Some(2), &Outcome::default());
        assert_eq!(kinds(&c), [("Accepted", "True", "Accepted"), ("ZtunnelAccepted", "True", "Accepted")]);
        assert_eq!(c[1].message, "attached to ztunnel");
        assert!(c.iter().all(|c| c.generation == Some(2)));
    }

    #[test]
    fn dropped_l7_rules_say_unsupported_value_with_what_was_left_out() {
        let o = Outcome { warnings: vec!["rule 0 uses L7 attributes (methods); dropped"], ..Default::default() };
        let c = desired("AuthorizationPolicy", &json!({}), None, &o);
        assert_eq!(c[1].reason, "UnsupportedValue");
        assert!(c[1].message.contains("methods") && c[1].message.contains("waypoint"), "{}", c[1].message);
    }

    #[test]
    fn an_invalid_policy_is_refused_in_both_conditions() {
        let o = Outcome { rejected: vec!["bad ipBlock", "bad port"], ..Default::default() };
        let c = desired("AuthorizationPolicy", &json!({}), None, &o);
        assert_eq!(kinds(&c), [("Accepted", "False", "Invalid"), ("ZtunnelAccepted", "False", "Invalid")]);
        assert_eq!(c[0].message, "bad ipBlock; bad port");
    }

    #[test]
    fn a_waypoint_policy_says_where_it_went_or_that_it_has_no_effect() {
        let spec = json!({"targetRefs": [{"kind": "Gateway", "name": "waypoint"}]});
        let c = desired("AuthorizationPolicy", &spec, None, &Outcome::default());
        assert_eq!(kinds(&c), [("Accepted", "True", "Accepted"), ("WaypointAccepted", "False", "TargetNotFound")]);
        assert!(c[1].message.contains("no effect"), "{}", c[1].message);
        let old_form = json!({"targetRef": {"kind": "Gateway", "name": "waypoint"}});
        assert_eq!(desired("AuthorizationPolicy", &old_form, None, &Outcome::default())[1].type_, "WaypointAccepted");

        let bound = PolicyBinding { waypoints: vec!["ns/waypoint".into()], problem: None };
        let c = desired("AuthorizationPolicy", &spec, None, &Outcome { binding: Some(&bound), ..Default::default() });
        assert_eq!(kinds(&c)[1], ("WaypointAccepted", "True", "Accepted"));
        assert_eq!(c[1].message, "bound to waypoint ns/waypoint");

        let custom = PolicyBinding { waypoints: vec![], problem: Some("action CUSTOM is not supported".into()) };
        let c = desired("AuthorizationPolicy", &spec, None, &Outcome { binding: Some(&custom), ..Default::default() });
        assert_eq!(kinds(&c)[1], ("WaypointAccepted", "False", "UnsupportedValue"));
        assert!(c[1].message.contains("CUSTOM"), "{}", c[1].message);
    }

    #[test]
    fn a_mesh_route_applied_whole_is_accepted_at_the_waypoint() {
        for kind in ["VirtualService", "TrafficSplit"] {
            let c = desired(kind, &json!({}), Some(3), &Outcome { applied: true, ..Default::default() });
            assert_eq!(kinds(&c), [("Accepted", "True", "Accepted"), ("WaypointAccepted", "True", "Accepted")]);
            assert_eq!(c[1].message, "applied at the waypoint");
            assert!(c.iter().all(|c| c.generation == Some(3)));
        }
    }

    #[test]
    fn a_mesh_route_applied_in_part_says_what_was_left_out() {
        let o = Outcome {
            applied: true,
            warnings: vec!["host other.ns2 has no waypoint", "subset v2 is not supported"],
            ..Default::default()
        };
        let c = desired("VirtualService", &json!({}), None, &o);
        assert_eq!(kinds(&c), [("Accepted", "True", "Accepted"), ("WaypointAccepted", "True", "UnsupportedValue")]);
        assert!(c[1].message.contains("other.ns2") && c[1].message.contains("subset v2"), "{}", c[1].message);
    }

    #[test]
    fn a_mesh_route_no_waypoint_applies_has_no_effect() {
        let c = desired("VirtualService", &json!({}), None, &Outcome::default());
        assert_eq!(kinds(&c), [("Accepted", "True", "Accepted"), ("WaypointAccepted", "False", "NotApplied")]);
        assert_eq!(c[1].message, "no waypoint serves its hosts: it has no effect");
        let c = desired("TrafficSplit", &json!({}), None, &Outcome::default());
        assert_eq!(c[1].message, "no waypoint serves its service: it has no effect");

        let o = Outcome { warnings: vec!["host reviews has no waypoint"], ..Default::default() };
        let c = desired("VirtualService", &json!({}), None, &o);
        assert_eq!(kinds(&c)[1], ("WaypointAccepted", "False", "NotApplied"));
        assert_eq!(c[1].message, "host reviews has no waypoint");
    }

    #[test]
    fn an_invalid_mesh_route_is_refused_in_both_conditions() {
        let o = Outcome {
            rejected: vec!["unknown field `corsPolicy`"],
            warnings: vec!["host reviews has no waypoint"],
            applied: false,
            ..Default::default()
        };
        let c = desired("TrafficSplit", &json!({}), Some(1), &o);
        assert_eq!(kinds(&c), [("Accepted", "False", "Invalid"), ("WaypointAccepted", "False", "Invalid")]);
        assert_eq!(c[0].message, "unknown field `corsPolicy`");
        assert_eq!(c[1].message, c[0].message);
    }

    #[test]
    fn a_mesh_route_that_stops_applying_flips_its_waypoint_condition() {
        let applied = desired("VirtualService", &json!({}), Some(1), &Outcome { applied: true, ..Default::default() });
        let first = merge(&[], &applied, &OWNED, &json!("t0")).unwrap();
        let gone = desired("VirtualService", &json!({}), Some(1), &Outcome::default());
        let next = merge(&first, &gone, &OWNED, &json!("t1")).unwrap();
        let w = next.iter().find(|c| c["type"] == "WaypointAccepted").unwrap();
        assert_eq!((w["status"].as_str(), w["lastTransitionTime"].as_str()), (Some("False"), Some("t1")));
        let a = next.iter().find(|c| c["type"] == "Accepted").unwrap();
        assert_eq!(a["lastTransitionTime"], "t0", "Accepted did not change");
    }

    #[test]
    fn peer_authentication_carries_only_accepted() {
        let c = desired("PeerAuthentication", &json!({}), None, &Outcome::default());
        assert_eq!(kinds(&c), [("Accepted", "True", "Accepted")]);
    }

    #[test]
    fn a_policy_turning_into_a_waypoint_policy_drops_its_ztunnel_condition() {
        let want = desired("AuthorizationPolicy", &json!({}), Some(1), &Outcome::default());
        let first = merge(&[], &want, &OWNED, &json!("t0")).unwrap();
        assert_eq!(merge(&first, &want, &OWNED, &json!("later")), None, "nothing changed");
        let targeted = desired("AuthorizationPolicy", &json!({"targetRefs": [{}]}), Some(1), &Outcome::default());
        let next = merge(&first, &targeted, &OWNED, &json!("now")).unwrap();
        assert!(!next.iter().any(|c| c["type"] == "ZtunnelAccepted"));
        assert!(next.iter().any(|c| c["type"] == "WaypointAccepted"));
    }
}
