//! Kubelet probes in the node's network namespace: SNAT to the probe source.
//!
//! The kubelet probes a pod from the node. With capture on, that connection
//! would reach ztunnel's inbound listener, which under STRICT mTLS refuses
//! plaintext. As Istio does, the node rewrites the source of its own traffic
//! to the pods to a link-local address (169.254.7.127), and the pod's capture
//! rules let that source through (`CaptureConfig::probe_source`).
//!
//! What counts as "the node's own traffic": `fib saddr type local` in
//! postrouting, i.e. packets whose source is one of the node's addresses.
//! That is the kubelet and host-network processes, and never forwarded
//! traffic (pod to pod, or from outside through a NodePort), whose source is
//! not local. Istio matches `-m owner --socket-exists` and an ipset of enrolled
//! pods instead; nft has no socket-exists in postrouting, and matching the
//! node's pod CIDRs needs no per-pod update. Traffic from host-network pods to
//! enrolled pods therefore bypasses ztunnel, as in Istio.

use std::fmt::Write;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

use super::exec::run_in_netns;
use super::{CaptureError, DEFAULT_PROBE_SOURCE};

/// Family of the node table.
const TABLE_FAMILY: &str = "inet";
/// Name of the one table Ambit owns in the node's network namespace.
pub const NODE_TABLE_NAME: &str = "ambit-node";

/// What the node SNATs: its TCP to these pod networks gets `probe_source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeProbeSnat {
    /// The node's pod CIDRs (`Node.spec.podCIDRs`); only those of
    /// `probe_source`'s family are used (IPv4 by default).
    pub pod_cidrs: Vec<IpNet>,
    /// The source probes get; must equal the pods' `CaptureConfig::probe_source`.
    pub probe_source: IpAddr,
}

impl NodeProbeSnat {
    /// SNAT for `pod_cidrs` to Istio's probe source.
    pub fn new(pod_cidrs: Vec<IpNet>) -> Self {
        NodeProbeSnat { pod_cidrs, probe_source: DEFAULT_PROBE_SOURCE }
    }
}

/// The `nft -f -` script that atomically replaces the node table.
pub fn node_probe_snat_ruleset(snat: &NodeProbeSnat) -> String {
    let (family, source) = match snat.probe_source {
        IpAddr::V4(a) => ("ip", a.to_string()),
        IpAddr::V6(a) => ("ip6", a.to_string()),
    };
    let cidrs: Vec<String> = snat
        .pod_cidrs
        .iter()
        .filter(|c| c.addr().is_ipv4() == snat.probe_source.is_ipv4())
        .map(IpNet::to_string)
        .collect();
    let mut s = String::new();
    // Declare-then-delete replaces the table in one transaction (see nft.rs).
    let _ = writeln!(s, "table {TABLE_FAMILY} {NODE_TABLE_NAME} {{}}");
    let _ = writeln!(s, "delete table {TABLE_FAMILY} {NODE_TABLE_NAME}");
    let _ = writeln!(s, "table {TABLE_FAMILY} {NODE_TABLE_NAME} {{");
    let _ = writeln!(s, "\tchain postrouting {{");
    let _ = writeln!(s, "\t\ttype nat hook postrouting priority srcnat; policy accept;");
    if !cidrs.is_empty() {
        let _ = writeln!(
            s,
            "\t\tfib saddr type local {family} daddr {{ {} }} meta l4proto tcp snat {family} to {source}",
            cidrs.join(", ")
        );
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");
    s
}

/// Installs (or replaces) the probe SNAT in the node's namespace at
/// `host_netns` (`/proc/1/ns/net` from a host-network agent).
pub fn install_node_probe_snat(host_netns: &Path, snat: &NodeProbeSnat) -> Result<(), CaptureError> {
    run_in_netns(host_netns, "nft", &["-f", "-"], Some(&node_probe_snat_ruleset(snat)))?;
    tracing::info!(cidrs = ?snat.pod_cidrs, source = %snat.probe_source, "node probe SNAT installed");
    Ok(())
}

/// Removes the node table; absent is not an error.
pub fn uninstall_node_probe_snat(host_netns: &Path) -> Result<(), CaptureError> {
    let script =
        format!("table {TABLE_FAMILY} {NODE_TABLE_NAME} {{}}\ndelete table {TABLE_FAMILY} {NODE_TABLE_NAME}\n");
    run_in_netns(host_netns, "nft", &["-f", "-"], Some(&script))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_matches_local_sources_to_the_pod_cidrs_of_the_probe_family() {
        let snat = NodeProbeSnat::new(vec!["10.1.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()]);
        let text = node_probe_snat_ruleset(&snat);
        assert!(
            text.contains("fib saddr type local ip daddr { 10.1.0.0/24 } meta l4proto tcp snat ip to 169.254.7.127"),
            "{text}"
        );
        assert!(!text.contains("fd00"), "{text}");
        assert!(text.starts_with("table inet ambit-node {}\ndelete table inet ambit-node\n"), "{text}");
    }

    #[test]
    fn no_cidrs_gives_an_empty_chain() {
        let text = node_probe_snat_ruleset(&NodeProbeSnat::new(vec![]));
        assert!(!text.contains("snat"), "{text}");
    }
}
