//! End-to-end tests of the waypoint proxy binary `ambit-waypoint` in the lab,
//! with the real `ambit-controller` (file mode) and the real ztunnels: a
//! client on node 1 calls the service `echo`, labelled
//! `istio.io/use-waypoint: waypoint`; its ztunnel sends the connection over
//! HBONE to the waypoint (a pod on node 1 labelled
//! `istio.io/dataplane-mode: none`, so not captured, running as the service
//! account `waypoint`, the Gateway's name), which routes and authorizes each
//! HTTP request and forwards it over HBONE to the ztunnel of an endpoint pod
//! on node 2, where a small HTTP/1.1 server answers naming itself and echoing
//! what it saw. As a cluster's deployer would, the lab declares the waypoint
//! `Gateway` (class `ambit-waypoint`) and its `Service` (port 15008, selecting
//! the waypoint pod); the waypoint proves its identity to the controller with
//! its own `--workload-tokens` token. The lab's setup is shared with the L7
//! benchmark, with [`WaypointLab`] shared with `mesh_waypoint_http.rs`:
//! [`ambit_e2e::waypoint_lab`].
//!
//! Checked: the request path through the waypoint (its
//! `istio_requests_total{reporter="waypoint"}`, the server ztunnel seeing the
//! waypoint's identity, the server seeing the waypoint's IP); GAMMA HTTPRoutes
//! (a path prefix to another service, request and response header
//! modifiers, 404 when no rule matches, removal; a retry, a request timeout
//! and a mirror); AuthorizationPolicies bound by `targetRefs` to the Gateway
//! (DENY by path, on the normalized path; DENY by remoteIpBlocks, which a
//! forged `X-Forwarded-For` does not get around) and to the Service (ALLOW by
//! principal), added and removed at run time; many requests on one
//! kept-alive connection and on several at once, without leaking; a client
//! that half-closes; an HTTP/1.1 upgrade carried through, also while the
//! waypoint drains after SIGTERM; and the
//! server's ztunnel refusing a client that goes straight to the pod around
//! the waypoint (HBONE or plaintext), while a pod without a waypoint stays
//! reachable directly; between the nodes, only TLS on the HBONE port. Routes and
//! policies reach the waypoint asynchronously, so each change is polled for,
//! with a bound. Needs root; fails (not skips) under CI.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ambit_e2e::check::{metric, TIMEOUT};
use ambit_e2e::http::{HttpConnection, HttpResponse, Request};
use ambit_e2e::http_server::EchoReply;
use ambit_e2e::sniff::Sniffer;
use ambit_e2e::waypoint_lab::{WaypointLab, APP_PORT, CLIENT_PRINCIPAL, ECHO_HOST, ECHO_VIP, PROPAGATION, TCP_PORT};
use ambit_e2e::{NetNs, PodId};

/// An HTTPRoute on the Service `echo` (GAMMA): `/v2…` to `echo-v2` with a
/// request header set, one removed and a response header added; with
/// `catch_all`, a second rule sends everything else to `echo` itself (without
/// it, other paths match no rule: 404).
fn route(catch_all: bool) -> String {
    let mut yaml = String::from(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: v2}]
        remove: [x-drop]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-routed-by, value: echo-split}]
    backendRefs: [{name: echo-v2, port: 80}]
"#,
    );
    if catch_all {
        yaml.push_str("  - backendRefs: [{name: echo, port: 80}]\n");
    }
    yaml
}

/// A DENY policy at the waypoint Gateway for paths under `/admin`.
const DENY_ADMIN: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

/// An ALLOW policy on the Service `echo` for one principal only.
fn allow_only(principal: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-one, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: echo}}]
  action: ALLOW
  rules: [{{from: [{{source: {{principals: ["{principal}"]}}}}]}}]
"#
    )
}

