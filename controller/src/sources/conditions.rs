//! Status conditions (Kubernetes' `metav1.Condition`) on objects Ambit does not own — Istio policies, Gateway API
//! routes and GatewayClasses — shared by every status this controller writes there. Pure: the Kubernetes source only
//! compares and writes.

use serde_json::{json, Value};

/// One condition, without its transition time (which moves only when the status flips).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
    pub generation: Option<i64>,
}

impl Cond {
    /// A condition observed at `generation`.
    pub fn new(
        type_: &'static str,
        status: &'static str,
        reason: &'static str,
        message: impl Into<String>,
        generation: Option<i64>,
    ) -> Self {
        Self { type_, status, reason, message: message.into(), generation }
    }
}

/// The next `conditions` list, or `None` when `current` already says what `want` says (same status, reason, message
/// and generation for each wanted type, and no stale type of `owned`). Conditions of types outside `owned` are kept
/// (others wrote them); an unchanged status keeps its `lastTransitionTime`.
pub fn merge(current: &[Value], want: &[Cond], owned: &[&str], now: &Value) -> Option<Vec<Value>> {
    let find = |t: &str| current.iter().find(|c| c["type"] == t);
    let same = |c: &Value, w: &Cond| {
        c["status"] == w.status
            && c["reason"] == w.reason
            && c["message"] == w.message.as_str()
            && c["observedGeneration"].as_i64() == w.generation
    };
    let is_owned = |c: &Value| owned.iter().any(|t| c["type"] == *t);
    let stale = current.iter().any(|c| is_owned(c) && !want.iter().any(|w| c["type"] == w.type_));
    if !stale && want.iter().all(|w| find(w.type_).is_some_and(|c| same(c, w))) {
        return None;
    }
    let mut next: Vec<Value> = current.iter().filter(|c| !is_owned(c)).cloned().collect();
    for w in want {
        let moved = match find(w.type_) {
            Some(c) if c["status"] == w.status => c["lastTransitionTime"].clone(),
            _ => now.clone(),
        };
        let mut c = json!({
            "type": w.type_,
            "status": w.status,
            "reason": w.reason,
            "message": w.message,
            "lastTransitionTime": moved,
        });
        if let Some(g) = w.generation {
            c["observedGeneration"] = json!(g);
        }
        next.push(c);
    }
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNED: [&str; 2] = ["Accepted", "ResolvedRefs"];

    #[test]
    fn merge_writes_only_changes_and_keeps_others_and_transition_times() {
        let want = [Cond::new("Accepted", "True", "Accepted", "", Some(1))];
        let t0 = json!("2026-01-01T00:00:00Z");
        let other = json!({"type": "Ready", "status": "True"});
        let first = merge(std::slice::from_ref(&other), &want, &OWNED, &t0).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0], other);
        assert_eq!(merge(&first, &want, &OWNED, &json!("later")), None, "nothing changed");

        // A new generation with the same status rewrites but keeps the transition time.
        let want2 = [Cond::new("Accepted", "True", "Accepted", "", Some(2))];
        let second = merge(&first, &want2, &OWNED, &json!("later")).unwrap();
        assert_eq!(second[1]["lastTransitionTime"], t0);
        assert_eq!(second[1]["observedGeneration"], 2);

        // A flip moves it; an owned condition no longer wanted is removed.
        let with_refs = merge(
            &second,
            &[want2[0].clone(), Cond::new("ResolvedRefs", "True", "ResolvedRefs", "", None)],
            &OWNED,
            &t0,
        )
        .unwrap();
        let flipped = [Cond::new("Accepted", "False", "Invalid", "bad", Some(2))];
        let third = merge(&with_refs, &flipped, &OWNED, &json!("now")).unwrap();
        assert!(!third.iter().any(|c| c["type"] == "ResolvedRefs"));
        let a = third.iter().find(|c| c["type"] == "Accepted").unwrap();
        assert_eq!((a["lastTransitionTime"].as_str(), a["message"].as_str()), (Some("now"), Some("bad")));
    }
}
