//! Policy routing that delivers TPROXY-marked packets to local sockets, and
//! gives ztunnel's own sockets routes that ACK without delay.
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
    uninstall_rule(netns, family, &fwmark, &table)?;
    let routes = ip(netns, &[family.flag(), "route", "show", "table", &table, "type", "local"])?;
    if routes.lines().any(|l| l.starts_with("local default ")) {
        ip(netns, &[family.flag(), "route", "del", "local", family.default_route(), "dev", "lo", "table", &table])?;
    }
    Ok(())
}

/// Gives ztunnel's own connections (sockets carrying `mark`) routes with
/// `quickack 1`: a copy of the main table in `table`, looked up by an fwmark
/// rule. A proxy reads its tunnels in bursts, and while it has not read,
/// Linux delays the ACK; the peer's congestion control then takes that delay
/// for path RTT (BBR caps the data in flight at twice its bandwidth × the
/// minimum RTT, so the tunnel stalls). Best effort: a main table that cannot
/// be copied (multipath routes, an `ip` that refuses a line) leaves ztunnel
/// on the main table, with a warning. The copy is taken at install; routes
/// the pod gets later are not in it.
pub(super) fn install_quickack(netns: &Path, family: Family, mark: u32, table: u32) -> Result<(), ExecError> {
    let fwmark = format!("{mark:#x}/{mark:#x}");
    let table = table.to_string();
    flush(netns, family, &table)?;
    let main = ip(netns, &[family.flag(), "route", "show", "table", "main"])?;
    if let Err(why) = copy_with_quickack(netns, family, &main, &table) {
        tracing::warn!(netns = %netns.display(), %why, "ztunnel's routes keep delayed ACKs");
        return flush(netns, family, &table);
    }
    if !rule_present(netns, family, &fwmark, &table)? {
        ip(netns, &[family.flag(), "rule", "add", "fwmark", &fwmark, "lookup", &table])?;
    }
    Ok(())
}

/// Removes what [`install_quickack`] added; absent parts are not an error.
pub(super) fn uninstall_quickack(netns: &Path, family: Family, mark: u32, table: u32) -> Result<(), ExecError> {
    uninstall_rule(netns, family, &format!("{mark:#x}/{mark:#x}"), &table.to_string())?;
    flush(netns, family, &table.to_string())
}

/// Adds each route of `main` (the output of `ip route show`) to `table` with
/// `quickack 1`, routes to gateways before the default routes through them.
fn copy_with_quickack(netns: &Path, family: Family, main: &str, table: &str) -> Result<(), String> {
    if main.lines().any(|l| l.starts_with(char::is_whitespace)) {
        return Err("the main table has multipath routes".into());
    }
    let mut routes: Vec<Vec<&str>> = main.lines().filter(|l| !l.trim().is_empty()).map(route_spec).collect();
    routes.sort_by_key(|r| r.first() == Some(&"default"));
    for route in routes {
        let mut args = vec![family.flag(), "route", "replace"];
        args.extend(&route);
        args.extend(["table", table, "quickack", "1"]);
        ip(netns, &args).map_err(|e| format!("copying \"{}\": {e}", route.join(" ")))?;
    }
    Ok(())
}

/// A line of `ip route show` as arguments to `ip route replace`: without the
/// state flags `ip` prints but does not take, and without an expiry.
fn route_spec(line: &str) -> Vec<&str> {
    const FLAGS: [&str; 8] =
        ["linkdown", "dead", "onlink-dead", "offload", "trap", "rt_offload", "rt_trap", "pervasive"];
    let mut out = Vec::new();
    let mut tokens = line.split_whitespace();
    while let Some(t) = tokens.next() {
        match t {
            "expires" => {
                tokens.next();
            }
            t if FLAGS.contains(&t) => {}
            t => out.push(t),
        }
    }
    out
}

fn flush(netns: &Path, family: Family, table: &str) -> Result<(), ExecError> {
    match ip(netns, &[family.flag(), "route", "flush", "table", table]) {
        Err(e) if e.stderr().contains("FIB table does not exist") => Ok(()),
        other => other.map(drop),
    }
}

/// True when `err` says the namespace has no IPv6 (kernel without it, or
/// `disable_ipv6` set), which capture tolerates.
pub(super) fn is_ipv6_unavailable(err: &ExecError) -> bool {
    let stderr = err.stderr();
    stderr.contains("Address family not supported") || stderr.contains("IPv6 is disabled")
}

/// Deletes every copy of the fwmark rule.
fn uninstall_rule(netns: &Path, family: Family, fwmark: &str, table: &str) -> Result<(), ExecError> {
    // Bounded: each pass deletes one copy; a rule that will not go away after
    // this many deletions is left for the next uninstall rather than looping.
    for _ in 0..16 {
        if !rule_present(netns, family, fwmark, table)? {
            break;
        }
        ip(netns, &[family.flag(), "rule", "del", "fwmark", fwmark, "lookup", table])?;
    }
    Ok(())
}

fn rule_present(netns: &Path, family: Family, fwmark: &str, table: &str) -> Result<bool, ExecError> {
    let out = ip(netns, &[family.flag(), "rule", "list", "fwmark", fwmark, "lookup", table])?;
    Ok(out.lines().any(|l| !l.trim().is_empty()))
}

fn ip(netns: &Path, args: &[&str]) -> Result<String, ExecError> {
    run_in_netns(netns, "ip", args, None)
}

#[cfg(test)]
mod tests {
    use super::route_spec;

    #[test]
    fn route_lines_lose_the_flags_ip_prints_but_does_not_take() {
        assert_eq!(
            route_spec("default via 10.1.0.1 dev eth0 linkdown "),
            ["default", "via", "10.1.0.1", "dev", "eth0"]
        );
        assert_eq!(
            route_spec("2001:db8::/64 dev eth0 proto ra metric 100 expires 86391sec pref medium"),
            ["2001:db8::/64", "dev", "eth0", "proto", "ra", "metric", "100", "pref", "medium"]
        );
    }
}
