//! The node agent against a real kube-apiserver (no kubelet: the test plays
//! it, setting pods Running with an IP, and makes each "pod" a network
//! namespace holding that IP with a process in it, as a pause container).
//!
//! `watch_driver_*` runs the agent's watch driver in-process with an enroller
//! that records calls, so the Kubernetes logic (membership changes, retries,
//! reconcile after a restart, namespaces found by IP) is checked on its own.
//! `node_agent_*` runs the `ambit-node-agent` binary with a real ztunnel (in
//! a lab node's namespace) on its ZDS socket and a fake primary CNI config.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_cni::agent::kube::{self as driver, PodEnroller};
use ambit_cni::agent::{EnrollError, PodInfo};
use ambit_cni::capture::{self, CaptureMode};
use ambit_e2e::kube::{skip_without_kube, KubeCluster};
use ambit_e2e::statefile::StateFile;
use ambit_e2e::ztunnel::{workspace_binary, ZtunnelArgs, ZtunnelProcess};
use ambit_e2e::{Lab, NetNs};
use ambit_identity::CertificateAuthority;

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
        let mut names: Vec<String> = self.enrolled.lock().unwrap().values().map(|p| p.name.clone()).collect();
        names.sort(); // the map is keyed by uid
        names
    }

    fn count(list: &Mutex<Vec<String>>, name: &str) -> usize {
        list.lock().unwrap().iter().filter(|n| *n == name).count()
    }
}

/// A "pod": a namespace holding `ip` on a dummy `eth0`, and a process in it.
struct FakePod {
    child: Child,
    netns: NetNs,
}

impl FakePod {
    fn start(name: &str, ip: &str) -> FakePod {
        let netns = NetNs::create(&format!("ambit-agent-{name}-{}", std::process::id())).unwrap();
        netns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "peer0"]).unwrap();
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]).unwrap();
        netns.ip(&["link", "set", "peer0", "up"]).unwrap();
        netns.ip(&["link", "set", "eth0", "up"]).unwrap();
        let child = netns.command("sleep").arg("600").spawn().unwrap();
        FakePod { child, netns }
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

/// Stands for the agent's DaemonSet: while it exists, a stopping agent leaves
/// the plugin installed.
const OWNER_DAEMONSET: &str = "apiVersion: v1
kind: Namespace
metadata: {name: ambit-system}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: ambit-node, namespace: ambit-system}
spec:
  selector: {matchLabels: {app: ambit-node}}
  template:
    metadata: {labels: {app: ambit-node}}
    spec:
      nodeSelector: {no-such-node: \"true\"}
      containers: [{name: agent, image: ambit.local/node-agent:dev}]
";

/// The `ambit-node-agent` binary with the real enroller and a real ztunnel
/// (state-file mode, in a namespace of its own) on its ZDS socket.
struct Agent {
    child: Option<Child>,
    args: Vec<String>,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(args: Vec<String>, log: std::path::PathBuf) -> Agent {
        let mut a = Agent { child: None, args, log };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let bin = workspace_binary("ambit-node-agent", "AMBIT_NODE_AGENT_BIN").unwrap();
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = std::process::Command::new(bin)
            .args(&self.args)
            .env("RUST_LOG", "info,ambit_cni=debug")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGTERM, and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: signalling our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent ignored SIGTERM; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- node agent log ----\n{}---- end ----", self.log_text());
        }
    }
}

