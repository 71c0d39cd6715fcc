//! The mesh model: cluster objects ([`ClusterObjects`]) in, one consistent,
//! versioned [`Snapshot`] of xDS resources out, with Istio ambient semantics.
//! Invalid objects are rejected one by one ([`Rejection`]); they never stop
//! the rest of the build.

pub mod authz;
pub mod authz_l7;
pub mod crd;
pub mod destination_rule;
pub mod index;
pub mod mesh_route_convert;
pub mod mesh_route_crd;
pub mod mesh_route_tcp;
pub mod mesh_routes;
pub mod objects;
pub mod parse;
pub mod peer_auth;
pub mod reference_grant;
pub mod route_convert;
pub mod route_crd;
pub mod routes;
pub mod services;
pub mod unsupported;
pub mod waypoint;
pub mod waypoint_policy;
pub mod waypoint_scope;
pub mod workloads;

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod waypoint_tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ambit_api::security::Authorization;
use ambit_api::waypoint::{AuthorizationPolicy as WaypointPolicy, ServiceRoutes};
use ambit_api::workload::{address, Address};

pub use objects::{ClusterObject, ClusterObjects, ObjectKey};
pub use parse::parse_documents;
pub use waypoint::{waypoints, WaypointGateway};
pub use waypoint_scope::WaypointScope;

/// One consistent, versioned view of the mesh, as xDS resources.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    /// Increases by one for every change.
    pub version: u64,
    /// `istio.workload.Address` resources by xDS name: a workload's uid, or "namespace/hostname" for a service.
    pub addresses: BTreeMap<String, Address>,
    /// `istio.security.Authorization` resources by xDS name "namespace/name".
    pub authorizations: BTreeMap<String, Authorization>,
    /// Which identities run on which node: node name → set of (namespace, service account). The CA signs an identity
    /// for a caller only if it runs on the caller's node.
    pub identities_by_node: BTreeMap<String, BTreeSet<(String, String)>>,
    /// `ambit.waypoint.v1.ServiceRoutes` by xDS name "namespace/hostname": the services that have a waypoint.
    pub service_routes: BTreeMap<String, ServiceRoutes>,
    /// `ambit.waypoint.v1.AuthorizationPolicy` by xDS name "namespace/name": policies bound by `targetRefs`.
    pub waypoint_policies: BTreeMap<String, WaypointPolicy>,
    /// What each waypoint Gateway `(namespace, name)` is sent.
    pub waypoints: BTreeMap<ObjectKey, WaypointScope>,
}

impl Snapshot {
    /// Whether both hold the same resources, whatever their versions.
    pub fn same_content(&self, other: &Snapshot) -> bool {
        self.addresses == other.addresses
            && self.authorizations == other.authorizations
            && self.identities_by_node == other.identities_by_node
            && self.service_routes == other.service_routes
            && self.waypoint_policies == other.waypoint_policies
            && self.waypoints == other.waypoints
    }

    /// Whether it holds no resource.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
            && self.authorizations.is_empty()
            && self.identities_by_node.is_empty()
            && self.service_routes.is_empty()
            && self.waypoint_policies.is_empty()
    }
}

/// Published snapshots; xDS and the CA read the latest.
pub type SnapshotRx = tokio::sync::watch::Receiver<std::sync::Arc<Snapshot>>;
/// The publishing side of [`SnapshotRx`].
pub type SnapshotTx = tokio::sync::watch::Sender<std::sync::Arc<Snapshot>>;

/// Mesh-wide settings the model needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelOptions {
    /// SPIFFE trust domain of workload identities.
    pub trust_domain: String,
    /// Namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// Cluster id, the first part of workload uids.
    pub cluster_id: String,
    /// Cluster DNS suffix of service hostnames.
    pub domain_suffix: String,
    /// Istio's implicit allow-from-waypoint policy for the workloads a
    /// waypoint serves ([`waypoint_policy`]).
    pub auto_allow_waypoint_policy: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            root_namespace: "ambit-system".into(),
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            auto_allow_waypoint_policy: false,
        }
    }
}

/// An object left out of the model, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Kind (`Pod`, `AuthorizationPolicy`…; `File` for unparsable text).
    pub kind: String,
    /// Namespace ("" for cluster-scoped objects and files).
    pub namespace: String,
    /// Name (the file name for unparsable text).
    pub name: String,
    /// Why.
    pub reason: String,
}

/// An object used only in part (an L7 rule at L4, a missing waypoint…).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// Kind.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// What was left out, and the effect.
    pub reason: String,
}

/// Receives the rejections of every rebuild (logs, metrics, later status conditions).
pub type RejectionSink = std::sync::Arc<dyn Fn(&[Rejection]) + Send + Sync>;

