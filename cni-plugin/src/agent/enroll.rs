//! Enrolling pods: capture rules in the pod's network namespace, then the pod
//! handed to every connected ztunnel over ZDS, and back.
//!
//! Operations (enroll, release, gc) run one at a time: each is a few `nft`
//! and `ip` runs plus one ack per ztunnel, and serialising them means a pod's
//! enroll and release can never interleave. The pods live in memory and, with
//! `state_dir`, in a JSON file read back at start: the pods whose namespace
//! still exists are replayed to the next ztunnel (their rules survive in the
//! namespace), and the watcher's re-enroll repairs the rest.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ambit_zds::{ZdsError, ZdsServer};

use tokio::task::JoinHandle;

pub use super::pod::PodInfo;
use super::state_file::{self, Stored};
use super::ztunnels::{self, lock, Attachment, Command, Shared};
use crate::capture::{self, CaptureConfig, CaptureError};

/// The sysctl that lets a new ztunnel's `SO_REUSEPORT` listener take over the
/// pending connections of the old one during an upgrade.
const MIGRATE_REQ_SYSCTL: &str = "net/ipv4/tcp_migrate_req";

/// How the enroller captures and where it serves ZDS.
#[derive(Debug, Clone)]
pub struct EnrollConfig {
    /// ztunnel connects here (`/var/run/ztunnel/ztunnel.sock`).
    pub zds_socket: PathBuf,
    /// The capture rules' ports and marks.
    pub capture: CaptureConfig,
    /// Where the enrolled pods are kept across restarts (`None`: memory only).
    pub state_dir: Option<PathBuf>,
}

impl EnrollConfig {
    /// Default capture, no state file.
    pub fn new(zds_socket: impl Into<PathBuf>) -> Self {
        EnrollConfig { zds_socket: zds_socket.into(), capture: CaptureConfig::default(), state_dir: None }
    }
}

/// Why a pod could not be enrolled or released.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// No ztunnel is connected: retry later.
    #[error("no ztunnel is connected to the node agent")]
    NoZtunnel,
    /// A ztunnel refused the pod.
    #[error("ztunnel refused pod {pod}: {message}")]
    Rejected {
        /// The pod, `ns/name (uid)`.
        pod: String,
        /// ztunnel's ack error.
        message: String,
    },
    /// Capture could not be installed, removed or checked.
    #[error("capture for pod {pod}: {source}")]
    Capture {
        /// The pod, `ns/name (uid)`.
        pod: String,
        /// What failed.
        source: CaptureError,
    },
    /// `check`: the pod is not enrolled.
    #[error("pod {0} is not enrolled")]
    NotEnrolled(String),
    /// `check`: the pod is enrolled but not every ztunnel acked it.
    #[error("pod {0} is enrolled but ztunnel has not acknowledged it")]
    NotAcked(String),
    /// `check`: the pod's nftables table is missing.
    #[error("capture rules of pod {0} are missing")]
    CaptureMissing(String),
    /// The ZDS socket could not be served.
    #[error("cannot serve ZDS: {0}")]
    Zds(#[from] ZdsError),
    /// The state file could not be read or written.
    #[error("state file {path}: {source}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl EnrollError {
    /// Whether trying again later may succeed without anyone acting (a
    /// ztunnel connects or comes back); the CNI plugin then answers "try
    /// again later".
    pub fn is_retryable(&self) -> bool {
        matches!(self, EnrollError::NoZtunnel | EnrollError::Rejected { .. } | EnrollError::NotAcked(_))
    }
}

/// Enrolls and releases pods; shared (`Arc`) by the plugin server and the
/// Kubernetes watcher.
#[derive(Debug)]
pub struct Enroller {
    config: EnrollConfig,
    shared: Arc<Mutex<Shared>>,
    ops: tokio::sync::Mutex<()>,
    accept: JoinHandle<()>,
}

impl Drop for Enroller {
    fn drop(&mut self) {
        // Stops accepting (the socket file goes with the server) and closes
        // every ztunnel connection.
        self.accept.abort();
        lock(&self.shared).disconnect_all();
    }
}

impl Enroller {
    /// Binds the ZDS socket and starts serving ztunnel. Pods in the state
    /// file whose namespace still exists are enrolled again (without
    /// touching their rules), to be replayed to the first ztunnel.
    pub async fn start(config: EnrollConfig) -> Result<Arc<Enroller>, EnrollError> {
        config.capture.validate().map_err(|source| EnrollError::Capture { pod: "(config)".into(), source })?;
        let mut shared = Shared::default();
        if let Some(dir) = &config.state_dir {
            let stored = state_file::load(dir)
                .map_err(|source| EnrollError::StateFile { path: state_file::path(dir), source })?;
            for Stored { pod, container_id } in stored {
                if pod.netns.exists() {
                    tracing::info!(%pod, "pod from the state file");
                    shared.pods.insert(pod.uid.clone(), Attachment { pod, container_id, acked: false });
                } else {
                    tracing::info!(%pod, "pod from the state file is gone");
                }
            }
        }
        let server = ZdsServer::bind(&config.zds_socket)?;
        let shared = Arc::new(Mutex::new(shared));
        let accept = tokio::spawn(ztunnels::accept_loop(server, shared.clone()));
        let enroller = Arc::new(Enroller { config, shared, ops: tokio::sync::Mutex::new(()), accept });
        enroller.persist();
        Ok(enroller)
    }

