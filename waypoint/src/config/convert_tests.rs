//! `ServiceRoutes` as the controller writes them (its `model/routes.rs` and
//! `model/route_convert.rs`: defaults filled in, a backendRef that does not
//! resolve as an invalid backend), sent through the wire, converted, and
//! asked to route requests.

use std::collections::HashMap;

use ambit_api::waypoint as pb;
use http::request::Parts;
use http::{Request, StatusCode};
use prost::Message;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::plan::{prepare, Decision};

const HOST: &str = "web.mesh.svc.cluster.local";

fn origin(kind: pb::RouteKind, name: &str, created: i64) -> Option<pb::RouteOrigin> {
    Some(pb::RouteOrigin {
        kind: kind.into(),
        namespace: "mesh".into(),
        name: name.into(),
        creation_timestamp: created,
    })
}

fn path(t: pb::path_match::Type, value: &str) -> Option<pb::PathMatch> {
    Some(pb::PathMatch { r#type: t.into(), value: value.into(), ..Default::default() })
}

fn prefix(value: &str) -> pb::RouteMatch {
    pb::RouteMatch { path: path(pb::path_match::Type::Prefix, value), ..Default::default() }
}

fn service(name: &str, port: u32, weight: u32) -> pb::Backend {
    let s = pb::ServiceBackend {
        hostname: format!("{name}.mesh.svc.cluster.local"),
        namespace: "mesh".into(),
        port,
        ..Default::default()
    };
    pb::Backend { kind: Some(pb::backend::Kind::Service(s)), weight, filters: vec![] }
}

fn invalid(reason: &str, weight: u32) -> pb::Backend {
    pb::Backend { kind: Some(pb::backend::Kind::Invalid(reason.into())), weight, filters: vec![] }
}

fn http_route(name: &str, rules: Vec<pb::Rule>) -> pb::Route {
    pb::Route { origin: origin(pb::RouteKind::HttpRoute, name, 0), hostnames: vec![], rules }
}

fn rule(matches: Vec<pb::RouteMatch>, backends: Vec<pb::Backend>) -> pb::Rule {
    pb::Rule { matches, backends, ..Default::default() }
}

fn port(port: u32, protocol: pb::Protocol, routes: Vec<pb::Route>) -> pb::PortRoutes {
    pb::PortRoutes {
        port,
        target_port: 8080,
        protocol: protocol.into(),
        name: "http".into(),
        routes,
        ..Default::default()
    }
}

/// Encoded and decoded, as the waypoint receives it, then converted.
fn convert(ports: Vec<pb::PortRoutes>) -> (ServiceConfig, Vec<Problem>) {
    let sr = pb::ServiceRoutes { hostname: HOST.into(), namespace: "mesh".into(), name: "web".into(), ports };
    let wire = pb::ServiceRoutes::decode(sr.encode_to_vec().as_slice()).unwrap();
    service_routes(&wire)
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = Request::builder().method(method).uri(uri).header("host", HOST);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

/// The hostname of the backend service a request is sent to, or the status
/// of the waypoint's own reply.
fn decide(table: &RouteTable, mut r: Parts, rng: &mut StdRng) -> Result<String, StatusCode> {
    let matched = table.find(&r).map_err(|no| no.reply().status)?;
    match prepare(matched, &mut r, 80, rng) {
        Decision::Forward(f) => Ok(f.backend.target.hostname.clone()),
        Decision::Reply { reply, .. } => Err(reply.status),
    }
}

#[test]
fn a_weighted_http_route_splits_by_weight() {
    let route = http_route("split", vec![rule(vec![prefix("/")], vec![service("v1", 80, 90), service("v2", 80, 10)])]);
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http, vec![route])]);
    assert!(problems.is_empty(), "{problems:?}");
    let p = svc.port(80).unwrap();
    assert_eq!((p.protocol, p.target_port, p.default_route), (Protocol::Http1, Some(8080), false));
    let mut rng = StdRng::seed_from_u64(7);
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..10_000 {
        *counts.entry(decide(&p.table, req("GET", "/x", &[]), &mut rng).unwrap()).or_default() += 1;
    }
    let v2 = counts["v2.mesh.svc.cluster.local"];
    assert!((800..1200).contains(&v2), "{counts:?}");
    assert_eq!(counts.values().sum::<u32>(), 10_000);
}