/// Where a policy bound by `targetRefs` went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyBinding {
    /// The waypoints `namespace/name` that enforce it.
    pub waypoints: Vec<String>,
    /// What of it no waypoint enforces (an unsupported action or target), if anything.
    pub problem: Option<String>,
}

/// Everything one build produces.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BuildReport {
    /// The resources.
    pub snapshot: Snapshot,
    /// Objects left out.
    pub rejections: Vec<Rejection>,
    /// Objects used in part.
    pub warnings: Vec<Warning>,
    /// Services `(namespace, name)` a waypoint serves: routes attached to them apply.
    pub waypoint_services: BTreeSet<ObjectKey>,
    /// Valid AuthorizationPolicies with `targetRefs`, by key.
    pub policy_bindings: BTreeMap<ObjectKey, PolicyBinding>,
    /// VirtualServices and TrafficSplits `(kind, namespace, name)` attached to at least one service port of a
    /// waypoint. Their warnings say what was not applied.
    pub mesh_routes_applied: BTreeSet<(String, String, String)>,
}

/// Builds the snapshot of `objects` at `version`; warnings are logged.
pub fn build(objects: &ClusterObjects, opts: &ModelOptions, version: u64) -> (Snapshot, Vec<Rejection>) {
    let report = build_report(objects, opts, version);
    for w in &report.warnings {
        tracing::warn!(kind = %w.kind, namespace = %w.namespace, name = %w.name, reason = %w.reason, "partly applied");
    }
    (report.snapshot, report.rejections)
}

