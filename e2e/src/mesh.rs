//! Glue for the mesh tests: a lab, a control plane, one ZDS server and one ztunnel per node, and enrolling pods the
//! way the CNI node agent does (capture rules in the pod's namespace, then a ZDS `add` carrying the namespace's fd).
//!
//! Two control planes: **file mode** ([`Mesh::new`]: ztunnel's local state file and a development CA) and
//! **controller mode** ([`Mesh::with_controller`]: the real `ambit-controller` reading the lab's Kubernetes objects
//! from a directory, ztunnels on xDS and its CA). Changes made through the typed methods ([`Mesh::add_service`],
//! [`Mesh::set_ready`], [`Mesh::apply`], ...) work in the modes that have the concept and return once every running
//! ztunnel's `/config_dump` shows them.
//!
//! [`Mesh::restart_ztunnel_overlapping`] (in `restart.rs`) replaces a node's ztunnel the way a DaemonSet rolling update
//! does: the node's ZDS server serves the new process its own snapshot while the old one still runs.
//!
//! All methods are blocking, so a `Mesh` works from a plain `#[test]` and from a `#[tokio::test]` alike: the ZDS
//! sockets live on the mesh's own single-threaded runtime, driven from a short-lived helper thread during each call
//! (never from the caller's runtime).

use std::collections::BTreeSet;
use std::future::Future;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambit_cni::capture::{self, CaptureConfig, CaptureMode};
use ambit_identity::CertificateAuthority;
use ambit_zds::{WorkloadInfo, ZdsAgentConnection, ZdsServer};
use anyhow::{bail, Context};
use tokio::runtime::Runtime;

use crate::controller::ControllerProcess;
use crate::dump;
use crate::lab::{HostId, Lab, NodeId, PodId, PodSpec};
use crate::objects::{self, KubeObjects, ServiceSpec, DATAPLANE_MODE_LABEL};
use crate::statefile::StateFile;
use crate::ztunnel::{ZtunnelArgs, ZtunnelProcess};

/// How long a new ztunnel has to connect to its node's ZDS socket.
const ZDS_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a new ztunnel has to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a change has to reach every ztunnel's config dump.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The trust domain of the lab's development CA.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The file of the controller's directory holding the lab's own objects (namespaces, pods, services).
pub const LAB_OBJECTS_FILE: &str = "lab.yaml";

