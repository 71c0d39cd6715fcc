//! The certificate authority: the mesh root ([`root`]), the serving
//! certificate of the controller's gRPC port ([`serving`]), caller
//! authentication shared with xDS ([`auth`]) and the
//! `IstioCertificateService` itself ([`service`]).

pub mod auth;
pub mod root;
pub mod service;
pub mod serving;
pub mod token_review;

pub use auth::{AuthError, AuthInterceptor, BootstrapTokenAuthenticator, Caller, CallerAuthenticator};
pub use root::{load_or_create, load_or_create_root, CaError, FileRootStore, RootStore, StoredRoot};
pub use service::{CaService, DEFAULT_MAX_TTL};
pub use serving::{serving_identity, ServingError};
pub use token_review::{AsyncCallerAuthenticator, TokenReviewAuthenticator};
