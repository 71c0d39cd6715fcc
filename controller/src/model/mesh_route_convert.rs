//! One VirtualService (its `http[]` routes) or one TrafficSplit → one `ambit.waypoint.v1.Route` for one service port,
//! with Istio's defaults filled in: a rule without matches matches every path (as a plain prefix "/"), a lone
//! destination gets every request, `retries` without `attempts` disables retries, a fault without a percentage hits
//! every request, a redirect answers 301. The waypoint keeps such a route's rules in the order written (first match
//! wins), so no Gateway API precedence applies.
//!
//! A conversion needs the port because Istio resolves a destination without a port against the port the request came
//! in on, and because a match may name a port. What makes the object invalid (a bad duration, an unknown `retryOn`
//! condition, a redirect beside a route…) is a [`MeshRouteError`] whatever the port, so the object is refused as a
//! whole; a destination that does not resolve becomes an invalid backend (500 for its share), as for HTTPRoutes.

use ambit_api::waypoint::{
    filter, path_match, path_modifier, Backend, FaultInjection, Filter, Header, HeaderMatch, HeaderModifier, MatchType,
    PathMatch, PathModifier, QueryParamMatch, RequestMirror, RequestRedirect, Retry, Route, RouteKind, RouteMatch,
    Rule, Timeouts, UrlRewrite,
};

use super::mesh_route_crd::{
    StringMatch, TrafficSplit, VirtualService, VsDestination, VsFault, VsHeaderOps, VsHeaders, VsHttpRoute, VsMatch,
    VsRetries,
};
use super::route_convert::{escape, origin};

/// Why a VirtualService or TrafficSplit is invalid.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MeshRouteError {
    /// A `StringMatch` with none or several of exact/prefix/regex, or a kind a field does not allow.
    #[error("{0}")]
    BadMatch(String),
    /// Not Go duration syntax.
    #[error("bad duration {0:?}: want Go duration syntax such as 500ms, 1.5s, 1m30s")]
    BadDuration(String),
    /// A `retryOn` condition Envoy does not define.
    #[error("retryOn condition {0:?} is not one Envoy defines")]
    BadRetryOn(String),
    /// A rule without route and redirect, or with both.
    #[error("http[{0}]: {1}")]
    BadRule(usize, &'static str),
    /// A `tcp[]` rule without a route, or matching a port that cannot exist.
    #[error("tcp[{0}]: {1}")]
    BadTcpRule(usize, String),
    /// An abort status outside 200..=599, an unknown gRPC status name, a redirect code the waypoint does not send.
    #[error("{0}")]
    BadStatus(String),
    /// A percentage outside 0..=100.
    #[error("percentage {0} is outside 0-100")]
    BadPercent(f64),
    /// A TrafficSplit or VirtualService part the waypoint cannot apply.
    #[error("{0}")]
    Unsupported(String),
}

/// Resolves a destination host of an object in `namespace` to a backend, for requests to service port `port`.
pub trait DestinationResolver {
    /// The backend `host` (with `subset`, `port`) names.
    fn resolve(&self, namespace: &str, dest: &VsDestination, port: u32) -> Backend;
}

/// What a conversion is for: the service port the route is attached to.
#[derive(Clone, Copy, Debug)]
pub struct PortContext {
    /// The service port (0 when only validating).
    pub port: u32,
}

/// Converts a VirtualService's `http[]` for port `at`. `None`: no rule applies to that port (every match names
/// another port).
pub fn virtual_service(
    vs: &VirtualService,
    at: PortContext,
    dests: &dyn DestinationResolver,
) -> Result<Option<Route>, MeshRouteError> {
    if !vs.spec.tls.is_empty() {
        // Routing by SNI needs the ClientHello, and a waypoint relays a TLS port's bytes without reading them.
        return Err(MeshRouteError::Unsupported(
            "tls routes (by SNI) are not applied: the waypoint relays TLS without reading it; route a TLS port with \
             tcp[] (by port) instead"
                .into(),
        ));
    }
    let o = origin(RouteKind::VirtualService, &vs.metadata);
    let mut rules = Vec::with_capacity(vs.spec.http.len());
    for (i, r) in vs.spec.http.iter().enumerate() {
        if let Some(rule) = http_rule(i, r, at, &o.namespace, dests)? {
            rules.push(rule);
        }
    }
    Ok((!rules.is_empty()).then(|| Route { origin: Some(o), hostnames: Vec::new(), rules }))
}