#[test]
fn a_service_with_a_waypoint_is_served_through_the_waypoint_binary() {
    let Some(mut l) = WaypointLab::start("wp-bin-path") else { return };
    let waypoint_ip = l.ip(l.wp);
    let waypoint_id = l.waypoint.args().identity();

    // No route: the waypoint sends the request to the service it was addressed to.
    let (r, echo) = l.until_served_by(l.client, "/hello?q=1", &[("x-test", "first")], "echo-v1");
    assert_eq!(r.header("x-served-by"), Some("echo-v1"), "{r:?}");
    assert_eq!((echo.method.as_str(), echo.path.as_str()), ("GET", "/hello?q=1"), "{echo:?}");
    assert_eq!(echo.host, ECHO_HOST, "the Host header reaches the application as the client sent it: {echo:?}");
    assert_eq!(echo.header("x-test"), Some("first"), "a request header is forwarded: {echo:?}");
    assert!(l.v2.requests().is_empty(), "echo-v2 got a request without a route to it");

    // The waypoint was on the path, seen from every side.
    let seen = l.v1.requests();
    let last = seen.last().expect("echo-v1 saw the request");
    assert_eq!(last.peer.ip(), IpAddr::V4(waypoint_ip), "the application sees the waypoint's address as the source");
    assert!(
        l.waypoint_requests(&[("destination_service", ECHO_HOST), ("response_code", "200")]) >= 1.0,
        "the waypoint did not count the request:\n{}",
        l.waypoint.metrics().unwrap()
    );
    let m1 = l.mesh.ztunnel(l.nodes[0]).metrics().unwrap();
    let to_waypoint = [
        ("reporter", "source"),
        ("source_principal", CLIENT_PRINCIPAL),
        ("destination_workload", "waypoint"),
        ("destination_principal", waypoint_id.as_str()),
        ("destination_service", ECHO_HOST),
    ];
    assert!(
        metric(&m1, "istio_tcp_connections_opened_total", &to_waypoint) >= 1.0,
        "the client's ztunnel did not send the connection to the waypoint:\n{m1}"
    );
    let m2 = l.mesh.ztunnel(l.nodes[1]).metrics().unwrap();
    let from_waypoint =
        [("reporter", "destination"), ("source_principal", waypoint_id.as_str()), ("destination_workload", "echo-v1")];
    assert!(
        metric(&m2, "istio_tcp_connections_opened_total", &from_waypoint) >= 1.0,
        "the server's ztunnel saw no HBONE connection from the waypoint's identity:\n{m2}"
    );
    let direct = [("reporter", "destination"), ("source_principal", CLIENT_PRINCIPAL)];
    assert_eq!(
        metric(&m2, "istio_tcp_connections_opened_total", &direct),
        0.0,
        "the client reached node 2 around the waypoint:\n{m2}"
    );

    // Istio's default (no implicit waypoint policy): a client may still go straight to a pod behind the waypoint,
    // as the Gateway API's MeshFrontend test expects; --auto-allow-waypoint-policy refuses it (test below).
    let echo_v1 = SocketAddr::from((l.ip(l.servers[0]), APP_PORT));
    let mut straight = HttpConnection::connect(l.ns(l.client), echo_v1, TIMEOUT).unwrap();
    let r = straight.send(&Request::get(ECHO_HOST, "/straight").close()).expect("straight to echo-v1's pod IP");
    assert_eq!((r.status, r.header("x-served-by")), (200, Some("echo-v1")), "{r:?}");

    // A client that shuts down its sending side after the request (nc, shell scripts) still gets the answer.
    let mut half = HttpConnection::connect(l.ns(l.client), SocketAddr::from((ECHO_VIP, 80)), TIMEOUT).unwrap();
    let r = half.send_and_half_close(&Request::get(ECHO_HOST, "/half-closed")).expect("an answer after a half-close");
    assert_eq!((r.status, r.header("x-served-by")), (200, Some("echo-v1")), "{r:?}");

    // An upgrade (the shape of a WebSocket handshake): routed as a request, 101 from the endpoint through the
    // waypoint, then bytes both ways on the same connection, untouched.
    let mut upgrading = HttpConnection::connect(l.ns(l.client), SocketAddr::from((ECHO_VIP, 80)), TIMEOUT).unwrap();
    let handshake = Request::get(ECHO_HOST, "/ws").header("Connection", "Upgrade").header("Upgrade", "echo");
    let r = upgrading.send(&handshake).expect("an answer to the upgrade request");
    assert_eq!((r.status, r.header("upgrade"), r.header("x-served-by")), (101, Some("echo"), Some("echo-v1")), "{r:?}");
    let (mut stream, early) = upgrading.into_upgraded();
    assert!(early.is_empty(), "bytes after the 101: {early:?}");
    let big: Vec<u8> = (0..32 * 1024).map(|i| (i % 251) as u8).collect();
    for message in [&b"ping\n"[..], &big[..]] {
        stream.write_all(message).expect("write on the upgraded connection");
        let mut back = vec![0; message.len()];
        stream.read_exact(&mut back).expect("the echo of the upgraded connection");
        assert!(back == message, "the upgraded connection changed {} bytes", message.len());
    }
    drop(stream);

    // Many requests on one kept-alive connection, then several connections at once.
    let ok_before = l.waypoint_requests(&[("destination_service", ECHO_HOST), ("response_code", "200")]);
    let upstream_before = l.v1.connections().len();
    let fds_before = l.waypoint.open_fds();
    const SEQUENTIAL: usize = 50;
    let vip = SocketAddr::from((ECHO_VIP, 80));
    let mut conn = HttpConnection::connect(l.ns(l.client), vip, TIMEOUT).unwrap();
    for i in 0..SEQUENTIAL {
        let tag = i.to_string();
        let r = conn
            .send(&Request::get(ECHO_HOST, &format!("/seq/{i}")).header("x-test", &tag))
            .unwrap_or_else(|e| panic!("request {i} on the kept-alive connection: {e:#}"));
        let echo = EchoReply::parse(&r.body).unwrap_or_else(|| panic!("request {i}: {r:?}"));
        assert_eq!(
            (r.status, echo.path.as_str(), echo.header("x-test")),
            (200, format!("/seq/{i}").as_str(), Some(tag.as_str()))
        );
        assert!(conn.is_open(), "the waypoint closed the client's connection after request {i}: {r:?}");
    }
    drop(conn);
    let upstream = l.v1.connections().len() - upstream_before;
    println!("{SEQUENTIAL} requests on one client connection reached echo-v1 on {upstream} connection(s)");
    assert!(
        upstream <= 5,
        "{SEQUENTIAL} sequential requests took {upstream} upstream connections: the waypoint does not reuse them"
    );

    const CONNECTIONS: usize = 8;
    const PER_CONNECTION: usize = 25;
    let client_ns = l.ns(l.client).name().to_string();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let ns = NetNs::borrowed(&client_ns);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut conn = HttpConnection::connect(&ns, vip, TIMEOUT)?;
                for i in 0..PER_CONNECTION {
                    let path = format!("/par/{c}/{i}");
                    let r = conn.send(&Request::get(ECHO_HOST, &path))?;
                    let echo = EchoReply::parse(&r.body);
                    if r.status != 200 || echo.as_ref().map(|e| e.path.as_str()) != Some(path.as_str()) {
                        anyhow::bail!("connection {c}, request {i}: {r:?}");
                    }
                }
                Ok(())
            })
        })
        .collect();
    for (c, w) in workers.into_iter().enumerate() {
        w.join().expect("client thread").unwrap_or_else(|e| panic!("parallel connection {c}: {e:#}"));
    }
    let sent = (SEQUENTIAL + CONNECTIONS * PER_CONNECTION) as f64;
    l.until("the waypoint's metrics count every request", || {
        let ok = l.waypoint_requests(&[("destination_service", ECHO_HOST), ("response_code", "200")]);
        if ok - ok_before == sent {
            Ok(())
        } else {
            Err(format!("{} of {sent} requests counted", ok - ok_before))
        }
    });

    // Still healthy, and holding no more than it did before.
    assert!(l.waypoint.is_running() && l.waypoint.is_ready(), "the waypoint is no longer ready");
    let dump = l.waypoint.config_dump().expect("config_dump");
    assert!(dump.to_string().contains(ECHO_HOST), "the config dump does not show {ECHO_HOST}: {dump}");
    l.until("the waypoint's file descriptors back to where they were", || {
        let now = l.waypoint.open_fds();
        if now <= fds_before + 10 {
            Ok(())
        } else {
            Err(format!("{now} open file descriptors, {fds_before} before the {sent} requests"))
        }
    });
    println!(
        "waypoint after {sent} requests: {} fds ({fds_before} before), RSS {} KiB",
        l.waypoint.open_fds(),
        l.waypoint.rss_bytes() / 1024
    );

    // Requests that each close their connection (`Connection: close`), as the polls above did. Every tunnel ends
    // cleanly: a tunnel the waypoint resets instead of closing counts as a failed connection at the client's
    // ztunnel (`stream_error`, "inactive stream" in its log).
    for i in 0..20 {
        let r =
            l.get(&format!("/close/{i}"), &[]).unwrap_or_else(|e| panic!("request {i} with Connection: close: {e:#}"));
        assert_eq!(r.status, 200, "{r:?}");
    }
    // Every tunnel to the waypoint ended once its client closed: none left open at the waypoint.
    l.until("every client connection to the waypoint closed", || {
        let m = l.mesh.ztunnel(l.nodes[0]).metrics().map_err(|e| format!("{e:#}"))?;
        let labels = [("reporter", "source"), ("destination_workload", "waypoint")];
        let opened = metric(&m, "istio_tcp_connections_opened_total", &labels);
        let closed = metric(&m, "istio_tcp_connections_closed_total", &labels);
        if opened == closed && opened >= sent / PER_CONNECTION as f64 {
            Ok(())
        } else {
            Err(format!("{opened} opened, {closed} closed"))
        }
    });
    for n in l.nodes {
        let m = l.mesh.ztunnel(n).metrics().unwrap();
        let failed: Vec<&str> =
            m.lines().filter(|x| x.starts_with("ztunnel_connection_failures_total{") && !x.ends_with(" 0")).collect();
        assert!(failed.is_empty(), "ztunnel on {n:?} counted failed connections: {failed:#?}");
    }

    // SIGTERM with a kept-alive client connection and an upgraded one open: the waypoint drains (its idle HTTP
    // connection is closed, GOAWAY on HBONE), carries the upgraded connection on until its client closes it, then
    // exits well before its 25 s drain timeout, cleanly.
    let mut idle = HttpConnection::connect(l.ns(l.client), vip, TIMEOUT).expect("a client connection");
    let r = idle.send(&Request::get(ECHO_HOST, "/before-sigterm")).expect("a request before SIGTERM");
    assert_eq!(r.status, 200, "{r:?}");
    let mut upgrading = HttpConnection::connect(l.ns(l.client), vip, TIMEOUT).unwrap();
    let handshake = Request::get(ECHO_HOST, "/ws-drain").header("Connection", "Upgrade").header("Upgrade", "echo");
    assert_eq!(upgrading.send(&handshake).expect("an answer to the upgrade request").status, 101);
    let (mut upgraded, _) = upgrading.into_upgraded();
    l.waypoint.sigterm();
    std::thread::sleep(Duration::from_secs(2));
    assert!(l.waypoint.is_running(), "exited with an upgraded connection open; log:\n{}", l.waypoint.log_text());
    upgraded.write_all(b"still here\n").expect("write on the upgraded connection while draining");
    let mut back = [0; 11];
    upgraded.read_exact(&mut back).expect("the upgraded connection carried on while the waypoint drains");
    assert_eq!(&back, b"still here\n");
    drop(upgraded);
    let status = l.waypoint.wait_exit(Duration::from_secs(10)).expect("the waypoint exits once it is closed");
    assert!(status.success(), "exit status {status}; log:\n{}", l.waypoint.log_text());
    assert!(l.waypoint.log_text().contains("waypoint drained"), "log:\n{}", l.waypoint.log_text());
}