/// The primary CNI's config, as it wrote it (odd spacing on purpose: the
/// uninstall must give back these bytes, not a re-serialisation).
const PRIMARY: &str = "{ \"cniVersion\": \"1.0.0\", \"name\": \"fake\",\n  \"plugins\": [ {\"type\": \"bridge\"} ] }\n";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_sync(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn node_agent_installs_the_plugin_captures_labelled_pods_and_uninstalls_cleanly() {
    agent_lifecycle(CaptureMode::Nftables, "node-agent-binary", ("bin-web", "10.216.0.2"));
}

/// The same with eBPF capture; an agent restart re-adopts the node's pinned
/// hooks (the same links, not new ones).
#[test]
fn node_agent_with_ebpf_capture_captures_labelled_pods_and_a_restart_re_adopts_its_pinned_hooks() {
    agent_lifecycle(CaptureMode::Ebpf, "node-agent-ebpf", ("ebpf-web", "10.216.1.2"));
}

/// Removes the node's eBPF pins when the test ends, also on failure.
struct EbpfPins(PathBuf);

impl Drop for EbpfPins {
    fn drop(&mut self) {
        if let Err(e) = ambit_ebpf::uninstall_node(&self.0) {
            eprintln!("cleanup of {}: {e}", self.0.display());
        }
    }
}

/// The inode of each of the node's pinned hook links: a re-adopted link keeps its pin.
fn hook_link_pins(root: &Path) -> BTreeMap<String, u64> {
    std::fs::read_dir(root.join("links"))
        .map(|d| {
            d.flatten().map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().ino())).collect()
        })
        .unwrap_or_default()
}

