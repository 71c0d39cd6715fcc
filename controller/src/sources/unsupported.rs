//! Watches the mesh kinds Ambit recognises but does not apply ([`crate::model::unsupported`]) and tells the user,
//! once per object generation: an info log line and a Warning Event `NotSupported` on the object. A kind whose CRD
//! is not installed is retried with backoff, quietly.

use std::collections::HashSet;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Resource;

use crate::model::unsupported::{self, Kind};

/// Spawns one watcher per kind; they run until the returned handles are aborted or dropped with the runtime.
pub fn spawn(client: &kube::Client, reporter: &str) -> Vec<tokio::task::JoinHandle<()>> {
    let recorder = Recorder::new(client.clone(), Reporter::from(reporter));
    unsupported::KINDS.iter().map(|k| tokio::spawn(watch(client.clone(), recorder.clone(), *k))).collect()
}

async fn watch(client: kube::Client, recorder: Recorder, k: Kind) {
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(k.group, k.version, k.kind), k.plural);
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let stream = watcher(api, watcher::Config::default()).default_backoff().applied_objects();
    futures::pin_mut!(stream);
    let mut told = HashSet::new();
    while let Some(item) = stream.next().await {
        let Ok(obj) = item else { continue }; // not served (CRD absent) or a transient error: backoff retries
        let key = (obj.metadata.uid.clone().unwrap_or_default(), obj.metadata.generation);
        if !told.insert(key) {
            continue;
        }
        let (ns, name) =
            (obj.metadata.namespace.clone().unwrap_or_default(), obj.metadata.name.clone().unwrap_or_default());
        let message = unsupported::message(k.kind);
        tracing::info!(kind = k.kind, namespace = %ns, name = %name, "{message}");
        let event = Event {
            type_: EventType::Warning,
            reason: "NotSupported".into(),
            note: Some(message),
            action: "Ignore".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &obj.object_ref(&ar)).await {
            tracing::warn!(kind = k.kind, namespace = %ns, name = %name, error = %e, "cannot record the NotSupported event");
        }
    }
}
