//! eBPF capture: an enrolled pod's TCP reaches ztunnel without netfilter.
//!
//! - Inbound, per pod: an `sk_lookup` program attached to the pod's network
//!   namespace steers new connections onto ztunnel's in-pod plaintext
//!   listener, which ztunnel puts in the pod's listener map
//!   ([`register_inbound_listener`]).
//! - Outbound, once per node: `cgroup/connect4` and `connect6` programs on the
//!   cgroup v2 root redirect an enrolled namespace's TCP connections to
//!   ztunnel's outbound listener; a `sockops` program files each one's
//!   original destination under the application's address, and a
//!   `cgroup/getsockopt` program answers `SO_ORIGINAL_DST` with it, so
//!   ztunnel reads it as with nftables. The programs act only on network
//!   namespaces listed in the enrolled map, by cookie: a node's cgroups
//!   (v1 with every process in the v2 root, or v2) do not matter.
//! - Same-node acceleration, per pod ([`PodSettings::splice`]): `sockops`
//!   files both ends of each pod-local leg (the application and ztunnel in
//!   one pod) in a sockhash, and an `sk_msg` program attached to it hands
//!   each send straight to the peer's receive queue, skipping TCP/IP, while
//!   that keeps the bytes in order and the peer has less than 4 MiB unread
//!   (else through TCP, whose flow control then holds the writer back; see
//!   `bpf/splice.bpf.c`). A socket in a sockmap reads through the kernel's
//!   tcp_bpf, which can wake a blocking read with `EAGAIN` and nothing read:
//!   an application that does not retry fails, so the splice is opt-in.
//!
//! Everything is pinned under one bpffs directory ([`DEFAULT_PIN_ROOT`]), so
//! a restarted agent re-adopts what is attached instead of duplicating it,
//! and removing the pins detaches it. The programs are C (`bpf/`), compiled
//! with clang when this crate builds; their shared structs are in
//! `bpf/capture.h` and [`layout`].

pub mod layout;
mod link;
mod listener;
mod netns;
mod node;
mod pins;
mod pod;

#[cfg(test)]
mod kernel_tests;

use std::path::PathBuf;

pub use listener::register_inbound_listener;
pub use node::{install_node, is_node_installed, uninstall_node};
pub use pod::{install_pod, is_pod_installed, prune_vanished_pods, uninstall_pod, PodSettings};

/// Where Ambit pins its programs' links and maps.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/ambit";

/// A failure to set up, find or remove eBPF capture.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The object could not be parsed or its maps created.
    #[error("cannot load the {object} eBPF object: {source}")]
    Load {
        /// The object (one per attach point).
        object: &'static str,
        /// aya's error.
        source: aya::EbpfError,
    },
    /// The kernel refused the program (the verifier's log is included) or
    /// could not attach it to its hook.
    #[error("eBPF program for hook {hook}: {source}")]
    Program {
        /// The attach point, e.g. `cgroup/connect4`.
        hook: &'static str,
        /// aya's error, with the verifier's log when it rejected the program.
        source: aya::programs::ProgramError,
    },
    /// A map could not be opened or updated.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// aya's error.
        source: aya::maps::MapError,
    },
    /// A pin could not be created or opened.
    #[error("cannot pin {path}: {source}")]
    Pin {
        /// The bpffs path.
        path: PathBuf,
        /// aya's error.
        source: aya::pin::PinError,
    },
    /// A file-system or socket operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel refused to attach a node hook (a kernel without it: the
    /// `sk_msg` link on a sockmap needs Linux 6.10).
    #[error("cannot attach eBPF hook {hook} (link pinned at {}): {source}", pin.display())]
    Attach {
        /// The attach point.
        hook: &'static str,
        /// Where its link was to be pinned.
        pin: PathBuf,
        /// The kernel's error.
        source: std::io::Error,
    },
    /// No cgroup v2 hierarchy to attach the outbound hooks to.
    #[error(
        "no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo); eBPF capture attaches its \
         connect, sockops and getsockopt hooks to its root"
    )]
    NoCgroup2,
}
