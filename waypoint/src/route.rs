//! The routing model of one service port and the choice of a rule for a
//! request, with Gateway API's precedence across every route attached to the
//! service (HTTPRoute and GRPCRoute alike: a GRPCRoute's service/method
//! matches arrive as path matches `/pkg.Service/Method`).
//!
//! VirtualService and TrafficSplit routes keep their rules in the order
//! written instead (the first that matches wins, as Istio documents); see
//! [`RouteKind::is_ordered`] for how they sort beside Gateway API routes.
//!
//! The controller's `ambit.waypoint.v1` resources are converted into these
//! plain types; [`RouteTable::build`] compiles them once (regular
//! expressions, precedence order) so that matching a request allocates
//! nothing.

use std::cmp::{Ordering, Reverse};

use http::request::Parts;
use http::{HeaderMap, HeaderName, Method};
use regex::Regex;

use crate::authority::{hostname_matches, request_host};
use crate::filters::Filter;
use crate::reply::{Reply, ReplyReason, GRPC_UNIMPLEMENTED};
use crate::retry::{RetryPolicy, Timeouts};
use crate::target::ServiceTarget;

/// Which kind of route a route came from. For Gateway API routes only the
/// answer to an unroutable request differs (a gRPC client must get a gRPC
/// status, not an HTTP 404); VirtualService and TrafficSplit routes are not
/// reordered by precedence ([`RouteKind::is_ordered`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// Gateway API HTTPRoute.
    Http,
    /// Gateway API GRPCRoute.
    Grpc,
    /// Istio VirtualService (`http[]`): rules in the order written.
    VirtualService,
    /// SMI TrafficSplit: one rule matching every request.
    TrafficSplit,
}

impl RouteKind {
    /// Whether the route's rules are tried in the order written, the first
    /// matching one winning (VirtualService, TrafficSplit), rather than by
    /// Gateway API precedence. The controller never mixes the two kinds on
    /// a port; should a table mix them anyway, every Gateway API entry comes
    /// first (by precedence), then the ordered entries by route, rule and
    /// match index alone (see `precedence`).
    pub fn is_ordered(self) -> bool {
        matches!(self, RouteKind::VirtualService | RouteKind::TrafficSplit)
    }
}