#[test]
fn gamma_routes_split_traffic_modify_headers_and_answer_404() {
    let Some(l) = WaypointLab::start("wp-bin-routes") else { return };
    let controller = l.mesh.controller().unwrap();
    // Without a route, /v2/x is the service's own.
    l.until_served_by(l.client, "/v2/x", &[], "echo-v1");

    // Only the /v2 rule: /v2/x goes to echo-v2 with the filters applied; nothing else matches.
    controller.write("route.yaml", &route(false)).unwrap();
    let headers = [("x-test", "routed"), ("x-drop", "yes"), ("x-route", "from-client")];
    let (r, echo) = l.until_served_by(l.client, "/v2/x", &headers, "echo-v2");
    assert_eq!((echo.path.as_str(), echo.host.as_str()), ("/v2/x", ECHO_HOST), "{echo:?}");
    assert_eq!(echo.header("x-test"), Some("routed"), "{echo:?}");
    assert_eq!(
        echo.header_values("x-route"),
        ["v2"],
        "RequestHeaderModifier set replaces the client's value: {echo:?}"
    );
    assert_eq!(echo.header("x-drop"), None, "RequestHeaderModifier remove: {echo:?}");
    assert_eq!(r.header("x-routed-by"), Some("echo-split"), "ResponseHeaderModifier add: {r:?}");
    assert_eq!(r.header("x-served-by"), Some("echo-v2"), "{r:?}");
    let other = l.get("/other", &[]).expect("GET /other");
    assert_eq!(other.status, 404, "a path no rule matches: {other:?}");
    assert!(EchoReply::parse(&other.body).is_none(), "a 404 must come from the waypoint, not a server: {other:?}");
    assert!(!l.v1.requests().iter().any(|q| q.path == "/other"), "/other reached echo-v1");

    // A catch-all rule: /other goes to echo (echo-v1), without the /v2 rule's filters.
    controller.write("route.yaml", &route(true)).unwrap();
    let (r, echo) = l.until_served_by(l.client, "/other", &[("x-drop", "kept")], "echo-v1");
    assert_eq!(echo.path, "/other");
    assert_eq!(echo.header("x-drop"), Some("kept"), "the /v2 rule's filter applied to another rule: {echo:?}");
    assert_eq!(echo.header("x-route"), None, "{echo:?}");
    assert_eq!(r.header("x-routed-by"), None, "{r:?}");
    let (_, echo) = l.until_served_by(l.client, "/v2/again", &[], "echo-v2");
    assert_eq!(echo.header("x-route"), Some("v2"));
    let routed = l.waypoint_requests(&[("response_code", "200")]);
    assert!(routed >= 3.0, "the waypoint counted {routed} requests answered 200:\n{}", l.waypoint.metrics().unwrap());
    assert!(
        l.waypoint_requests(&[("response_code", "404")]) >= 1.0,
        "the 404 is not counted:\n{}",
        l.waypoint.metrics().unwrap()
    );

    // Without the route, echo answers everything again.
    controller.remove("route.yaml").unwrap();
    l.until_served_by(l.client, "/v2/x", &[], "echo-v1");
}

