//! The controller's `ambit.waypoint.v1.ServiceRoutes` → the routing engine's
//! types: per service port a compiled [`RouteTable`], with the port's
//! protocol and target port.
//!
//! Every field of the proto is mapped. What cannot be converted (a header
//! name HTTP does not allow, a port out of range, a message the controller
//! left empty) is reported as a [`Problem`] beside the result and never
//! panics: a route that cannot be converted is dropped on its own and the
//! other routes of the port still apply, as the controller does with routes
//! it finds invalid. A port whose routes were all dropped sends its requests
//! to the service itself, as a port without routes does.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ambit_api::waypoint as pb;
use http::{HeaderName, HeaderValue, Method, StatusCode};

use crate::circuit::{ConnectionPool, ConnectionSettings, Limits};
use crate::fault::{Abort, FaultInjection};
use crate::filters::{Filter, HeaderModifier, PathModifier, RequestMirror, RequestRedirect, UrlRewrite};
use crate::lb::{CookieMaker, HashKey, LbPolicy, LoadBalancer};
use crate::outlier::OutlierConfig;
use crate::retry::{RetryPolicy, Timeouts};
use crate::route::{
    Backend, BackendTarget, HeaderMatch, Match, PathMatch, QueryMatch, Route, RouteKind, RouteTable, Rule, TcpRoute,
    ValueMatch,
};
use crate::target::{ServiceTarget, Subset, TargetPolicy};

/// A service port's application protocol (`PortRoutes.protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// Not declared: detect it from the first bytes.
    #[default]
    Detect,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Opaque: forwarded at L4, no route applies.
    Tcp,
}

impl Protocol {
    fn from_proto(p: i32) -> Protocol {
        match pb::Protocol::try_from(p) {
            Ok(pb::Protocol::Http) => Protocol::Http1,
            Ok(pb::Protocol::Http2) => Protocol::Http2,
            Ok(pb::Protocol::Grpc) => Protocol::Grpc,
            Ok(pb::Protocol::Tcp) => Protocol::Tcp,
            // A value of a newer controller: detecting is always safe.
            Ok(pb::Protocol::Unspecified) | Err(_) => Protocol::Detect,
        }
    }
}

/// One service port the waypoint serves.
#[derive(Debug)]
pub struct PortConfig {
    /// The service port (what the client connected to).
    pub port: u16,
    /// The numeric targetPort; `None` when it is named (resolve it per
    /// endpoint from the workload's `services` ports).
    pub target_port: Option<u16>,
    /// The port's name in the Service.
    pub name: String,
    pub protocol: Protocol,
    /// The port's producer routes (of the service's namespace) by
    /// precedence; a port without (valid) ones sends every request to the
    /// service itself ([`RouteTable::to_service`]).
    pub table: RouteTable,
    /// Consumer routes (GAMMA: routes of another namespace), one table per
    /// namespace: they route the requests of that namespace's clients
    /// instead of `table`.
    pub consumers: Vec<(String, RouteTable)>,
    /// Whether `table` is the default route to the service itself (no route
    /// attached, or every attached route was dropped).
    pub default_route: bool,
    /// Where a TCP connection goes (VirtualService `tcp[]`); `None`: to the
    /// service itself.
    pub tcp: Option<TcpRoute>,
    /// The service itself at this port, with its DestinationRule policy:
    /// where a request or connection goes that no route sends elsewhere.
    pub own: ServiceTarget,
}

impl PortConfig {
    /// The table that routes a request from a client of namespace
    /// `client_ns` (from its peer identity), and whether it is the default
    /// route to the service itself.
    pub fn table_for(&self, client_ns: &str) -> (&RouteTable, bool) {
        match self.consumers.iter().find(|(ns, _)| ns == client_ns) {
            Some((_, table)) => (table, false),
            None => (&self.table, self.default_route),
        }
    }
}

/// One service the waypoint serves, converted.
#[derive(Debug)]
pub struct ServiceConfig {
    /// `<name>.<namespace>.svc.<domain suffix>`.
    pub hostname: String,
    pub namespace: String,
    pub name: String,
    /// In the Service's order.
    pub ports: Vec<PortConfig>,
}

