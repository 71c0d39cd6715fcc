//! End-to-end tests of the waypoint's HTTP handling in the lab ([`WaypointLab`], shared with `mesh_waypoint.rs`:
//! the real controller, ztunnels and `ambit-waypoint`, HBONE with mutual TLS, the echo servers in `echo-v1` and
//! `echo-v2`), for what the request path does at its edges: a request body is kept for a retry only up to the
//! replay limit (64 KiB), so a larger one is sent once; `Expect: 100-continue` gets its interim `100 Continue`
//! before the client sends the body; a request over the header limits is refused with 431 while the waypoint keeps
//! serving. Needs root; fails (not skips) under CI.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_e2e::check::TIMEOUT;
use ambit_e2e::http::{HttpConnection, Request};
use ambit_e2e::http_server::EchoReply;
use ambit_e2e::waypoint_lab::{WaypointLab, ECHO_HOST, ECHO_VIP};
use ambit_waypoint::retry::REPLAY_LIMIT;

/// `POST path` to `echo` with a body of `size` bytes.
fn post(size: usize, path: &str) -> Request {
    Request::new("POST", ECHO_HOST, path).body(vec![b'x'; size])
}

#[test]
fn a_request_body_over_the_64_kib_replay_limit_is_not_retried() {
    let Some(l) = WaypointLab::start("wp-http-replay") else { return };
    assert_eq!(REPLAY_LIMIT, 64 * 1024, "the replay limit this test is about");
    l.until_served_by(l.client, "/ready", &[], "echo-v1");
    let at_v1 = |path: &str| l.v1.requests().iter().filter(|q| q.path == path).count();
    // No route: Istio's default policy, 2 retries of a 503 (on echo-v1 again, `echo`'s only endpoint). A body the
    // waypoint kept is sent whole with every attempt; one over the limit streams through once, so the 503 of that
    // single attempt goes back to the client.
    for (size, attempts) in [(0, 3), (1024, 3), (REPLAY_LIMIT, 3), (REPLAY_LIMIT + 1, 1), (100 * 1024, 1)] {
        let path = format!("/status/503/body-{size}");
        let r = l.send_from(l.client, post(size, &path)).unwrap_or_else(|e| panic!("POST {size} bytes: {e:#}"));
        let echo = EchoReply::parse(&r.body).unwrap_or_else(|| panic!("POST {size} bytes: {r:?}"));
        assert_eq!((r.status, echo.server.as_str()), (503, "echo-v1"), "POST {size} bytes: {r:?}");
        assert_eq!(echo.body_bytes, size, "the last attempt did not carry the whole body");
        assert_eq!(at_v1(&path), attempts, "attempts for a body of {size} bytes (replay limit {REPLAY_LIMIT})");
    }
    // A body over the limit that succeeds is not affected: sent once, whole.
    let r = l.send_from(l.client, post(100 * 1024, "/big-ok")).expect("POST 100 KiB");
    let echo = EchoReply::parse(&r.body).unwrap_or_else(|| panic!("{r:?}"));
    assert_eq!((r.status, echo.body_bytes, at_v1("/big-ok")), (200, 100 * 1024, 1), "{r:?}");
}

#[test]
fn expect_100_continue_gets_100_continue_before_the_body_is_sent() {
    let Some(l) = WaypointLab::start("wp-http-continue") else { return };
    l.until_served_by(l.client, "/ready", &[], "echo-v1");
    // A body the waypoint buffers for replay and one it streams: both are asked for with 100 Continue.
    for size in [1024, 100 * 1024] {
        let path = format!("/continue/{size}");
        let mut conn = HttpConnection::connect(l.ns(l.client), SocketAddr::from((ECHO_VIP, 80)), TIMEOUT).unwrap();
        let req = post(size, &path).header("Expect", "100-continue");
        let started = Instant::now();
        let (interim, r) = conn
            .send_expecting_continue(&req, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("POST {size} bytes with Expect: {e:#}"));
        let interim = interim.unwrap_or_else(|| panic!("no 100 Continue within 3 s for {size} bytes; then {r:?}"));
        assert_eq!(interim.status, 100, "{interim:?}");
        println!("{size} bytes: 100 Continue, then the answer, in {:?}", started.elapsed());
        let echo = EchoReply::parse(&r.body).unwrap_or_else(|| panic!("{r:?}"));
        assert_eq!((r.status, echo.method.as_str(), echo.path.as_str()), (200, "POST", path.as_str()), "{r:?}");
        assert_eq!(echo.body_bytes, size, "the server got the body sent after 100 Continue");
        // The connection goes on: the next request on it is served.
        let next = conn.send(&Request::get(ECHO_HOST, "/after-continue").close()).expect("a request after");
        assert_eq!(next.status, 200, "{next:?}");
    }
}

#[test]
fn a_request_over_the_header_limits_gets_431_and_the_waypoint_keeps_serving() {
    let Some(mut l) = WaypointLab::start("wp-http-headers") else { return };
    l.until_served_by(l.client, "/ready", &[], "echo-v1");
    let reached = |path: &str| l.v1.requests().iter().any(|q| q.path == path);

    // More than 100 header fields (hyper's limit, which the waypoint keeps): 431 from the waypoint.
    let many = (0..110).fold(Request::get(ECHO_HOST, "/many-headers"), |r, i| r.header(&format!("x-h-{i}"), "v"));
    let r = l.send_from(l.client, many).expect("an answer to 110 header fields");
    assert_eq!(r.status, 431, "{r:?}");
    assert!(!reached("/many-headers"), "a request over the header count reached echo-v1");
    // 100 fields in all pass.
    let fine = (0..97).fold(Request::get(ECHO_HOST, "/enough-headers"), |r, i| r.header(&format!("x-h-{i}"), "v"));
    let r = l.send_from(l.client, fine).expect("an answer to 100 header fields");
    assert_eq!(r.status, 200, "{r:?}");

    // A head larger than the waypoint's read buffer (about 400 KiB): 431, or the connection closed before the
    // whole head was written (the waypoint stops reading once it answers); never forwarded.
    let huge = Request::get(ECHO_HOST, "/huge-header").header("x-huge", &"h".repeat(512 * 1024));
    match l.send_from(l.client, huge) {
        Ok(r) => assert_eq!(r.status, 431, "{r:?}"),
        Err(e) => println!("a 512 KiB header: the connection closed ({e:#})"),
    }
    assert!(!reached("/huge-header"), "a 512 KiB header reached echo-v1");

    // Still up, and the next connection is served.
    assert!(l.waypoint.is_running(), "the waypoint exited; log:\n{}", l.waypoint.log_text());
    let r = l.get("/after-431", &[]).expect("a request after the refusals");
    assert_eq!((r.status, r.header("x-served-by")), (200, Some("echo-v1")), "{r:?}");
}
