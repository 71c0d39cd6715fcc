use super::*;
use ambit_api::waypoint::{backend, filter, path_match, path_modifier, Route};
use prost::Message;

/// Resolves `svc-*` in namespace `mesh` and nothing else.
struct Fake;

impl BackendResolver for Fake {
    fn resolve(&self, ns: &str, r: &BackendRef) -> Backend {
        if r.name.starts_with("svc-") && ns == "mesh" && r.namespace.is_none() {
            service(ns, format!("{}.{ns}.svc.cluster.local", r.name), r.port.unwrap_or(0))
        } else {
            invalid(format!("unknown {}", r.name))
        }
    }
}

fn http(spec: &str) -> Result<Route, RouteError> {
    let text = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: r, namespace: mesh, creationTimestamp: '2026-01-02T03:04:05Z'}}\nspec:\n{spec}"
    );
    http_route(&serde_yaml::from_str(&text).unwrap(), &Fake)
}

fn grpc(spec: &str) -> Result<Route, RouteError> {
    let text = format!("apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: mesh}}\nspec:\n{spec}");
    grpc_route(&serde_yaml::from_str(&text).unwrap(), &Fake)
}

/// Through the wire, as the waypoint decodes it.
fn wire(r: Route) -> Route {
    Route::decode(r.encode_to_vec().as_slice()).unwrap()
}

#[test]
fn an_http_route_decodes_field_by_field() {
    let r = wire(
        http(
            r#"  parentRefs: [{group: "", kind: Service, name: web}]
  hostnames: [web.mesh.svc.cluster.local]
  rules:
  - name: v2
    matches:
    - path: {type: Exact, value: /exact}
      headers: [{name: X-Env, value: canary}, {type: RegularExpression, name: x-id, value: "[0-9]+"}]
      queryParams: [{name: debug, value: "1"}]
      method: post
    - path: {type: PathPrefix, value: /v2}
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}], add: [{name: c, value: d}], remove: [e]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: f, value: g}]}}
    - {type: URLRewrite, urlRewrite: {hostname: other, path: {type: ReplaceFullPath, replaceFullPath: /v1}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: svc-shadow, port: 80}, fraction: {numerator: 1, denominator: 4}}}
    backendRefs:
    - {name: svc-v2, port: 8080, weight: 90, filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: v, value: "2"}]}}]}
    - {name: gone, port: 80, weight: 10}
    timeouts: {request: 10s, backendRequest: 1500ms}
    retry: {codes: [503, 502], attempts: 3, backoff: 100ms}
  - backendRefs: [{name: svc-v1, port: 80}]
