//! Traffic capture inside a pod's network namespace.
//!
//! ztunnel listens inside each enrolled pod's namespace on 15001 (outbound),
//! 15006 (inbound plaintext, a transparent socket) and 15008 (HBONE). The
//! rules installed here send the pod's outbound TCP to 15001 (REDIRECT) and
//! inbound TCP to 15006 (TPROXY), leave HBONE and excluded ports alone, and
//! never capture ztunnel's own sockets, which carry `ztunnel_mark`.
//!
//! Two modes ([`CaptureMode`]), one interface (install, is_installed,
//! uninstall):
//! - nftables: one table (`inet ambit`, replaced atomically);
//! - eBPF ([`ambit_ebpf`]): an `sk_lookup` program on the pod's namespace and
//!   the node's cgroup connect/sockops/getsockopt hooks, which act on the
//!   namespaces enrolled in their map; no netfilter.
//!
//! Both add, per IP family, two policy-routing rules: marked packets to a
//! local route (table 133; with nftables the TPROXY mark, with eBPF the mark
//! ztunnel's connections to the application carry, which the application's
//! accepted socket inherits through `net.ipv4.tcp_fwmark_accept`, and the
//! kernel's own replies, a RST from a closed port, through
//! `net.ipv4.fwmark_reflect`, so replies to the spoofed client reach
//! ztunnel), and ztunnel's own sockets
//! to a copy of the pod's routes with `quickack 1` (table 134), so the
//! tunnels' ACKs do not wait for ztunnel to read.

mod exec;
mod nft;
mod node;
mod routing;
mod sysctl;

#[cfg(test)]
mod netns_tests;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

pub use exec::ExecError;
pub use nft::nft_ruleset;
pub use node::{install_node_probe_snat, node_probe_snat_ruleset, uninstall_node_probe_snat, NodeProbeSnat};
use routing::Family;
pub use sysctl::{set_sysctl, SysctlError};

/// How a pod's traffic is steered to ztunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    /// nftables rules in the pod's namespace (REDIRECT and TPROXY).
    #[default]
    Nftables,
    /// eBPF programs (sk_lookup on the pod's namespace, cgroup hooks on the
    /// node), pinned under [`CaptureConfig::bpf_pin_root`].
    Ebpf,
}

/// Where capture sends traffic, and the marks it relies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// nftables or eBPF (default nftables).
    pub mode: CaptureMode,
    /// bpffs directory of the eBPF mode's pins (default
    /// [`ambit_ebpf::DEFAULT_PIN_ROOT`]); ztunnel must be given the same.
    pub bpf_pin_root: PathBuf,
    /// eBPF mode: splice the pod-local legs (application ↔ ztunnel) with the
    /// sockmap, so their bytes skip TCP/IP (default false: a blocking read
    /// on a socket in a sockmap can fail with EAGAIN, see `ambit_ebpf`).
    pub bpf_splice: bool,
    /// ztunnel's outbound listener, the REDIRECT target (default 15001).
    pub outbound_port: u16,
    /// ztunnel's transparent inbound plaintext listener, the TPROXY target
    /// (default 15006).
    pub inbound_plaintext_port: u16,
    /// ztunnel's HBONE listener; inbound traffic to it is left alone
    /// (default 15008).
    pub hbone_port: u16,
    /// The `SO_MARK` ztunnel sets on every socket it opens in a pod; such
    /// traffic is never captured (default 0x400).
    pub ztunnel_mark: u32,
    /// Marks inbound packets and connections for the local-delivery route;
    /// must share no bit with `ztunnel_mark` (default 0x200).
    pub tproxy_mark: u32,
    /// The routing table holding the local-delivery route (default 133).
    pub route_table: u32,
    /// The routing table ztunnel's own sockets use: the pod's routes with
    /// `quickack 1` (default 134; see `routing::install_quickack`).
    pub ztunnel_route_table: u32,
    /// App ports never captured inbound, e.g. for probes (default none).
    pub exclude_inbound_ports: Vec<u16>,
    /// Inbound packets from this address bypass ztunnel (default
    /// [`DEFAULT_PROBE_SOURCE`]): the node SNATs the kubelet's probes to it
    /// ([`install_node_probe_snat`]), so probes reach the app even under
    /// STRICT mTLS, as in Istio. `None` captures probes too.
    pub probe_source: Option<IpAddr>,
}

