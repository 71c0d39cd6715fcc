use super::*;
use ambit_api::waypoint::{backend, filter, path_match, path_modifier};

/// Resolves any host of namespace `mesh` to `<host>.mesh.svc.cluster.local` on the destination's port, else the
/// request's; a subset is invalid.
struct Fake;

impl DestinationResolver for Fake {
    fn resolve(&self, ns: &str, d: &VsDestination, port: u32) -> Backend {
        if d.subset.is_some() || ns != "mesh" {
            return route_convert::invalid(format!("cannot resolve {}", d.host));
        }
        let port = d.port.as_ref().map_or(port, |p| p.number);
        route_convert::service(ns, format!("{}.mesh.svc.cluster.local", d.host), port)
    }
}

use super::super::route_convert;

fn vs(spec: &str, port: u32) -> Result<Option<Route>, MeshRouteError> {
    let text = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v, namespace: mesh}}\nspec:\n{spec}"
    );
    virtual_service(&serde_yaml::from_str(&text).unwrap(), PortContext { port }, &Fake)
}

fn rule(spec: &str) -> Rule {
    let route = vs(spec, 80).unwrap().expect("applies to port 80");
    assert_eq!(route.origin.as_ref().unwrap().kind(), RouteKind::VirtualService);
    assert_eq!(route.rules.len(), 1);
    route.rules.into_iter().next().unwrap()
}

fn service_of(b: &Backend) -> (&str, u32, u32) {
    match &b.kind {
        Some(backend::Kind::Service(s)) => (s.hostname.as_str(), s.port, b.weight),
        other => panic!("not a service: {other:?}"),
    }
}

