//! Where the model's objects come from. Now: a directory of Kubernetes YAML
//! (`--config-dir`); later: Kubernetes watches.

pub mod file;
pub mod kube;
mod policy_status;
pub mod unsupported;

pub use file::FileSource;
pub use kube::KubeSource;
