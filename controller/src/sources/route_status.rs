//! The status Ambit writes on Gateway API objects it answers for, as the Gateway API asks; pure, so the Kubernetes
//! source only compares and writes.
//!
//! - **Routes** (`HTTPRoute`, `GRPCRoute`): one `status.parents[]` entry per parentRef that is Ambit's — a Gateway of
//!   a waypoint class (`WAYPOINT_CLASSES`), or (GAMMA, the mesh profile) a Service in an ambient namespace, the
//!   namespaces whose traffic Ambit carries. A Service parent is `Accepted=True` when a waypoint serves the Service
//!   (the model sends the route to it); else `Accepted=False` with `NoMatchingParent` (no such Service) or
//!   `UnsupportedValue` (the spec's reason for a value the implementation does not support: the route is invalid —
//!   the model says why —, the Service has no waypoint). A route in another namespace than its Service is a
//!   consumer route, accepted the same way (it shapes only its own namespace's requests). A waypoint Gateway parent
//!   is `UnsupportedValue`: Ambit applies routes attached to Services. `ResolvedRefs` covers the backendRefs
//!   (Services that exist, in the route's namespace, or in another that a ReferenceGrant opens to the route, or a
//!   consumer route's own parent Service; any other cross-namespace reference is `RefNotPermitted`). Entries of
//!   other controllers are kept as they are; a parentRef that is not Ambit's gets no entry.
//! - **GatewayClasses**: a waypoint class whose `controllerName` is one Ambit answers for is `Accepted=True`; a
//!   class of Ambit's own controllerName that is not a waypoint class is `Accepted=False`/`Unsupported`, since no
//!   Gateway of it gets anything. Other classes are not touched.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::conditions::{self, Cond};
use crate::model::reference_grant::Grants;
use crate::model::routes::{backend_permitted, consumer_parent};
use crate::model::waypoint::{class_controller, AMBIT_CONTROLLER_NAME, CONTROLLER_NAMES, WAYPOINT_CLASSES};

/// The Gateway API group, the default of a parentRef's `group`.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Condition types of a route parent entry; both are Ambit's in its own entries.
const ROUTE_CONDITIONS: [&str; 2] = ["Accepted", "ResolvedRefs"];
/// The GatewayClass condition this module owns.
const CLASS_CONDITIONS: [&str; 1] = ["Accepted"];

/// What decides whether a parentRef is Ambit's, taken from the watched objects.
#[derive(Debug, Default)]
pub struct Parents {
    /// Waypoint Gateways by (namespace, name), with the controllerName their entries carry.
    pub waypoints: HashMap<(String, String), &'static str>,
    /// Namespaces in the mesh (`istio.io/dataplane-mode=ambient`).
    pub mesh_namespaces: HashSet<String>,
    /// Services by (namespace, name).
    pub services: HashSet<(String, String)>,
    /// Services a waypoint serves (routes attached to them are sent to it), from the last model build.
    pub served: HashSet<(String, String)>,
    /// Routes the model refused, by (kind, namespace, name), with why.
    pub invalid: HashMap<(String, String, String), String>,
    /// The ReferenceGrants of every namespace.
    pub grants: Grants,
}

impl Parents {
    /// The controllerName under which a Gateway of `class` is served, given the class's own `controllerName` when
    /// the GatewayClass exists: that one if Ambit answers for it, else the one the class is shipped with.
    pub fn waypoint_controller(class: &str, class_controller_name: Option<&str>) -> Option<&'static str> {
        let shipped = class_controller(class)?;
        Some(class_controller_name.and_then(|c| CONTROLLER_NAMES.iter().find(|n| **n == c).copied()).unwrap_or(shipped))
    }
}

/// One `status.parents[]` entry Ambit wants on a route.
#[derive(Clone, Debug, PartialEq)]
pub struct ParentStatus {
    /// The parentRef as the spec writes it.
    pub parent_ref: Value,
    /// The controllerName of the entry.
    pub controller: &'static str,
    /// `Accepted` and `ResolvedRefs`.
    pub conditions: Vec<Cond>,
}

/// What the user reads on a route of `kind` attached to a waypoint Gateway, which Ambit does not apply.
pub fn gateway_parent_message(kind: &str) -> String {
    let what = if kind == "GRPCRoute" { "gRPC" } else { "HTTP" };
    format!(
        "Ambit does not apply {what} routes attached to a waypoint Gateway: attach the route to a Service \
         (parentRef group \"\", kind Service) served by the waypoint; traffic is not routed by this parent"
    )
}

