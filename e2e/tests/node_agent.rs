//! The node agent against a real kube-apiserver (no kubelet: the test plays
//! it, setting pods Running with an IP, and makes each "pod" a network
//! namespace holding that IP with a process in it, as a pause container).
//!
//! `watch_driver_*` runs the agent's watch driver in-process with an enroller
//! that records calls, so the Kubernetes logic (membership changes, retries,
//! reconcile after a restart, namespaces found by IP) is checked on its own.

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_cni::agent::kube::{self as driver, PodEnroller};
use ambit_cni::agent::{EnrollError, PodInfo};
use ambit_e2e::kube::{skip_without_kube, KubeCluster};
use ambit_e2e::NetNs;

const NODE: &str = "node-a";
const NS: &str = "shop";
const WAIT: Duration = Duration::from_secs(20);

/// Records enrolls and releases; enrolls of pods named in `fail` fail that
/// many times first.
#[derive(Default)]
struct Recorder {
    enrolled: Mutex<BTreeMap<String, PodInfo>>,
    enrolls: Mutex<Vec<String>>,
    releases: Mutex<Vec<String>>,
    fail: Mutex<BTreeMap<String, u32>>,
}

impl PodEnroller for Recorder {
    async fn enroll(&self, pod: PodInfo) -> Result<(), EnrollError> {
        self.enrolls.lock().unwrap().push(pod.name.clone());
        if let Some(n) = self.fail.lock().unwrap().get_mut(&pod.name).filter(|n| **n > 0) {
            *n -= 1;
            return Err(EnrollError::NoZtunnel);
        }
        self.enrolled.lock().unwrap().insert(pod.uid.clone(), pod);
        Ok(())
    }

    async fn release(&self, uid: String) -> Result<(), EnrollError> {
        if let Some(p) = self.enrolled.lock().unwrap().remove(&uid) {
            self.releases.lock().unwrap().push(p.name);
        }
        Ok(())
    }

    fn enrolled(&self) -> Vec<PodInfo> {
        self.enrolled.lock().unwrap().values().cloned().collect()
    }
}

impl Recorder {
    fn names(&self) -> Vec<String> {
        self.enrolled.lock().unwrap().values().map(|p| p.name.clone()).collect()
    }

    fn count(list: &Mutex<Vec<String>>, name: &str) -> usize {
        list.lock().unwrap().iter().filter(|n| *n == name).count()
    }
}

/// A "pod": a namespace holding `ip` on a dummy `eth0`, and a process in it.
struct FakePod {
    child: Child,
    _netns: NetNs,
}

impl FakePod {
    fn start(name: &str, ip: &str) -> FakePod {
        let netns = NetNs::create(&format!("ambit-agent-{name}-{}", std::process::id())).unwrap();
        netns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "peer0"]).unwrap();
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]).unwrap();
        netns.ip(&["link", "set", "peer0", "up"]).unwrap();
        netns.ip(&["link", "set", "eth0", "up"]).unwrap();
        let child = netns.command("sleep").arg("600").spawn().unwrap();
        FakePod { child, _netns: netns }
    }
}

impl Drop for FakePod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod_yaml(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  nodeName: {node}\n  \
         automountServiceAccountToken: false\n  containers:\n  - name: c\n    image: x\n"
    )
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_driver_enrolls_and_releases_pods_as_labels_change_and_reconciles_after_restart() {
    if !ambit_e2e::require_root("watch_driver") {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .try_init();
    let cluster = match KubeCluster::start("node-agent-driver") {
        Ok(c) => c,
        Err(e) if skip_without_kube("node_agent watch_driver", &e) => return,
        Err(e) => panic!("{e:#}"),
    };
    cluster.create_node(NODE).unwrap();
    cluster.create_node("node-b").unwrap();
    cluster.kubectl(["create", "namespace", NS]).unwrap();
    // web: a running pod of this node; flaky: its first enrolls fail; ghost:
    // no namespace holds its IP (enroll keeps failing, and must not block the
    // others); elsewhere: another node's pod, never touched.
    let web = FakePod::start("web", "10.214.0.2");
    let _flaky = FakePod::start("flaky", "10.214.0.3");
    for (name, node, ip) in [
        ("web", NODE, "10.214.0.2"),
        ("flaky", NODE, "10.214.0.3"),
        ("ghost", NODE, "10.214.0.9"),
        ("elsewhere", "node-b", "10.214.0.2"),
    ] {
        cluster.apply_retrying(&pod_yaml(name, node));
        cluster.set_pod_running(NS, name, ip).unwrap();
    }

    let rec = Arc::new(Recorder::default());
    rec.fail.lock().unwrap().insert("flaky".into(), 2);
    let client = cluster.client().await.unwrap();
    let run = tokio::spawn(driver::run(client.clone(), NODE.into(), rec.clone(), "/proc".into()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(rec.names().is_empty(), "nothing is ambient yet: {:?}", rec.names());

    // The namespace is labelled while its pods run.
    cluster.kubectl(["label", "namespace", NS, "istio.io/dataplane-mode=ambient"]).unwrap();
    eventually("web and flaky enrolled", || rec.names() == ["flaky", "web"]).await;
    let info = rec.enrolled().into_iter().find(|p| p.name == "web").unwrap();
    assert_eq!(info.netns, std::path::PathBuf::from(format!("/proc/{}/ns/net", web.child.id())));
    assert_eq!((info.namespace.as_str(), info.service_account.as_str()), (NS, "default"));
    assert_eq!(info.ips, ["10.214.0.2".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(Recorder::count(&rec.enrolls, "flaky"), 3, "two failures, then retried with backoff");
    assert_eq!(Recorder::count(&rec.enrolls, "ghost"), 0, "ghost has no namespace: enroller never called");
    assert_eq!(Recorder::count(&rec.enrolls, "elsewhere"), 0);

    // The pod opts out, then back in.
    cluster.kubectl(["-n", NS, "label", "pod", "web", "istio.io/dataplane-mode=none"]).unwrap();
    eventually("web released on opt-out", || rec.names() == ["flaky"]).await;
    cluster.kubectl(["-n", NS, "label", "pod", "web", "istio.io/dataplane-mode-"]).unwrap();
    eventually("web enrolled again", || rec.names() == ["flaky", "web"]).await;

    // An agent restart: the enroller still holds the pods (and one whose pod
    // is gone); the new driver enrolls every member again and drops the stranger.
    run.abort();
    let _ = run.await;
    let stale = PodInfo { uid: "stale-uid".into(), name: "stale".into(), ..info.clone() };
    rec.enrolled.lock().unwrap().insert(stale.uid.clone(), stale);
    let before = Recorder::count(&rec.enrolls, "web");
    let run = tokio::spawn(driver::run(client.clone(), NODE.into(), rec.clone(), "/proc".into()));
    eventually("reconcile re-enrolls web and releases stale", || {
        Recorder::count(&rec.enrolls, "web") > before && rec.names() == ["flaky", "web"]
    })
    .await;
    assert_eq!(Recorder::count(&rec.releases, "stale"), 1);

    // Deleting a pod releases it; unlabelling the namespace releases the rest.
    cluster.kubectl(["-n", NS, "delete", "pod", "flaky", "--grace-period=0", "--force"]).unwrap();
    eventually("flaky released on delete", || rec.names() == ["web"]).await;
    cluster.kubectl(["label", "namespace", NS, "istio.io/dataplane-mode-"]).unwrap();
    eventually("all released", || rec.names().is_empty()).await;
    run.abort();
}
