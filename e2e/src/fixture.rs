//! The cluster most end-to-end tests start from: two nodes, pods `client`
//! and `local` on node 1 and `remote` on node 2, all enrolled, an echo server
//! on 8080 in `local` and `remote`, and an external host `ext` outside the
//! mesh.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::apps::EchoServer;
use crate::lab::{HostId, Lab, NodeId, PodId, PodSpec};
use crate::mesh::Mesh;
use crate::netns::NetNs;
use crate::ztunnel::ZtunnelArgs;

/// Port of the echo servers.
pub const APP_PORT: u16 = 8080;

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
    /// Builds and starts the cluster, with ztunnel flags adjusted by
    /// `customize`; `None` when not root outside CI (see [`crate::require_root`]).
    pub fn start(test: &str, customize: impl Fn(&mut ZtunnelArgs)) -> Option<Self> {
        if !crate::require_root(test) {
            return None;
        }
        let mut lab = Lab::new(test).expect("lab");
        let n1 = lab.add_node("node1").unwrap();
        let n2 = lab.add_node("node2").unwrap();
        let client = lab.add_pod(n1, PodSpec::new("client", "default", "client")).unwrap();
        let local = lab.add_pod(n1, PodSpec::new("local", "default", "local")).unwrap();
        let remote = lab.add_pod(n2, PodSpec::new("remote", "default", "remote")).unwrap();
        let ext = lab.add_external_host("ext").unwrap();
        let mut mesh = Mesh::new(lab).expect("mesh");
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
        // Let ztunnel pick up the state written by `enroll`.
        std::thread::sleep(Duration::from_millis(600));
        Some(Cluster { mesh, nodes: [n1, n2], client, local, remote, ext, echoes })
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