/// The link-local address Istio SNATs kubelet probes to, kept so that
/// Istio's and Ambit's nodes agree.
pub const DEFAULT_PROBE_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 7, 127));

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            mode: CaptureMode::Nftables,
            bpf_pin_root: PathBuf::from(ambit_ebpf::DEFAULT_PIN_ROOT),
            bpf_splice: false,
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            hbone_port: 15008,
            ztunnel_mark: 0x400,
            tproxy_mark: 0x200,
            route_table: 133,
            ztunnel_route_table: 134,
            exclude_inbound_ports: Vec::new(),
            probe_source: Some(DEFAULT_PROBE_SOURCE),
        }
    }
}

/// Errors of capture: a bad [`CaptureConfig`] or a failed command.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A mark is zero, so it could not be matched.
    #[error("{which} must not be zero")]
    ZeroMark {
        /// The config field.
        which: &'static str,
    },
    /// The marks share bits, so ztunnel's traffic would look TPROXY-marked.
    #[error("tproxy_mark {tproxy:#x} shares bits with ztunnel_mark {ztunnel:#x}")]
    OverlappingMarks {
        /// `ztunnel_mark`.
        ztunnel: u32,
        /// `tproxy_mark`.
        tproxy: u32,
    },
    /// A listener port is zero.
    #[error("{which} must not be zero")]
    ZeroPort {
        /// The config field.
        which: &'static str,
    },
    /// Two of ztunnel's listener ports are the same.
    #[error("{first} and {second} are both {port}; ztunnel's ports must differ")]
    DuplicatePort {
        /// The first config field.
        first: &'static str,
        /// The second config field.
        second: &'static str,
        /// The shared port.
        port: u16,
    },
    /// An excluded inbound port is zero.
    #[error("exclude_inbound_ports must not contain 0")]
    ZeroExcludedPort,
    /// A route table is unspecified (0) or one the kernel owns.
    #[error("route table {0} is reserved (0, 253 default, 254 main, 255 local)")]
    ReservedRouteTable(u32),
    /// The two route tables are the same.
    #[error("route_table and ztunnel_route_table are both {0}")]
    SameRouteTable(u32),
    /// More excluded inbound ports than the eBPF program holds.
    #[error("eBPF capture excludes at most {max} inbound ports; {count} given")]
    TooManyExcludedPorts {
        /// How many were given.
        count: usize,
        /// The most it holds.
        max: usize,
    },
    /// A command inside the namespace failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// A sysctl of the namespace could not be set.
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
    /// The eBPF programs could not be loaded, attached or removed.
    #[error(transparent)]
    Ebpf(#[from] ambit_ebpf::EbpfError),
}

impl CaptureConfig {
    /// Checks the marks are non-zero and disjoint, ztunnel's ports are
    /// non-zero and distinct, and the route table is not a kernel one.
    pub fn validate(&self) -> Result<(), CaptureError> {
        for (which, mark) in [("ztunnel_mark", self.ztunnel_mark), ("tproxy_mark", self.tproxy_mark)] {
            if mark == 0 {
                return Err(CaptureError::ZeroMark { which });
            }
        }
        if self.ztunnel_mark & self.tproxy_mark != 0 {
            return Err(CaptureError::OverlappingMarks { ztunnel: self.ztunnel_mark, tproxy: self.tproxy_mark });
        }
        let ports = [
            ("outbound_port", self.outbound_port),
            ("inbound_plaintext_port", self.inbound_plaintext_port),
            ("hbone_port", self.hbone_port),
        ];
        for (i, &(which, port)) in ports.iter().enumerate() {
            if port == 0 {
                return Err(CaptureError::ZeroPort { which });
            }
            if let Some(&(second, _)) = ports[i + 1..].iter().find(|(_, p)| *p == port) {
                return Err(CaptureError::DuplicatePort { first: which, second, port });
            }
        }
        if self.exclude_inbound_ports.contains(&0) {
            return Err(CaptureError::ZeroExcludedPort);
        }
        let (count, max) = (self.exclude_inbound_ports.len(), ambit_ebpf::layout::MAX_EXCLUDED_PORTS);
        if self.mode == CaptureMode::Ebpf && count > max {
            return Err(CaptureError::TooManyExcludedPorts { count, max });
        }
        for table in [self.route_table, self.ztunnel_route_table] {
            if matches!(table, 0 | 253..=255) {
                return Err(CaptureError::ReservedRouteTable(table));
            }
        }
        if self.route_table == self.ztunnel_route_table {
            return Err(CaptureError::SameRouteTable(self.route_table));
        }
        Ok(())
    }
}

