//! The node agent: enrolls pods (capture rules in their namespace, then the
//! pod handed to ztunnel over ZDS), answers the CNI plugin, watches the
//! node's pods and namespaces, and installs the plugin on the node.

pub mod app;
pub mod enroll;
pub mod install;
pub mod kube;
pub mod netns;

pub use enroll::{EnrollConfig, EnrollError, Enroller, PodInfo};
