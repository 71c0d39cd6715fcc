//! A Kubernetes-like cluster made of network namespaces.
//!
//! ```text
//!                    fabric netns: bridge br0 (no address)
//!        n1 ──────────────── n2 ──────────────── h200
//!         │                   │                   │
//!   node1 eth0 10.0.0.1  node2 eth0 10.0.0.2   host eth0 10.0.0.200
//!    p2 10.1.0.1/32        p2 10.2.0.1/32        routes 10.i.0.0/24 via 10.0.0.i
//!     │                     │
//!   pod eth0 10.1.0.2/32  pod eth0 10.2.0.2/32  (default via 10.i.0.1)
//! ```
//! Node i routes the pod range `10.j.0.0/24` of every other node j via `10.0.0.j`. Every interface is created
//! directly inside the namespaces (never in the root namespace), so interface names repeat freely between labs and
//! parallel tests cannot collide; namespace names carry the test name and the process id.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, ensure, Context};
use ipnet::Ipv4Net;

use crate::netns::NetNs;

/// Index of a node in its [`Lab`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub usize);

/// Index of a pod in its [`Lab`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodId(pub usize);

/// Index of an external host in its [`Lab`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostId(pub usize);

/// What a pod is: its Kubernetes name, namespace, service account and labels.
#[derive(Clone, Debug, Default)]
pub struct PodSpec {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account (its SPIFFE identity's `sa` segment).
    pub service_account: String,
    /// Pod labels (informational for now; tests may use them to build state).
    pub labels: BTreeMap<String, String>,
}

impl PodSpec {
    /// A pod `name` in `namespace` running as `service_account`, without labels.
    pub fn new(name: &str, namespace: &str, service_account: &str) -> Self {
        PodSpec {
            name: name.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            labels: BTreeMap::new(),
        }
    }
}

/// A pod: one network namespace with `eth0` (a /32) wired to its node.
#[derive(Debug)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Labels from the spec.
    pub labels: BTreeMap<String, String>,
    /// The pod's address on `eth0`: `10.<node>.0.<k>`.
    pub ip: Ipv4Addr,
    /// The node it runs on.
    pub node: NodeId,
    /// Name of the node-side veth (`p<k>`), in the node's namespace.
    pub node_iface: String,
    /// The pod's network namespace.
    pub netns: NetNs,
    /// Stable id: `lab/<namespace>/<name>` (the ZDS and state-file uid).
    pub uid: String,
}

/// A node: a network namespace on the fabric that routes for its pods.
#[derive(Debug)]
pub struct Node {
    /// Node name (e.g. `node1`), as ztunnel's `--node-name`.
    pub name: String,
    /// The node's address on the fabric: `10.0.0.<i>`.
    pub ip: Ipv4Addr,
    /// The node's pod range: `10.<i>.0.0/24`.
    pub pod_cidr: Ipv4Net,
    /// Name of the node's veth in the fabric namespace (`n<i>`), where a sniffer sees its traffic.
    pub fabric_iface: String,
    /// The node's network namespace.
    pub netns: NetNs,
    /// Next pod host number (starts at 2; .1 is the node's gateway address).
    next_pod: u8,
}

impl Node {
    /// The gateway address pods of this node route through: `10.<i>.0.1`.
    pub fn gateway(&self) -> Ipv4Addr {
        let o = self.pod_cidr.network().octets();
        Ipv4Addr::new(o[0], o[1], o[2], 1)
    }
}

/// A host on the fabric that is neither a node nor in the mesh.
#[derive(Debug)]
pub struct Host {
    /// Host name given to [`Lab::add_external_host`].
    pub name: String,
    /// Its address on the fabric: `10.0.0.<200+n>`.
    pub ip: Ipv4Addr,
    /// Name of its veth in the fabric namespace (`h<last octet>`).
    pub fabric_iface: String,
    /// Its network namespace.
    pub netns: NetNs,
}

/// Distinguishes several labs built by one process (their namespace names would otherwise collide).
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// A cluster of namespaces; dropping it kills the processes it started and deletes every namespace and its
/// directory (also while unwinding from a panic).
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    dir: PathBuf,
    children: Vec<Child>,
    // Drop order matters: pods, hosts and nodes go before the fabric that connects them.
    pods: Vec<Pod>,
    hosts: Vec<Host>,
    nodes: Vec<Node>,
    fabric: NetNs,
}

impl Lab {
    /// Builds an empty lab: the fabric namespace with bridge `br0`, and a scratch directory.
    ///
    /// Namespaces are named `<test_name>-<pid>[-<n>]-<role>` (the test name shortened to 24 characters).
    pub fn new(test_name: &str) -> anyhow::Result<Self> {
        let mut short: String =
            test_name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(24).collect();
        if short.is_empty() {
            short.push_str("lab");
        }
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = match seq {
            0 => format!("{short}-{}", std::process::id()),
            n => format!("{short}-{}-{n}", std::process::id()),
        };
        let dir = std::env::temp_dir().join(format!("ambit-lab-{prefix}"));
        // A leftover from a killed run with the same pid would only confuse: start clean.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

        let fabric = NetNs::create(&format!("{prefix}-fabric"))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        Ok(Lab { prefix, dir, children: Vec::new(), pods: Vec::new(), hosts: Vec::new(), nodes: Vec::new(), fabric })
    }

