use http::{header::CONTENT_TYPE, Request, StatusCode};

use super::*;

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = Request::builder().method(method).uri(uri).header("host", "echo.ns.svc.cluster.local");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn get(uri: &str) -> Parts {
    req("GET", uri, &[])
}

fn path(p: PathMatch) -> Match {
    Match { path: p, ..Match::default() }
}

fn prefix(p: &str) -> Match {
    path(PathMatch::Prefix(p.into()))
}

fn exact(p: &str) -> Match {
    path(PathMatch::Exact(p.into()))
}

fn route(name: &str, created: i64, rules: Vec<Vec<Match>>) -> Route {
    route_ns("ns", name, created, rules)
}

fn route_ns(ns: &str, name: &str, created: i64, rules: Vec<Vec<Match>>) -> Route {
    Route {
        kind: RouteKind::Http,
        namespace: ns.into(),
        name: name.into(),
        created,
        hostnames: Vec::new(),
        rules: rules.into_iter().map(|matches| Rule { matches, ..Rule::default() }).collect(),
    }
}

fn table(routes: Vec<Route>) -> RouteTable {
    let (table, errors) = RouteTable::build(routes);
    assert_eq!(errors, vec![]);
    table
}

/// `namespace/name#rule` of the rule `req` takes, or the reply status.
fn pick(t: &RouteTable, req: &Parts) -> String {
    match t.find(req) {
        Ok(m) => format!("{}/{}#{}", m.route.namespace, m.route.name, m.rule_index),
        Err(no) => no.reply().status.to_string(),
    }
}

#[test]
fn exact_path_beats_prefix_across_routes() {
    let t = table(vec![route("prefix", 1, vec![vec![prefix("/foo")]]), route("exact", 2, vec![vec![exact("/foo")]])]);
    assert_eq!(pick(&t, &get("/foo")), "ns/exact#0");
    assert_eq!(pick(&t, &get("/foo/bar")), "ns/prefix#0");
}

#[test]
fn longer_prefix_beats_shorter_across_routes() {
    let t = table(vec![route("short", 1, vec![vec![prefix("/")]]), route("long", 2, vec![vec![prefix("/api/v1")]])]);
    assert_eq!(pick(&t, &get("/api/v1/users")), "ns/long#0");
    assert_eq!(pick(&t, &get("/api/v2")), "ns/short#0");
}

#[test]
fn prefix_matches_whole_segments_only() {
    let t = table(vec![route("r", 1, vec![vec![prefix("/foo")]])]);
    assert_eq!(pick(&t, &get("/foo")), "ns/r#0");
    assert_eq!(pick(&t, &get("/foo/")), "ns/r#0");
    assert_eq!(pick(&t, &get("/foo/bar")), "ns/r#0");
    assert_eq!(pick(&t, &get("/foobar")), "404 Not Found");
}

#[test]
fn prefix_trailing_slash_is_ignored() {
    let t = table(vec![route("r", 1, vec![vec![prefix("/foo/")]])]);
    assert_eq!(pick(&t, &get("/foo")), "ns/r#0");
    assert_eq!(pick(&t, &get("/foo/bar")), "ns/r#0");
    assert_eq!(pick(&t, &get("/foobar")), "404 Not Found");
    assert_eq!(t.find(&get("/foo/bar")).unwrap().matched_prefix, Some("/foo"));
}

#[test]
fn older_route_wins_a_tie() {
    let t = table(vec![route("a", 20, vec![vec![prefix("/")]]), route("b", 10, vec![vec![prefix("/")]])]);
    assert_eq!(pick(&t, &get("/x")), "ns/b#0");
}

#[test]
fn alphabetical_namespace_name_breaks_an_age_tie() {
    let t = table(vec![
        route_ns("zz", "a", 10, vec![vec![prefix("/")]]),
        route_ns("aa", "b", 10, vec![vec![prefix("/")]]),
        route_ns("aa", "a", 10, vec![vec![prefix("/")]]),
    ]);
    assert_eq!(pick(&t, &get("/x")), "aa/a#0");
}

