//! The nftables ruleset that captures a pod's TCP for ztunnel.
//!
//! It mirrors Istio's in-pod iptables rules (mangle PREROUTING/OUTPUT, nat
//! OUTPUT) as one `inet` table, so IPv4 and IPv6 share every rule that does not
//! name an address.

use std::fmt::Write;
use std::net::IpAddr;

use super::CaptureConfig;

/// Family of the table; `inet` covers IPv4 and IPv6.
pub(super) const TABLE_FAMILY: &str = "inet";
/// Name of the one table Ambit owns in a pod's network namespace.
pub(super) const TABLE_NAME: &str = "ambit";

/// A script for `nft -f -` that atomically replaces Ambit's table.
///
/// The script first declares the table empty and deletes it, which succeeds
/// whether or not it existed (nft 1.0.6 has no `destroy`), then declares it
/// in full; nft applies the whole file as one transaction, so a re-install
/// never leaves the pod uncaptured, not even for a moment.
pub fn nft_ruleset(cfg: &CaptureConfig) -> String {
    let zt = cfg.ztunnel_mark;
    let tp = cfg.tproxy_mark;
    let mut s = String::with_capacity(2048);
    // Writing to a String cannot fail; `let _` keeps the builder readable.
    let _ = writeln!(s, "table {TABLE_FAMILY} {TABLE_NAME} {{}}");
    let _ = writeln!(s, "delete table {TABLE_FAMILY} {TABLE_NAME}");
    let _ = writeln!(s, "table {TABLE_FAMILY} {TABLE_NAME} {{");

    let _ = writeln!(s, "\tchain prerouting {{");
    let _ = writeln!(s, "\t\ttype filter hook prerouting priority mangle; policy accept;");
    // ztunnel's own connection to the app, looped back through lo: remember it
    // in conntrack so the app's replies to the spoofed client go to ztunnel.
    let _ = writeln!(s, "\t\tmeta mark & {zt:#x} == {zt:#x} ct mark set ct mark | {tp:#x} accept");
    let _ = writeln!(s, "\t\tiifname \"lo\" accept");
    let _ = writeln!(s, "\t\tct state established,related accept");
    let _ = writeln!(s, "\t\ttcp dport {} accept", cfg.hbone_port);
    // Kubelet probes, SNATed by the node to the probe source, reach the app
    // directly: ztunnel would refuse them under STRICT mTLS.
    match cfg.probe_source {
        Some(IpAddr::V4(a)) => {
            let _ = writeln!(s, "\t\tip saddr {a} accept");
        }
        Some(IpAddr::V6(a)) => {
            let _ = writeln!(s, "\t\tip6 saddr {a} accept");
        }
        None => {}
    }
    let excluded = excluded_ports(cfg);
    if !excluded.is_empty() {
        let _ = writeln!(s, "\t\ttcp dport {{ {excluded} }} accept");
    }
    let inbound = cfg.inbound_plaintext_port;
    let _ = writeln!(
        s,
        "\t\tip daddr != 127.0.0.0/8 meta l4proto tcp tproxy ip to :{inbound} meta mark set meta mark | {tp:#x} accept"
    );
    let _ = writeln!(
        s,
        "\t\tip6 daddr != ::1 meta l4proto tcp tproxy ip6 to :{inbound} meta mark set meta mark | {tp:#x} accept"
    );
    // nft's tproxy falls through when no socket listens (iptables' TPROXY
    // drops): drop too, so inbound TCP never reaches the app around ztunnel.
    let _ = writeln!(s, "\t\tmeta l4proto tcp drop");
    let _ = writeln!(s, "\t}}");

    let _ = writeln!(s, "\tchain output_route {{");
    let _ = writeln!(s, "\t\ttype route hook output priority mangle; policy accept;");
    // A mark change in a route chain triggers a new routing decision: the
    // fwmark rule then delivers the app's replies locally, to ztunnel.
    let _ = writeln!(s, "\t\tct mark & {tp:#x} == {tp:#x} meta mark set meta mark | {tp:#x}");
    let _ = writeln!(s, "\t}}");

    let _ = writeln!(s, "\tchain output_nat {{");
    let _ = writeln!(s, "\t\ttype nat hook output priority -100; policy accept;");
    let _ = writeln!(s, "\t\tmeta mark & {zt:#x} == {zt:#x} accept");
    let _ = writeln!(s, "\t\toifname \"lo\" accept");
    let _ = writeln!(s, "\t\tip daddr 127.0.0.0/8 accept");
    let _ = writeln!(s, "\t\tip6 daddr ::1 accept");
    let _ = writeln!(s, "\t\tct mark & {tp:#x} == {tp:#x} accept");
    let _ = writeln!(s, "\t\tmeta l4proto tcp redirect to :{}", cfg.outbound_port);
    let _ = writeln!(s, "\t}}");

    let _ = writeln!(s, "}}");
    s
}

