//! The node agent: enrolls pods (capture rules in their namespace, then the
//! pod handed to ztunnel over ZDS), answers the CNI plugin, watches the
//! node's pods and namespaces, and installs the plugin on the node.

pub mod app;
pub mod enroll;
pub mod install;
pub mod kube;
pub mod netns;
pub mod owner;
pub mod plugin_server;
mod pod;
pub mod protocol;
mod state_file;
mod ztunnels;

pub use enroll::{EnrollConfig, EnrollError, Enroller, PodInfo};

#[cfg(test)]
mod enroll_tests;
