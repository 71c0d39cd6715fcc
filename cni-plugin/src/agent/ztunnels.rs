//! The ztunnels connected over ZDS: one task per connection, each replaying
//! the enrolled pods as a snapshot and then forwarding live adds and dels.
//!
//! More than one ztunnel may be connected at once: during a rolling upgrade
//! the new ztunnel connects while the old one still serves. Every connection
//! gets every pod, so either can serve it, and an enroll waits for all of
//! them.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};

use ambit_zds::{error_text, WorkloadInfo, ZdsAgentConnection, ZdsError, ZdsServer};
use tokio::sync::{mpsc, oneshot};

use super::pod::PodInfo;

/// What a connection task is asked to send; the answer is ztunnel's ack
/// (`Err` holds its error text). The reply sender is dropped unanswered when
/// the connection breaks: the ztunnel is gone and no longer counts.
#[derive(Debug)]
pub(super) enum Command {
    Add(PodInfo, oneshot::Sender<Result<(), String>>),
    Del(String, oneshot::Sender<Result<(), String>>),
}

/// One enrolled pod and where it came from.
#[derive(Debug, Clone)]
pub(super) struct Attachment {
    pub(super) pod: PodInfo,
    /// The CNI container ID when the plugin enrolled it (GC keys on it).
    pub(super) container_id: Option<String>,
    /// Every ztunnel connected at the time acked its add.
    pub(super) acked: bool,
}

#[derive(Debug)]
struct Ztunnel {
    tx: mpsc::UnboundedSender<Command>,
    /// Its snapshot was sent and acked.
    ready: bool,
}

/// What the enroller and the connection tasks share. Held only briefly and
/// never across an await.
#[derive(Debug, Default)]
pub(super) struct Shared {
    pub(super) pods: BTreeMap<String, Attachment>,
    ztunnels: BTreeMap<u64, Ztunnel>,
    next_id: u64,
}

impl Shared {
    pub(super) fn any_ztunnel(&self) -> bool {
        !self.ztunnels.is_empty()
    }

    pub(super) fn any_ready(&self) -> bool {
        self.ztunnels.values().any(|z| z.ready)
    }

    /// Sends a command (built per ztunnel) to every connected ztunnel and
    /// returns the receivers of their acks. Called under the same lock that
    /// changed `pods`, so a ztunnel connecting concurrently sees the pod
    /// either in its snapshot or as this command, never neither.
    pub(super) fn broadcast(
        &self,
        make: impl Fn(oneshot::Sender<Result<(), String>>) -> Command,
    ) -> Vec<oneshot::Receiver<Result<(), String>>> {
        self.ztunnels
            .values()
            .filter_map(|z| {
                let (tx, rx) = oneshot::channel();
                z.tx.send(make(tx)).ok().map(|()| rx)
            })
            .collect()
    }

    /// Disconnects every ztunnel (their tasks see the channel close).
    pub(super) fn disconnect_all(&mut self) {
        self.ztunnels.clear();
    }
}

pub(super) fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock is a bug; the data is still consistent
    // enough to go on serving pods, which matters more on a node.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Accepts ztunnels for ever, one task each.
pub(super) async fn accept_loop(server: ZdsServer, shared: Arc<Mutex<Shared>>) {
    loop {
        match server.accept().await {
            Ok(conn) => {
                tokio::spawn(serve(conn, shared.clone()));
            }
            Err(e) => tracing::warn!(error = %error_text(&e), "a ztunnel failed to connect"),
        }
    }
}

async fn serve(mut conn: ZdsAgentConnection, shared: Arc<Mutex<Shared>>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (id, snapshot) = {
        let mut s = lock(&shared);
        let id = s.next_id;
        s.next_id += 1;
        s.ztunnels.insert(id, Ztunnel { tx, ready: false });
        (id, s.pods.values().map(|a| a.pod.clone()).collect::<Vec<_>>())
    };
    tracing::info!(ztunnel = id, pods = snapshot.len(), "ztunnel connected; sending the snapshot");
    let result = session(&shared, id, &mut conn, snapshot, &mut rx).await;
    lock(&shared).ztunnels.remove(&id);
    match result {
        Ok(()) => tracing::info!(ztunnel = id, "ztunnel disconnected"),
        Err(e) => tracing::warn!(ztunnel = id, error = %error_text(&e), "ztunnel connection failed"),
    }
}

async fn session(
    shared: &Mutex<Shared>,
    id: u64,
    conn: &mut ZdsAgentConnection,
    snapshot: Vec<PodInfo>,
    rx: &mut mpsc::UnboundedReceiver<Command>,
) -> Result<(), ZdsError> {
    for pod in snapshot {
        match add(conn, &pod).await {
            Ok(()) => {
                if let Some(a) = lock(shared).pods.get_mut(&pod.uid) {
                    a.acked = true;
                }
            }
            Err(AddError::Netns(e)) => {
                // The namespace may be briefly unopenable; keep rather than
                // lose the pod, as Istio's agent does.
                tracing::warn!(pod = %pod.uid, error = %e, "cannot open the pod's netns; sending keep");
                conn.keep(&pod.uid).await?;
            }
            Err(AddError::Zds(ZdsError::Rejected(m))) => {
                tracing::warn!(ztunnel = id, pod = %pod.uid, error = %m, "ztunnel refused a pod of the snapshot")
            }
            Err(AddError::Zds(e)) => return Err(e),
        }
    }
    conn.snapshot_sent().await?;
    if let Some(z) = lock(shared).ztunnels.get_mut(&id) {
        z.ready = true;
    }
    tracing::info!(ztunnel = id, "snapshot sent");
    loop {
        // The select yields a value first, so `conn` is free again below.
        let next = tokio::select! {
            cmd = rx.recv() => Ok(cmd),
            closed = conn.closed() => Err(closed),
        };
        let (result, reply) = match next {
            Err(closed) => return closed,
            Ok(None) => return Ok(()),
            Ok(Some(Command::Add(pod, reply))) => (add(conn, &pod).await, reply),
            Ok(Some(Command::Del(uid, reply))) => (conn.del(&uid).await.map_err(AddError::Zds), reply),
        };
        match result {
            Ok(()) => {
                let _ = reply.send(Ok(()));
            }
            Err(AddError::Zds(e)) if e.is_fatal() => return Err(e),
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum AddError {
    #[error("cannot open the pod's network namespace: {0}")]
    Netns(std::io::Error),
    #[error("{}", rejection(.0))]
    Zds(ZdsError),
}

/// ztunnel's own words for a rejection; the chain for anything else.
fn rejection(e: &ZdsError) -> String {
    match e {
        ZdsError::Rejected(m) => m.clone(),
        e => error_text(e),
    }
}

async fn add(conn: &mut ZdsAgentConnection, pod: &PodInfo) -> Result<(), AddError> {
    // Opening a namespace file does not block for long; the fd is sent and
    // closed here (ztunnel holds its own copy).
    let netns = std::fs::File::open(&pod.netns).map_err(AddError::Netns)?;
    let info = WorkloadInfo {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
    };
    conn.add(&pod.uid, info, netns.as_fd()).await.map_err(AddError::Zds)
}
