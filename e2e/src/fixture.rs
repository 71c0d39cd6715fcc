//! The cluster most end-to-end tests start from: two nodes, pods `client`
//! and `local` on node 1 and `remote` on node 2, all enrolled, an echo server
//! on 8080 in `local` and `remote` (both labelled `role: echo`), and an
//! external host `ext` outside the mesh.
//!
//! By default the control plane is the real `ambit-controller` (file mode, on
//! an extra fabric host `ctrl`) reading the lab as Kubernetes objects, with
//! namespace `default` ambient; ztunnels take xDS and certificates from it.
//! [`Cluster::start_file_mode`] runs ztunnel on its local state file instead.

use std::net::{Ipv4Addr, SocketAddr};

use crate::apps::EchoServer;
use crate::dump;
use crate::lab::{HostId, Lab, NodeId, PodId, PodSpec};
use crate::mesh::Mesh;
use crate::netns::NetNs;
use crate::objects::ServiceSpec;
use crate::ztunnel::ZtunnelArgs;

/// Port of the echo servers.
pub const APP_PORT: u16 = 8080;

/// Label (`role: echo`) of the pods running an echo server, for service selectors.
pub const ECHO_LABEL: (&str, &str) = ("role", "echo");

/// Where the ztunnels of a [`Cluster`] take their state and certificates from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `ambit-controller` over xDS and its CA (the default).
    Controller,
    /// ztunnel's local state file and the lab's development CA.
    File,
}

/// A started two-node cluster (see the module docs).
pub struct Cluster {
    pub mesh: Mesh,
    pub nodes: [NodeId; 2],
    pub client: PodId,
    pub local: PodId,
    pub remote: PodId,
    pub ext: HostId,
    /// The echo servers of `local` and `remote`, in that order.
    pub echoes: Vec<EchoServer>,
}

impl Cluster {
    /// Builds and starts the cluster in controller mode, with ztunnel flags
    /// adjusted by `customize`; `None` when not root outside CI (see
    /// [`crate::require_root`]).
    pub fn start(test: &str, customize: impl Fn(&mut ZtunnelArgs)) -> Option<Self> {
        Self::start_in(Mode::Controller, test, customize)
    }

    /// [`Cluster::start`] with ztunnel in file mode.
    pub fn start_file_mode(test: &str, customize: impl Fn(&mut ZtunnelArgs)) -> Option<Self> {
        Self::start_in(Mode::File, test, customize)
    }

    /// Builds and starts the cluster in `mode`; returns once every ztunnel's
    /// config holds the three enrolled pods.
    pub fn start_in(mode: Mode, test: &str, customize: impl Fn(&mut ZtunnelArgs)) -> Option<Self> {
        if !crate::require_root(test) {
            return None;
        }
        let mut lab = Lab::new(test).expect("lab");
        let n1 = lab.add_node("node1").unwrap();
        let n2 = lab.add_node("node2").unwrap();
        let echo = |name: &str| {
            let mut spec = PodSpec::new(name, "default", name);
            spec.labels.insert(ECHO_LABEL.0.into(), ECHO_LABEL.1.into());
            spec
        };
        let client = lab.add_pod(n1, PodSpec::new("client", "default", "client")).unwrap();
        let local = lab.add_pod(n1, echo("local")).unwrap();
        let remote = lab.add_pod(n2, echo("remote")).unwrap();
        let ext = lab.add_external_host("ext").unwrap();
        let mut mesh = match mode {
            Mode::File => Mesh::new(lab).expect("mesh"),
            Mode::Controller => {
                let ctrl = lab.add_external_host("ctrl").unwrap();
                Mesh::with_controller(lab, ctrl, &["default"]).expect("mesh with controller")
            }
        };
        for n in [n1, n2] {
            mesh.start_ztunnel_with(n, &customize).expect("start ztunnel");
        }
        for p in [client, local, remote] {
            mesh.enroll(p).expect("enroll");
        }
        let echoes = [local, remote]
            .iter()
            .map(|p| EchoServer::start(&mesh.lab().pod(*p).netns, SocketAddr::from(([0, 0, 0, 0], APP_PORT))).unwrap())
            .collect();
        let ips: Vec<Ipv4Addr> = [client, local, remote].iter().map(|p| mesh.lab().pod(*p).ip).collect();
        mesh.wait_for_config("the enrolled pods", |d| ips.iter().all(|ip| dump::has_captured_workload(d, *ip)))
            .expect("ztunnels know the cluster's pods");
        Some(Cluster { mesh, nodes: [n1, n2], client, local, remote, ext, echoes })
    }

    /// Whether the control plane is the controller.
    pub fn mode(&self) -> Mode {
        if self.mesh.controller().is_some() {
            Mode::Controller
        } else {
            Mode::File
        }
    }

    /// Writes Kubernetes objects (policies…) as `file` in the controller's
    /// directory and waits until ztunnels hold them (see [`Mesh::apply`]);
    /// panics on failure.
    pub fn apply(&self, file: &str, yaml: &str) {
        self.mesh.apply(file, yaml).unwrap_or_else(|e| panic!("apply {file}: {e:#}"));
    }

    /// Removes `file` from the controller's directory and waits until its
    /// policies are gone (see [`Mesh::remove`]); panics on failure.
    pub fn remove(&self, file: &str) {
        self.mesh.remove(file).unwrap_or_else(|e| panic!("remove {file}: {e:#}"));
    }

    /// Declares a service and waits until ztunnels have it with its
    /// endpoints (see [`Mesh::add_service`]); panics on failure.
    pub fn add_service(&mut self, svc: ServiceSpec) {
        let name = svc.hostname();
        self.mesh.add_service(svc).unwrap_or_else(|e| panic!("add service {name}: {e:#}"));
    }

    /// Adds a pod at run time (enrolled if captured; see [`Mesh::add_pod`]);
    /// panics on failure.
    pub fn add_pod(&mut self, node: NodeId, spec: PodSpec) -> PodId {
        let name = format!("{}/{}", spec.namespace, spec.name);
        self.mesh.add_pod(node, spec).unwrap_or_else(|e| panic!("add pod {name}: {e:#}"))
    }

    /// A pod's network namespace.
    pub fn pod_ns(&self, p: PodId) -> &NetNs {
        &self.mesh.lab().pod(p).netns
    }

    /// The external host's network namespace.
    pub fn ext_ns(&self) -> &NetNs {
        &self.mesh.lab().host(self.ext).netns
    }

    /// A pod's IP.
    pub fn ip(&self, p: PodId) -> Ipv4Addr {
        self.mesh.lab().pod(p).ip
    }

    /// A pod's echo server address.
    pub fn app(&self, p: PodId) -> SocketAddr {
        SocketAddr::from((self.ip(p), APP_PORT))
    }
}