"#,
        )
        .unwrap(),
    );
    let o = r.origin.unwrap();
    assert_eq!((o.kind(), o.namespace.as_str(), o.name.as_str()), (RouteKind::HttpRoute, "mesh", "r"));
    assert_eq!(o.creation_timestamp, 1_767_323_045, "2026-01-02T03:04:05Z");
    assert_eq!(r.hostnames, ["web.mesh.svc.cluster.local"]);
    assert_eq!(r.rules.len(), 2);
    let rule = &r.rules[0];
    assert_eq!(rule.name, "v2");
    let m = &rule.matches[0];
    let p = m.path.as_ref().unwrap();
    assert_eq!((p.r#type(), p.value.as_str()), (path_match::Type::Exact, "/exact"));
    assert_eq!(
        (m.headers[0].name.as_str(), m.headers[0].r#type(), m.headers[0].value.as_str()),
        ("x-env", MatchType::Exact, "canary")
    );
    assert_eq!(m.headers[1].r#type(), MatchType::RegularExpression);
    assert_eq!((m.query_params[0].name.as_str(), m.query_params[0].value.as_str()), ("debug", "1"));
    assert_eq!(m.method, "POST");
    assert_eq!(rule.matches[1].path.as_ref().unwrap().r#type(), path_match::Type::Prefix);
    let Some(filter::Kind::RequestHeaderModifier(h)) = &rule.filters[0].kind else { panic!("{:?}", rule.filters[0]) };
    assert_eq!((h.set[0].name.as_str(), h.add[0].value.as_str(), h.remove[0].as_str()), ("a", "d", "e"));
    assert!(matches!(&rule.filters[1].kind, Some(filter::Kind::ResponseHeaderModifier(h)) if h.add[0].name == "f"));
    let Some(filter::Kind::UrlRewrite(u)) = &rule.filters[2].kind else { panic!() };
    assert_eq!(u.hostname, "other");
    assert_eq!(u.path.as_ref().unwrap().kind, Some(path_modifier::Kind::ReplaceFullPath("/v1".into())));
    let Some(filter::Kind::RequestMirror(mirror)) = &rule.filters[3].kind else { panic!() };
    assert_eq!(mirror.percent, 25.0);
    assert!(
        matches!(&mirror.backend.as_ref().unwrap().kind, Some(backend::Kind::Service(s)) if s.hostname == "svc-shadow.mesh.svc.cluster.local")
    );
    let b = &rule.backends[0];
    let Some(backend::Kind::Service(s)) = &b.kind else { panic!("{b:?}") };
    assert_eq!(
        (s.hostname.as_str(), s.namespace.as_str(), s.port, b.weight),
        ("svc-v2.mesh.svc.cluster.local", "mesh", 8080, 90)
    );
    assert!(matches!(&b.filters[0].kind, Some(filter::Kind::RequestHeaderModifier(h)) if h.set[0].value == "2"));
    assert_eq!(rule.backends[1].kind, Some(backend::Kind::Invalid("unknown gone".into())), "kept, as a 500");
    assert_eq!(rule.backends[1].weight, 10);
    let t = rule.timeouts.as_ref().unwrap();
    assert_eq!(t.request, Some(prost_types::Duration { seconds: 10, nanos: 0 }));
    assert_eq!(t.backend_request, Some(prost_types::Duration { seconds: 1, nanos: 500_000_000 }));
    let retry = rule.retry.as_ref().unwrap();
    assert_eq!((retry.attempts, retry.codes.as_slice()), (3, [503, 502].as_slice()));
    assert_eq!(retry.backoff, Some(prost_types::Duration { seconds: 0, nanos: 100_000_000 }));
    // The second rule: the spec's defaults filled in.
    let second = &r.rules[1];
    assert_eq!(second.matches.len(), 1);
    assert_eq!(second.matches[0].path.as_ref().unwrap().value, "/");
    assert_eq!(second.backends[0].weight, 1);
    assert_eq!((second.timeouts, second.retry.clone()), (None, None), "absent: the waypoint's defaults");
}

#[test]
fn a_grpc_route_becomes_path_matches_and_keeps_its_kind() {
    let r = wire(
        grpc(
            r#"  rules:
  - matches:
    - method: {service: echo.Echo, method: Say}
    - method: {service: echo.Echo}
    - method: {method: Ping}
      headers: [{name: X-A, value: b}]
    - method: {type: RegularExpression, service: "echo\\..*"}
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}]
    backendRefs: [{name: svc-grpc, port: 9000, weight: 3}]
"#,
        )
        .unwrap(),
    );
    assert_eq!(
        r.origin.as_ref().unwrap().kind(),
        RouteKind::GrpcRoute,
        "the waypoint answers unroutable gRPC with gRPC"
    );
    let paths: Vec<(path_match::Type, &str)> =
        r.rules[0].matches.iter().map(|m| m.path.as_ref().unwrap()).map(|p| (p.r#type(), p.value.as_str())).collect();
    assert_eq!(
        paths,
        [
            (path_match::Type::Exact, "/echo.Echo/Say"),
            (path_match::Type::Prefix, "/echo.Echo"),
            (path_match::Type::RegularExpression, "/[^/]+/Ping"),
            (path_match::Type::RegularExpression, "/(echo\\..*)/([^/]+)"),
        ]
    );
    assert_eq!(r.rules[0].matches[2].headers[0].name, "x-a");
    assert_eq!(r.rules[0].backends[0].weight, 3);
    assert!(grpc("  rules: [{matches: [{method: {type: Exact}}]}]\n").is_err(), "a match naming nothing");
}

#[test]
fn what_the_gateway_api_calls_invalid_is_refused() {
    let cases = [
        ("  rules: [{filters: [{type: CORS}]}]\n", "not supported"),
        ("  rules: [{filters: [{type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}]}]\n", "ExtensionRef"),
        ("  rules: [{filters: [{type: RequestHeaderModifier}]}]\n", "no requestHeaderModifier"),
        ("  rules: [{matches: [{path: {type: Regex, value: /}}]}]\n", "unknown path match type"),
        ("  rules: [{matches: [{path: {value: relative}}]}]\n", "must start with"),
        (
            "  rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]\n",
            "ReplacePrefixMatch needs PathPrefix",
        ),
        (
            "  rules: [{filters: [{type: URLRewrite, urlRewrite: {hostname: a}}, {type: RequestRedirect, requestRedirect: {hostname: b}}]}]\n",
            "cannot be combined",
        ),
        ("  rules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304}}]}]\n", "304"),
        ("  rules: [{timeouts: {request: 1s, backendRequest: 2s}}]\n", "longer"),
        ("  rules: [{timeouts: {request: 10}}]\n", "bad duration"),
    ];
    for (spec, want) in cases {
        let err = http(spec).unwrap_err().to_string();
        assert!(err.contains(want), "{spec}: {err}");
    }
    assert!(
        grpc("  rules: [{filters: [{type: URLRewrite, urlRewrite: {hostname: a}}]}]\n").is_err(),
        "not a gRPC filter"
    );
}

#[test]
fn every_redirect_status_the_gateway_api_allows_is_taken() {
    // 303, 307 and 308 are extended features (HTTPRoute303RedirectStatusCode…), which the waypoint supports.
    for code in [301, 302, 303, 307, 308] {
        let spec =
            format!("  rules: [{{filters: [{{type: RequestRedirect, requestRedirect: {{statusCode: {code}}}}}]}}]\n");
        assert!(http(&spec).is_ok(), "{code}");
    }
}

#[test]
fn durations_follow_gep_2257() {
    let d = |s| duration(s).map(|d| (d.seconds, d.nanos));
    assert_eq!(d("1h30m"), Ok((5400, 0)));
    assert_eq!(d("0s"), Ok((0, 0)));
    assert_eq!(d("1s500ms"), Ok((1, 500_000_000)));
    for bad in ["", "1", "1x", "-1s", "1h1m1s1ms1h", "123456s", "1.5s"] {
        assert!(duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_route_without_rules_matches_everything_and_has_no_backend() {
    let r = http("  parentRefs: [{group: '', kind: Service, name: web}]\n").unwrap();
    assert_eq!(r.rules.len(), 1);
    assert!(r.rules[0].backends.is_empty(), "the waypoint answers 500");
}
