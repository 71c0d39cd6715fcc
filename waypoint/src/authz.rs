//! L7 authorization: the controller's `ambit.waypoint.v1.AuthorizationPolicy`
//! evaluated against one request, with Istio's semantics.
//!
//! [`authorize`] takes every policy received ([`Snapshot::policies`]) and
//! keeps those that apply: a policy targeting this waypoint's Gateway
//! ([`Scope`]) or the Service the request is addressed to. Then an enforced
//! DENY policy that matches denies; otherwise, when enforced ALLOW policies
//! apply, one of them must match; when none applies the request is allowed.
//! A denied request gets 403 with [`DENIED_BODY`].
//!
//! Matching, as the proto says: rules are OR-ed; `from`, `to` and `when` of
//! a rule are AND-ed; the entries of `from` (of `to`) are OR-ed; the fields of
//! a Source or Operation are AND-ed and the values of one field OR-ed; an
//! unset field and an empty rule match every request, a policy without rules
//! none; a `not_*` field excludes what it matches.
//!
//! Attributes:
//! - principals: the peer's identity without `spiffe://`
//!   (`td/ns/<ns>/sa/<sa>`), compared piece by piece, never formatted. A
//!   pattern written with the scheme means what the controller makes of it:
//!   exact and prefix lose it, a suffix that spells it is the whole ID.
//! - principals, namespaces, service accounts (any trust domain; an empty
//!   namespace is the policy's) need a peer identity: without one a field
//!   fails and a `not_*` field excludes nothing.
//! - `ip_blocks`: the peer's IP; `remote_ip_blocks`: the original client's
//!   IP as Envoy finds it with `xff_num_trusted_hops` (Istio's
//!   `numTrustedProxies`, [`Scope::xff_trusted_hops`]): with 0, the default,
//!   the peer's IP — a client cannot choose it by writing the header; with
//!   N > 0, the Nth address from the right of `X-Forwarded-For`, or the
//!   peer's when the header has fewer. IPv4-mapped IPv6 peers are compared as
//!   IPv4.
//! - hosts: the request host without port, case-insensitively
//!   ([`request_host`]); paths: without the query; ports: the service port.
//! - `when`: `request.headers[<name>]` (any of the header's values; `host`
//!   and the pseudo-headers `:authority`, `:method`, `:path` too), `source.ip`,
//!   `remote.ip`, `destination.ip` (CIDRs or addresses), `destination.port`,
//!   `source.namespace`, `source.principal`; values in Istio's string syntax
//!   (`*` any, `x*` prefix, `*x` suffix, else exact). An absent header or
//!   peer identity matches no value and is excluded by no `not_values`.
//! - JWT: there is no RequestAuthentication, so a request never has a
//!   request principal: `request_principals` never match,
//!   `not_request_principals` always do.
//!
//! Fail closed: what cannot be evaluated — a `when` key the waypoint does not
//! know, `request.auth.*` (no JWT is validated), `connection.sni` (not
//! visible at the waypoint), other pseudo-headers, a condition without
//! values, `destination.ip` when the caller does not know it, an
//! `X-Forwarded-For` that does not parse (for `remote_ip_blocks` and
//! `remote.ip`), a malformed IpBlock, CIDR or port value, a StringMatch
//! without a kind, a ServiceAccount without a name — counts as a match in a
//! DENY policy and as none in an ALLOW policy (the reverse in a `not_*`
//! field), so it can only deny more. The rest of its rule still applies: a
//! DENY of `/admin` under an unknown condition denies `/admin`, not all. A
//! policy whose action this waypoint does not know is evaluated as a DENY.
//!
//! Evaluation allocates only for its result (the deciding policy's name,
//! dry-run reports).
//!
//! [`Snapshot::policies`]: crate::config::Snapshot::policies

use std::net::{IpAddr, SocketAddr};

use ambit_api::waypoint as pb;
use ambit_identity::{Identity, PrincipalPattern};
use http::header::HOST;
use http::request::Parts;

use crate::authority::request_host;

/// The body of a 403 from authorization (Envoy's RBAC filter's).
pub const DENIED_BODY: &str = "RBAC: access denied";

