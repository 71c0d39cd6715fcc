//! Gateway API filters (and VirtualService fault injection): what a rule
//! (then the chosen backend) does to a request before it is forwarded, and
//! to its response.
//!
//! [`apply`] changes the request in place and either lets it go on or
//! answers it (RequestRedirect). What acts later (response header changes,
//! mirrors) is collected in [`Effects`] for the forwarding code. Fault
//! injection is drawn before the other filters act ([`crate::fault`], from
//! [`crate::plan::prepare`]), as Envoy's fault filter runs before its router.

use std::ops::ControlFlow;

use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use rand::Rng;

use crate::authority::request_host;
pub use crate::fault::{Abort, FaultInjection};
use crate::reply::Reply;
use crate::target::ServiceTarget;

/// One filter, in the order the rule (or backend) lists it.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    /// Answered by the waypoint; no backend is called.
    RequestRedirect(RequestRedirect),
    UrlRewrite(UrlRewrite),
    RequestMirror(RequestMirror),
    /// VirtualService fault injection: a delay, an answer from the
    /// waypoint, or both. [`apply`] passes over it: [`crate::plan::prepare`]
    /// draws it first ([`crate::fault::Injected::draw`]).
    Fault(FaultInjection),
}

/// Header changes, applied as `set` (replaces every value), `add` (appends a
/// value), then `remove`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// How a redirect or rewrite changes the path (the query string is kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the part the rule's PathPrefix matched (exactly the matched
    /// string of a StringPrefix).
    ReplacePrefixMatch(String),
}

/// RequestRedirect; `None` keeps the request's value.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestRedirect {
    /// `http` or `https`.
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301, 302 (the default), 303, 307 or 308.
    pub status: StatusCode,
}

impl Default for RequestRedirect {
    fn default() -> Self {
        RequestRedirect { scheme: None, hostname: None, path: None, port: None, status: StatusCode::FOUND }
    }
}

/// URLRewrite; `None` keeps the request's value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UrlRewrite {
    /// Replaces the Host (and the `:authority`) sent to the backend.
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// RequestMirror: a copy of the request goes to `target`, its response is
/// ignored. Sending it is the forwarding code's job.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestMirror {
    pub target: ServiceTarget,
    /// Share of requests mirrored, 0–100.
    pub percent: f64,
}

impl RequestMirror {
    /// Whether this request is one of the mirrored share.
    pub fn sampled(&self, rng: &mut impl Rng) -> bool {
        sampled(self.percent, rng)
    }
}

/// Whether a request is one of a `percent` share (0–100): 100 and above
/// always, 0 and below (or NaN) never, without drawing; otherwise one draw.
pub fn sampled(percent: f64, rng: &mut impl Rng) -> bool {
    percent >= 100.0 || (percent > 0.0 && rng.random::<f64>() * 100.0 < percent)
}

/// What filters need to know beyond the request.
#[derive(Clone, Copy, Debug)]
pub struct FilterContext<'a> {
    /// From [`crate::route::Matched::matched_prefix`].
    pub matched_prefix: Option<&'a str>,
    /// From [`crate::route::Matched::string_prefix`]: ReplacePrefixMatch
    /// replaces exactly `matched_prefix` ([`replace_string_prefix`]).
    pub string_prefix: bool,
    /// The service port the client called: a redirect keeps it when it
    /// changes neither scheme nor port (it is the mesh's "listener port").
    pub port: u16,
}

/// Filter results that act after the request is forwarded.
#[derive(Clone, Debug, Default)]
pub struct Effects<'a> {
    /// ResponseHeaderModifiers in order; [`Effects::apply_response`] applies
    /// them to the backend's response or to the waypoint's own reply.
    pub response: Vec<&'a HeaderModifier>,
    /// Where copies of the request go.
    pub mirrors: Vec<&'a RequestMirror>,
}

impl Effects<'_> {
    pub fn apply_response(&self, headers: &mut HeaderMap) {
        for modifier in &self.response {
            modifier.apply(headers);
        }
    }
}

/// Applies `filters` in order to `req`. `Break(reply)` answers the request
/// (a redirect, or a rewrite the request cannot take); the filters after it
/// do not run.
pub fn apply<'a>(
    filters: &'a [Filter],
    req: &mut Parts,
    ctx: &FilterContext<'_>,
    effects: &mut Effects<'a>,
) -> ControlFlow<Reply> {
    for filter in filters {
        match filter {
            Filter::RequestHeaderModifier(m) => m.apply(&mut req.headers),
            Filter::ResponseHeaderModifier(m) => effects.response.push(m),
            Filter::RequestMirror(m) => effects.mirrors.push(m),
            Filter::RequestRedirect(r) => return ControlFlow::Break(redirect(r, req, ctx)),
            Filter::UrlRewrite(r) => {
                if rewrite(r, req, ctx).is_err() {
                    return ControlFlow::Break(Reply::misconfigured());
                }
            }
            // Drawn before the filters by `plan::prepare`.
            Filter::Fault(_) => {}
        }
    }
    ControlFlow::Continue(())
}

