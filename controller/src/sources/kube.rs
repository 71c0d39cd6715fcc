//! The Kubernetes source: reflectors (watch + in-memory store) for every kind the model reads. Each change, after a
//! short debounce that batches bursts, rebuilds the model from the stores and publishes the snapshot if its resources
//! changed, as the file source does. Istio policies, VirtualServices and TrafficSplits get status conditions saying
//! whether and how they were used (`policy_status`); HTTPRoutes and GRPCRoutes (model kinds: the waypoint's routes)
//! and GatewayClasses (read only for their status) get theirs (`route_status`), written after every batch, without a
//! model build when only GatewayClasses changed (`kube_status`).
//!
//! A custom resource whose CRD is not installed must not stop the mesh: its watcher logs once, counts as an empty
//! kind, and keeps retrying with backoff, so installing the CRD later is picked up.

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Resource;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;

use super::kube_status::StatusWriter;
use super::kube_stores::{
    BuildOutcome, Crd, ModelFacts, PolicyKey, Signal, Stores, AUTHORIZATION_POLICY, DESTINATION_RULE, GATEWAY,
    GATEWAY_CLASS, PEER_AUTHENTICATION, REFERENCE_GRANT, ROUTES, TRAFFIC_SPLIT, VIRTUAL_SERVICE,
};
use crate::model::crd::Resource as CrdResource;
use crate::model::reference_grant::Grants;
use crate::model::{self, ClusterObject, ClusterObjects, ModelOptions, Rejection, RejectionSink, SnapshotTx};

/// How long to wait after a change for more before rebuilding.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(50);

/// Why a Kubernetes client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// The kubeconfig is unreadable or invalid.
    #[error("cannot load kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: kube::config::KubeconfigError,
    },
    /// The client cannot be built from the configuration (TLS settings…).
    #[error("cannot create the kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the cluster (and credentials) of the kubeconfig at `path`, in its current context.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, KubeSourceError> {
    let err = |source| KubeSourceError::Kubeconfig { path: path.to_owned(), source };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(err)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(err)?;
    Ok(kube::Client::try_from(config)?)
}

/// Every kind watched; the model is published only once each has listed (or is known to be absent).
const KINDS: [&str; 13] = [
    "Namespace",
    "Pod",
    "Service",
    "EndpointSlice",
    AUTHORIZATION_POLICY.kind,
    PEER_AUTHENTICATION.kind,
    GATEWAY.kind,
    ROUTES[0].kind,
    ROUTES[1].kind,
    REFERENCE_GRANT.kind,
    VIRTUAL_SERVICE.kind,
    TRAFFIC_SPLIT.kind,
    DESTINATION_RULE.kind,
];

/// Aborts the watcher tasks when the source stops.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Builds the model from a Kubernetes API server, and keeps it current.
#[derive(Clone)]
pub struct KubeSource {
    client: kube::Client,
    opts: ModelOptions,
    debounce: Duration,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").field("opts", &self.opts).field("debounce", &self.debounce).finish()
    }
}

impl KubeSource {
    /// A source reading the cluster of `client` (all namespaces).
    pub fn new(client: kube::Client, opts: ModelOptions) -> Self {
        Self { client, opts, debounce: DEFAULT_DEBOUNCE }
    }