const SCHEME: &str = "spiffe://";

/// The waypoint itself: a policy targeting this Gateway applies to every
/// request through it; how many proxies in front of it are trusted to have
/// written `X-Forwarded-For`.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub gateway_namespace: &'a str,
    pub gateway_name: &'a str,
    /// Envoy's `xff_num_trusted_hops` (0: the header names no trusted address).
    pub xff_trusted_hops: u32,
}

/// What authorization knows about a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    /// The peer's identity, from the HBONE client certificate.
    pub peer: Option<&'a Identity>,
    /// The peer's address.
    pub peer_ip: IpAddr,
    /// The service VIP the client called; `None` when unknown (addressed by
    /// hostname).
    pub destination_ip: Option<IpAddr>,
    /// The destination service: its namespace and hostname (the key of its
    /// Address).
    pub service_namespace: &'a str,
    pub service_hostname: &'a str,
    /// The service port.
    pub port: u16,
    /// The request; `None` for an opaque TCP connection, where an HTTP
    /// field (hosts, methods, paths, request headers) cannot be evaluated
    /// and fails closed: an ALLOW rule with one never matches, a DENY rule
    /// ignores it (Istio's rule for TCP traffic).
    pub parts: Option<&'a Parts>,
}

/// The decision on a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// `namespace/name` of the DENY policy that denied; `None` when allowed
    /// or denied because no ALLOW policy matched.
    pub policy: Option<String>,
    /// Dry-run policies that would have changed the decision, with the
    /// decision each would have made (`true`: allowed) had it alone been
    /// enforced besides the enforced ones; for logs.
    pub dry_run: Vec<(String, bool)>,
}

/// Decides on `req` with the `policies` that apply to it (the others are
/// skipped): [`Snapshot::policies`]`().values()` as they are.
///
/// [`Snapshot::policies`]: crate::config::Snapshot::policies
pub fn authorize<'p>(
    policies: impl IntoIterator<Item = &'p pb::AuthorizationPolicy>,
    scope: &Scope<'_>,
    req: &RequestInfo<'_>,
) -> Verdict {
    let attrs = Attributes {
        req,
        host: req.parts.and_then(request_host),
        remote_ip: req.parts.map_or(Some(req.peer_ip), |p| remote_ip(p, req.peer_ip, scope.xff_trusted_hops)),
    };
    let mut denied_by = None;
    let (mut allow_applies, mut allow_matched) = (false, false);
    // (policy, is a DENY, matches): only dry-run policies, rarely any.
    let mut shadows = Vec::new();
    for p in policies.into_iter().filter(|p| applies(p, scope, req)) {
        // An unknown action is evaluated as a DENY (fail closed).
        let deny = p.action != pb::Action::Allow as i32;
        if p.dry_run {
            shadows.push((p, deny, matches(p, deny, &attrs)));
        } else if deny {
            if denied_by.is_none() && matches(p, true, &attrs) {
                denied_by = Some(p);
            }
        } else {
            allow_applies = true;
            allow_matched = allow_matched || matches(p, false, &attrs);
        }
    }
    let allowed = denied_by.is_none() && (!allow_applies || allow_matched);
    let dry_run = shadows
        .into_iter()
        .filter_map(|(p, deny, matched)| {
            let would = match deny {
                true => allowed && !matched,
                false => denied_by.is_none() && (allow_matched || matched),
            };
            (would != allowed).then(|| (key(p), would))
        })
        .collect();
    Verdict { allowed, policy: denied_by.map(key), dry_run }
}

fn key(p: &pb::AuthorizationPolicy) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// Whether `p` targets this waypoint's Gateway or the request's service.
fn applies(p: &pb::AuthorizationPolicy, scope: &Scope<'_>, req: &RequestInfo<'_>) -> bool {
    use pb::policy_target::Kind;
    p.targets.iter().any(|t| match &t.kind {
        Some(Kind::Gateway(g)) => g.namespace == scope.gateway_namespace && g.name == scope.gateway_name,
        Some(Kind::Service(s)) => {
            s.namespace == req.service_namespace && s.hostname.eq_ignore_ascii_case(req.service_hostname)
        }
        None => false,
    })
}

