//! End-to-end tests of the waypoint's HTTP handling in the lab ([`WaypointLab`], shared with `mesh_waypoint.rs`:
//! the real controller, ztunnels and `ambit-waypoint`, HBONE with mutual TLS, the echo servers in `echo-v1` and
//! `echo-v2`), for what the request path does at its edges: a request body is kept for a retry only up to the
//! replay limit (64 KiB), whether its length is known or it comes chunked, so a larger one is sent once;
//! `Expect: 100-continue` gets its interim `100 Continue` before the client sends the body; a request over the header limits (100 fields, 60 KiB) is refused with 431,
//! over HTTP/1.1 and HTTP/2, counted in `ambit_waypoint_refused_total{reason="head_too_large"}`, while the
//! waypoint keeps serving; retries of a failing
//! backend stay within the retry budget; on one HTTP/2 connection a stalled stream does not hold up another; and a
//! route changed six times while two clients send requests (kept-alive and new connections) fails none of them.
//! Needs root; fails (not skips) under CI.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_e2e::check::{metric, TIMEOUT};
use ambit_e2e::http::{HttpConnection, Request};
use ambit_e2e::http_server::EchoReply;
use ambit_e2e::waypoint_lab::{WaypointLab, ECHO_HOST, ECHO_VIP, H2_APP_PORT, H2_PORT};
use ambit_e2e::NetNs;
use ambit_waypoint::retry::REPLAY_LIMIT;
use bytes::Bytes;

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
    // The same with chunked bodies (length unknown until the end, as gRPC's and most HTTP/2 clients' are): streamed
    // to the first attempt and recorded up to the limit, sent again from the record.
    for (size, attempts) in [(1024, 3), (REPLAY_LIMIT, 3), (REPLAY_LIMIT + 1, 1), (100 * 1024, 1)] {
        let path = format!("/status/503/chunked-{size}");
        let r = l.send_from(l.client, post(size, &path).chunked()).unwrap_or_else(|e| panic!("chunked {size}: {e:#}"));
        let echo = EchoReply::parse(&r.body).unwrap_or_else(|| panic!("POST {size} bytes: {r:?}"));
        assert_eq!((r.status, echo.server.as_str()), (503, "echo-v1"), "POST {size} bytes: {r:?}");
        assert_eq!(echo.body_bytes, size, "the last attempt did not carry the whole body");
        assert_eq!(at_v1(&path), attempts, "attempts for a body of {size} bytes (replay limit {REPLAY_LIMIT})");
    }
    // A body over the limit that succeeds is not affected: sent once, whole.
    for (request, path) in
        [(post(100 * 1024, "/big-ok"), "/big-ok"), (post(100 * 1024, "/big-ok-chunked").chunked(), "/big-ok-chunked")]
    {
        let r = l.send_from(l.client, request).expect("POST 100 KiB");
        let echo = EchoReply::parse(&r.body).unwrap_or_else(|| panic!("{r:?}"));
        assert_eq!((r.status, echo.body_bytes, at_v1(path)), (200, 100 * 1024, 1), "{r:?}");
    }
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
    let refused = |l: &WaypointLab| {
        let m = l.waypoint.metrics().expect("waypoint metrics");
        metric(&m, "ambit_waypoint_refused_total", &[("reason", "head_too_large")])
    };
    // Each refusal is counted as its connection ends, just after the answer: polled.
    let until_refused = |l: &WaypointLab, n: f64| {
        l.until(&format!("{n} refusals counted as head_too_large"), || match refused(l) {
            c if c == n => Ok(()),
            c => Err(format!("{c} counted")),
        })
    };
    assert_eq!(refused(&l), 0.0);

    // More than 100 header fields (Envoy's limit, and hyper's for HTTP/1.1): 431 from the waypoint.
    let many = (0..110).fold(Request::get(ECHO_HOST, "/many-headers"), |r, i| r.header(&format!("x-h-{i}"), "v"));
    let r = l.send_from(l.client, many).expect("an answer to 110 header fields");
    assert_eq!(r.status, 431, "{r:?}");
    assert!(!reached("/many-headers"), "a request over the header count reached echo-v1");
    until_refused(&l, 1.0);
    // 100 fields in all pass.
    let fine = (0..97).fold(Request::get(ECHO_HOST, "/enough-headers"), |r, i| r.header(&format!("x-h-{i}"), "v"));
    let r = l.send_from(l.client, fine).expect("an answer to 100 header fields");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(refused(&l), 1.0, "a request within the limits counted as refused");
    // Over 60 KiB of headers (Envoy's limit, the waypoint's): 431; 50 KiB pass.
    let r = l.get("/big-header", &[("x-big", &"b".repeat(61 * 1024))]).expect("an answer to 61 KiB of headers");
    assert_eq!(r.status, 431, "{r:?}");
    assert!(!reached("/big-header"), "61 KiB of headers reached echo-v1");
    until_refused(&l, 2.0);
    let r = l.get("/fair-header", &[("x-fair", &"f".repeat(50 * 1024))]).expect("an answer to 50 KiB of headers");
    assert_eq!((r.status, r.header("x-served-by")), (200, Some("echo-v1")), "{r:?}");

    // A head larger than the waypoint's read buffer (about 400 KiB): 431, or the connection closed before the
    // whole head was written (the waypoint stops reading once it answers); never forwarded.
    let huge = Request::get(ECHO_HOST, "/huge-header").header("x-huge", &"h".repeat(512 * 1024));
    match l.send_from(l.client, huge) {
        Ok(r) => assert_eq!(r.status, 431, "{r:?}"),
        Err(e) => println!("a 512 KiB header: the connection closed ({e:#})"),
    }
    assert!(!reached("/huge-header"), "a 512 KiB header reached echo-v1");
    until_refused(&l, 3.0);

    // HTTP/2: the same limits, answered 431 on the stream; the connection goes on serving its other streams.
    let server = H2Server::start(l.ns(l.servers[0]), H2_APP_PORT, "echo-v1-h2");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = h2_connect(&l, &rt);
    let h2_status = |path: &str, headers: Vec<(String, String)>| {
        rt.block_on(h2_get_with(client.clone(), path, headers)).map(|(status, body, _)| (status, body))
    };
    let many: Vec<_> = (0..110).map(|i| (format!("x-h-{i}"), "v".to_owned())).collect();
    assert_eq!(h2_status("/h2-many", many).expect("an answer to 110 fields").0, 431);
    let big = vec![("x-big".to_owned(), "b".repeat(61 * 1024))];
    assert_eq!(h2_status("/h2-big", big).expect("an answer to 61 KiB of headers").0, 431);
    let fair = vec![("x-fair".to_owned(), "f".repeat(50 * 1024))];
    let (status, body) = h2_status("/h2-fair", fair).expect("an answer to 50 KiB of headers");
    assert_eq!(status, 200, "{body}");
    let answered = server.answered();
    assert!(!answered.iter().any(|p| p == "/h2-many" || p == "/h2-big"), "over the limits, forwarded: {answered:?}");
    until_refused(&l, 5.0);

    // Still up, and the next connection is served.
    assert!(l.waypoint.is_running(), "the waypoint exited; log:\n{}", l.waypoint.log_text());
    let r = l.get("/after-431", &[]).expect("a request after the refusals");
    assert_eq!((r.status, r.header("x-served-by")), (200, Some("echo-v1")), "{r:?}");
}

