//! Where the model's objects come from. Now: a directory of Kubernetes YAML
//! (`--config-dir`); later: Kubernetes watches.

pub mod file;

pub use file::FileSource;
