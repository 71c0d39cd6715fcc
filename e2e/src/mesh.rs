//! Glue for the mesh tests: a lab plus a development CA, ztunnel's state file, one ZDS server and one ztunnel per
//! node, and enrolling pods the way the CNI node agent does (capture rules in the pod's namespace, then a ZDS
//! `add` carrying the namespace's fd).
//!
//! All methods are blocking, so a `Mesh` works from a plain `#[test]` and from a `#[tokio::test]` alike: the ZDS
//! sockets live on the mesh's own single-threaded runtime, driven from a short-lived helper thread during each call
//! (never from the caller's runtime).

use std::collections::BTreeSet;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use ambit_cni::capture::{self, CaptureConfig};
use ambit_identity::CertificateAuthority;
use ambit_zds::{WorkloadInfo, ZdsAgentConnection, ZdsServer};
use anyhow::{bail, Context};
use tokio::runtime::Runtime;

use crate::lab::{Lab, NodeId, PodId};
use crate::statefile::StateFile;
use crate::ztunnel::{ControllerFlags, ZtunnelArgs, ZtunnelProcess};

/// How long a new ztunnel has to connect to its node's ZDS socket.
const ZDS_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a new ztunnel has to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The trust domain of the lab's development CA.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Per node: its ZDS server, the connected ztunnel and that connection.
#[derive(Default)]
struct MeshNode {
    ztunnel: Option<ZtunnelProcess>,
    conn: Option<ZdsAgentConnection>,
    server: Option<ZdsServer>,
}

/// A lab with Ambit running in it. Dropping it stops the ztunnels, then tears the lab down.
pub struct Mesh {
    // Field order is drop order after `Drop::drop`: node state, then the runtime, then the lab.
    nodes: Vec<MeshNode>,
    state: StateFile,
    enrolled: BTreeSet<PodId>,
    capture: CaptureConfig,
    binary: Option<PathBuf>,
    controller: Option<ControllerFlags>,
    ca: CertificateAuthority,
    rt: Option<Runtime>,
    lab: Lab,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("lab", &self.lab.prefix()).field("enrolled", &self.enrolled).finish()
    }
}

impl Mesh {
    /// Takes over `lab`: generates a root CA for [`TRUST_DOMAIN`] (`ca-cert.pem`, `ca-key.pem` in the lab
    /// directory) and writes the initial state file (`state.yaml`, every pod `NONE`). No ztunnel runs yet.
    pub fn new(lab: Lab) -> anyhow::Result<Self> {
        let ca = CertificateAuthority::generate_root(TRUST_DOMAIN, Duration::from_secs(7 * 24 * 3600))
            .context("generate the lab's root CA")?;
        std::fs::write(lab.dir().join("ca-cert.pem"), ca.cert_pem())?;
        std::fs::write(lab.dir().join("ca-key.pem"), ca.key_pem())?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("build runtime")?;
        let state = StateFile::new(lab.dir().join("state.yaml"));
        let mesh = Mesh {
            nodes: Vec::new(),
            state,
            enrolled: BTreeSet::new(),
            capture: CaptureConfig::default(),
            binary: None,
            controller: None,
            ca,
            rt: Some(rt),
            lab,
        };
        mesh.write_state()?;
        Ok(mesh)
    }