#[test]
fn a_grpc_route_method_match_is_a_path_match_and_unroutable_is_a_grpc_error() {
    // GRPCRoute `method: {service: pkg.Echo, method: Say}` as the controller writes it.
    let route = pb::Route {
        origin: origin(pb::RouteKind::GrpcRoute, "g", 0),
        hostnames: vec![],
        rules: vec![rule(
            vec![pb::RouteMatch { path: path(pb::path_match::Type::Exact, "/pkg.Echo/Say"), ..Default::default() }],
            vec![service("echo", 9000, 1)],
        )],
    };
    let (svc, problems) = convert(vec![port(9000, pb::Protocol::Grpc, vec![route])]);
    assert!(problems.is_empty(), "{problems:?}");
    let p = svc.port(9000).unwrap();
    assert_eq!(p.protocol, Protocol::Grpc);
    let mut rng = StdRng::seed_from_u64(1);
    let grpc = [("content-type", "application/grpc")];
    assert_eq!(decide(&p.table, req("POST", "/pkg.Echo/Say", &grpc), &mut rng).unwrap(), "echo.mesh.svc.cluster.local");
    let other = p.table.find(&req("POST", "/pkg.Echo/Other", &grpc)).unwrap_err().reply();
    assert_eq!((other.status, other.headers["grpc-status"].to_str().unwrap()), (StatusCode::OK, "12"));
    assert_eq!(p.table.routes()[0].kind, RouteKind::Grpc);
}