/// The new path of a path modifier, or `None` to keep the request's.
/// ReplacePrefixMatch without a matched prefix (a regex match) keeps it.
fn modified_path(modifier: &PathModifier, path: &str, ctx: &FilterContext<'_>) -> Option<String> {
    match modifier {
        PathModifier::ReplaceFullPath(full) => Some(full.clone()),
        PathModifier::ReplacePrefixMatch(replacement) => ctx.matched_prefix.map(|prefix| match ctx.string_prefix {
            true => replace_string_prefix(path, prefix, replacement),
            false => replace_prefix(path, prefix, replacement),
        }),
    }
}

/// `path` without `prefix`, which may differ from it in ASCII case (a
/// match with `path_ignore_case`); `None` when it does not start `path`.
fn strip_prefix_ignoring_case<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    let head = path.as_bytes().get(..prefix.len())?;
    // Only ASCII letters may differ, so `prefix.len()` is a char boundary of `path`.
    head.eq_ignore_ascii_case(prefix.as_bytes()).then(|| &path[prefix.len()..])
}

/// Gateway API's ReplacePrefixMatch: the matched prefix (a whole-segment
/// prefix) is replaced, the rest of the path kept, with a single `/` at the
/// joint whatever trailing slashes the prefix and replacement have:
/// `/foo/bar` with prefix `/foo` and replacement `/xyz/` → `/xyz/bar`,
/// with replacement `/` → `/bar`; `/foo` → `/xyz` (or `/`).
pub fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = strip_prefix_ignoring_case(path, prefix).unwrap_or(path);
    let mut out = replacement.trim_end_matches('/').to_owned();
    if !rest.is_empty() && !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// ReplacePrefixMatch of a StringPrefix (Envoy's `prefix_rewrite`, what a
/// VirtualService `rewrite.uri` does to a `uri.prefix` match): exactly the
/// matched string is replaced, the rest kept as is: `/apiX` with prefix
/// `/api` and replacement `/v2` → `/v2X`. A path it does not start is kept;
/// a result without a leading `/` gets one.
pub fn replace_string_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let Some(rest) = strip_prefix_ignoring_case(path, prefix) else { return path.to_owned() };
    let out = format!("{replacement}{rest}");
    if out.starts_with('/') {
        out
    } else {
        format!("/{out}")
    }
}

fn with_query(path: String, uri: &Uri) -> String {
    match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// The redirect's Location, as the Gateway API builds it: the scheme,
/// hostname and path from the filter or the request; the port from the
/// filter, else the redirect scheme's well-known one, else the port the
/// client called; no port when it is the scheme's default (80, 443). Without
/// any host the Location is a relative reference (path only).
fn redirect(r: &RequestRedirect, req: &Parts, ctx: &FilterContext<'_>) -> Reply {
    let path = r
        .path
        .as_ref()
        .and_then(|m| modified_path(m, req.uri.path(), ctx))
        .unwrap_or_else(|| req.uri.path().to_owned());
    let path = with_query(path, &req.uri);
    let scheme = r.scheme.as_deref().or(req.uri.scheme_str()).unwrap_or("http");
    let port = match (r.port, r.scheme.as_deref()) {
        (Some(port), _) => port,
        (None, Some("http")) => 80,
        (None, Some("https")) => 443,
        (None, _) => ctx.port,
    };
    let host = r.hostname.as_deref().or_else(|| request_host(req)).unwrap_or("");
    let location = if host.is_empty() {
        path
    } else if (scheme == "http" && port == 80) || (scheme == "https" && port == 443) {
        format!("{scheme}://{host}{path}")
    } else {
        format!("{scheme}://{host}:{port}{path}")
    };
    match HeaderValue::try_from(location) {
        Ok(location) => Reply::redirect(r.status, location),
        Err(_) => Reply::misconfigured(),
    }
}

/// URLRewrite: the new path (query kept) and the new host, in the URI's
/// authority when it has one and in the Host header.
fn rewrite(r: &UrlRewrite, req: &mut Parts, ctx: &FilterContext<'_>) -> Result<(), http::Error> {
    let mut uri = req.uri.clone().into_parts();
    if let Some(path) = r.path.as_ref().and_then(|m| modified_path(m, req.uri.path(), ctx)) {
        uri.path_and_query = Some(PathAndQuery::try_from(with_query(path, &req.uri))?);
    }
    if let Some(host) = &r.hostname {
        let value = HeaderValue::try_from(host.as_str())?;
        if uri.authority.is_some() {
            uri.authority = Some(Authority::try_from(host.as_str())?);
        }
        if uri.authority.is_none() || req.headers.contains_key(HOST) {
            req.headers.insert(HOST, value);
        }
    }
    req.uri = Uri::from_parts(uri)?;
    Ok(())
}

#[cfg(test)]
#[path = "filters_tests.rs"]
mod tests;