#[test]
fn a_weighted_split_with_retries_and_a_timeout_as_istio_documents_it() {
    let r = rule(
        r#"  hosts: [user-service]
  http:
  - route:
    - destination: {host: user-service}
      weight: 90
    - destination: {host: user-service-v2, port: {number: 8080}}
      weight: 10
    retries: {attempts: 2, perTryTimeout: 1s}
    timeout: 3s"#,
    );
    let backends: Vec<_> = r.backends.iter().map(service_of).collect();
    assert_eq!(
        backends,
        [("user-service.mesh.svc.cluster.local", 80, 90), ("user-service-v2.mesh.svc.cluster.local", 8080, 10)]
    );
    let t = r.timeouts.unwrap();
    assert_eq!((t.request.unwrap().seconds, t.backend_request.unwrap().seconds), (3, 1));
    let retry = r.retry.unwrap();
    assert_eq!((retry.attempts, retry.exact_codes), (2, false), "no retryOn: the waypoint's (Istio's) default codes");
    let m = &r.matches[0];
    assert_eq!(m.path.as_ref().unwrap().r#type(), path_match::Type::StringPrefix, "no match: every path");
}

#[test]
fn matches_keep_istio_semantics() {
    let r = rule(
        r#"  hosts: [web]
  http:
  - match:
    - uri: {prefix: /api/users}
      headers: {End-User: {exact: jason}, x-tier: {prefix: gold}, x-any: {}}
      queryParams: {debug: {regex: "[01]"}}
      method: {exact: get}
      ignoreUriCase: true
    route: [{destination: {host: users}}]"#,
    );
    let m = &r.matches[0];
    let p = m.path.as_ref().unwrap();
    assert_eq!((p.r#type(), p.value.as_str(), p.ignore_case), (path_match::Type::StringPrefix, "/api/users", true));
    let headers: Vec<_> = m.headers.iter().map(|h| (h.name.as_str(), h.r#type(), h.value.as_str())).collect();
    assert_eq!(
        headers,
        [
            ("end-user", MatchType::Exact, "jason"),
            ("x-any", MatchType::RegularExpression, ".*"),
            ("x-tier", MatchType::RegularExpression, "gold.*"),
        ]
    );
    assert_eq!(m.query_params[0].value, "[01]");
    assert_eq!(m.method, "GET");
    assert_eq!(r.backends[0].weight, 1, "a lone destination gets every request");
}

#[test]
fn rules_stay_in_order_and_a_match_on_another_port_is_left_out() {
    let spec = r#"  hosts: [web]
  http:
  - match: [{uri: {exact: /admin}, port: 8080}]
    route: [{destination: {host: admin}}]
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: web, subset: v2}}]
  - route: [{destination: {host: web, subset: v1}}]"#;
    assert_eq!(vs(spec, 8080).unwrap().unwrap().rules.len(), 3);
    let r = vs(spec, 80).unwrap().unwrap();
    assert_eq!(r.rules.len(), 2, "the first rule names port 8080 only");
    assert_eq!(r.rules[0].matches[0].headers[0].name, "end-user");
    assert!(matches!(&r.rules[1].backends[0].kind, Some(backend::Kind::Invalid(_))), "subset: unresolved here");
    let only_8080 = "  hosts: [web]\n  http: [{match: [{port: 8080}], route: [{destination: {host: a}}]}]";
    assert_eq!(vs(only_8080, 80).unwrap(), None, "no rule for port 80: not attached there");
}

#[test]
fn filters_come_in_envoys_order_fault_first() {
    let r = rule(
        r#"  hosts: [web]
  http:
  - match: [{uri: {prefix: /v1}}]
    rewrite: {uri: /v2, authority: web-v2}
    headers:
      request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
      response: {set: {x-d: "4"}}
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 50}}
      abort: {httpStatus: 503, percentage: {value: 10}}
    mirror: {host: shadow}
    mirrorPercentage: {value: 25.5}
    route:
    - destination: {host: web}
      headers: {request: {set: {x-v: "2"}}}"#,
    );
    let kinds: Vec<_> = r.filters.iter().map(|f| f.kind.clone().unwrap()).collect();
    let Some(filter::Kind::Fault(f)) = &kinds.first() else { panic!("{kinds:?}") };
    assert_eq!((f.delay.unwrap().seconds, f.delay_percent, f.abort_http_status, f.abort_percent), (2, 50.0, 503, 10.0));
    assert!(
        matches!(&kinds[1], filter::Kind::RequestHeaderModifier(h) if h.set[0].name == "x-a" && h.remove == ["x-c"])
    );
    assert!(matches!(&kinds[2], filter::Kind::ResponseHeaderModifier(_)));
    let filter::Kind::UrlRewrite(rw) = &kinds[3] else { panic!() };
    assert_eq!(rw.hostname, "web-v2");
    assert_eq!(rw.path.as_ref().unwrap().kind, Some(path_modifier::Kind::ReplacePrefixMatch("/v2".into())));
    let filter::Kind::RequestMirror(m) = &kinds[4] else { panic!() };
    assert_eq!((service_of(m.backend.as_ref().unwrap()).0, m.percent), ("shadow.mesh.svc.cluster.local", 25.5));
    assert!(matches!(&r.backends[0].filters[0].kind, Some(filter::Kind::RequestHeaderModifier(_))));
}

#[test]
fn a_redirect_answers_301_and_an_exact_match_rewrite_replaces_the_path() {
    let r = rule("  hosts: [web]\n  http: [{match: [{uri: {exact: /old}}], redirect: {uri: /new, authority: b}}]");
    let Some(filter::Kind::RequestRedirect(rd)) = &r.filters[0].kind else { panic!("{:?}", r.filters) };
    assert_eq!((rd.status_code, rd.hostname.as_str()), (301, "b"));
    assert!(r.backends.is_empty());
    let r = rule("  hosts: [web]\n  http: [{match: [{uri: {exact: /old}}], rewrite: {uri: /new}, route: [{destination: {host: web}}]}]");
    let Some(filter::Kind::UrlRewrite(rw)) = &r.filters[0].kind else { panic!() };
    assert_eq!(rw.path.as_ref().unwrap().kind, Some(path_modifier::Kind::ReplaceFullPath("/new".into())));
}

