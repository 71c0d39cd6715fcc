//! Policy routing that delivers TPROXY-marked packets to local sockets.
//!
//! `ip rule fwmark <mark>/<mark> lookup <table>` plus `local default dev lo`
//! in that table: a packet carrying the mark is routed to this host whatever
//! its destination, which is how an app's replies to a spoofed client address
//! reach ztunnel's transparent socket.

use std::path::Path;

use super::exec::{run_in_netns, ExecError};

/// One IP family's flavour of the `ip` commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn default_route(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// Adds the fwmark rule (once) and the local default route of `table`.
pub(super) fn install(netns: &Path, family: Family, mark: u32, table: u32) -> Result<(), ExecError> {
    let fwmark = format!("{mark:#x}/{mark:#x}");
    let table = table.to_string();
    // `ip rule add` happily adds duplicates, so add only when absent.
    if !rule_present(netns, family, &fwmark, &table)? {
        ip(netns, &[family.flag(), "rule", "add", "fwmark", &fwmark, "lookup", &table])?;
    }
    ip(netns, &[family.flag(), "route", "replace", "local", family.default_route(), "dev", "lo", "table", &table])?;
    Ok(())
}

/// Removes every copy of the fwmark rule and the local default route; absent
/// ones are not an error.
pub(super) fn uninstall(netns: &Path, family: Family, mark: u32, table: u32) -> Result<(), ExecError> {
    let fwmark = format!("{mark:#x}/{mark:#x}");
    let table = table.to_string();
    // Bounded: each pass deletes one copy; a rule that will not go away after
    // this many deletions is left for the next uninstall rather than looping.
    for _ in 0..16 {
        if !rule_present(netns, family, &fwmark, &table)? {
            break;
        }
        ip(netns, &[family.flag(), "rule", "del", "fwmark", &fwmark, "lookup", &table])?;
    }
    let routes = ip(netns, &[family.flag(), "route", "show", "table", &table, "type", "local"])?;
    if routes.lines().any(|l| l.starts_with("local default ")) {
        ip(netns, &[family.flag(), "route", "del", "local", family.default_route(), "dev", "lo", "table", &table])?;
    }
    Ok(())
}

/// True when `err` says the namespace has no IPv6 (kernel without it, or
/// `disable_ipv6` set), which capture tolerates.
pub(super) fn is_ipv6_unavailable(err: &ExecError) -> bool {
    let stderr = err.stderr();
    stderr.contains("Address family not supported") || stderr.contains("IPv6 is disabled")
}

fn rule_present(netns: &Path, family: Family, fwmark: &str, table: &str) -> Result<bool, ExecError> {
    let out = ip(netns, &[family.flag(), "rule", "list", "fwmark", fwmark, "lookup", table])?;
    Ok(out.lines().any(|l| !l.trim().is_empty()))
}

fn ip(netns: &Path, args: &[&str]) -> Result<String, ExecError> {
    run_in_netns(netns, "ip", args, None)
}