/// Converts a TrafficSplit for port `at`: every request to the apex service goes to a backend service (same port),
/// by weight.
pub fn traffic_split(
    ts: &TrafficSplit,
    at: PortContext,
    dests: &dyn DestinationResolver,
) -> Result<Route, MeshRouteError> {
    let o = origin(RouteKind::TrafficSplit, &ts.metadata);
    if !ts.spec.matches.is_empty() {
        return Err(MeshRouteError::Unsupported("matches (HTTPRouteGroup references) are not applied".into()));
    }
    if ts.spec.backends.is_empty() {
        return Err(MeshRouteError::Unsupported("a TrafficSplit needs at least one backend".into()));
    }
    let backends = ts
        .spec
        .backends
        .iter()
        .map(|b| {
            let dest = VsDestination { host: b.service.clone(), ..Default::default() };
            Backend { weight: b.weight, ..dests.resolve(&o.namespace, &dest, at.port) }
        })
        .collect();
    let rule = Rule { matches: vec![match_all()], backends, ..Default::default() };
    Ok(Route { origin: Some(o), hostnames: Vec::new(), rules: vec![rule] })
}

fn match_all() -> RouteMatch {
    RouteMatch { path: Some(path(path_match::Type::StringPrefix, "/", false)), ..Default::default() }
}