#[test]
fn retry_on_lists_exactly_what_is_retried() {
    let r = rule("  hosts: [web]\n  http: [{route: [{destination: {host: web}}], retries: {attempts: 3, retryOn: 'gateway-error,connect-failure,unavailable,409'}}]");
    let retry = r.retry.unwrap();
    assert_eq!(
        (retry.attempts, retry.codes, retry.grpc_codes, retry.exact_codes),
        (3, vec![409, 502, 503, 504], vec![14], true)
    );
    assert!(retry.on_reset_or_timeout, "gateway-error retries a per-try timeout (Envoy)");
    let r = rule("  hosts: [web]\n  http: [{route: [{destination: {host: web}}], retries: {attempts: 1, retryOn: connect-failure}}]");
    let retry = r.retry.unwrap();
    assert!(retry.codes.is_empty() && !retry.on_reset_or_timeout, "connection failures only");
    let r = rule("  hosts: [web]\n  http: [{route: [{destination: {host: web}}], retries: {perTryTimeout: 1s}}]");
    assert_eq!(r.retry.unwrap().attempts, 0, "Istio: retries without attempts disables them");
}

#[test]
fn invalid_objects_say_why() {
    let bad = |spec: &str| vs(&format!("  hosts: [web]\n  http:\n{spec}"), 80).unwrap_err().to_string();
    assert!(bad("  - {route: [{destination: {host: web}}], timeout: 3 seconds}").contains("bad duration"));
    assert!(bad("  - {route: [{destination: {host: web}}], retries: {attempts: 1, retryOn: sometimes}}")
        .contains("sometimes"));
    assert!(bad("  - {redirect: {uri: /x}, route: [{destination: {host: web}}]}").contains("cannot both"));
    assert!(
        bad("  - {match: [{uri: {exact: /a, prefix: /b}}], route: [{destination: {host: web}}]}").contains("only one")
    );
    assert!(bad("  - {}").contains("route or a redirect"));
    assert!(bad("  - {route: [{destination: {host: web}}], fault: {abort: {grpcStatus: NOPE}}}").contains("NOPE"));
    assert!(bad("  - {route: [{destination: {host: web}}], mirror: {host: m}, mirrorPercentage: {value: 150}}")
        .contains("150"));
    let strict = serde_yaml::from_str::<VirtualService>(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec: {http: [{corsPolicy: {}}]}",
    );
    assert!(strict.unwrap_err().to_string().contains("corsPolicy"), "a field Ambit does not apply is named");
}

#[test]
fn a_traffic_split_sends_the_apex_port_to_its_backends_by_weight() {
    let text = "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: web, namespace: mesh}\n\
                spec: {service: web, backends: [{service: web-v1, weight: 90}, {service: web-v2, weight: 10}]}";
    let ts: TrafficSplit = serde_yaml::from_str(text).unwrap();
    let r = traffic_split(&ts, PortContext { port: 8080 }, &Fake).unwrap();
    assert_eq!(r.origin.as_ref().unwrap().kind(), RouteKind::TrafficSplit);
    let backends: Vec<_> = r.rules[0].backends.iter().map(service_of).collect();
    assert_eq!(backends, [("web-v1.mesh.svc.cluster.local", 8080, 90), ("web-v2.mesh.svc.cluster.local", 8080, 10)]);
    let with_matches: TrafficSplit = serde_yaml::from_str(&format!("{text}\n"))
        .map(|mut t: TrafficSplit| {
            t.spec.matches.push(serde_yaml::Value::Null);
            t
        })
        .unwrap();
    assert!(traffic_split(&with_matches, PortContext { port: 80 }, &Fake).is_err());
}

#[test]
fn go_durations_parse_as_istio_writes_them() {
    let d = |s: &str| go_duration(s).map(|d| (d.seconds, d.nanos));
    assert_eq!(d("1s"), Ok((1, 0)));
    assert_eq!(d("1.5s"), Ok((1, 500_000_000)));
    assert_eq!(d("250ms"), Ok((0, 250_000_000)));
    assert_eq!(d("1m30s"), Ok((90, 0)));
    assert_eq!(d("1h"), Ok((3600, 0)));
    assert_eq!(d("0"), Ok((0, 0)));
    assert!(d("3").is_err() && d("s").is_err() && d("1d").is_err() && d("").is_err());
}
