//! A pod's capture: its namespace in the enrolled map (outbound) and the
//! inbound `sk_lookup` program attached to its namespace.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::SkLookup;

use crate::layout::{ip4, ip6, InboundConfig, NetnsConfig, MAX_EXCLUDED_PORTS, SPLICE};
use crate::link::netns_link_attached;
use crate::netns::inspect_netns;
use crate::node::{install_node, load, SK_LOOKUP_OBJECT};
use crate::pins::{CONFIG_PIN, LISTENERS_PIN, SK_LOOKUP_PIN};
use crate::{pins, EbpfError};

const ENROLLED_MAP: &str = "ambit_enrolled";
const INBOUND_CONFIG_MAP: &str = "ambit_inbound_config";
/// The pod's listener map (slot 0: ztunnel's plaintext listener).
pub(crate) const LISTENERS_MAP: &str = "ambit_listeners";

/// How a pod is captured; the ports and marks are ztunnel's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSettings {
    /// ztunnel's outbound listener (15001).
    pub outbound_port: u16,
    /// ztunnel's HBONE listener (15008), left to the kernel's lookup.
    pub hbone_port: u16,
    /// The mark on ztunnel's sockets: never redirected.
    pub ztunnel_mark: u32,
    /// The mark ztunnel's spoofed-source sockets get, for the replies' route.
    pub return_mark: u32,
    /// Inbound connections from here reach the application (kubelet probes).
    pub probe_source: Option<IpAddr>,
    /// Inbound ports left to the application, at most 16.
    pub excluded_ports: Vec<u16>,
    /// Splice the pod-local legs (application ↔ ztunnel) with the sockmap
    /// (blocking reads of the application may then see `EAGAIN`, see the
    /// crate's documentation).
    pub splice: bool,
}

/// Captures the pod whose network namespace is at `netns`: the node's hooks
/// (if not yet attached), the namespace in the enrolled map, and its inbound
/// program. Re-installing updates the settings and attaches nothing twice.
pub fn install_pod(root: &Path, netns: &Path, settings: &PodSettings) -> Result<(), EbpfError> {
    assert!(settings.excluded_ports.len() <= MAX_EXCLUDED_PORTS, "bug: too many excluded ports");
    install_node(root)?;
    prune_vanished_pods(root)?;
    let ns = inspect_netns(netns)?;
    let dir = pins::pod_dir(root, ns.cookie);
    std::fs::create_dir_all(&dir).map_err(|source| EbpfError::Io {
        what: "cannot create",
        path: dir.clone(),
        source,
    })?;

    let config_pin = dir.join(CONFIG_PIN);
    let link_pin = dir.join(SK_LOOKUP_PIN);
    if PinnedLink::from_pin(&link_pin).is_ok() {
        let mut config: Array<MapData, InboundConfig> = open_pinned(&config_pin, INBOUND_CONFIG_MAP)?;
        config.set(0, inbound_config(settings), 0).map_err(map_err(INBOUND_CONFIG_MAP))?;
    } else {
        let mut ebpf = load(root, "sk_lookup", SK_LOOKUP_OBJECT)?;
        {
            let map = ebpf.map_mut(INBOUND_CONFIG_MAP).expect("bug: no inbound config map");
            let mut config: Array<&mut MapData, InboundConfig> =
                Array::try_from(map).map_err(map_err(INBOUND_CONFIG_MAP))?;
            config.set(0, inbound_config(settings), 0).map_err(map_err(INBOUND_CONFIG_MAP))?;
        }
        for (name, pin) in [(INBOUND_CONFIG_MAP, &config_pin), (LISTENERS_MAP, &dir.join(LISTENERS_PIN))] {
            let map = ebpf.map(name).unwrap_or_else(|| panic!("bug: no {name} map"));
            let _ = std::fs::remove_file(pin);
            map.pin(pin).map_err(|source| EbpfError::Pin { path: pin.clone(), source })?;
        }
        let err = |source| EbpfError::Program { hook: "sk_lookup", source };
        let program: &mut SkLookup =
            ebpf.program_mut("ambit_sk_lookup").expect("bug: no ambit_sk_lookup").try_into().map_err(err)?;
        program.load().map_err(err)?;
        let ns_file = File::open(netns).map_err(|source| EbpfError::Io {
            what: "cannot open network namespace",
            path: netns.to_path_buf(),
            source,
        })?;
        let id = program.attach(&ns_file).map_err(err)?;
        let link = FdLink::from(program.take_link(id).map_err(err)?);
        link.pin(&link_pin).map_err(|source| EbpfError::Pin { path: link_pin.clone(), source })?;
    }

    let value = NetnsConfig {
        ztunnel_mark: settings.ztunnel_mark,
        return_mark: settings.return_mark,
        pod_ip4: ns.ipv4.map(ip4).unwrap_or(0),
        pod_ip6: ns.ipv6.map(ip6).unwrap_or_default(),
        outbound_port: settings.outbound_port,
        flags: if settings.splice { SPLICE } else { 0 },
    };
    let mut enrolled = enrolled_map(root)?;
    enrolled.insert(ns.cookie, value, 0).map_err(map_err(ENROLLED_MAP))?;
    tracing::info!(netns = %netns.display(), cookie = ns.cookie, ipv4 = ?ns.ipv4, "eBPF capture installed");
    Ok(())
}

