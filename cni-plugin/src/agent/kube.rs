//! The Kubernetes side of the node agent: watches this node's Pods and all
//! Namespaces and keeps the enrolled pods equal to the members.
//!
//! The CNI plugin enrolls pods as they start; this driver covers what the
//! plugin cannot see: a namespace labelled (or a pod relabelled) while its
//! pods run, a label removed, a pod opted out with `dataplane-mode=none`,
//! and an agent restart or node reboot, after which every member is
//! enrolled again (enroll is idempotent and repairs rules).
//!
//! Release is deliberately narrower than enroll: a pod is released only when
//! the API says it is not a member, is finished, or was deleted after we saw
//! it. A pod the plugin has just enrolled but the API does not show as
//! Running yet (or at all yet: watch lag) must be left alone.
//!
//! Each enroll or release runs as its own task, so one pod that cannot be
//! enrolled (its namespace gone, ztunnel refusing it) never blocks the
//! others; failures are retried with backoff and logged with the pod's name.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use kube::runtime::reflector::{self, store::Writer, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::enroll::{EnrollError, Enroller, PodInfo};
use super::netns;
use crate::membership::{membership, Membership, PodFacts};

/// The first retry of a failed enroll or release comes after this…
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// …doubling up to this.
const RETRY_MAX: Duration = Duration::from_secs(16);

/// What the driver needs of the enroller; the real one is [`Enroller`], tests
/// may record calls instead.
pub trait PodEnroller: Send + Sync + 'static {
    /// See [`Enroller::enroll`].
    fn enroll(&self, pod: PodInfo) -> impl Future<Output = Result<(), EnrollError>> + Send;
    /// See [`Enroller::release`].
    fn release(&self, uid: String) -> impl Future<Output = Result<(), EnrollError>> + Send;
    /// See [`Enroller::enrolled`].
    fn enrolled(&self) -> Vec<PodInfo>;
}

impl PodEnroller for Enroller {
    fn enroll(&self, pod: PodInfo) -> impl Future<Output = Result<(), EnrollError>> + Send {
        Enroller::enroll(self, pod)
    }

    async fn release(&self, uid: String) -> Result<(), EnrollError> {
        Enroller::release(self, &uid).await
    }

    fn enrolled(&self) -> Vec<PodInfo> {
        Enroller::enrolled(self)
    }
}

/// What the diff needs to know of one pod of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
    /// `status.podIPs` (or `status.podIP`).
    pub ips: Vec<IpAddr>,
    /// `status.phase` is `Running`.
    pub running: bool,
    /// `status.phase` is `Succeeded` or `Failed`: its sandbox is going away.
    pub finished: bool,
    /// Membership from labels.
    pub membership: Membership,
}

impl PodView {
    /// Reads a pod, with its namespace's labels; `None` without a uid.
    pub fn new(pod: &Pod, namespace_labels: &BTreeMap<String, String>) -> Option<PodView> {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref());
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse::<IpAddr>().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse::<IpAddr>().ok()));
        }
        let facts = PodFacts {
            namespace_labels,
            pod_labels: pod.labels(),
            pod_annotations: pod.annotations(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        };
        Some(PodView {
            uid: pod.metadata.uid.clone()?,
            name: pod.name_any(),
            namespace: pod.namespace().unwrap_or_default(),
            service_account: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
            ips,
            running: phase == Some("Running"),
            finished: matches!(phase, Some("Succeeded" | "Failed")),
            membership: membership(facts),
        })
    }

    /// Should be enrolled now: a running member with an IP.
    fn enrollable(&self) -> bool {
        self.membership.enrolled() && self.running && !self.ips.is_empty()
    }

    /// Must not stay enrolled: not a member, or finished.
    fn must_leave(&self) -> bool {
        !self.membership.enrolled() || self.finished
    }
}

/// A failed enroll or release, to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Failures so far.
    pub attempts: u32,
    /// Not before this.
    pub due: Instant,
}

/// The driver's memory between passes.
#[derive(Debug, Default)]
pub struct Tracking {
    /// Pods the watch has shown since start (a pod absent now and seen
    /// before was deleted; one never seen may be in watch lag).
    pub seen: BTreeSet<String>,
    /// Pods with an enroll or release running.
    pub in_flight: BTreeSet<String>,
    /// Pods whose last enroll or release failed.
    pub retry: BTreeMap<String, Retry>,
}

impl Tracking {
    fn due(&self, uid: &str, now: Instant) -> bool {
        !self.in_flight.contains(uid) && self.retry.get(uid).is_none_or(|r| r.due <= now)
    }
}

