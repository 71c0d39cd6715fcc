//! Traffic capture inside a pod's network namespace.
//!
//! ztunnel listens inside each enrolled pod's namespace on 15001 (outbound),
//! 15006 (inbound plaintext, a transparent socket) and 15008 (HBONE). The
//! rules installed here send the pod's outbound TCP to 15001 (REDIRECT) and
//! inbound TCP to 15006 (TPROXY), leave HBONE and excluded ports alone, and
//! never capture ztunnel's own sockets, which carry `ztunnel_mark`.
//!
//! Everything is one nftables table (`inet ambit`, replaced atomically) plus,
//! per IP family, two policy-routing rules: TPROXY-marked packets to a local
//! route (table 133), and ztunnel's own sockets to a copy of the pod's routes
//! with `quickack 1` (table 134), so the tunnels' ACKs do not wait for
//! ztunnel to read.

mod exec;
mod nft;
mod node;
mod routing;
mod sysctl;

#[cfg(test)]
mod netns_tests;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

pub use exec::ExecError;
pub use nft::nft_ruleset;
pub use node::{install_node_probe_snat, node_probe_snat_ruleset, uninstall_node_probe_snat, NodeProbeSnat};
use routing::Family;
pub use sysctl::{set_sysctl, SysctlError};

/// Where capture sends traffic, and the marks it relies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
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
    /// A command inside the namespace failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
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
/// `/var/run/netns/X` or `/proc/PID/ns/net`). Re-installing replaces the
/// rules and does not duplicate the routing rule.
pub fn install(netns: &Path, cfg: &CaptureConfig) -> Result<(), CaptureError> {
    cfg.validate()?;
    // Routing first: once the nft table exists, packets depend on it.
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
    exec::run_in_netns(netns, "nft", &["-f", "-"], Some(&nft_ruleset(cfg)))?;
    tracing::info!(netns = %netns.display(), "capture installed");
    Ok(())
}

/// Removes capture from the namespace at `netns`; removing what is absent
/// is not an error, so this is safe to repeat.
pub fn uninstall(netns: &Path, cfg: &CaptureConfig) -> Result<(), CaptureError> {
    // The table goes first, so nothing is marked for a route that is gone.
    let script = format!("table {f} {t} {{}}\ndelete table {f} {t}\n", f = nft::TABLE_FAMILY, t = nft::TABLE_NAME);
    exec::run_in_netns(netns, "nft", &["-f", "-"], Some(&script))?;
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

/// Whether Ambit's nftables table exists in the namespace at `netns`.
pub fn is_installed(netns: &Path) -> Result<bool, CaptureError> {
    let tables = exec::run_in_netns(netns, "nft", &["list", "tables", nft::TABLE_FAMILY], None)?;
    let wanted = format!("table {} {}", nft::TABLE_FAMILY, nft::TABLE_NAME);
    Ok(tables.lines().any(|l| l.trim() == wanted))
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