/// The parent entries Ambit wants on route `kind` `ns/name`, one per parentRef of `spec` that is Ambit's, in the
/// spec's order.
pub fn desired_parents(
    kind: &str,
    ns: &str,
    name: &str,
    spec: &Value,
    generation: Option<i64>,
    p: &Parents,
) -> Vec<ParentStatus> {
    let refs = spec["parentRefs"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut out: Vec<ParentStatus> = Vec::new();
    let mut resolved = None;
    let invalid = p.invalid.get(&(kind.to_owned(), ns.to_owned(), name.to_owned())).map(String::as_str);
    for r in refs {
        let Some((controller, accepted)) = claim(kind, ns, invalid, r, p, generation) else { continue };
        if out.iter().any(|o| o.parent_ref == *r) {
            continue; // the CRD's validation refuses duplicates; a lax schema may not
        }
        let resolved = resolved.get_or_insert_with(|| resolved_refs(kind, ns, spec, p, generation)).clone();
        out.push(ParentStatus { parent_ref: r.clone(), controller, conditions: vec![accepted, resolved] });
    }
    out
}

/// Whether parentRef `r` is Ambit's: its entry's controllerName and `Accepted` condition. `invalid` is why the
/// model refused the route, if it did.
fn claim(
    kind: &str,
    ns: &str,
    invalid: Option<&str>,
    r: &Value,
    p: &Parents,
    generation: Option<i64>,
) -> Option<(&'static str, Cond)> {
    let group = r["group"].as_str().unwrap_or(GATEWAY_GROUP);
    let parent_kind = r["kind"].as_str().unwrap_or("Gateway");
    let key = (r["namespace"].as_str().unwrap_or(ns).to_string(), r["name"].as_str()?.to_string());
    let unsupported = |message: String| Cond::new("Accepted", "False", "UnsupportedValue", message, generation);
    match (group, parent_kind) {
        (GATEWAY_GROUP, "Gateway") => p.waypoints.get(&key).map(|c| (*c, unsupported(gateway_parent_message(kind)))),
        ("" | "core", "Service") if p.mesh_namespaces.contains(&key.0) => {
            let service = format!("Service {}/{}", key.0, key.1);
            let accepted = if !p.services.contains(&key) {
                Cond::new("Accepted", "False", "NoMatchingParent", format!("{service} does not exist"), generation)
            } else if let Some(why) = invalid {
                unsupported(format!("invalid route: {why}"))
            } else if !p.served.contains(&key) {
                unsupported(format!(
                    "{service} has no waypoint (istio.io/use-waypoint): routes apply only to traffic through a waypoint"
                ))
            } else if key.0 != ns {
                let message =
                    format!("routed by the waypoint of {service} for clients in namespace {ns} (consumer route)");
                Cond::new("Accepted", "True", "Accepted", message, generation)
            } else {
                Cond::new("Accepted", "True", "Accepted", format!("routed by the waypoint of {service}"), generation)
            };
            Some((AMBIT_CONTROLLER_NAME, accepted))
        }
        _ => None,
    }
}

/// `ResolvedRefs`: every backendRef is a Service that exists.
fn resolved_refs(route_kind: &str, ns: &str, spec: &Value, p: &Parents, generation: Option<i64>) -> Cond {
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    let service_parents = spec["parentRefs"].as_array().into_iter().flatten().filter_map(|r| {
        let service = matches!(r["group"].as_str(), Some("" | "core")) && r["kind"].as_str() == Some("Service");
        service.then(|| Some((r["namespace"].as_str().unwrap_or(ns).to_owned(), r["name"].as_str()?.to_owned())))?
    });
    let own_parent = consumer_parent(ns, service_parents);
    let rules = spec["rules"].as_array().map(Vec::as_slice).unwrap_or_default();
    for b in rules.iter().flat_map(|r| r["backendRefs"].as_array().map(Vec::as_slice).unwrap_or_default()) {
        let (group, kind) = (b["group"].as_str().unwrap_or(""), b["kind"].as_str().unwrap_or("Service"));
        let name = b["name"].as_str().unwrap_or_default();
        let bns = b["namespace"].as_str().unwrap_or(ns);
        if !matches!(group, "" | "core") || kind != "Service" {
            problems.push(("InvalidKind", format!("backendRef {group}/{kind} {name}: only Services are supported")));
        } else if !backend_permitted(&p.grants, route_kind, ns, own_parent.as_ref(), (bns, name)) {
            let why = "no ReferenceGrant in its namespace allows it";
            problems.push(("RefNotPermitted", format!("backendRef Service {bns}/{name}: {why}")));
        } else if !p.services.contains(&(bns.to_string(), name.to_string())) {
            problems.push(("BackendNotFound", format!("backendRef Service {bns}/{name} does not exist")));
        }
    }
    match problems.first() {
        None => Cond::new("ResolvedRefs", "True", "ResolvedRefs", "", generation),
        Some(&(reason, _)) => {
            let message = problems.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join("; ");
            Cond::new("ResolvedRefs", "False", reason, message, generation)
        }
    }
}

/// The route's next `status.parents`, or `None` when `current` already says what `want` says. Entries whose
/// controllerName Ambit answers for are replaced by `want` (so stale ones go); every other entry is kept as it is.
/// An entry whose conditions did not flip keeps their transition times.
pub fn merge_parents(current: &[Value], want: &[ParentStatus], now: &Value) -> Option<Vec<Value>> {
    let ours = |e: &Value| CONTROLLER_NAMES.iter().any(|c| e["controllerName"] == *c);
    let mut changed = current.iter().filter(|e| ours(e)).count() != want.len();
    let mut next: Vec<Value> = current.iter().filter(|e| !ours(e)).cloned().collect();
    for w in want {
        let old =
            current.iter().find(|e| ours(e) && e["parentRef"] == w.parent_ref && e["controllerName"] == w.controller);
        let old_conditions = old.and_then(|e| e["conditions"].as_array()).map(Vec::as_slice).unwrap_or_default();
        let conditions = match conditions::merge(old_conditions, &w.conditions, &ROUTE_CONDITIONS, now) {
            Some(c) => {
                changed = true;
                c
            }
            None => old_conditions.to_vec(),
        };
        next.push(json!({ "parentRef": w.parent_ref, "controllerName": w.controller, "conditions": conditions }));
    }
    changed.then_some(next)
}

/// The conditions GatewayClass `name` of `controller_name` should carry, or `None` when it is not Ambit's.
pub fn class_conditions(name: &str, controller_name: &str, generation: Option<i64>) -> Option<Vec<Cond>> {
    let cond = if WAYPOINT_CLASSES.contains(&name) && CONTROLLER_NAMES.contains(&controller_name) {
        Cond::new(
            "Accepted",
            "True",
            "Accepted",
            "ambit-controller deploys a waypoint for each Gateway of this class",
            generation,
        )
    } else if controller_name == AMBIT_CONTROLLER_NAME {
        let message = format!(
            "Ambit serves only the waypoint classes {}: Gateways of this class get nothing",
            WAYPOINT_CLASSES.join(" and ")
        );
        Cond::new("Accepted", "False", "Unsupported", message, generation)
    } else {
        return None;
    };
    Some(vec![cond])
}

/// The GatewayClass's next `status.conditions` (see [`conditions::merge`]).
pub fn merge_class(current: &[Value], want: &[Cond], now: &Value) -> Option<Vec<Value>> {
    conditions::merge(current, want, &CLASS_CONDITIONS, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parents() -> Parents {
        let mut p = Parents::default();
        p.waypoints.insert(("mesh".into(), "waypoint".into()), AMBIT_CONTROLLER_NAME);
        p.mesh_namespaces.insert("mesh".into());
        p.services.insert(("mesh".into(), "backend".into()));
        p
    }

    fn spec(yaml: &str) -> Value {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn kinds(c: &[Cond]) -> Vec<(&str, &str, &str)> {
        c.iter().map(|c| (c.type_, c.status, c.reason)).collect()
    }

    #[test]
    fn only_ambit_parents_get_an_entry_and_it_says_why_nothing_is_routed() {
        let s = spec(
            "parentRefs: [{name: waypoint}, {name: other-gateway}, {group: '', kind: Service, name: backend}, \
             {group: '', kind: Service, name: elsewhere, namespace: outside}]\n\
             rules: [{backendRefs: [{name: backend, port: 80}]}]\n",
        );
        let want = desired_parents("HTTPRoute", "mesh", "r", &s, Some(3), &parents());
        assert_eq!(want.len(), 2, "{want:?}");
        assert_eq!(want[0].parent_ref, json!({"name": "waypoint"}));
        assert_eq!(want[1].parent_ref["kind"], "Service");
        for w in &want {
            assert_eq!(w.controller, AMBIT_CONTROLLER_NAME);
            assert_eq!(
                kinds(&w.conditions),
                [("Accepted", "False", "UnsupportedValue"), ("ResolvedRefs", "True", "ResolvedRefs")]
            );
            assert!(w.conditions.iter().all(|c| c.generation == Some(3)));
        }
        assert!(want[0].conditions[0].message.contains("attached to a waypoint Gateway"), "{:?}", want[0]);
        assert!(want[1].conditions[0].message.contains("has no waypoint"), "{:?}", want[1]);
        let grpc = desired_parents("GRPCRoute", "mesh", "r", &s, None, &parents());
        assert!(grpc[0].conditions[0].message.contains("gRPC"));
    }

    #[test]
    fn a_service_a_waypoint_serves_accepts_the_route_unless_the_model_refused_it() {
        let s = spec("parentRefs: [{group: '', kind: Service, name: backend}]\nrules: [{backendRefs: [{name: backend, port: 80}]}]\n");
        let mut p = parents();
        p.served.insert(("mesh".into(), "backend".into()));
        let want = desired_parents("HTTPRoute", "mesh", "r", &s, Some(1), &p);
        assert_eq!(
            kinds(&want[0].conditions),
            [("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")]
        );
        p.invalid
            .insert(("HTTPRoute".into(), "mesh".into(), "r".into()), "filter type \"CORS\" is not supported".into());
        let want = desired_parents("HTTPRoute", "mesh", "r", &s, Some(1), &p);
        assert_eq!(kinds(&want[0].conditions)[0], ("Accepted", "False", "UnsupportedValue"));
        assert!(want[0].conditions[0].message.contains("CORS"), "{:?}", want[0]);
        let other = desired_parents("GRPCRoute", "mesh", "r", &s, Some(1), &p);
        assert_eq!(kinds(&other[0].conditions)[0], ("Accepted", "True", "Accepted"), "the refusal was the HTTPRoute's");
    }

    #[test]
    fn a_missing_service_parent_and_bad_backends_are_named() {
        let s = spec(
            "parentRefs: [{group: '', kind: Service, name: gone}]\n\
             rules: [{backendRefs: [{name: nope}, {group: example.com, kind: Bucket, name: b}, {name: x, namespace: o}]}]\n",
        );
        let want = desired_parents("HTTPRoute", "mesh", "r", &s, None, &parents());
        assert_eq!(
            kinds(&want[0].conditions),
            [("Accepted", "False", "NoMatchingParent"), ("ResolvedRefs", "False", "BackendNotFound")]
        );
        let m = &want[0].conditions[1].message;
        assert!(m.contains("mesh/nope") && m.contains("Bucket") && m.contains("ReferenceGrant"), "{m}");
    }

    #[test]
    fn a_consumer_route_is_accepted_and_may_send_only_to_its_own_parent_across_namespaces() {
        let mut p = parents();
        p.served.insert(("mesh".into(), "backend".into()));
        let consumer = |backends: &str| {
            spec(&format!(
                "parentRefs: [{{group: '', kind: Service, name: backend, namespace: mesh, port: 80}}]\n\
                 rules: [{{backendRefs: [{backends}]}}]\n"
            ))
        };
        let to_parent = consumer("{name: backend, namespace: mesh, port: 80}");
        let want = desired_parents("HTTPRoute", "client", "r", &to_parent, Some(1), &p);
        assert_eq!(
            kinds(&want[0].conditions),
            [("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")]
        );
        assert!(want[0].conditions[0].message.contains("clients in namespace client"), "{:?}", want[0]);
        // Another Service of the parent's namespace needs a grant, as does the parent from a producer route.
        p.services.insert(("mesh".into(), "other".into()));
        let elsewhere = consumer("{name: other, namespace: mesh, port: 80}");
        let want = desired_parents("HTTPRoute", "client", "r", &elsewhere, Some(1), &p);
        assert_eq!(kinds(&want[0].conditions)[1], ("ResolvedRefs", "False", "RefNotPermitted"));
        // A ReferenceGrant in `mesh` opens it to HTTPRoutes of `client`.
        let grant: crate::model::reference_grant::ReferenceGrantSpec = serde_yaml::from_str(
            "from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: client}]\n\
             to: [{group: '', kind: Service, name: other}]\n",
        )
        .unwrap();
        p.grants = Grants::new([("mesh", &grant)]);
        let want = desired_parents("HTTPRoute", "client", "r", &elsewhere, Some(1), &p);
        assert_eq!(kinds(&want[0].conditions)[1], ("ResolvedRefs", "True", "ResolvedRefs"));
        let grpc = desired_parents("GRPCRoute", "client", "r", &elsewhere, Some(1), &p);
        assert_eq!(kinds(&grpc[0].conditions)[1], ("ResolvedRefs", "False", "RefNotPermitted"), "HTTPRoutes only");
    }

    #[test]
    fn merge_keeps_other_controllers_entries_and_drops_our_stale_ones() {
        let s = spec("parentRefs: [{name: waypoint}]\n");
        let want = desired_parents("HTTPRoute", "mesh", "r", &s, Some(1), &parents());
        let theirs = json!({"parentRef": {"name": "edge"}, "controllerName": "example.com/gw", "conditions": []});
        let stale = json!({"parentRef": {"name": "old"}, "controllerName": AMBIT_CONTROLLER_NAME, "conditions": []});
        let next = merge_parents(&[theirs.clone(), stale], &want, &json!("t0")).unwrap();
        assert_eq!(next.len(), 2);
        assert_eq!(next[0], theirs);
        assert_eq!(next[1]["parentRef"], json!({"name": "waypoint"}));
        assert_eq!(next[1]["controllerName"], AMBIT_CONTROLLER_NAME);
        assert_eq!(next[1]["conditions"][0]["reason"], "UnsupportedValue", "a waypoint Gateway parent is not applied");
        assert_eq!(merge_parents(&next, &want, &json!("later")), None, "nothing changed");

        // No parent of ours any more: our entry goes, theirs stays; none at all: nothing to write.
        assert_eq!(merge_parents(&next, &[], &json!("later")), Some(vec![theirs.clone()]));
        assert_eq!(merge_parents(&[theirs], &[], &json!("later")), None);
    }

    #[test]
    fn a_new_generation_rewrites_the_entry_keeping_transition_times() {
        let s = spec("parentRefs: [{name: waypoint}]\n");
        let first =
            merge_parents(&[], &desired_parents("HTTPRoute", "mesh", "r", &s, Some(1), &parents()), &json!("t0"));
        let want2 = desired_parents("HTTPRoute", "mesh", "r", &s, Some(2), &parents());
        let second = merge_parents(&first.unwrap(), &want2, &json!("t1")).unwrap();
        assert_eq!(second[0]["conditions"][0]["observedGeneration"], 2);
        assert_eq!(second[0]["conditions"][0]["lastTransitionTime"], "t0");
    }

    #[test]
    fn a_waypoint_gateway_entry_carries_its_class_controller_name() {
        assert_eq!(Parents::waypoint_controller("istio-waypoint", None), Some("istio.io/mesh-controller"));
        assert_eq!(
            Parents::waypoint_controller("istio-waypoint", Some(AMBIT_CONTROLLER_NAME)),
            Some(AMBIT_CONTROLLER_NAME)
        );
        assert_eq!(Parents::waypoint_controller("ambit-waypoint", Some("example.com/x")), Some(AMBIT_CONTROLLER_NAME));
        assert_eq!(Parents::waypoint_controller("istio", None), None);
    }

    #[test]
    fn waypoint_classes_of_our_controllers_are_accepted_and_others_left_alone() {
        let c = class_conditions("ambit-waypoint", AMBIT_CONTROLLER_NAME, Some(4)).unwrap();
        assert_eq!(kinds(&c), [("Accepted", "True", "Accepted")]);
        assert_eq!(c[0].generation, Some(4));
        let c = class_conditions("istio-waypoint", "istio.io/mesh-controller", None).unwrap();
        assert_eq!(c[0].status, "True");
        let c = class_conditions("ambit-gateway", AMBIT_CONTROLLER_NAME, None).unwrap();
        assert_eq!(kinds(&c), [("Accepted", "False", "Unsupported")]);
        assert_eq!(class_conditions("istio-waypoint", "example.com/other", None), None);
        assert_eq!(class_conditions("istio", "istio.io/gateway-controller", None), None);
        let written =
            merge_class(&[], &class_conditions("ambit-waypoint", AMBIT_CONTROLLER_NAME, None).unwrap(), &json!("t"));
        assert_eq!(written.unwrap()[0]["reason"], "Accepted");
    }
}
