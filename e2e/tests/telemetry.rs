//! Istio's telemetry, checked by scraping both ztunnels: every label Istio's
//! ztunnel puts on `istio_tcp_*`, in its order and with the values Istio
//! derives (owner workload, canonical names from the pod labels, cluster,
//! SPIFFE principals, the service the client addressed), and a connection
//! denied by policy counted under its workloads with `response_flags="DENY"`.
//! The control plane is the real controller (see `fixture`).

use std::net::{Ipv4Addr, SocketAddr};

use ambit_e2e::apps::EchoServer;
use ambit_e2e::check::{eventually, metric, round_trip, TIMEOUT};
use ambit_e2e::fixture::{Cluster, APP_PORT};
use ambit_e2e::objects::ServiceSpec;
use ambit_e2e::PodSpec;

/// Istio ztunnel's `istio_tcp_*` labels, in its order.
const ISTIO_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// The labels of one sample line, in order (values unescaped enough for names).
fn labels(line: &str) -> Vec<(String, String)> {
    let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
    inner
        .split("\",")
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once("=\"").unwrap_or_else(|| panic!("bad label {kv:?} in {line}"));
            (k.to_owned(), v.trim_end_matches('"').to_owned())
        })
        .collect()
}

/// The one sample of `name` whose labels include `with`.
fn sample<'a>(text: &'a str, name: &str, with: &[(&str, &str)]) -> &'a str {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| with.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .collect();
    assert_eq!(lines.len(), 1, "want one {name} sample with {with:?}:\n{text}");
    lines[0]
}

#[test]
fn both_ztunnels_label_connections_with_istios_full_set() {
    let Some(mut c) = Cluster::start("telemetry-labels", |_| {}) else { return };
    let [n1, n2] = c.nodes;
    // The client names its canonical service and revision with Istio's own
    // labels; the server with the Kubernetes recommended ones.
    let mut shopper = PodSpec::new("shopper", "default", "shopper");
    shopper.labels.insert("service.istio.io/canonical-name".into(), "shop-frontend".into());
    shopper.labels.insert("version".into(), "v2".into());
    let mut catalog = PodSpec::new("catalog", "default", "catalog");
    catalog.labels.insert("app.kubernetes.io/name".into(), "catalog-api".into());
    catalog.labels.insert("app.kubernetes.io/version".into(), "v7".into());
    catalog.labels.insert("tier".into(), "catalog".into());
    let shopper = c.add_pod(n1, shopper);
    let catalog = c.add_pod(n2, catalog);
    let _echo =
        EchoServer::start(&c.mesh.lab().pod(catalog).netns, SocketAddr::from(([0, 0, 0, 0], APP_PORT))).unwrap();
    // Two services with the same target port: only the request's
    // `forwarded` header says which one the client addressed (a target-port
    // guess would pick `catalog-alt`, the first by name).
    let vip = Ipv4Addr::new(10, 96, 0, 40);
    c.add_service(ServiceSpec::new("catalog", "default", vip).port(80, APP_PORT).select("tier", "catalog"));
    c.add_service(
        ServiceSpec::new("catalog-alt", "default", Ipv4Addr::new(10, 96, 0, 41))
            .port(80, APP_PORT)
            .select("tier", "catalog"),
    );
    let svc = SocketAddr::from((vip, 80));
    assert!(eventually(TIMEOUT, || round_trip(c.pod_ns(shopper), svc, b"labels please").is_ok()));

    let expected = |reporter: &'static str| -> Vec<(&'static str, &'static str)> {
        let values = [
            reporter,
            "shopper",
            "shop-frontend",
            "v2",
            "default",
            "spiffe://cluster.local/ns/default/sa/shopper",
            "shop-frontend",
            "v2",
            "Kubernetes",
            "catalog.default.svc.cluster.local",
            "default",
            "catalog",
            "catalog",
            "catalog-api",
            "v7",
            "default",
            "spiffe://cluster.local/ns/default/sa/catalog",
            "catalog-api",
            "v7",
            "Kubernetes",
            "tcp",
            "-",
            "mutual_tls",
        ];
        ISTIO_LABELS.iter().copied().zip(values).collect()
    };
    for (node, reporter) in [(n1, "source"), (n2, "destination")] {
        let m = c.mesh.ztunnel(node).metrics().unwrap();
        let with = [("reporter", reporter), ("source_workload", "shopper")];
        let line = sample(&m, "istio_tcp_connections_opened_total", &with);
        let got = labels(line);
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ISTIO_LABELS, "{reporter} reporter's label names and order: {line}");
        let got: Vec<(&str, &str)> = got.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, expected(reporter), "{reporter} reporter's label values: {line}");
        assert!(metric(&m, "istio_build", &[("component", "ztunnel")]) == 1.0, "{m}");
    }

    // A DENY policy on the server: the destination counts the refused
    // connection under both workloads, closing with DENY.
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-shopper\n  \
                namespace: default\nspec:\n  selector:\n    matchLabels:\n      tier: catalog\n  action: DENY\n  rules:\n  \
                - from:\n    - source:\n        principals: [cluster.local/ns/default/sa/shopper]\n";
    c.apply("deny.yaml", deny);
    assert!(eventually(TIMEOUT, || round_trip(c.pod_ns(shopper), svc, b"x").is_err()), "the DENY did not apply");
    let denied = [
        ("reporter", "destination"),
        ("source_workload", "shopper"),
        ("source_canonical_service", "shop-frontend"),
        ("destination_workload", "catalog"),
        ("destination_service", "catalog.default.svc.cluster.local"),
        ("response_flags", "DENY"),
    ];
    let m2 = c.mesh.ztunnel(n2).metrics().unwrap();
    assert!(metric(&m2, "istio_tcp_connections_closed_total", &denied) >= 1.0, "{m2}");
    let names: Vec<String> =
        labels(sample(&m2, "istio_tcp_connections_closed_total", &denied)).into_iter().map(|(k, _)| k).collect();
    assert_eq!(names, ISTIO_LABELS);
    // As in Istio, a connection opens with "-" and only its close carries the flag.
    assert_eq!(metric(&m2, "istio_tcp_connections_opened_total", &denied), 0.0, "{m2}");
    let opened = [("reporter", "destination"), ("source_workload", "shopper"), ("response_flags", "-")];
    assert!(metric(&m2, "istio_tcp_connections_opened_total", &opened) >= 2.0, "{m2}");
    // The label-less failure counter is kept.
    let failures = [("direction", "inbound"), ("reason", "policy_denied")];
    assert!(metric(&m2, "ztunnel_connection_failures_total", &failures) >= 1.0, "{m2}");
}