    /// Installs capture in the pod's namespace, hands the pod to ztunnel and
    /// returns once ztunnel acknowledged it. Enrolling an enrolled pod
    /// re-checks and repairs its rules.
    pub async fn enroll(&self, pod: PodInfo) -> Result<(), EnrollError> {
        self.enroll_attachment(pod, None).await
    }

    /// [`Enroller::enroll`] for a CNI attachment: `container_id` is what CNI
    /// GC later names ([`Enroller::gc`]). A later enroll without one keeps it.
    pub async fn enroll_attachment(&self, pod: PodInfo, container_id: Option<String>) -> Result<(), EnrollError> {
        let _op = self.ops.lock().await;
        let (fresh, any) = {
            let s = lock(&self.shared);
            (!s.pods.contains_key(&pod.uid), s.any_ztunnel())
        };
        // Checked before any rule is written: a retried ADD must find the
        // pod as it was.
        if !any {
            return Err(EnrollError::NoZtunnel);
        }
        if let Err(e) = self.install(&pod).await {
            if fresh {
                self.remove_capture(&pod).await;
            }
            return Err(e);
        }
        let acks = {
            let mut s = lock(&self.shared);
            let container_id = container_id.or_else(|| s.pods.get(&pod.uid).and_then(|a| a.container_id.clone()));
            s.pods.insert(pod.uid.clone(), Attachment { pod: pod.clone(), container_id, acked: false });
            s.broadcast(|reply| Command::Add(pod.clone(), reply))
        };
        let (acked, refusal) = wait_acks(acks).await;
        let result = match refusal {
            Some(message) => Err(EnrollError::Rejected { pod: pod.to_string(), message }),
            // Every ztunnel went away meanwhile.
            None if acked == 0 => Err(EnrollError::NoZtunnel),
            None => Ok(()),
        };
        match &result {
            Ok(()) => {
                if let Some(a) = lock(&self.shared).pods.get_mut(&pod.uid) {
                    a.acked = true;
                }
                tracing::info!(%pod, ztunnels = acked, "pod enrolled");
            }
            Err(e) if fresh => {
                tracing::warn!(%pod, error = %e, "enroll failed; undoing it");
                self.forget(&pod.uid).await;
                self.remove_capture(&pod).await;
            }
            Err(e) => tracing::warn!(%pod, error = %e, "re-enroll failed; the pod stays enrolled"),
        }
        self.persist();
        result
    }

    /// Removes capture (if the namespace still exists) and tells ztunnel to
    /// drop the pod. Releasing an unknown pod is not an error.
    pub async fn release(&self, uid: &str) -> Result<(), EnrollError> {
        let _op = self.ops.lock().await;
        self.release_locked(uid).await
    }

    /// Releases the pod enrolled for CNI container `container_id`, if any.
    pub async fn release_container(&self, container_id: &str) -> Result<(), EnrollError> {
        let _op = self.ops.lock().await;
        let uid = {
            let s = lock(&self.shared);
            s.pods.values().find(|a| a.container_id.as_deref() == Some(container_id)).map(|a| a.pod.uid.clone())
        };
        match uid {
            Some(uid) => self.release_locked(&uid).await,
            None => Ok(()),
        }
    }

    /// CNI DEL: releases pod `uid` (or, without one, the pod of
    /// `container_id`), unless the pod is now enrolled for another
    /// container: the DEL of a pod's old sandbox must not release the
    /// sandbox that replaced it.
    pub async fn release_cni(&self, uid: Option<&str>, container_id: &str) -> Result<(), EnrollError> {
        let Some(uid) = uid else { return self.release_container(container_id).await };
        let _op = self.ops.lock().await;
        let other = lock(&self.shared)
            .pods
            .get(uid)
            .and_then(|a| a.container_id.clone())
            .filter(|c| !container_id.is_empty() && c != container_id);
        if let Some(current) = other {
            tracing::info!(pod = %uid, deleted = %container_id, %current, "DEL of a replaced sandbox; pod stays enrolled");
            return Ok(());
        }
        self.release_locked(uid).await
    }

    /// CNI GC: releases every pod enrolled through CNI whose container ID is
    /// not in `valid`, and returns their UIDs. Pods enrolled without a
    /// container ID (by the watcher) are not the runtime's to collect.
    pub async fn gc(&self, valid: &HashSet<String>) -> Result<Vec<String>, EnrollError> {
        let _op = self.ops.lock().await;
        let stale: Vec<String> = lock(&self.shared)
            .pods
            .values()
            .filter(|a| a.container_id.as_ref().is_some_and(|c| !valid.contains(c)))
            .map(|a| a.pod.uid.clone())
            .collect();
        for uid in &stale {
            tracing::info!(pod = %uid, "GC: attachment no longer valid");
            self.release_locked(uid).await?;
        }
        Ok(stale)
    }

