//! Replacing a node's ztunnel the way a DaemonSet rolling update with `maxSurge: 1` does: the new process starts
//! while the old one still serves, takes the node's pods from the node agent (the lab) over its own ZDS connection
//! and binds their listeners beside the old one's (SO_REUSEPORT); once it is ready the old one gets SIGTERM, closes
//! its listeners (the kernel moves their queued connections to the new ones), sends GOAWAY to its HBONE peers and
//! drains its open connections before it exits.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::lab::NodeId;
use crate::mesh::Mesh;

/// How much longer than its drain timeout an old ztunnel may take to exit.
const EXIT_MARGIN: Duration = Duration::from_secs(10);

/// What an overlapping restart measured.
#[derive(Clone, Copy, Debug)]
pub struct Handover {
    /// From starting the new process until it was ready (both serving meanwhile).
    pub overlap: Duration,
    /// From SIGTERM until the old process exited.
    pub drain: Duration,
}

impl Mesh {
    /// Replaces the ztunnel of `node` with a new process on the same arguments (the admin, metrics and readiness
    /// ports and the log file alternate, see [`crate::ztunnel::ZtunnelArgs::replacement`]), overlapping as described
    /// in the module docs. Fails if the old process does not exit 0 within its drain timeout (plus a margin).
    pub fn restart_ztunnel_overlapping(&mut self, node: NodeId) -> anyhow::Result<Handover> {
        let args = self.ztunnel(node).args().replacement();
        let start = Instant::now();
        let mut new = self.spawn_ztunnel(node, args)?;
        let conn = self.hand_pods_to(node, &mut new).context("the replacement ztunnel")?;
        let overlap = start.elapsed();
        let (old, old_conn) = self.swap_ztunnel(node, new, conn);
        let mut old = old.context("bug: no ztunnel to replace")?;
        let sigterm = Instant::now();
        old.terminate();
        let status = old.wait_exit(old.args().drain_timeout() + EXIT_MARGIN)?;
        let drain = sigterm.elapsed();
        // Kept open until the old process is gone: a closed agent connection would only make it reconnect.
        drop(old_conn);
        if !status.success() {
            bail!("the replaced ztunnel exited with {status}; log:\n{}", old.log_tail(50));
        }
        Ok(Handover { overlap, drain })
    }
}
