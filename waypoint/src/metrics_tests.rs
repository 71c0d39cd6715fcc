use prometheus_client::encoding::text::encode;

use super::*;
use crate::config::Tunnel;

/// The labels of `istio_requests_total`, in order.
const ISTIO_LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

fn workload(name: &str, namespace: &str, sa: &str, canonical: &str, revision: &str) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/{namespace}/{name}-0"),
        name: format!("{name}-0"),
        namespace: namespace.into(),
        addresses: vec!["10.0.0.1".parse().unwrap()],
        identity: Identity::new("cluster.local", namespace, sa),
        node: "node-1".into(),
        healthy: true,
        tunnel: Tunnel::Hbone,
        canonical_name: canonical.into(),
        canonical_revision: revision.into(),
        workload_name: name.into(),
        cluster_id: "Kubernetes".into(),
        services: Default::default(),
    }
}

fn echo() -> ServiceLabels {
    ServiceLabels::from_service(&Service {
        name: "echo".into(),
        namespace: "apps".into(),
        hostname: "echo.apps.svc.cluster.local".into(),
        vips: Vec::new(),
        ports: Vec::new(),
        subject_alt_names: Vec::new(),
        allow_unhealthy: false,
    })
}

fn record<'a>(
    source: &'a WorkloadLabels,
    destination: Option<&'a WorkloadLabels>,
    service: &'a ServiceLabels,
) -> RequestRecord<'a> {
    RequestRecord {
        source,
        destination,
        service,
        protocol: RequestProtocol::Http,
        response_code: 200,
        grpc_status: None,
        response_flags: response_flags::NONE,
        duration: Duration::from_millis(7),
        request_bytes: 150,
        response_bytes: 0,
    }
}

fn encoded(reg: &Registry) -> String {
    let mut out = String::new();
    encode(&mut out, reg).unwrap();
    out
}

/// The `metric{…} value` lines whose name is exactly `metric`.
fn lines<'a>(out: &'a str, metric: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.strip_prefix(metric).is_some_and(|r| r.starts_with('{') || r.starts_with(' '))).collect()
}

/// The label names of a `metric{…} value` line, in order.
fn label_names(line: &str) -> Vec<&str> {
    let inner = &line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()];
    inner.split("\",").filter_map(|kv| kv.split_once('=')).map(|(k, _)| k.trim_start_matches(',')).collect()
}

#[test]
fn a_request_between_known_workloads_has_istios_labels_in_order() {
    let mut reg = Registry::default();
    let m = Metrics::new(&mut reg);
    let src = WorkloadLabels::from_workload(&workload("client", "apps", "client-sa", "client-app", "v1"));
    let dst = WorkloadLabels::from_workload(&workload("server", "apps", "server-sa", "server-app", ""));
    let svc = echo();
    m.request(&record(&src, Some(&dst), &svc));
    let out = encoded(&reg);
    let requests = lines(&out, "istio_requests_total");
    assert_eq!(requests.len(), 1, "{out}");
    assert_eq!(label_names(requests[0]), ISTIO_LABELS, "{out}");
    let want = "istio_requests_total{reporter=\"waypoint\",source_workload=\"client\",\
        source_canonical_service=\"client-app\",source_canonical_revision=\"v1\",source_workload_namespace=\"apps\",\
        source_principal=\"spiffe://cluster.local/ns/apps/sa/client-sa\",source_app=\"client-app\",source_version=\"v1\",\
        source_cluster=\"Kubernetes\",destination_workload=\"server\",destination_workload_namespace=\"apps\",\
        destination_principal=\"spiffe://cluster.local/ns/apps/sa/server-sa\",destination_app=\"server-app\",\
        destination_version=\"unknown\",destination_service=\"echo.apps.svc.cluster.local\",\
        destination_service_name=\"echo\",destination_service_namespace=\"apps\",\
        destination_canonical_service=\"server-app\",destination_canonical_revision=\"unknown\",\
        destination_cluster=\"Kubernetes\",request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",\
        response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 1";
    assert_eq!(requests[0], want);
    // The histograms carry the same labels (plus `le` on buckets).
    for h in ["istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"] {
        let count = lines(&out, &format!("{h}_count"));
        assert_eq!(count, [want.replace("istio_requests_total", &format!("{h}_count"))], "{out}");
    }
}

