//! One HTTPRoute or GRPCRoute → one `ambit.waypoint.v1.Route`, with the Gateway API's defaults filled in (a match
//! without a path is PathPrefix `/`, a rule without matches has one such match, a weight defaults to 1). A GRPCRoute's
//! service/method matches become path matches, so the waypoint runs one routing engine for both kinds.
//!
//! What the Gateway API says makes a route invalid (an unknown filter, ReplacePrefixMatch without a PathPrefix match,
//! a bad duration…) is a [`RouteError`]: the route is left out, and its status says why. A backendRef that does not
//! resolve does not invalidate the route: it becomes an explicit invalid backend, which the waypoint answers with 500.

use ambit_api::waypoint::{
    backend, filter, path_match, path_modifier, Backend, Filter, Header, HeaderMatch, HeaderModifier, MatchType,
    PathMatch, PathModifier, QueryParamMatch, RequestMirror, RequestRedirect, Retry, Route, RouteKind, RouteMatch,
    RouteOrigin, Rule, ServiceBackend, Timeouts, UrlRewrite,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::route_crd::{self as crd, BackendRef, GrpcRoute, HttpRoute, RouteFilter};

/// Retries when a route's `retry` names no `attempts`: Istio's waypoint default.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

/// Why a route is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// A filter type Ambit does not implement, or one not allowed in this kind of route.
    #[error("filter type {0:?} is not supported")]
    UnsupportedFilter(String),
    /// A filter without the configuration of its type.
    #[error("filter {0} has no {1} configuration")]
    MissingFilterConfig(String, &'static str),
    /// A match or path modifier type the spec does not define.
    #[error("unknown {what} type {value:?}")]
    UnknownType { what: &'static str, value: String },
    /// A path that is not absolute.
    #[error("path {0:?} must start with \"/\"")]
    RelativePath(String),
    /// ReplacePrefixMatch needs every match of the rule to be a PathPrefix match.
    #[error("rule {0}: ReplacePrefixMatch needs PathPrefix path matches only")]
    PrefixRewriteWithoutPrefix(usize),
    /// RequestRedirect and URLRewrite in the same rule.
    #[error("rule {0}: RequestRedirect and URLRewrite cannot be combined")]
    RedirectAndRewrite(usize),
    /// A duration that is not Gateway API syntax (`1h`, `30s`, `500ms`…).
    #[error("bad duration {0:?}: want up to four of <number><h|m|s|ms>")]
    BadDuration(String),
    /// backendRequest longer than request.
    #[error("rule {0}: timeouts.backendRequest is longer than timeouts.request")]
    BackendTimeoutTooLong(usize),
    /// A redirect status code the Gateway API does not allow (301, 302, and the extended 303, 307, 308).
    #[error("redirect status code {0} is not 301, 302, 303, 307 or 308")]
    BadRedirectCode(u32),
    /// A gRPC method match with neither service nor method.
    #[error("a gRPC method match needs a service or a method")]
    EmptyGrpcMatch,
    /// A port outside 1..=65535.
    #[error("port {0} out of range 1-65535")]
    BadPort(u32),
}

/// Resolves a backendRef of a route in `namespace` to a backend (a Service, or an invalid marker saying why).
pub trait BackendResolver {
    /// The backend `r` names, seen from a route in `namespace`.
    fn resolve(&self, namespace: &str, r: &BackendRef) -> Backend;
}

/// Where a route of `kind` came from: the object's namespace, name and age.
pub(super) fn origin(kind: RouteKind, meta: &ObjectMeta) -> RouteOrigin {
    RouteOrigin {
        kind: kind.into(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        creation_timestamp: meta.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
    }
}

/// Converts an HTTPRoute.
pub fn http_route(r: &HttpRoute, backends: &dyn BackendResolver) -> Result<Route, RouteError> {
    let o = origin(RouteKind::HttpRoute, &r.metadata);
    let mut rules = Vec::with_capacity(r.spec.rules.len().max(1));
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let matches = if rule.matches.is_empty() {
            vec![match_all()]
        } else {
            rule.matches.iter().map(http_match).collect::<Result<Vec<_>, _>>()?
        };
        let filters = filters(&rule.filters, &o.namespace, backends, false)?;
        check_filters(i, &filters, &matches)?;
        let timeouts = match &rule.timeouts {
            None => None,
            Some(t) => {
                let request = t.request.as_deref().map(duration).transpose()?;
                let backend_request = t.backend_request.as_deref().map(duration).transpose()?;
                if let (Some(r), Some(b)) = (&request, &backend_request) {
                    let zero = |d: &prost_types::Duration| d.seconds == 0 && d.nanos == 0;
                    if !zero(r) && (zero(b) || (b.seconds, b.nanos) > (r.seconds, r.nanos)) {
                        return Err(RouteError::BackendTimeoutTooLong(i));
                    }
                }
                Some(Timeouts { request, backend_request })
            }
        };
        let retry = match &rule.retry {
            None => None,
            Some(r) => Some(Retry {
                attempts: r.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS),
                codes: r.codes.clone(),
                backoff: r.backoff.as_deref().map(duration).transpose()?,
                ..Default::default()
            }),
        };
        rules.push(Rule {
            name: rule.name.clone().unwrap_or_default(),
            matches,
            filters,
            backends: backend_list(&rule.backend_refs, &o.namespace, backends, false)?,
            timeouts,
            retry,
        });
    }
    if r.spec.rules.is_empty() {
        // The spec's default: one rule matching everything, without backends (500).
        rules.push(Rule { matches: vec![match_all()], ..Default::default() });
    }
    Ok(Route { origin: Some(o), hostnames: r.spec.hostnames.clone(), rules })
}

/// Converts a GRPCRoute: method matches become path matches.
pub fn grpc_route(r: &GrpcRoute, backends: &dyn BackendResolver) -> Result<Route, RouteError> {
    let o = origin(RouteKind::GrpcRoute, &r.metadata);
    let mut rules = Vec::with_capacity(r.spec.rules.len());
    for rule in &r.spec.rules {
        let matches = if rule.matches.is_empty() {
            vec![match_all()]
        } else {
            rule.matches.iter().map(grpc_match).collect::<Result<Vec<_>, _>>()?
        };
        rules.push(Rule {
            name: rule.name.clone().unwrap_or_default(),
            matches,
            filters: filters(&rule.filters, &o.namespace, backends, true)?,
            backends: backend_list(&rule.backend_refs, &o.namespace, backends, true)?,
            timeouts: None,
            retry: None,
        });
    }
    if rules.is_empty() {
        rules.push(Rule { matches: vec![match_all()], ..Default::default() });
    }
    Ok(Route { origin: Some(o), hostnames: r.spec.hostnames.clone(), rules })
}

fn match_all() -> RouteMatch {
    RouteMatch { path: Some(prefix("/")), ..Default::default() }
}

fn prefix(v: &str) -> PathMatch {
    PathMatch { r#type: path_match::Type::Prefix.into(), value: v.into(), ignore_case: false }
}

fn http_match(m: &crd::HttpRouteMatch) -> Result<RouteMatch, RouteError> {
    let path = match &m.path {
        None => prefix("/"),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            let t = match p.type_.as_deref().unwrap_or("PathPrefix") {
                "Exact" => path_match::Type::Exact,
                "PathPrefix" => path_match::Type::Prefix,
                "RegularExpression" => path_match::Type::RegularExpression,
                other => return Err(RouteError::UnknownType { what: "path match", value: other.into() }),
            };
            if t != path_match::Type::RegularExpression && !value.starts_with('/') {
                return Err(RouteError::RelativePath(value));
            }
            PathMatch { r#type: t.into(), value, ignore_case: false }
        }
    };
    Ok(RouteMatch {
        path: Some(path),
        headers: header_matches(&m.headers)?,
        query_params: m
            .query_params
            .iter()
            .map(|q| {
                Ok(QueryParamMatch {
                    name: q.name.clone(),
                    r#type: match_type(&q.type_)?.into(),
                    value: q.value.clone(),
                })
            })
            .collect::<Result<_, RouteError>>()?,
        method: m.method.clone().unwrap_or_default().to_ascii_uppercase(),
    })
}

fn header_matches(h: &[crd::ValueMatch]) -> Result<Vec<HeaderMatch>, RouteError> {
    h.iter()
        .map(|h| {
            Ok(HeaderMatch {
                name: h.name.to_ascii_lowercase(),
                r#type: match_type(&h.type_)?.into(),
                value: h.value.clone(),
            })
        })
        .collect()
}

fn match_type(t: &Option<String>) -> Result<MatchType, RouteError> {
    match t.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(MatchType::Exact),
        "RegularExpression" => Ok(MatchType::RegularExpression),
        other => Err(RouteError::UnknownType { what: "header or query match", value: other.into() }),
    }
}

/// A gRPC service/method match as a path match (gRPC paths are `/<service>/<method>`).
fn grpc_match(m: &crd::GrpcRouteMatch) -> Result<RouteMatch, RouteError> {
    let path = match &m.method {
        None => prefix("/"),
        Some(mm) => {
            let (service, method) = (mm.service.as_deref().filter(|s| !s.is_empty()), mm.method.as_deref());
            let method = method.filter(|s| !s.is_empty());
            match mm.type_.as_deref().unwrap_or("Exact") {
                "Exact" => match (service, method) {
                    (Some(s), Some(m)) => PathMatch {
                        r#type: path_match::Type::Exact.into(),
                        value: format!("/{s}/{m}"),
                        ignore_case: false,
                    },
                    (Some(s), None) => prefix(&format!("/{s}")),
                    (None, Some(m)) => PathMatch {
                        r#type: path_match::Type::RegularExpression.into(),
                        value: format!("/[^/]+/{}", escape(m)),
                        ignore_case: false,
                    },
                    (None, None) => return Err(RouteError::EmptyGrpcMatch),
                },
                "RegularExpression" => {
                    if service.is_none() && method.is_none() {
                        return Err(RouteError::EmptyGrpcMatch);
                    }
                    PathMatch {
                        r#type: path_match::Type::RegularExpression.into(),
                        value: format!("/({})/({})", service.unwrap_or("[^/]+"), method.unwrap_or("[^/]+")),
                        ignore_case: false,
                    }
                }
                other => return Err(RouteError::UnknownType { what: "gRPC method match", value: other.into() }),
            }
        }
    };
    Ok(RouteMatch { path: Some(path), headers: header_matches(&m.headers)?, ..Default::default() })
}

/// Escapes RE2 metacharacters.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn filters(
    fs: &[RouteFilter],
    ns: &str,
    backends: &dyn BackendResolver,
    grpc: bool,
) -> Result<Vec<Filter>, RouteError> {
    fs.iter().map(|f| route_filter(f, ns, backends, grpc)).collect()
}