#[test]
fn first_rule_wins_inside_a_route() {
    let t = table(vec![route("r", 1, vec![vec![prefix("/")], vec![prefix("/")]])]);
    assert_eq!(pick(&t, &get("/x")), "ns/r#0");
}

#[test]
fn more_specific_rule_wins_over_rule_order() {
    let t = table(vec![route("r", 1, vec![vec![prefix("/")], vec![prefix("/a")]])]);
    assert_eq!(pick(&t, &get("/a/b")), "ns/r#1");
}

#[test]
fn empty_match_list_is_prefix_slash() {
    let t = table(vec![route("r", 1, vec![vec![]])]);
    assert_eq!(pick(&t, &get("/anything")), "ns/r#0");
    assert_eq!(t.find(&get("/x")).unwrap().matched_prefix, Some(""));
}

#[test]
fn method_match_and_its_precedence() {
    let post = Match { method: Some(Method::POST), ..prefix("/") };
    let t = table(vec![route("any", 1, vec![vec![prefix("/")]]), route("post", 2, vec![vec![post]])]);
    assert_eq!(pick(&t, &req("POST", "/x", &[])), "ns/post#0");
    assert_eq!(pick(&t, &get("/x")), "ns/any#0");
}

#[test]
fn prefix_length_outranks_method() {
    let post = Match { method: Some(Method::POST), ..prefix("/") };
    let t = table(vec![route("post", 1, vec![vec![post]]), route("long", 2, vec![vec![prefix("/a")]])]);
    assert_eq!(pick(&t, &req("POST", "/a", &[])), "ns/long#0");
}

fn header(name: &'static str, value: ValueMatch) -> HeaderMatch {
    HeaderMatch { name: HeaderName::from_static(name), value }
}

#[test]
fn header_exact_names_case_insensitive_values_exact() {
    let m = Match { headers: vec![header("x-version", ValueMatch::Exact("v2".into()))], ..prefix("/") };
    let t = table(vec![route("r", 1, vec![vec![m]])]);
    assert_eq!(pick(&t, &req("GET", "/", &[("X-Version", "v2")])), "ns/r#0");
    assert_eq!(pick(&t, &req("GET", "/", &[("x-version", "V2")])), "404 Not Found");
    assert_eq!(pick(&t, &get("/")), "404 Not Found");
}

#[test]
fn header_regex_must_match_the_whole_value() {
    let m =
        Match { headers: vec![header("x-user", ValueMatch::RegularExpression("user-[0-9]+".into()))], ..prefix("/") };
    let t = table(vec![route("r", 1, vec![vec![m]])]);
    assert_eq!(pick(&t, &req("GET", "/", &[("x-user", "user-42")])), "ns/r#0");
    assert_eq!(pick(&t, &req("GET", "/", &[("x-user", "user-42x")])), "404 Not Found");
}

#[test]
fn more_header_matches_win() {
    let one = Match { headers: vec![header("a", ValueMatch::Exact("1".into()))], ..prefix("/") };
    let two = Match {
        headers: vec![header("a", ValueMatch::Exact("1".into())), header("b", ValueMatch::Exact("2".into()))],
        ..prefix("/")
    };
    let t = table(vec![route("one", 1, vec![vec![one]]), route("two", 2, vec![vec![two]])]);
    assert_eq!(pick(&t, &req("GET", "/", &[("a", "1"), ("b", "2")])), "ns/two#0");
    assert_eq!(pick(&t, &req("GET", "/", &[("a", "1")])), "ns/one#0");
}

#[test]
fn repeated_request_header_matches_as_joined_list() {
    let m = Match { headers: vec![header("x", ValueMatch::Exact("a,b".into()))], ..prefix("/") };
    let t = table(vec![route("r", 1, vec![vec![m]])]);
    assert_eq!(pick(&t, &req("GET", "/", &[("x", "a"), ("x", "b")])), "ns/r#0");
}

fn query(name: &str, value: ValueMatch) -> QueryMatch {
    QueryMatch { name: name.into(), value }
}