    /// Changes the debounce delay.
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Watches the cluster until every receiver of `tx` is gone. Each batch of changes rebuilds the model, reports
    /// the rejections to `rejections` when they differ from the last report (status writes of our own trigger
    /// rebuilds too, and must not repeat the report), publishes the snapshot if its resources changed (version one
    /// above the published one), and writes the conditions that changed of policies, VirtualServices and
    /// TrafficSplits; after every batch, the Gateway API status that changed.
    pub async fn run(self, tx: SnapshotTx, rejections: RejectionSink) {
        let (signal_tx, mut signals) = mpsc::unbounded_channel();
        let (stores, _tasks) = self.spawn_watchers(&signal_tx);
        let mut ready = HashSet::new();
        let mut last_rejections = None::<Vec<Rejection>>;
        let mut status = StatusWriter::new(self.client.clone(), signal_tx.clone());
        // What the last build decided about routes, for their status.
        let mut facts = ModelFacts::default();
        // Whether a model kind changed since the last build; status-only changes skip the build.
        let mut rebuild = false;
        loop {
            // Wait for a change, then for the burst to settle.
            let first = tokio::select! {
                s = signals.recv() => s,
                () = tx.closed() => return,
            };
            let Some(first) = first else { return };
            rebuild |= note_signal(first, &mut ready);
            let settle = tokio::time::sleep(self.debounce);
            tokio::pin!(settle);
            loop {
                tokio::select! {
                    () = &mut settle => break,
                    s = signals.recv() => match s {
                        Some(s) => rebuild |= note_signal(s, &mut ready),
                        None => return,
                    },
                }
            }
            if !KINDS.iter().all(|k| ready.contains(k)) {
                continue; // a partial model would withdraw workloads from every ztunnel
            }
            if rebuild {
                rebuild = false;
                if let Some(f) = self.build(&stores, &tx, &rejections, &mut last_rejections, &mut status).await {
                    facts = f;
                }
            }
            // A Gateway, Service or namespace may change whose a route's parent is: after every batch.
            status.sync_gateway_api(&stores, &facts).await;
        }
    }

    /// Builds the model from the stores, reports new rejections, publishes the snapshot if its resources changed,
    /// and writes the conditions of policies, VirtualServices and TrafficSplits; returns what route status needs
    /// (`None` if the build failed).
    async fn build(
        &self,
        stores: &Stores,
        tx: &SnapshotTx,
        rejections: &RejectionSink,
        last_rejections: &mut Option<Vec<Rejection>>,
        status: &mut StatusWriter,
    ) -> Option<ModelFacts> {
        let started = std::time::Instant::now();
        let next = tx.borrow().version + 1;
        let (objects, mut rejected, crd_keys) = collect(stores);
        let grants = Grants::new(objects.reference_grants.iter().map(|((ns, _), g)| (ns.as_str(), &g.spec)));
        let opts = self.opts.clone();
        let built = tokio::task::spawn_blocking(move || {
            let report = model::build_report(&objects, &opts, next);
            rejected.extend(report.rejections);
            let outcome = BuildOutcome {
                warnings: report.warnings,
                bindings: report.policy_bindings,
                mesh_routes_applied: report.mesh_routes_applied,
            };
            (report.snapshot, rejected, report.waypoint_services, outcome)
        })
        .await;
        let (snapshot, rejected, served, outcome) = match built {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "bug: model build panicked");
                return None;
            }
        };
        if last_rejections.as_ref() != Some(&rejected) {
            for w in &outcome.warnings {
                tracing::warn!(kind = %w.kind, namespace = %w.namespace, name = %w.name, reason = %w.reason, "partly applied");
            }
            rejections(&rejected);
            *last_rejections = Some(rejected.clone());
        }
        let changed = tx.send_if_modified(|current| {
            if current.same_content(&snapshot) {
                return false;
            }
            *current = Arc::new(snapshot);
            true
        });
        if changed {
            let version = tx.borrow().version;
            tracing::info!(version, rejected = rejected.len(), took = ?started.elapsed(), "cluster model published");
        }
        status.sync_policies(stores, &crd_keys, &rejected, &outcome).await;
        let invalid = rejected
            .iter()
            .filter(|r| ROUTES.iter().any(|c| c.kind == r.kind))
            .map(|r| ((r.kind.clone(), r.namespace.clone(), r.name.clone()), r.reason.clone()))
            .collect();
        Some(ModelFacts { served: served.into_iter().collect(), invalid, grants })
    }

    fn spawn_watchers(&self, signal: &mpsc::UnboundedSender<Signal>) -> (Stores, Tasks) {
        let c = &self.client;
        let mut tasks = Vec::new();
        let namespaces = spawn_typed::<Namespace>(c, "Namespace", signal, &mut tasks);
        let pods = spawn_typed::<Pod>(c, "Pod", signal, &mut tasks);
        let services = spawn_typed::<Service>(c, "Service", signal, &mut tasks);
        let endpoint_slices = spawn_typed::<EndpointSlice>(c, "EndpointSlice", signal, &mut tasks);
        let policies = spawn_dynamic(c, AUTHORIZATION_POLICY, signal, &mut tasks);
        let peer_auths = spawn_dynamic(c, PEER_AUTHENTICATION, signal, &mut tasks);
        let gateways = spawn_dynamic(c, GATEWAY, signal, &mut tasks);
        let gateway_classes = spawn_status_input(c, GATEWAY_CLASS, signal, &mut tasks);
        let http_routes = spawn_dynamic(c, ROUTES[0], signal, &mut tasks);
        let grpc_routes = spawn_dynamic(c, ROUTES[1], signal, &mut tasks);
        let reference_grants = spawn_dynamic(c, REFERENCE_GRANT, signal, &mut tasks);
        let virtual_services = spawn_dynamic(c, VIRTUAL_SERVICE, signal, &mut tasks);
        let traffic_splits = spawn_dynamic(c, TRAFFIC_SPLIT, signal, &mut tasks);
        let destination_rules = spawn_dynamic(c, DESTINATION_RULE, signal, &mut tasks);
        let stores = Stores {
            namespaces,
            pods,
            services,
            endpoint_slices,
            policies,
            peer_auths,
            gateways,
            gateway_classes,
            http_routes,
            grpc_routes,
            reference_grants,
            virtual_services,
            traffic_splits,
            destination_rules,
        };
        (stores, Tasks(tasks))
    }
}

