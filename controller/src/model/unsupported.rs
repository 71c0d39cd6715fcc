//! Mesh APIs a user may apply that Ambit does not implement yet. Such an object is never silently ignored: the file
//! source logs it at info level, and in Kubernetes the controller also records a Warning Event on it, so
//! `kubectl describe` tells the user that it has no effect.

/// One API kind: group, version served, kind, plural.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
}

const fn kind(group: &'static str, version: &'static str, kind: &'static str, plural: &'static str) -> Kind {
    Kind { group, version, kind, plural }
}

/// The kinds that are recognised but not applied.
pub const KINDS: &[Kind] = &[
    kind("networking.istio.io", "v1", "ServiceEntry", "serviceentries"),
    kind("networking.istio.io", "v1", "Sidecar", "sidecars"),
    kind("networking.istio.io", "v1alpha3", "EnvoyFilter", "envoyfilters"),
    kind("security.istio.io", "v1", "RequestAuthentication", "requestauthentications"),
];

/// The kind of `group`/`kind` if Ambit recognises it without applying it.
pub fn find(group: &str, kind: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.group == group && k.kind == kind)
}

/// What the user is told about such an object.
pub fn message(kind: &str) -> String {
    format!("Ambit does not apply {kind} yet: this object has no effect on traffic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_unsupported_kinds_are_found_by_group_and_kind() {
        assert_eq!(find("networking.istio.io", "ServiceEntry").unwrap().plural, "serviceentries");
        assert!(find("networking.istio.io", "VirtualService").is_none(), "applied by the waypoint");
        assert!(find("security.istio.io", "RequestAuthentication").is_some());
        assert!(find("security.istio.io", "AuthorizationPolicy").is_none(), "applied kinds are not listed");
        assert!(find("gateway.networking.k8s.io", "HTTPRoute").is_none(), "routes are applied by the waypoint");
        assert!(find("apps", "Deployment").is_none(), "kinds outside the mesh are not listed");
        assert!(message("ServiceEntry").contains("no effect"));
    }
}
