//! The chained CNI plugin as a runtime runs it: the reference `bridge` + `host-local` plugins of `/usr/lib/cni`,
//! then the built `ambit-cni`, exec'd with the `CNI_*` environment and the network configuration on stdin, against
//! a real kube-apiserver, with the node agent's enroller and plugin server in this process and a real ztunnel
//! connected to the enroller over ZDS.
//!
//! The bridge plugin runs in a lab node's namespace (the "node"); `ambit-cni` runs in this process's namespace,
//! where the API server listens on 127.0.0.1 (a real runtime runs both on the node).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_cni::agent::plugin_server::PluginServer;
use ambit_cni::agent::{EnrollConfig, Enroller};
use ambit_cni::capture::{self, install_node_probe_snat, uninstall_node_probe_snat, NodeProbeSnat};
use ambit_e2e::cni::{Attachment, Chain, PluginOutput};
use ambit_e2e::kube::{skip_without_kube, KubeCluster};
use ambit_e2e::statefile::StateFile;
use ambit_e2e::ztunnel::{workspace_binary, ZtunnelArgs, ZtunnelProcess};
use ambit_e2e::{Lab, NetNs};
use ambit_identity::CertificateAuthority;
use serde_json::{json, Value};

const POD_CIDR: &str = "10.201.0.0/24";

const OBJECTS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: mesh}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: mesh}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stale, namespace: mesh}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: solo, namespace: mesh, labels: {istio.io/dataplane-mode: none}}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: plain}
spec: {containers: [{name: c, image: x}]}
";

/// The chain `bridge` → `ambit-cni` with the agent at `agent_socket`.
fn chain(lab: &Lab, node: &str, ambit: &Path, agent_socket: &Path, kubeconfig: &Path) -> Chain {
    let bridge = json!({
        "type": "bridge", "bridge": "cni0", "isGateway": true, "isDefaultGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "dataDir": lab.dir().join("ipam")},
    });
    let ours = json!({
        "type": "ambit-cni", "agent_socket": agent_socket, "kubeconfig": kubeconfig, "log_level": "debug",
    });
    Chain {
        version: "1.0.0".into(),
        name: "ambit-e2e".into(),
        plugins: vec![(bridge, None), (ours, Some(ambit.to_owned()))],
        node: NetNs::borrowed(node),
    }
}

/// A pod's network namespace (deleted on drop) and its attachment.
struct PodNs {
    netns: NetNs,
    attachment: Attachment,
}

fn pod(lab: &Lab, cluster: &KubeCluster, ns: &str, name: &str) -> PodNs {
    let netns = NetNs::create(&format!("{}-{name}", lab.prefix())).unwrap();
    let uid = cluster.kubectl(["-n", ns, "get", "pod", name, "-o", "jsonpath={.metadata.uid}"]).unwrap();
    let attachment = Attachment::pod(&format!("ctr-{name}"), &netns.path(), ns, name, uid.trim());
    PodNs { netns, attachment }
}

fn uid(p: &PodNs) -> &str {
    &p.attachment.args.iter().find(|(k, _)| k == "K8S_POD_UID").unwrap().1
}

/// ADD through the chain: (bridge result, final output).
fn add(chain: &Chain, p: &PodNs) -> (Value, PluginOutput) {
    let mut outs = chain.add(&p.attachment).unwrap();
    assert_eq!(outs.len(), 2, "bridge failed: {:?}", outs[0]);
    let last = outs.pop().unwrap();
    (outs.pop().unwrap().json, last)
}

fn captured(p: &PodNs) -> bool {
    capture::is_installed(&p.netns.path(), &capture::CaptureConfig::default()).unwrap()
}

fn pod_ip(result: &Value) -> Ipv4Addr {
    let addr = result["ips"][0]["address"].as_str().unwrap();
    addr.split('/').next().unwrap().parse().unwrap()
}

/// The result passed on: the previous one, in the call's version.
fn assert_passthrough(bridge: &Value, out: PluginOutput) {
    let result = out.ok().unwrap();
    let mut expected = bridge.clone();
    expected["cniVersion"] = json!("1.0.0");
    assert_eq!(result, expected);
}

