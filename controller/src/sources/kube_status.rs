//! Status writes of the Kubernetes source, on objects other people own: the conditions of Istio policies,
//! VirtualServices and TrafficSplits ([`policy_status`]), Gateway API routes' parent entries and waypoint
//! GatewayClasses' conditions ([`route_status`]). Each is computed by a pure function and written only when it
//! differs from what the object carries, so the source's own writes (which come back as watch events) do not make it
//! loop.
//!
//! Writes are JSON merge patches through the status subresource under the field manager `ambit-controller`, not
//! server-side apply: these status lists are atomic for server-side apply (`status.parents` of the Gateway API CRDs
//! has no list-map keys), so applying Ambit's entries alone would drop other controllers' entries. A route's
//! patch carries the resourceVersion it was computed from, so a concurrent change by another controller fails the
//! write (409) instead of being overwritten; the watch event of that change computes it again.

use std::collections::{HashMap, HashSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector;
use kube::ResourceExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::conditions::{self, Cond};
use super::kube_stores::{
    BuildOutcome, Crd, ModelFacts, PolicyKey, Signal, Stores, AUTHORIZATION_POLICY, DESTINATION_RULE, GATEWAY_CLASS,
    PEER_AUTHENTICATION, ROUTES, TRAFFIC_SPLIT, VIRTUAL_SERVICE,
};
use super::policy_status::{self, Outcome};
use super::route_status::{self, Parents};
use crate::model::index::DATAPLANE_MODE_LABEL;
use crate::model::Rejection;

/// When a status write failed, how long until the next attempt.
const STATUS_RETRY: std::time::Duration = std::time::Duration::from_secs(5);
/// Field manager of the status writes.
const FIELD_MANAGER: &str = "ambit-controller";

/// Writes the status conditions that changed, and schedules a retry after a failure.
pub(super) struct StatusWriter {
    client: kube::Client,
    written: HashMap<PolicyKey, Vec<Cond>>,
    retry: mpsc::UnboundedSender<Signal>,
    retry_pending: bool,
}

impl StatusWriter {
    pub(super) fn new(client: kube::Client, retry: mpsc::UnboundedSender<Signal>) -> Self {
        Self { client, written: HashMap::new(), retry, retry_pending: false }
    }

    /// Policies, VirtualServices and TrafficSplits: after a model build, from its rejections and `built`. Remembers
    /// what it wrote, and also skips objects that already carry the conditions (after a restart).
    pub(super) async fn sync_policies(
        &mut self,
        stores: &Stores,
        keys: &[PolicyKey],
        rejected: &[Rejection],
        built: &BuildOutcome,
    ) {
        let mut outcomes: HashMap<PolicyKey, Outcome<'_>> = HashMap::new();
        let notes = rejected.iter().map(|r| (&r.kind, &r.namespace, &r.name, &r.reason, false));
        for (kind, ns, name, reason, is_warning) in
            notes.chain(built.warnings.iter().map(|w| (&w.kind, &w.namespace, &w.name, &w.reason, true)))
        {
            let Some(crd) = status_crd(kind) else { continue };
            let kind = crd.kind;
            let o = outcomes.entry((kind, ns.clone(), name.clone())).or_default();
            if is_warning { &mut o.warnings } else { &mut o.rejected }.push(reason);
        }
        let present: HashSet<&PolicyKey> = keys.iter().collect();
        self.written.retain(|k, _| present.contains(k));
        let now = now();
        let mut failed = false;
        for key in keys {
            let Some(crd) = status_crd(key.0) else { continue };
            let store = match crd.kind {
                k if k == AUTHORIZATION_POLICY.kind => &stores.policies,
                k if k == PEER_AUTHENTICATION.kind => &stores.peer_auths,
                k if k == VIRTUAL_SERVICE.kind => &stores.virtual_services,
                k if k == DESTINATION_RULE.kind => &stores.destination_rules,
                _ => &stores.traffic_splits,
            };
            let Some(obj) = store.get(&reflector::ObjectRef::new_with(&key.2, crd.api_resource()).within(&key.1))
            else {
                continue; // deleted since the build
            };
            let mut outcome = outcomes.remove(key).unwrap_or_default();
            if key.0 == AUTHORIZATION_POLICY.kind {
                outcome.binding = built.bindings.get(&(key.1.clone(), key.2.clone()));
            }
            outcome.applied = built.mesh_routes_applied.contains(&(key.0.to_string(), key.1.clone(), key.2.clone()));
            let want = policy_status::desired(key.0, &obj.data["spec"], obj.metadata.generation, &outcome);
            if self.written.get(key) == Some(&want) {
                continue;
            }
            let current = obj.data["status"]["conditions"].as_array().map(Vec::as_slice).unwrap_or_default();
            let Some(next) = conditions::merge(current, &want, &policy_status::OWNED, &now) else {
                self.written.insert(key.clone(), want);
                continue;
            };
            let patch = json!({ "status": { "conditions": next } });
            match patch_status(&self.client, &crd.api_resource(), Some(&key.1), &key.2, &patch).await {
                Ok(()) => {
                    tracing::debug!(kind = key.0, namespace = %key.1, name = %key.2, "status written");
                    self.written.insert(key.clone(), want);
                }
                // A CRD without a status subresource (SMI's own TrafficSplit CRD has none) cannot hold conditions,
                // and RBAC rightly refuses the fallback write to the object: said once, not retried forever.
                Err(kube::Error::Api(s)) if s.code == 403 => {
                    tracing::warn!(kind = key.0, namespace = %key.1, name = %key.2, error = %s, "cannot write status (does its CRD lack a status subresource?); not retried until it changes");
                    self.written.insert(key.clone(), want);
                }
                Err(e) => {
                    tracing::warn!(kind = key.0, namespace = %key.1, name = %key.2, error = %e, "cannot write status; will retry");
                    failed = true;
                }
            }
        }
        self.settle(failed);
    }

    /// Routes and GatewayClasses: after any change of them or of the model's objects (a Gateway, Service or
    /// namespace decides whose a parentRef is).
    pub(super) async fn sync_gateway_api(&mut self, stores: &Stores, facts: &ModelFacts) {
        let mut parents = parents(stores);
        parents.served = facts.served.clone();
        parents.invalid = facts.invalid.clone();
        parents.grants = facts.grants.clone();
        let now = now();
        let mut failed = false;
        for (crd, store) in ROUTES.iter().zip([&stores.http_routes, &stores.grpc_routes]) {
            for route in store.state() {
                let ns = route.namespace().unwrap_or_default();
                let want = route_status::desired_parents(
                    crd.kind,
                    &ns,
                    &route.name_any(),
                    &route.data["spec"],
                    route.metadata.generation,
                    &parents,
                );
                let current = route.data["status"]["parents"].as_array().map(Vec::as_slice).unwrap_or_default();
                let Some(next) = route_status::merge_parents(current, &want, &now) else { continue };
                let patch = json!({
                    "metadata": { "resourceVersion": route.metadata.resource_version },
                    "status": { "parents": next },
                });
                failed |= !self.write(*crd, Some(ns.as_str()), &route.name_any(), &patch).await;
            }
        }
        for class in stores.gateway_classes.state() {
            let controller = class.data["spec"]["controllerName"].as_str().unwrap_or_default();
            let name = class.name_any();
            let Some(want) = route_status::class_conditions(&name, controller, class.metadata.generation) else {
                continue;
            };
            let current = class.data["status"]["conditions"].as_array().map(Vec::as_slice).unwrap_or_default();
            let Some(next) = route_status::merge_class(current, &want, &now) else { continue };
            failed |= !self.write(GATEWAY_CLASS, None, &name, &json!({ "status": { "conditions": next } })).await;
        }
        self.settle(failed);
    }

    /// Writes one status patch; false (logged) when it failed.
    async fn write(&self, crd: Crd, ns: Option<&str>, name: &str, patch: &Value) -> bool {
        match patch_status(&self.client, &crd.api_resource(), ns, name, patch).await {
            Ok(()) => {
                tracing::debug!(kind = crd.kind, namespace = ns, name, "status written");
                true
            }
            // Changed since it was read: its watch event brings the new version, which is computed again.
            Err(kube::Error::Api(s)) if s.code == 409 => true,
            Err(e) => {
                tracing::warn!(kind = crd.kind, namespace = ns, name, error = %e, "cannot write status; will retry");
                false
            }
        }
    }

    /// After a failed write, one rebuild is scheduled (not one per failure).
    fn settle(&mut self, failed: bool) {
        if failed && !self.retry_pending {
            self.retry_pending = true;
            let retry = self.retry.clone();
            tokio::spawn(async move {
                tokio::time::sleep(STATUS_RETRY).await;
                let _ = retry.send(Signal::Changed);
            });
        } else if !failed {
            self.retry_pending = false;
        }
    }
}

/// The kind, among those [`StatusWriter::sync_policies`] writes, called `kind`.
fn status_crd(kind: &str) -> Option<Crd> {
    [AUTHORIZATION_POLICY, PEER_AUTHENTICATION, VIRTUAL_SERVICE, TRAFFIC_SPLIT, DESTINATION_RULE]
        .into_iter()
        .find(|c| c.kind == kind)
}

/// Whose parentRefs are Ambit's, from the stores.
fn parents(stores: &Stores) -> Parents {
    let class_controllers: HashMap<String, String> = stores
        .gateway_classes
        .state()
        .iter()
        .filter_map(|c| Some((c.name_any(), c.data["spec"]["controllerName"].as_str()?.to_string())))
        .collect();
    let waypoints = stores
        .gateways
        .state()
        .iter()
        .filter_map(|g| {
            let class = g.data["spec"]["gatewayClassName"].as_str()?;
            let controller = Parents::waypoint_controller(class, class_controllers.get(class).map(String::as_str))?;
            Some(((g.namespace()?, g.name_any()), controller))
        })
        .collect();
    let mesh_namespaces = stores
        .namespaces
        .state()
        .iter()
        .filter(|n| n.labels().get(DATAPLANE_MODE_LABEL).is_some_and(|m| m == "ambient"))
        .map(|n| n.name_any())
        .collect();
    let services = stores.services.state().iter().map(|s| (s.namespace().unwrap_or_default(), s.name_any())).collect();
    Parents { waypoints, mesh_namespaces, services, ..Parents::default() }
}

/// The current time as a condition's `lastTransitionTime`.
fn now() -> Value {
    json!(Time(k8s_openapi::jiff::Timestamp::now()))
}

/// Merge-patches `patch` through the status subresource, or on the object when the CRD has none.
async fn patch_status(
    client: &kube::Client,
    ar: &ApiResource,
    ns: Option<&str>,
    name: &str,
    patch: &Value,
) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    };
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match api.patch_status(name, &params, &Patch::Merge(patch)).await {
        Err(kube::Error::Api(s)) if s.is_not_found() => api.patch(name, &params, &Patch::Merge(patch)).await.map(drop),
        r => r.map(drop),
    }
}