    /// Adds node number `nodes + 1` (at most 199): `10.0.0.<i>/24` on the fabric, forwarding on, routes to the pod
    /// ranges of the other nodes (and theirs to this one).
    pub fn add_node(&mut self, name: &str) -> anyhow::Result<NodeId> {
        ensure!(self.nodes.len() < 199, "a lab holds at most 199 nodes");
        ensure!(self.nodes.iter().all(|n| n.name != name), "node {name} already exists");
        let i = self.nodes.len() as u8 + 1;
        let netns = self.new_netns(name)?;
        for (key, value) in FORWARDING_SYSCTLS {
            netns.set_sysctl(key, value)?;
        }
        let ip = Ipv4Addr::new(10, 0, 0, i);
        let fabric_iface = format!("n{i}");
        self.attach_to_fabric(&netns, &fabric_iface, ip)?;
        let pod_cidr = Ipv4Net::new(Ipv4Addr::new(10, i, 0, 0), 24).expect("bug: /24 is a valid prefix");

        // Routes between this node's pod range and every other node's (both ways), and from external hosts.
        for other in &self.nodes {
            netns.ip(&["route", "add", &other.pod_cidr.to_string(), "via", &other.ip.to_string()])?;
            other.netns.ip(&["route", "add", &pod_cidr.to_string(), "via", &ip.to_string()])?;
        }
        for host in &self.hosts {
            host.netns.ip(&["route", "add", &pod_cidr.to_string(), "via", &ip.to_string()])?;
        }
        self.nodes.push(Node { name: name.to_string(), ip, pod_cidr, fabric_iface, netns, next_pod: 2 });
        Ok(NodeId(self.nodes.len() - 1))
    }

    /// Adds a pod on `node`: its own namespace with `eth0` = `10.<i>.0.<k>/32`, a veth `p<k>` on the node with the
    /// gateway address `10.<i>.0.1/32` and a host route back to the pod.
    pub fn add_pod(&mut self, node: NodeId, spec: PodSpec) -> anyhow::Result<PodId> {
        let uid = format!("lab/{}/{}", spec.namespace, spec.name);
        ensure!(self.pods.iter().all(|p| p.uid != uid), "pod {uid} already exists");
        let prefix = self.prefix.clone();
        let n = self.nodes.get_mut(node.0).with_context(|| format!("no node {node:?}"))?;
        ensure!(n.next_pod < 255, "node {} is full", n.name);
        let k = n.next_pod;
        n.next_pod += 1;
        let o = n.pod_cidr.network().octets();
        let ip = Ipv4Addr::new(o[0], o[1], o[2], k);
        let gw = n.gateway();
        let node_iface = format!("p{k}");
        let netns = NetNs::create(&format!("{prefix}-{}-{k}-{}", n.name, short_role(&spec.name)))?;
        for (key, value) in RP_FILTER_OFF {
            netns.set_sysctl(key, value)?;
        }

        n.netns.ip(&["link", "add", &node_iface, "type", "veth", "peer", "name", "eth0", "netns", netns.name()])?;
        n.netns.set_sysctl(&format!("net/ipv4/conf/{node_iface}/rp_filter"), "0")?;
        n.netns.ip(&["addr", "add", &format!("{gw}/32"), "dev", &node_iface])?;
        n.netns.ip(&["link", "set", &node_iface, "up"])?;
        n.netns.ip(&["route", "add", &format!("{ip}/32"), "dev", &node_iface])?;

        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", &gw.to_string(), "dev", "eth0", "scope", "link"])?;
        netns.ip(&["route", "add", "default", "via", &gw.to_string()])?;

        self.pods.push(Pod {
            name: spec.name,
            namespace: spec.namespace,
            service_account: spec.service_account,
            labels: spec.labels,
            ip,
            node,
            node_iface,
            netns,
            uid,
        });
        Ok(PodId(self.pods.len() - 1))
    }

    /// Adds a host outside the mesh on the fabric (`10.0.0.200`, `.201`, ...) with routes to every pod range.
    pub fn add_external_host(&mut self, name: &str) -> anyhow::Result<HostId> {
        ensure!(self.hosts.len() < 55, "a lab holds at most 55 external hosts");
        let last = 200 + self.hosts.len() as u8;
        let netns = self.new_netns(name)?;
        for (key, value) in RP_FILTER_OFF {
            netns.set_sysctl(key, value)?;
        }
        let ip = Ipv4Addr::new(10, 0, 0, last);
        let fabric_iface = format!("h{last}");
        self.attach_to_fabric(&netns, &fabric_iface, ip)?;
        for node in &self.nodes {
            netns.ip(&["route", "add", &node.pod_cidr.to_string(), "via", &node.ip.to_string()])?;
        }
        self.hosts.push(Host { name: name.to_string(), ip, fabric_iface, netns });
        Ok(HostId(self.hosts.len() - 1))
    }