#[test]
fn query_param_exact_and_regex() {
    let exact_q = Match { query: vec![query("animal", ValueMatch::Exact("whale".into()))], ..prefix("/") };
    let regex_q = Match { query: vec![query("id", ValueMatch::RegularExpression("[a-f]+".into()))], ..prefix("/") };
    let t = table(vec![route("exact", 1, vec![vec![exact_q]]), route("regex", 2, vec![vec![regex_q]])]);
    assert_eq!(pick(&t, &get("/?x=1&animal=whale")), "ns/exact#0");
    assert_eq!(pick(&t, &get("/?animal=dolphin")), "404 Not Found");
    assert_eq!(pick(&t, &get("/?id=beef")), "ns/regex#0");
    assert_eq!(pick(&t, &get("/?id=beefy")), "404 Not Found");
}

#[test]
fn query_param_first_occurrence_and_percent_decoding() {
    let m = Match { query: vec![query("q", ValueMatch::Exact("a b".into()))], ..prefix("/") };
    let t = table(vec![route("r", 1, vec![vec![m]])]);
    assert_eq!(pick(&t, &get("/?q=a%20b&q=c")), "ns/r#0");
    assert_eq!(pick(&t, &get("/?q=c&q=a%20b")), "404 Not Found");
    assert_eq!(pick(&t, &get("/?%71=a%20b")), "ns/r#0", "%71 is q");
}

#[test]
fn more_query_matches_win() {
    let one = Match { query: vec![query("a", ValueMatch::Exact("1".into()))], ..prefix("/") };
    let two = Match {
        query: vec![query("a", ValueMatch::Exact("1".into())), query("b", ValueMatch::Exact("2".into()))],
        ..prefix("/")
    };
    let t = table(vec![route("one", 1, vec![vec![one]]), route("two", 2, vec![vec![two]])]);
    assert_eq!(pick(&t, &get("/?a=1&b=2")), "ns/two#0");
}

#[test]
fn regex_path_matches_whole_path_and_ranks_below_prefix() {
    let re = path(PathMatch::RegularExpression("/api/[0-9]+".into()));
    let t = table(vec![route("re", 1, vec![vec![re]]), route("prefix", 2, vec![vec![prefix("/api")]])]);
    assert_eq!(pick(&t, &get("/api/12")), "ns/prefix#0");
    let t = table(vec![route("re", 1, vec![vec![path(PathMatch::RegularExpression("/api/[0-9]+".into()))]])]);
    assert_eq!(pick(&t, &get("/api/12")), "ns/re#0");
    assert_eq!(pick(&t, &get("/api/12/x")), "404 Not Found");
    assert_eq!(t.find(&get("/api/12")).unwrap().matched_prefix, None);
}

#[test]
fn invalid_regex_is_reported_and_never_matches() {
    let bad = path(PathMatch::RegularExpression("/(".into()));
    let (t, errors) = RouteTable::build(vec![route("bad", 1, vec![vec![bad], vec![prefix("/ok")]])]);
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0].route.as_str(), errors[0].rule, errors[0].matched), ("ns/bad", 0, 0));
    assert_eq!(pick(&t, &get("/(")), "404 Not Found");
    assert_eq!(pick(&t, &get("/ok")), "ns/bad#1");
}

#[test]
fn grpc_service_method_as_exact_path() {
    let mut r = route("grpc", 1, vec![vec![exact("/pkg.Echo/Say")]]);
    r.kind = RouteKind::Grpc;
    let t = table(vec![r]);
    assert_eq!(pick(&t, &req("POST", "/pkg.Echo/Say", &[])), "ns/grpc#0");
}

#[test]
fn unroutable_grpc_gets_unimplemented_in_trailers_only_form() {
    let mut r = route("grpc", 1, vec![vec![exact("/pkg.Echo/Say")]]);
    r.kind = RouteKind::Grpc;
    let t = table(vec![r]);
    let reply = t.find(&req("POST", "/pkg.Echo/Other", &[])).unwrap_err().reply();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["grpc-status"], "12");
    assert_eq!(reply.headers[CONTENT_TYPE], "application/grpc");
}

