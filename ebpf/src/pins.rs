//! The pin directory's layout, and the bpffs it must live on.
//!
//! ```text
//! <root>/maps/<name>              maps shared by the outbound objects (pinned by name)
//! <root>/links/<hook>             the node's cgroup links (connect4, connect6, sockops, getsockopt)
//! <root>/netns/<cookie>/sk_lookup a pod's inbound link
//! <root>/netns/<cookie>/listeners the pod's listener map (ztunnel fills it)
//! <root>/netns/<cookie>/config    the pod's inbound settings
//! ```

use std::path::{Path, PathBuf};

use crate::EbpfError;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub(crate) fn maps_dir(root: &Path) -> PathBuf {
    root.join("maps")
}

pub(crate) fn hook_link(root: &Path, hook: &str) -> PathBuf {
    root.join("links").join(hook)
}

/// Where each captured pod's pins are, by network-namespace cookie.
pub(crate) fn pods_dir(root: &Path) -> PathBuf {
    root.join("netns")
}

pub(crate) fn pod_dir(root: &Path, netns_cookie: u64) -> PathBuf {
    pods_dir(root).join(netns_cookie.to_string())
}

/// Makes sure `root` exists on a bpffs. When its nearest existing ancestor is
/// not on one and is `/sys/fs/bpf`, that is where bpffs belongs and it is
/// mounted there (as Cilium's and Istio's agents do); anywhere else that is
/// an error naming the mount to make.
pub(crate) fn ensure_bpffs(root: &Path) -> Result<(), EbpfError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| EbpfError::Io { what, path, source }
    };
    let mut existing = root;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if !is_bpffs(existing).map_err(io("cannot statfs", existing))? {
        if existing != Path::new("/sys/fs/bpf") {
            return Err(EbpfError::Io {
                what: "pin directory is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf):",
                path: root.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::Unsupported),
            });
        }
        nix::mount::mount(Some("bpf"), existing, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| EbpfError::Io { what: "cannot mount bpffs on", path: existing.into(), source: e.into() })?;
        tracing::info!(path = %existing.display(), "mounted bpffs");
    }
    std::fs::create_dir_all(root).map_err(io("cannot create", root))
}

fn is_bpffs(path: &Path) -> std::io::Result<bool> {
    let st = nix::sys::statfs::statfs(path)?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Removes a pin; one that is absent is not an error.
pub(crate) fn remove(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(EbpfError::Io { what: "cannot remove pin", path: path.to_path_buf(), source: e })
        }
        _ => Ok(()),
    }
}

/// Removes a directory of pins if it is empty or absent.
pub(crate) fn remove_dir(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(EbpfError::Io { what: "cannot remove pin directory", path: path.to_path_buf(), source: e })
        }
        _ => Ok(()),
    }
}

/// A pod's pins, in its directory: the inbound program's link, its listener
/// map and its settings.
pub(crate) const SK_LOOKUP_PIN: &str = "sk_lookup";
pub(crate) const LISTENERS_PIN: &str = "listeners";
pub(crate) const CONFIG_PIN: &str = "config";

/// Removes a pod's pins (unpinning its link detaches its program).
pub(crate) fn remove_pod_dir(dir: &Path) -> Result<(), EbpfError> {
    for pin in [SK_LOOKUP_PIN, LISTENERS_PIN, CONFIG_PIN] {
        remove(&dir.join(pin))?;
    }
    remove_dir(dir)
}
