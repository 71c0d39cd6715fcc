//! Finds a running pod's network namespace from its IP, for pods that ran
//! before their namespace was labelled (the CNI plugin never saw them).
//!
//! Every process's namespace is `/proc/<pid>/ns/net`; a pod's holds at
//! least its pause process. Namespaces are deduplicated by inode, the host's
//! own is skipped, and each one's local addresses are read from
//! `/proc/<pid>/net/fib_trie` (IPv4) and `/proc/<pid>/net/if_inet6` (IPv6):
//! those files show the namespace of the process named in the path, so no
//! thread has to enter it and no `ip` process is spawned per namespace.
//!
//! A found namespace is returned with an open handle: while it is held the
//! namespace cannot be freed, and its inode is checked again through the
//! handle, so a pid that died and was reused is never mistaken for the pod.

use std::collections::HashSet;
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A pod's network namespace, held open.
#[derive(Debug)]
pub struct PodNetns {
    /// `/proc/<pid>/ns/net` of a process inside it.
    pub path: PathBuf,
    /// The namespace's inode (what `ip netns identify` compares).
    pub inode: u64,
    /// Keeps the namespace alive while the pod is enrolled.
    pub handle: File,
}

/// Why a namespace could not be found.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `/proc` could not be listed.
    #[error("cannot scan {path}: {source}")]
    Scan {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No process on the host lives in a namespace holding the IP.
    #[error("no network namespace on this host holds {0}")]
    NotFound(IpAddr),
}

/// Finds the namespace holding any of `ips` under `proc` (`/proc`), other
/// than the namespace of `proc/self` (the host's: the agent is hostNetwork).
pub fn find_by_ips(proc: &Path, ips: &[IpAddr]) -> Result<PodNetns, NetnsError> {
    let first = *ips.first().ok_or(NetnsError::NotFound(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))?;
    let host = fs::metadata(proc.join("self/ns/net")).map(|m| m.ino()).ok();
    let mut seen: HashSet<u64> = host.into_iter().collect();
    let dir = fs::read_dir(proc).map_err(|source| NetnsError::Scan { path: proc.to_owned(), source })?;
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let pid_dir = entry.path();
        let ns_path = pid_dir.join("ns/net");
        // Processes come and go during the scan: any failure means "not this one".
        let Ok(inode) = fs::metadata(&ns_path).map(|m| m.ino()) else { continue };
        if !seen.insert(inode) {
            continue;
        }
        if !local_addresses(&pid_dir).iter().any(|a| ips.contains(a)) {
            continue;
        }
        let Ok(handle) = File::open(&ns_path) else { continue };
        // The pid may have died and been reused between stat and open.
        if handle.metadata().map(|m| m.ino()).ok() != Some(inode) {
            continue;
        }
        return Ok(PodNetns { path: ns_path, inode, handle });
    }
    Err(NetnsError::NotFound(first))
}

/// The local addresses of the namespace of the process at `pid_dir`.
fn local_addresses(pid_dir: &Path) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = fs::read_to_string(pid_dir.join("net/fib_trie"))
        .map(|t| parse_fib_trie_local(&t))
        .unwrap_or_default()
        .into_iter()
        .map(IpAddr::V4)
        .collect();
    if let Ok(text) = fs::read_to_string(pid_dir.join("net/if_inet6")) {
        out.extend(parse_if_inet6(&text).into_iter().map(IpAddr::V6));
    }
    out
}

/// The addresses of `/32 host LOCAL` leaves in `/proc/net/fib_trie`: a leaf
/// line `|-- 10.1.0.2` is followed by its routes, one of which is
/// `/32 host LOCAL` when the address is assigned to an interface.
fn parse_fib_trie_local(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut leaf = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("|-- ") {
            leaf = addr.parse::<Ipv4Addr>().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(a) = leaf.filter(|a| !out.contains(a)) {
                out.push(a);
            }
        }
    }
    out
}

/// The addresses in `/proc/net/if_inet6` (first column, 32 hex digits).
fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|hex| u128::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 32))
        .map(Ipv6Addr::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB_TRIE: &str = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 10.200.0.0/24 2 0 2\n        |-- 10.200.0.0\n           /24 link UNICAST\n        |-- 10.200.0.1\n           /32 host LOCAL\n        |-- 10.200.0.255\n           /32 link BROADCAST\n     |-- 127.0.0.1\n        /32 host LOCAL\nLocal:\n  +-- 0.0.0.0/0 3 0 5\n        |-- 10.200.0.1\n           /32 host LOCAL\n";

    #[test]
    fn fib_trie_local_addresses_are_read_once_each() {
        let got = parse_fib_trie_local(FIB_TRIE);
        assert_eq!(got, [Ipv4Addr::new(10, 200, 0, 1), Ipv4Addr::LOCALHOST]);
    }

    #[test]
    fn if_inet6_addresses_are_read() {
        let text = "fd000000000000000000000000000002 02 40 00 80     eth0\n00000000000000000000000000000001 01 80 10 80       lo\n";
        assert_eq!(parse_if_inet6(text), ["fd00::2".parse::<Ipv6Addr>().unwrap(), Ipv6Addr::LOCALHOST]);
    }

    /// A namespace made by the test with a process in it (the "pause"), as
    /// a pod has; found by its IP, and not found once the process is gone.
    #[test]
    fn a_namespace_with_a_process_is_found_by_ip() {
        if !nix::unistd::geteuid().is_root() {
            if std::env::var_os("CI").is_some() {
                panic!("needs root (network namespaces) and CI is set");
            }
            eprintln!("note: skipped: needs root");
            return;
        }
        let name = format!("ambit-agent-netns-{}", std::process::id());
        let run = |args: &[&str]| {
            let out = std::process::Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&["netns", "add", &name]);
        struct Cleanup(String, Option<std::process::Child>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                if let Some(c) = &mut self.1 {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }
        let mut guard = Cleanup(name.clone(), None);
        // A veth pair inside the namespace: an eth0 that is up, as a pod's.
        run(&["-n", &name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"]);
        run(&["-n", &name, "addr", "add", "10.213.0.7/24", "dev", "eth0"]);
        run(&["-n", &name, "link", "set", "peer0", "up"]);
        run(&["-n", &name, "link", "set", "eth0", "up"]);
        let ip: IpAddr = "10.213.0.7".parse().unwrap();
        // Without a process the namespace is invisible to a /proc scan.
        assert!(matches!(find_by_ips(Path::new("/proc"), &[ip]), Err(NetnsError::NotFound(_))));

        let child = std::process::Command::new("ip").args(["netns", "exec", &name, "sleep", "30"]).spawn().unwrap();
        let pid = child.id();
        guard.1 = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let found = loop {
            match find_by_ips(Path::new("/proc"), &["10.99.99.99".parse().unwrap(), ip]) {
                Ok(f) => break f,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)), // not exec'd yet
            }
        };
        assert_eq!(found.path, PathBuf::from(format!("/proc/{pid}/ns/net")));
        let named = fs::metadata(format!("/var/run/netns/{name}")).unwrap().ino();
        assert_eq!(found.inode, named);
        assert_eq!(found.handle.metadata().unwrap().ino(), named);
        drop(guard);
    }
}