#[test]
fn unroutable_grpc_request_on_http_routes_gets_grpc_status() {
    let t = table(vec![route("http", 1, vec![vec![exact("/a")]])]);
    let reply =
        t.find(&req("POST", "/pkg.Echo/Say", &[("content-type", "application/grpc+proto")])).unwrap_err().reply();
    assert_eq!(reply.headers["grpc-status"], "12");
    assert_eq!(t.find(&get("/b")).unwrap_err(), NoRoute::Http);
}

#[test]
fn route_hostnames_restrict_the_host() {
    let mut r = route("r", 1, vec![vec![prefix("/")]]);
    r.hostnames = vec!["*.svc.cluster.local".into()];
    let t = table(vec![r]);
    assert_eq!(pick(&t, &get("/")), "ns/r#0");
    let other = Request::get("/").header("host", "example.com:80").body(()).unwrap().into_parts().0;
    assert_eq!(pick(&t, &other), "404 Not Found");
}

#[test]
fn no_routes_is_404_and_to_service_routes_everything() {
    assert_eq!(pick(&table(vec![]), &get("/")), "404 Not Found");
    let target =
        ServiceTarget { hostname: "echo.ns.svc.cluster.local".into(), namespace: "ns".into(), port: 80, policy: None };
    let t = RouteTable::to_service(target.clone());
    let m = t.find(&get("/any/path")).unwrap();
    assert_eq!(m.rule.backends[0].target, BackendTarget::Service(target));
    assert_eq!(m.rule.retry, RetryPolicy::default());
}

#[test]
fn method_outranks_header_count() {
    let method = Match { method: Some(Method::GET), ..prefix("/") };
    let headers = Match { headers: vec![header("a", ValueMatch::Exact("1".into()))], ..prefix("/") };
    let t = table(vec![route("headers", 1, vec![vec![headers]]), route("method", 2, vec![vec![method]])]);
    assert_eq!(pick(&t, &req("GET", "/", &[("a", "1")])), "ns/method#0");
}

#[test]
fn header_count_outranks_query_count() {
    let headers = Match { headers: vec![header("a", ValueMatch::Exact("1".into()))], ..prefix("/") };
    let query = Match {
        query: vec![query("b", ValueMatch::Exact("2".into())), query("c", ValueMatch::Exact("3".into()))],
        ..prefix("/")
    };
    let t = table(vec![route("query", 1, vec![vec![query]]), route("headers", 2, vec![vec![headers]])]);
    assert_eq!(pick(&t, &req("GET", "/?b=2&c=3", &[("a", "1")])), "ns/headers#0");
}

#[test]
fn table_can_be_shared_across_tasks() {
    fn shared<T: Send + Sync>() {}
    shared::<RouteTable>();
}

#[test]
fn invalid_header_and_query_regexes_are_reported() {
    let m = Match {
        headers: vec![header("x", ValueMatch::RegularExpression("[".into()))],
        query: vec![query("q", ValueMatch::RegularExpression("(".into()))],
        ..prefix("/")
    };
    let (t, errors) = RouteTable::build(vec![route("bad", 1, vec![vec![m]])]);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].to_string().starts_with("route ns/bad rule 0 match 0: invalid header regular expression"));
    assert_eq!(pick(&t, &req("GET", "/?q=(", &[("x", "[")])), "404 Not Found");
}

fn ordered(kind: RouteKind, name: &str, created: i64, rules: Vec<Vec<Match>>) -> Route {
    Route { kind, ..route(name, created, rules) }
}