    /// Verifies the pod's capture is in place and ztunnel holds it.
    pub async fn check(&self, uid: &str) -> Result<(), EnrollError> {
        let pod = {
            let s = lock(&self.shared);
            let a = s.pods.get(uid).ok_or_else(|| EnrollError::NotEnrolled(uid.to_string()))?;
            if !a.acked {
                return Err(EnrollError::NotAcked(a.pod.to_string()));
            }
            a.pod.clone()
        };
        let (netns, cfg) = (pod.netns.clone(), self.config.capture.clone());
        let installed = blocking(move || capture::is_installed(&netns, &cfg))
            .await
            .map_err(|source| EnrollError::Capture { pod: pod.to_string(), source })?;
        if !installed {
            return Err(EnrollError::CaptureMissing(pod.to_string()));
        }
        Ok(())
    }

    /// The pods enrolled now.
    pub fn enrolled(&self) -> Vec<PodInfo> {
        lock(&self.shared).pods.values().map(|a| a.pod.clone()).collect()
    }

    /// Whether a ztunnel is connected and has taken the snapshot.
    pub fn ztunnel_ready(&self) -> bool {
        lock(&self.shared).any_ready()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &EnrollConfig {
        &self.config
    }

    async fn release_locked(&self, uid: &str) -> Result<(), EnrollError> {
        let Some(pod) = self.forget(uid).await else {
            return Ok(());
        };
        self.persist();
        if !pod.netns.exists() {
            tracing::info!(%pod, "pod released (its network namespace is gone)");
            return Ok(());
        }
        let (netns, cfg) = (pod.netns.clone(), self.config.capture.clone());
        match blocking(move || capture::uninstall(&netns, &cfg)).await {
            Ok(()) => {}
            // The namespace went away while we worked: nothing left to clean.
            Err(_) if !pod.netns.exists() => {}
            Err(source) => return Err(EnrollError::Capture { pod: pod.to_string(), source }),
        }
        tracing::info!(%pod, "pod released");
        Ok(())
    }

    /// Drops the pod from the set and tells every ztunnel; ztunnel refusing
    /// a del (it did not have the pod) is only logged.
    async fn forget(&self, uid: &str) -> Option<PodInfo> {
        let (pod, acks) = {
            let mut s = lock(&self.shared);
            let a = s.pods.remove(uid)?;
            (a.pod, s.broadcast(|reply| Command::Del(uid.to_string(), reply)))
        };
        if let (_, Some(e)) = wait_acks(acks).await {
            tracing::debug!(%pod, error = %e, "ztunnel refused the del");
        }
        Some(pod)
    }

    async fn install(&self, pod: &PodInfo) -> Result<(), EnrollError> {
        let (netns, cfg) = (pod.netns.clone(), self.config.capture.clone());
        blocking(move || {
            capture::install(&netns, &cfg)?;
            match capture::set_sysctl(&netns, MIGRATE_REQ_SYSCTL, "1") {
                Err(e) if e.is_missing() => tracing::debug!(error = %e, "kernel has no tcp_migrate_req"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set tcp_migrate_req; ztunnel upgrades may reset connections")
                }
                Ok(()) => {}
            }
            Ok(())
        })
        .await
        .map_err(|source| EnrollError::Capture { pod: pod.to_string(), source })
    }

    /// Best effort: undoes a failed fresh enroll.
    async fn remove_capture(&self, pod: &PodInfo) {
        let (netns, cfg) = (pod.netns.clone(), self.config.capture.clone());
        if let Err(e) = blocking(move || capture::uninstall(&netns, &cfg)).await {
            tracing::warn!(%pod, error = %e, "cannot remove the capture of a pod that failed to enroll");
        }
    }

    fn persist(&self) {
        let Some(dir) = &self.config.state_dir else { return };
        let stored: Vec<Stored> = lock(&self.shared)
            .pods
            .values()
            .map(|a| Stored { pod: a.pod.clone(), container_id: a.container_id.clone() })
            .collect();
        // Memory stays the truth; a failed write costs only a slower recovery.
        if let Err(e) = state_file::save(dir, &stored) {
            tracing::warn!(path = %state_file::path(dir).display(), error = %e, "cannot write the state file");
        }
    }
}

/// Waits for every ack: how many succeeded, and the first refusal. A
/// ztunnel that disconnects meanwhile counts as neither.
async fn wait_acks(acks: Vec<tokio::sync::oneshot::Receiver<Result<(), String>>>) -> (usize, Option<String>) {
    let (mut acked, mut refusal) = (0, None);
    for rx in acks {
        match rx.await {
            Ok(Ok(())) => acked += 1,
            Ok(Err(m)) => {
                refusal.get_or_insert(m);
            }
            Err(_) => {}
        }
    }
    (acked, refusal)
}

/// Runs namespace work (process spawns) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CaptureError> + Send + 'static,
) -> Result<T, CaptureError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| panic!("bug: capture task failed: {e}"))
}