/// Installs capture in the network namespace at `netns` (e.g.
/// `/var/run/netns/X` or `/proc/PID/ns/net`) in `cfg.mode`, removing the
/// other mode's if the pod had it. Re-installing replaces the rules and
/// duplicates nothing.
pub fn install(netns: &Path, cfg: &CaptureConfig) -> Result<(), CaptureError> {
    cfg.validate()?;
    // Routing first: once capture is in place, packets depend on it.
    for family in [Family::V4, Family::V6] {
        let routes = routing::install(netns, family, cfg.tproxy_mark, cfg.route_table)
            .and_then(|()| routing::install_quickack(netns, family, cfg.ztunnel_mark, cfg.ztunnel_route_table));
        match routes {
            Err(err) if family == Family::V6 && routing::is_ipv6_unavailable(&err) => {
                tracing::debug!(netns = %netns.display(), "no IPv6 in namespace; IPv6 routing skipped");
            }
            other => other?,
        }
    }
    match cfg.mode {
        CaptureMode::Nftables => {
            exec::run_in_netns(netns, "nft", &["-f", "-"], Some(&nft_ruleset(cfg)))?;
            remove_ebpf(netns, cfg)?;
        }
        CaptureMode::Ebpf => {
            for key in EBPF_SYSCTLS {
                set_sysctl(netns, key, "1")?;
            }
            ambit_ebpf::install_pod(&cfg.bpf_pin_root, netns, &ebpf_settings(cfg))?;
            delete_nft_table(netns)?;
        }
    }
    tracing::info!(netns = %netns.display(), mode = ?cfg.mode, "capture installed");
    Ok(())
}

/// Removes capture of either mode from the namespace at `netns`; removing
/// what is absent is not an error, so this is safe to repeat.
pub fn uninstall(netns: &Path, cfg: &CaptureConfig) -> Result<(), CaptureError> {
    // Capture goes first, so nothing is marked for a route that is gone.
    delete_nft_table(netns)?;
    remove_ebpf(netns, cfg)?;
    for family in [Family::V4, Family::V6] {
        let routes = routing::uninstall(netns, family, cfg.tproxy_mark, cfg.route_table)
            .and_then(|()| routing::uninstall_quickack(netns, family, cfg.ztunnel_mark, cfg.ztunnel_route_table));
        match routes {
            Err(err) if family == Family::V6 && routing::is_ipv6_unavailable(&err) => {}
            other => other?,
        }
    }
    tracing::info!(netns = %netns.display(), "capture uninstalled");
    Ok(())
}

/// Whether the namespace at `netns` is captured in `cfg.mode`.
pub fn is_installed(netns: &Path, cfg: &CaptureConfig) -> Result<bool, CaptureError> {
    if cfg.mode == CaptureMode::Ebpf {
        return Ok(ambit_ebpf::is_pod_installed(&cfg.bpf_pin_root, netns)?);
    }
    let tables = exec::run_in_netns(netns, "nft", &["list", "tables", nft::TABLE_FAMILY], None)?;
    let wanted = format!("table {} {}", nft::TABLE_FAMILY, nft::TABLE_NAME);
    Ok(tables.lines().any(|l| l.trim() == wanted))
}

/// The sysctls eBPF capture sets in the pod so that what answers ztunnel's
/// connections to the application (sent from the client's address, with the
/// return mark) routes back to ztunnel, not to the client: the application's
/// accepted sockets take the connection's mark, and so do the kernel's own
/// replies (a RST from a closed port, ICMP), so a connect() to a closed port
/// fails at once.
const EBPF_SYSCTLS: [&str; 2] = ["net/ipv4/tcp_fwmark_accept", "net/ipv4/fwmark_reflect"];

/// Removes the pod's eBPF capture, if it has one, and the sysctls that came
/// with it: left on, the application's sockets would take ztunnel's own mark
/// under nftables capture, and their replies its route out of the pod.
fn remove_ebpf(netns: &Path, cfg: &CaptureConfig) -> Result<(), CaptureError> {
    if cfg.bpf_pin_root.exists() && ambit_ebpf::uninstall_pod(&cfg.bpf_pin_root, netns)? {
        for key in EBPF_SYSCTLS {
            set_sysctl(netns, key, "0")?;
        }
    }
    Ok(())
}

