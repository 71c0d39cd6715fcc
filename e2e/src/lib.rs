//! Ambit's lab: a small Kubernetes-like cluster made of Linux network namespaces (a fabric bridge, nodes, pods and
//! external hosts), test applications, a packet sniffer, and a harness that runs the real `ztunnel`,
//! `ambit-controller` and `ambit-waypoint` binaries in it.
//!
//! Everything is real — namespaces, veths, routes and sockets — so building a lab needs root. Tests call
//! [`require_root`] first: it fails the test when `CI` is set and the process is not root.
//!
//! This crate is test tooling, so its fallible setup functions return `anyhow::Result` (the house rule allows
//! `anyhow` in tests and tools); socket helpers return `std::io::Result`.

pub mod apps;
pub mod bench;
pub mod bench_iperf;
pub mod bench_l7;
pub mod bench_l7_rate;
pub mod bench_l7_setup;
pub mod bench_l7_tls;
pub mod bench_l7_variants;
pub mod check;
pub mod cni;
pub mod controller;
pub mod daemon;
pub mod dump;
pub mod fixture;
pub mod http;
pub mod http_server;
pub mod kube;
pub mod lab;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod objects;
pub mod otlp;
pub mod proc_stats;
pub mod restart;
pub mod sink;
pub mod sniff;
pub mod statefile;
pub mod waypoint;
pub mod waypoint_lab;
pub mod ztunnel;

pub use lab::{Host, HostId, Lab, Node, NodeId, Pod, PodId, PodSpec};
pub use mesh::Mesh;
pub use netns::NetNs;

/// Whether the current process may build a lab.
///
/// Returns `true` when running as root. Otherwise it panics when the `CI` environment variable is set (a test that
/// needs root must fail, not skip, in CI), and else prints a note and returns `false` so the caller can return early.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root (network namespaces) and CI is set");
    }
    eprintln!("note: {test} skipped: needs root (network namespaces); set CI to make this a failure");
    false
}