#[test]
fn an_invalid_backend_gets_500_and_the_valid_one_its_share() {
    let only_invalid = http_route("bad", vec![rule(vec![prefix("/bad")], vec![invalid("BackendNotFound", 1)])]);
    let zero = http_route("zero", vec![rule(vec![prefix("/zero")], vec![service("v1", 80, 0)])]);
    let half = http_route("half", vec![rule(vec![prefix("/half")], vec![invalid("gone", 1), service("v1", 80, 1)])]);
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http, vec![only_invalid, zero, half])]);
    assert!(problems.is_empty(), "{problems:?}");
    let t = &svc.port(80).unwrap().table;
    let mut rng = StdRng::seed_from_u64(3);
    assert_eq!(decide(t, req("GET", "/bad", &[]), &mut rng), Err(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(decide(t, req("GET", "/zero", &[]), &mut rng), Err(StatusCode::INTERNAL_SERVER_ERROR));
    let results: Vec<_> = (0..200).map(|_| decide(t, req("GET", "/half", &[]), &mut rng)).collect();
    assert!(results.contains(&Err(StatusCode::INTERNAL_SERVER_ERROR)));
    assert!(results.contains(&Ok("v1.mesh.svc.cluster.local".into())));
    assert_eq!(decide(t, req("GET", "/none", &[]), &mut rng), Err(StatusCode::NOT_FOUND));
}

#[test]
fn every_field_of_a_rule_is_mapped() {
    use pb::filter::Kind as F;
    let hm = |name: &str, value: &str| pb::HeaderModifier {
        set: vec![pb::Header { name: name.into(), value: value.into() }],
        add: vec![pb::Header { name: "x-add".into(), value: "a".into() }],
        remove: vec!["x-gone".into()],
    };
    let filter = |k| pb::Filter { kind: Some(k) };
    let mut v2 = service("v2", 8080, 3);
    v2.filters = vec![filter(F::RequestHeaderModifier(hm("x-backend", "v2")))];
    let secs = |s, ms: i32| Some(prost_types::Duration { seconds: s, nanos: ms * 1_000_000 });
    let r = pb::Rule {
        name: "main".into(),
        matches: vec![pb::RouteMatch {
            path: path(pb::path_match::Type::Prefix, "/api"),
            headers: vec![
                pb::HeaderMatch { name: "x-env".into(), r#type: pb::MatchType::Exact.into(), value: "canary".into() },
                pb::HeaderMatch {
                    name: "x-id".into(),
                    r#type: pb::MatchType::RegularExpression.into(),
                    value: "[0-9]+".into(),
                },
            ],
            query_params: vec![pb::QueryParamMatch {
                name: "debug".into(),
                r#type: pb::MatchType::Exact.into(),
                value: "1".into(),
            }],
            method: "POST".into(),
        }],
        filters: vec![
            filter(F::RequestHeaderModifier(hm("x-rule", "1"))),
            filter(F::ResponseHeaderModifier(hm("x-resp", "1"))),
            filter(F::UrlRewrite(pb::UrlRewrite {
                hostname: "other".into(),
                path: Some(pb::PathModifier { kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch("/v2".into())) }),
            })),
            filter(F::RequestMirror(pb::RequestMirror { backend: Some(service("shadow", 80, 1)), percent: 25.0 })),
        ],
        backends: vec![v2],
        timeouts: Some(pb::Timeouts { request: secs(10, 0), backend_request: secs(1, 500) }),
        retry: Some(pb::Retry { attempts: 3, codes: vec![502, 503], backoff: secs(0, 100), ..Default::default() }),
    };
    let mut route = http_route("full", vec![r]);
    route.hostnames = vec!["Web.mesh.svc.cluster.local".into()];
    route.origin = origin(pb::RouteKind::HttpRoute, "full", 1_700_000_000);
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http2, vec![route])]);
    assert!(problems.is_empty(), "{problems:?}");
    let p = svc.port(80).unwrap();
    assert_eq!(p.protocol, Protocol::Http2);
    let route = &p.table.routes()[0];
    assert_eq!((route.namespace.as_str(), route.name.as_str(), route.created), ("mesh", "full", 1_700_000_000));
    assert_eq!(route.hostnames, ["web.mesh.svc.cluster.local"]);
    let rule = &route.rules[0];
    assert_eq!(rule.name, "main");
    let m = &rule.matches[0];
    assert_eq!(m.path, PathMatch::Prefix("/api".into()));
    assert_eq!(m.method, Some(Method::POST));
    assert_eq!(m.headers[1].value, ValueMatch::RegularExpression("[0-9]+".into()));
    assert_eq!((m.query[0].name.as_str(), &m.query[0].value), ("debug", &ValueMatch::Exact("1".into())));
    assert_eq!(rule.filters.len(), 4);
    let Filter::RequestMirror(mirror) = &rule.filters[3] else { panic!("{:?}", rule.filters[3]) };
    assert_eq!(
        (mirror.target.hostname.as_str(), mirror.target.port, mirror.percent),
        ("shadow.mesh.svc.cluster.local", 80, 25.0)
    );
    assert_eq!(rule.backends[0].weight, 3);
    assert_eq!(rule.backends[0].filters.len(), 1);
    assert_eq!(
        rule.timeouts,
        Timeouts { request: Some(Duration::from_secs(10)), backend_request: Some(Duration::from_millis(1500)) }
    );
    assert_eq!(rule.retry, RetryPolicy::gateway(Some(3), vec![502, 503], Some(Duration::from_millis(100))));

    // And it routes as written.
    let mut r = req("POST", "/api/x?debug=1", &[("x-env", "canary"), ("x-id", "42"), ("x-gone", "1")]);
    let matched = p.table.find(&r).expect("matches");
    let Decision::Forward(f) = prepare(matched, &mut r, 80, &mut StdRng::seed_from_u64(1)) else { panic!("reply") };
    assert_eq!(f.backend.target.hostname, "v2.mesh.svc.cluster.local");
    assert_eq!(r.uri.path(), "/v2/x");
    assert_eq!(r.headers["host"], "other");
    let h = |n: &str| r.headers[n].to_str().unwrap().to_owned();
    assert_eq!((h("x-rule"), h("x-backend"), h("x-add")), ("1".into(), "v2".into(), "a".into()));
    assert!(!r.headers.contains_key("x-gone"));
    assert!(p.table.find(&req("POST", "/api/x?debug=1", &[("x-env", "canary"), ("x-id", "x")])).is_err());
    assert!(p.table.find(&req("GET", "/api/x?debug=1", &[("x-env", "canary"), ("x-id", "1")])).is_err());
}

#[test]
fn zero_timeouts_mean_none_and_retry_presence_matters() {
    let zero = Some(prost_types::Duration { seconds: 0, nanos: 0 });
    let no_retry = pb::Rule {
        matches: vec![prefix("/a")],
        timeouts: Some(pb::Timeouts { request: zero, backend_request: None }),
        retry: Some(pb::Retry { attempts: 0, codes: vec![], backoff: None, ..Default::default() }),
        ..Default::default()
    };
    let defaults = rule(vec![prefix("/b")], vec![]);
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http, vec![http_route("t", vec![no_retry, defaults])])]);
    assert!(problems.is_empty(), "{problems:?}");
    let rules = &svc.port(80).unwrap().table.routes()[0].rules;
    assert_eq!(rules[0].timeouts, Timeouts::default());
    assert_eq!(rules[0].retry.attempts, 0);
    assert_eq!(rules[1].retry, RetryPolicy::default(), "absent retry: Istio's default");
}