#[test]
fn virtual_service_rule_order_beats_gateway_api_precedence() {
    let rules = || vec![vec![prefix("/")], vec![exact("/a")]];
    let vs = table(vec![ordered(RouteKind::VirtualService, "vs", 1, rules())]);
    assert_eq!(pick(&vs, &get("/a")), "ns/vs#0", "the first rule written wins");
    // The same rules in an HTTPRoute: the exact match wins by precedence.
    let http = table(vec![route("http", 1, rules())]);
    assert_eq!(pick(&http, &get("/a")), "ns/http#1");
    // A later rule still takes what the earlier ones do not match.
    let vs = table(vec![ordered(RouteKind::VirtualService, "vs", 1, vec![vec![exact("/a")], vec![prefix("/b")]])]);
    assert_eq!(pick(&vs, &get("/b/c")), "ns/vs#1");
}

#[test]
fn virtual_service_matches_keep_their_order_within_a_rule() {
    let m = Match { method: Some(Method::GET), ..exact("/a") };
    let vs = table(vec![ordered(RouteKind::VirtualService, "vs", 1, vec![vec![prefix("/"), m]])]);
    let found = vs.find(&get("/a")).unwrap();
    assert_eq!((found.rule_index, found.matched_prefix), (0, Some("")), "the prefix match, written first");
}

#[test]
fn traffic_split_is_ordered_too() {
    let ts = table(vec![ordered(RouteKind::TrafficSplit, "ts", 1, vec![vec![prefix("/")], vec![exact("/a")]])]);
    assert_eq!(pick(&ts, &get("/a")), "ns/ts#0");
}

#[test]
fn ordered_routes_keep_the_route_order_given_whatever_age_or_name() {
    let t = table(vec![
        ordered(RouteKind::VirtualService, "z-young", 20, vec![vec![prefix("/")]]),
        ordered(RouteKind::VirtualService, "a-old", 10, vec![vec![exact("/a")]]),
    ]);
    assert_eq!(pick(&t, &get("/a")), "ns/z-young#0");
}

#[test]
fn mixed_kinds_put_every_gateway_api_entry_before_the_ordered_ones() {
    let t = table(vec![
        ordered(RouteKind::VirtualService, "vs", 1, vec![vec![exact("/api/x")], vec![prefix("/")]]),
        route("http", 2, vec![vec![prefix("/api")]]),
    ]);
    assert_eq!(pick(&t, &get("/api/x")), "ns/http#0", "Gateway API first, even over a longer exact match");
    assert_eq!(pick(&t, &get("/other")), "ns/vs#1");
    // The sort is total and stable whatever order the entries come in.
    let reversed = table(vec![
        route("http", 2, vec![vec![prefix("/api")]]),
        ordered(RouteKind::VirtualService, "vs", 1, vec![vec![exact("/api/x")], vec![prefix("/")]]),
    ]);
    assert_eq!(pick(&reversed, &get("/api/x")), "ns/http#0");
    assert_eq!(pick(&reversed, &get("/other")), "ns/vs#1");
}

#[test]
fn unroutable_on_an_ordered_port_is_404_or_a_grpc_status() {
    let t = table(vec![ordered(RouteKind::VirtualService, "vs", 1, vec![vec![exact("/a")]])]);
    assert_eq!(t.find(&get("/b")).unwrap_err(), NoRoute::Http);
    assert_eq!(pick(&t, &get("/b")), "404 Not Found");
    let grpc = req("POST", "/pkg.Echo/Say", &[("content-type", "application/grpc")]);
    assert_eq!(t.find(&grpc).unwrap_err(), NoRoute::Grpc);
}

fn string_prefix(p: &str) -> Match {
    path(PathMatch::StringPrefix(p.into()))
}

fn ignoring_case(m: Match) -> Match {
    Match { path_ignore_case: true, ..m }
}