/// An HTTPRoute on `echo` with a retry (GEP-1731) on `/status…` for 500, a request timeout on `/delay…`, and a
/// mirror of everything else to `echo-v2`.
const RESILIENCE_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-resilience, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /status}}]
    retry: {codes: [500], attempts: 1, backoff: 10ms}
    backendRefs: [{name: echo, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /delay}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: echo, port: 80}]
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}}}]
    backendRefs: [{name: echo, port: 80}]
"#;

#[test]
fn a_routes_retry_timeout_and_mirror_apply() {
    let Some(l) = WaypointLab::start("wp-bin-resilience") else { return };
    let controller = l.mesh.controller().unwrap();
    let at_v1 = |path: &str| l.v1.requests().iter().filter(|q| q.path == path).count();
    // Without a route: a 500 is not retried (Istio's default retries 503 and connection failures only).
    l.until_served_by(l.client, "/ok", &[], "echo-v1");
    let r = l.get("/status/500/before", &[]).expect("GET /status/500/before");
    assert_eq!((r.status, at_v1("/status/500/before")), (500, 1), "{r:?}");

    controller.write("route.yaml", RESILIENCE_ROUTE).unwrap();
    // The mirror shows the route arrived: echo-v1 answers, echo-v2 gets a copy (fire and forget, so polled).
    let deadline = Instant::now() + PROPAGATION;
    let mirrored = |path: &str| l.v2.requests().iter().any(|q| q.path == path);
    let mut n = 0;
    loop {
        n += 1;
        let path = format!("/mirror/{n}");
        let r = l.get(&path, &[]).expect("GET /mirror");
        assert_eq!((r.status, r.header("x-served-by")), (200, Some("echo-v1")), "the mirror answered: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
        if mirrored(&path) {
            break;
        }
        assert!(Instant::now() < deadline, "no request mirrored to echo-v2 within {PROPAGATION:?}");
    }
    let mirror = l.v2.requests().into_iter().find(|q| q.path == format!("/mirror/{n}")).unwrap();
    assert_eq!(mirror.header("host"), Some(format!("{ECHO_HOST}-shadow").as_str()), "Envoy's shadow host: {mirror:?}");

    // The retry: one more attempt for a 500, then the 500 goes back to the client.
    let r = l.get("/status/500/after", &[]).expect("GET /status/500/after");
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(at_v1("/status/500/after"), 2, "one retry of a 500 (attempts: 1)");
    let r = l.get("/status/503/after", &[]).expect("GET /status/503/after");
    assert_eq!((r.status, at_v1("/status/503/after")), (503, 1), "codes: [500] replaces the default codes");

    // The timeout: 300 ms, then 504 from the waypoint; a quick answer on the same rule passes.
    let started = Instant::now();
    let r = l.get("/delay/3000", &[]).expect("GET /delay/3000");
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(took < Duration::from_millis(2500), "the timeout did not cut the request: {took:?}");
    assert_eq!(l.get("/delay/10", &[]).expect("GET /delay/10").status, 200);
    assert!(
        l.waypoint_requests(&[("response_code", "504"), ("response_flags", "UT")]) >= 1.0,
        "the timeout is not counted as UT:\n{}",
        l.waypoint.metrics().unwrap()
    );
}

#[test]
fn authorization_policies_bound_to_the_gateway_and_the_service_are_enforced_at_the_waypoint() {
    let Some(l) = WaypointLab::start("wp-bin-authz") else { return };
    let controller = l.mesh.controller().unwrap();
    l.until_served_by(l.client, "/ok", &[], "echo-v1");

    // DENY on the Gateway for /admin*: 403 with Istio's body, other paths unaffected.
    controller.write("deny-admin.yaml", DENY_ADMIN).unwrap();
    let denied = l.until_denied(l.client, "/admin");
    assert_eq!(denied.body.trim(), "RBAC: access denied", "{denied:?}");
    // Before the policy arrived, the polls reached echo-v1; from now on none may.
    let admin_at_v1 = || l.v1.requests().iter().filter(|q| q.path.starts_with("/admin")).count();
    let reached_before = admin_at_v1();
    let nested = l.get("/admin/users", &[]).expect("GET /admin/users");
    assert_eq!(nested.status, 403, "{nested:?}");
    let ok = l.get("/ok", &[]).expect("GET /ok");
    assert_eq!(ok.status, 200, "a path the DENY does not match: {ok:?}");
    // Paths are normalized before routing and policy (Istio's default): dot segments and escaped letters do not get
    // around the DENY, the application gets the normalized path, and a malformed escape is refused.
    for sneaky in ["/public/../admin", "/%61dmin", "/x/%2e%2E/admin/users"] {
        let r = l.get(sneaky, &[]).unwrap_or_else(|e| panic!("GET {sneaky}: {e:#}"));
        assert_eq!(r.status, 403, "{sneaky}: {r:?}");
    }
    let dotted = l.get("/public/./../ok", &[]).expect("GET /public/./../ok");
    let echo = EchoReply::parse(&dotted.body).unwrap_or_else(|| panic!("{dotted:?}"));
    assert_eq!(echo.path, "/ok", "the application gets the normalized path");
    let malformed = l.get("/bad%zz", &[]).expect("GET /bad%zz");
    assert_eq!(malformed.status, 400, "{malformed:?}");
    assert_eq!(admin_at_v1(), reached_before, "a denied request reached echo-v1");
    assert!(
        l.waypoint_requests(&[("destination_service", ECHO_HOST), ("response_code", "403")]) >= 2.0,
        "denials are not counted:\n{}",
        l.waypoint.metrics().unwrap()
    );
    controller.remove("deny-admin.yaml").unwrap();
    l.until_served_by(l.client, "/admin", &[], "echo-v1");

    // ALLOW on the Service for another principal: the client is refused.
    controller.write("allow.yaml", &allow_only("cluster.local/ns/default/sa/someone-else")).unwrap();
    let denied = l.until_denied(l.client, "/ok");
    assert_eq!(denied.body.trim(), "RBAC: access denied", "{denied:?}");
    // ALLOW for the client's service account: the client passes, anyone else is refused.
    controller.write("allow.yaml", &allow_only("cluster.local/ns/default/sa/client")).unwrap();
    l.until_served_by(l.client, "/ok", &[], "echo-v1");
    let other = l.send_from(l.intruder, Request::get(ECHO_HOST, "/ok")).expect("GET /ok from intruder");
    assert_eq!((other.status, other.body.trim()), (403, "RBAC: access denied"), "{other:?}");
    controller.remove("allow.yaml").unwrap();
    l.until_served_by(l.intruder, "/ok", &[], "echo-v1");

    // DENY by remoteIpBlocks of the client's address: an X-Forwarded-For the client writes does not get it through
    // (no proxy in front of the waypoint is trusted, the default), and the intruder is not refused.
    let deny_remote = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-remote, namespace: default}}\n\
         spec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  action: DENY\n  \
         rules: [{{from: [{{source: {{remoteIpBlocks: [\"{}/32\"]}}}}]}}]\n",
        l.ip(l.client)
    );
    controller.write("deny-remote.yaml", &deny_remote).unwrap();
    l.until_denied(l.client, "/ok");
    let forged = l.get("/ok", &[("x-forwarded-for", "203.0.113.7")]).expect("GET /ok with a forged X-Forwarded-For");
    assert_eq!(forged.status, 403, "a forged X-Forwarded-For got around a remoteIpBlocks DENY: {forged:?}");
    let other = l.send_from(l.intruder, Request::get(ECHO_HOST, "/ok")).expect("GET /ok from intruder");
    assert_eq!(other.status, 200, "{other:?}");

    // No policy: everyone passes.
    controller.remove("deny-remote.yaml").unwrap();
    l.until_served_by(l.client, "/ok", &[], "echo-v1");
}

#[test]
fn with_the_implicit_waypoint_policy_a_client_that_goes_around_the_waypoint_is_refused() {
    let Some(l) = WaypointLab::start_with("wp-bin-bypass", &["--auto-allow-waypoint-policy"]) else { return };
    let [v1, v2] = l.servers;
    let (client_ip, waypoint_ip) = (l.ip(l.client), l.ip(l.wp));
    // `GET path` straight to `pod`'s application port from `from`'s network namespace.
    let straight = |from: PodId, pod: PodId, path: &str| -> anyhow::Result<HttpResponse> {
        let mut conn = HttpConnection::connect(l.ns(from), SocketAddr::from((l.ip(pod), APP_PORT)), TIMEOUT)?;
        conn.send(&Request::get(ECHO_HOST, path).close())
    };
    let refused = || {
        let m = l.mesh.ztunnel(l.nodes[1]).metrics().unwrap();
        metric(&m, "ztunnel_connection_failures_total", &[("direction", "inbound"), ("reason", "policy_denied")])
    };
    let reached_v1 = |path: &str| l.v1.requests().iter().filter(|q| q.path == path).count();

    // Through the service's VIP the client is served, through the waypoint.
    let (_, echo) = l.until_served_by(l.client, "/via-vip", &[], "echo-v1");
    assert_eq!(echo.path, "/via-vip");
    assert_eq!(refused(), 0.0, "the waypoint's own connections are admitted");

    // Straight to echo-v1's pod IP: echo-v1 has no waypoint of its own, so the client's ztunnel tunnels to it
    // directly, and echo-v1's ztunnel refuses the client: echo-v1 backs `echo`, so it lists the implicit policy
    // `istio_allow_waypoint_default_waypoint`, an ALLOW for the waypoint's identity only.
    let r = straight(l.client, v1, "/around-hbone");
    assert!(r.is_err(), "the client reached echo-v1 around the waypoint: {r:?}");
    assert_eq!(refused(), 1.0, "{}", l.mesh.ztunnel(l.nodes[1]).metrics().unwrap());
    let m2 = l.mesh.ztunnel(l.nodes[1]).metrics().unwrap();
    let denied = [
        ("reporter", "destination"),
        ("source_principal", CLIENT_PRINCIPAL),
        ("destination_workload", "echo-v1"),
        ("response_flags", "DENY"),
    ];
    assert_eq!(metric(&m2, "istio_tcp_connections_closed_total", &denied), 1.0, "counted as Istio's DENY: {m2}");
    let m1 = l.mesh.ztunnel(l.nodes[0]).metrics().unwrap();
    let at_client = [("direction", "outbound"), ("reason", "policy_denied")];
    assert_eq!(metric(&m1, "ztunnel_connection_failures_total", &at_client), 1.0, "the 401 seen at the client: {m1}");

    // Plaintext straight to echo-v1, as from a client outside the mesh (the waypoint's pod is not captured): no
    // identity, refused too, though it comes from the waypoint's own IP: the rule admits an identity, not an address.
    let r = straight(l.wp, v1, "/around-plaintext");
    assert!(r.is_err(), "plaintext reached echo-v1 around the waypoint: {r:?}");
    assert_eq!(refused(), 2.0, "{}", l.mesh.ztunnel(l.nodes[1]).metrics().unwrap());
    assert_eq!(reached_v1("/around-hbone") + reached_v1("/around-plaintext"), 0, "echo-v1 got a bypassing request");

    // echo-v2 has no waypoint: reached straight from the client (HBONE) and from outside the mesh (plaintext).
    for (from, source) in [(l.client, client_ip), (l.wp, waypoint_ip)] {
        let r = straight(from, v2, "/straight").unwrap_or_else(|e| panic!("straight to echo-v2: {e:#}"));
        let echo = EchoReply::parse(&r.body).unwrap_or_else(|| panic!("{r:?}"));
        assert_eq!((r.status, echo.server.as_str()), (200, "echo-v2"), "{r:?}");
        let seen = l.v2.requests();
        assert_eq!(seen.last().map(|q| q.peer.ip()), Some(IpAddr::V4(source)), "echo-v2 sees the client itself");
    }
    assert_eq!(refused(), 2.0, "a pod without a waypoint refused nothing");

    // The way through the waypoint is still open, and the application sees the waypoint as the source.
    let (_, echo) = l.until_served_by(l.client, "/via-vip-again", &[], "echo-v1");
    assert_eq!(echo.path, "/via-vip-again");
    let last = l.v1.requests().last().cloned().expect("echo-v1 saw the request");
    assert_eq!(last.peer.ip(), IpAddr::V4(waypoint_ip));
    assert_eq!(refused(), 2.0);
}

#[test]
fn a_port_declared_tcp_is_relayed_at_l4_with_the_l4_part_of_policy() {
    let Some(l) = WaypointLab::start("wp-bin-tcp") else { return };
    let waypoint_ip = l.ip(l.wp);
    let tcp = SocketAddr::from((ECHO_VIP, TCP_PORT));
    let over_tcp = |path: &str| -> anyhow::Result<HttpResponse> {
        let mut conn = HttpConnection::connect(l.ns(l.client), tcp, TIMEOUT)?;
        conn.send(&Request::get(ECHO_HOST, path).close())
    };
    let counted = || l.waypoint_requests(&[("destination_service", ECHO_HOST)]);

    // HTTP bytes on the `tcp` port: relayed whole through the waypoint to echo-v1, and not taken for requests.
    let before = counted();
    let r = l.until("an answer on the tcp port", || over_tcp("/over-tcp").map_err(|e| format!("{e:#}")));
    assert_eq!((r.status, r.header("x-served-by")), (200, Some("echo-v1")), "{r:?}");
    let seen = l.v1.requests();
    let relayed = seen.iter().find(|q| q.path == "/over-tcp").expect("echo-v1 got the relayed request");
    assert_eq!(relayed.peer.ip(), IpAddr::V4(waypoint_ip), "the bytes came through the waypoint");
    assert_eq!(counted(), before, "the waypoint counted L4 bytes as an HTTP request");

    // A DENY with an HTTP-only field cannot be evaluated on a TCP connection: it denies (fails closed), while on the
    // HTTP port it denies only what it names.
    let denied = || {
        let m = l.waypoint.metrics().expect("waypoint metrics");
        metric(&m, "ambit_waypoint_refused_total", &[("reason", "policy_denied")])
    };
    let controller = l.mesh.controller().unwrap();
    controller.write("deny-admin.yaml", DENY_ADMIN).unwrap();
    l.until_denied(l.client, "/admin/x");
    let before = denied();
    let refused = over_tcp("/ok");
    assert!(refused.is_err(), "a TCP connection under an unevaluable DENY got an answer: {refused:?}");
    assert_eq!(denied(), before + 1.0, "the refusal is counted");
    assert_eq!(l.get("/ok", &[]).expect("GET /ok on the http port").status, 200);

    // Without the policy, the tcp port carries bytes again.
    controller.remove("deny-admin.yaml").unwrap();
    let r = l.until("the tcp port open again", || over_tcp("/again").map_err(|e| format!("{e:#}")));
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn between_the_nodes_the_waypoint_path_carries_only_tls() {
    let Some(l) = WaypointLab::start("wp-wire") else { return };
    l.until_served_by(l.client, "/warm-up", &[], "echo-v1");
    // Node 2 (the servers) is reached only from the waypoint on node 1: sniff node 2's link to the fabric.
    let iface = l.mesh.lab().node(l.nodes[1]).fabric_iface.clone();
    let sniffer = Sniffer::start(l.mesh.lab().fabric(), &iface).unwrap();
    let marker = "AMBIT-SECRET-L7-PLAINTEXT-4242";
    for i in 0..3 {
        let req = Request::new("POST", ECHO_HOST, &format!("/{marker}/{i}")).header("x-secret", marker).body(marker);
        let r = l.send_from(l.client, req).expect("request through the waypoint");
        assert_eq!((r.status, r.header("x-served-by")), (200, Some("echo-v1")), "{r:?}");
    }
    let cap = sniffer.stop();
    let seen = l.v1.requests();
    let last = seen.last().expect("echo-v1 saw the requests");
    assert!(last.path.contains(marker), "the marker reached the server in the path: {last:?}");
    assert_eq!(last.peer.ip(), IpAddr::V4(l.ip(l.wp)), "the request came from the waypoint: {last:?}");
    assert!(!cap.contains(marker.as_bytes()), "request or response plaintext seen between the nodes");
    assert!(cap.tls_application_data_records() > 0, "no TLS records seen: is the sniffer on the right link?");
    let ports = cap.tcp_ports_seen();
    assert!(ports.iter().any(|(a, b)| *a == 15008 || *b == 15008), "no HBONE port between the nodes: {ports:?}");
    assert!(!ports.iter().any(|(a, b)| [APP_PORT, 80].contains(a) || [APP_PORT, 80].contains(b)), "{ports:?}");
}