#[test]
fn redirect_fields_map_and_an_unset_status_is_302() {
    let redirect = pb::RequestRedirect {
        scheme: "https".into(),
        hostname: "".into(),
        path: Some(pb::PathModifier { kind: Some(pb::path_modifier::Kind::ReplaceFullPath("/new".into())) }),
        port: 8443,
        status_code: 301,
    };
    let r = pb::Rule {
        matches: vec![prefix("/old")],
        filters: vec![
            pb::Filter { kind: Some(pb::filter::Kind::RequestRedirect(redirect)) },
            pb::Filter { kind: Some(pb::filter::Kind::RequestRedirect(pb::RequestRedirect::default())) },
        ],
        ..Default::default()
    };
    let (svc, _) = convert(vec![port(80, pb::Protocol::Http, vec![http_route("r", vec![r])])]);
    let rule = &svc.port(80).unwrap().table.routes()[0].rules[0];
    assert_eq!(
        rule.filters[0],
        Filter::RequestRedirect(RequestRedirect {
            scheme: Some("https".into()),
            hostname: None,
            path: Some(PathModifier::ReplaceFullPath("/new".into())),
            port: Some(8443),
            status: StatusCode::MOVED_PERMANENTLY,
        })
    );
    assert_eq!(rule.filters[1], Filter::RequestRedirect(RequestRedirect::default()));
    let mut rng = StdRng::seed_from_u64(1);
    let t = &svc.port(80).unwrap().table;
    assert_eq!(decide(t, req("GET", "/old", &[]), &mut rng), Err(StatusCode::MOVED_PERMANENTLY));
}

#[test]
fn a_route_that_cannot_be_converted_is_dropped_alone() {
    let bad_header = pb::Rule {
        matches: vec![pb::RouteMatch {
            path: path(pb::path_match::Type::Prefix, "/"),
            headers: vec![pb::HeaderMatch { name: "bad header".into(), ..Default::default() }],
            ..Default::default()
        }],
        backends: vec![service("v1", 80, 1)],
        ..Default::default()
    };
    let no_filter_kind = pb::Rule { filters: vec![pb::Filter { kind: None }], ..rule(vec![prefix("/")], vec![]) };
    let bad_code = pb::Rule {
        retry: Some(pb::Retry { attempts: 1, codes: vec![70_000], backoff: None, ..Default::default() }),
        ..rule(vec![prefix("/")], vec![])
    };
    let negative = pb::Rule {
        timeouts: Some(pb::Timeouts {
            request: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
            ..Default::default()
        }),
        ..rule(vec![prefix("/")], vec![])
    };
    let good = http_route("good", vec![rule(vec![prefix("/good")], vec![service("v1", 80, 1)])]);
    let routes = vec![
        http_route("bad-header", vec![bad_header]),
        http_route("no-kind", vec![no_filter_kind]),
        http_route("bad-code", vec![bad_code]),
        http_route("negative", vec![negative]),
        pb::Route { origin: None, ..http_route("x", vec![]) },
        good,
    ];
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http, routes)]);
    let dropped: Vec<_> = problems.iter().map(|p| (p.route.as_deref().unwrap(), p.consequence)).collect();
    assert_eq!(
        dropped,
        [
            ("mesh/bad-header", Consequence::RouteDropped),
            ("mesh/no-kind", Consequence::RouteDropped),
            ("mesh/bad-code", Consequence::RouteDropped),
            ("mesh/negative", Consequence::RouteDropped),
            ("<no origin>", Consequence::RouteDropped),
        ]
    );
    assert!(problems[0].to_string().contains("invalid header name"), "{}", problems[0]);
    let p = svc.port(80).unwrap();
    assert_eq!(p.table.routes().len(), 1);
    let mut rng = StdRng::seed_from_u64(1);
    assert_eq!(decide(&p.table, req("GET", "/good", &[]), &mut rng).unwrap(), "v1.mesh.svc.cluster.local");
    assert_eq!(decide(&p.table, req("GET", "/other", &[]), &mut rng), Err(StatusCode::NOT_FOUND));
}