/// What one pass does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Pods to enroll (uids).
    pub enroll: Vec<String>,
    /// Pods to release (uids).
    pub release: Vec<String>,
}

/// The membership diff. `reconcile` is the first pass after the watches
/// listed: every member is enrolled again, and enrolled pods the API does
/// not know at all are released. Pods busy or waiting for a retry are left
/// for later.
pub fn plan(
    pods: &BTreeMap<String, PodView>,
    enrolled: &BTreeSet<String>,
    track: &Tracking,
    reconcile: bool,
    now: Instant,
) -> Plan {
    let mut out = Plan::default();
    for (uid, pod) in pods {
        let again = reconcile || !enrolled.contains(uid) || track.retry.contains_key(uid);
        if pod.enrollable() && again && track.due(uid, now) {
            out.enroll.push(uid.clone());
        }
    }
    for uid in enrolled {
        let leave = match pods.get(uid) {
            Some(pod) => pod.must_leave(),
            None => reconcile || track.seen.contains(uid),
        };
        if leave && track.due(uid, now) {
            out.release.push(uid.clone());
        }
    }
    out
}

/// How long to wait after the `attempts`-th failure.
pub fn backoff(attempts: u32) -> Duration {
    RETRY_FIRST.saturating_mul(1 << attempts.saturating_sub(1).min(16)).min(RETRY_MAX)
}