#[test]
fn chained_plugin_enrolls_mesh_pods_through_the_agent_and_ztunnel() {
    if !ambit_e2e::require_root("chained_plugin_enrolls_mesh_pods") {
        return;
    }
    if !Path::new("/usr/lib/cni/bridge").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "/usr/lib/cni/bridge missing (scripts/install-deps.sh) and CI is set"
        );
        eprintln!("note: skipped: no CNI reference plugins in /usr/lib/cni");
        return;
    }
    let cluster = match KubeCluster::start("cni-plugin") {
        Ok(c) => c,
        Err(e) if skip_without_kube("cni_plugin", &e) => return,
        Err(e) => panic!("{e:#}"),
    };
    cluster.apply_retrying(OBJECTS);
    let ambit = workspace_binary("ambit-cni", "AMBIT_CNI_BIN").unwrap();

    let mut lab = Lab::new("cni-plugin").unwrap();
    let node = lab.add_node("node1").unwrap();
    let node_ns = lab.node(node).netns.name().to_string();
    let dir = lab.dir().to_path_buf();
    let ca = CertificateAuthority::generate_root("cluster.local", Duration::from_secs(24 * 3600)).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), ca.key_pem()).unwrap();
    StateFile::new(dir.join("state.yaml")).write(&lab, &BTreeSet::new()).unwrap();

    // The node agent's core, in this process.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let zds = dir.join("node1").join("ztunnel.sock");
    let agent_socket = dir.join("cni.sock");
    let config = EnrollConfig { state_dir: Some(dir.join("agent")), ..EnrollConfig::new(&zds) };
    let enroller: Arc<Enroller> = rt.block_on(Enroller::start(config)).unwrap();
    let server = rt.block_on(async { PluginServer::bind(&agent_socket) }).unwrap();
    rt.spawn(server.run(enroller.clone()));

    let mut args = ZtunnelArgs::for_node(&lab, node);
    args.zds_socket = zds;
    let mut zt = ZtunnelProcess::start(lab.node(node), args).unwrap();
    zt.wait_ready(Duration::from_secs(20)).unwrap();
    wait_for("ztunnel's snapshot", || enroller.ztunnel_ready());
    let node_netns = PathBuf::from("/var/run/netns").join(&node_ns);
    install_node_probe_snat(&node_netns, &NodeProbeSnat::new(vec![POD_CIDR.parse().unwrap()])).unwrap();

    let kubeconfig = cluster.kubeconfig();
    let up = chain(&lab, &node_ns, &ambit, &agent_socket, &kubeconfig);
    let down = chain(&lab, &node_ns, &ambit, &dir.join("no-agent.sock"), &kubeconfig);

    // VERSION and STATUS.
    let version = up.exec(1, "VERSION", None, None, &json!({})).unwrap().ok().unwrap();
    assert_eq!(version["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    up.exec(1, "STATUS", None, None, &json!({})).unwrap().ok().unwrap();
    let status = down.exec(1, "STATUS", None, None, &json!({})).unwrap();
    assert_eq!(status.error_code(), Some(50), "{status:?}");

    // A mesh pod: captured, held by ztunnel, result passed on.
    let web = pod(&lab, &cluster, "mesh", "web");
    let (web_result, out) = add(&up, &web);
    assert_passthrough(&web_result, out);
    assert!(captured(&web), "no capture in the mesh pod");
    let dump = zt.admin_get("/config_dump").unwrap();
    assert!(dump.contains(uid(&web)), "ztunnel does not hold {}: {dump}", uid(&web));
    let check = up.exec(1, "CHECK", Some(&web.attachment), Some(&web_result), &json!({})).unwrap();
    check.ok().unwrap();

    // The kubelet's probe from the node reaches the app, from the probe source, around ztunnel.
    let app = SocketAddr::from((pod_ip(&web_result), 8080));
    let listener = web.netns.run(move || TcpListener::bind(app).unwrap());
    let node_handle = NetNs::borrowed(&node_ns);
    let probe = node_handle.run(move || TcpStream::connect_timeout(&app, Duration::from_secs(3)));
    probe.expect("probe from the node reaches the enrolled pod");
    listener.set_nonblocking(false).unwrap();
    let (_conn, from) = listener.accept().unwrap();
    assert_eq!(from.ip(), IpAddr::from([169, 254, 7, 127]));

    // Outside the mesh, or opted out: passed through without contacting the agent (whose socket is wrong).
    for (ns, name) in [("plain", "other"), ("mesh", "solo")] {
        let p = pod(&lab, &cluster, ns, name);
        let (bridge, out) = add(&down, &p);
        assert_passthrough(&bridge, out);
        assert!(!captured(&p), "{ns}/{name} captured");
        down.del(&p.attachment, Some(&bridge)).unwrap().into_iter().for_each(|o| drop(o.ok().unwrap()));
    }

    // A mesh pod while the agent is down: try again later, naming pod and socket; its DEL still succeeds.
    let late = pod(&lab, &cluster, "mesh", "late");
    let (bridge, out) = add(&down, &late);
    assert_eq!(out.error_code(), Some(11), "{out:?}");
    let msg = out.json["msg"].as_str().unwrap();
    assert!(msg.contains("mesh/late") && msg.contains("no-agent.sock"), "{msg}");
    assert!(!captured(&late));
    for o in down.del(&late.attachment, Some(&bridge)).unwrap() {
        o.ok().unwrap();
    }

    // GC releases a pod whose container the runtime no longer lists.
    let stale = pod(&lab, &cluster, "mesh", "stale");
    let (_, out) = add(&up, &stale);
    out.ok().unwrap();
    assert!(captured(&stale));
    let valid = json!({"cni.dev/valid-attachments": [{"containerID": "ctr-web", "ifname": "eth0"}]});
    up.exec(1, "GC", None, None, &valid).unwrap().ok().unwrap();
    assert!(!captured(&stale), "GC left the stale pod captured");
    assert!(captured(&web), "GC released a valid pod");
    let dump = zt.admin_get("/config_dump").unwrap();
    assert!(!dump.contains(uid(&stale)), "ztunnel still holds the stale pod");

    // DEL, twice: released from ztunnel and capture removed; the second is a no-op.
    for _ in 0..2 {
        for o in up.del(&web.attachment, Some(&web_result)).unwrap() {
            o.ok().unwrap();
        }
    }
    assert!(!captured(&web));
    let dump = zt.admin_get("/config_dump").unwrap();
    assert!(!dump.contains(uid(&web)), "ztunnel still holds the deleted pod");
    assert!(enroller.enrolled().is_empty(), "{:?}", enroller.enrolled());

    uninstall_node_probe_snat(&node_netns).unwrap();
    drop(zt);
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