#[test]
fn an_unknown_source_and_no_destination_render_unknown() {
    let mut reg = Registry::default();
    let m = Metrics::new(&mut reg);
    let src = WorkloadLabels::from_identity(&Identity::new("cluster.local", "other", "stranger"));
    let svc = ServiceLabels::default();
    let r = RequestRecord {
        protocol: RequestProtocol::Grpc,
        grpc_status: Some(14),
        response_code: 503,
        response_flags: response_flags::NO_HEALTHY_UPSTREAM,
        ..record(&src, None, &svc)
    };
    m.request(&r);
    let out = encoded(&reg);
    let line = lines(&out, "istio_requests_total")[0];
    let want = "istio_requests_total{reporter=\"waypoint\",source_workload=\"unknown\",\
        source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\",source_workload_namespace=\"other\",\
        source_principal=\"spiffe://cluster.local/ns/other/sa/stranger\",source_app=\"unknown\",source_version=\"unknown\",\
        source_cluster=\"unknown\",destination_workload=\"unknown\",destination_workload_namespace=\"unknown\",\
        destination_principal=\"unknown\",destination_app=\"unknown\",destination_version=\"unknown\",\
        destination_service=\"unknown\",destination_service_name=\"unknown\",destination_service_namespace=\"unknown\",\
        destination_canonical_service=\"unknown\",destination_canonical_revision=\"unknown\",\
        destination_cluster=\"unknown\",request_protocol=\"grpc\",response_code=\"503\",grpc_response_status=\"14\",\
        response_flags=\"UH\",connection_security_policy=\"mutual_tls\"} 1";
    assert_eq!(line, want);
}

#[test]
fn a_grpc_status_outside_grpcs_codes_counts_as_unknown() {
    let mut reg = Registry::default();
    let m = Metrics::new(&mut reg);
    let (src, svc) = (WorkloadLabels::default(), ServiceLabels::default());
    for code in [17, u32::MAX, 2] {
        m.request(&RequestRecord { grpc_status: Some(code), ..record(&src, None, &svc) });
    }
    let out = encoded(&reg);
    let requests = lines(&out, "istio_requests_total");
    assert_eq!(requests.len(), 1, "{out}");
    assert!(requests[0].contains("grpc_response_status=\"2\"") && requests[0].ends_with("} 3"), "{out}");
}

/// The `le` of a `…_bucket{le="…",…}` line (prometheus-client puts it first).
fn le(line: &str) -> &str {
    let rest = &line[line.find("{le=\"").unwrap() + 5..];
    &rest[..rest.find('"').unwrap()]
}