#[test]
fn a_port_without_routes_goes_to_the_service_itself() {
    let bad = pb::Route { origin: None, ..http_route("x", vec![]) };
    let (svc, problems) = convert(vec![
        port(80, pb::Protocol::Unspecified, vec![]),
        pb::PortRoutes { target_port: 0, ..port(81, pb::Protocol::Tcp, vec![]) },
        port(82, pb::Protocol::Http, vec![bad]),
    ]);
    assert_eq!(problems.len(), 1);
    let mut rng = StdRng::seed_from_u64(1);
    for (n, protocol) in [(80, Protocol::Detect), (81, Protocol::Tcp), (82, Protocol::Http1)] {
        let p = svc.port(n).unwrap();
        assert!(p.default_route);
        assert_eq!(p.protocol, protocol);
        assert_eq!(decide(&p.table, req("GET", "/any", &[]), &mut rng).unwrap(), HOST);
        let Ok(m) = p.table.find(&req("GET", "/", &[])) else { panic!() };
        assert_eq!(m.rule.retry, RetryPolicy::default());
    }
    assert_eq!(svc.port(81).unwrap().target_port, None, "a named targetPort");
    assert_eq!(svc.key(), format!("mesh/{HOST}"));
}

#[test]
fn bad_ports_are_dropped_and_an_invalid_mirror_or_regex_only_disables_itself() {
    let mirror = pb::Filter {
        kind: Some(pb::filter::Kind::RequestMirror(pb::RequestMirror {
            backend: Some(invalid("RefNotPermitted", 1)),
            percent: 100.0,
        })),
    };
    let r = pb::Rule { filters: vec![mirror], ..rule(vec![prefix("/m")], vec![service("v1", 80, 1)]) };
    let regex = rule(
        vec![pb::RouteMatch { path: path(pb::path_match::Type::RegularExpression, "(["), ..Default::default() }],
        vec![service("v1", 80, 1)],
    );
    let (svc, problems) = convert(vec![
        port(0, pb::Protocol::Http, vec![]),
        port(70_000, pb::Protocol::Http, vec![]),
        pb::PortRoutes { target_port: 99_999, ..port(81, pb::Protocol::Http, vec![]) },
        port(80, pb::Protocol::Http, vec![http_route("m", vec![r, regex])]),
    ]);
    let what: Vec<_> = problems.iter().map(|p| (p.port, p.consequence)).collect();
    assert_eq!(
        what,
        [
            (0, Consequence::PortDropped),
            (70_000, Consequence::PortDropped),
            (81, Consequence::PortDropped),
            (80, Consequence::MirrorSkipped),
            (80, Consequence::MatchDisabled),
        ]
    );
    assert_eq!(svc.ports.len(), 1);
    let t = &svc.port(80).unwrap().table;
    assert!(t.routes()[0].rules[0].filters.is_empty());
    let mut rng = StdRng::seed_from_u64(1);
    assert_eq!(decide(t, req("GET", "/m", &[]), &mut rng).unwrap(), "v1.mesh.svc.cluster.local");
}

#[test]
fn consumer_routes_route_only_their_namespaces_clients_instead_of_the_producer_routes() {
    let producer = http_route("producer", vec![rule(vec![prefix("/")], vec![service("v1", 80, 1)])]);
    let mut consumer = http_route("consumer", vec![rule(vec![prefix("/")], vec![service("v2", 80, 1)])]);
    consumer.origin.as_mut().unwrap().namespace = "client".into();
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http, vec![producer, consumer.clone()])]);
    assert!(problems.is_empty(), "{problems:?}");
    let p = svc.port(80).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let routed = |ns: &str, rng: &mut StdRng| {
        let (table, default_route) = p.table_for(ns);
        (decide(table, req("GET", "/x", &[]), rng).unwrap(), default_route)
    };
    assert_eq!(routed("client", &mut rng), ("v2.mesh.svc.cluster.local".into(), false));
    assert_eq!(routed("mesh", &mut rng), ("v1.mesh.svc.cluster.local".into(), false));
    assert_eq!(routed("other", &mut rng), ("v1.mesh.svc.cluster.local".into(), false));

    // A consumer route alone: other clients go to the service itself.
    let (svc, _) = convert(vec![port(80, pb::Protocol::Http, vec![consumer])]);
    let p = svc.port(80).unwrap();
    assert!(p.default_route);
    let (table, default_route) = p.table_for("other");
    assert_eq!((decide(table, req("GET", "/x", &[]), &mut rng).unwrap().as_str(), default_route), (HOST, true));
    assert!(!p.table_for("client").1);
}

