//! Policy changes reach open connections: when the policies change, the
//! destination ztunnel decides its open inbound connections again, closes
//! those now denied (with a log line naming the policy and a count in
//! `ztunnel_connections_closed_by_policy_total`), and leaves the others
//! alone. Controller mode: policies are `security.istio.io/v1` YAML written
//! to the controller's directory, as a user would. Needs root.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ambit_e2e::apps::connect;
use ambit_e2e::check::{echo_on, eventually, round_trip, TIMEOUT};
use ambit_e2e::fixture::Cluster;
use ambit_e2e::NetNs;

/// How long a closing may take once the policy is in the ztunnels' config.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// How long an allowed connection is watched after a policy change.
const WATCH: Duration = Duration::from_secs(2);

const CLOSED_BY_POLICY: &str = "ztunnel_connections_closed_by_policy_total";

/// An AuthorizationPolicy in namespace `default`; `spec` is its indented body.
fn authorization_policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}"
    )
}

/// A DENY of the service account `sa` of namespace `default`.
fn deny_sa(name: &str, sa: &str) -> String {
    authorization_policy(
        name,
        &format!("  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/default/sa/{sa}]\n"),
    )
}

/// A connection from `ns` to `addr` that has carried one echo.
fn open(ns: &NetNs, addr: std::net::SocketAddr, what: &str) -> TcpStream {
    let mut s = connect(ns, addr, TIMEOUT).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    echo_on(&mut s, format!("{what}: opened").as_bytes()).unwrap_or_else(|e| panic!("{what}: first echo: {e}"));
    s
}

/// Whether `s` is ended by the far side (end of stream or reset) within `within`.
fn cut_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Whether writing on `s` fails within a few seconds (the peer reset it).
fn writes_fail(s: &mut TcpStream) -> bool {
    eventually(Duration::from_secs(3), || s.write_all(b"after the close").is_err())
}