/// Notes a kind's readiness; true when the signal calls for a model build.
fn note_signal(s: Signal, ready: &mut HashSet<&'static str>) -> bool {
    match s {
        Signal::Ready(kind) => {
            ready.insert(kind);
            true
        }
        Signal::Changed => true,
        Signal::StatusInput => false,
    }
}

fn spawn_typed<K>(
    client: &kube::Client,
    kind: &'static str,
    signal: &mpsc::UnboundedSender<Signal>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let writer = Writer::<K>::default();
    let store = writer.as_reader();
    tasks.push(tokio::spawn(watch(Api::all(client.clone()), writer, kind, signal.clone(), Signal::Changed)));
    store
}

fn spawn_dynamic(
    client: &kube::Client,
    crd: Crd,
    signal: &mpsc::UnboundedSender<Signal>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<DynamicObject> {
    spawn_crd(client, crd, signal, Signal::Changed, tasks)
}

/// A kind read only for status writes: its changes do not rebuild the model, and the model does not wait for it.
fn spawn_status_input(
    client: &kube::Client,
    crd: Crd,
    signal: &mpsc::UnboundedSender<Signal>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<DynamicObject> {
    spawn_crd(client, crd, signal, Signal::StatusInput, tasks)
}

fn spawn_crd(
    client: &kube::Client,
    crd: Crd,
    signal: &mpsc::UnboundedSender<Signal>,
    on_change: Signal,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Store<DynamicObject> {
    let ar = crd.api_resource();
    let writer = Writer::<DynamicObject>::new(ar.clone());
    let store = writer.as_reader();
    let api = Api::all_with(client.clone(), &ar);
    tasks.push(tokio::spawn(watch(api, writer, crd.kind, signal.clone(), on_change)));
    store
}

/// Runs one reflector until the build loop is gone; errors are logged and retried with backoff. Changes are
/// signalled as `on_change`; only model kinds ([`Signal::Changed`]) signal readiness.
async fn watch<K>(
    api: Api<K>,
    writer: Writer<K>,
    kind: &'static str,
    signal: mpsc::UnboundedSender<Signal>,
    on_change: Signal,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()).default_backoff());
    futures::pin_mut!(stream);
    let mut absent = false;
    let mut last_error = None::<String>;
    let model_kind = matches!(on_change, Signal::Changed);
    let ready = || if model_kind { signal.send(Signal::Ready(kind)) } else { Ok(()) };
    while let Some(item) = stream.next().await {
        let sent = match item {
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue, // the store swaps at InitDone
            Ok(watcher::Event::InitDone) => {
                if absent {
                    tracing::info!(kind, "resource is now served; watching it");
                }
                absent = false;
                last_error = None;
                ready().and_then(|()| signal.send(on_change))
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => signal.send(on_change),
            Err(e) if is_not_found(&e) => {
                if !absent {
                    tracing::warn!(kind, "resource not served (CRD not installed?); treating it as empty and retrying");
                    absent = true;
                }
                ready()
            }
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
            return; // the build loop ended
        }
    }
}

/// Whether the resource is not served. An unknown API path answers a plain-text 404 that kube-rs wraps in a `Status`
/// whose reason is not `NotFound`, so the code decides.
fn is_not_found(e: &watcher::Error) -> bool {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s,
        _ => return false,
    };
    status.code == 404 || status.is_not_found()
}

/// Copies the stores into [`ClusterObjects`]. Custom resources that do not match the model's schema are rejected
/// here; the keys of all Istio policies, VirtualServices and TrafficSplits seen are returned for their status
/// conditions.
fn collect(stores: &Stores) -> (ClusterObjects, Vec<Rejection>, Vec<PolicyKey>) {
    let mut objects = ClusterObjects::default();
    let mut rejections = Vec::new();
    for o in stores.namespaces.state() {
        objects.insert(ClusterObject::Namespace(Box::new((*o).clone())));
    }
    for o in stores.pods.state() {
        objects.insert(ClusterObject::Pod(Box::new((*o).clone())));
    }
    for o in stores.services.state() {
        objects.insert(ClusterObject::Service(Box::new((*o).clone())));
    }
    for o in stores.endpoint_slices.state() {
        objects.insert(ClusterObject::EndpointSlice(Box::new((*o).clone())));
    }
    let mut keys = Vec::new();
    for o in stores.policies.state() {
        keys.push(policy_key(AUTHORIZATION_POLICY.kind, &o));
        if let Some(t) = typed(&o, AUTHORIZATION_POLICY, &mut rejections) {
            objects.insert(ClusterObject::AuthorizationPolicy(Box::new(t)));
        }
    }
    for o in stores.peer_auths.state() {
        keys.push(policy_key(PEER_AUTHENTICATION.kind, &o));
        if let Some(t) = typed(&o, PEER_AUTHENTICATION, &mut rejections) {
            objects.insert(ClusterObject::PeerAuthentication(Box::new(t)));
        }
    }
    for o in stores.gateways.state() {
        if let Some(t) = typed(&o, GATEWAY, &mut rejections) {
            objects.insert(ClusterObject::Gateway(Box::new(t)));
        }
    }
    for o in stores.http_routes.state() {
        if let Some(t) = typed(&o, ROUTES[0], &mut rejections) {
            objects.insert(ClusterObject::HttpRoute(Box::new(t)));
        }
    }
    for o in stores.grpc_routes.state() {
        if let Some(t) = typed(&o, ROUTES[1], &mut rejections) {
            objects.insert(ClusterObject::GrpcRoute(Box::new(t)));
        }
    }
    for o in stores.reference_grants.state() {
        if let Some(t) = typed(&o, REFERENCE_GRANT, &mut rejections) {
            objects.insert(ClusterObject::ReferenceGrant(Box::new(t)));
        }
    }
    for o in stores.virtual_services.state() {
        keys.push(policy_key(VIRTUAL_SERVICE.kind, &o));
        if let Some(t) = typed(&o, VIRTUAL_SERVICE, &mut rejections) {
            objects.insert(ClusterObject::VirtualService(Box::new(t)));
        }
    }
    for o in stores.traffic_splits.state() {
        keys.push(policy_key(TRAFFIC_SPLIT.kind, &o));
        if let Some(t) = typed(&o, TRAFFIC_SPLIT, &mut rejections) {
            objects.insert(ClusterObject::TrafficSplit(Box::new(t)));
        }
    }
    for o in stores.destination_rules.state() {
        keys.push(policy_key(DESTINATION_RULE.kind, &o));
        if let Some(t) = typed(&o, DESTINATION_RULE, &mut rejections) {
            objects.insert(ClusterObject::DestinationRule(Box::new(t)));
        }
    }
    (objects, rejections, keys)
}

fn policy_key(kind: &'static str, o: &DynamicObject) -> PolicyKey {
    (kind, o.metadata.namespace.clone().unwrap_or_default(), o.metadata.name.clone().unwrap_or_default())
}

/// Converts a dynamic object to the model's serde type (the same strict schema the file source applies).
fn typed<S: DeserializeOwned + Default>(
    o: &DynamicObject,
    crd: Crd,
    rejections: &mut Vec<Rejection>,
) -> Option<CrdResource<S>> {
    let result = serde_json::to_value(o).and_then(|mut v| {
        // List items may lack apiVersion/kind; the watch knows them.
        v["apiVersion"] = Value::String(format!("{}/{}", crd.group, crd.version));
        v["kind"] = Value::String(crd.kind.into());
        serde_json::from_value(v)
    });
    match result {
        Ok(t) => Some(t),
        Err(e) => {
            rejections.push(Rejection {
                kind: crd.kind.into(),
                namespace: o.metadata.namespace.clone().unwrap_or_default(),
                name: o.metadata.name.clone().unwrap_or_default(),
                reason: e.to_string(),
            });
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(yaml: &str) -> DynamicObject {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_policy_with_an_unknown_action_is_rejected_by_name() {
        let o = dynamic(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: ns1}\n\
             spec: {action: BOGUS}\n",
        );
        let mut rejections = Vec::new();
        let t: Option<model::crd::AuthorizationPolicy> = typed(&o, AUTHORIZATION_POLICY, &mut rejections);
        assert!(t.is_none());
        assert_eq!(rejections.len(), 1);
        assert_eq!((rejections[0].namespace.as_str(), rejections[0].name.as_str()), ("ns1", "bad"));
        assert!(rejections[0].reason.contains("BOGUS"), "{}", rejections[0].reason);
    }

    #[test]
    fn a_list_item_without_type_meta_converts() {
        // Items of a list response carry no apiVersion/kind.
        let mut o = dynamic(
            "metadata: {name: p, namespace: ns1, generation: 2}\nspec: {action: DENY, rules: [{}]}\n\
             status: {conditions: []}\n",
        );
        o.types = None;
        let mut rejections = Vec::new();
        let t: model::crd::AuthorizationPolicy = typed(&o, AUTHORIZATION_POLICY, &mut rejections).unwrap();
        assert!(rejections.is_empty(), "{rejections:?}");
        assert_eq!(t.spec.action, model::crd::AuthorizationAction::Deny);
        assert_eq!(t.kind, "AuthorizationPolicy");
    }

    #[test]
    fn a_virtual_service_with_a_field_ambit_does_not_apply_is_rejected_naming_it() {
        let o = dynamic(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: cors, namespace: ns1}\n\
             spec:\n  hosts: [reviews]\n  http:\n  - corsPolicy: {allowOrigins: [{exact: x}]}\n    \
             route: [{destination: {host: reviews}}]\n",
        );
        let mut rejections = Vec::new();
        let t: Option<model::mesh_route_crd::VirtualService> = typed(&o, VIRTUAL_SERVICE, &mut rejections);
        assert!(t.is_none());
        assert_eq!((rejections[0].kind.as_str(), rejections[0].name.as_str()), ("VirtualService", "cors"));
        assert!(rejections[0].reason.contains("corsPolicy"), "{}", rejections[0].reason);
    }

    #[test]
    fn a_traffic_split_list_item_converts_at_the_watched_version() {
        let mut o = dynamic(
            "metadata: {name: split, namespace: ns1}\n\
             spec: {service: web, backends: [{service: web-v1, weight: 90}, {service: web-v2, weight: 10}]}\n",
        );
        o.types = None;
        let mut rejections = Vec::new();
        let t: model::mesh_route_crd::TrafficSplit = typed(&o, TRAFFIC_SPLIT, &mut rejections).unwrap();
        assert!(rejections.is_empty(), "{rejections:?}");
        assert_eq!((t.api_version.as_str(), t.kind.as_str()), ("split.smi-spec.io/v1alpha4", "TrafficSplit"));
        assert_eq!(t.spec.backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [90, 10]);
    }
}