/// Builds the snapshot of `objects` at `version`, with rejections and warnings.
pub fn build_report(objects: &ClusterObjects, opts: &ModelOptions, version: u64) -> BuildReport {
    let mut report = BuildReport::default();
    let note = |kind: &str, key: &ObjectKey, reason: String| Rejection {
        kind: kind.into(),
        namespace: key.0.clone(),
        name: key.1.clone(),
        reason,
    };
    let warn = |kind: &str, key: &ObjectKey, reason: String| Warning {
        kind: kind.into(),
        namespace: key.0.clone(),
        name: key.1.clone(),
        reason,
    };
    let pods = index::PodIndex::new(objects, &mut report.rejections);
    let ns_labels: HashMap<&str, &BTreeMap<String, String>> =
        objects.namespaces.iter().filter_map(|((_, n), ns)| Some((n.as_str(), ns.metadata.labels.as_ref()?))).collect();
    let gateways = waypoints(objects, &opts.domain_suffix);
    let waypoint_index = waypoint::WaypointIndex::new(&gateways);
    let mut extras: Vec<workloads::Extras> = pods.pods.iter().map(|_| Default::default()).collect();
    let snap = &mut report.snapshot;
    snap.version = version;

    let mut targeted = Vec::new();
    for (key, p) in &objects.authorization_policies {
        if authz_l7::is_targeted(p) {
            match authz_l7::convert(p, &opts.domain_suffix) {
                Ok(c) => targeted.push((key, c)),
                Err(e) => report.rejections.push(note("AuthorizationPolicy", key, e.to_string())),
            }
            continue;
        }
        let converted = match authz::convert(p, &opts.root_namespace) {
            Ok(c) => c,
            Err(e) => {
                report.rejections.push(note("AuthorizationPolicy", key, e.to_string()));
                continue;
            }
        };
        report.warnings.extend(converted.warnings.into_iter().map(|w| warn("AuthorizationPolicy", key, w)));
        let Some(a) = converted.authorization else {
            continue;
        };
        let name = format!("{}/{}", key.0, key.1);
        if let Some(sel) = p.spec.selector.as_ref().filter(|s| !s.match_labels.is_empty()) {
            // A selector in the root namespace selects in every namespace.
            let in_ns = (key.0 != opts.root_namespace).then_some(key.0.as_str());
            for i in pods.select(in_ns, &sel.match_labels) {
                extras[i].policies.push(name.clone());
            }
        }
        snap.authorizations.insert(name, a);
    }

    let mut pa_rejected = Vec::new();
    let modes = peer_auth::NamespaceModes::new(&objects.peer_authentications, &opts.root_namespace, &mut pa_rejected);
    for (key, p) in objects.peer_authentications.iter().filter(|(_, p)| peer_auth::has_selector(p)) {
        let converted = match peer_auth::convert_selector(p, modes.effective(&key.0)) {
            Ok(c) => c,
            Err(e) => {
                pa_rejected.push((key, e));
                continue;
            }
        };
        report.warnings.extend(converted.warnings.into_iter().map(|w| warn("PeerAuthentication", key, w)));
        let Some(a) = converted.authorization else {
            continue;
        };
        let name = format!("{}/{}", a.namespace, a.name);
        let labels = p.spec.selector.as_ref().map(|s| &s.match_labels);
        for i in pods.select(Some(&key.0), labels.unwrap_or(&BTreeMap::new())) {
            extras[i].policies.push(name.clone());
        }
        snap.authorizations.insert(name, a);
    }
    pa_rejected.sort_by(|a, b| a.0.cmp(b.0));
    for (key, e) in pa_rejected {
        report.rejections.push(note("PeerAuthentication", key, e.to_string()));
    }
    for a in modes.strict_policies(pods.namespaces()) {
        snap.authorizations.insert(format!("{}/{}", a.namespace, a.name), a);
    }

    let slices = services::slices_by_service(&objects.endpoint_slices);
    let cx = services::Context {
        pods: &pods,
        waypoints: &waypoint_index,
        slices: &slices,
        domain_suffix: &opts.domain_suffix,
    };
    let mut vip_owner: HashMap<IpAddr, &ObjectKey> = HashMap::new();
    for (key, svc) in &objects.services {
        let model = match services::build(key, svc, ns_labels.get(key.0.as_str()).copied(), &cx) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => {
                report.rejections.push(note("Service", key, e.to_string()));
                continue;
            }
        };
        if let Some((ip, owner)) = model.vips.iter().find_map(|ip| vip_owner.get(ip).map(|o| (ip, o))) {
            let reason = format!("duplicate clusterIP {ip}: already used by service {}/{}", owner.0, owner.1);
            report.rejections.push(note("Service", key, reason));
            continue;
        }
        vip_owner.extend(model.vips.iter().map(|ip| (*ip, key)));
        report.warnings.extend(model.warnings.into_iter().map(|w| warn("Service", key, w)));
        for (i, ports) in model.endpoints {
            extras[i].services.insert(model.key.clone(), ports);
        }
        let addr = Address { r#type: Some(address::Type::Service(model.service)) };
        snap.addresses.insert(model.key, addr);
    }

    let implicit =
        opts.auto_allow_waypoint_policy.then(|| waypoint_policy::ImplicitPolicies::new(&gateways, &opts.trust_domain));
    for (v, extra) in pods.pods.iter().zip(extras) {
        let (mut w, warning) =
            workloads::build(v, extra, ns_labels.get(v.key.0.as_str()).copied(), &waypoint_index, opts);
        if let Some(implicit) = &implicit {
            implicit.attach(&mut w, &snap.addresses, &mut snap.authorizations);
        }
        if let Some(reason) = warning {
            report.warnings.push(warn("Pod", v.key, reason));
        }
        if v.captured {
            let ids = snap.identities_by_node.entry(w.node.clone()).or_default();
            ids.insert((w.namespace.clone(), w.service_account.clone()));
        }
        snap.addresses.insert(w.uid.clone(), Address { r#type: Some(address::Type::Workload(w)) });
    }
    waypoint_config(objects, opts, &gateways, targeted, &mut report);
    report
}

/// The waypoints' resources (routes, L7 policies, scopes), from the addresses already built.
fn waypoint_config(
    objects: &ClusterObjects,
    opts: &ModelOptions,
    gateways: &[WaypointGateway],
    targeted: Vec<(&ObjectKey, authz_l7::Converted)>,
    report: &mut BuildReport,
) {
    let mut routes = routes::build(objects, &report.snapshot.addresses, &opts.domain_suffix);
    mesh_routes::attach(objects, &report.snapshot.addresses, &opts.domain_suffix, &mut routes);
    report.rejections.extend(routes.rejections);
    report.warnings.extend(routes.warnings);
    report.waypoint_services = routes.waypoint_services;
    report.mesh_routes_applied = routes.mesh_routes_applied;
    let snap = &mut report.snapshot;
    snap.service_routes = routes.by_service;
    let mut problems = BTreeMap::new();
    for (key, c) in targeted {
        let sent = c.policy.is_some();
        if let Some(p) = c.policy {
            snap.waypoint_policies.insert(format!("{}/{}", key.0, key.1), p);
        }
        problems.insert(key.clone(), (c.problem, sent));
    }
    let (scopes, bound) =
        waypoint_scope::build(gateways, &snap.addresses, &snap.service_routes, &snap.waypoint_policies);
    snap.waypoints = scopes;
    for (key, (problem, sent)) in problems {
        let waypoints = bound.get(&format!("{}/{}", key.0, key.1)).into_iter().flatten();
        let waypoints: Vec<String> = waypoints.map(|(ns, name)| format!("{ns}/{name}")).collect();
        // Logged in both modes; in Kubernetes `WaypointAccepted` says it too.
        let unbound =
            (sent && waypoints.is_empty()).then(|| "no waypoint serves its targets: it has no effect".to_owned());
        for reason in problem.iter().cloned().chain(unbound) {
            let (namespace, name) = key.clone();
            report.warnings.push(Warning { kind: "AuthorizationPolicy".into(), namespace, name, reason });
        }
        report.policy_bindings.insert(key, PolicyBinding { waypoints, problem });
    }
}
