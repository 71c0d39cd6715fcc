//! Serde types for Gateway API `HTTPRoute` and `GRPCRoute` (`gateway.networking.k8s.io/v1`), the fields the
//! waypoint applies. Rules, matches, filters and backends are closed: a field Ambit does not apply (a CORS filter,
//! session persistence…) fails the route's parse, so the route is refused with a status that names the field instead
//! of being applied in part.

use serde::Deserialize;

use super::crd::Resource;

/// `gateway.networking.k8s.io/v1` HTTPRoute.
pub type HttpRoute = Resource<HttpRouteSpec>;
/// `gateway.networking.k8s.io/v1` GRPCRoute.
pub type GrpcRoute = Resource<GrpcRouteSpec>;

/// `spec.parentRefs[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    /// API group; absent is `gateway.networking.k8s.io`, `""` the core group.
    #[serde(default)]
    pub group: Option<String>,
    /// Kind; absent is `Gateway`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Namespace; absent is the route's.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// A Service port's name (GAMMA), or a Gateway listener's.
    #[serde(default)]
    pub section_name: Option<String>,
    /// A Service port (GAMMA), or a Gateway listener's.
    #[serde(default)]
    pub port: Option<u32>,
}

impl ParentReference {
    /// Whether it names a core Service (the GAMMA mesh profile).
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), Some("" | "core")) && self.kind.as_deref() == Some("Service")
    }

    /// `(namespace, name)` of the parent, for a route in `route_ns`.
    pub fn key(&self, route_ns: &str) -> (String, String) {
        (self.namespace.clone().unwrap_or_else(|| route_ns.to_owned()), self.name.clone())
    }
}

/// `spec` of an HTTPRoute.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// Where it attaches.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Host header values it applies to (none: all).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules; none is one rule that matches everything and has no backend.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// `spec` of a GRPCRoute.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    /// Where it attaches.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Host header values it applies to (none: all).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// `rules[]` of an HTTPRoute.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Optional rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// OR-ed matches; none matches every request.
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters, in order.
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    /// Backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<RouteTimeouts>,
    /// Retries (GEP-1731).
    #[serde(default)]
    pub retry: Option<RouteRetry>,
}

/// `rules[]` of a GRPCRoute.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    /// Optional rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// OR-ed matches; none matches every request.
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Filters, in order (header modifiers, mirror).
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
    /// Backends.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

/// `matches[]` of an HTTPRoute rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// Path; absent is PathPrefix `/`.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Headers, AND-ed.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Query parameters, AND-ed.
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<String>,
}

/// `matches[].path`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// Value; absent is `/`.
    #[serde(default)]
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// `matches[]` of a GRPCRoute rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    /// Service and method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    /// Headers, AND-ed.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

/// `matches[].method` of a GRPCRoute.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// Fully qualified service, e.g. `helloworld.Greeter`.
    #[serde(default)]
    pub service: Option<String>,
    /// Method, e.g. `SayHello`.
    #[serde(default)]
    pub method: Option<String>,
}

/// A filter of a rule or of a backendRef.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`, `URLRewrite`, `RequestMirror`, …
    #[serde(rename = "type")]
    pub type_: String,
    /// For `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `RequestRedirect`.
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    /// For `URLRewrite`.
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
    /// For `RequestMirror`.
    #[serde(default)]
    pub request_mirror: Option<RequestMirror>,
    /// For `ExtensionRef` (never resolved: Ambit has no extension kinds).
    #[serde(default)]
    pub extension_ref: Option<serde_yaml::Value>,
}

/// A header modifier.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    /// Replaced.
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Appended.
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A path change of a redirect or rewrite.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub type_: String,
    /// For `ReplaceFullPath`.
    #[serde(default)]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`.
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

/// `RequestRedirect`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// Port.
    #[serde(default)]
    pub port: Option<u32>,
    /// 301 or 302.
    #[serde(default)]
    pub status_code: Option<u32>,
}

/// `URLRewrite`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    /// Host.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Path.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// `RequestMirror`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMirror {
    /// Where the copy goes.
    pub backend_ref: BackendRef,
    /// Percent of requests.
    #[serde(default)]
    pub percent: Option<u32>,
    /// Fraction of requests.
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

/// A fraction (`denominator` defaults to 100).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fraction {
    /// Numerator.
    pub numerator: u32,
    /// Denominator.
    #[serde(default)]
    pub denominator: Option<u32>,
}

/// A backendRef (also a mirror's backend, where weight and filters do not apply).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// API group; absent or `""` is core.
    #[serde(default)]
    pub group: Option<String>,
    /// Kind; absent is `Service`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace; absent is the route's.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Service port (required for Services).
    #[serde(default)]
    pub port: Option<u32>,
    /// Weight; absent is 1.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Filters for requests sent to this backend.
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
}

/// `rules[].timeouts` (Gateway API durations such as `1s`, `500ms`, `1h30m`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTimeouts {
    /// Whole request.
    #[serde(default)]
    pub request: Option<String>,
    /// One backend attempt.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// `rules[].retry`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRetry {
    /// Status codes retried.
    #[serde(default)]
    pub codes: Vec<u32>,
    /// Retries.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Backoff.
    #[serde(default)]
    pub backoff: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_route_reads_the_published_field_names() {
        let yaml = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: ns}
spec:
  parentRefs: [{group: "", kind: Service, name: backend, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1}, headers: [{name: x, value: y}], queryParams: [{type: RegularExpression, name: q, value: "a.*"}], method: GET}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}], remove: [c]}}]
    backendRefs: [{name: v1, port: 8080, weight: 90, filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]}]
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {codes: [503], attempts: 3, backoff: 100ms}
"#;
        let r: HttpRoute = serde_yaml::from_str(yaml).unwrap();
        assert!(r.spec.parent_refs[0].is_service());
        assert_eq!(r.spec.parent_refs[0].port, Some(80));
        let rule = &r.spec.rules[0];
        assert_eq!(rule.matches[0].query_params[0].type_.as_deref(), Some("RegularExpression"));
        assert_eq!(rule.backend_refs[0].weight, Some(90));
        assert_eq!(rule.retry.as_ref().unwrap().codes, [503]);
        assert_eq!(rule.timeouts.as_ref().unwrap().backend_request.as_deref(), Some("2s"));
    }

    #[test]
    fn a_field_ambit_does_not_apply_fails_the_parse_with_its_name() {
        let yaml = "apiVersion: v\nkind: HTTPRoute\nspec: {rules: [{sessionPersistence: {type: Cookie}}]}\n";
        let err = serde_yaml::from_str::<HttpRoute>(yaml).unwrap_err().to_string();
        assert!(err.contains("sessionPersistence"), "{err}");
    }

    #[test]
    fn a_grpc_route_reads_service_and_method() {
        let yaml =
            "apiVersion: v\nkind: GRPCRoute\nspec: {rules: [{matches: [{method: {service: a.B, method: C}}]}]}\n";
        let r: GrpcRoute = serde_yaml::from_str(yaml).unwrap();
        let m = r.spec.rules[0].matches[0].method.as_ref().unwrap();
        assert_eq!((m.service.as_deref(), m.method.as_deref()), (Some("a.B"), Some("C")));
    }
}