fn path(t: path_match::Type, value: &str, ignore_case: bool) -> PathMatch {
    PathMatch { r#type: t.into(), value: value.into(), ignore_case }
}

fn http_rule(
    i: usize,
    r: &VsHttpRoute,
    at: PortContext,
    ns: &str,
    dests: &dyn DestinationResolver,
) -> Result<Option<Rule>, MeshRouteError> {
    let mut matches = Vec::with_capacity(r.matches.len().max(1));
    for m in &r.matches {
        let converted = http_match(m)?;
        if m.port.is_none_or(|p| p == at.port || at.port == 0) {
            matches.push(converted);
        }
    }
    if r.matches.is_empty() {
        matches.push(match_all());
    } else if matches.is_empty() {
        return Ok(None);
    }
    let mut filters = Vec::new();
    if let Some(f) = &r.fault {
        filters.push(Filter { kind: Some(filter::Kind::Fault(fault(f)?)) });
    }
    filters.extend(header_filters(r.headers.as_ref()));
    match (&r.redirect, r.route.is_empty()) {
        (Some(_), false) => return Err(MeshRouteError::BadRule(i, "redirect and route cannot both be set")),
        (None, true) => return Err(MeshRouteError::BadRule(i, "a route or a redirect is required")),
        (Some(_), true) if r.rewrite.is_some() => {
            return Err(MeshRouteError::BadRule(i, "redirect and rewrite cannot both be set"))
        }
        _ => {}
    }
    if let Some(rd) = &r.redirect {
        let status_code = rd.redirect_code.unwrap_or(301);
        if !matches!(status_code, 301 | 302 | 303 | 307 | 308) {
            return Err(MeshRouteError::BadStatus(format!(
                "redirect code {status_code} is not 301, 302, 303, 307 or 308"
            )));
        }
        let redirect = RequestRedirect {
            scheme: rd.scheme.clone().unwrap_or_default(),
            hostname: rd.authority.clone().unwrap_or_default(),
            path: rd.uri.clone().map(|p| PathModifier { kind: Some(path_modifier::Kind::ReplaceFullPath(p)) }),
            port: rd.port.unwrap_or(0),
            status_code,
        };
        filters.push(Filter { kind: Some(filter::Kind::RequestRedirect(redirect)) });
    }
    if let Some(rw) = &r.rewrite {
        let path = rw.uri.clone().map(|uri| rewrite_path(i, uri, &matches)).transpose()?;
        let rewrite = UrlRewrite { hostname: rw.authority.clone().unwrap_or_default(), path };
        filters.push(Filter { kind: Some(filter::Kind::UrlRewrite(rewrite)) });
    }
    let mirrors = r.mirror.iter().map(|d| (d, r.mirror_percentage.as_ref().map(|p| p.value)));
    for (dest, percent) in
        mirrors.chain(r.mirrors.iter().map(|m| (&m.destination, m.percentage.as_ref().map(|p| p.value))))
    {
        let percent = percentage(percent.unwrap_or(100.0))?;
        let mirror = RequestMirror { backend: Some(dests.resolve(ns, dest, at.port)), percent };
        filters.push(Filter { kind: Some(filter::Kind::RequestMirror(mirror)) });
    }
    let all_unweighted = r.route.iter().all(|d| d.weight.is_none());
    let backends = r
        .route
        .iter()
        .map(|d| Backend {
            weight: weight(d.weight, all_unweighted),
            filters: header_filters(d.headers.as_ref()),
            ..dests.resolve(ns, &d.destination, at.port)
        })
        .collect();
    let per_try = r.retries.as_ref().and_then(|t| t.per_try_timeout.as_deref()).map(go_duration).transpose()?;
    let request = r.timeout.as_deref().map(go_duration).transpose()?;
    let timeouts = (request.is_some() || per_try.is_some()).then_some(Timeouts { request, backend_request: per_try });
    Ok(Some(Rule {
        name: r.name.clone().unwrap_or_default(),
        matches,
        filters,
        backends,
        timeouts,
        retry: r.retries.as_ref().map(retry).transpose()?,
    }))
}

/// A destination's weight, as Istio reads it: destinations without weights share equally; once one has a weight, one
/// without gets none.
pub fn weight(weight: Option<u32>, all_unweighted: bool) -> u32 {
    if all_unweighted {
        1
    } else {
        weight.unwrap_or(0)
    }
}

/// `rewrite.uri`: replaces the matched prefix when the rule matches by prefix, else the whole path (Istio). A rule
/// mixing prefix and other path matches has no single meaning: refused.
fn rewrite_path(i: usize, uri: String, matches: &[RouteMatch]) -> Result<PathModifier, MeshRouteError> {
    let is_prefix = |m: &RouteMatch| m.path.as_ref().is_some_and(|p| p.r#type() == path_match::Type::StringPrefix);
    let kind = if matches.iter().all(is_prefix) {
        path_modifier::Kind::ReplacePrefixMatch(uri)
    } else if !matches.iter().any(is_prefix) {
        path_modifier::Kind::ReplaceFullPath(uri)
    } else {
        return Err(MeshRouteError::BadRule(i, "rewrite.uri with both prefix and other uri matches"));
    };
    Ok(PathModifier { kind: Some(kind) })
}

fn http_match(m: &VsMatch) -> Result<RouteMatch, MeshRouteError> {
    let path = match &m.uri {
        None => path(path_match::Type::StringPrefix, "/", m.ignore_uri_case),
        Some(s) => match one_of(s, "uri")? {
            Kind::Exact(v) => path(path_match::Type::Exact, v, m.ignore_uri_case),
            Kind::Prefix(v) => path(path_match::Type::StringPrefix, v, m.ignore_uri_case),
            Kind::Regex(v) => path(path_match::Type::RegularExpression, v, m.ignore_uri_case),
            Kind::Present => {
                return Err(MeshRouteError::BadMatch("uri: one of exact, prefix, regex is required".into()))
            }
        },
    };
    let method = match &m.method {
        None => String::new(),
        Some(s) => match one_of(s, "method")? {
            Kind::Exact(v) => v.to_ascii_uppercase(),
            _ => return Err(MeshRouteError::BadMatch("method: only exact is supported".into())),
        },
    };
    let headers = m
        .headers
        .iter()
        .map(|(name, s)| {
            let (t, value) = value_match(s, name)?;
            Ok(HeaderMatch { name: name.to_ascii_lowercase(), r#type: t.into(), value })
        })
        .collect::<Result<_, MeshRouteError>>()?;
    let query_params = m
        .query_params
        .iter()
        .map(|(name, s)| {
            let (t, value) = value_match(s, name)?;
            Ok(QueryParamMatch { name: name.clone(), r#type: t.into(), value })
        })
        .collect::<Result<_, MeshRouteError>>()?;
    Ok(RouteMatch { path: Some(path), headers, query_params, method })
}

enum Kind<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Regex(&'a str),
    /// `{}`: the value only has to be present.
    Present,
}

fn one_of<'a>(s: &'a StringMatch, what: &str) -> Result<Kind<'a>, MeshRouteError> {
    match (&s.exact, &s.prefix, &s.regex) {
        (Some(v), None, None) => Ok(Kind::Exact(v)),
        (None, Some(v), None) => Ok(Kind::Prefix(v)),
        (None, None, Some(v)) => Ok(Kind::Regex(v)),
        (None, None, None) => Ok(Kind::Present),
        _ => Err(MeshRouteError::BadMatch(format!("{what}: only one of exact, prefix, regex may be set"))),
    }
}

/// A header or query parameter match: prefix and presence become regular expressions over the whole value.
fn value_match(s: &StringMatch, what: &str) -> Result<(MatchType, String), MeshRouteError> {
    Ok(match one_of(s, what)? {
        Kind::Exact(v) => (MatchType::Exact, v.to_owned()),
        Kind::Prefix(v) => (MatchType::RegularExpression, format!("{}.*", escape(v))),
        Kind::Regex(v) => (MatchType::RegularExpression, v.to_owned()),
        Kind::Present => (MatchType::RegularExpression, ".*".into()),
    })
}

fn header_filters(h: Option<&VsHeaders>) -> Vec<Filter> {
    let ops = |o: &VsHeaderOps| {
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter().map(|(name, value)| Header { name: name.clone(), value: value.clone() }).collect()
        };
        HeaderModifier { set: pairs(&o.set), add: pairs(&o.add), remove: o.remove.clone() }
    };
    let Some(h) = h else { return Vec::new() };
    let request = h.request.as_ref().map(|o| filter::Kind::RequestHeaderModifier(ops(o)));
    let response = h.response.as_ref().map(|o| filter::Kind::ResponseHeaderModifier(ops(o)));
    request.into_iter().chain(response).map(|k| Filter { kind: Some(k) }).collect()
}

fn percentage(p: f64) -> Result<f64, MeshRouteError> {
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(MeshRouteError::BadPercent(p))
    }
}

fn fault(f: &VsFault) -> Result<FaultInjection, MeshRouteError> {
    let mut out = FaultInjection::default();
    if let Some(d) = &f.delay {
        out.delay = Some(go_duration(&d.fixed_delay)?);
        let legacy = d.percent.map(f64::from);
        out.delay_percent = percentage(d.percentage.as_ref().map(|p| p.value).or(legacy).unwrap_or(100.0))?;
    }
    if let Some(a) = &f.abort {
        match (a.http_status, a.grpc_status.as_deref()) {
            (Some(s), None) if (200..=599).contains(&s) => out.abort_http_status = s,
            (Some(s), None) => return Err(MeshRouteError::BadStatus(format!("abort httpStatus {s} is not 200-599"))),
            (None, Some(name)) => {
                let code = grpc_code(name).ok_or_else(|| {
                    MeshRouteError::BadStatus(format!("abort grpcStatus {name:?} is not a gRPC status"))
                })?;
                out.abort_grpc_status = Some(code);
            }
            _ => return Err(MeshRouteError::BadStatus("abort needs one of httpStatus, grpcStatus".into())),
        }
        out.abort_percent = percentage(a.percentage.as_ref().map_or(100.0, |p| p.value))?;
    }
    Ok(out)
}

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status by its name (`UNAVAILABLE`, or Envoy's retryOn spelling `unavailable`, `resource-exhausted`).
fn grpc_code(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase().replace('-', "_");
    GRPC_CODES.iter().position(|c| *c == upper).and_then(|i| u32::try_from(i).ok())
}

/// `retries`: Istio disables retries when `attempts` is absent or 0; `retryOn` lists Envoy's conditions. Connection
/// failures are always retried by the waypoint, so `connect-failure`, `refused-stream` and `reset` add no code.
fn retry(r: &VsRetries) -> Result<Retry, MeshRouteError> {
    let Some(retry_on) = r.retry_on.as_deref() else {
        // Istio's default conditions: the waypoint's default codes.
        return Ok(Retry { attempts: r.attempts.unwrap_or(0), ..Default::default() });
    };
    let (mut codes, mut grpc_codes, mut on_reset_or_timeout) = (Vec::new(), Vec::new(), false);
    for cond in retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match cond {
            // Envoy: these also retry an attempt that broke or timed out (no response at all).
            "5xx" => {
                codes.extend(500..=599);
                on_reset_or_timeout = true;
            }
            "gateway-error" => {
                codes.extend([502, 503, 504]);
                on_reset_or_timeout = true;
            }
            "reset" => on_reset_or_timeout = true,
            "retriable-4xx" => codes.push(409),
            "connect-failure" | "refused-stream" | "reset-before-request" | "retriable-status-codes" => {}
            "cancelled" | "deadline-exceeded" | "internal" | "resource-exhausted" | "unavailable" => {
                grpc_codes.extend(grpc_code(cond));
            }
            c => match c.parse::<u32>() {
                Ok(code) if (100..=599).contains(&code) => codes.push(code),
                _ => return Err(MeshRouteError::BadRetryOn(c.into())),
            },
        }
    }
    codes.sort_unstable();
    codes.dedup();
    Ok(Retry {
        attempts: r.attempts.unwrap_or(0),
        codes,
        grpc_codes,
        exact_codes: true,
        on_reset_or_timeout,
        backoff: None,
    })
}

/// A Go duration (`300ms`, `1.5s`, `1h2m`), as Istio's CRDs take them.
pub fn go_duration(s: &str) -> Result<prost_types::Duration, MeshRouteError> {
    let bad = || MeshRouteError::BadDuration(s.into());
    let mut rest = s.trim();
    if rest == "0" {
        return Ok(prost_types::Duration::default());
    }
    let mut nanos = 0f64;
    let mut parts = 0;
    while !rest.is_empty() {
        let len = rest.bytes().take_while(|b| b.is_ascii_digit() || *b == b'.').count();
        let n: f64 = rest[..len].parse().map_err(|_| bad())?;
        rest = &rest[len..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        nanos += n * unit;
        parts += 1;
    }
    if parts == 0 || !nanos.is_finite() || nanos > 1e18 {
        return Err(bad());
    }
    let nanos = nanos.round() as i64;
    Ok(prost_types::Duration { seconds: nanos / 1_000_000_000, nanos: (nanos % 1_000_000_000) as i32 })
}

#[cfg(test)]
#[path = "mesh_route_convert_tests.rs"]
mod tests;