#[test]
fn retries_of_a_failing_backend_stay_within_the_retry_budget() {
    let Some(l) = WaypointLab::start("wp-http-budget") else { return };
    l.until_served_by(l.client, "/ready", &[], "echo-v1");
    // Many requests at once to an endpoint that fails each after a second with 503, which Istio's default policy
    // retries twice. The budget allows the larger of 10 retries in flight and 20 % of the requests in flight (6
    // here): so when the first attempts fail together, at most 10 requests get a retry (each holds its permit
    // through its backoff and its 1 s attempt, then trades it for its second retry's); the rest get their 503 at
    // once. Without the budget every request would be tried 3 times.
    const REQUESTS: usize = 30;
    const FLOOR: usize = 10;
    let client_ns = l.ns(l.client).name().to_string();
    let vip = SocketAddr::from((ECHO_VIP, 80));
    let started = Instant::now();
    let workers: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let ns = NetNs::borrowed(&client_ns);
            std::thread::spawn(move || -> anyhow::Result<u16> {
                let mut conn = HttpConnection::connect(&ns, vip, TIMEOUT)?;
                Ok(conn.send(&Request::get(ECHO_HOST, &format!("/delay/1000/status/503/{i}")).close())?.status)
            })
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        let status = w.join().expect("client thread").unwrap_or_else(|e| panic!("request {i}: {e:#}"));
        assert_eq!(status, 503, "request {i}");
    }
    let took = started.elapsed();
    let seen = l.v1.requests();
    let attempts = |i: usize| seen.iter().filter(|q| q.path == format!("/delay/1000/status/503/{i}")).count();
    let per_request: Vec<usize> = (0..REQUESTS).map(attempts).collect();
    let retried = per_request.iter().filter(|&&n| n > 1).count();
    let total: usize = per_request.iter().sum();
    println!("{REQUESTS} failing requests in {took:?}: {retried} retried, {total} attempts: {per_request:?}");
    // A request that got a retry gets its second too: its own finished retry does not hold it back.
    assert!(per_request.iter().all(|&n| n == 1 || n == 3), "attempts per request: {per_request:?}");
    assert!(retried >= 1, "no request was retried: {per_request:?}");
    assert!(retried <= FLOOR, "{retried} of {REQUESTS} requests retried, over the budget's {FLOOR}: {per_request:?}");
    assert!(total <= REQUESTS + 2 * FLOOR, "{total} attempts for {REQUESTS} requests: {per_request:?}");
}

