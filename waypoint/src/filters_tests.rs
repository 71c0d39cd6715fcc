use http::header::LOCATION;
use http::Request;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::reply::ReplyReason;

fn req(uri: &str) -> Parts {
    Request::get(uri).header(HOST, "echo.ns:80").body(()).unwrap().into_parts().0
}

fn ctx(prefix: Option<&str>) -> FilterContext<'_> {
    FilterContext { matched_prefix: prefix, string_prefix: false, port: 80 }
}

fn name(n: &'static str) -> HeaderName {
    HeaderName::from_static(n)
}

fn value(v: &'static str) -> HeaderValue {
    HeaderValue::from_static(v)
}

/// The Location of the redirect `r` gives `uri` (matched on `prefix`).
fn location(r: RequestRedirect, uri: &str, prefix: Option<&str>) -> String {
    let filters = [Filter::RequestRedirect(r)];
    let mut parts = req(uri);
    let mut effects = Effects::default();
    match apply(&filters, &mut parts, &ctx(prefix), &mut effects) {
        ControlFlow::Break(reply) => reply.headers[LOCATION].to_str().unwrap().to_owned(),
        ControlFlow::Continue(()) => panic!("no redirect"),
    }
}

/// The path and query `rewrite` sends for `uri` (matched on `prefix`).
fn rewritten(rewrite: UrlRewrite, uri: &str, prefix: Option<&str>) -> String {
    let filters = [Filter::UrlRewrite(rewrite)];
    let mut parts = req(uri);
    assert_eq!(apply(&filters, &mut parts, &ctx(prefix), &mut Effects::default()), ControlFlow::Continue(()));
    parts.uri.path_and_query().unwrap().to_string()
}

#[test]
fn request_header_modifier_sets_adds_removes() {
    let m = HeaderModifier {
        set: vec![(name("x-set"), value("new"))],
        add: vec![(name("x-add"), value("two"))],
        remove: vec![name("x-gone")],
    };
    let mut parts = req("/");
    parts.headers.append("x-set", value("old1"));
    parts.headers.append("x-set", value("old2"));
    parts.headers.insert("x-add", value("one"));
    parts.headers.insert("x-gone", value("bye"));
    let filters = [Filter::RequestHeaderModifier(m)];
    let _ = apply(&filters, &mut parts, &ctx(None), &mut Effects::default());
    assert_eq!(parts.headers.get_all("x-set").iter().collect::<Vec<_>>(), ["new"]);
    assert_eq!(parts.headers.get_all("x-add").iter().collect::<Vec<_>>(), ["one", "two"]);
    assert!(!parts.headers.contains_key("x-gone"));
}

#[test]
fn response_header_modifier_is_deferred_to_the_response() {
    let m = HeaderModifier { set: vec![(name("x-resp"), value("1"))], ..HeaderModifier::default() };
    let filters = [Filter::ResponseHeaderModifier(m)];
    let mut parts = req("/");
    let mut effects = Effects::default();
    let _ = apply(&filters, &mut parts, &ctx(None), &mut effects);
    assert!(!parts.headers.contains_key("x-resp"));
    let mut response = HeaderMap::new();
    effects.apply_response(&mut response);
    assert_eq!(response["x-resp"], "1");
}

#[test]
fn rule_then_backend_filters_apply_in_order() {
    let set = |v: &'static str| {
        Filter::RequestHeaderModifier(HeaderModifier { set: vec![(name("x-who"), value(v))], ..Default::default() })
    };
    let rule = [set("rule")];
    let backend = [set("backend")];
    let mut parts = req("/");
    let mut effects = Effects::default();
    let _ = apply(&rule, &mut parts, &ctx(None), &mut effects);
    let _ = apply(&backend, &mut parts, &ctx(None), &mut effects);
    assert_eq!(parts.headers["x-who"], "backend");
}

#[test]
fn redirect_defaults_to_302_same_host_and_path() {
    let filters = [Filter::RequestRedirect(RequestRedirect::default())];
    let mut parts = req("/a?b=c");
    let ControlFlow::Break(reply) = apply(&filters, &mut parts, &ctx(None), &mut Effects::default()) else {
        panic!("no redirect")
    };
    assert_eq!(reply.status, StatusCode::FOUND);
    assert_eq!(reply.reason, ReplyReason::Redirect);
    assert_eq!(reply.headers[LOCATION], "http://echo.ns/a?b=c");
}

#[test]
fn redirect_status_code_is_the_filters() {
    let filters =
        [Filter::RequestRedirect(RequestRedirect { status: StatusCode::PERMANENT_REDIRECT, ..Default::default() })];
    let ControlFlow::Break(reply) = apply(&filters, &mut req("/"), &ctx(None), &mut Effects::default()) else {
        panic!("no redirect")
    };
    assert_eq!(reply.status, StatusCode::PERMANENT_REDIRECT);
}

#[test]
fn redirect_replace_full_path() {
    let r = RequestRedirect { path: Some(PathModifier::ReplaceFullPath("/new".into())), ..Default::default() };
    assert_eq!(location(r, "/old/x?q=1", Some("/old")), "http://echo.ns/new?q=1");
}