/// The value of `metric`'s bucket `le` (cumulative, as exposed).
fn bucket(out: &str, metric: &str, bound: &str) -> u64 {
    let line = lines(out, &format!("{metric}_bucket"))
        .into_iter()
        .find(|l| le(l) == bound)
        .unwrap_or_else(|| panic!("no {metric} bucket {bound}: {out}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn sum(out: &str, metric: &str) -> f64 {
    lines(out, &format!("{metric}_sum"))[0].rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn observations_land_in_istios_buckets() {
    let mut reg = Registry::default();
    let m = Metrics::new(&mut reg);
    let (src, svc) = (WorkloadLabels::default(), ServiceLabels::default());
    // 7 ms, 150 bytes in, 0 out; then 0.2 ms, 1 byte in, 2 MB out.
    m.request(&record(&src, None, &svc));
    m.request(&RequestRecord {
        duration: Duration::from_micros(200),
        request_bytes: 1,
        response_bytes: 2_000_000,
        ..record(&src, None, &svc)
    });
    let out = encoded(&reg);
    let d = "istio_request_duration_milliseconds";
    let les: Vec<&str> = lines(&out, &format!("{d}_bucket")).into_iter().map(le).collect();
    let mut want: Vec<String> = DURATION_BUCKETS_MS.iter().map(|b| format!("{b:.1}")).collect();
    want.push("+Inf".into());
    assert_eq!(les, want, "Istio's default duration buckets");
    assert_eq!(bucket(&out, d, "0.5"), 1);
    assert_eq!(bucket(&out, d, "5.0"), 1);
    assert_eq!(bucket(&out, d, "10.0"), 2);
    assert_eq!(bucket(&out, d, "+Inf"), 2);
    assert!((sum(&out, d) - 7.2).abs() < 1e-9, "{out}");
    let q = "istio_request_bytes";
    assert_eq!((bucket(&out, q, "1.0"), bucket(&out, q, "100.0"), bucket(&out, q, "1000.0")), (1, 1, 2));
    let p = "istio_response_bytes";
    assert_eq!((bucket(&out, p, "1.0"), bucket(&out, p, "1000000.0"), bucket(&out, p, "10000000.0")), (1, 1, 2));
    assert_eq!(bucket(&out, p, "100000000.0"), 2);
    assert_eq!(sum(&out, p), 2_000_000.0);
}

#[test]
fn requests_with_the_same_labels_share_a_series() {
    let mut reg = Registry::default();
    let m = Metrics::new(&mut reg);
    let src = WorkloadLabels::from_workload(&workload("client", "apps", "client-sa", "client-app", "v1"));
    let svc = echo();
    let other = m.clone();
    m.request(&record(&src, None, &svc));
    other.request(&record(&src.clone(), None, &echo()));
    m.request(&RequestRecord { response_code: 404, response_flags: "NR", ..record(&src, None, &svc) });
    let out = encoded(&reg);
    let requests = lines(&out, "istio_requests_total");
    assert_eq!(requests.len(), 2, "{out}");
    assert!(requests.iter().any(|l| l.contains("response_code=\"200\"") && l.ends_with("} 2")), "{out}");
    assert!(requests
        .iter()
        .any(|l| l.contains("response_code=\"404\",grpc_response_status=\"\",response_flags=\"NR\"")));
    assert_eq!(lines(&out, "istio_request_duration_milliseconds_count").len(), 2, "{out}");
}

#[test]
fn refused_counts_by_reason_from_zero() {
    let mut reg = Registry::default();
    let m = Metrics::new(&mut reg);
    m.refused(RefusedReason::tls_handshake);
    m.refused(RefusedReason::tls_handshake);
    m.refused(RefusedReason::unknown_target);
    let out = encoded(&reg);
    let counts = [
        ("unknown_target", 1),
        ("bad_request", 0),
        ("tls_handshake", 2),
        ("no_certificate", 0),
        ("policy_denied", 0),
        ("head_too_large", 0),
    ];
    for (reason, n) in counts {
        let line = format!("ambit_waypoint_refused_total{{reason=\"{reason}\"}} {n}");
        assert!(out.lines().any(|l| l == line), "{line} in {out}");
    }
}

#[test]
fn pool_and_configuration_metrics_have_the_waypoints_names() {
    let mut reg = Registry::default();
    let m = Metrics::new(&mut reg);
    let pool = m.pool();
    pool.pooled_connections.set(3);
    pool.retries.inc();
    m.config_problems(2);
    let out = encoded(&reg);
    for line in [
        "ambit_waypoint_pooled_connections 3",
        "ambit_waypoint_hbone_retries_total 1",
        "ambit_waypoint_config_problems 2",
        "# TYPE ambit_waypoint_pooled_connections gauge",
        "# TYPE ambit_waypoint_hbone_retries counter",
        "# TYPE istio_requests counter",
        "# TYPE istio_request_duration_milliseconds histogram",
        "# TYPE istio_request_bytes histogram",
        "# TYPE istio_response_bytes histogram",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} in {out}");
    }
    m.config_problems(0);
    assert!(encoded(&reg).lines().any(|l| l == "ambit_waypoint_config_problems 0"));
}

#[test]
fn request_protocol_follows_the_content_type() {
    let mut h = HeaderMap::new();
    assert_eq!(RequestProtocol::of(&h), RequestProtocol::Http);
    h.insert(CONTENT_TYPE, "application/grpc+proto".parse().unwrap());
    assert_eq!(RequestProtocol::of(&h), RequestProtocol::Grpc);
    h.insert(CONTENT_TYPE, "application/json".parse().unwrap());
    assert_eq!(RequestProtocol::of(&h), RequestProtocol::Http);
}

#[test]
fn workload_labels_take_the_proven_principal() {
    let w = workload("client", "apps", "client-sa", "client-app", "v1");
    let l = WorkloadLabels::from_workload(&w).with_principal(&Identity::new("cluster.local", "apps", "other"));
    assert_eq!(l.principal.as_str(), "spiffe://cluster.local/ns/apps/sa/other");
    assert_eq!(l.workload.as_str(), "client");
    assert!(WorkloadLabels::default().cluster.is_unknown());
}
