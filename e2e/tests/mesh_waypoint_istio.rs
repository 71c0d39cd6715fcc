//! End-to-end tests of the routing APIs users bring from other meshes, in the waypoint lab ([`WaypointLab`]: the real
//! controller in file mode, ztunnels, `ambit-waypoint`, HBONE with mutual TLS, HTTP echo servers `echo-v1` behind the
//! service `echo` and `echo-v2` behind `echo-v2`): Istio `VirtualService`s written as Istio's documentation writes
//! them (a 90/10 split with retries and timeouts, header and URI-prefix matches, fault injection) and an SMI
//! `TrafficSplit`, applied to the service `echo`, which uses the waypoint. Splits are measured over 2,000 requests
//! and must land within 2.5 percentage points of the weight (more than 3.7 standard deviations of a fair draw); a
//! VirtualService `tcp[]` split of `echo`'s TCP port over 600 connections, within 5 points; a VirtualService mirror
//! to a backend that never answers.
//! Needs root; fails (not skips) under CI.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ambit_e2e::check::TIMEOUT;
use ambit_e2e::http::{HttpConnection, Request};
use ambit_e2e::http_server::EchoReply;
use ambit_e2e::sink::Sink;
use ambit_e2e::waypoint_lab::{WaypointLab, ECHO_HOST, ECHO_VIP, TCP_PORT};

/// Requests a split is measured over.
const SPLIT_REQUESTS: usize = 2_000;
/// How far the measured share may be from the weight, in percentage points.
const SPLIT_TOLERANCE: f64 = 2.5;

/// Istio's canary example on `echo`: 90 % to `echo`, 10 % to `echo-v2`, two retries of at most 1 s each, 3 s overall.
const CANARY: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - route:
    - destination: {host: echo}
      weight: 90
    - destination: {host: echo-v2}
      weight: 10
    retries:
      attempts: 2
      perTryTimeout: 1s
    timeout: 3s
"#;

/// Matches: a header to `echo-v2`, URI prefixes to one service each, everything else to `echo`.
const MATCHES: &str = r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo.default.svc.cluster.local]
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination: {host: echo-v2}
  - match:
    - uri: {prefix: /api/users}
    route:
    - destination: {host: echo-v2}
  - match:
    - uri: {prefix: /api/orders}
    rewrite: {uri: /orders}
    route:
    - destination: {host: echo}
  - route:
    - destination: {host: echo}
"#;

/// SMI's canary: the apex `echo` split 90/10 between `echo` and `echo-v2`.
const TRAFFIC_SPLIT: &str = r#"apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: echo-split, namespace: default}
spec:
  service: echo
  backends:
  - {service: echo, weight: 90}
  - {service: echo-v2, weight: 10}
"#;

/// Sends `n` GETs of `path` to `echo` from the client on one kept-alive connection; per request, which server
/// answered (`"waypoint"` when none did) and the status.
fn served_by(l: &WaypointLab, path: &str, n: usize, headers: &[(&str, &str)]) -> Vec<(String, u16)> {
    answers(l, (ECHO_VIP, ECHO_HOST), path, n, headers)
}

/// [`served_by`] for the service at `vip` with hostname `host`.
fn answers(
    l: &WaypointLab,
    (vip, host): (Ipv4Addr, &str),
    path: &str,
    n: usize,
    headers: &[(&str, &str)],
) -> Vec<(String, u16)> {
    let mut conn = HttpConnection::connect(l.ns(l.client), SocketAddr::from((vip, 80)), TIMEOUT).expect("connect");
    (0..n)
        .map(|_| {
            let req = headers.iter().fold(Request::get(host, path), |r, (k, v)| r.header(k, v));
            let r = conn.send(&req).expect("a response");
            (r.header("x-served-by").unwrap_or("waypoint").to_owned(), r.status)
        })
        .collect()
}

/// Asserts that `server`'s share of `answers` is `percent` within [`SPLIT_TOLERANCE`]; returns the share.
fn assert_share(answers: &[(String, u16)], server: &str, percent: f64) -> f64 {
    assert!(answers.iter().all(|(_, s)| *s == 200), "every request answered 200");
    let share = 100.0 * answers.iter().filter(|(s, _)| s == server).count() as f64 / answers.len() as f64;
    assert!(
        (share - percent).abs() <= SPLIT_TOLERANCE,
        "{server} got {share:.1} %, want {percent} ± {SPLIT_TOLERANCE}"
    );
    share
}

