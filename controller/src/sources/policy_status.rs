//! The status conditions an Istio policy should carry, as Istio writes them, computed from what the model made of
//! it; pure, so the Kubernetes source only compares and writes.
//!
//! - `Accepted`: the object is valid (`True`/`Accepted`) or not (`False`/`Invalid` with the reasons).
//! - `ZtunnelAccepted` (AuthorizationPolicy bound to workloads, as istiod writes it): `True`/`Accepted` "attached to
//!   ztunnel"; `True`/`UnsupportedValue` with what ztunnel left out (L7 attributes, AUDIT/CUSTOM actions), so a
//!   policy that does less than it says never reads as plainly accepted; `False`/`Invalid` for an invalid one.
//! - `WaypointAccepted` (AuthorizationPolicy with `targetRefs`, which only a waypoint enforces): `True`/`Accepted`
//!   naming the waypoints it is sent to; `True`/`UnsupportedValue` when part of it is not enforced (a target of
//!   another kind); `False`/`TargetNotFound` when no waypoint serves its targets (it has no effect);
//!   `False`/`UnsupportedValue` for an action the waypoint does not enforce (CUSTOM, AUDIT); `False`/`Invalid`.

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
}

/// The conditions `kind` (`AuthorizationPolicy` or `PeerAuthentication`) should carry. `spec` is the object's spec
/// as stored (for `targetRefs`).
pub fn desired(kind: &str, spec: &Value, generation: Option<i64>, o: &Outcome<'_>) -> Vec<Cond> {
    let cond = |type_, status, reason, message: String| Cond { type_, status, reason, message, generation };
    let invalid = (!o.rejected.is_empty()).then(|| o.rejected.join("; "));
    let mut out = vec![match &invalid {
        Some(why) => cond("Accepted", "False", "Invalid", why.clone()),
        None => cond("Accepted", "True", "Accepted", String::new()),
    }];
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