fn route_filter(f: &RouteFilter, ns: &str, backends: &dyn BackendResolver, grpc: bool) -> Result<Filter, RouteError> {
    let missing = |what| RouteError::MissingFilterConfig(f.type_.clone(), what);
    let kind = match f.type_.as_str() {
        "RequestHeaderModifier" => filter::Kind::RequestHeaderModifier(headers(
            f.request_header_modifier.as_ref().ok_or_else(|| missing("requestHeaderModifier"))?,
        )),
        "ResponseHeaderModifier" => filter::Kind::ResponseHeaderModifier(headers(
            f.response_header_modifier.as_ref().ok_or_else(|| missing("responseHeaderModifier"))?,
        )),
        "RequestMirror" => {
            let m = f.request_mirror.as_ref().ok_or_else(|| missing("requestMirror"))?;
            let mut backend = backends.resolve(ns, &m.backend_ref);
            backend.weight = 1;
            let percent = match (&m.percent, &m.fraction) {
                (Some(p), _) => f64::from(*p),
                (None, Some(fr)) => f64::from(fr.numerator) * 100.0 / f64::from(fr.denominator.unwrap_or(100).max(1)),
                (None, None) => 100.0,
            };
            filter::Kind::RequestMirror(RequestMirror { backend: Some(backend), percent: percent.min(100.0) })
        }
        "RequestRedirect" if !grpc => {
            let r = f.request_redirect.as_ref().ok_or_else(|| missing("requestRedirect"))?;
            let status_code = r.status_code.unwrap_or(302);
            if !matches!(status_code, 301 | 302 | 303 | 307 | 308) {
                return Err(RouteError::BadRedirectCode(status_code));
            }
            if let Some(p) = r.port.filter(|p| !(1..=65535).contains(p)) {
                return Err(RouteError::BadPort(p));
            }
            filter::Kind::RequestRedirect(RequestRedirect {
                scheme: r.scheme.clone().unwrap_or_default(),
                hostname: r.hostname.clone().unwrap_or_default(),
                path: r.path.as_ref().map(path_modifier).transpose()?,
                port: r.port.unwrap_or(0),
                status_code,
            })
        }
        "URLRewrite" if !grpc => {
            let r = f.url_rewrite.as_ref().ok_or_else(|| missing("urlRewrite"))?;
            filter::Kind::UrlRewrite(UrlRewrite {
                hostname: r.hostname.clone().unwrap_or_default(),
                path: r.path.as_ref().map(path_modifier).transpose()?,
            })
        }
        other => return Err(RouteError::UnsupportedFilter(other.into())),
    };
    Ok(Filter { kind: Some(kind) })
}