fn kind_route(kind: pb::RouteKind, name: &str, rules: Vec<pb::Rule>) -> pb::Route {
    pb::Route { origin: origin(kind, name, 0), hostnames: vec![], rules }
}

#[test]
fn a_virtual_service_keeps_its_rule_order_and_a_traffic_split_converts() {
    // VirtualService `http: [{match: [{uri: {prefix: /}}]}, {match: [{uri: {exact: /a}}]}]`.
    let exact = pb::RouteMatch { path: path(pb::path_match::Type::Exact, "/a"), ..Default::default() };
    let vs = kind_route(
        pb::RouteKind::VirtualService,
        "vs",
        vec![rule(vec![prefix("/")], vec![service("v1", 80, 1)]), rule(vec![exact], vec![service("v2", 80, 1)])],
    );
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http, vec![vs])]);
    assert!(problems.is_empty(), "{problems:?}");
    let t = &svc.port(80).unwrap().table;
    assert_eq!(t.routes()[0].kind, RouteKind::VirtualService);
    let mut rng = StdRng::seed_from_u64(1);
    assert_eq!(decide(t, req("GET", "/a", &[]), &mut rng).unwrap(), "v1.mesh.svc.cluster.local");

    let ts = kind_route(
        pb::RouteKind::TrafficSplit,
        "ts",
        vec![rule(vec![prefix("/")], vec![service("v1", 80, 1), service("v2", 80, 3)])],
    );
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http, vec![ts])]);
    assert!(problems.is_empty(), "{problems:?}");
    let t = &svc.port(80).unwrap().table;
    assert_eq!(t.routes()[0].kind, RouteKind::TrafficSplit);
    let v2 = (0..4_000).filter(|_| decide(t, req("GET", "/x", &[]), &mut rng).unwrap().starts_with("v2.")).count();
    assert!((2_800..3_200).contains(&v2), "{v2} of 4000 for weight 3 of 4");
    // No rule matches on a VirtualService port: 404, as for an HTTPRoute.
    let only_a = kind_route(
        pb::RouteKind::VirtualService,
        "vs",
        vec![rule(
            vec![pb::RouteMatch { path: path(pb::path_match::Type::Exact, "/a"), ..Default::default() }],
            vec![],
        )],
    );
    let (svc, _) = convert(vec![port(80, pb::Protocol::Http, vec![only_a])]);
    assert_eq!(decide(&svc.port(80).unwrap().table, req("GET", "/b", &[]), &mut rng), Err(StatusCode::NOT_FOUND));
}

#[test]
fn an_unspecified_route_kind_is_dropped() {
    let unknown = kind_route(pb::RouteKind::Unspecified, "what", vec![rule(vec![prefix("/")], vec![])]);
    let (_, problems) = convert(vec![port(80, pb::Protocol::Http, vec![unknown])]);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].consequence, Consequence::RouteDropped);
}

