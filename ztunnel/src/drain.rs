//! Draining: what lets a ztunnel be replaced without failing connections.
//!
//! On the first SIGTERM (or SIGINT) ztunnel stops accepting (its pod
//! listeners close; with SO_REUSEPORT and `net.ipv4.tcp_migrate_req=1` in the
//! pod's namespace the kernel moves connections not yet accepted to the new
//! ztunnel's listeners), then signals [`DrainWatch::signaled`] to the open
//! connections: HBONE server connections send GOAWAY, so peers open new
//! tunnels (to the new ztunnel), and the client pool stops handing out
//! pooled connections. It exits once every accepted connection has ended or
//! `--drain-timeout` has passed; a second signal exits at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

#[derive(Default)]
struct Active {
    count: AtomicUsize,
    idle: Notify,
}

/// The drain trigger, held by the application; connections hold [`DrainWatch`]es.
pub struct Drain {
    signal: watch::Sender<bool>,
    active: Arc<Active>,
}

/// What a connection sees of the drain: whether it started, and a way to be
/// counted among the connections the drain waits for.
#[derive(Clone)]
pub struct DrainWatch {
    signal: watch::Receiver<bool>,
    active: Arc<Active>,
}

/// Counts one open connection (or stream) until dropped.
pub struct ConnGuard(Arc<Active>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub fn new() -> Self {
        Drain { signal: watch::channel(false).0, active: Arc::default() }
    }

    /// A watch for connections to hold.
    pub fn watch(&self) -> DrainWatch {
        DrainWatch { signal: self.signal.subscribe(), active: self.active.clone() }
    }

    /// Tells every connection that the drain started.
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    /// Connections (and HBONE streams) still open.
    pub fn active(&self) -> usize {
        self.active.count.load(Ordering::Acquire)
    }

    /// Waits until no tracked connection is open, or `timeout`; true when
    /// all ended in time.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let idle = async {
            loop {
                let notified = self.active.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, idle).await.is_ok()
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl DrainWatch {
    /// Resolves once the drain has started (at once if it already has).
    pub async fn signaled(&mut self) {
        // An error means the Drain is gone: the process is exiting anyway.
        if self.signal.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Counts a connection until the guard is dropped.
    pub fn track(&self) -> ConnGuard {
        self.active.count.fetch_add(1, Ordering::AcqRel);
        ConnGuard(self.active.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn the_drain_waits_for_tracked_connections_and_times_out_otherwise() {
        let drain = Drain::new();
        let mut w = drain.watch();
        assert!(!w.is_draining());
        assert!(drain.wait_idle(Duration::from_millis(10)).await, "nothing open: idle at once");
        let (a, b) = (w.track(), w.track());
        drain.start();
        w.signaled().await;
        assert!(w.is_draining());
        assert!(!drain.wait_idle(Duration::from_millis(20)).await, "two still open");
        drop(a);
        let waiting = drain.wait_idle(Duration::from_secs(5));
        let closing = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(b);
        };
        let (idle, ()) = tokio::join!(waiting, closing);
        assert!(idle, "the last close ends the drain");
        assert_eq!(drain.active(), 0);
    }
}