/// An HTTP/2 (prior knowledge) server for `echo`'s port declared `h2c`, in a pod's namespace: every stream is
/// answered on its own (a `/delay/<ms>` one after that long) with `200` and `server <name>\npath <path>\nauthority
/// <:authority>\n`, or, like nginx, `400` when a `host` header comes beside `:authority`; the paths it answered are
/// listed in order of their answers.
struct H2Server {
    answered: Arc<Mutex<Vec<String>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl H2Server {
    fn start(ns: &NetNs, port: u16, name: &'static str) -> Self {
        let listener = ns.run(move || std::net::TcpListener::bind(("0.0.0.0", port))).expect("listen for h2");
        listener.set_nonblocking(true).unwrap();
        let answered = Arc::new(Mutex::new(Vec::new()));
        let seen = answered.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                while let Ok((tcp, _)) = listener.accept().await {
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                        while let Some(Ok((req, mut respond))) = conn.accept().await {
                            let seen = seen.clone();
                            tokio::spawn(async move {
                                let path = req.uri().path().to_owned();
                                let delay = path.strip_prefix("/delay/").and_then(|ms| ms.parse().ok());
                                if let Some(ms) = delay {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                }
                                let authority = req.uri().authority().map_or("-", |a| a.as_str());
                                let body = format!("server {name}\npath {path}\nauthority {authority}\n");
                                let status = if req.headers().contains_key(http::header::HOST) { 400 } else { 200 };
                                seen.lock().unwrap().push(path);
                                let head = http::Response::builder().status(status).body(()).unwrap();
                                if let Ok(mut send) = respond.send_response(head, false) {
                                    let _ = send.send_data(Bytes::from(body), true);
                                }
                            });
                        }
                    });
                }
            });
        });
        H2Server { answered, _thread: thread }
    }

    fn answered(&self) -> Vec<String> {
        self.answered.lock().unwrap().clone()
    }
}

/// `GET path` on `client`'s HTTP/2 connection: the status, the body, and when the answer was whole.
async fn h2_get(client: h2::client::SendRequest<Bytes>, path: &str) -> Result<(u16, String, Instant), h2::Error> {
    h2_get_with(client, path, Vec::new()).await
}

/// [`h2_get`] with request `headers`.
async fn h2_get_with(
    client: h2::client::SendRequest<Bytes>,
    path: &str,
    headers: Vec<(String, String)>,
) -> Result<(u16, String, Instant), h2::Error> {
    let mut client = client.ready().await?;
    let req = headers.iter().fold(http::Request::get(format!("http://{ECHO_HOST}{path}")), |r, (n, v)| r.header(n, v));
    let req = req.body(()).expect("a request");
    let (response, _) = client.send_request(req, true)?;
    let response = response.await?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    Ok((status, String::from_utf8_lossy(&text).into_owned(), Instant::now()))
}

/// One HTTP/2 connection from the client to `echo`'s h2c port, on `rt`, polled until the waypoint serves it (an
/// [`H2Server`] named `echo-v1-h2` answers).
fn h2_connect(l: &WaypointLab, rt: &tokio::runtime::Runtime) -> h2::client::SendRequest<Bytes> {
    let h2c = SocketAddr::from((ECHO_VIP, H2_PORT));
    let connect = || -> Result<h2::client::SendRequest<Bytes>, String> {
        let tcp = ambit_e2e::apps::connect(l.ns(l.client), h2c, TIMEOUT).map_err(|e| e.to_string())?;
        tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
            let (client, conn) = h2::client::handshake(tcp).await.map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let (status, body, _) = h2_get(client.clone(), "/h2-ready").await.map_err(|e| e.to_string())?;
            match status {
                200 if body.contains("server echo-v1-h2") => Ok(client),
                _ => Err(format!("status {status} body {body:?}")),
            }
        })
    };
    l.until("an HTTP/2 answer on echo's h2c port", connect)
}

