//! The decision phases before a request is forwarded, composed with their
//! defaults: [`RouteTable::find`] (which rule; [`NoRoute::reply`] when
//! none), then — after the caller's authorize phase, which sees the request
//! as the client sent it — [`prepare`] (the rule's faults and filters, the
//! backend, the backend's faults and filters).
//!
//! Each phase either hands the request on or answers it with a [`Reply`],
//! possibly after an injected delay ([`Decision::delay`]); later phases
//! (outlier detection) slot in here.

use std::ops::ControlFlow;
use std::time::Duration;

use http::request::Parts;
use rand::Rng;

use crate::balance::{pick_backend, Chosen};
use crate::fault::Injected;
use crate::filters::{self, Effects, FilterContext, RequestMirror};
use crate::reply::Reply;
use crate::retry::{RetryPolicy, Timeouts};
use crate::route::Matched;
#[cfg(doc)]
use crate::route::{NoRoute, RouteTable};

/// A request ready to go to a backend service.
#[derive(Clone, Debug)]
pub struct Forward<'a> {
    pub matched: Matched<'a>,
    pub backend: Chosen<'a>,
    pub retry: &'a RetryPolicy,
    pub timeouts: Timeouts,
    /// Response header changes, to apply to whatever answer comes back.
    pub effects: Effects<'a>,
    /// The mirrors this request is sampled for: send each a copy, ignore
    /// its answer.
    pub mirrors: Vec<&'a RequestMirror>,
    /// An injected delay ([`crate::fault`]): wait this long first; the
    /// timeouts start after it.
    pub delay: Option<Duration>,
}

/// What to do with a request after routing.
#[derive(Clone, Debug)]
pub enum Decision<'a> {
    Forward(Forward<'a>),
    /// Answer without calling a backend; apply `effects` to the reply's
    /// headers too (a ResponseHeaderModifier applies to every response).
    Reply {
        reply: Reply,
        effects: Effects<'a>,
        /// An injected delay: wait this long before answering.
        delay: Option<Duration>,
    },
}

impl Decision<'_> {
    /// The injected delay to wait before forwarding or answering.
    pub fn delay(&self) -> Option<Duration> {
        match self {
            Decision::Forward(f) => f.delay,
            Decision::Reply { delay, .. } => *delay,
        }
    }
}

/// After routing and authorization: the rule's faults and filters, a backend
/// by weight, the backend's faults and filters; `req` leaves as it must be
/// forwarded. `port` is the service port the client called (for redirects).
///
/// Faults are drawn before the filters they sit with act, as Envoy's fault
/// filter runs before its router: an injected abort answers instead of a
/// redirect or a missing backend, with the response header changes of the
/// filters (a ResponseHeaderModifier applies to every response); an
/// injected delay comes before whatever answer or forwarding follows.
pub fn prepare<'a>(matched: Matched<'a>, req: &mut Parts, port: u16, rng: &mut impl Rng) -> Decision<'a> {
    let ctx = FilterContext { matched_prefix: matched.matched_prefix, string_prefix: matched.string_prefix, port };
    let mut effects = Effects::default();
    let mut fault = Injected::default();
    fault.draw(&matched.rule.filters, rng);
    let reply = |reply: Reply, effects, fault: Injected| Decision::Reply {
        reply: fault.abort.map_or(reply, |abort| abort.reply()),
        effects,
        delay: fault.delay,
    };
    if let ControlFlow::Break(r) = filters::apply(&matched.rule.filters, req, &ctx, &mut effects) {
        return reply(r, effects, fault);
    }
    if let Some(abort) = fault.abort {
        return reply(abort.reply(), effects, fault);
    }
    let backend = match pick_backend(&matched.rule.backends, rng) {
        Ok(backend) => backend,
        Err(no) => return reply(no.reply(), effects, fault),
    };
    fault.draw(backend.filters, rng);
    if let ControlFlow::Break(r) = filters::apply(backend.filters, req, &ctx, &mut effects) {
        return reply(r, effects, fault);
    }
    if let Some(abort) = fault.abort {
        return reply(abort.reply(), effects, fault);
    }
    let mirrors = effects.mirrors.iter().copied().filter(|m| m.sampled(rng)).collect();
    Decision::Forward(Forward {
        matched,
        backend,
        retry: &matched.rule.retry,
        timeouts: matched.rule.timeouts,
        effects,
        mirrors,
        delay: fault.delay,
    })
}

#[cfg(test)]
mod tests {
    use http::header::LOCATION;
    use http::{HeaderName, HeaderValue, Request, StatusCode};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::filters::{Filter, HeaderModifier, PathModifier, RequestRedirect, UrlRewrite};
    use crate::route::{Backend, BackendTarget, Match, PathMatch, Route, RouteKind, RouteTable, Rule};
    use crate::target::ServiceTarget;