/// The request's attributes read once.
struct Attributes<'r, 'a> {
    req: &'r RequestInfo<'a>,
    host: Option<&'a str>,
    /// `None`: an `X-Forwarded-For` that does not parse.
    remote_ip: Option<IpAddr>,
}

/// The original client's address: with `trusted_hops` N > 0, the Nth
/// address (with or without a port) from the right of `X-Forwarded-For`, as
/// the N trusted proxies appended them; else, or when the header has fewer,
/// the peer's.
fn remote_ip(parts: &Parts, peer: IpAddr, trusted_hops: u32) -> Option<IpAddr> {
    let Some(nth) = (trusted_hops as usize).checked_sub(1) else { return Some(peer) };
    let Some(xff) = parts.headers.get("x-forwarded-for") else { return Some(peer) };
    let Some(entry) = xff.to_str().ok()?.rsplit(',').nth(nth).map(str::trim) else { return Some(peer) };
    entry.parse().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

fn matches(p: &pb::AuthorizationPolicy, deny: bool, attrs: &Attributes<'_, '_>) -> bool {
    let cx = Cx { attrs, namespace: &p.namespace, unknown: deny };
    p.rules.iter().any(|r| {
        (r.from.is_empty() || r.from.iter().any(|s| cx.source(s)))
            && (r.to.is_empty() || r.to.iter().any(|o| cx.operation(o)))
            && r.when.iter().all(|c| cx.condition(c))
    })
}

/// One policy's evaluation.
struct Cx<'x, 'r, 'a> {
    attrs: &'x Attributes<'r, 'a>,
    /// The policy's namespace (of a bare service account).
    namespace: &'x str,
    /// What a test that cannot be evaluated counts as in a positive field:
    /// a match in a DENY policy, none in an ALLOW policy.
    unknown: bool,
}