#[test]
fn on_one_http2_connection_a_stalled_stream_does_not_hold_up_another() {
    let Some(l) = WaypointLab::start("wp-http-h2") else { return };
    let server = H2Server::start(l.ns(l.servers[0]), H2_APP_PORT, "echo-v1-h2");
    l.until_served_by(l.client, "/ready", &[], "echo-v1");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = h2_connect(&l, &rt);

    rt.block_on(async {
        let started = Instant::now();
        let stalled = tokio::spawn(h2_get(client.clone(), "/delay/4000"));
        // Let the stalled stream reach the server first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, body, quick_done) = tokio::time::timeout(Duration::from_secs(3), h2_get(client.clone(), "/quick"))
            .await
            .expect("the second stream was held up by the stalled one")
            .expect("the second stream");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("path /quick"), "{body}");
        assert!(body.contains(&format!("authority {ECHO_HOST}\n")), "the client's authority goes upstream: {body}");
        assert!(!stalled.is_finished(), "the stalled stream ended before the quick one was answered");
        let (status, body, stalled_done) = stalled.await.expect("task").expect("the stalled stream");
        assert_eq!((status, body.contains("path /delay/4000")), (200, true), "{body}");
        println!(
            "quick stream answered after {:?}, the stalled one after {:?}",
            quick_done - started,
            stalled_done - started
        );
        assert!(quick_done < stalled_done);
    });
    let answered = server.answered();
    let quick = answered.iter().position(|p| p == "/quick");
    let stalled = answered.iter().position(|p| p == "/delay/4000");
    assert!(quick.is_some() && quick < stalled, "the server answered in the order {answered:?}");
}

/// An HTTPRoute on `echo` sending every request to `backend`.
fn route_to(backend: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: echo-all, namespace: default}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\n  \
         rules: [{{backendRefs: [{{name: {backend}, port: 80}}]}}]\n"
    )
}

#[test]
fn a_route_changed_while_requests_run_fails_none_of_them() {
    let Some(l) = WaypointLab::start("wp-http-swap") else { return };
    let controller = l.mesh.controller().expect("controller");
    controller.write("route.yaml", &route_to("echo-v2")).unwrap();
    l.until_served_by(l.client, "/warm", &[], "echo-v2");

    // Two clients, until told to stop: one on a kept-alive connection, one on a new connection per request. Each
    // records which server answered, and every failure.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (served, failures) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let ns = || NetNs::borrowed(l.ns(l.client).name());
    let target = SocketAddr::from((ECHO_VIP, 80));
    let clients: Vec<_> = [true, false]
        .into_iter()
        .map(|keep_alive| {
            let (ns, stop, served, failures) = (ns(), stop.clone(), served.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut conn = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let result = (|| -> anyhow::Result<String> {
                        let mut c = match conn.take() {
                            Some(c) if keep_alive => c,
                            _ => HttpConnection::connect(&ns, target, TIMEOUT)?,
                        };
                        let req = Request::get(ECHO_HOST, "/swap");
                        let r = c.send(&if keep_alive { req } else { req.close() })?;
                        let echo = EchoReply::parse(&r.body).filter(|_| r.status == 200);
                        let server =
                            echo.map(|e| e.server).ok_or_else(|| anyhow::anyhow!("{} {:?}", r.status, r.body))?;
                        conn = Some(c);
                        Ok(server)
                    })();
                    match result {
                        Ok(server) => served.lock().unwrap().push(server),
                        Err(e) => failures.lock().unwrap().push(format!("keep-alive {keep_alive}: {e:#}")),
                    }
                }
            })
        })
        .collect();

    // Six route changes while they run, each waited for (the new backend answers) before the next.
    for backend in ["echo", "echo-v2", "echo", "echo-v2", "echo", "echo-v2"] {
        controller.write("route.yaml", &route_to(backend)).unwrap();
        let server = if backend == "echo" { "echo-v1" } else { "echo-v2" };
        l.until(&format!("the route to {backend} applied"), || match served.lock().unwrap().last() {
            Some(s) if s == server => Ok(()),
            last => Err(format!("last answer from {last:?}")),
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    clients.into_iter().for_each(|c| c.join().expect("client thread"));
    let served = served.lock().unwrap();
    let failures = failures.lock().unwrap();
    println!("{} requests answered across 6 route changes, {} failed", served.len(), failures.len());
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        served.len() + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(served.len() >= 100, "too few requests to say anything: {}", served.len());
}