fn agent_lifecycle(mode: CaptureMode, test: &str, (pod_name, pod_ip): (&str, &str)) {
    if !ambit_e2e::require_root(test) {
        return;
    }
    let cluster = match KubeCluster::start(test) {
        Ok(c) => c,
        Err(e) if skip_without_kube("node_agent binary", &e) => return,
        Err(e) => panic!("{e:#}"),
    };
    cluster.create_node(NODE).unwrap();
    cluster.kubectl(["create", "namespace", NS]).unwrap();
    let web = FakePod::start(pod_name, pod_ip);
    cluster.apply_retrying(&pod_yaml("web", NODE));
    cluster.set_pod_running(NS, "web", pod_ip).unwrap();
    let uid = cluster.kubectl(["-n", NS, "get", "pod", "web", "-o", "jsonpath={.metadata.uid}"]).unwrap();

    let mut lab = Lab::new(test).unwrap();
    let node = lab.add_node("node1").unwrap();
    let cfg = capture::CaptureConfig {
        mode,
        bpf_pin_root: Path::new("/sys/fs/bpf").join(lab.prefix()),
        ..Default::default()
    };
    let _pins = (mode == CaptureMode::Ebpf).then(|| EbpfPins(cfg.bpf_pin_root.clone()));
    let dir = lab.dir().to_path_buf();
    let ca = CertificateAuthority::generate_root("cluster.local", Duration::from_secs(24 * 3600)).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), ca.key_pem()).unwrap();
    StateFile::new(dir.join("state.yaml")).write(&lab, &Default::default()).unwrap();
    for d in ["conf", "bin", "state"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let conflist = dir.join("conf/10-fake.conflist");
    std::fs::write(&conflist, PRIMARY).unwrap();
    std::fs::write(dir.join("ambit-cni-image"), b"plugin").unwrap();
    let zds = dir.join("ztunnel.sock");
    let readiness = format!("127.0.0.1:{}", free_port());
    let p = |d: &str| dir.join(d).display().to_string();
    let mode_flags = [
        "--capture-mode",
        if mode == CaptureMode::Ebpf { "ebpf" } else { "nftables" },
        "--bpf-pin-root",
        &cfg.bpf_pin_root.display().to_string(),
    ]
    .map(String::from);
    let args: Vec<String> = [
        "--node-name",
        NODE,
        "--zds-socket",
        &zds.display().to_string(),
        "--cni-socket",
        &p("cni.sock"),
        "--cni-bin-dir",
        &p("bin"),
        "--cni-conf-dir",
        &p("conf"),
        "--cni-plugin-binary",
        &p("ambit-cni-image"),
        "--state-dir",
        &p("state"),
        "--readiness-addr",
        &readiness,
        "--kubeconfig",
        &cluster.kubeconfig().display().to_string(),
        "--owner-daemonset",
        "ambit-system/ambit-node",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(mode_flags)
    .collect();
    // The agent's own DaemonSet, which tells its exits apart (restart or uninstall).
    cluster.apply(OWNER_DAEMONSET).unwrap();
    let mut agent = Agent::start(args, dir.join("agent.log"));

    let mut zt_args = ZtunnelArgs::for_node(&lab, node);
    zt_args.zds_socket = zds;
    zt_args.extra.extend(["--bpf-pin-root".to_string(), cfg.bpf_pin_root.display().to_string()]);
    let mut zt = ZtunnelProcess::start(lab.node(node), zt_args).unwrap();
    zt.wait_ready(WAIT).unwrap();

    // The plugin is installed: last in the primary conflist, binary and kubeconfig beside.
    wait_sync("plugin entry inserted", || std::fs::read_to_string(&conflist).unwrap().contains("ambit-cni"));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(v["plugins"][1]["type"], "ambit-cni");
    assert_eq!(v["plugins"][1]["agent_socket"], p("cni.sock"));
    assert!(dir.join("bin/ambit-cni").exists() && dir.join("conf/ambit-cni-kubeconfig").exists());
    let ready = || {
        std::net::TcpStream::connect(&readiness)
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out).map(|_| out)
            })
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    };
    wait_sync("agent ready", ready);

    let netns = web.netns.path();
    let captured = || capture::is_installed(&netns, &cfg).unwrap();
    let held = |zt: &ZtunnelProcess| zt.admin_get("/config_dump").unwrap().contains(uid.trim());
    assert!(!captured() && !held(&zt));

    // Labelling the namespace captures the running pod and hands it to ztunnel.
    cluster.kubectl(["label", "namespace", NS, "istio.io/dataplane-mode=ambient"]).unwrap();
    wait_sync("web captured and held by ztunnel", || captured() && held(&zt));
    // Opting the pod out releases it; opting back in enrolls it again.
    cluster.kubectl(["-n", NS, "label", "pod", "web", "istio.io/dataplane-mode=none"]).unwrap();
    wait_sync("web released on opt-out", || !captured() && !held(&zt));
    cluster.kubectl(["-n", NS, "label", "pod", "web", "istio.io/dataplane-mode-"]).unwrap();
    wait_sync("web enrolled again", || captured() && held(&zt));
    // Unlabelling the namespace releases it.
    cluster.kubectl(["label", "namespace", NS, "istio.io/dataplane-mode-"]).unwrap();
    wait_sync("web released on unlabel", || !captured() && !held(&zt));
    cluster.kubectl(["label", "namespace", NS, "istio.io/dataplane-mode=ambient"]).unwrap();
    wait_sync("web enrolled", || captured() && held(&zt));
    let hooks = hook_link_pins(&cfg.bpf_pin_root);
    assert_eq!(hooks.len(), if mode == CaptureMode::Ebpf { 5 } else { 0 }, "the node's eBPF hooks: {hooks:?}");

    // SIGTERM while the agent's DaemonSet stands (a restart): the plugin stays
    // for the next agent, and the pod stays captured and held.
    assert!(agent.stop().success(), "agent exit; log:\n{}", agent.log_text());
    assert!(std::fs::read_to_string(&conflist).unwrap().contains("ambit-cni"), "{}", agent.log_text());
    assert!(dir.join("bin/ambit-cni").exists() && dir.join("conf/ambit-cni-kubeconfig").exists());
    assert!(captured() && held(&zt), "a stopping agent must not release pods");

    // A new agent reconciles: the pod is enrolled again (repaired), and the plugin is back.
    capture::uninstall(&netns, &cfg).unwrap(); // damage to repair
    agent.spawn();
    wait_sync("reconcile repaired the capture", captured);
    assert_eq!(hook_link_pins(&cfg.bpf_pin_root), hooks, "the node's hooks re-adopted, not attached again");
    assert!(held(&zt));
    assert!(agent.log_text().contains("reconciling"), "{}", agent.log_text());
    assert!(std::fs::read_to_string(&conflist).unwrap().contains("ambit-cni"));
    // SIGTERM once the DaemonSet is deleted (an uninstall): the plugin goes, byte for byte.
    cluster.kubectl(["delete", "daemonset", "ambit-node", "-n", "ambit-system", "--wait=false"]).unwrap();
    assert!(agent.stop().success(), "agent exit; log:\n{}", agent.log_text());
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), PRIMARY);
    assert!(!dir.join("bin/ambit-cni").exists() && !dir.join("conf/ambit-cni-kubeconfig").exists());
    assert!(captured() && held(&zt), "a stopping agent must not release pods");
    drop(zt);
}