/// Deletes Ambit's nftables table; an absent one is not an error.
fn delete_nft_table(netns: &Path) -> Result<(), ExecError> {
    let script = format!("table {f} {t} {{}}\ndelete table {f} {t}\n", f = nft::TABLE_FAMILY, t = nft::TABLE_NAME);
    exec::run_in_netns(netns, "nft", &["-f", "-"], Some(&script)).map(drop)
}

/// The eBPF programs' view of `cfg`: ztunnel's connections to the
/// application get the TPROXY mark, which routes the replies back (table 133).
fn ebpf_settings(cfg: &CaptureConfig) -> ambit_ebpf::PodSettings {
    ambit_ebpf::PodSettings {
        outbound_port: cfg.outbound_port,
        hbone_port: cfg.hbone_port,
        ztunnel_mark: cfg.ztunnel_mark,
        return_mark: cfg.tproxy_mark,
        probe_source: cfg.probe_source,
        excluded_ports: cfg.exclude_inbound_ports.clone(),
        splice: cfg.bpf_splice,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        CaptureConfig::default().validate().expect("default config");
    }

    #[test]
    fn validate_rejects_overlapping_marks() {
        let cfg = CaptureConfig { ztunnel_mark: 0x600, tproxy_mark: 0x200, ..Default::default() };
        let err = cfg.validate().expect_err("0x600 and 0x200 share a bit");
        assert!(matches!(err, CaptureError::OverlappingMarks { .. }), "{err}");
        assert_eq!(err.to_string(), "tproxy_mark 0x200 shares bits with ztunnel_mark 0x600");
    }

    #[test]
    fn validate_rejects_a_zero_mark() {
        let cfg = CaptureConfig { tproxy_mark: 0, ..Default::default() };
        assert!(matches!(cfg.validate(), Err(CaptureError::ZeroMark { which: "tproxy_mark" })));
    }

    #[test]
    fn validate_rejects_duplicate_and_zero_ports() {
        let dup = CaptureConfig { hbone_port: 15001, ..Default::default() };
        assert!(matches!(
            dup.validate(),
            Err(CaptureError::DuplicatePort { first: "outbound_port", second: "hbone_port", port: 15001 })
        ));
        let zero = CaptureConfig { inbound_plaintext_port: 0, ..Default::default() };
        assert!(matches!(zero.validate(), Err(CaptureError::ZeroPort { .. })));
        let excluded = CaptureConfig { exclude_inbound_ports: vec![8080, 0], ..Default::default() };
        assert!(matches!(excluded.validate(), Err(CaptureError::ZeroExcludedPort)));
    }

    #[test]
    fn validate_rejects_more_excluded_ports_than_the_ebpf_program_holds() {
        let ports: Vec<u16> = (1..=17).collect();
        let nft = CaptureConfig { exclude_inbound_ports: ports.clone(), ..Default::default() };
        nft.validate().expect("nftables takes any number");
        let ebpf = CaptureConfig { mode: CaptureMode::Ebpf, exclude_inbound_ports: ports, ..Default::default() };
        assert!(matches!(ebpf.validate(), Err(CaptureError::TooManyExcludedPorts { count: 17, max: 16 })));
    }

    #[test]
    fn validate_rejects_kernel_route_tables() {
        for table in [0, 253, 254, 255] {
            let cfg = CaptureConfig { route_table: table, ..Default::default() };
            assert!(matches!(cfg.validate(), Err(CaptureError::ReservedRouteTable(t)) if t == table));
            let cfg = CaptureConfig { ztunnel_route_table: table, ..Default::default() };
            assert!(matches!(cfg.validate(), Err(CaptureError::ReservedRouteTable(t)) if t == table));
        }
        let same = CaptureConfig { ztunnel_route_table: 133, ..Default::default() };
        assert!(matches!(same.validate(), Err(CaptureError::SameRouteTable(133))));
    }

    #[test]
    fn install_rejects_an_invalid_config_before_touching_the_namespace() {
        let cfg = CaptureConfig { ztunnel_mark: 0x200, ..Default::default() };
        // The namespace path does not exist: only validation can produce
        // OverlappingMarks, so nothing was run.
        let err = install(Path::new("/nonexistent-netns"), &cfg).expect_err("invalid");
        assert!(matches!(err, CaptureError::OverlappingMarks { .. }), "{err}");
    }
}