/// The excluded inbound ports as an nft set body (`"80, 9090"`), sorted and
/// without duplicates, because nft rejects a set literal with duplicates.
fn excluded_ports(cfg: &CaptureConfig) -> String {
    let mut ports = cfg.exclude_inbound_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(cfg: &CaptureConfig) -> Vec<String> {
        nft_ruleset(cfg).lines().map(|l| l.trim().to_string()).collect()
    }

    fn has(rules: &[String], rule: &str) -> bool {
        rules.iter().any(|r| r == rule)
    }

    #[test]
    fn default_ruleset_redirects_outbound_to_15001_and_tproxies_inbound_to_15006() {
        let r = rules(&CaptureConfig::default());
        assert!(has(&r, "meta l4proto tcp redirect to :15001"), "{r:#?}");
        assert!(
            has(
                &r,
                "ip daddr != 127.0.0.0/8 meta l4proto tcp tproxy ip to :15006 meta mark set meta mark | 0x200 accept"
            ),
            "{r:#?}"
        );
        assert!(
            has(&r, "ip6 daddr != ::1 meta l4proto tcp tproxy ip6 to :15006 meta mark set meta mark | 0x200 accept"),
            "{r:#?}"
        );
        assert!(has(&r, "tcp dport 15008 accept"), "{r:#?}");
    }

    #[test]
    fn ztunnel_marked_packets_are_neither_redirected_nor_tproxied() {
        let r = rules(&CaptureConfig::default());
        assert!(has(&r, "meta mark & 0x400 == 0x400 ct mark set ct mark | 0x200 accept"), "{r:#?}");
        assert!(has(&r, "meta mark & 0x400 == 0x400 accept"), "{r:#?}");
        assert!(has(&r, "ct mark & 0x200 == 0x200 meta mark set meta mark | 0x200"), "{r:#?}");
    }

    #[test]
    fn rules_run_in_the_order_the_capture_design_requires() {
        let r = rules(&CaptureConfig::default());
        let pos = |rule: &str| {
            r.iter().position(|x| x.starts_with(rule)).unwrap_or_else(|| panic!("missing {rule:?} in {r:#?}"))
        };
        assert!(pos("meta mark & 0x400") < pos("iifname \"lo\" accept"));
        assert!(pos("iifname \"lo\" accept") < pos("ct state established,related accept"));
        assert!(pos("ct state established") < pos("tcp dport 15008 accept"));
        assert!(pos("tcp dport 15008 accept") < pos("ip daddr != 127.0.0.0/8"));
        assert!(pos("ip6 daddr != ::1") < pos("meta l4proto tcp drop"));
        assert!(pos("ct mark & 0x200 == 0x200 accept") < pos("meta l4proto tcp redirect"));
    }

    #[test]
    fn custom_ports_and_marks_appear_in_the_rules() {
        let cfg = CaptureConfig {
            outbound_port: 25001,
            inbound_plaintext_port: 25006,
            hbone_port: 25008,
            ztunnel_mark: 0x539,
            tproxy_mark: 0x10000,
            route_table: 200,
            ztunnel_route_table: 201,
            exclude_inbound_ports: vec![9090, 80, 9090],
            probe_source: Some("fd16:9254:7127:1337:ffff:ffff:ffff:ffff".parse().unwrap()),
            ..CaptureConfig::default()
        };
        let r = rules(&cfg);
        assert!(has(&r, "meta l4proto tcp redirect to :25001"), "{r:#?}");
        assert!(r.iter().any(|x| x.contains("tproxy ip to :25006")), "{r:#?}");
        assert!(has(&r, "tcp dport 25008 accept"), "{r:#?}");
        assert!(has(&r, "meta mark & 0x539 == 0x539 accept"), "{r:#?}");
        assert!(has(&r, "tcp dport { 80, 9090 } accept"), "{r:#?}");
        assert!(has(&r, "ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff accept"), "{r:#?}");
        assert!(!r.iter().any(|x| x.contains("15001") || x.contains("0x400")));
    }

    #[test]
    fn probes_from_the_probe_source_bypass_ztunnel_before_tproxy() {
        let r = rules(&CaptureConfig::default());
        let pos = |rule: &str| r.iter().position(|x| x.starts_with(rule)).unwrap_or_else(|| panic!("{rule} {r:#?}"));
        assert!(pos("ip saddr 169.254.7.127 accept") < pos("ip daddr != 127.0.0.0/8"));
        let none = rules(&CaptureConfig { probe_source: None, ..Default::default() });
        assert!(!none.iter().any(|x| x.contains("saddr")), "{none:#?}");
    }

    #[test]
    fn no_exclusion_rule_without_excluded_ports() {
        let text = nft_ruleset(&CaptureConfig::default());
        assert!(!text.contains("dport {"), "{text}");
    }

    #[test]
    fn script_replaces_the_table_in_one_transaction() {
        let text = nft_ruleset(&CaptureConfig::default());
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("table inet ambit {}"));
        assert_eq!(lines.next(), Some("delete table inet ambit"));
        assert_eq!(lines.next(), Some("table inet ambit {"));
        assert_eq!(text.matches("table inet ambit {").count(), 2);
    }
}