#[test]
fn redirect_replace_prefix_match() {
    let r = RequestRedirect { path: Some(PathModifier::ReplacePrefixMatch("/v2".into())), ..Default::default() };
    assert_eq!(location(r, "/api/v1/x", Some("/api/v1")), "http://echo.ns/v2/x");
}

#[test]
fn redirect_hostname_and_scheme_take_the_schemes_port() {
    let r =
        RequestRedirect { scheme: Some("https".into()), hostname: Some("other.example".into()), ..Default::default() };
    assert_eq!(location(r, "/p", None), "https://other.example/p");
}

#[test]
fn redirect_port_is_written_unless_the_schemes_default() {
    let r = RequestRedirect { port: Some(8443), ..Default::default() };
    assert_eq!(location(r, "/p", None), "http://echo.ns:8443/p");
    let r = RequestRedirect { scheme: Some("https".into()), port: Some(443), ..Default::default() };
    assert_eq!(location(r, "/p", None), "https://echo.ns/p");
}

#[test]
fn redirect_without_scheme_or_port_keeps_the_called_port() {
    let filters = [Filter::RequestRedirect(RequestRedirect::default())];
    let c = FilterContext { matched_prefix: None, string_prefix: false, port: 8080 };
    let ControlFlow::Break(reply) = apply(&filters, &mut req("/p"), &c, &mut Effects::default()) else {
        panic!("no redirect")
    };
    assert_eq!(reply.headers[LOCATION], "http://echo.ns:8080/p");
}

#[test]
fn filters_after_a_redirect_do_not_run() {
    let after = HeaderModifier { set: vec![(name("x-after"), value("1"))], ..Default::default() };
    let filters = [Filter::RequestRedirect(RequestRedirect::default()), Filter::RequestHeaderModifier(after)];
    let mut parts = req("/");
    let _ = apply(&filters, &mut parts, &ctx(None), &mut Effects::default());
    assert!(!parts.headers.contains_key("x-after"));
}

#[test]
fn rewrite_replace_prefix_match_cases() {
    let with = |replacement: &str| UrlRewrite {
        path: Some(PathModifier::ReplacePrefixMatch(replacement.into())),
        ..Default::default()
    };
    assert_eq!(rewritten(with("/v2"), "/api/v1/x", Some("/api/v1")), "/v2/x");
    assert_eq!(rewritten(with("/v2/"), "/api/v1/x", Some("/api/v1")), "/v2/x");
    assert_eq!(rewritten(with("/v2"), "/api/v1", Some("/api/v1")), "/v2");
    assert_eq!(rewritten(with("/v2"), "/api/v1/", Some("/api/v1")), "/v2/");
    assert_eq!(rewritten(with("/"), "/strip/three", Some("/strip")), "/three");
    assert_eq!(rewritten(with("/"), "/strip", Some("/strip")), "/");
    assert_eq!(rewritten(with(""), "/strip/", Some("/strip")), "/");
    assert_eq!(rewritten(with("/x"), "/a?k=v", Some("")), "/x/a?k=v");
}

#[test]
fn replace_prefix_match_after_a_regex_keeps_the_path() {
    let r = UrlRewrite { path: Some(PathModifier::ReplacePrefixMatch("/v2".into())), ..Default::default() };
    assert_eq!(rewritten(r, "/api/1", None), "/api/1");
}

#[test]
fn rewrite_replace_full_path_keeps_query() {
    let r = UrlRewrite { path: Some(PathModifier::ReplaceFullPath("/one".into())), ..Default::default() };
    assert_eq!(rewritten(r, "/full/path?x=1", Some("/full")), "/one?x=1");
}

#[test]
fn rewrite_hostname_sets_host_and_authority() {
    let filters = [Filter::UrlRewrite(UrlRewrite { hostname: Some("new.example".into()), path: None })];
    let mut parts = req("/p");
    let _ = apply(&filters, &mut parts, &ctx(None), &mut Effects::default());
    assert_eq!(parts.headers[HOST], "new.example");
    let mut h2 = Request::get("http://echo.ns:80/p").body(()).unwrap().into_parts().0;
    let _ = apply(&filters, &mut h2, &ctx(None), &mut Effects::default());
    assert_eq!(h2.uri.to_string(), "http://new.example/p");
    assert!(!h2.headers.contains_key(HOST));
}

#[test]
fn rewrite_to_an_invalid_path_is_a_500_not_a_panic() {
    let filters = [Filter::UrlRewrite(UrlRewrite {
        path: Some(PathModifier::ReplaceFullPath("/bad path".into())),
        hostname: None,
    })];
    let ControlFlow::Break(reply) = apply(&filters, &mut req("/"), &ctx(None), &mut Effects::default()) else {
        panic!("accepted")
    };
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
}

