//! Gateway API `ReferenceGrant` (`gateway.networking.k8s.io`, v1beta1 and v1): the owner of a namespace allowing
//! routes of another namespace to name its Services as backends. Without a grant, a cross-namespace backendRef is
//! refused (`RefNotPermitted`); removing the grant revokes it at the next build. Only what routes need is read: `from`
//! entries of kind `HTTPRoute`/`GRPCRoute`, `to` entries of kind `Service` (core group), with or without a name.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::crd::Resource;

/// `gateway.networking.k8s.io` ReferenceGrant.
pub type ReferenceGrant = Resource<ReferenceGrantSpec>;

/// `spec` of a ReferenceGrant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReferenceGrantSpec {
    /// Who may refer.
    #[serde(default)]
    pub from: Vec<GrantFrom>,
    /// To what, in the grant's namespace.
    #[serde(default)]
    pub to: Vec<GrantTo>,
}

/// `spec.from[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

/// `spec.to[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantTo {
    pub group: String,
    pub kind: String,
    /// Absent: every object of the kind in the namespace.
    #[serde(default)]
    pub name: Option<String>,
}

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The grants of every namespace, for lookups by the namespace referred to.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    by_namespace: BTreeMap<String, Vec<ReferenceGrantSpec>>,
}

impl Grants {
    /// From `(namespace, spec)` pairs, the namespace being the grant's.
    pub fn new<'a>(grants: impl IntoIterator<Item = (&'a str, &'a ReferenceGrantSpec)>) -> Self {
        let mut by_namespace: BTreeMap<String, Vec<ReferenceGrantSpec>> = BTreeMap::new();
        for (ns, spec) in grants {
            by_namespace.entry(ns.to_owned()).or_default().push(spec.clone());
        }
        Grants { by_namespace }
    }

    /// Whether a route of `route_kind` (`HTTPRoute`, `GRPCRoute`) in `route_ns` may name Service `ns/name` as a
    /// backend: always in its own namespace, else when a grant in `ns` allows it.
    pub fn permits_service(&self, route_kind: &str, route_ns: &str, (ns, name): (&str, &str)) -> bool {
        ns == route_ns
            || self.by_namespace.get(ns).into_iter().flatten().any(|g| {
                g.from.iter().any(|f| f.group == GATEWAY_GROUP && f.kind == route_kind && f.namespace == route_ns)
                    && g.to.iter().any(|t| {
                        matches!(t.group.as_str(), "" | "core")
                            && t.kind == "Service"
                            && t.name.as_deref().is_none_or(|n| n == name)
                    })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(yaml: &str) -> ReferenceGrant {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_grant_opens_only_what_it_names_to_whom_it_names() {
        let named = grant(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: backend}\n\
             spec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: frontend}]\n  \
             to: [{group: '', kind: Service, name: api}]\n",
        );
        let whole = grant(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: ReferenceGrant\nmetadata: {name: all, namespace: shared}\n\
             spec:\n  from: [{group: gateway.networking.k8s.io, kind: GRPCRoute, namespace: frontend}]\n  \
             to: [{group: '', kind: Service}]\n",
        );
        let grants = Grants::new([("backend", &named.spec), ("shared", &whole.spec)]);
        assert!(grants.permits_service("HTTPRoute", "frontend", ("backend", "api")));
        assert!(!grants.permits_service("HTTPRoute", "frontend", ("backend", "db")), "another name");
        assert!(!grants.permits_service("GRPCRoute", "frontend", ("backend", "api")), "another kind");
        assert!(!grants.permits_service("HTTPRoute", "other", ("backend", "api")), "another namespace");
        assert!(grants.permits_service("GRPCRoute", "frontend", ("shared", "anything")), "no name: every Service");
        assert!(!grants.permits_service("HTTPRoute", "frontend", ("shared", "anything")));
        assert!(grants.permits_service("HTTPRoute", "x", ("x", "y")), "the route's own namespace needs no grant");
        assert!(!Grants::default().permits_service("HTTPRoute", "frontend", ("backend", "api")));
    }

    #[test]
    fn a_grant_with_a_field_ambit_does_not_know_is_refused() {
        let r: Result<ReferenceGrant, _> = serde_yaml::from_str(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g}\n\
             spec: {from: [], to: [], extra: 1}\n",
        );
        assert!(r.is_err());
    }
}