/// Echoes on `s` for `WATCH`; panics naming `what` if one fails.
fn keeps_carrying(s: &mut TcpStream, what: &str) {
    let deadline = Instant::now() + WATCH;
    let mut i = 0;
    while Instant::now() < deadline {
        echo_on(s, format!("{what} {i}").as_bytes()).unwrap_or_else(|e| panic!("{what}: echo {i} failed: {e}"));
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The label-less counter of connections closed by policy on `node`.
fn closed_by_policy(c: &Cluster, node: usize) -> f64 {
    let text = c.mesh.ztunnel(c.nodes[node]).metrics().unwrap();
    let value = text.lines().find_map(|l| l.strip_prefix(CLOSED_BY_POLICY)?.strip_prefix(' ')?.parse().ok());
    value.unwrap_or_else(|| panic!("no {CLOSED_BY_POLICY} in the metrics:\n{text}"))
}

/// The destination ztunnel's log lines about connections it closed.
fn close_log_lines(c: &Cluster) -> Vec<String> {
    let log = std::fs::read_to_string(&c.mesh.ztunnel(c.nodes[1]).args().log_file).unwrap_or_default();
    log.lines().filter(|l| l.contains("open connection closed")).map(str::to_owned).collect()
}

#[test]
fn a_deny_written_while_connections_are_open_closes_the_ones_it_denies() {
    let Some(c) = Cluster::start("reeval-deny", |_| {}) else { return };
    let (remote, ext_ip) = (c.app(c.remote), c.mesh.lab().host(c.ext).ip);
    let mut client = open(c.pod_ns(c.client), remote, "client over hbone");
    let mut local = open(c.pod_ns(c.local), remote, "local over hbone");
    let mut plain = open(c.ext_ns(), remote, "ext in plaintext");
    assert_eq!(closed_by_policy(&c, 1), 0.0);

    c.apply("deny-client.yaml", &deny_sa("deny-client", "client"));
    assert!(cut_within(&mut client, CLOSE_BOUND), "the open connection of the denied client still runs");
    assert!(writes_fail(&mut client), "writes still succeed on the closed connection");
    assert!(round_trip(c.pod_ns(c.client), remote, b"new").is_err(), "a new connection of the client got through");
    keeps_carrying(&mut local, "local (another identity)");
    keeps_carrying(&mut plain, "plaintext (no identity)");
    assert_eq!(closed_by_policy(&c, 1), 1.0, "one connection closed by policy");
    assert_eq!(closed_by_policy(&c, 0), 0.0, "the source's ztunnel closed nothing by policy");
    let lines = close_log_lines(&c);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("default/deny-client") && lines[0].contains("sa/client"), "{lines:?}");

    // Plaintext inbound is decided again too: STRICT denies peers without identity.
    let strict = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  \
                  namespace: default\nspec:\n  mtls:\n    mode: STRICT\n";
    c.apply("strict.yaml", strict);
    assert!(cut_within(&mut plain, CLOSE_BOUND), "the plaintext connection survived STRICT");
    assert!(writes_fail(&mut plain), "writes still succeed on the closed plaintext connection");
    keeps_carrying(&mut local, "local under STRICT");
    assert_eq!(closed_by_policy(&c, 1), 2.0);
    let lines = close_log_lines(&c);
    assert!(
        lines.iter().any(|l| l.contains("istio_converted_static_strict") && l.contains(&ext_ip.to_string())),
        "{lines:?}"
    );
}

#[test]
fn an_allow_that_does_not_admit_an_open_connection_closes_it() {
    let Some(c) = Cluster::start("reeval-allow", |_| {}) else { return };
    let remote = c.app(c.remote);
    let mut client = open(c.pod_ns(c.client), remote, "client");
    c.apply(
        "only-other.yaml",
        &authorization_policy(
            "only-other",
            "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [other]\n",
        ),
    );
    assert!(cut_within(&mut client, CLOSE_BOUND), "the connection no ALLOW admits still runs");
    assert!(writes_fail(&mut client));
    assert_eq!(closed_by_policy(&c, 1), 1.0);
    let lines = close_log_lines(&c);
    assert!(lines.len() == 1 && lines[0].contains("no allow policy matched"), "{lines:?}");
}

#[test]
fn policies_that_do_not_deny_an_open_connection_leave_it_alone() {
    let Some(c) = Cluster::start("reeval-unrelated", |_| {}) else { return };
    let remote = c.app(c.remote);
    let mut client = open(c.pod_ns(c.client), remote, "client");
    // A DENY of another identity, then an ALLOW that admits the client.
    c.apply("deny-local.yaml", &deny_sa("deny-local", "local"));
    assert!(eventually(TIMEOUT, || round_trip(c.pod_ns(c.local), remote, b"x").is_err()), "the DENY is not in force");
    keeps_carrying(&mut client, "client after an unrelated DENY");
    c.apply(
        "allow-default.yaml",
        &authorization_policy(
            "allow-default",
            "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        namespaces: [default]\n",
        ),
    );
    keeps_carrying(&mut client, "client after an ALLOW that admits it");
    assert_eq!(closed_by_policy(&c, 1), 0.0);
    assert!(close_log_lines(&c).is_empty());
}

#[test]
fn after_a_deny_is_removed_new_connections_work_and_stay_open() {
    let Some(c) = Cluster::start("reeval-removed", |_| {}) else { return };
    let remote = c.app(c.remote);
    c.apply("deny-client.yaml", &deny_sa("deny-client", "client"));
    assert!(round_trip(c.pod_ns(c.client), remote, b"x").is_err(), "the DENY is not in force");
    let mut local = open(c.pod_ns(c.local), remote, "local, open while the DENY is removed");
    c.remove("deny-client.yaml");
    assert!(eventually(TIMEOUT, || round_trip(c.pod_ns(c.client), remote, b"x").is_ok()), "removal not applied");
    keeps_carrying(&mut local, "local after the removal (access widened)");
    let mut client = open(c.pod_ns(c.client), remote, "client after the removal");
    keeps_carrying(&mut client, "client after the removal");
    c.apply("deny-nobody.yaml", &deny_sa("deny-nobody", "nobody"));
    keeps_carrying(&mut client, "client after another policy change");
    assert_eq!(closed_by_policy(&c, 1), 0.0);
}