#[test]
fn string_prefix_matches_any_continuation() {
    let t = table(vec![ordered(RouteKind::VirtualService, "vs", 1, vec![vec![string_prefix("/api")]])]);
    for p in ["/api", "/apiX", "/api/x", "/api-v2/y"] {
        assert_eq!(pick(&t, &get(p)), "ns/vs#0", "{p}");
    }
    assert_eq!(pick(&t, &get("/ap")), "404 Not Found");
    assert_eq!(pick(&t, &get("/API")), "404 Not Found", "case-sensitive by default");
    let found = t.find(&get("/apiX")).unwrap();
    assert_eq!((found.matched_prefix, found.string_prefix), (Some("/api"), true));
    // A trailing slash is part of it (unlike a PathPrefix).
    let t = table(vec![route("r", 1, vec![vec![string_prefix("/api/")]])]);
    assert_eq!(pick(&t, &get("/api")), "404 Not Found");
    assert_eq!(t.find(&get("/api/x")).unwrap().matched_prefix, Some("/api/"));
    assert!(!table(vec![route("r", 1, vec![vec![prefix("/api")]])]).find(&get("/api")).unwrap().string_prefix);
}

#[test]
fn string_prefix_ranks_as_a_path_prefix_of_its_length() {
    let t = table(vec![
        route("segment", 1, vec![vec![prefix("/api")]]),
        route("string", 2, vec![vec![string_prefix("/api/v")]]),
        route("exact", 3, vec![vec![exact("/api/v1")]]),
    ]);
    assert_eq!(pick(&t, &get("/api/v2")), "ns/string#0", "longer");
    assert_eq!(pick(&t, &get("/api/v1")), "ns/exact#0");
    assert_eq!(pick(&t, &get("/api/x")), "ns/segment#0");
    // Equal length: the older route wins, as between two PathPrefixes.
    let t =
        table(vec![route("string", 2, vec![vec![string_prefix("/api")]]), route("old", 1, vec![vec![prefix("/api")]])]);
    assert_eq!(pick(&t, &get("/api/x")), "ns/old#0");
}

#[test]
fn ignore_case_exact_prefix_and_string_prefix() {
    let t = table(vec![ordered(
        RouteKind::VirtualService,
        "vs",
        1,
        vec![
            vec![ignoring_case(exact("/Exact"))],
            vec![ignoring_case(prefix("/Seg"))],
            vec![ignoring_case(string_prefix("/Str"))],
        ],
    )]);
    assert_eq!(pick(&t, &get("/eXACT")), "ns/vs#0");
    assert_eq!(pick(&t, &get("/eXACT/more")), "404 Not Found");
    assert_eq!(pick(&t, &get("/SEG/x")), "ns/vs#1");
    assert_eq!(pick(&t, &get("/seg")), "ns/vs#1");
    assert_eq!(pick(&t, &get("/segx")), "404 Not Found", "still whole segments");
    assert_eq!(pick(&t, &get("/STRING")), "ns/vs#2");
    let found = t.find(&get("/seg/x")).unwrap();
    assert_eq!(found.matched_prefix, Some("/Seg"), "the configured prefix, for ReplacePrefixMatch");
    // Without the flag, case matters.
    let t = table(vec![route("r", 1, vec![vec![exact("/Exact")], vec![prefix("/Seg")], vec![string_prefix("/Str")]])]);
    for p in ["/eXACT", "/SEG/x", "/STRING"] {
        assert_eq!(pick(&t, &get(p)), "404 Not Found", "{p}");
    }
}

#[test]
fn ignore_case_regex() {
    let re = || path(PathMatch::RegularExpression("/v[0-9]+/Items".into()));
    let t = table(vec![route("r", 1, vec![vec![ignoring_case(re())]])]);
    assert_eq!(pick(&t, &get("/V1/items")), "ns/r#0");
    assert_eq!(pick(&t, &get("/V1/items/x")), "404 Not Found", "still the whole path");
    let t = table(vec![route("r", 1, vec![vec![re()]])]);
    assert_eq!(pick(&t, &get("/V1/items")), "404 Not Found");
    assert_eq!(pick(&t, &get("/v1/Items")), "ns/r#0");
    // An alternation stays anchored as a whole when case is ignored.
    let t = table(vec![route("r", 1, vec![vec![ignoring_case(path(PathMatch::RegularExpression("/a|/b".into())))]])]);
    assert_eq!(pick(&t, &get("/B")), "ns/r#0");
    assert_eq!(pick(&t, &get("/Ax")), "404 Not Found");
}
