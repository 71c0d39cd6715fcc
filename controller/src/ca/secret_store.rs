//! Kubernetes mode keeps the mesh root in one Secret (`ambit-ca-root`, keys
//! `ca-cert.pem` and `ca-key.pem`, type `Opaque`) in the controller's
//! namespace, so every replica and every restart signs with the same root.
//!
//! The Secret is only ever created, never overwritten: when two replicas start
//! at once, the second `create` fails with AlreadyExists and that replica
//! loads the winner's root. A Secret with a missing or unreadable key is an
//! error naming it: replacing it would cut every workload off from its peers.
//!
//! [`RootStore`] is blocking (it runs once at start), so the store blocks on
//! the runtime it was made on: call it from `tokio::task::spawn_blocking`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};

use super::root::{CaError, RootStore, StoredRoot};

/// Name of the Secret holding the mesh root.
pub const ROOT_SECRET: &str = "ambit-ca-root";
/// Key of the root certificate (bundle) in the Secret.
pub const CERT_KEY: &str = "ca-cert.pem";
/// Key of the root's PKCS#8 private key in the Secret.
pub const KEY_KEY: &str = "ca-key.pem";

/// Why the root Secret cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SecretStoreError {
    /// An API call failed (unreachable, forbidden, ...).
    #[error("cannot {action} secret {namespace}/{name}: {source}")]
    Kube {
        action: &'static str,
        namespace: String,
        name: String,
        // Boxed: kube's error is large and this enum travels in every Result of the store.
        #[source]
        source: Box<kube::Error>,
    },
    /// A key holds bytes that are not PEM text.
    #[error("secret {namespace}/{name} key {key} is not utf-8 text")]
    NotUtf8 { namespace: String, name: String, key: &'static str },
    /// The store was used outside a tokio runtime.
    #[error("bug: the secret root store was created outside a tokio runtime")]
    NoRuntime,
}

/// The mesh root in a Kubernetes Secret (see the module documentation).
#[derive(Clone)]
pub struct SecretRootStore {
    api: Api<Secret>,
    namespace: String,
    name: String,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for SecretRootStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRootStore").field("namespace", &self.namespace).field("name", &self.name).finish()
    }
}

impl SecretRootStore {
    /// A store for Secret [`ROOT_SECRET`] in `namespace`. Must be called inside
    /// a tokio runtime, whose handle the blocking calls use.
    pub fn new(client: kube::Client, namespace: &str) -> Result<Self, SecretStoreError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SecretStoreError::NoRuntime)?;
        Ok(SecretRootStore {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: ROOT_SECRET.to_owned(),
            runtime,
        })
    }

    /// Uses Secret `name` instead of [`ROOT_SECRET`].
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    fn kube_error(&self, action: &'static str, source: kube::Error) -> CaError {
        self.store_error(SecretStoreError::Kube {
            action,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source: Box::new(source),
        })
    }

    fn store_error(&self, e: SecretStoreError) -> CaError {
        CaError::Store { location: self.location(), source: Box::new(e) }
    }

    /// The root held by `secret`; an error naming the Secret when a key is missing or unreadable.
    fn root_of(&self, secret: &Secret) -> Result<StoredRoot, CaError> {
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        let text = |key: &'static str| -> Result<Option<String>, CaError> {
            match data.get(key) {
                None => Ok(None),
                Some(ByteString(bytes)) => String::from_utf8(bytes.clone()).map(Some).map_err(|_| {
                    self.store_error(SecretStoreError::NotUtf8 {
                        namespace: self.namespace.clone(),
                        name: self.name.clone(),
                        key,
                    })
                }),
            }
        };
        let at = |key: &str| format!("secret {}/{} key {key}", self.namespace, self.name);
        match (text(CERT_KEY)?, text(KEY_KEY)?) {
            (Some(cert_pem), Some(key_pem)) => Ok(StoredRoot { cert_pem, key_pem }),
            (Some(_), None) => Err(CaError::Incomplete { present: at(CERT_KEY), missing: at(KEY_KEY) }),
            (None, Some(_)) => Err(CaError::Incomplete { present: at(KEY_KEY), missing: at(CERT_KEY) }),
            (None, None) => Err(CaError::Incomplete {
                present: format!("secret {}/{}", self.namespace, self.name),
                missing: format!("its keys {CERT_KEY} and {KEY_KEY}"),
            }),
        }
    }

    async fn load_async(&self) -> Result<Option<StoredRoot>, CaError> {
        match self.api.get_opt(&self.name).await.map_err(|e| self.kube_error("read", e))? {
            Some(secret) => self.root_of(&secret).map(Some),
            None => Ok(None),
        }
    }

    async fn save_async(&self, root: &StoredRoot) -> Result<StoredRoot, CaError> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/part-of".to_owned(), "ambit".to_owned()),
                    ("app.kubernetes.io/managed-by".to_owned(), "ambit-controller".to_owned()),
                ])),
                ..Default::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(BTreeMap::from([
                (CERT_KEY.to_owned(), ByteString(root.cert_pem.as_bytes().to_vec())),
                (KEY_KEY.to_owned(), ByteString(root.key_pem.as_bytes().to_vec())),
            ])),
            ..Default::default()
        };
        match self.api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(root.clone()),
            // Another replica created it between our read and our create: its root wins.
            Err(kube::Error::Api(status)) if status.is_already_exists() => match self.load_async().await? {
                Some(theirs) => Ok(theirs),
                None => Err(self.kube_error("create", kube::Error::Api(status))),
            },
            Err(e) => Err(self.kube_error("create", e)),
        }
    }
}

impl RootStore for SecretRootStore {
    fn load(&self) -> Result<Option<StoredRoot>, CaError> {
        self.runtime.block_on(self.load_async())
    }

    fn save(&self, root: &StoredRoot) -> Result<StoredRoot, CaError> {
        self.runtime.block_on(self.save_async(root))
    }

    fn location(&self) -> String {
        format!("secret {}/{}", self.namespace, self.name)
    }
}