/// One route (HTTPRoute, GRPCRoute, VirtualService, TrafficSplit) as
/// attached to one service port.
#[derive(Clone, Debug)]
pub struct Route {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` in unix seconds: the older route wins a
    /// precedence tie.
    pub created: i64,
    /// `spec.hostnames`; empty accepts every host. `*.x` matches subdomains.
    pub hostnames: Vec<String>,
    pub rules: Vec<Rule>,
}

/// One rule of a route.
#[derive(Clone, Debug, Default)]
pub struct Rule {
    /// `rules[].name`; empty when the route names none (for logs and
    /// metrics).
    pub name: String,
    /// OR-ed; empty means one match on PathPrefix `/` (Gateway API default).
    pub matches: Vec<Match>,
    /// Applied in order before the backend's own filters.
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    pub timeouts: Timeouts,
    /// The route's retry (GEP-1731), or Istio's waypoint default.
    pub retry: RetryPolicy,
}

/// All set conditions must hold (AND).
#[derive(Clone, Debug)]
pub struct Match {
    pub path: PathMatch,
    /// Names compare case-insensitively (a `HeaderName` is lower case); when
    /// a name appears twice only the first entry counts (Gateway API).
    pub headers: Vec<HeaderMatch>,
    /// Names compare exactly; the first entry of a name counts.
    pub query: Vec<QueryMatch>,
    pub method: Option<Method>,
    /// The path compares ignoring ASCII case (VirtualService
    /// `ignoreUriCase`): exact and prefix values byte for byte up to ASCII
    /// case, a regular expression with case-insensitive matching.
    pub path_ignore_case: bool,
}

impl Default for Match {
    fn default() -> Self {
        Match {
            path: PathMatch::Prefix("/".into()),
            headers: Vec::new(),
            query: Vec::new(),
            method: None,
            path_ignore_case: false,
        }
    }
}

/// A path match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// The whole path (case-sensitive unless [`Match::path_ignore_case`]).
    Exact(String),
    /// A prefix of whole path segments: `/foo` matches `/foo` and `/foo/bar`,
    /// not `/foobar`; a trailing `/` in the prefix is ignored.
    Prefix(String),
    /// An RE2-syntax expression that must match the whole path.
    RegularExpression(String),
    /// A plain string prefix (VirtualService `uri.prefix`): `/api` matches
    /// `/api`, `/api/x` and `/apiX`. ReplacePrefixMatch replaces exactly it.
    /// Ranks as a PathPrefix of its length for Gateway API precedence.
    StringPrefix(String),
}

/// How a header or query value is compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueMatch {
    Exact(String),
    /// An RE2-syntax expression that must match the whole value.
    RegularExpression(String),
}

#[derive(Clone, Debug)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
}

#[derive(Clone, Debug)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

/// A backendRef of a rule.
#[derive(Clone, Debug)]
pub struct Backend {
    pub target: BackendTarget,
    /// Relative share of requests; 0 gets none.
    pub weight: u32,
    /// Applied after the rule's filters, only for requests sent here.
    pub filters: Vec<Filter>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendTarget {
    Service(ServiceTarget),
    /// A backendRef that does not resolve; its share of requests gets 500,
    /// as the Gateway API asks. The text says why.
    Invalid(String),
}

/// A VirtualService `tcp[]` rule on one TCP port: each connection goes to
/// one of its backends, drawn by weight ([`crate::balance::pick_backend`]).
#[derive(Clone, Debug)]
pub struct TcpRoute {
    /// The VirtualService's namespace and name.
    pub namespace: String,
    pub name: String,
    /// The rule's index in `tcp[]`.
    pub rule: u32,
    /// Their filters are never applied: a connection has no request.
    pub backends: Vec<Backend>,
}

/// A configuration problem found while building a table; the rest of the
/// table works, the offending match never matches.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("route {route} rule {rule} match {matched}: {reason}")]
pub struct ConfigError {
    /// `namespace/name` of the route.
    pub route: String,
    pub rule: usize,
    pub matched: usize,
    pub reason: String,
}

/// The rule chosen for a request.
#[derive(Clone, Copy, Debug)]
pub struct Matched<'a> {
    pub route: &'a Route,
    pub rule: &'a Rule,
    pub rule_index: usize,
    /// The part of the path the match covered, for URLRewrite and
    /// RequestRedirect ReplacePrefixMatch: a PathPrefix without its trailing
    /// `/` (`""` for `/`), an Exact path or a StringPrefix whole (as
    /// configured: with `path_ignore_case` the request's path may differ in
    /// ASCII case), `None` for a regex.
    pub matched_prefix: Option<&'a str>,
    /// `matched_prefix` is a StringPrefix: ReplacePrefixMatch replaces
    /// exactly it, without the whole-segment handling of a PathPrefix.
    pub string_prefix: bool,
}

/// No rule takes the request; [`NoRoute::reply`] is the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRoute {
    /// 404 (Gateway API; VirtualService and TrafficSplit too).
    Http,
    /// A gRPC request, or a port whose routes are all GRPCRoutes: gRPC
    /// UNIMPLEMENTED in trailers-only form, not an HTTP page a gRPC client
    /// cannot read.
    Grpc,
}

impl NoRoute {
    pub fn reply(self) -> Reply {
        match self {
            NoRoute::Http => Reply::not_found(),
            NoRoute::Grpc => Reply::grpc_status(GRPC_UNIMPLEMENTED, ReplyReason::NoRoute),
        }
    }
}

/// Every route of one service port, in precedence order.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// One per (route, rule, match), best first.
    entries: Vec<Entry>,
    /// Every route is a GRPCRoute: an unroutable request gets a gRPC status.
    grpc_only: bool,
}

#[derive(Debug)]
struct Entry {
    route: usize,
    rule: usize,
    matched: usize,
    path: CompiledPath,
    headers: Vec<(HeaderName, Compiled)>,
    query: Vec<(String, Compiled)>,
    method: Option<Method>,
}

#[derive(Debug)]
enum CompiledPath {
    /// The path; whether ASCII case is ignored.
    Exact(String, bool),
    /// Without a trailing `/`; `""` is the prefix `/`. Whether ASCII case
    /// is ignored.
    Prefix(String, bool),
    /// A plain string prefix, as configured; whether ASCII case is ignored.
    StringPrefix(String, bool),
    /// `None`: the expression did not compile, the match never matches.
    /// Case-insensitivity is compiled into the expression.
    Regex(Option<Regex>, usize),
}

#[derive(Debug)]
enum Compiled {
    Exact(String),
    Regex(Option<Regex>),
}

impl Compiled {
    fn is_match(&self, value: &str) -> bool {
        match self {
            Compiled::Exact(want) => want == value,
            Compiled::Regex(re) => re.as_ref().is_some_and(|re| re.is_match(value)),
        }
    }
}

/// A regex anchored at both ends: Gateway API matches the whole value.
fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

/// `prefix` starts `path`, ignoring ASCII case when `ignore_case`. Bytes
/// outside ASCII letters compare exactly, so the match ends on a character
/// boundary of `path` as it does of `prefix`.
fn starts_with(path: &str, prefix: &str, ignore_case: bool) -> bool {
    if ignore_case {
        path.len() >= prefix.len() && path.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    } else {
        path.starts_with(prefix)
    }
}

impl RouteTable {
    /// Compiles `routes` into a table. Problems (an invalid regex) come back
    /// beside the table: that match never matches and the others still do.
    pub fn build(routes: Vec<Route>) -> (RouteTable, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let mut entries = Vec::new();
        let default_match = [Match::default()];
        for (r, route) in routes.iter().enumerate() {
            for (i, rule) in route.rules.iter().enumerate() {
                let matches = if rule.matches.is_empty() { &default_match[..] } else { &rule.matches[..] };
                for (m, spec) in matches.iter().enumerate() {
                    let mut problems = Vec::new();
                    entries.push(Entry::compile((r, i, m), spec, &mut problems));
                    errors.extend(problems.into_iter().map(|reason| ConfigError {
                        route: format!("{}/{}", route.namespace, route.name),
                        rule: i,
                        matched: m,
                        reason,
                    }));
                }
            }
        }
        entries.sort_by(|a, b| precedence(&routes, a, b));
        let grpc_only = !routes.is_empty() && routes.iter().all(|r| r.kind == RouteKind::Grpc);
        (RouteTable { routes, entries, grpc_only }, errors)
    }

    /// The table of a port no route is attached to: every request goes to
    /// the service itself (Istio's behaviour), with the default retry policy.
    pub fn to_service(target: ServiceTarget) -> RouteTable {
        let route = Route {
            kind: RouteKind::Http,
            namespace: target.namespace.clone(),
            name: format!("default-{}", target.hostname),
            created: 0,
            hostnames: Vec::new(),
            rules: vec![Rule {
                backends: vec![Backend { target: BackendTarget::Service(target), weight: 1, filters: Vec::new() }],
                ..Rule::default()
            }],
        };
        RouteTable::build(vec![route]).0
    }

    /// The routes, as given to [`RouteTable::build`] (for the config dump).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The rule for `req` by Gateway API precedence (by the order written
    /// for VirtualService and TrafficSplit), or why none takes it.
    pub fn find(&self, req: &Parts) -> Result<Matched<'_>, NoRoute> {
        let host = request_host(req);
        let path = req.uri.path();
        for entry in &self.entries {
            let route = &self.routes[entry.route];
            if !route.hostnames.is_empty()
                && !host.is_some_and(|h| route.hostnames.iter().any(|p| hostname_matches(p, h)))
            {
                continue;
            }
            let Some(matched_prefix) = entry.path_matches(path) else { continue };
            if entry.method.as_ref().is_some_and(|m| *m != req.method)
                || !entry.headers.iter().all(|(name, want)| header_matches(&req.headers, name, want))
                || !entry.query.iter().all(|(name, want)| query_matches(req.uri.query(), name, want))
            {
                continue;
            }
            return Ok(Matched {
                route,
                rule: &route.rules[entry.rule],
                rule_index: entry.rule,
                matched_prefix,
                string_prefix: matches!(entry.path, CompiledPath::StringPrefix(..)),
            });
        }
        Err(if self.grpc_only || is_grpc(req) { NoRoute::Grpc } else { NoRoute::Http })
    }
}

impl Entry {
    /// Compiles one match of rule `at.1` of route `at.0`; regexes that do
    /// not compile are described in `problems` and never match.
    fn compile(at: (usize, usize, usize), spec: &Match, problems: &mut Vec<String>) -> Entry {
        let mut regex = |pattern: &str, what: &str| {
            compile(pattern)
                .map_err(|e| problems.push(format!("invalid {what} regular expression {pattern:?}: {e}")))
                .ok()
        };
        let ic = spec.path_ignore_case;
        let path = match &spec.path {
            PathMatch::Exact(p) => CompiledPath::Exact(p.clone(), ic),
            PathMatch::Prefix(p) => CompiledPath::Prefix(p.trim_end_matches('/').to_owned(), ic),
            PathMatch::StringPrefix(p) => CompiledPath::StringPrefix(p.clone(), ic),
            // `(?i)` outside the group: the whole expression ignores case.
            PathMatch::RegularExpression(p) if ic => CompiledPath::Regex(regex(&format!("(?i){p}"), "path"), p.len()),
            PathMatch::RegularExpression(p) => CompiledPath::Regex(regex(p, "path"), p.len()),
        };
        let mut value = |v: &ValueMatch, what: &str| match v {
            ValueMatch::Exact(v) => Compiled::Exact(v.clone()),
            ValueMatch::RegularExpression(v) => Compiled::Regex(regex(v, what)),
        };
        let mut headers: Vec<(HeaderName, Compiled)> = Vec::new();
        for h in &spec.headers {
            if !headers.iter().any(|(name, _)| name == h.name) {
                headers.push((h.name.clone(), value(&h.value, "header")));
            }
        }
        let mut query: Vec<(String, Compiled)> = Vec::new();
        for q in &spec.query {
            if !query.iter().any(|(name, _)| *name == q.name) {
                query.push((q.name.clone(), value(&q.value, "query parameter")));
            }
        }
        let (route, rule, matched) = at;
        Entry { route, rule, matched, path, headers, query, method: spec.method.clone() }
    }

    /// `None`: no match; `Some(prefix)`: a match and the prefix it covered.
    fn path_matches<'a>(&'a self, path: &str) -> Option<Option<&'a str>> {
        match &self.path {
            CompiledPath::Exact(p, ic) => {
                let equal = if *ic { p.eq_ignore_ascii_case(path) } else { p == path };
                equal.then_some(Some(p.as_str()))
            }
            CompiledPath::Prefix(p, ic) => {
                let on_boundary =
                    starts_with(path, p, *ic) && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/');
                on_boundary.then_some(Some(p.as_str()))
            }
            CompiledPath::StringPrefix(p, ic) => starts_with(path, p, *ic).then_some(Some(p.as_str())),
            CompiledPath::Regex(re, _) => re.as_ref().is_some_and(|re| re.is_match(path)).then_some(None),
        }
    }

    /// Exact ranks above PathPrefix, which ranks above RegularExpression
    /// (Gateway API leaves regex precedence to the implementation; this is
    /// Istio's order). Within a kind, the longer value first. A StringPrefix
    /// ranks as a PathPrefix of its length.
    fn path_rank(&self) -> (u8, usize) {
        match &self.path {
            CompiledPath::Exact(p, _) => (3, p.len()),
            CompiledPath::Prefix(p, _) | CompiledPath::StringPrefix(p, _) => (2, p.len()),
            CompiledPath::Regex(_, len) => (1, *len),
        }
    }
}

/// Gateway API's order: exact path, longest prefix (then regex), has a
/// method, most headers, most query params, oldest route, `namespace/name`,
/// rule order, match order.
///
/// Entries of ordered routes ([`RouteKind::is_ordered`]: VirtualService,
/// TrafficSplit) keep the order written: they come after every Gateway API
/// entry and compare among themselves by route index (the order the
/// controller sent the routes in), rule index and match index only. Both
/// halves are total orders, so the whole is one.
fn precedence(routes: &[Route], a: &Entry, b: &Entry) -> Ordering {
    let (ra, rb) = (&routes[a.route], &routes[b.route]);
    match (ra.kind.is_ordered(), rb.kind.is_ordered()) {
        (false, true) => return Ordering::Less,
        (true, false) => return Ordering::Greater,
        (true, true) => return (a.route, a.rule, a.matched).cmp(&(b.route, b.rule, b.matched)),
        (false, false) => {}
    }
    let key = |e: &Entry| {
        (Reverse(e.path_rank()), Reverse(e.method.is_some()), Reverse(e.headers.len()), Reverse(e.query.len()))
    };
    key(a)
        .cmp(&key(b))
        .then(ra.created.cmp(&rb.created))
        .then_with(|| (ra.namespace.as_str(), ra.name.as_str()).cmp(&(rb.namespace.as_str(), rb.name.as_str())))
        .then(a.route.cmp(&b.route))
        .then(a.rule.cmp(&b.rule))
        .then(a.matched.cmp(&b.matched))
}

/// A header with several values matches as their comma-joined list (the
/// HTTP meaning of repeated fields).
fn header_matches(headers: &HeaderMap, name: &HeaderName, want: &Compiled) -> bool {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else { return false };
    let Ok(first) = first.to_str() else { return false };
    let mut joined = String::new();
    for more in values {
        let Ok(more) = more.to_str() else { return false };
        if joined.is_empty() {
            joined.push_str(first);
        }
        joined.push(',');
        joined.push_str(more);
    }
    want.is_match(if joined.is_empty() { first } else { &joined })
}

/// The first occurrence of a parameter counts; names and values are
/// percent-decoded before comparing.
fn query_matches(query: Option<&str>, name: &str, want: &Compiled) -> bool {
    let Some(query) = query else { return false };
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k) == name {
            return want.is_match(&percent_decode(v));
        }
    }
    false
}

/// `%XX` → byte; invalid escapes stay as written; `+` stays `+` (a path-style
/// query, not a form body). Invalid UTF-8 is replaced, so it never matches an
/// exact value by accident.
fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('%') {
        return s.into();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

/// A gRPC request, by its content type (`application/grpc`, `+proto`, …).
fn is_grpc(req: &Parts) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