/// The controller and what the lab declares to it.
struct ControlPlane {
    process: ControllerProcess,
    objects: KubeObjects,
}

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
    /// `None` in file mode.
    control: Option<ControlPlane>,
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
            capture: lab_capture(&lab)?,
            binary: None,
            control: None,
            ca,
            rt: Some(rt),
            lab,
        };
        mesh.write_state()?;
        Ok(mesh)
    }

    /// Takes over `lab` in controller mode: starts `ambit-controller` on the lab's external host `controller_host`
    /// and declares the lab's pods to it as Kubernetes objects, with the namespaces in `ambient` labelled
    /// `istio.io/dataplane-mode=ambient`. ztunnels started from now on use its xDS and CA; [`Mesh::ca`] is its root.
    /// No ztunnel runs yet.
    pub fn with_controller(lab: Lab, controller_host: HostId, ambient: &[&str]) -> anyhow::Result<Self> {
        Self::with_controller_and_workloads(lab, controller_host, ambient, &[], &[])
    }

    /// [`Mesh::with_controller`], with the controller also admitting the workloads `(namespace, service account)`
    /// in `workloads` by their own tokens (waypoints; see [`ControllerProcess::start_with_workloads`]), and
    /// started with the flags `controller_args` too.
    pub fn with_controller_and_workloads(
        lab: Lab,
        controller_host: HostId,
        ambient: &[&str],
        workloads: &[(&str, &str)],
        controller_args: &[&str],
    ) -> anyhow::Result<Self> {
        let process =
            ControllerProcess::start_with_workloads(&lab, lab.host(controller_host), workloads, controller_args)?;
        let ca = process.root()?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("build runtime")?;
        let mesh = Mesh {
            nodes: Vec::new(),
            state: StateFile::new(lab.dir().join("state.yaml")),
            enrolled: BTreeSet::new(),
            capture: lab_capture(&lab)?,
            binary: None,
            control: Some(ControlPlane { process, objects: KubeObjects::new(ambient) }),
            ca,
            rt: Some(rt),
            lab,
        };
        mesh.write_state()?;
        Ok(mesh)
    }

    /// The controller, in controller mode.
    pub fn controller(&self) -> Option<&ControllerProcess> {
        self.control.as_ref().map(|c| &c.process)
    }

    /// The Kubernetes objects the lab declares, in controller mode (call [`Mesh::write_state`] after changing them,
    /// or use the typed methods that do).
    pub fn objects_mut(&mut self) -> Option<&mut KubeObjects> {
        self.control.as_mut().map(|c| &mut c.objects)
    }

    /// The lab.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The lab, to add nodes, pods and hosts (call [`Mesh::write_state`] afterwards so ztunnels see new pods).
    pub fn lab_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }

    /// The root the ztunnels trust, with its key: the development CA (also written to the lab directory) in file
    /// mode, the controller's root in controller mode.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The capture configuration used when enrolling pods.
    pub fn capture_config(&self) -> &CaptureConfig {
        &self.capture
    }

    /// The capture configuration used when enrolling pods, to change.
    pub fn capture_config_mut(&mut self) -> &mut CaptureConfig {
        &mut self.capture
    }

    /// Runs `binary` instead of [`crate::ztunnel::ztunnel_binary`] for ztunnels started from now on.
    pub fn set_ztunnel_binary(&mut self, binary: impl Into<PathBuf>) {
        self.binary = Some(binary.into());
    }

    /// The state file (file mode), to add services and policies; then call [`Mesh::write_state`].
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

    /// Rewrites (atomically) what the control plane reads from the lab's pods and the tests' additions: the state
    /// file in file mode (ztunnel polls it, 250 ms by default), the lab's Kubernetes objects ([`LAB_OBJECTS_FILE`]
    /// in the controller's directory, polled every 100 ms) in controller mode.
    pub fn write_state(&self) -> anyhow::Result<()> {
        match &self.control {
            None => self.state.write(&self.lab, &self.enrolled),
            Some(c) => c.process.write(LAB_OBJECTS_FILE, &c.objects.render(&self.lab)),
        }
    }

    /// Writes `yaml` (Kubernetes objects, e.g. `security.istio.io/v1` policies) as `file` in the controller's
    /// directory and waits until the L4 authorizations it produces (see [`objects::expected_authorizations`])
    /// are in every running ztunnel. Controller mode only.
    pub fn apply(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let c = self.control.as_ref().context("apply needs controller mode (file mode: use state_mut)")?;
        c.process.write(file, yaml)?;
        let expected = objects::expected_authorizations(yaml);
        self.wait_for_config(&format!("policies of {file}"), |d| {
            expected.iter().all(|(ns, name)| dump::has_policy(d, ns, name))
        })
        .map(drop)
    }

    /// Removes `file` from the controller's directory and waits until the authorizations it produced are gone
    /// from every running ztunnel. Controller mode only.
    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        let c = self.control.as_ref().context("remove needs controller mode (file mode: use state_mut)")?;
        let old = std::fs::read_to_string(c.process.cluster_dir().join(file)).unwrap_or_default();
        c.process.remove(file)?;
        let gone = objects::expected_authorizations(&old);
        self.wait_for_config(&format!("removal of {file}"), |d| {
            gone.iter().all(|(ns, name)| !dump::has_policy(d, ns, name))
        })
        .map(drop)
    }

    /// Declares a service (both modes: a Kubernetes Service, or a state-file service whose backends are the lab
    /// pods its selector picks) and waits until every running ztunnel has it with all its endpoints.
    pub fn add_service(&mut self, svc: ServiceSpec) -> anyhow::Result<()> {
        let backends: Vec<PodId> =
            (0..self.lab.pods().len()).map(PodId).filter(|p| svc.selects(self.lab.pod(*p))).collect();
        match &mut self.control {
            None => {
                let ports: Vec<(u16, u16)> = svc.ports.clone();
                self.state.add_service_for(&self.lab, &svc.name, &svc.namespace, svc.cluster_ip, &ports, &backends);
            }
            Some(c) => c.objects.add_service(svc.clone()),
        }
        self.write_state()?;
        let (ns, host, n) = (svc.namespace.clone(), svc.hostname(), backends.len());
        self.wait_for_config(&format!("service {host} with {n} endpoints"), |d| {
            dump::service(d, &host).is_some() && dump::endpoints(d, &ns, &host) == n
        })
        .map(drop)
    }

    /// Declares `pod` Ready or not (its Pod's Ready condition, or the state file's workload status) and waits until
    /// its node's ztunnel shows the status.
    pub fn set_ready(&mut self, pod: PodId, ready: bool) -> anyhow::Result<()> {
        let uid = self.lab.pod(pod).uid.clone();
        match &mut self.control {
            None => {
                let status = if ready { "Healthy" } else { "Unhealthy" };
                self.state.set_workload_field(&uid, "status", status.into());
            }
            Some(c) => c.objects.set_ready(&uid, ready),
        }
        self.write_state()?;
        let want = if ready { "Healthy" } else { "Unhealthy" };
        self.wait_for_pod(pod, &format!("{uid} {want}"), |w| w["status"] == want).map(drop)
    }

    /// Declares that `pod` runs as `service_account` (its Pod object, or the state file's workload) while its
    /// node's ztunnel keeps the identity it was given at enrollment; waits until ztunnels show the declared one.
    pub fn declare_service_account(&mut self, pod: PodId, service_account: &str) -> anyhow::Result<()> {
        let p = self.lab.pod(pod);
        let uid = p.uid.clone();
        let identity = format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{service_account}", p.namespace);
        match &mut self.control {
            None => self.state.set_workload_field(&uid, "serviceAccount", service_account.into()),
            Some(c) => c.objects.set_service_account(&uid, service_account),
        }
        self.write_state()?;
        self.wait_for_pod(pod, &format!("{uid} as {identity}"), |w| w["identity"] == identity.as_str()).map(drop)
    }

    /// Labels namespace `ns` ambient (controller mode; file mode has no namespaces, every enrolled pod is HBONE).
    pub fn set_ambient(&mut self, ns: &str, ambient: bool) -> anyhow::Result<()> {
        if let Some(c) = &mut self.control {
            c.objects.set_ambient(ns, ambient);
            self.write_state()?;
        }
        Ok(())
    }

    /// Adds a pod at run time the way a cluster does: the lab pod, its object (or state-file entry), then, if it is
    /// captured (controller mode: an ambient namespace; both modes: no `istio.io/dataplane-mode=none` label),
    /// enrollment. Returns once every running ztunnel that should know it has it.
    pub fn add_pod(&mut self, node: NodeId, spec: PodSpec) -> anyhow::Result<PodId> {
        let pod = self.lab.add_pod(node, spec)?;
        let p = self.lab.pod(pod);
        let captured = match &self.control {
            Some(c) => c.objects.is_captured(p),
            None => p.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) != Some("none"),
        };
        if captured {
            self.enroll(pod)?;
            let ip = self.lab.pod(pod).ip;
            self.wait_for_config(&format!("captured workload {ip}"), |d| dump::has_captured_workload(d, ip))?;
        } else {
            self.write_state()?;
            self.wait_for_pod(pod, "uncaptured workload", |w| w["protocol"] == "None")?;
        }
        Ok(pod)
    }

    /// Polls the config dump of every running ztunnel until `holds` is true of each; how long that took. The error
    /// names `what` and shows the last dump that did not hold.
    pub fn wait_for_config(&self, what: &str, holds: impl Fn(&serde_json::Value) -> bool) -> anyhow::Result<Duration> {
        let nodes: Vec<NodeId> =
            (0..self.nodes.len()).filter(|i| self.nodes[*i].ztunnel.is_some()).map(NodeId).collect();
        self.wait_on(&nodes, what, holds)
    }

    /// [`Mesh::wait_for_config`] with `holds` given the pod's workload, on the ztunnels that know the pod: every
    /// running one for an enrolled pod, else (an uncaptured pod is only sent to its own node) its node's.
    fn wait_for_pod(
        &self,
        pod: PodId,
        what: &str,
        holds: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<Duration> {
        let p = self.lab.pod(pod);
        let running = |n: &NodeId| self.nodes.get(n.0).is_some_and(|n| n.ztunnel.is_some());
        let nodes: Vec<NodeId> = if self.enrolled.contains(&pod) {
            (0..self.nodes.len()).map(NodeId).filter(running).collect()
        } else {
            Some(p.node).filter(running).into_iter().collect()
        };
        let ip = p.ip;
        self.wait_on(&nodes, what, |d| dump::workload(d, ip).is_some_and(&holds))
    }

    fn wait_on(
        &self,
        nodes: &[NodeId],
        what: &str,
        holds: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut pending: Vec<NodeId> = nodes.to_vec();
        let mut last = String::new();
        loop {
            pending.retain(|n| match self.ztunnel(*n).admin_get("/config_dump") {
                Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(v) if holds(&v) => false,
                    _ => {
                        last = text;
                        true
                    }
                },
                Err(e) => {
                    last = format!("{e:#}");
                    true
                }
            });
            if pending.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > APPLY_TIMEOUT {
                let log = self.controller().map(|c| c.log_text()).unwrap_or_default();
                bail!("{what}: not in the config of {pending:?} after {APPLY_TIMEOUT:?}; last dump:\n{last}\ncontroller log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
        args.controller = self.control.as_ref().map(|c| c.process.flags(&args.node_name));
        // Always the lab's own pin directory: pods captured with nftables have no pins there.
        args.extra.extend(["--bpf-pin-root".to_string(), self.capture.bpf_pin_root.display().to_string()]);
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
        let mut zt = self.spawn_ztunnel(node, args)?;
        let conn = self.hand_pods_to(node, &mut zt)?;
        self.swap_ztunnel(node, zt, conn);
        Ok(())
    }

    /// Starts a ztunnel process for `node` (the node's ZDS server must be bound).
    pub(crate) fn spawn_ztunnel(&self, node: NodeId, args: ZtunnelArgs) -> anyhow::Result<ZtunnelProcess> {
        let binary = match &self.binary {
            Some(b) => b.clone(),
            None => crate::ztunnel::ztunnel_binary()?,
        };
        ZtunnelProcess::start_binary(&binary, self.lab.node(node), args)
    }

    /// Acts as the node agent for a ztunnel that just started on `node`: accepts its ZDS connection (the node's
    /// server accepts any number, so an old ztunnel may keep its own meanwhile), sends the node's enrolled pods
    /// (`add`, with their namespace fds) and `snapshot_sent`, and waits until it reports ready.
    pub(crate) fn hand_pods_to(&self, node: NodeId, zt: &mut ZtunnelProcess) -> anyhow::Result<ZdsAgentConnection> {
        let rt = self.rt.as_ref().context("bug: runtime used after drop")?;
        let server = self.nodes.get(node.0).and_then(|n| n.server.as_ref()).context("bug: no ZDS server")?;
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
        Ok(conn)
    }

    /// Makes `zt` (and its ZDS connection) the ztunnel of `node`; returns the previous ones, still running.
    pub(crate) fn swap_ztunnel(
        &mut self,
        node: NodeId,
        zt: ZtunnelProcess,
        conn: ZdsAgentConnection,
    ) -> (Option<ZtunnelProcess>, Option<ZdsAgentConnection>) {
        let mn = &mut self.nodes[node.0];
        (mn.ztunnel.replace(zt), mn.conn.replace(conn))
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

    /// Enrolls `pod`: marks it HBONE in the state file (file mode; in controller mode its object is written and
    /// its namespace decides), installs capture in its namespace, and (if its node's ztunnel runs) sends ZDS
    /// `add` with its namespace fd, waiting for the ack. In controller mode it first waits until that ztunnel knows
    /// the pod, as the controller's CA signs only identities of pods it knows on the caller's node.
    pub fn enroll(&mut self, pod: PodId) -> anyhow::Result<()> {
        let p = self.lab.pod(pod);
        self.enrolled.insert(pod);
        self.write_state()?;
        if self.control.is_some() && self.nodes.get(p.node.0).is_some_and(|n| n.ztunnel.is_some()) {
            let ip = p.ip;
            let what = format!("workload of {}", p.uid);
            self.wait_on(&[p.node], &what, |d| dump::workload(d, ip).is_some())?;
        }
        // As the node agent does: a ztunnel that closes its listeners (draining for its replacement) hands the
        // connections waiting in their queues to the replacement's listeners on the same ports, instead of
        // resetting them.
        p.netns.set_sysctl("net/ipv4/tcp_migrate_req", "1")?;
        capture::install(&p.netns.path(), &self.capture).with_context(|| format!("install capture for {}", p.uid))?;
        let rt = self.rt.as_ref().context("bug: runtime used after drop")?;
        if let Some(conn) = self.nodes.get_mut(p.node.0).and_then(|n| n.conn.as_mut()) {
            let fd = p.netns.open().with_context(|| format!("open netns of {}", p.uid))?;
            block_on(rt, conn.add(&p.uid, workload_info(&self.lab, pod), fd.as_fd()))
                .with_context(|| format!("ZDS add {}", p.uid))?;
        }
        Ok(())
    }

    /// Releases `pod`: ZDS `del` (if its node's ztunnel runs), removes capture, and marks it `NONE` again (file
    /// mode; in controller mode its object is unchanged: label it `istio.io/dataplane-mode=none` to opt it out).
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
        if let Err(e) = ambit_ebpf::uninstall_node(&self.capture.bpf_pin_root) {
            eprintln!("cannot remove the lab's eBPF capture: {e}");
        }
        // Safe inside an async test, unlike dropping a Runtime there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The capture the lab's pods get: nftables, or eBPF when `AMBIT_LAB_CAPTURE=ebpf` (the test script runs the L4
/// suite both ways), pinned under a bpffs directory of this lab's own, removed with the mesh.
fn lab_capture(lab: &Lab) -> anyhow::Result<CaptureConfig> {
    let mode = match std::env::var("AMBIT_LAB_CAPTURE").as_deref() {
        Err(_) | Ok("" | "nftables") => CaptureMode::Nftables,
        Ok("ebpf") => CaptureMode::Ebpf,
        Ok(other) => bail!("AMBIT_LAB_CAPTURE={other:?}: expected nftables or ebpf"),
    };
    Ok(CaptureConfig {
        mode,
        bpf_pin_root: PathBuf::from("/sys/fs/bpf").join(lab.prefix()),
        ..CaptureConfig::default()
    })
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
        assert!(capture::is_installed(&pod.netns.path(), &mesh.capture).unwrap());
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
        assert!(!capture::is_installed(&pod.netns.path(), &mesh.capture).unwrap());
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