    /// Starts `cmd` (typically from [`NetNs::command`]) and keeps it: it is killed (SIGKILL, this PID only) when
    /// the lab is dropped. Returns its PID.
    pub fn spawn(&mut self, cmd: &mut Command) -> anyhow::Result<u32> {
        let child = cmd.spawn().with_context(|| format!("spawn {:?}", cmd.get_program()))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// A pod. Panics on an id from another lab.
    pub fn pod(&self, id: PodId) -> &Pod {
        &self.pods[id.0]
    }

    /// A node. Panics on an id from another lab.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    /// An external host. Panics on an id from another lab.
    pub fn host(&self, id: HostId) -> &Host {
        &self.hosts[id.0]
    }

    /// All pods, in creation order (index = `PodId`).
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// All nodes, in creation order (index = `NodeId`).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// All external hosts, in creation order (index = `HostId`).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The pod with this address, if any.
    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<PodId> {
        self.pods.iter().position(|p| p.ip == ip).map(PodId)
    }

    /// The fabric namespace (bridge `br0`, and the nodes' and hosts' veths `n<i>` / `h<n>`).
    pub fn fabric(&self) -> &NetNs {
        &self.fabric
    }

    /// This lab's scratch directory (state files, sockets, certificates, logs); removed on drop unless the
    /// `AMBIT_LAB_KEEP` environment variable is set.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The common prefix of this lab's namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Creates `<prefix>-<role>`.
    fn new_netns(&self, role: &str) -> anyhow::Result<NetNs> {
        if role.is_empty() || role.contains('/') {
            bail!("bad name {role:?} for a lab namespace");
        }
        NetNs::create(&format!("{}-{}", self.prefix, short_role(role)))
    }

    /// Connects `netns` to the fabric bridge: `fabric_iface` in the fabric, `eth0` with `ip/24` inside.
    fn attach_to_fabric(&self, netns: &NetNs, fabric_iface: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
        let f = &self.fabric;
        f.ip(&["link", "add", fabric_iface, "type", "veth", "peer", "name", "eth0", "netns", netns.name()])?;
        f.ip(&["link", "set", fabric_iface, "master", "br0"])?;
        f.ip(&["link", "set", fabric_iface, "up"])?;
        netns.set_sysctl("net/ipv4/conf/eth0/rp_filter", "0")?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            // Only the processes this lab started, by their own handle.
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("AMBIT_LAB_KEEP").is_some() {
            eprintln!("lab {}: keeping {}", self.prefix, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        // The namespaces are deleted as the fields drop, pods first.
    }
}

/// Sysctls of a namespace that routes (nodes): forwarding on, reverse-path filtering off.
const FORWARDING_SYSCTLS: [(&str, &str); 3] =
    [("net/ipv4/ip_forward", "1"), ("net/ipv4/conf/all/rp_filter", "0"), ("net/ipv4/conf/default/rp_filter", "0")];

/// Reverse-path filtering off (the effective value is the max of `all` and the interface's, which starts from
/// `default`), so redirected and spoofed-source traffic is not dropped.
const RP_FILTER_OFF: [(&str, &str); 2] =
    [("net/ipv4/conf/all/rp_filter", "0"), ("net/ipv4/conf/default/rp_filter", "0")];

/// A role name usable inside a namespace name: ASCII alphanumerics and dashes, at most 24 characters.
fn short_role(role: &str) -> String {
    role.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).take(24).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_sanitised_and_shortened() {
        assert_eq!(short_role("a.b/c_d"), "a-b-c-d");
        assert_eq!(short_role(&"x".repeat(40)).len(), 24);
    }

    #[test]
    fn pods_get_addresses_in_their_nodes_range() {
        if !crate::require_root("pods_get_addresses_in_their_nodes_range") {
            return;
        }
        let mut lab = Lab::new("lab-unit-addresses").unwrap();
        let n1 = lab.add_node("node1").unwrap();
        let n2 = lab.add_node("node2").unwrap();
        let a = lab.add_pod(n1, PodSpec::new("a", "default", "sa")).unwrap();
        let b = lab.add_pod(n1, PodSpec::new("b", "default", "sa")).unwrap();
        let c = lab.add_pod(n2, PodSpec::new("c", "other", "sa")).unwrap();
        assert_eq!(lab.pod(a).ip, Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(lab.pod(b).ip, Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(lab.pod(c).ip, Ipv4Addr::new(10, 2, 0, 2));
        assert_eq!(lab.pod(c).uid, "lab/other/c");
        assert_eq!(lab.node(n2).ip, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(lab.pod_by_ip(Ipv4Addr::new(10, 1, 0, 3)), Some(b));
        let routes = lab.node(n1).netns.ip(&["route"]).unwrap();
        assert!(routes.contains("10.2.0.0/24 via 10.0.0.2"), "{routes}");
        assert!(lab.add_pod(n1, PodSpec::new("a", "default", "sa")).is_err(), "duplicate uid accepted");
    }
}