/// Releases the pod at `netns`: out of the enrolled map, its inbound program
/// detached, its pins removed. What is absent is not an error; returns
/// whether anything was there.
pub fn uninstall_pod(root: &Path, netns: &Path) -> Result<bool, EbpfError> {
    let ns = inspect_netns(netns)?;
    let enrolled = unenroll(root, ns.cookie)?;
    let dir = pins::pod_dir(root, ns.cookie);
    let pinned = dir.exists();
    pins::remove_pod_dir(&dir)?;
    if enrolled || pinned {
        tracing::info!(netns = %netns.display(), cookie = ns.cookie, "eBPF capture uninstalled");
    }
    Ok(enrolled || pinned)
}

/// Releases what is left of pods whose network namespace is gone (deleted
/// before their capture was removed): the kernel detached their inbound
/// program, but its pins and enrolled-map entry stay until removed here.
/// Runs with each pod's install; returns how many were released.
pub fn prune_vanished_pods(root: &Path) -> Result<usize, EbpfError> {
    let Ok(pods) = std::fs::read_dir(pins::pods_dir(root)) else { return Ok(0) };
    let mut pruned = 0;
    for dir in pods.flatten().map(|d| d.path()) {
        let Some(cookie) = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        let link = dir.join(SK_LOOKUP_PIN);
        match netns_link_attached(&link) {
            Ok(true) => continue,
            Ok(false) => {}
            // Half made (no link pinned yet): installing that pod again completes it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(EbpfError::Io { what: "cannot read link", path: link, source }),
        }
        unenroll(root, cookie)?;
        pins::remove_pod_dir(&dir)?;
        tracing::info!(cookie, "eBPF capture of a vanished network namespace released");
        pruned += 1;
    }
    Ok(pruned)
}

/// Whether the pod at `netns` is enrolled and its inbound program attached.
pub fn is_pod_installed(root: &Path, netns: &Path) -> Result<bool, EbpfError> {
    let ns = inspect_netns(netns)?;
    let linked = PinnedLink::from_pin(pins::pod_dir(root, ns.cookie).join(SK_LOOKUP_PIN)).is_ok();
    let enrolled = match enrolled_map(root) {
        Ok(map) => map.get(&ns.cookie, 0).is_ok(),
        Err(_) => false,
    };
    Ok(linked && enrolled)
}

fn inbound_config(s: &PodSettings) -> InboundConfig {
    let mut excluded_ports = [0; MAX_EXCLUDED_PORTS];
    excluded_ports[..s.excluded_ports.len()].copy_from_slice(&s.excluded_ports);
    let (probe_source4, probe_source6) = match s.probe_source {
        Some(IpAddr::V4(a)) => (ip4(a), [0; 4]),
        Some(IpAddr::V6(a)) => (0, ip6(a)),
        None => (0, [0; 4]),
    };
    InboundConfig {
        probe_source4,
        probe_source6,
        hbone_port: s.hbone_port,
        excluded_count: s.excluded_ports.len() as u16,
        excluded_ports,
    }
}

/// Takes `cookie` out of the enrolled map; returns whether it was there.
fn unenroll(root: &Path, cookie: u64) -> Result<bool, EbpfError> {
    let Ok(mut map) = enrolled_map(root) else { return Ok(false) };
    match map.remove(&cookie) {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(map_err(ENROLLED_MAP)(e)),
    }
}

fn enrolled_map(root: &Path) -> Result<HashMap<MapData, u64, NetnsConfig>, EbpfError> {
    open_pinned(&pins::maps_dir(root).join(ENROLLED_MAP), ENROLLED_MAP)
}

/// Opens a pinned map as `T`.
pub(crate) fn open_pinned<T: TryFrom<Map, Error = aya::maps::MapError>>(
    path: &Path,
    name: &'static str,
) -> Result<T, EbpfError> {
    let data = MapData::from_pin(path).map_err(map_err(name))?;
    T::try_from(Map::from_map_data(data).map_err(map_err(name))?).map_err(map_err(name))
}

pub(crate) fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}