#[test]
fn istio_virtual_services_split_retry_time_out_and_match() {
    let Some(l) = WaypointLab::start("wp-istio-vs") else { return };
    let controller = l.mesh.controller().unwrap();
    l.until_served_by(l.client, "/ready", &[], "echo-v1");

    controller.write("vs.yaml", CANARY).unwrap();
    l.until_served_by(l.client, "/canary-arrived", &[], "echo-v2");
    let share = assert_share(&served_by(&l, "/split", SPLIT_REQUESTS, &[]), "echo-v2", 10.0);
    eprintln!("VirtualService 90/10: echo-v2 got {share:.2} % of {SPLIT_REQUESTS} requests");

    // A failing backend is retried twice (three attempts, over both destinations), then its 503 goes back.
    let attempts = |path: &str| {
        let count = |reqs: Vec<ambit_e2e::http_server::SeenRequest>| reqs.iter().filter(|q| q.path == path).count();
        count(l.v1.requests()) + count(l.v2.requests())
    };
    let r = l.get("/status/503/retried", &[]).expect("GET /status/503");
    assert_eq!((r.status, attempts("/status/503/retried")), (503, 3), "{r:?}");
    // A hanging backend is cut at 1 s: 504. Istio's default `retryOn` does not retry a per-try timeout.
    let hang = |path: &str| {
        let started = Instant::now();
        let r = l.get(path, &[]).expect("GET /delay/10000");
        assert_eq!(r.status, 504, "{r:?}");
        (started.elapsed(), attempts(path))
    };
    let (took, tries) = hang("/delay/10000/hang");
    assert_eq!(tries, 1, "a per-try timeout is not retried without retryOn");
    assert!(took < Duration::from_millis(2_500), "the per-try timeout did not cut the request: {took:?}");
    // With `retryOn: gateway-error` it is (Envoy), until the 3 s timeout ends the request.
    controller
        .write("vs.yaml", &CANARY.replace("perTryTimeout: 1s", "perTryTimeout: 1s\n      retryOn: gateway-error"))
        .unwrap();
    l.until("the retryOn change", || match hang("/delay/10000/retry-on") {
        (took, tries) if tries >= 2 => Ok(took),
        other => Err(format!("{other:?}")),
    });
    let (took, tries) = hang("/delay/10000/overall");
    assert!(tries >= 2, "{tries} attempts");
    assert!(took >= Duration::from_millis(2_900) && took < Duration::from_millis(6_000), "the 3 s timeout: {took:?}");

    controller.write("vs.yaml", MATCHES).unwrap();
    l.until_served_by(l.client, "/api/users/1", &[], "echo-v2");
    let (_, echo) = l.until_served_by(l.client, "/anything", &[("end-user", "jason")], "echo-v2");
    assert_eq!(echo.path, "/anything");
    let (_, echo) = l.until_served_by(l.client, "/api/orders/7", &[], "echo-v1");
    assert_eq!(echo.path, "/orders/7", "rewrite.uri replaces the matched prefix");
    let (_, echo) = l.until_served_by(l.client, "/api/usersX", &[], "echo-v2");
    assert_eq!(echo.path, "/api/usersX", "an Istio uri prefix is a plain string prefix");
    let others = served_by(&l, "/other", 50, &[("end-user", "mary")]);
    assert!(others.iter().all(|(s, c)| s == "echo-v1" && *c == 200), "{others:?}");

    controller.remove("vs.yaml").unwrap();
    l.until_served_by(l.client, "/api/users/2", &[], "echo-v1");
}

#[test]
fn an_smi_traffic_split_splits_the_apex_service() {
    let Some(l) = WaypointLab::start("wp-smi-split") else { return };
    let controller = l.mesh.controller().unwrap();
    l.until_served_by(l.client, "/ready", &[], "echo-v1");

    controller.write("split.yaml", TRAFFIC_SPLIT).unwrap();
    l.until_served_by(l.client, "/split-arrived", &[], "echo-v2");
    let share = assert_share(&served_by(&l, "/split", SPLIT_REQUESTS, &[]), "echo-v2", 10.0);
    eprintln!("TrafficSplit 90/10: echo-v2 got {share:.2} % of {SPLIT_REQUESTS} requests");
    let echo = EchoReply::parse(&l.get("/host", &[]).unwrap().body).unwrap();
    assert_eq!(echo.host, ECHO_HOST, "the Host header is the client's");

    // A VirtualService on the same service takes precedence over the split.
    controller.write("vs.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: only-v1, namespace: default}\nspec: {hosts: [echo], http: [{route: [{destination: {host: echo}}]}]}\n").unwrap();
    l.until("the VirtualService replaces the split", || {
        let answers = served_by(&l, "/vs-wins", 100, &[]);
        match answers.iter().filter(|(s, _)| s == "echo-v2").count() {
            0 => Ok(()),
            n => Err(format!("{n} of 100 still went to echo-v2")),
        }
    });
}