    /// The lab.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The lab, to add nodes, pods and hosts (call [`Mesh::write_state`] afterwards so ztunnels see new pods).
    pub fn lab_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }

    /// The development CA (also written to the lab directory).
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The capture configuration used when enrolling pods.
    pub fn capture_config_mut(&mut self) -> &mut CaptureConfig {
        &mut self.capture
    }

    /// ztunnels started from now on take their state and certificates from
    /// the controller (see [`crate::controller::ControllerProcess`]).
    pub fn use_controller(&mut self, flags: ControllerFlags) {
        self.controller = Some(flags);
    }

    /// Runs `binary` instead of [`crate::ztunnel::ztunnel_binary`] for ztunnels started from now on.
    pub fn set_ztunnel_binary(&mut self, binary: impl Into<PathBuf>) {
        self.binary = Some(binary.into());
    }

    /// The state file, to add services and policies; then call [`Mesh::write_state`].
    pub fn state_mut(&mut self) -> &mut StateFile {
        &mut self.state
    }

    /// The lab and the state file at once, for [`StateFile`] methods that read the lab while the state changes.
    pub fn lab_and_state_mut(&mut self) -> (&Lab, &mut StateFile) {
        (&self.lab, &mut self.state)
    }

    /// Declares a service backed by `backends` in the state file (see [`StateFile::add_service_for`]); call
    /// [`Mesh::write_state`] afterwards.
    pub fn add_service_for(
        &mut self,
        name: &str,
        namespace: &str,
        vip: std::net::Ipv4Addr,
        ports: &[(u16, u16)],
        backends: &[PodId],
    ) {
        self.state.add_service_for(&self.lab, name, namespace, vip, ports, backends);
    }

    /// The state file.
    pub fn state(&self) -> &StateFile {
        &self.state
    }

    /// Rewrites the state file (atomically) from the lab's pods and the tests' additions. ztunnel polls the file,
    /// so a change takes effect after its poll interval (250 ms by default).
    pub fn write_state(&self) -> anyhow::Result<()> {
        self.state.write(&self.lab, &self.enrolled)
    }

    /// Whether `pod` is enrolled.
    pub fn is_enrolled(&self, pod: PodId) -> bool {
        self.enrolled.contains(&pod)
    }

    /// Starts ztunnel on every node that has none running, with the default arguments.
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.lab.nodes().len() {
            if self.nodes.get(i).and_then(|n| n.ztunnel.as_ref()).is_none() {
                self.start_ztunnel(NodeId(i))?;
            }
        }
        Ok(())
    }

    /// Starts (or restarts) ztunnel on `node` with the default arguments; see [`Mesh::start_ztunnel_with`].
    pub fn start_ztunnel(&mut self, node: NodeId) -> anyhow::Result<()> {
        self.start_ztunnel_with(node, |_| {})
    }

    /// Starts ztunnel on `node` with arguments adjusted by `customize`, replacing (SIGTERM) any running one, then:
    /// accepts its ZDS connection, replays the node's enrolled pods (`add`, with their namespace fds) and
    /// `snapshot_sent`, and waits until it reports ready.
    pub fn start_ztunnel_with(&mut self, node: NodeId, customize: impl FnOnce(&mut ZtunnelArgs)) -> anyhow::Result<()> {
        let mut args = ZtunnelArgs::for_node(&self.lab, node);
        args.controller = self.controller.clone();
        customize(&mut args);
        while self.nodes.len() <= node.0 {
            self.nodes.push(MeshNode::default());
        }
        let rt = self.rt.as_ref().context("bug: runtime used after drop")?;
        let mn = &mut self.nodes[node.0];
        mn.conn = None;
        mn.ztunnel = None; // stops the previous one first
        if mn.server.as_ref().is_none_or(|s| s.path() != args.zds_socket) {
            let path = args.zds_socket.clone();
            mn.server = Some(block_on(rt, async move { ZdsServer::bind(&path) }).context("bind the ZDS socket")?);
        }
        let server = mn.server.as_ref().context("bug: ZDS server just bound")?;
        let binary = match &self.binary {
            Some(b) => b.clone(),
            None => crate::ztunnel::ztunnel_binary()?,
        };
        let mut zt = ZtunnelProcess::start_binary(&binary, self.lab.node(node), args)?;

        let accepted = block_on(rt, async { tokio::time::timeout(ZDS_CONNECT_TIMEOUT, server.accept()).await });
        let mut conn = match accepted {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => bail!("ztunnel's ZDS hello failed: {e}; log:\n{}", zt.log_tail(50)),
            Err(_) => bail!("ztunnel did not connect to ZDS within {ZDS_CONNECT_TIMEOUT:?}; log:\n{}", zt.log_tail(50)),
        };

        let pods: Vec<PodId> = self.enrolled.iter().copied().filter(|p| self.lab.pod(*p).node == node).collect();
        for pod in pods {
            let p = self.lab.pod(pod);
            let fd = p.netns.open().with_context(|| format!("open netns of {}", p.uid))?;
            block_on(rt, conn.add(&p.uid, workload_info(&self.lab, pod), fd.as_fd()))
                .with_context(|| format!("ZDS add {} (snapshot)", p.uid))?;
        }
        block_on(rt, conn.snapshot_sent()).context("ZDS snapshot_sent")?;
        zt.wait_ready(READY_TIMEOUT)?;
        mn.conn = Some(conn);
        mn.ztunnel = Some(zt);
        Ok(())
    }

    /// The ztunnel of `node`; panics if none was started.
    pub fn ztunnel(&self, node: NodeId) -> &ZtunnelProcess {
        self.nodes.get(node.0).and_then(|n| n.ztunnel.as_ref()).unwrap_or_else(|| panic!("no ztunnel on {node:?}"))
    }

    /// The ztunnel of `node`, e.g. to kill it; panics if none was started.
    pub fn ztunnel_mut(&mut self, node: NodeId) -> &mut ZtunnelProcess {
        self.nodes.get_mut(node.0).and_then(|n| n.ztunnel.as_mut()).unwrap_or_else(|| panic!("no ztunnel on {node:?}"))
    }

    /// Stops (SIGTERM) the ztunnel of `node` and forgets its ZDS connection; its enrolled pods stay enrolled and
    /// are replayed by the next [`Mesh::start_ztunnel`].
    pub fn stop_ztunnel(&mut self, node: NodeId) {
        if let Some(n) = self.nodes.get_mut(node.0) {
            n.conn = None;
            n.ztunnel = None;
        }
    }

    /// Enrolls `pod`: marks it HBONE in the state file, installs capture in its namespace, and (if its node's
    /// ztunnel runs) sends ZDS `add` with its namespace fd, waiting for the ack.
    pub fn enroll(&mut self, pod: PodId) -> anyhow::Result<()> {
        let p = self.lab.pod(pod);
        self.enrolled.insert(pod);
        self.write_state()?;
        capture::install(&p.netns.path(), &self.capture).with_context(|| format!("install capture for {}", p.uid))?;
        let rt = self.rt.as_ref().context("bug: runtime used after drop")?;
        if let Some(conn) = self.nodes.get_mut(p.node.0).and_then(|n| n.conn.as_mut()) {
            let fd = p.netns.open().with_context(|| format!("open netns of {}", p.uid))?;
            block_on(rt, conn.add(&p.uid, workload_info(&self.lab, pod), fd.as_fd()))
                .with_context(|| format!("ZDS add {}", p.uid))?;
        }
        Ok(())
    }

    /// Releases `pod`: ZDS `del` (if its node's ztunnel runs), removes capture, and marks it `NONE` again.
    pub fn release(&mut self, pod: PodId) -> anyhow::Result<()> {
        let p = self.lab.pod(pod);
        let rt = self.rt.as_ref().context("bug: runtime used after drop")?;
        if let Some(conn) = self.nodes.get_mut(p.node.0).and_then(|n| n.conn.as_mut()) {
            block_on(rt, conn.del(&p.uid)).with_context(|| format!("ZDS del {}", p.uid))?;
        }
        capture::uninstall(&p.netns.path(), &self.capture)
            .with_context(|| format!("uninstall capture for {}", p.uid))?;
        self.enrolled.remove(&pod);
        self.write_state()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // ztunnels first (each prints its log tail if the test failed), then the ZDS sockets.
        for n in &mut self.nodes {
            n.ztunnel = None;
        }
        self.nodes.clear();
        // Safe inside an async test, unlike dropping a Runtime there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The ZDS workload info of a pod.
fn workload_info(lab: &Lab, pod: PodId) -> WorkloadInfo {
    let p = lab.pod(pod);
    WorkloadInfo { name: p.name.clone(), namespace: p.namespace.clone(), service_account: p.service_account.clone() }
}

/// Runs `fut` to completion on `rt` from a helper thread, so that it works whether or not the caller is itself
/// inside a tokio runtime.
fn block_on<F>(rt: &Runtime, fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| match s.spawn(|| rt.block_on(fut)).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::PodSpec;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A MOCK ztunnel (the real binary is tested by the end-to-end suite): speaks the ZDS client side (hello, acks
    /// every request), logs each request with the inode of any fd it carried, and answers readiness with 200.
    const MOCK_ZTUNNEL: &str = r#"#!/usr/bin/env python3
import array, http.server, os, socket, sys, threading
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
host, port = args["--readiness-addr"].rsplit(":", 1)
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz/ready" else 404)
        self.send_header("content-length", "0")
        self.end_headers()
srv = http.server.HTTPServer((host, int(port)), Ready)
threading.Thread(target=srv.serve_forever, daemon=True).start()
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(args["--zds-socket"])
s.send(bytes([0x08, 0x01]))
while True:
    msg, anc, flags, _ = s.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
    if not msg:
        break
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % 4])
    inos = [os.fstat(fd).st_ino for fd in fds]
    for fd in fds:
        os.close(fd)
    print("request", msg.hex(), "inodes", ",".join(map(str, inos)), flush=True)
    s.send(bytes([0x0a, 0x00]))
"#;

    fn mock_binary(lab: &Lab) -> PathBuf {
        let path = lab.dir().join("mock-ztunnel.py");
        std::fs::write(&path, MOCK_ZTUNNEL).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn hex(s: &str) -> String {
        s.bytes().map(|b| format!("{b:02x}")).collect()
    }

    /// Lines the mock logged for requests whose bytes contain `uid`.
    fn requests_for(mesh: &Mesh, node: NodeId, uid: &str) -> Vec<String> {
        let log = std::fs::read_to_string(&mesh.ztunnel(node).args().log_file).unwrap();
        log.lines().filter(|l| l.starts_with("request") && l.contains(&hex(uid))).map(str::to_string).collect()
    }

    #[test]
    fn enrolling_installs_capture_sends_the_netns_fd_and_is_replayed_after_a_restart() {
        if !crate::require_root("enrolling_installs_capture_sends_the_netns_fd_and_is_replayed_after_a_restart") {
            return;
        }
        let mut lab = Lab::new("mesh-unit-enroll").unwrap();
        let n = lab.add_node("node1").unwrap();
        let a = lab.add_pod(n, PodSpec::new("a", "default", "sa-a")).unwrap();
        let b = lab.add_pod(n, PodSpec::new("b", "default", "sa-b")).unwrap();
        let bin = mock_binary(&lab);
        let mut mesh = Mesh::new(lab).unwrap();
        mesh.set_ztunnel_binary(bin);
        assert!(mesh.lab().dir().join("ca-cert.pem").exists());
        mesh.start_all().unwrap();

        mesh.enroll(a).unwrap();
        let pod = mesh.lab().pod(a);
        let ino = std::fs::metadata(pod.netns.path()).unwrap().ino();
        assert!(capture::is_installed(&pod.netns.path()).unwrap());
        let adds = requests_for(&mesh, n, &pod.uid);
        assert_eq!(adds.len(), 1, "{adds:?}");
        assert!(adds[0].starts_with("request 0a") && adds[0].ends_with(&format!("inodes {ino}")), "{adds:?}");
        let state = std::fs::read_to_string(mesh.state().path()).unwrap();
        assert!(state.contains("protocol: HBONE"), "{state}");
        assert!(!mesh.is_enrolled(b));

        // A restarted ztunnel gets the enrolled pod again in its snapshot, then the snapshot end.
        mesh.start_ztunnel(n).unwrap();
        let uid = mesh.lab().pod(a).uid.clone();
        // The log file is appended to across restarts: one add from enroll, one from the replay.
        assert_eq!(requests_for(&mesh, n, &uid).len(), 2, "not replayed to the new process");
        let log = std::fs::read_to_string(&mesh.ztunnel(n).args().log_file).unwrap();
        let snapshots: Vec<_> = log.lines().filter(|l| l.starts_with("request 1a00")).collect();
        assert_eq!(snapshots.len(), 2, "one snapshot_sent per process in:\n{log}");
        let replay_at = log.rfind(&hex(&uid)).unwrap();
        assert!(replay_at < log.rfind("request 1a00").unwrap(), "the replay comes before snapshot_sent");

        mesh.release(a).unwrap();
        let pod = mesh.lab().pod(a);
        assert!(!capture::is_installed(&pod.netns.path()).unwrap());
        // del = field 2, carrying the uid in its field 2.
        assert!(requests_for(&mesh, n, &uid).iter().any(|l| l.starts_with("request 12")), "no del");
        assert!(!std::fs::read_to_string(mesh.state().path()).unwrap().contains("HBONE"));
    }

    #[tokio::test]
    async fn a_mesh_is_usable_and_droppable_inside_a_tokio_test() {
        if !crate::require_root("a_mesh_is_usable_and_droppable_inside_a_tokio_test") {
            return;
        }
        let mut lab = Lab::new("mesh-unit-tokio").unwrap();
        let n = lab.add_node("node1").unwrap();
        let a = lab.add_pod(n, PodSpec::new("a", "default", "sa-a")).unwrap();
        let bin = mock_binary(&lab);
        let mut mesh = Mesh::new(lab).unwrap();
        mesh.set_ztunnel_binary(bin);
        mesh.start_all().unwrap();
        mesh.enroll(a).unwrap();
        assert_eq!(requests_for(&mesh, n, &mesh.lab().pod(a).uid).len(), 1);
        drop(mesh);
    }
}
