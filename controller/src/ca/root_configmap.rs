//! Kubernetes mode publishes the mesh root's certificate (public) in the
//! ConfigMap `ambit-ca-root-cert` (key `root-cert.pem`) of the controller's
//! namespace; the ztunnel DaemonSet mounts it to verify the controller's
//! serving certificate.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};

/// Name of the ConfigMap with the root certificate.
pub const ROOT_CERT_CONFIGMAP: &str = "ambit-ca-root-cert";
/// Key of the root certificate in the ConfigMap (the file ztunnel reads).
pub const ROOT_CERT_KEY: &str = "root-cert.pem";

/// Why the root certificate cannot be published.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} configmap {namespace}/{ROOT_CERT_CONFIGMAP}: {source}")]
pub struct PublishError {
    action: &'static str,
    namespace: String,
    #[source]
    source: kube::Error,
}

impl PublishError {
    /// The API call's error.
    pub fn kube_error(&self) -> &kube::Error {
        &self.source
    }
}

/// What [`publish_root_cert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The ConfigMap did not exist.
    Created,
    /// It held other content.
    Updated,
    /// It already held `roots_pem`.
    Unchanged,
}

/// Writes `roots_pem` into ConfigMap [`ROOT_CERT_CONFIGMAP`] of `namespace`:
/// creates it, or updates it when its content differs.
pub async fn publish_root_cert(
    client: kube::Client,
    namespace: &str,
    roots_pem: &str,
) -> Result<Published, PublishError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let err = |action, source| PublishError { action, namespace: namespace.to_owned(), source };
    let current = api.get_opt(ROOT_CERT_CONFIGMAP).await.map_err(|e| err("read", e))?;
    if current.is_none() {
        let map = ConfigMap {
            metadata: ObjectMeta {
                name: Some(ROOT_CERT_CONFIGMAP.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/part-of".to_owned(), "ambit".to_owned()),
                    ("app.kubernetes.io/managed-by".to_owned(), "ambit-controller".to_owned()),
                ])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(ROOT_CERT_KEY.to_owned(), roots_pem.to_owned())])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &map).await {
            Ok(_) => return Ok(Published::Created),
            // Another replica was first; it publishes the same root, but check.
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(e) => return Err(err("create", e)),
        }
    }
    let current = match current {
        Some(c) => Some(c),
        None => api.get_opt(ROOT_CERT_CONFIGMAP).await.map_err(|e| err("read", e))?,
    };
    let held = current.as_ref().and_then(|c| c.data.as_ref()).and_then(|d| d.get(ROOT_CERT_KEY));
    if held.map(String::as_str) == Some(roots_pem) {
        return Ok(Published::Unchanged);
    }
    let patch = serde_json::json!({ "data": { ROOT_CERT_KEY: roots_pem } });
    api.patch(ROOT_CERT_CONFIGMAP, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| err("update", e))?;
    Ok(Published::Updated)
}