fn headers(h: &crd::HeaderModifier) -> HeaderModifier {
    let pairs =
        |v: &[crd::HeaderValue]| v.iter().map(|h| Header { name: h.name.clone(), value: h.value.clone() }).collect();
    HeaderModifier { set: pairs(&h.set), add: pairs(&h.add), remove: h.remove.clone() }
}

fn path_modifier(p: &crd::PathModifier) -> Result<PathModifier, RouteError> {
    let kind = match p.type_.as_str() {
        "ReplaceFullPath" => path_modifier::Kind::ReplaceFullPath(p.replace_full_path.clone().unwrap_or_default()),
        "ReplacePrefixMatch" => {
            path_modifier::Kind::ReplacePrefixMatch(p.replace_prefix_match.clone().unwrap_or_default())
        }
        other => return Err(RouteError::UnknownType { what: "path modifier", value: other.into() }),
    };
    Ok(PathModifier { kind: Some(kind) })
}

/// The spec's rules across a rule's filters and matches.
fn check_filters(rule: usize, filters: &[Filter], matches: &[RouteMatch]) -> Result<(), RouteError> {
    let has = |f: fn(&filter::Kind) -> bool| filters.iter().any(|x| x.kind.as_ref().is_some_and(f));
    let redirect = has(|k| matches!(k, filter::Kind::RequestRedirect(_)));
    let rewrite = has(|k| matches!(k, filter::Kind::UrlRewrite(_)));
    if redirect && rewrite {
        return Err(RouteError::RedirectAndRewrite(rule));
    }
    let replaces_prefix = filters.iter().any(|f| {
        let path = match &f.kind {
            Some(filter::Kind::RequestRedirect(r)) => r.path.as_ref(),
            Some(filter::Kind::UrlRewrite(r)) => r.path.as_ref(),
            _ => None,
        };
        matches!(path.and_then(|p| p.kind.as_ref()), Some(path_modifier::Kind::ReplacePrefixMatch(_)))
    });
    let all_prefix = matches.iter().all(|m| m.path.as_ref().is_some_and(|p| p.r#type() == path_match::Type::Prefix));
    if replaces_prefix && !all_prefix {
        return Err(RouteError::PrefixRewriteWithoutPrefix(rule));
    }
    Ok(())
}

fn backend_list(
    refs: &[BackendRef],
    ns: &str,
    backends: &dyn BackendResolver,
    grpc: bool,
) -> Result<Vec<Backend>, RouteError> {
    refs.iter()
        .map(|r| {
            let mut b = backends.resolve(ns, r);
            b.weight = r.weight.unwrap_or(1);
            b.filters = filters(&r.filters, ns, backends, grpc)?;
            Ok(b)
        })
        .collect()
}

/// A backend that does not resolve, and why.
pub fn invalid(reason: String) -> Backend {
    Backend { kind: Some(backend::Kind::Invalid(reason)), ..Default::default() }
}

/// A Service backend.
pub fn service(namespace: &str, hostname: String, port: u32) -> Backend {
    let s = ServiceBackend { hostname, namespace: namespace.into(), port, ..Default::default() };
    Backend { kind: Some(backend::Kind::Service(s)), ..Default::default() }
}

/// A Gateway API duration (GEP-2257): one to four `<digits><h|m|s|ms>` parts, e.g. `1h30m`, `500ms`, `0s`.
pub fn duration(s: &str) -> Result<prost_types::Duration, RouteError> {
    let bad = || RouteError::BadDuration(s.into());
    let mut rest = s;
    let (mut millis, mut parts) = (0u64, 0);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        millis += n * unit;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    let seconds = i64::try_from(millis / 1000).map_err(|_| bad())?;
    Ok(prost_types::Duration { seconds, nanos: ((millis % 1000) * 1_000_000) as i32 })
}

#[cfg(test)]
#[path = "route_convert_tests.rs"]
mod tests;