fn mirror(percent: f64) -> RequestMirror {
    let target = ServiceTarget {
        hostname: "shadow.ns.svc.cluster.local".into(),
        namespace: "ns".into(),
        port: 80,
        policy: None,
    };
    RequestMirror { target, percent }
}

#[test]
fn mirror_is_returned_for_the_caller_to_send() {
    let filters = [Filter::RequestMirror(mirror(100.0))];
    let mut effects = Effects::default();
    let _ = apply(&filters, &mut req("/"), &ctx(None), &mut effects);
    assert_eq!(effects.mirrors, [&mirror(100.0)]);
}

#[test]
fn mirror_percent_samples_requests() {
    let mut rng = StdRng::seed_from_u64(7);
    let m = mirror(25.0);
    let hits = (0..10_000).filter(|_| m.sampled(&mut rng)).count();
    assert!((2_300..=2_700).contains(&hits), "{hits} of 10000 for 25 %");
    assert!((0..100).all(|_| mirror(100.0).sampled(&mut rng)));
    assert!((0..100).all(|_| !mirror(0.0).sampled(&mut rng)));
}

/// The path and query `rewrite` sends for `uri` matched on the StringPrefix `prefix`.
fn rewritten_string_prefix(replacement: &str, uri: &str, prefix: &str) -> String {
    let filters = [Filter::UrlRewrite(UrlRewrite {
        path: Some(PathModifier::ReplacePrefixMatch(replacement.into())),
        hostname: None,
    })];
    let mut parts = req(uri);
    let c = FilterContext { matched_prefix: Some(prefix), string_prefix: true, port: 80 };
    assert_eq!(apply(&filters, &mut parts, &c, &mut Effects::default()), ControlFlow::Continue(()));
    parts.uri.path_and_query().unwrap().to_string()
}

#[test]
fn string_prefix_rewrite_replaces_exactly_the_prefix() {
    assert_eq!(rewritten_string_prefix("/v2", "/apiX?q=1", "/api"), "/v2X?q=1");
    assert_eq!(rewritten_string_prefix("/v2", "/api/x", "/api"), "/v2/x");
    // No slash handling at the joint, as Envoy's prefix_rewrite.
    assert_eq!(rewritten_string_prefix("/v2/", "/api/x", "/api"), "/v2//x");
    assert_eq!(rewritten_string_prefix("/", "/api/x", "/api/"), "/x");
    assert_eq!(rewritten_string_prefix("/v2", "/api", "/api"), "/v2");
    // Never an empty path or one without a leading slash.
    assert_eq!(rewritten_string_prefix("", "/api", "/api"), "/");
    assert_eq!(rewritten_string_prefix("v2", "/apiX", "/api"), "/v2X");
    // The same prefix as a Gateway API PathPrefix keeps its whole-segment joint.
    let gateway = UrlRewrite { path: Some(PathModifier::ReplacePrefixMatch("/v2/".into())), ..Default::default() };
    assert_eq!(rewritten(gateway, "/api/x", Some("/api")), "/v2/x");
}

#[test]
fn string_prefix_redirect_replaces_exactly_the_prefix() {
    let filters = [Filter::RequestRedirect(RequestRedirect {
        path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
        ..Default::default()
    })];
    let c = FilterContext { matched_prefix: Some("/old"), string_prefix: true, port: 80 };
    let ControlFlow::Break(reply) = apply(&filters, &mut req("/oldies?x=1"), &c, &mut Effects::default()) else {
        panic!("no redirect")
    };
    assert_eq!(reply.headers[LOCATION], "http://echo.ns/newies?x=1");
}

#[test]
fn replace_prefix_match_strips_a_prefix_matched_ignoring_case() {
    // A match with `path_ignore_case`: the configured prefix differs from the path in ASCII case.
    let gateway = UrlRewrite { path: Some(PathModifier::ReplacePrefixMatch("/v2".into())), ..Default::default() };
    assert_eq!(rewritten(gateway, "/api/x", Some("/API")), "/v2/x");
    assert_eq!(rewritten_string_prefix("/v2", "/apIX", "/API"), "/v2X");
    assert_eq!(replace_prefix("/Straße/x", "/STRAßE", "/s"), "/s/x");
}

#[test]
fn a_fault_filter_is_left_to_the_plan() {
    let fault = FaultInjection {
        abort: Some(Abort::Http(StatusCode::SERVICE_UNAVAILABLE)),
        abort_percent: 100.0,
        ..Default::default()
    };
    let filters = [Filter::Fault(fault)];
    let mut parts = req("/p");
    assert_eq!(apply(&filters, &mut parts, &ctx(None), &mut Effects::default()), ControlFlow::Continue(()));
}

#[test]
fn sampled_percentages() {
    let mut rng = StdRng::seed_from_u64(11);
    let hits = (0..10_000).filter(|_| sampled(10.0, &mut rng)).count();
    assert!((800..=1_200).contains(&hits), "{hits} of 10000 for 10 %");
    assert!((0..100).all(|_| sampled(100.0, &mut rng) && !sampled(0.0, &mut rng) && !sampled(f64::NAN, &mut rng)));
}
