//! The certificate authority: the mesh root ([`root`], kept in files or a
//! Kubernetes Secret by [`secret_store`], its certificate published by
//! [`root_configmap`]), the serving certificate of the
//! controller's gRPC port ([`serving`]), caller authentication shared with
//! xDS ([`auth`], [`node_tokens`], [`workload_tokens`], [`token_review`]) and the `IstioCertificateService` itself
//! ([`service`]).

pub mod auth;
pub mod node_tokens;
pub mod root;
pub mod root_configmap;
pub mod secret_store;
pub mod service;
pub mod serving;
pub mod token_review;
mod token_table;
pub mod workload_tokens;

pub use auth::{AsyncCallerAuthenticator, AuthError, AuthFuture, BootstrapTokenAuthenticator, Caller};
pub use node_tokens::{NodeTokenAuthenticator, NodeTokensError};
pub use root::{load_or_create, load_or_create_root, CaError, FileRootStore, RootStore, StoredRoot};
pub use root_configmap::{publish_root_cert, PublishError, Published};
pub use secret_store::{SecretRootStore, SecretStoreError};
pub use service::{CaService, DEFAULT_MAX_TTL};
pub use serving::{serving_identity, ServingError};
pub use token_review::TokenReviewAuthenticator;
pub use workload_tokens::{WorkloadTokenAuthenticator, WorkloadTokensError};