#[test]
fn string_prefix_and_ignore_case_convert_and_route() {
    let m = |t: pb::path_match::Type, value: &str, ignore_case| pb::RouteMatch {
        path: Some(pb::PathMatch { r#type: t.into(), value: value.into(), ignore_case }),
        ..Default::default()
    };
    let rewrite = pb::Filter {
        kind: Some(pb::filter::Kind::UrlRewrite(pb::UrlRewrite {
            hostname: String::new(),
            path: Some(pb::PathModifier { kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch("/v2".into())) }),
        })),
    };
    let vs = kind_route(
        pb::RouteKind::VirtualService,
        "vs",
        vec![
            pb::Rule {
                filters: vec![rewrite],
                ..rule(vec![m(pb::path_match::Type::StringPrefix, "/API", true)], vec![service("api", 80, 1)])
            },
            rule(vec![m(pb::path_match::Type::Exact, "/Exact", false)], vec![service("exact", 80, 1)]),
            rule(vec![m(pb::path_match::Type::RegularExpression, "/re/[a-z]+", true)], vec![service("re", 80, 1)]),
        ],
    );
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http, vec![vs])]);
    assert!(problems.is_empty(), "{problems:?}");
    let t = &svc.port(80).unwrap().table;
    let matches: Vec<_> =
        t.routes()[0].rules.iter().map(|r| (r.matches[0].path.clone(), r.matches[0].path_ignore_case)).collect();
    assert_eq!(
        matches,
        [
            (PathMatch::StringPrefix("/API".into()), true),
            (PathMatch::Exact("/Exact".into()), false),
            (PathMatch::RegularExpression("/re/[a-z]+".into()), true),
        ]
    );
    let mut r = req("GET", "/apiX/y?q=1", &[]);
    let Decision::Forward(f) = prepare(t.find(&r).unwrap(), &mut r, 80, &mut StdRng::seed_from_u64(1)) else {
        panic!("reply")
    };
    assert_eq!(f.backend.target.hostname, "api.mesh.svc.cluster.local");
    assert_eq!(r.uri, "/v2X/y?q=1", "exactly the matched string prefix replaced");
    let mut rng = StdRng::seed_from_u64(2);
    assert_eq!(decide(t, req("GET", "/exact", &[]), &mut rng), Err(StatusCode::NOT_FOUND));
    assert_eq!(decide(t, req("GET", "/RE/ABC", &[]), &mut rng).unwrap(), "re.mesh.svc.cluster.local");
}

fn fault_rule(fault: pb::FaultInjection) -> pb::Rule {
    pb::Rule {
        filters: vec![pb::Filter { kind: Some(pb::filter::Kind::Fault(fault)) }],
        ..rule(vec![prefix("/")], vec![service("v1", 80, 1)])
    }
}