/// The lines of `node`'s ztunnel log that contain `what`.
fn log_lines(c: &Cluster, node: ambit_e2e::lab::NodeId, what: &str) -> Vec<String> {
    let log = std::fs::read_to_string(&c.mesh.ztunnel(node).args().log_file).unwrap();
    assert!(!log.contains('\u{1b}'), "a log that is not a terminal carries no ANSI colour codes");
    log.lines().filter(|l| l.contains(what)).map(str::to_owned).collect()
}

#[test]
fn access_logs_name_both_ends_in_plain_or_json_and_the_flag_turns_them_off() {
    // node1 logs JSON; node2 plain, and after a restart without access logs.
    let Some(mut c) = Cluster::start("telemetry-access-log", |a| {
        if a.node_name == "node1" {
            a.extra.extend(["--log-format".into(), "json".into()]);
        }
    }) else {
        return;
    };
    let [n1, n2] = c.nodes;
    let remote = c.app(c.remote);
    assert!(eventually(TIMEOUT, || round_trip(c.pod_ns(c.client), remote, b"log me").is_ok()));
    // The close is logged when the relay ends; give it a moment.
    assert!(eventually(TIMEOUT, || !log_lines(&c, n2, "connection complete").is_empty()));

    // Source side, JSON: one object per line with Istio's field names.
    let client_ip = c.ip(c.client).to_string();
    let complete: Vec<serde_json::Value> = log_lines(&c, n1, "connection complete")
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let f = &complete.last().expect("the source logged the connection")["fields"];
    assert_eq!(f["direction"], "outbound", "{f}");
    assert!(f["src.addr"].as_str().unwrap().starts_with(&format!("{client_ip}:")), "{f}");
    assert_eq!(f["dst.addr"], remote.to_string(), "{f}");
    assert_eq!(f["src.workload"], "client", "{f}");
    assert_eq!(f["dst.workload"], "remote", "{f}");
    assert_eq!(f["src.identity"], "spiffe://cluster.local/ns/default/sa/client", "{f}");
    assert_eq!(f["dst.identity"], "spiffe://cluster.local/ns/default/sa/remote", "{f}");
    assert_eq!((f["bytes_sent"].as_u64(), f["bytes_recv"].as_u64()), (Some(6), Some(6)), "{f}");
    assert!(f["duration"].as_str().unwrap().ends_with("ms"), "{f}");
    assert_eq!(complete.last().unwrap()["level"], "INFO");
    // As Istio's ztunnel, the opening is logged at debug level only.
    assert!(log_lines(&c, n1, "connection opened").is_empty());

    // Destination side, plain text.
    let line = log_lines(&c, n2, "connection complete").pop().unwrap();
    for want in [
        "access:",
        "direction=\"inbound\"",
        "src.workload=\"client\"",
        "dst.workload=\"remote\"",
        &format!("dst.addr={remote}"),
        "bytes_sent=6",
        "bytes_recv=6",
    ] {
        assert!(line.contains(want), "{want:?} missing from {line}");
    }

    // A denied connection: logged at warn with its reason.
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  \
                namespace: default\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
                principals: [cluster.local/ns/default/sa/client]\n";
    c.apply("deny.yaml", deny);
    assert!(eventually(TIMEOUT, || round_trip(c.pod_ns(c.client), remote, b"x").is_err()), "the DENY did not apply");
    assert!(eventually(TIMEOUT, || log_lines(&c, n2, "connection complete")
        .iter()
        .any(|l| l.contains("WARN") && l.contains("error=policy_denied"))));
    c.remove("deny.yaml");
    assert!(eventually(TIMEOUT, || round_trip(c.pod_ns(c.client), remote, b"x").is_ok()));

    // Off: node2's ztunnel restarted with --access-log false logs no connection.
    c.mesh.start_ztunnel_with(n2, |a| a.extra.extend(["--access-log".into(), "false".into()])).unwrap();
    let before = log_lines(&c, n2, "connection ").len();
    assert!(eventually(TIMEOUT, || round_trip(c.pod_ns(c.client), remote, b"quiet").is_ok()));
    // The source logs the quiet connection's close (5 bytes each way), so the destination's is over too.
    assert!(eventually(TIMEOUT, || log_lines(&c, n1, "connection complete")
        .iter()
        .any(|l| l.contains("\"bytes_recv\":5"))));
    assert_eq!(log_lines(&c, n2, "connection ").len(), before, "access logs off, yet a connection was logged");
}