    fn target(name: &str) -> ServiceTarget {
        ServiceTarget {
            hostname: format!("{name}.ns.svc.cluster.local"),
            namespace: "ns".into(),
            port: 8080,
            policy: None,
        }
    }

    fn table(rule: Rule) -> RouteTable {
        let route = Route {
            kind: RouteKind::Http,
            namespace: "ns".into(),
            name: "r".into(),
            created: 0,
            hostnames: Vec::new(),
            rules: vec![Rule {
                matches: vec![Match { path: PathMatch::Prefix("/api".into()), ..Match::default() }],
                ..rule
            }],
        };
        RouteTable::build(vec![route]).0
    }

    fn decide<'a>(t: &'a RouteTable, req: &mut Parts) -> Decision<'a> {
        let matched = t.find(req).expect("routed");
        prepare(matched, req, 80, &mut StdRng::seed_from_u64(1))
    }

    fn set(name: &'static str, value: &'static str) -> HeaderModifier {
        HeaderModifier {
            set: vec![(HeaderName::from_static(name), HeaderValue::from_static(value))],
            ..Default::default()
        }
    }

    #[test]
    fn forward_applies_rule_then_backend_filters_and_carries_the_policy() {
        let backend = Backend {
            target: BackendTarget::Service(target("b")),
            weight: 1,
            filters: vec![Filter::RequestHeaderModifier(set("x-who", "backend"))],
        };
        let rule = Rule {
            filters: vec![
                Filter::RequestHeaderModifier(set("x-who", "rule")),
                Filter::UrlRewrite(UrlRewrite {
                    path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
                    hostname: None,
                }),
                Filter::ResponseHeaderModifier(set("x-resp", "1")),
            ],
            backends: vec![backend],
            retry: RetryPolicy::none(),
            ..Rule::default()
        };
        let t = table(rule);
        let mut req = Request::get("/api/x?y=1").body(()).unwrap().into_parts().0;
        let Decision::Forward(f) = decide(&t, &mut req) else { panic!("not forwarded") };
        assert_eq!(f.backend.target, &target("b"));
        assert_eq!(req.headers["x-who"], "backend");
        assert_eq!(req.uri, "/v2/x?y=1");
        assert_eq!(f.effects.response.len(), 1);
        assert_eq!(f.retry, &RetryPolicy::none());
    }

    #[test]
    fn unroutable_is_a_404_reply() {
        let t = table(Rule::default());
        let req = Request::get("/other").body(()).unwrap().into_parts().0;
        assert_eq!(t.find(&req).unwrap_err().reply().status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn redirect_rule_replies_without_a_backend() {
        let t = table(Rule { filters: vec![Filter::RequestRedirect(RequestRedirect::default())], ..Rule::default() });
        let mut req = Request::get("/api").header("host", "echo").body(()).unwrap().into_parts().0;
        let Decision::Reply { reply, .. } = decide(&t, &mut req) else { panic!("forwarded") };
        assert_eq!((reply.status, reply.headers[LOCATION].to_str().unwrap()), (StatusCode::FOUND, "http://echo/api"));
    }

    #[test]
    fn rule_without_backends_replies_500_with_response_effects() {
        let t = table(Rule { filters: vec![Filter::ResponseHeaderModifier(set("x-resp", "1"))], ..Rule::default() });
        let mut req = Request::get("/api").body(()).unwrap().into_parts().0;
        let Decision::Reply { mut reply, effects, .. } = decide(&t, &mut req) else { panic!("forwarded") };
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        effects.apply_response(&mut reply.headers);
        assert_eq!(reply.headers["x-resp"], "1");
    }

    #[test]
    fn only_sampled_mirrors_are_sent() {
        let mirror = |name, percent| Filter::RequestMirror(RequestMirror { target: target(name), percent });
        let rule = Rule {
            filters: vec![mirror("always", 100.0), mirror("never", 0.0)],
            backends: vec![Backend { target: BackendTarget::Service(target("b")), weight: 1, filters: Vec::new() }],
            ..Rule::default()
        };
        let t = table(rule);
        let mut req = Request::get("/api").body(()).unwrap().into_parts().0;
        let Decision::Forward(f) = decide(&t, &mut req) else { panic!("not forwarded") };
        let names: Vec<_> = f.mirrors.iter().map(|m| m.target.hostname.as_str()).collect();
        assert_eq!(names, ["always.ns.svc.cluster.local"]);
    }
}