/// The FaultInjection a rule with `fault` converts to, or the problem.
fn converted_fault(fault: pb::FaultInjection) -> Result<FaultInjection, String> {
    let vs = kind_route(pb::RouteKind::VirtualService, "vs", vec![fault_rule(fault)]);
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http, vec![vs])]);
    if let Some(p) = problems.first() {
        assert_eq!(p.consequence, Consequence::RouteDropped);
        return Err(p.reason.clone());
    }
    match &svc.port(80).unwrap().table.routes()[0].rules[0].filters[..] {
        [Filter::Fault(f)] => Ok(f.clone()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn fault_injection_converts() {
    let ms = |ms: i32| Some(prost_types::Duration { seconds: 0, nanos: ms * 1_000_000 });
    let full = pb::FaultInjection {
        delay: Some(prost_types::Duration { seconds: 2, nanos: 500_000_000 }),
        delay_percent: 50.0,
        abort_http_status: 503,
        abort_grpc_status: None,
        abort_percent: 12.5,
    };
    assert_eq!(
        converted_fault(full).unwrap(),
        FaultInjection {
            delay: Some(Duration::from_millis(2_500)),
            delay_percent: 50.0,
            abort: Some(Abort::Http(StatusCode::SERVICE_UNAVAILABLE)),
            abort_percent: 12.5,
        }
    );
    // A gRPC status wins over the HTTP one, and survives the wire even when 0 (`optional`).
    let grpc = pb::FaultInjection {
        abort_http_status: 503,
        abort_grpc_status: Some(0),
        abort_percent: 100.0,
        ..Default::default()
    };
    assert_eq!(converted_fault(grpc).unwrap().abort, Some(Abort::Grpc(0)));
    let grpc = pb::FaultInjection { abort_grpc_status: Some(14), abort_percent: 100.0, ..Default::default() };
    assert_eq!(converted_fault(grpc).unwrap().abort, Some(Abort::Grpc(14)));
    // No abort status, no abort; no delay, none; a zero delay is none.
    let delay_only =
        pb::FaultInjection { delay: ms(0), delay_percent: 100.0, abort_percent: 100.0, ..Default::default() };
    let f = converted_fault(delay_only).unwrap();
    assert_eq!((f.delay, f.abort), (None, None));
    // Shares are clamped to 0–100, NaN is none.
    let shares = pb::FaultInjection { delay_percent: 150.0, abort_percent: f64::NAN, ..Default::default() };
    let f = converted_fault(shares).unwrap();
    assert_eq!((f.delay_percent, f.abort_percent), (100.0, 0.0));
    let negative = pb::FaultInjection { delay_percent: -5.0, ..Default::default() };
    assert_eq!(converted_fault(negative).unwrap().delay_percent, 0.0);
    // What Envoy would refuse drops the route.
    let bad_status = pb::FaultInjection { abort_http_status: 700, abort_percent: 100.0, ..Default::default() };
    assert!(converted_fault(bad_status).unwrap_err().contains("fault abort status 700"));
    let informational = pb::FaultInjection { abort_http_status: 100, ..Default::default() };
    assert!(converted_fault(informational).is_err());
    let negative_delay = pb::FaultInjection {
        delay: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
        delay_percent: 100.0,
        ..Default::default()
    };
    assert!(converted_fault(negative_delay).unwrap_err().contains("fault.delay"));
}

#[test]
fn a_converted_abort_answers_without_a_backend() {
    let fault = pb::FaultInjection { abort_http_status: 429, abort_percent: 100.0, ..Default::default() };
    let vs = kind_route(pb::RouteKind::VirtualService, "vs", vec![fault_rule(fault)]);
    let (svc, _) = convert(vec![port(80, pb::Protocol::Http, vec![vs])]);
    let mut rng = StdRng::seed_from_u64(3);
    assert_eq!(
        decide(&svc.port(80).unwrap().table, req("GET", "/", &[]), &mut rng),
        Err(StatusCode::TOO_MANY_REQUESTS)
    );
}

#[test]
fn exact_retry_codes_are_exactly_what_is_retried() {
    let with = |retry: pb::Retry| pb::Rule { retry: Some(retry), ..rule(vec![prefix("/")], vec![]) };
    let only_connect = pb::Retry { attempts: 2, exact_codes: true, ..Default::default() };
    let grpc =
        pb::Retry { attempts: 1, codes: vec![502], grpc_codes: vec![14], exact_codes: true, ..Default::default() };
    let not_exact = pb::Retry { attempts: 1, grpc_codes: vec![4], ..Default::default() };
    let route = http_route("r", vec![with(only_connect), with(grpc), with(not_exact)]);
    let (svc, problems) = convert(vec![port(80, pb::Protocol::Http, vec![route])]);
    assert!(problems.is_empty(), "{problems:?}");
    let rules = &svc.port(80).unwrap().table.routes()[0].rules;
    let (a, b, c) = (&rules[0].retry, &rules[1].retry, &rules[2].retry);
    assert_eq!(
        (a.attempts, a.codes.as_slice(), a.grpc_codes.as_slice(), a.on_connect_failure),
        (2, &[][..], &[][..], true)
    );
    assert_eq!((b.codes.as_slice(), b.grpc_codes.as_slice()), (&[502][..], &[14][..]));
    assert_eq!(c, &RetryPolicy::gateway(Some(1), vec![], None), "grpc_codes only read with exact_codes");
}

#[test]
fn a_tcp_route_keeps_its_weighted_backends_and_one_without_origin_is_dropped() {
    let tcp = pb::TcpRoute {
        origin: origin(pb::RouteKind::VirtualService, "web-tcp", 0),
        rule: 1,
        backends: vec![service("web", 9000, 80), service("web-v2", 9000, 20)],
    };
    let (config, problems) = convert(vec![
        pb::PortRoutes { tcp_route: Some(tcp.clone()), ..port(9000, pb::Protocol::Tcp, vec![]) },
        pb::PortRoutes {
            tcp_route: Some(pb::TcpRoute { origin: None, ..tcp }),
            ..port(9001, pb::Protocol::Tcp, vec![])
        },
    ]);
    let t = config.port(9000).unwrap().tcp.as_ref().expect("the tcp route");
    assert_eq!((t.namespace.as_str(), t.name.as_str(), t.rule), ("mesh", "web-tcp", 1));
    let split: Vec<_> = t
        .backends
        .iter()
        .map(|b| match &b.target {
            BackendTarget::Service(s) => (s.hostname.as_str(), s.port, b.weight),
            BackendTarget::Invalid(why) => panic!("{why}"),
        })
        .collect();
    assert_eq!(split, [("web.mesh.svc.cluster.local", 9000, 80), ("web-v2.mesh.svc.cluster.local", 9000, 20)]);
    assert!(config.port(9001).unwrap().tcp.is_none(), "connections go to the service itself");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].consequence, Consequence::RouteDropped);
}