/// What the watcher tasks tell the loop.
#[derive(Debug)]
enum Signal {
    Changed,
    /// A kind's first list is complete.
    Ready(&'static str),
}

/// An enroll or release that finished.
#[derive(Debug)]
struct Outcome {
    uid: String,
    /// `namespace/name`, for the log.
    pod: String,
    op: &'static str,
    result: Result<(), String>,
}

/// Watches this node's pods and every namespace and enrolls and releases
/// pods until the returned future is dropped. `proc_root` is `/proc` (where
/// running pods' namespaces are found).
pub async fn run<E: PodEnroller>(client: kube::Client, node: String, enroller: Arc<E>, proc_root: PathBuf) {
    let (signal_tx, mut signals) = mpsc::unbounded_channel();
    let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let (pods, pods_task) = spawn_reflector(Api::<Pod>::all(client.clone()), on_node, "Pod", signal_tx.clone());
    let (namespaces, ns_task) =
        spawn_reflector(Api::<Namespace>::all(client), watcher::Config::default(), "Namespace", signal_tx);
    let _abort = AbortOnDrop(vec![pods_task, ns_task]);
    let mut ready = HashSet::new();
    let mut reconciled = false;
    let mut track = Tracking::default();
    let mut tasks = JoinSet::new(); // dropped with the loop: aborts what runs
    loop {
        let next_retry = track.retry.values().map(|r| r.due).min();
        tokio::select! {
            s = signals.recv() => {
                let Some(s) = s else { return };
                note(s, &mut ready);
                while let Ok(s) = signals.try_recv() {
                    note(s, &mut ready);
                }
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                Ok(outcome) => finished(&mut track, outcome),
                Err(e) => tracing::error!(error = %e, "bug: an enroll task panicked"),
            },
            () = sleep_until(next_retry), if next_retry.is_some() => {}
        }
        if ready.len() < 2 {
            continue; // a partial view would release pods of namespaces not listed yet
        }
        let views = views(&pods, &namespaces);
        let enrolled: BTreeMap<String, PodInfo> = enroller.enrolled().into_iter().map(|p| (p.uid.clone(), p)).collect();
        let enrolled_uids = enrolled.keys().cloned().collect();
        let plan = plan(&views, &enrolled_uids, &track, !reconciled, Instant::now());
        if !reconciled {
            tracing::info!(
                pods = views.len(),
                enrolled = enrolled.len(),
                enroll = plan.enroll.len(),
                release = plan.release.len(),
                "reconciling this node's pods"
            );
            reconciled = true;
        }
        track.seen.extend(views.keys().cloned());
        track.seen.retain(|u| views.contains_key(u) || enrolled.contains_key(u) || track.in_flight.contains(u));
        track.retry.retain(|u, _| views.contains_key(u) || enrolled.contains_key(u));
        for uid in plan.enroll {
            let view = views[&uid].clone();
            let known = enrolled.get(&uid).map(|p| p.netns.clone());
            track.in_flight.insert(uid);
            tasks.spawn(enroll_one(enroller.clone(), view, known, proc_root.clone()));
        }
        for uid in plan.release {
            let pod = views
                .get(&uid)
                .map(|v| format!("{}/{}", v.namespace, v.name))
                .or_else(|| enrolled.get(&uid).map(|p| format!("{}/{}", p.namespace, p.name)));
            track.in_flight.insert(uid.clone());
            let e = enroller.clone();
            tasks.spawn(async move {
                let result = e.release(uid.clone()).await.map_err(|e| e.to_string());
                Outcome { uid, pod: pod.unwrap_or_default(), op: "release", result }
            });
        }
    }
}

fn note(s: Signal, ready: &mut HashSet<&'static str>) {
    if let Signal::Ready(kind) = s {
        ready.insert(kind);
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Records a finished enroll or release: clears or schedules its retry.
fn finished(track: &mut Tracking, o: Outcome) {
    track.in_flight.remove(&o.uid);
    match o.result {
        Ok(()) => {
            track.retry.remove(&o.uid);
            let done = if o.op == "enroll" { "pod enrolled" } else { "pod released" };
            tracing::info!(pod = %o.pod, uid = %o.uid, "{done}");
        }
        Err(error) => {
            let attempts = track.retry.get(&o.uid).map_or(0, |r| r.attempts) + 1;
            let wait = backoff(attempts);
            track.retry.insert(o.uid.clone(), Retry { attempts, due: Instant::now() + wait });
            tracing::warn!(pod = %o.pod, uid = %o.uid, %error, attempts, retry_in = ?wait, "{} failed", o.op);
        }
    }
}

/// Enrolls one pod: its namespace is the one the enroller already knows
/// (after a restart) if that still exists, else found by IP.
async fn enroll_one<E: PodEnroller>(e: Arc<E>, view: PodView, known: Option<PathBuf>, proc_root: PathBuf) -> Outcome {
    let pod = format!("{}/{}", view.namespace, view.name);
    let ips = view.ips.clone();
    let found = tokio::task::spawn_blocking(move || match known.filter(|p| Path::new(p).exists()) {
        Some(path) => std::fs::File::open(&path)
            .map(|handle| (path.clone(), handle))
            .map_err(|e| format!("open {}: {e}", path.display())),
        None => netns::find_by_ips(&proc_root, &ips).map(|n| (n.path, n.handle)).map_err(|e| e.to_string()),
    })
    .await;
    let result = match found {
        Ok(Ok((netns, handle))) => {
            let info = PodInfo {
                uid: view.uid.clone(),
                name: view.name,
                namespace: view.namespace,
                service_account: view.service_account,
                netns,
                ips: view.ips,
            };
            let r = e.enroll(info).await.map_err(|e| e.to_string());
            drop(handle); // held until ztunnel has the namespace
            r
        }
        Ok(Err(e)) => Err(e),
        Err(e) => Err(format!("bug: namespace lookup panicked: {e}")),
    };
    Outcome { uid: view.uid, pod, op: "enroll", result }
}

/// The node's pods as the diff sees them.
fn views(pods: &Store<Pod>, namespaces: &Store<Namespace>) -> BTreeMap<String, PodView> {
    let empty = BTreeMap::new();
    pods.state()
        .iter()
        .filter_map(|pod| {
            let ns = namespaces.get(&ObjectRef::new(&pod.namespace().unwrap_or_default()));
            let labels = ns.as_deref().map_or(&empty, |n| n.labels());
            PodView::new(pod, labels)
        })
        .map(|v| (v.uid.clone(), v))
        .collect()
}

/// Aborts the watcher tasks when the driver stops.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Runs one reflector in a task; errors are logged and retried with backoff.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: &'static str,
    signal: mpsc::UnboundedSender<Signal>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let writer = Writer::<K>::default();
    let store = writer.as_reader();
    let task = tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
        futures::pin_mut!(stream);
        let mut last_error = None::<String>;
        while let Some(item) = stream.next().await {
            let sent = match item {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue, // the store swaps at InitDone
                Ok(watcher::Event::InitDone) => {
                    last_error = None;
                    signal.send(Signal::Ready(kind))
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => signal.send(Signal::Changed),
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_ref() != Some(&msg) {
                        tracing::warn!(kind, error = %msg, "watch failed; retrying with backoff");
                        last_error = Some(msg);
                    }
                    continue;
                }
            };
            if sent.is_err() {
                return; // the driver is gone
            }
        }
    });
    (store, task)
}

#[cfg(test)]
#[path = "kube_tests.rs"]
mod tests;
