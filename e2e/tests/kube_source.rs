//! The controller's Kubernetes source against a real kube-apiserver (etcd, kube-apiserver, kube-controller-manager on
//! 127.0.0.1; no kubelet: the test sets pod status itself). `KubeSource` runs in-process; the test writes through
//! kubectl and watches the published snapshots.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_api::workload::{address, TunnelProtocol};
use ambit_controller::model::{ModelOptions, Rejection, RejectionSink, Snapshot, SnapshotRx};
use ambit_controller::sources::kube::KubeSource;
use ambit_e2e::kube::{skip_without_kube, KubeCluster};

const NS: &str = "mesh";

fn pod_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  labels: {{app: {name}}}\n\
         spec:\n  nodeName: node-1\n  automountServiceAccountToken: false\n  containers:\n  - name: c\n    image: x\n"
    )
}

async fn wait_for(rx: &mut SnapshotRx, secs: u64, what: &str, f: impl Fn(&Snapshot) -> bool) -> Instant {
    let found = tokio::time::timeout(Duration::from_secs(secs), rx.wait_for(|s| f(s))).await.is_ok();
    assert!(found, "no snapshot where {what} within {secs} s; last: {:#?}", rx.borrow());
    Instant::now()
}

fn is_hbone(s: &Snapshot, pod: &str) -> bool {
    let uid = format!("Kubernetes//Pod/{NS}/{pod}");
    matches!(
        s.addresses.get(&uid).and_then(|a| a.r#type.as_ref()),
        Some(address::Type::Workload(w)) if w.tunnel_protocol == TunnelProtocol::Hbone as i32
    )
}

async fn wait_accepted(cluster: &KubeCluster, name: &str, f: impl Fn(&str) -> bool) -> String {
    wait_condition(cluster, name, "Accepted", f).await
}

async fn wait_condition(cluster: &KubeCluster, name: &str, type_: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = cluster.policy_condition(NS, name, type_).unwrap();
        if f(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "{name}: {type_} condition is {c:?} after 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_follows_pods_namespaces_and_policies_and_writes_policy_status() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info,ambit_controller=debug".into()))
        .with_test_writer()
        .try_init();
    let cluster = match KubeCluster::start("kube-source") {
        Ok(c) => c,
        Err(e) if skip_without_kube("kube_source", &e) => return,
        Err(e) => panic!("{e:#}"),
    };
    cluster.create_node("node-1").unwrap();
    cluster.kubectl(["create", "namespace", NS]).unwrap();
    cluster.apply_retrying(&pod_yaml("a"));
    cluster.set_pod_running(NS, "a", "10.1.0.5").unwrap();

    // Started before any Istio CRD exists (and the Gateway CRD never does): the core kinds must still publish.
    let seen: Arc<Mutex<Vec<Vec<Rejection>>>> = Arc::default();
    let sink: RejectionSink = {
        let seen = seen.clone();
        Arc::new(move |r: &[Rejection]| seen.lock().unwrap().push(r.to_vec()))
    };
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let client = cluster.client().await.unwrap();
    let source = tokio::spawn(KubeSource::new(client, ModelOptions::default()).run(tx, sink));
    wait_for(&mut rx, 20, "a first model is published", |s| s.version >= 1).await;
    assert!(!is_hbone(&rx.borrow(), "a"), "pod a is HBONE before its namespace is ambient");

    // Labelling the namespace ambient captures its running pods.
    let t0 = Instant::now();
    cluster.kubectl(["label", "namespace", NS, "istio.io/dataplane-mode=ambient"]).unwrap();
    let t = wait_for(&mut rx, 10, "pod a is HBONE", |s| is_hbone(s, "a")).await;
    println!("namespace label → published snapshot: {:?}", t - t0);
    let identities = rx.borrow().identities_by_node.get("node-1").cloned().unwrap_or_default();
    assert!(identities.contains(&(NS.to_string(), "default".to_string())), "{identities:?}");

    // One pod change, timed from the API write (the kubelet's status patch) to the published snapshot.
    cluster.apply_retrying(&pod_yaml("b"));
    // The write goes through kube-rs, not kubectl, so that the time excludes a process start.
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(cluster.client().await.unwrap(), NS);
    let status = serde_json::json!({"status": {
        "phase": "Running", "podIP": "10.1.0.6", "podIPs": [{"ip": "10.1.0.6"}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    let t0 = Instant::now();
    pods.patch_status("b", &Default::default(), &kube::api::Patch::Merge(&status)).await.unwrap();
    let written = Instant::now();
    let t = wait_for(&mut rx, 10, "pod b is HBONE", |s| is_hbone(s, "b")).await;
    println!(
        "pod status write → published snapshot: {:?} after the write returned ({:?} after it was sent; debounce 50 ms)",
        t.saturating_duration_since(written),
        t - t0
    );

    // Deleting a pod removes it.
    cluster.kubectl(["-n", NS, "delete", "pod", "a", "--grace-period=0", "--force"]).unwrap();
    wait_for(&mut rx, 10, "pod a is gone", |s| !s.addresses.contains_key(&format!("Kubernetes//Pod/{NS}/a"))).await;
    assert!(is_hbone(&rx.borrow(), "b"));

    // Installing the CRDs later is picked up (the watchers retry with backoff), and policies flow.
    cluster.apply(include_str!("../testdata/crds.yaml")).unwrap();
    cluster
        .wait_established(&["crd/authorizationpolicies.security.istio.io", "crd/peerauthentications.security.istio.io"])
        .unwrap();
    let policy = |name: &str, spec: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n{spec}")
    };
    let good = policy(
        "allow-b",
        "  selector: {matchLabels: {app: b}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {namespaces: [mesh]}\n",
    );
    let bogus = policy("bogus-action", "  action: BOGUS\n");
    let bad_ip = policy("bad-ipblock", "  rules:\n  - from:\n    - source: {ipBlocks: [not-an-ip]}\n");
    let l7 = policy("allow-get", "  action: ALLOW\n  rules:\n  - to:\n    - operation: {methods: [GET]}\n");
    let waypoint =
        policy("at-waypoint", "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]\n");
    cluster.apply(&format!("{good}---\n{bogus}---\n{bad_ip}---\n{l7}---\n{waypoint}")).unwrap();
    wait_for(&mut rx, 60, "allow-b is an authorization", |s| s.authorizations.contains_key("mesh/allow-b")).await;
    {
        let s = rx.borrow();
        assert!(!s.authorizations.contains_key("mesh/bogus-action"));
        assert!(!s.authorizations.contains_key("mesh/bad-ipblock"));
        assert!(is_hbone(&s, "b"), "the pods still publish next to invalid policies");
    }

    // Status conditions: the invalid ones say why, the valid one is accepted.
    let c = wait_accepted(&cluster, "bogus-action", |c| c.starts_with("False|Invalid|")).await;
    assert!(c.contains("BOGUS"), "{c}");
    let c = wait_accepted(&cluster, "bad-ipblock", |c| c.starts_with("False|Invalid|")).await;
    assert!(c.contains("not-an-ip"), "{c}");
    wait_accepted(&cluster, "allow-b", |c| c == "True|Accepted|").await;
    wait_condition(&cluster, "allow-b", "ZtunnelAccepted", |c| c == "True|Accepted|attached to ztunnel").await;
    wait_condition(&cluster, "bad-ipblock", "ZtunnelAccepted", |c| c.starts_with("False|Invalid|")).await;
    // Honest status: dropped L7 rules and an unenforced waypoint policy are not plainly "accepted".
    let c = wait_condition(&cluster, "allow-get", "ZtunnelAccepted", |c| c.starts_with("True|UnsupportedValue|")).await;
    assert!(c.contains("methods") && c.contains("waypoint"), "{c}");
    // No waypoint Gateway `wp` exists: the policy reaches no waypoint, and says so.
    let c =
        wait_condition(&cluster, "at-waypoint", "WaypointAccepted", |c| c.starts_with("False|TargetNotFound|")).await;
    assert!(c.contains("no effect"), "{c}");
    assert_eq!(cluster.policy_condition(NS, "at-waypoint", "ZtunnelAccepted").unwrap(), "");
    let last = seen.lock().unwrap().last().cloned().unwrap_or_default();
    let mut names: Vec<&str> = last.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["bad-ipblock", "bogus-action"], "{last:?}");

    // The controller does not loop on its own status writes.
    let rv = || {
        cluster
            .kubectl(["-n", NS, "get", "authorizationpolicy", "-o", "jsonpath={.items[*].metadata.resourceVersion}"])
            .unwrap()
    };
    let before = rv();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(before, rv(), "policies keep changing: the controller rewrites its own status");

    // Fixing a policy flips its condition and publishes it.
    cluster.apply(&policy("bogus-action", "  action: DENY\n  rules:\n  - {}\n")).unwrap();
    wait_for(&mut rx, 10, "the fixed policy is an authorization", |s| {
        s.authorizations.contains_key("mesh/bogus-action")
    })
    .await;
    wait_accepted(&cluster, "bogus-action", |c| c == "True|Accepted|").await;

    source.abort();
}
