//! Waypoint deployment: for every Gateway of a waypoint class
//! (`ambit-waypoint`, `istio-waypoint`) the controller creates and owns a
//! ServiceAccount, a Deployment and a Service named after the Gateway, then
//! reports the Gateway's status (`Accepted`, `Programmed`, `addresses`).
//!
//! Objects are written with server-side apply under the field manager
//! `ambit-controller`, so a reconcile that changes nothing writes nothing. They
//! carry a controller owner reference to the Gateway: deleting the Gateway lets
//! Kubernetes' garbage collector remove them.

mod resources;
mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::jiff::{Timestamp, Unit};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use resources::{
    deployment, service, service_account, Owner, GATEWAY_CLASS_LABEL, GATEWAY_NAME_LABEL, HBONE_PORT, MANAGED_BY_LABEL,
    MANAGER, METRICS_PORT, READINESS_PORT,
};
pub use status::{desired as desired_status, GatewayStatus, GatewayStatusAddress, Observed, ACCEPTED, PROGRAMMED};

use crate::ca::{publish_root_cert, PublishError};
use crate::model::waypoint::WAYPOINT_CLASSES;

/// How the waypoint Deployments are built (the lead maps controller flags onto it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointSettings {
    /// Container image of the waypoint proxy.
    pub image: String,
    /// `imagePullPolicy`; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// Replicas per waypoint.
    pub replicas: i32,
    /// CPU request (a Kubernetes quantity, e.g. `100m`).
    pub cpu_request: Option<String>,
    /// Memory request (e.g. `128Mi`).
    pub memory_request: Option<String>,
    /// CPU limit.
    pub cpu_limit: Option<String>,
    /// Memory limit.
    pub memory_limit: Option<String>,
    /// Address of the controller's xDS/CA endpoint, passed as `XDS_ADDRESS`.
    pub xds_address: Option<String>,
    /// Audience of the projected service-account token the waypoint proves its identity with to the controller.
    pub token_audience: String,
}

impl Default for WaypointSettings {
    fn default() -> Self {
        Self {
            image: "ghcr.io/ambit-mesh/waypoint:latest".into(),
            image_pull_policy: None,
            replicas: 1,
            cpu_request: Some("100m".into()),
            memory_request: Some("128Mi".into()),
            cpu_limit: None,
            memory_limit: None,
            xds_address: None,
            token_audience: crate::ca::token_review::DEFAULT_AUDIENCE.into(),
        }
    }
}

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// The mesh root could not be published in the Gateway's namespace.
    #[error("{0}")]
    Root(#[from] PublishError),
    /// The Gateway lacks a field the API server always sets.
    #[error("bug: gateway without metadata.{0}")]
    MissingMetadata(&'static str),
}

/// What every reconcile needs.
struct Context {
    client: kube::Client,
    settings: WaypointSettings,
    gateways: ApiResource,
    /// The mesh root, published in each waypoint's namespace (the waypoint
    /// verifies the controller with it).
    roots_pem: String,
}

/// The Gateway API `Gateway` resource (`gateway.networking.k8s.io/v1`).
pub fn gateway_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"), "gateways")
}

/// Runs the waypoint controller until the watch streams end (they do not on
/// their own). Errors are logged and retried; a missing Gateway CRD is retried
/// by the watcher's backoff.
pub async fn run(client: kube::Client, settings: WaypointSettings, roots_pem: String) {
    let gateways = gateway_resource();
    // Only our own children are watched: they carry the managed-by label.
    let owned = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let ctx = Arc::new(Context { client: client.clone(), settings, gateways: gateways.clone(), roots_pem });
    Controller::new_with(
        Api::<DynamicObject>::all_with(client.clone(), &gateways),
        watcher::Config::default(),
        gateways,
    )
    .owns(Api::<Deployment>::all(client.clone()), owned.clone())
    .owns(Api::<Service>::all(client), owned)
    .run(reconcile, error_policy, ctx)
    .for_each(|res| async move {
        match res {
            Ok((obj, _)) => tracing::debug!(gateway = %obj, "waypoint reconciled"),
            Err(e) => tracing::warn!(error = %e, "waypoint controller"),
        }
    })
    .await;
}