impl Cx<'_, '_, '_> {
    /// A field: unset, or one of its values matches.
    fn any<T>(&self, values: &[T], test: impl Fn(&T) -> Option<bool>) -> bool {
        values.is_empty() || values.iter().any(|v| test(v).unwrap_or(self.unknown))
    }

    /// A `not_*` field: none of its values matches.
    fn none<T>(&self, values: &[T], test: impl Fn(&T) -> Option<bool>) -> bool {
        !values.iter().any(|v| test(v).unwrap_or(!self.unknown))
    }

    fn source(&self, s: &pb::Source) -> bool {
        let id = self.attrs.req.peer;
        let principal = |m: &pb::StringMatch| {
            let p = without_scheme(Pattern::of(m)?);
            Some(id.is_some_and(|id| principal_matches(p, id)))
        };
        let namespace = |m: &pb::StringMatch| {
            let p = Pattern::of(m)?;
            Some(id.is_some_and(|id| p.matches(id.namespace.as_bytes(), false)))
        };
        let account = |sa: &pb::ServiceAccount| {
            let ns = if sa.namespace.is_empty() { self.namespace } else { sa.namespace.as_str() };
            (!sa.name.is_empty()).then(|| id.is_some_and(|id| id.namespace == ns && id.service_account == sa.name))
        };
        let peer = |b: &pb::IpBlock| in_block(b, self.attrs.req.peer_ip);
        let remote = |b: &pb::IpBlock| in_block(b, self.attrs.remote_ip?);
        self.any(&s.principals, principal)
            && self.none(&s.not_principals, principal)
            && self.any(&s.namespaces, namespace)
            && self.none(&s.not_namespaces, namespace)
            && self.any(&s.service_accounts, account)
            && self.none(&s.not_service_accounts, account)
            && self.any(&s.ip_blocks, peer)
            && self.none(&s.not_ip_blocks, peer)
            && self.any(&s.remote_ip_blocks, remote)
            && self.none(&s.not_remote_ip_blocks, remote)
            && self.any(&s.request_principals, |_: &pb::StringMatch| Some(false))
            && self.none(&s.not_request_principals, |_: &pb::StringMatch| Some(false))
    }

    fn operation(&self, o: &pb::Operation) -> bool {
        let port = |p: &u32| Some(*p == u32::from(self.attrs.req.port));
        let ports = self.any(&o.ports, port) && self.none(&o.not_ports, port);
        let Some(parts) = self.attrs.req.parts else {
            let http = [&o.hosts, &o.not_hosts, &o.methods, &o.not_methods, &o.paths, &o.not_paths];
            return (self.unknown || http.iter().all(|f| f.is_empty())) && ports;
        };
        let host = string(self.attrs.host, true);
        let method = string(Some(parts.method.as_str()), false);
        let path = string(Some(parts.uri.path()), false);
        ports
            && self.any(&o.hosts, host)
            && self.none(&o.not_hosts, host)
            && self.any(&o.methods, method)
            && self.none(&o.not_methods, method)
            && self.any(&o.paths, path)
            && self.none(&o.not_paths, path)
    }

    fn condition(&self, c: &pb::Condition) -> bool {
        if c.values.is_empty() && c.not_values.is_empty() {
            return self.unknown;
        }
        let (req, id) = (self.attrs.req, self.attrs.req.peer);
        let ip = |ip: Option<IpAddr>| {
            move |v: &str| {
                let (net, len) = cidr(v)?;
                in_net(net, len, ip?)
            }
        };
        let check = |test: &dyn Fn(&str) -> Option<bool>| {
            self.any(&c.values, |v: &String| test(v)) && self.none(&c.not_values, |v: &String| test(v))
        };
        match c.key.as_str() {
            "source.ip" => check(&ip(Some(req.peer_ip))),
            "remote.ip" => check(&ip(self.attrs.remote_ip)),
            "destination.ip" => check(&ip(req.destination_ip)),
            "destination.port" => check(&|v: &str| Some(v.parse::<u16>().ok()? == req.port)),
            "source.namespace" => {
                check(&|v: &str| Some(id.is_some_and(|id| Pattern::istio(v).matches(id.namespace.as_bytes(), false))))
            }
            "source.principal" => {
                check(&|v: &str| Some(id.is_some_and(|id| principal_matches(without_scheme(Pattern::istio(v)), id))))
            }
            key => match key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
                Some(name) if !name.is_empty() => match req.parts {
                    Some(parts) => check(&|v: &str| {
                        let p = Pattern::istio(v);
                        header_any(parts, name, |h| p.matches(h, false))
                    }),
                    None => self.unknown,
                },
                // request.auth.*, connection.sni, anything else.
                _ => self.unknown,
            },
        }
    }
}

/// A field's test of one string value (`None`: absent).
fn string(value: Option<&str>, ignore_case: bool) -> impl Fn(&pb::StringMatch) -> Option<bool> + Copy + '_ {
    move |m: &pb::StringMatch| {
        let p = Pattern::of(m)?;
        Some(value.is_some_and(|v| p.matches(v.as_bytes(), ignore_case)))
    }
}

/// Whether one of the header's values passes `f`: `host` and `:authority`
/// are the request's authority, `:method` and `:path` (with the query) its
/// method and path; `None` for other pseudo-headers.
fn header_any(parts: &Parts, name: &str, f: impl Fn(&[u8]) -> bool) -> Option<bool> {
    let value = if name == ":authority" || name.eq_ignore_ascii_case("host") {
        parts.uri.authority().map(|a| a.as_str().as_bytes()).or_else(|| Some(parts.headers.get(HOST)?.as_bytes()))
    } else if name == ":method" {
        Some(parts.method.as_str().as_bytes())
    } else if name == ":path" {
        Some(parts.uri.path_and_query().map_or(parts.uri.path(), |p| p.as_str()).as_bytes())
    } else if name.starts_with(':') {
        return None;
    } else {
        return Some(parts.headers.get_all(name).iter().any(|v| f(v.as_bytes())));
    };
    Some(value.is_some_and(f))
}

