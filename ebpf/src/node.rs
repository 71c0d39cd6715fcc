//! The node's hooks: connect4, connect6, sockops and getsockopt on the cgroup
//! v2 root, and the splice (`sk_msg`) program on the splice sockmap, each
//! from its own object, sharing the maps pinned by name under `<root>/maps`.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::MapData;
use aya::programs::links::PinnedLink;
use aya::programs::{CgroupSockAddr, CgroupSockopt, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};

use crate::link::{attach_and_pin, AttachType};
use crate::{pins, EbpfError};

/// One attach point: its pin name, object and program, and what it attaches to.
struct Hook {
    name: &'static str,
    hook: &'static str,
    attach: AttachType,
    target: Target,
    object: &'static [u8],
    program: &'static str,
}

enum Target {
    /// The cgroup v2 root.
    Cgroup,
    /// A sockmap pinned by name under `<root>/maps`.
    Map(&'static str),
}

macro_rules! object {
    ($name:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".bpf.o"))
    };
}

const HOOKS: [Hook; 5] = [
    Hook {
        name: "connect4",
        target: Target::Cgroup,
        attach: AttachType::Connect4,
        hook: "cgroup/connect4",
        object: object!("connect4"),
        program: "ambit_connect4",
    },
    Hook {
        name: "connect6",
        target: Target::Cgroup,
        attach: AttachType::Connect6,
        hook: "cgroup/connect6",
        object: object!("connect6"),
        program: "ambit_connect6",
    },
    // Before sockops, which files the sockets this program acts on.
    Hook {
        name: "splice",
        attach: AttachType::SkMsgVerdict,
        target: Target::Map("ambit_splice"),
        hook: "sk_msg",
        object: object!("splice"),
        program: "ambit_sk_msg",
    },
    Hook {
        name: "sockops",
        target: Target::Cgroup,
        attach: AttachType::SockOps,
        hook: "sockops",
        object: object!("sockops"),
        program: "ambit_sockops",
    },
    Hook {
        name: "getsockopt",
        target: Target::Cgroup,
        attach: AttachType::GetSockopt,
        hook: "cgroup/getsockopt",
        object: object!("getsockopt"),
        program: "ambit_getsockopt",
    },
];

/// The inbound object, loaded once per pod.
pub(crate) const SK_LOOKUP_OBJECT: &[u8] = object!("sk_lookup");

/// Attaches the node's hooks (the outbound ones to the cgroup v2 root) and
/// pins their links under `root`. Idempotent: a hook whose link is pinned is
/// re-adopted, not attached twice (an agent restart keeps capture in place).
pub fn install_node(root: &Path) -> Result<(), EbpfError> {
    pins::ensure_bpffs(root)?;
    let cgroup_path = cgroup2_root()?;
    let cgroup = File::open(&cgroup_path).map_err(|source| EbpfError::Io {
        what: "cannot open cgroup",
        path: cgroup_path.clone(),
        source,
    })?;
    for hook in &HOOKS {
        let pin = pins::hook_link(root, hook.name);
        if PinnedLink::from_pin(&pin).is_ok() {
            continue;
        }
        let mut ebpf = load(root, hook.name, hook.object)?;
        let program =
            ebpf.program_mut(hook.program).unwrap_or_else(|| panic!("bug: no {} in its object", hook.program));
        let err = |source| EbpfError::Program { hook: hook.hook, source };
        // The three program types differ only in their Rust type.
        macro_rules! load_as {
            ($ty:ty) => {{
                let p: &mut $ty = program.try_into().map_err(err)?;
                p.load().map_err(err)?;
                p.fd().map_err(err)?.as_fd()
            }};
        }
        let fd = match hook.attach {
            AttachType::SockOps => load_as!(SockOps),
            AttachType::SkMsgVerdict => load_as!(SkMsg),
            AttachType::GetSockopt => load_as!(CgroupSockopt),
            AttachType::Connect4 | AttachType::Connect6 => load_as!(CgroupSockAddr),
        };
        let links = pin.parent().expect("bug: link pin has a parent");
        std::fs::create_dir_all(links).map_err(|source| EbpfError::Io {
            what: "cannot create",
            path: links.to_path_buf(),
            source,
        })?;
        let map;
        let target = match hook.target {
            Target::Cgroup => cgroup.as_fd(),
            Target::Map(name) => {
                map = MapData::from_pin(pins::maps_dir(root).join(name))
                    .map_err(|source| EbpfError::Map { name, source })?;
                map.fd().as_fd()
            }
        };
        attach_and_pin(fd, target, hook.attach, &pin).map_err(|source| EbpfError::Attach {
            hook: hook.hook,
            pin: pin.clone(),
            source,
        })?;
        tracing::info!(hook = hook.hook, cgroup = %cgroup_path.display(), "eBPF capture hook attached");
    }
    Ok(())
}

/// Whether every node hook's link is pinned under `root`.
pub fn is_node_installed(root: &Path) -> bool {
    HOOKS.iter().all(|h| PinnedLink::from_pin(pins::hook_link(root, h.name)).is_ok())
}

/// Detaches the node's hooks and every pod's inbound program pinned under
/// `root`, and removes the pins; what is absent is not an error.
pub fn uninstall_node(root: &Path) -> Result<(), EbpfError> {
    for hook in &HOOKS {
        pins::remove(&pins::hook_link(root, hook.name))?;
    }
    pins::remove_dir(&root.join("links"))?;
    if let Ok(pods) = std::fs::read_dir(pins::pods_dir(root)) {
        for pod in pods.flatten() {
            pins::remove_pod_dir(&pod.path())?;
        }
    }
    pins::remove_dir(&pins::pods_dir(root))?;
    if let Ok(maps) = std::fs::read_dir(pins::maps_dir(root)) {
        for map in maps.flatten() {
            pins::remove(&map.path())?;
        }
    }
    pins::remove_dir(&pins::maps_dir(root))?;
    pins::remove_dir(root)
}

/// Loads an object whose by-name maps are shared through `<root>/maps`.
pub(crate) fn load(root: &Path, object: &'static str, bytes: &[u8]) -> Result<Ebpf, EbpfError> {
    let maps = pins::maps_dir(root);
    std::fs::create_dir_all(&maps).map_err(|source| EbpfError::Io {
        what: "cannot create",
        path: maps.clone(),
        source,
    })?;
    EbpfLoader::new().default_map_pin_directory(&maps).load(bytes).map_err(|source| EbpfError::Load { object, source })
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on a v2 node,
/// `/sys/fs/cgroup/unified` on a hybrid v1 one).
fn cgroup2_root() -> Result<PathBuf, EbpfError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| EbpfError::Io {
        what: "cannot read",
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    info.lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split_whitespace().nth(4)?;
            (fs.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(point))
        })
        .ok_or(EbpfError::NoCgroup2)
}
