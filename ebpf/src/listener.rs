//! ztunnel's side: its in-pod plaintext listener goes into the pod's listener
//! map, where the inbound program finds it.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use aya::maps::{MapData, SockMap};

use crate::netns::netns_cookie;
use crate::pins::LISTENERS_PIN;
use crate::pod::{map_err, open_pinned, LISTENERS_MAP};
use crate::{pins, EbpfError};

/// Puts `listener` (a listening socket in a pod's namespace) in that pod's
/// listener map under `root`. Returns false, doing nothing, when the pod is
/// not captured with eBPF (no map is pinned for its namespace).
pub fn register_inbound_listener(root: &Path, listener: &impl AsFd) -> Result<bool, EbpfError> {
    // No pod on this node is captured with eBPF: nothing to look up, and no
    // need for SO_NETNS_COOKIE (Linux 5.14), so nftables capture works on
    // older kernels.
    if !pins::pods_dir(root).exists() {
        return Ok(false);
    }
    let fd = listener.as_fd();
    let cookie = netns_cookie(fd).map_err(|source| EbpfError::Io {
        what: "cannot read the network namespace cookie of listener",
        path: format!("fd {}", fd.as_raw_fd()).into(),
        source,
    })?;
    let path = pins::pod_dir(root, cookie).join(LISTENERS_PIN);
    if !path.exists() {
        return Ok(false);
    }
    let mut map: SockMap<MapData> = open_pinned(&path, LISTENERS_MAP)?;
    map.set(0, &fd.as_raw_fd(), 0).map_err(map_err(LISTENERS_MAP))?;
    Ok(true)
}
