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

pub(crate) fn pod_dir(root: &Path, netns_cookie: u64) -> PathBuf {
    root.join("netns").join(netns_cookie.to_string())
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

/// Removes a pod's pins (unpinning its link detaches its program).
pub(crate) fn remove_pod_dir(dir: &Path) -> Result<(), EbpfError> {
    for pin in ["sk_lookup", "listeners", "config"] {
        remove(&dir.join(pin))?;
    }
    remove_dir(dir)
}