fn error_policy(gw: Arc<DynamicObject>, err: &Error, _ctx: Arc<Context>) -> Action {
    if namespace_terminating(err) {
        // Nothing can be created there any more, and the Gateway goes with the namespace: wait for a change
        // instead of retrying every few seconds.
        tracing::debug!(gateway = ?gw.metadata.name, namespace = ?gw.metadata.namespace, "namespace terminating");
        return Action::await_change();
    }
    tracing::warn!(
        namespace = gw.metadata.namespace.as_deref().unwrap_or_default(),
        name = gw.metadata.name.as_deref().unwrap_or_default(),
        error = %err,
        "waypoint reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}

/// Whether `err` is the API server refusing to create an object in a namespace that is being deleted (403,
/// "… because it is being terminated").
fn namespace_terminating(err: &Error) -> bool {
    let source = match err {
        Error::Kube(e) => e,
        Error::Root(e) => e.kube_error(),
        Error::MissingMetadata(_) => return false,
    };
    matches!(source, kube::Error::Api(s) if s.is_forbidden() && s.message.contains("because it is being terminated"))
}

/// The Gateway's class, if it names one.
fn class_of(gw: &DynamicObject) -> Option<&str> {
    gw.data.get("spec")?.get("gatewayClassName")?.as_str()
}

async fn reconcile(gw: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let Some(class) = class_of(&gw).filter(|c| WAYPOINT_CLASSES.contains(c)) else {
        // Not (or no longer) a waypoint: remove what we made for it earlier, if anything.
        remove_owned(&gw, &ctx.client).await?;
        return Ok(Action::await_change());
    };
    if gw.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes the children once the Gateway is gone.
        return Ok(Action::await_change());
    }
    let meta = &gw.metadata;
    let owner = Owner {
        namespace: meta.namespace.clone().ok_or(Error::MissingMetadata("namespace"))?,
        name: meta.name.clone().ok_or(Error::MissingMetadata("name"))?,
        uid: meta.uid.clone().ok_or(Error::MissingMetadata("uid"))?,
        class: class.to_string(),
    };
    let ns = owner.namespace.as_str();
    let c = &ctx.client;
    // The waypoint pod mounts the root from its own namespace (a ConfigMap cannot be mounted across namespaces).
    publish_root_cert(c.clone(), ns, &ctx.roots_pem).await?;
    apply(Api::<ServiceAccount>::namespaced(c.clone(), ns), &owner.name, &service_account(&owner)).await?;
    let svc = apply(Api::<Service>::namespaced(c.clone(), ns), &owner.name, &service(&owner)).await?;
    let dep =
        apply(Api::<Deployment>::namespaced(c.clone(), ns), &owner.name, &deployment(&owner, &ctx.settings)).await?;

    let observed = Observed {
        generation: meta.generation,
        cluster_ip: svc.spec.and_then(|s| s.cluster_ip),
        available_replicas: dep.status.and_then(|s| s.available_replicas).unwrap_or(0),
    };
    // A status this controller cannot read (written by someone else) is replaced.
    let current: GatewayStatus =
        gw.data.get("status").and_then(|s| serde_json::from_value(s.clone()).ok()).unwrap_or_default();
    // The API server keeps whole seconds; so do we, so a re-read compares equal.
    let now = Timestamp::now().round(Unit::Second).unwrap_or_else(|_| Timestamp::now());
    if let Some(next) = status::desired(&current, &observed, now) {
        let api = Api::<DynamicObject>::namespaced_with(c.clone(), ns, &ctx.gateways);
        let patch = serde_json::json!({ "status": next });
        api.patch_status(&owner.name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        tracing::info!(namespace = ns, name = %owner.name, programmed = observed.available_replicas >= 1, "waypoint status written");
    }
    // Changes to the Gateway and its children trigger reconciles; this is a safety net.
    Ok(Action::requeue(Duration::from_secs(600)))
}

/// Deletes the ServiceAccount, Service and Deployment named after `gw` that it
/// controls: a Gateway whose class changed away from a waypoint class keeps
/// nothing. Objects of the same name owned by someone else are left alone.
async fn remove_owned(gw: &DynamicObject, client: &kube::Client) -> Result<(), Error> {
    let (Some(ns), Some(name), Some(uid)) = (&gw.metadata.namespace, &gw.metadata.name, &gw.metadata.uid) else {
        return Ok(());
    };
    delete_if_owned(Api::<Deployment>::namespaced(client.clone(), ns), name, uid).await?;
    delete_if_owned(Api::<Service>::namespaced(client.clone(), ns), name, uid).await?;
    delete_if_owned(Api::<ServiceAccount>::namespaced(client.clone(), ns), name, uid).await?;
    Ok(())
}

async fn delete_if_owned<K>(api: Api<K>, name: &str, owner_uid: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(obj) = api.get_metadata_opt(name).await? else {
        return Ok(());
    };
    let owned =
        obj.metadata.owner_references.iter().flatten().any(|o| o.uid == owner_uid && o.controller == Some(true));
    if owned {
        api.delete(name, &kube::api::DeleteParams::background()).await?;
        tracing::info!(name, "removed a waypoint object of a gateway that is no longer a waypoint");
    }
    Ok(())
}

/// Server-side apply of `obj` as `ambit-controller`, taking over conflicting fields.
async fn apply<K>(api: Api<K>, name: &str, obj: &K) -> Result<K, Error>
where
    K: kube::Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let params = PatchParams::apply(MANAGER).force();
    Ok(api.patch(name, &params, &Patch::Apply(obj)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(message: &str, reason: &str) -> Error {
        Error::Kube(kube::Error::Api(kube::core::Status::failure(message, reason).boxed()))
    }

    #[test]
    fn a_refusal_in_a_terminating_namespace_is_recognized_and_others_are_not() {
        let terminating = "serviceaccounts \"waypoint\" is forbidden: unable to create new content in namespace \
                           mesh-test because it is being terminated";
        assert!(namespace_terminating(&api_error(terminating, "Forbidden")));
        assert!(!namespace_terminating(&api_error("forbidden: RBAC", "Forbidden")), "another refusal is retried");
        assert!(!namespace_terminating(&api_error(terminating, "Conflict")));
        assert!(!namespace_terminating(&Error::MissingMetadata("uid")));
    }
}
