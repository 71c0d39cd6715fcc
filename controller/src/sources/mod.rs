//! Where the model's objects come from. Now: a directory of Kubernetes YAML
//! (`--config-dir`); later: Kubernetes watches.

pub mod file;
pub mod kube;

pub use file::FileSource;
pub use kube::KubeSource;
