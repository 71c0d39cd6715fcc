//! In-pod enrollment: ztunnel connects to the CNI node agent over ZDS
//! (docs/zds.md) and, for each pod the agent adds, starts the pod's proxies
//! inside the network namespace whose fd came with the message. Deleted pods
//! stop accepting; their open connections finish. On reconnect the agent
//! replays its pods and `SnapshotSent` releases the ones it no longer has.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_api::workload::zds::WorkloadInfo;
use ambit_identity::Identity;
use ambit_zds::{ZdsClient, ZdsRequest};
use tracing::{info, warn};

use crate::admin::{PodSummary, Readiness};
use crate::netns::{NetnsError, PodNetns};
use crate::proxy::{Pod, PodProxies, ProxyError, ProxyInputs};

/// Why an enrollment request was refused (sent back in the ack).
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("add for pod {0} has no workload info")]
    MissingInfo(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

struct Enrolled {
    pod: Arc<Pod>,
    proxies: PodProxies,
}

/// The pods enrolled on this node.
pub struct InPodManager {
    inputs: ProxyInputs,
    pods: HashMap<String, Enrolled>,
    summaries: Arc<Mutex<Vec<PodSummary>>>,
}

impl InPodManager {
    pub fn new(inputs: ProxyInputs, summaries: Arc<Mutex<Vec<PodSummary>>>) -> Self {
        InPodManager { inputs, pods: HashMap::new(), summaries }
    }

    /// Talks to the node agent until `stop` completes, reconnecting with
    /// backoff (1 s up to 10 s) when the socket is missing or the agent goes
    /// away; enrolled pods keep being served meanwhile. It connects only
    /// once the mesh state is loaded: the pods' listeners share their ports
    /// with any ztunnel still running (SO_REUSEPORT), so the kernel gives
    /// them connections at once, which an empty state would fail. On `stop`
    /// it closes every pod's listeners and returns once they are closed.
    pub async fn run(mut self, socket: &Path, readiness: Arc<Readiness>, stop: impl Future<Output = ()>) {
        tokio::select! {
            () = self.serve(socket, &readiness) => {}
            () = stop => {}
        }
        let pods: Vec<Enrolled> = self.pods.drain().map(|(_, e)| e).collect();
        futures::future::join_all(pods.into_iter().map(|e| e.proxies.close())).await;
        info!("stopped accepting connections for the enrolled pods");
    }

    async fn serve(&mut self, socket: &Path, readiness: &Readiness) {
        if !readiness.is_state_loaded() {
            info!("waiting for the mesh state before taking pods from the node agent");
            readiness.state_loaded().await;
        }
        let mut backoff = Duration::from_secs(1);
        loop {
            match ZdsClient::connect(socket).await {
                Ok(client) => {
                    info!(socket = %socket.display(), "connected to the node agent");
                    backoff = Duration::from_secs(1);
                    if let Err(e) = self.session(client, readiness).await {
                        warn!(error = %e, "node agent session failed");
                    } else {
                        warn!("node agent closed the connection");
                    }
                }
                Err(e) => {
                    warn!(socket = %socket.display(), error = %e, retry_in = ?backoff, "cannot reach the node agent")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn session(&mut self, mut client: ZdsClient, readiness: &Readiness) -> Result<(), ambit_zds::ZdsError> {
        // Pods named since the hello; the others go when the snapshot ends.
        let mut seen: HashSet<String> = HashSet::new();
        loop {
            let req = match client.recv().await {
                Ok(Some(req)) => req,
                Ok(None) => return Ok(()),
                // A request ztunnel cannot act on was already refused (acked
                // with the error) by the client; the session goes on.
                Err(e) if !e.is_fatal() => {
                    warn!(error = %e, "refused a malformed request from the node agent");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let result = match req {
                ZdsRequest::Add { uid, info, netns } => {
                    seen.insert(uid.clone());
                    self.add(uid, Some(info), netns).await
                }
                ZdsRequest::Keep { uid } => {
                    seen.insert(uid);
                    Ok(())
                }
                ZdsRequest::Del { uid } => {
                    self.remove(&uid);
                    Ok(())
                }
                ZdsRequest::SnapshotSent => {
                    let stale: Vec<String> = self.pods.keys().filter(|u| !seen.contains(*u)).cloned().collect();
                    for uid in stale {
                        info!(pod = %uid, "pod not in the node agent's snapshot; releasing");
                        self.remove(&uid);
                    }
                    // Each add above returned once its pod's listeners were bound.
                    readiness.pods_listening.store(true, Ordering::Relaxed);
                    info!(pods = self.pods.len(), "node agent's snapshot applied");
                    Ok(())
                }
            };
            let error = result.as_ref().err().map(|e| e.to_string());
            if let Some(e) = &error {
                warn!(error = %e, "enrollment request failed");
            }
            client.ack(error.as_deref()).await?;
        }
    }

    async fn add(&mut self, uid: String, info: Option<WorkloadInfo>, netns: OwnedFd) -> Result<(), EnrollError> {
        let info = info.ok_or_else(|| EnrollError::MissingInfo(uid.clone()))?;
        let netns = PodNetns::new(&uid, netns, self.inputs.config.socket_mark)?;
        if let Some(existing) = self.pods.get(&uid) {
            if existing.pod.netns.inode() == netns.inode() {
                return Ok(()); // replayed after a reconnect: already serving
            }
            info!(pod = %uid, "pod re-added with a new network namespace; restarting its proxies");
            self.remove(&uid);
        }
        let sa = if info.service_account.is_empty() { "default" } else { &info.service_account };
        let identity = Identity::new(&self.inputs.config.trust_domain, &info.namespace, sa);
        let pod = Arc::new(Pod { uid: uid.clone(), name: info.name, namespace: info.namespace, identity, netns });
        // Fetch the certificate now so the first connection does not wait;
        // a CA failure is retried on use, it does not block enrollment.
        if let Err(e) = self.inputs.certs.acquire(&pod.identity).await {
            warn!(pod = %uid, error = %e, "cannot fetch the pod's certificate yet");
        }
        let proxies = match PodProxies::start(self.inputs.clone(), pod.clone()).await {
            Ok(p) => p,
            Err(e) => {
                self.inputs.certs.release(&pod.identity);
                return Err(e.into());
            }
        };
        info!(pod = %uid, identity = %pod.identity, "pod enrolled");
        self.pods.insert(uid, Enrolled { pod, proxies });
        self.publish();
        Ok(())
    }

    fn remove(&mut self, uid: &str) {
        if let Some(e) = self.pods.remove(uid) {
            e.proxies.stop();
            self.inputs.certs.release(&e.pod.identity);
            info!(pod = %uid, "pod released");
            self.publish();
        }
    }

    fn publish(&self) {
        let mut list: Vec<PodSummary> = self
            .pods
            .values()
            .map(|e| PodSummary {
                uid: e.pod.uid.clone(),
                name: e.pod.name.clone(),
                namespace: e.pod.namespace.clone(),
                identity: e.pod.identity.to_string(),
                netns_inode: e.pod.netns.inode(),
            })
            .collect();
        list.sort_by(|a, b| a.uid.cmp(&b.uid));
        self.inputs.metrics.enrolled_pods.set(list.len() as i64);
        *self.summaries.lock().expect("bug: poisoned") = list;
    }
}