impl ServiceConfig {
    /// The key of the service's `istio.workload.Address`: `namespace/hostname`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// The configuration of service port `port`.
    pub fn port(&self, port: u16) -> Option<&PortConfig> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// What happened to the configuration that could not be converted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consequence {
    /// The whole route was left out of the port's table.
    RouteDropped,
    /// The service port was left out (the waypoint refuses traffic to it).
    PortDropped,
    /// One RequestMirror filter was left out; the route applies without it.
    MirrorSkipped,
    /// One match never matches (an invalid regular expression); the route's
    /// other matches apply.
    MatchDisabled,
}

impl fmt::Display for Consequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Consequence::RouteDropped => "route dropped",
            Consequence::PortDropped => "port dropped",
            Consequence::MirrorSkipped => "mirror skipped",
            Consequence::MatchDisabled => "match disabled",
        })
    }
}

/// Something of a `ServiceRoutes` that could not be converted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("service {service} port {port}{}: {reason} ({consequence})", route.as_ref().map(|r| format!(" route {r}")).unwrap_or_default())]
pub struct Problem {
    /// `namespace/hostname`.
    pub service: String,
    /// The service port, as the proto has it.
    pub port: u32,
    /// `namespace/name` of the route, when a route is concerned.
    pub route: Option<String>,
    pub reason: String,
    pub consequence: Consequence,
}

/// Converts one `ServiceRoutes`. Never fails as a whole: what cannot be
/// converted is left out and described in the problems.
pub fn service_routes(sr: &pb::ServiceRoutes) -> (ServiceConfig, Vec<Problem>) {
    let key = format!("{}/{}", sr.namespace, sr.hostname);
    let mut problems = Vec::new();
    let mut ports = Vec::with_capacity(sr.ports.len());
    for p in &sr.ports {
        let mut problem = |route: Option<String>, reason: String, consequence| {
            problems.push(Problem { service: key.clone(), port: p.port, route, reason, consequence })
        };
        let Some(port) = port_number(p.port) else {
            problem(None, format!("port {} out of range 1-65535", p.port), Consequence::PortDropped);
            continue;
        };
        let target_port = match p.target_port {
            0 => None,
            t => match port_number(t) {
                Some(t) => Some(t),
                None => {
                    problem(None, format!("targetPort {t} out of range 1-65535"), Consequence::PortDropped);
                    continue;
                }
            },
        };
        let tcp = p.tcp_route.as_ref().and_then(|t| match tcp_route(t) {
            Ok(t) => Some(t),
            Err(e) => {
                problem(Some(origin_name(t.origin.as_ref())), e, Consequence::RouteDropped);
                None
            }
        });
        let mut routes = Vec::with_capacity(p.routes.len());
        for r in &p.routes {
            let mut skipped = Vec::new();
            match route(r, &mut skipped) {
                Ok(route) => {
                    let name = format!("{}/{}", route.namespace, route.name);
                    for reason in skipped {
                        problem(Some(name.clone()), reason, Consequence::MirrorSkipped);
                    }
                    routes.push(route);
                }
                Err(e) => problem(Some(origin_name(r.origin.as_ref())), e, Consequence::RouteDropped),
            }
        }
        // Consumer routes (from another namespace than the service's) route that namespace's clients alone.
        let (producer, consumer): (Vec<Route>, Vec<Route>) =
            routes.into_iter().partition(|r| r.namespace == sr.namespace);
        let mut compile = |routes: Vec<Route>| {
            let (table, errors) = RouteTable::build(routes);
            for e in errors {
                let reason = format!("rule {} match {}: {}", e.rule, e.matched, e.reason);
                problem(Some(e.route), reason, Consequence::MatchDisabled);
            }
            table
        };
        let mut consumers: Vec<(String, Vec<Route>)> = Vec::new();
        for r in consumer {
            match consumers.iter_mut().find(|(ns, _)| *ns == r.namespace) {
                Some((_, routes)) => routes.push(r),
                None => consumers.push((r.namespace.clone(), vec![r])),
            }
        }
        let consumers = consumers.into_iter().map(|(ns, routes)| (ns, compile(routes))).collect();
        let default_route = producer.is_empty();
        // The controller checks the policy; one that still fails is left at the defaults.
        let own = ServiceTarget {
            hostname: sr.hostname.clone(),
            namespace: sr.namespace.clone(),
            port,
            policy: target_policy(None, p.policy.as_ref()).ok().flatten(),
        };
        let table = if default_route { RouteTable::to_service(own.clone()) } else { compile(producer) };
        ports.push(PortConfig {
            port,
            target_port,
            name: p.name.clone(),
            protocol: Protocol::from_proto(p.protocol),
            table,
            consumers,
            default_route,
            tcp,
            own,
        });
    }
    let config =
        ServiceConfig { hostname: sr.hostname.clone(), namespace: sr.namespace.clone(), name: sr.name.clone(), ports };
    (config, problems)
}