/// Istio's fault-injection example on `echo`: a 2 s delay for half the requests, a 503 abort for a tenth.
const FAULTS: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-faults, namespace: default}
spec:
  hosts: [echo]
  http:
  - match: [{uri: {prefix: /fault}}]
    fault:
      delay:
        percentage: {value: 50}
        fixedDelay: 2s
      abort:
        percentage: {value: 10}
        httpStatus: 503
    route: [{destination: {host: echo}}]
  - route: [{destination: {host: echo}}]
    headers: {response: {set: {x-vs: echo-faults}}}
"#;

/// Requests the fault shares are measured over (each delayed one takes 2 s, so they go 20 at a time).
const FAULT_REQUESTS: usize = 200;

#[test]
fn injected_delays_and_aborts_hit_their_share_of_requests() {
    let Some(l) = WaypointLab::start("wp-istio-fault") else { return };
    let controller = l.mesh.controller().unwrap();
    l.until_served_by(l.client, "/ready", &[], "echo-v1");
    controller.write("vs.yaml", FAULTS).unwrap();
    l.until("the VirtualService", || match l.get("/arrived", &[]) {
        Ok(r) if r.header("x-vs") == Some("echo-faults") => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let before = l.v1.requests().len();
    // Per request: (took at least the delay, aborted by the waypoint).
    let outcomes: Vec<(bool, bool)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..20)
            .map(|w| {
                let l = &l;
                s.spawn(move || {
                    let mut conn = HttpConnection::connect(l.ns(l.client), SocketAddr::from((ECHO_VIP, 80)), TIMEOUT)
                        .expect("connect");
                    (0..FAULT_REQUESTS / 20)
                        .map(|i| {
                            let started = Instant::now();
                            let r =
                                conn.send(&Request::get(ECHO_HOST, &format!("/fault/{w}/{i}"))).expect("a response");
                            let aborted = r.status == 503 && r.body == "fault filter abort";
                            assert!(aborted || r.status == 200, "{r:?}");
                            (started.elapsed() >= Duration::from_secs(2), aborted)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a worker")).collect()
    });
    let share =
        |f: fn(&(bool, bool)) -> bool| 100.0 * outcomes.iter().filter(|o| f(o)).count() as f64 / FAULT_REQUESTS as f64;
    let (delayed, aborted) = (share(|o| o.0), share(|o| o.1));
    eprintln!(
        "faults over {FAULT_REQUESTS} requests: {delayed:.1} % delayed 2 s (want 50), {aborted:.1} % aborted (want 10)"
    );
    // 3.5 standard deviations of a fair draw over 200 requests.
    assert!((delayed - 50.0).abs() <= 12.5, "{delayed} % delayed");
    assert!((aborted - 10.0).abs() <= 7.5, "{aborted} % aborted");
    let reached = l.v1.requests().len() - before;
    let answered = outcomes.iter().filter(|o| !o.1).count();
    assert_eq!(reached, answered, "an aborted request reached the backend");
    let m = l.waypoint.metrics().unwrap();
    let flagged =
        ambit_e2e::check::metric(&m, "istio_requests_total", &[("response_flags", "FI"), ("response_code", "503")]);
    assert!(flagged >= 1.0, "aborts are not counted with flag FI:\n{m}");
}

/// `sink`: a Service of the `echo-v2` pod whose port answers nothing ([`Sink`]); a VirtualService routing `echo`
/// to itself and mirroring half of the requests under `/mirror/` to `sink`.
const MIRROR: &str = r#"apiVersion: v1
kind: Service
metadata: {name: sink, namespace: default}
spec:
  clusterIP: 10.96.0.33
  selector: {app: echo-v2}
  ports: [{name: http, port: 80, targetPort: 9090}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-mirror, namespace: default}
spec:
  hosts: [echo]
  http:
  - match: [{uri: {prefix: /mirror/}}]
    route: [{destination: {host: echo}}]
    mirror: {host: sink}
    mirrorPercentage: {value: 50}
    headers: {response: {set: {x-vs: echo-mirror}}}
"#;

/// Requests the mirror share is measured over.
const MIRROR_REQUESTS: usize = 240;
/// The waypoint's `--max-mirror-requests` in that test: fewer than the copies it will be asked for (about 120).
const MAX_MIRRORS: usize = 80;

#[test]
fn a_virtual_service_mirrors_its_share_the_caller_never_waits_and_hung_copies_are_bounded() {
    let max = MAX_MIRRORS.to_string();
    let Some(l) = WaypointLab::start_with_flags("wp-istio-mirror", &[], &["--max-mirror-requests", &max]) else {
        return;
    };
    let sink = Sink::start(l.ns(l.servers[1]), SocketAddr::from(([0, 0, 0, 0], 9090))).expect("the sink");
    let controller = l.mesh.controller().unwrap();
    l.until_served_by(l.client, "/ready", &[], "echo-v1");
    controller.write("mirror.yaml", MIRROR).unwrap();
    l.until("the VirtualService and a first copy", || match l.get("/mirror/warm-up", &[]) {
        Ok(r) if r.header("x-vs") == Some("echo-mirror") && !sink.requests().is_empty() => Ok(()),
        other => Err(format!("{other:?}, the sink saw {:?}", sink.requests())),
    });
    // Each copy hangs (30 s, the mirror's bound), so every one holds its place until the test ends.
    let warm_up = sink.requests().len();
    let mut conn = HttpConnection::connect(l.ns(l.client), SocketAddr::from((ECHO_VIP, 80)), TIMEOUT).expect("connect");
    let mut slowest = Duration::ZERO;
    for i in 0..MIRROR_REQUESTS {
        let started = Instant::now();
        let r = conn.send(&Request::get(ECHO_HOST, &format!("/mirror/{i}"))).expect("a response");
        assert_eq!((r.status, r.header("x-served-by")), (200, Some("echo-v1")), "{r:?}");
        slowest = slowest.max(started.elapsed());
    }
    // Fire and forget: the last copies may still be on their way.
    std::thread::sleep(Duration::from_secs(2));
    let sunk = sink.requests();
    let copies: Vec<_> = sunk.iter().skip(warm_up).filter(|q| q.line.starts_with("GET /mirror/")).collect();
    let m = l.waypoint.metrics().unwrap();
    let sink_host = [("service", "sink.default.svc.cluster.local"), ("reason", "in_flight")];
    let dropped = ambit_e2e::check::metric(&m, "ambit_waypoint_mirror_dropped_total", &sink_host) as usize;
    let share = 100.0 * (copies.len() + dropped) as f64 / MIRROR_REQUESTS as f64;
    eprintln!(
        "mirror: {share:.1} % of {MIRROR_REQUESTS} requests mirrored (want 50): {} copies sent, {dropped} over the \
         bound of {MAX_MIRRORS} in flight ({warm_up} of the warm-up); slowest answer {slowest:?}",
        copies.len()
    );
    // 3.5 standard deviations of a fair draw over 240 requests.
    assert!((share - 50.0).abs() <= 11.5, "{share} % mirrored");
    assert_eq!(sunk.len(), MAX_MIRRORS, "copies in flight: the bound, no more");
    assert!(dropped > 0, "no copy counted over the bound:\n{m}");
    assert!(copies.iter().all(|q| q.host == format!("{ECHO_HOST}-shadow")), "Envoy's shadow host: {copies:?}");
    // A caller that waited for its hanging copy would take 30 s.
    assert!(slowest < Duration::from_secs(2), "a request waited for its mirror: {slowest:?}");
}

/// `reviews`: one Service over both echo pods (`app.kubernetes.io/name: echo`, `version: v1|v2`), with the waypoint;
/// Istio's DestinationRule with subsets by `version` (its traffic policy is accepted and reported as not applied); a
/// VirtualService sending 90 % to v1 and 10 % to v2.
const REVIEWS: &str = r#"apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.30
  selector: {app.kubernetes.io/name: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      http:
        http1MaxPendingRequests: 100
        maxRequestsPerConnection: 100
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 5s
      baseEjectionTime: 30s
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
"#;

/// Istio's header-based routing on `reviews`: `end-user: jason` to subset v2, everyone else to v1.
const REVIEWS_BY_USER: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
"#;

const REVIEWS_HOST: &str = "reviews.default.svc.cluster.local";

/// Waits until both ztunnels know the Service `hostname` and that it uses a waypoint.
fn wait_for_waypoint(l: &WaypointLab, hostname: &str) {
    l.mesh
        .wait_for_config(hostname, |d| ambit_e2e::dump::service(d, hostname).is_some_and(|s| s["waypoint"].is_string()))
        .expect("the ztunnels know the service and its waypoint");
}

/// `n` GETs to `reviews` from the client on one connection; per request, which server answered.
fn reviews(l: &WaypointLab, n: usize, headers: &[(&str, &str)]) -> Vec<(String, u16)> {
    answers(l, (Ipv4Addr::new(10, 96, 0, 30), REVIEWS_HOST), "/reviews", n, headers)
}

#[test]
fn destination_rule_subsets_split_one_service_by_pod_labels() {
    let Some(l) = WaypointLab::start("wp-istio-dr") else { return };
    let controller = l.mesh.controller().unwrap();
    l.until_served_by(l.client, "/ready", &[], "echo-v1");
    controller.write("reviews.yaml", REVIEWS).unwrap();
    wait_for_waypoint(&l, REVIEWS_HOST);
    l.until("reviews split by subset", || {
        let answers = reviews(&l, 100, &[]);
        match answers.iter().filter(|(s, c)| s == "echo-v2" && *c == 200).count() {
            0 => Err(format!("no answer from subset v2 yet: {:?}", &answers[..3])),
            _ => Ok(()),
        }
    });
    let share = assert_share(&reviews(&l, SPLIT_REQUESTS, &[]), "echo-v2", 10.0);
    eprintln!("DestinationRule subsets 90/10: v2 got {share:.2} % of {SPLIT_REQUESTS} requests");

    controller
        .write(
            "reviews.yaml",
            &REVIEWS.replace(&REVIEWS[REVIEWS.rfind("---").unwrap()..], &format!("---\n{REVIEWS_BY_USER}")),
        )
        .unwrap();
    l.until("routing by end-user", || {
        let jason = reviews(&l, 20, &[("end-user", "jason")]);
        let others = reviews(&l, 20, &[("end-user", "mary")]);
        let all = |a: &[(String, u16)], s: &str| a.iter().all(|(x, c)| x == s && *c == 200);
        if all(&jason, "echo-v2") && all(&others, "echo-v1") {
            Ok(())
        } else {
            Err(format!("jason {jason:?} others {others:?}"))
        }
    });

    // Consistent hashing by a header, on the Service's own traffic (no VirtualService): each user's 50 requests
    // reach one endpoint, and the users spread over both.
    let service = &REVIEWS[..REVIEWS.find("---").unwrap()];
    controller.write("reviews.yaml", &format!("{service}---\n{STICKY}")).unwrap();
    let by_user = |user: &str| {
        let answers = reviews(&l, 50, &[("x-user", user)]);
        let servers: std::collections::BTreeSet<&str> = answers.iter().map(|(s, _)| s.as_str()).collect();
        servers.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    // Until then, the VirtualService sends every user to echo-v1: wait for a user hashed onto echo-v2.
    let mut n = 0;
    l.until("the consistent hash", || {
        n += 1;
        match by_user(&format!("probe-{n}"))[..] {
            [ref one] if one == "echo-v2" => Ok(()),
            ref other => Err(format!("user probe-{n} reached {other:?}")),
        }
    });
    let users: Vec<Vec<String>> = (0..20).map(|u| by_user(&format!("user-{u}"))).collect();
    assert!(users.iter().all(|s| s.len() == 1), "a user's requests reached several endpoints: {users:?}");
    let v2 = users.iter().filter(|s| s[0] == "echo-v2").count();
    eprintln!("consistent hash: 20 users × 50 requests, each on one endpoint; {v2} of 20 users on echo-v2");
    assert!((1..20).contains(&v2), "the users did not spread: {v2} of 20 on echo-v2");
}

/// Istio's sticky sessions: `reviews` hashed by the `x-user` header.
const STICKY: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-user
"#;

/// `servers`: every node-2 pod (`echo-v1`, `echo-v2`, and `intruder`, where nothing listens on 8080), with the issue's
/// DestinationRule: connection pool limits and outlier detection after 3 consecutive
/// 5xx, 30 s interval and base ejection, at most half the endpoints ejected.
const SERVERS: &str = r#"apiVersion: v1
kind: Service
metadata: {name: servers, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.31
  selector: {app.kubernetes.io/component: server}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: servers, namespace: default}
spec:
  host: servers
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10}
      http: {http1MaxPendingRequests: 10, maxRequestsPerConnection: 2}
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 30s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
"#;

/// The waypoint's ejected endpoints of `servers` (admin dump): (address, seconds until it returns, times ejected).
fn ejected(l: &WaypointLab) -> Vec<(String, f64, u64)> {
    let dump: serde_json::Value = serde_json::from_str(&l.waypoint.admin_get("/config_dump").unwrap()).unwrap();
    let services = dump["outlierDetection"].as_array().cloned().unwrap_or_default();
    let servers = services.iter().find(|s| s["service"] == "default/servers.default.svc.cluster.local");
    let list = servers.and_then(|s| s["ejected"].as_array().cloned()).unwrap_or_default();
    list.iter()
        .map(|e| {
            let f = |k: &str| e[k].as_f64().unwrap_or(-1.0);
            (e["endpoint"].as_str().unwrap_or_default().to_owned(), f("returnsInSeconds"), f("timesEjected") as u64)
        })
        .collect()
}

#[test]
fn outlier_detection_ejects_a_failing_endpoint_for_its_time_and_never_more_than_half() {
    let Some(l) = WaypointLab::start("wp-istio-outlier") else { return };
    let controller = l.mesh.controller().unwrap();
    l.until_served_by(l.client, "/ready", &[], "echo-v1");
    controller.write("servers.yaml", SERVERS).unwrap();
    wait_for_waypoint(&l, "servers.default.svc.cluster.local");
    let intruder = SocketAddr::from((l.ip(l.intruder), 8080)).to_string();
    let vip = SocketAddr::from(([10, 96, 0, 31], 80));
    let get = |path: &str| {
        let mut conn = HttpConnection::connect(l.ns(l.client), vip, TIMEOUT).expect("connect to servers");
        conn.send(&Request::get("servers.default.svc.cluster.local", path).close()).expect("a response")
    };
    // `intruder` refuses every connection: after three failures (retried elsewhere, so clients see 200) it is out.
    let first = l.until("intruder ejected", || {
        for _ in 0..10 {
            get("/probe");
        }
        match ejected(&l)[..] {
            [ref e] if e.0 == intruder => Ok(e.clone()),
            ref other => Err(format!("ejected: {other:?}")),
        }
    });
    assert!(first.1 > 0.0 && first.1 <= 30.0 && first.2 == 1, "first ejection: {first:?}");
    let answers: Vec<u16> = (0..30).map(|_| get("/after").status).collect();
    assert!(answers.iter().all(|s| *s == 200), "with intruder out, every request is answered: {answers:?}");

    // Now every endpoint fails: echo-v1 and echo-v2 answer 500 three times in a row each, but ejecting one more
    // would put two of three (over half) out.
    for _ in 0..20 {
        assert_eq!(get("/status/500/all-fail").status, 500);
    }
    let now = ejected(&l);
    assert_eq!(now.len(), 1, "more than half ejected: {now:?}");
    let m = l.waypoint.metrics().unwrap();
    let total = ambit_e2e::check::metric(
        &m,
        "ambit_waypoint_outlier_ejections_total",
        &[("service", "default/servers.default.svc.cluster.local")],
    );
    assert_eq!(total, 1.0, "{m}");

    // It comes back after its 30 s; failing again, it is ejected for twice as long.
    std::thread::sleep(Duration::from_secs_f64(first.1 + 0.5));
    let second = l.until("intruder ejected again", || {
        for _ in 0..10 {
            get("/probe-again");
        }
        match ejected(&l)[..] {
            [ref e] if e.0 == intruder && e.2 == 2 => Ok(e.clone()),
            ref other => Err(format!("ejected: {other:?}")),
        }
    });
    assert!(second.1 > 30.0 && second.1 <= 60.0, "the second ejection lasts 60 s: {second:?}");
}

/// `pooled`: echo-v1 and echo-v2, with the issue's connection pool: 10 HTTP/1.1 connections, 10 pending requests,
/// 2 requests per connection.
const POOLED: &str = r#"apiVersion: v1
kind: Service
metadata: {name: pooled, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.32
  selector: {app.kubernetes.io/name: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pooled, namespace: default}
spec:
  host: pooled
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10}
      http: {http1MaxPendingRequests: 10, maxRequestsPerConnection: 2}
    loadBalancer:
      consistentHash:
        httpCookie: {name: session, path: /, ttl: 60s}
"#;

const POOLED_HOST: &str = "pooled.default.svc.cluster.local";

/// Requests sent at once into the pool of 10 connections and 10 pending places.
const BURST: usize = 30;

#[test]
fn connection_pool_limits_overflow_with_503_uo_and_retire_connections_after_two_requests() {
    let Some(l) = WaypointLab::start("wp-istio-pool") else { return };
    let controller = l.mesh.controller().unwrap();
    l.until_served_by(l.client, "/ready", &[], "echo-v1");
    controller.write("pooled.yaml", POOLED).unwrap();
    wait_for_waypoint(&l, POOLED_HOST);
    let vip = SocketAddr::from(([10, 96, 0, 32], 80));
    let get = |conn: &mut HttpConnection, path: &str| conn.send(&Request::get(POOLED_HOST, path)).expect("a response");
    l.until("pooled served", || {
        // Until the waypoint has the new service, its tunnel may be refused (a reset): retried as any answer but 200.
        let mut conn = HttpConnection::connect(l.ns(l.client), vip, TIMEOUT).map_err(|e| e.to_string())?;
        match conn.send(&Request::get(POOLED_HOST, "/pooled-ready")) {
            Ok(r) if r.status == 200 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // Sequential requests on one client connection: each upstream connection carries two, then is closed.
    let connections = || l.v1.connections().len() + l.v2.connections().len();
    let before = connections();
    let mut conn = HttpConnection::connect(l.ns(l.client), vip, TIMEOUT).unwrap();
    for _ in 0..20 {
        assert_eq!(get(&mut conn, "/sequential").status, 200);
    }
    let opened = connections() - before;
    eprintln!("maxRequestsPerConnection 2: 20 sequential requests opened {opened} connections to the servers");
    assert!((9..=11).contains(&opened), "20 requests, 2 per connection, opened {opened} connections");

    // 30 slow requests at once: 10 run, 10 wait for a connection, 10 overflow at once with 503 UO.
    let start = std::sync::Barrier::new(BURST);
    let answers: Vec<(u16, bool, Duration)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..BURST)
            .map(|_| {
                scope.spawn(|| {
                    let mut conn = HttpConnection::connect(l.ns(l.client), vip, Duration::from_secs(30)).unwrap();
                    start.wait();
                    let sent = Instant::now();
                    let r = get(&mut conn, "/delay/4000/burst");
                    (r.status, r.header("x-envoy-overloaded") == Some("true"), sent.elapsed())
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let overflowed: Vec<_> = answers.iter().filter(|(s, ..)| *s == 503).collect();
    let served = answers.iter().filter(|(s, ..)| *s == 200).count();
    eprintln!(
        "connection pool 10 + 10 pending: of {BURST} requests at once {served} served, {} overflowed",
        overflowed.len()
    );
    assert_eq!((served, overflowed.len()), (20, 10), "{answers:?}");
    assert!(overflowed.iter().all(|(_, marked, took)| *marked && *took < Duration::from_secs(2)), "{overflowed:?}");
    let waited = answers.iter().filter(|(s, _, took)| *s == 200 && *took >= Duration::from_secs(7)).count();
    assert_eq!(waited, 10, "ten waited for a connection: {answers:?}");
    let m = l.waypoint.metrics().unwrap();
    let uo =
        ambit_e2e::check::metric(&m, "istio_requests_total", &[("response_flags", "UO"), ("response_code", "503")]);
    let pending = ambit_e2e::check::metric(
        &m,
        "ambit_waypoint_upstream_overflow_total",
        &[("service", "default/pooled.default.svc.cluster.local"), ("limit", "pending")],
    );
    assert_eq!((uo, pending), (10.0, 10.0), "{m}");
    let log = l.waypoint.log_text();
    let logged = log.lines().filter(|line| line.contains("response_flags") && line.contains("UO")).count();
    assert_eq!(logged, 10, "access log lines flagged UO:\n{log}");

    // Sticky sessions by a cookie the waypoint makes: the request without it gets one, and with it every request
    // reaches the same endpoint.
    let mut conn = HttpConnection::connect(l.ns(l.client), vip, TIMEOUT).unwrap();
    let first = get(&mut conn, "/login");
    let set = first.header("set-cookie").expect("a session cookie is made").to_owned();
    assert!(set.starts_with("session=\"") && set.contains("Max-Age=60") && set.contains("Path=/"), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    let servers: std::collections::BTreeSet<String> = (0..20)
        .map(|_| {
            let r = conn.send(&Request::get(POOLED_HOST, "/sticky").header("cookie", &cookie)).unwrap();
            assert!(r.header("set-cookie").is_none(), "a request with the cookie gets no new one");
            r.header("x-served-by").unwrap_or("waypoint").to_owned()
        })
        .collect();
    assert_eq!(servers.len(), 1, "one session, one endpoint: {servers:?}");
}

/// Istio's TCP traffic shifting, on `echo`'s TCP port: 80 % of connections to `echo`, 20 % to `echo-v2`.
const TCP_SHIFT: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo-tcp, namespace: default}
spec:
  hosts: [echo]
  tcp:
  - match:
    - port: 9000
    route:
    - destination: {host: echo}
      weight: 80
    - destination: {host: echo-v2}
      weight: 20
"#;

/// TCP connections the split is measured over.
const TCP_CONNECTIONS: usize = 600;
/// Over 600 connections one standard deviation of a fair 20 % draw is 1.6 points: ±5 is over 3 of them.
const TCP_TOLERANCE: f64 = 5.0;

/// The echo server that answers a GET sent over a new connection to `echo`'s TCP port (relayed at L4).
fn over_tcp(l: &WaypointLab, path: &str) -> anyhow::Result<String> {
    let mut conn = HttpConnection::connect(l.ns(l.client), SocketAddr::from((ECHO_VIP, TCP_PORT)), TIMEOUT)?;
    let r = conn.send(&Request::get(ECHO_HOST, path).close())?;
    r.header("x-served-by").map(str::to_owned).ok_or_else(|| anyhow::anyhow!("no x-served-by: {r:?}"))
}

/// `n` connections to `echo`'s TCP port, one GET each; which server answered each.
fn tcp_servers(l: &WaypointLab, tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| over_tcp(l, &format!("/{tag}/{i}")).unwrap_or_else(|e| panic!("connection {i}: {e:#}"))).collect()
}

#[test]
fn a_virtual_service_splits_tcp_connections_by_weight() {
    let Some(l) = WaypointLab::start("wp-istio-tcp") else { return };
    let controller = l.mesh.controller().unwrap();
    let served = l.until("an answer on the tcp port", || over_tcp(&l, "/ready").map_err(|e| format!("{e:#}")));
    assert_eq!(served, "echo-v1");

    controller.write("vs.yaml", TCP_SHIFT).unwrap();
    l.until("a connection to echo-v2", || match over_tcp(&l, "/arrived") {
        Ok(s) if s == "echo-v2" => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let servers = tcp_servers(&l, "tcp-split", TCP_CONNECTIONS);
    assert!(servers.iter().all(|s| s == "echo-v1" || s == "echo-v2"), "{servers:?}");
    let share = 100.0 * servers.iter().filter(|s| *s == "echo-v2").count() as f64 / TCP_CONNECTIONS as f64;
    eprintln!("VirtualService tcp 80/20: echo-v2 got {share:.2} % of {TCP_CONNECTIONS} connections");
    assert!((share - 20.0).abs() <= TCP_TOLERANCE, "echo-v2 got {share:.1} %, want 20 ± {TCP_TOLERANCE}");
    // The bytes went through the waypoint, which names the chosen upstream in its access log.
    let waypoint_ip = std::net::IpAddr::V4(l.ip(l.wp));
    let relayed = l.v2.requests().into_iter().find(|q| q.path.starts_with("/tcp-split/")).expect("echo-v2 got some");
    assert_eq!(relayed.peer.ip(), waypoint_ip);
    let log = l.waypoint.log_text();
    let line = log.lines().find(|l| l.contains("connection complete") && l.contains("echo-v2.default.svc"));
    let line = line.unwrap_or_else(|| panic!("no access-log line names echo-v2; log:\n{log}"));
    assert!(line.contains("outbound|9000||echo-v2.default.svc.cluster.local") && line.contains("default/echo-tcp"));

    // Without the VirtualService, every connection goes to echo again.
    controller.remove("vs.yaml").unwrap();
    l.until("every connection back to echo", || {
        let servers = tcp_servers(&l, "tcp-back", 50);
        match servers.iter().filter(|s| *s != "echo-v1").count() {
            0 => Ok(()),
            n => Err(format!("{n} of 50 still went elsewhere")),
        }
    });
    let servers = tcp_servers(&l, "tcp-after", 200);
    assert!(servers.iter().all(|s| s == "echo-v1"), "{servers:?}");

    // `tcp.maxConnections: 1`: while one connection is open, the next is closed (Envoy's TCP proxy), flagged UO.
    controller.write("dr.yaml", ONE_TCP_CONNECTION).unwrap();
    let tcp = SocketAddr::from((ECHO_VIP, TCP_PORT));
    let mut held = l.until("a second connection refused", || {
        let mut held = HttpConnection::connect(l.ns(l.client), tcp, TIMEOUT).map_err(|e| e.to_string())?;
        held.send(&Request::get(ECHO_HOST, "/held")).map_err(|e| e.to_string())?;
        match over_tcp(&l, "/second") {
            Err(_) => Ok(held),
            Ok(s) => Err(format!("a second connection was served by {s}")),
        }
    });
    assert_eq!(held.send(&Request::get(ECHO_HOST, "/still-held")).unwrap().status, 200, "the first one still works");
    let m = l.waypoint.metrics().unwrap();
    let limit = [("service", "default/echo.default.svc.cluster.local"), ("limit", "connections")];
    assert!(ambit_e2e::check::metric(&m, "ambit_waypoint_upstream_overflow_total", &limit) >= 1.0, "{m}");
    drop(held);
    l.until("a connection once the first is closed", || over_tcp(&l, "/after-held").map_err(|e| format!("{e:#}")));
}

/// A DestinationRule allowing one connection at a time to `echo`.
const ONE_TCP_CONNECTION: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: default}
spec:
  host: echo
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
"#;