/// A string pattern.
#[derive(Clone, Copy, Debug)]
enum Pattern<'s> {
    Exact(&'s str),
    Prefix(&'s str),
    Suffix(&'s str),
    /// Any value, as long as there is one.
    Presence,
}

impl<'s> Pattern<'s> {
    /// `None` for a match without a kind (or `presence: false`).
    fn of(m: &'s pb::StringMatch) -> Option<Pattern<'s>> {
        use pb::string_match::Kind;
        Some(match m.kind.as_ref()? {
            Kind::Exact(s) => Pattern::Exact(s),
            Kind::Prefix(s) => Pattern::Prefix(s),
            Kind::Suffix(s) => Pattern::Suffix(s),
            Kind::Presence(true) => Pattern::Presence,
            Kind::Presence(false) => return None,
        })
    }

    /// Istio's syntax: `*` any, `*x` suffix, `x*` prefix, else exact.
    fn istio(v: &'s str) -> Pattern<'s> {
        if v == "*" {
            Pattern::Presence
        } else if let Some(s) = v.strip_prefix('*') {
            Pattern::Suffix(s)
        } else if let Some(p) = v.strip_suffix('*') {
            Pattern::Prefix(p)
        } else {
            Pattern::Exact(v)
        }
    }

    fn matches(self, v: &[u8], ignore_case: bool) -> bool {
        let eq = |a: &[u8], b: &str| if ignore_case { a.eq_ignore_ascii_case(b.as_bytes()) } else { a == b.as_bytes() };
        match self {
            Pattern::Exact(s) => eq(v, s),
            Pattern::Prefix(s) => v.len() >= s.len() && eq(&v[..s.len()], s),
            Pattern::Suffix(s) => v.len() >= s.len() && eq(&v[v.len() - s.len()..], s),
            Pattern::Presence => true,
        }
    }
}

/// A principal pattern as the controller writes one written with
/// `spiffe://`: exact and prefix lose the scheme; a suffix that spells it
/// pins the whole ID (a bare suffix would match longer trust domains).
fn without_scheme(p: Pattern<'_>) -> Pattern<'_> {
    match p {
        Pattern::Exact(s) => Pattern::Exact(s.strip_prefix(SCHEME).unwrap_or(s)),
        Pattern::Prefix(s) => Pattern::Prefix(s.strip_prefix(SCHEME).unwrap_or(s)),
        Pattern::Suffix(s) => s.strip_prefix(SCHEME).map_or(p, Pattern::Exact),
        Pattern::Presence => p,
    }
}

/// Matches `<td>/ns/<ns>/sa/<sa>` (the SPIFFE ID without its scheme).
fn principal_matches(p: Pattern<'_>, id: &Identity) -> bool {
    id.principal_matches(match p {
        Pattern::Exact(s) => PrincipalPattern::Exact(s),
        Pattern::Prefix(s) => PrincipalPattern::Prefix(s),
        Pattern::Suffix(s) => PrincipalPattern::Suffix(s),
        Pattern::Presence => PrincipalPattern::Presence,
    })
}

/// `None` for an address of neither 4 nor 16 bytes or a prefix too long.
fn in_block(b: &pb::IpBlock, ip: IpAddr) -> Option<bool> {
    let net = match b.address.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(b.address.as_slice()).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(b.address.as_slice()).ok()?),
        _ => return None,
    };
    in_net(net, b.length, ip)
}

/// `a.b.c.d/n`, `x::y/n` or a bare address (all its bits).
fn cidr(v: &str) -> Option<(IpAddr, u32)> {
    match v.split_once('/') {
        Some((addr, len)) => Some((addr.parse().ok()?, len.parse().ok()?)),
        None => {
            let addr = v.parse().ok()?;
            Some((addr, bits(addr).1))
        }
    }
}

/// Whether `ip` is in `net/len`; an address of the other family never is.
fn in_net(net: IpAddr, len: u32, ip: IpAddr) -> Option<bool> {
    let ((net, width), (ip, ip_width)) = (bits(net), bits(ip.to_canonical()));
    if len > width {
        return None;
    }
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    Some(width == ip_width && net & mask == ip & mask)
}

/// The address's bits from the top of a `u128`, and how many there are.
fn bits(ip: IpAddr) -> (u128, u32) {
    match ip {
        IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

#[cfg(test)]
#[path = "authz_tests.rs"]
mod tests;