fn port_number(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn origin_name(origin: Option<&pb::RouteOrigin>) -> String {
    origin.map_or_else(|| "<no origin>".to_owned(), |o| format!("{}/{}", o.namespace, o.name))
}

/// A TCP route; `Err` drops it (connections then go to the service itself).
fn tcp_route(t: &pb::TcpRoute) -> Result<TcpRoute, String> {
    let origin = t.origin.as_ref().ok_or("tcp route has no origin")?;
    let backends = t.backends.iter().map(|b| backend(b, &mut Vec::new())).collect::<Result<Vec<_>, _>>()?;
    Ok(TcpRoute { namespace: origin.namespace.clone(), name: origin.name.clone(), rule: t.rule, backends })
}

/// One route; `Err` drops it. Mirrors that cannot be sent are left out and
/// described in `skipped`.
fn route(r: &pb::Route, skipped: &mut Vec<String>) -> Result<Route, String> {
    let origin = r.origin.as_ref().ok_or("route has no origin")?;
    let kind = match pb::RouteKind::try_from(origin.kind) {
        Ok(pb::RouteKind::GrpcRoute) => RouteKind::Grpc,
        Ok(pb::RouteKind::HttpRoute) => RouteKind::Http,
        Ok(pb::RouteKind::VirtualService) => RouteKind::VirtualService,
        Ok(pb::RouteKind::TrafficSplit) => RouteKind::TrafficSplit,
        Ok(pb::RouteKind::Unspecified) | Err(_) => return Err(format!("unknown route kind {}", origin.kind)),
    };
    let rules = r
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| self::rule(rule, skipped).map_err(|e| format!("rule {i}: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(Route {
        kind,
        namespace: origin.namespace.clone(),
        name: origin.name.clone(),
        created: origin.creation_timestamp,
        hostnames: r.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
        rules,
    })
}

fn rule(r: &pb::Rule, skipped: &mut Vec<String>) -> Result<Rule, String> {
    Ok(Rule {
        name: r.name.clone(),
        matches: r.matches.iter().map(route_match).collect::<Result<_, _>>()?,
        filters: filters(&r.filters, skipped)?,
        backends: r.backends.iter().map(|b| backend(b, skipped)).collect::<Result<_, _>>()?,
        timeouts: match &r.timeouts {
            None => Timeouts::default(),
            Some(t) => Timeouts {
                request: timeout(t.request.as_ref(), "timeouts.request")?,
                backend_request: timeout(t.backend_request.as_ref(), "timeouts.backendRequest")?,
            },
        },
        retry: match &r.retry {
            None => RetryPolicy::default(),
            Some(retry) => {
                let codes: Vec<u16> = retry
                    .codes
                    .iter()
                    .map(|c| {
                        status(*c).map(|s| s.as_u16()).ok_or_else(|| format!("retry code {c} is not an HTTP status"))
                    })
                    .collect::<Result<_, _>>()?;
                let backoff = retry.backoff.as_ref().map(|d| duration(d, "retry.backoff")).transpose()?;
                if retry.exact_codes {
                    // VirtualService `retryOn`: exactly these codes, even none.
                    let policy = RetryPolicy::gateway(Some(retry.attempts), Vec::new(), backoff);
                    RetryPolicy {
                        codes,
                        grpc_codes: retry.grpc_codes.clone(),
                        on_reset: retry.on_reset_or_timeout,
                        on_timeout: retry.on_reset_or_timeout,
                        ..policy
                    }
                } else {
                    RetryPolicy::gateway(Some(retry.attempts), codes, backoff)
                }
            }
        },
    })
}

fn status(code: u32) -> Option<StatusCode> {
    u16::try_from(code).ok().and_then(|c| StatusCode::from_u16(c).ok())
}

/// A proto duration; negative or out of range is an error.
fn duration(d: &prost_types::Duration, what: &str) -> Result<Duration, String> {
    Duration::try_from(*d).map_err(|e| format!("{what}: {e}"))
}

/// A timeout: absent or zero means none.
fn timeout(d: Option<&prost_types::Duration>, what: &str) -> Result<Option<Duration>, String> {
    Ok(d.map(|d| duration(d, what)).transpose()?.filter(|d| !d.is_zero()))
}

fn route_match(m: &pb::RouteMatch) -> Result<Match, String> {
    let path = match &m.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => match pb::path_match::Type::try_from(p.r#type) {
            Ok(pb::path_match::Type::Exact) => PathMatch::Exact(p.value.clone()),
            Ok(pb::path_match::Type::Prefix) => PathMatch::Prefix(p.value.clone()),
            Ok(pb::path_match::Type::RegularExpression) => PathMatch::RegularExpression(p.value.clone()),
            Ok(pb::path_match::Type::StringPrefix) => PathMatch::StringPrefix(p.value.clone()),
            Err(_) => return Err(format!("unknown path match type {}", p.r#type)),
        },
    };
    let path_ignore_case = m.path.as_ref().is_some_and(|p| p.ignore_case);
    let headers = m
        .headers
        .iter()
        .map(|h| {
            let name = header_name(&h.name)?;
            Ok(HeaderMatch { name, value: value_match(h.r#type, &h.value)? })
        })
        .collect::<Result<_, String>>()?;
    let query = m
        .query_params
        .iter()
        .map(|q| Ok(QueryMatch { name: q.name.clone(), value: value_match(q.r#type, &q.value)? }))
        .collect::<Result<_, String>>()?;
    let method = match m.method.as_str() {
        "" => None,
        name => Some(Method::from_bytes(name.as_bytes()).map_err(|_| format!("invalid method {name:?}"))?),
    };
    Ok(Match { path, headers, query, method, path_ignore_case })
}

fn value_match(t: i32, value: &str) -> Result<ValueMatch, String> {
    match pb::MatchType::try_from(t) {
        Ok(pb::MatchType::Exact) => Ok(ValueMatch::Exact(value.to_owned())),
        Ok(pb::MatchType::RegularExpression) => Ok(ValueMatch::RegularExpression(value.to_owned())),
        Err(_) => Err(format!("unknown match type {t}")),
    }
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("invalid header name {name:?}"))
}

fn header_value(name: &str, value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value).map_err(|_| format!("invalid value {value:?} for header {name:?}"))
}

fn filters(fs: &[pb::Filter], skipped: &mut Vec<String>) -> Result<Vec<Filter>, String> {
    let mut out = Vec::with_capacity(fs.len());
    for f in fs {
        if let Some(f) = filter(f, skipped)? {
            out.push(f);
        }
    }
    Ok(out)
}

/// `Ok(None)`: a mirror that cannot be sent, left out (and said in
/// `skipped`).
fn filter(f: &pb::Filter, skipped: &mut Vec<String>) -> Result<Option<Filter>, String> {
    use pb::filter::Kind;
    let kind = f.kind.as_ref().ok_or("filter of an unknown type")?;
    Ok(Some(match kind {
        Kind::RequestHeaderModifier(m) => Filter::RequestHeaderModifier(header_modifier(m)?),
        Kind::ResponseHeaderModifier(m) => Filter::ResponseHeaderModifier(header_modifier(m)?),
        Kind::RequestRedirect(r) => Filter::RequestRedirect(RequestRedirect {
            scheme: match r.scheme.as_str() {
                "" => None,
                s @ ("http" | "https") => Some(s.to_owned()),
                s => return Err(format!("redirect scheme {s:?} is not http or https")),
            },
            hostname: non_empty(&r.hostname),
            path: r.path.as_ref().map(path_modifier).transpose()?,
            port: match r.port {
                0 => None,
                p => Some(port_number(p).ok_or_else(|| format!("redirect port {p} out of range 1-65535"))?),
            },
            status: match r.status_code {
                0 => StatusCode::FOUND,
                c => status(c)
                    .filter(StatusCode::is_redirection)
                    .ok_or_else(|| format!("redirect status code {c} is not a redirection"))?,
            },
        }),
        Kind::UrlRewrite(r) => Filter::UrlRewrite(UrlRewrite {
            hostname: non_empty(&r.hostname),
            path: r.path.as_ref().map(path_modifier).transpose()?,
        }),
        Kind::RequestMirror(m) => {
            let target = match m.backend.as_ref().and_then(|b| b.kind.as_ref()) {
                Some(pb::backend::Kind::Service(s)) => service_target(s),
                Some(pb::backend::Kind::Invalid(why)) => Err(why.clone()),
                None => Err("a backend of an unknown kind".to_owned()),
            };
            let percent = percent(m.percent);
            match target {
                Ok(target) => Filter::RequestMirror(RequestMirror { target, percent }),
                Err(why) => {
                    skipped.push(format!("RequestMirror not sent: {why}"));
                    return Ok(None);
                }
            }
        }
        Kind::Fault(f) => Filter::Fault(fault(f)?),
    }))
}

/// A share in percent, 0–100 (NaN: none).
fn percent(p: f64) -> f64 {
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, 100.0)
    }
}

/// A FaultInjection. A gRPC status, when set, is the abort's answer; else
/// an HTTP status (0: no abort) that must be a valid one (Envoy's range,
/// 200–599).
fn fault(f: &pb::FaultInjection) -> Result<FaultInjection, String> {
    let abort = match (f.abort_grpc_status, f.abort_http_status) {
        (Some(code), _) => Some(Abort::Grpc(code)),
        (None, 0) => None,
        (None, code) => Some(Abort::Http(
            status(code)
                .filter(|s| (200..600).contains(&s.as_u16()))
                .ok_or_else(|| format!("fault abort status {code} is not an HTTP status in 200-599"))?,
        )),
    };
    Ok(FaultInjection {
        delay: timeout(f.delay.as_ref(), "fault.delay")?,
        delay_percent: percent(f.delay_percent),
        abort,
        abort_percent: percent(f.abort_percent),
    })
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn header_modifier(m: &pb::HeaderModifier) -> Result<HeaderModifier, String> {
    let pairs = |headers: &[pb::Header]| {
        headers
            .iter()
            .map(|h| Ok((header_name(&h.name)?, header_value(&h.name, &h.value)?)))
            .collect::<Result<Vec<_>, String>>()
    };
    Ok(HeaderModifier {
        set: pairs(&m.set)?,
        add: pairs(&m.add)?,
        remove: m.remove.iter().map(|n| header_name(n)).collect::<Result<_, _>>()?,
    })
}

fn path_modifier(p: &pb::PathModifier) -> Result<PathModifier, String> {
    match p.kind.as_ref().ok_or("path modifier of an unknown type")? {
        pb::path_modifier::Kind::ReplaceFullPath(path) => Ok(PathModifier::ReplaceFullPath(path.clone())),
        pb::path_modifier::Kind::ReplacePrefixMatch(path) => Ok(PathModifier::ReplacePrefixMatch(path.clone())),
    }
}

fn service_target(s: &pb::ServiceBackend) -> Result<ServiceTarget, String> {
    let port = port_number(s.port).ok_or_else(|| format!("backend {} port {} out of range", s.hostname, s.port))?;
    let subset = s.subset.as_ref().map(|sub| Subset::new(sub.name.clone(), sub.workloads.clone()));
    let policy = target_policy(subset, s.policy.as_ref())?;
    Ok(ServiceTarget { hostname: s.hostname.clone(), namespace: s.namespace.clone(), port, policy })
}

/// A backend's subset and DestinationRule traffic policy; `None` when there is neither.
pub(crate) fn target_policy(
    subset: Option<Subset>,
    tp: Option<&pb::TrafficPolicy>,
) -> Result<Option<Arc<TargetPolicy>>, String> {
    let lb = tp.and_then(|t| t.load_balancer.as_ref()).map(load_balancer).transpose()?;
    let outlier = tp.and_then(|t| t.outlier_detection.as_ref()).map(outlier_config).transpose()?;
    let pool = tp.and_then(|t| t.connection_pool.as_ref()).map(connection_pool).transpose()?;
    if subset.is_none() && lb.is_none() && outlier.is_none() && pool.is_none() {
        return Ok(None);
    }
    Ok(Some(Arc::new(TargetPolicy { subset, lb: lb.unwrap_or_default(), outlier, pool })))
}

/// `connectionPool` (0 and absent durations: no limit, the waypoint's defaults).
fn connection_pool(c: &pb::ConnectionPool) -> Result<ConnectionPool, String> {
    Ok(ConnectionPool {
        limits: Limits {
            max_connections: c.max_connections,
            max_pending: c.http1_max_pending_requests,
            max_requests: c.http2_max_requests,
            max_retries: c.max_retries,
        },
        connection: ConnectionSettings {
            connect_timeout: timeout(c.connect_timeout.as_ref(), "connectionPool.tcp.connectTimeout")?,
            idle_timeout: timeout(c.idle_timeout.as_ref(), "connectionPool.http.idleTimeout")?,
            max_requests_per_connection: c.max_requests_per_connection,
        },
    })
}

/// `outlierDetection` (the controller fills in Istio's defaults).
fn outlier_config(o: &pb::OutlierDetection) -> Result<OutlierConfig, String> {
    let d = |d: Option<&prost_types::Duration>, what| d.map_or(Ok(Duration::ZERO), |d| duration(d, what));
    Ok(OutlierConfig {
        consecutive_5xx: o.consecutive_5xx_errors,
        consecutive_gateway: o.consecutive_gateway_errors,
        interval: d(o.interval.as_ref(), "outlierDetection.interval")?,
        base_ejection: d(o.base_ejection_time.as_ref(), "outlierDetection.baseEjectionTime")?,
        max_ejection_percent: o.max_ejection_percent.min(100),
        min_health_percent: o.min_health_percent.min(100),
    })
}

/// A DestinationRule's load balancer.
pub(crate) fn load_balancer(lb: &pb::LoadBalancer) -> Result<LoadBalancer, String> {
    use pb::load_balancer::{HashKey as Key, Simple};
    let simple = match lb.simple() {
        Simple::LeastRequest => LbPolicy::LeastRequest,
        Simple::RoundRobin => LbPolicy::RoundRobin,
        Simple::Random => LbPolicy::Random,
    };
    let hash = match &lb.hash_key {
        None => None,
        Some(Key::HttpHeaderName(h)) => Some(HashKey::Header(header_name(h)?)),
        Some(Key::HttpCookie(c)) => Some(HashKey::Cookie(c.clone())),
        Some(Key::UseSourceIp(true)) => Some(HashKey::SourceIp),
        Some(Key::UseSourceIp(false)) => None,
        Some(Key::HttpQueryParameterName(q)) => Some(HashKey::QueryParameter(q.clone())),
    };
    let make_cookie = match (&lb.hash_key, lb.cookie_ttl.as_ref()) {
        (Some(Key::HttpCookie(name)), Some(ttl)) => Some(CookieMaker {
            name: name.clone(),
            ttl: duration(ttl, "consistentHash.httpCookie.ttl")?,
            path: lb.cookie_path.clone(),
        }),
        _ => None,
    };
    Ok(LoadBalancer { simple, hash, make_cookie })
}

/// A backendRef. One that cannot be called becomes an invalid backend (its
/// share of requests gets 500), as the controller does for those that do
/// not resolve: the route stays.
fn backend(b: &pb::Backend, skipped: &mut Vec<String>) -> Result<Backend, String> {
    let target = match b.kind.as_ref() {
        Some(pb::backend::Kind::Service(s)) => {
            service_target(s).map_or_else(BackendTarget::Invalid, BackendTarget::Service)
        }
        Some(pb::backend::Kind::Invalid(why)) => BackendTarget::Invalid(why.clone()),
        None => BackendTarget::Invalid("a backend of an unknown kind".to_owned()),
    };
    Ok(Backend { target, weight: b.weight, filters: filters(&b.filters, skipped)? })
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
