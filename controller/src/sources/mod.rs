//! Where the model's objects come from: a directory of Kubernetes YAML (`--config-dir`), or the API server's
//! watches, which also get status written back (policies, Gateway API routes and classes).

mod conditions;
pub mod file;
pub mod kube;
mod kube_status;
mod kube_stores;
mod policy_status;
mod route_status;
pub mod unsupported;

pub use file::FileSource;
pub use kube::KubeSource;
