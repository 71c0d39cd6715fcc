//! The pod the agent's parts pass around.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A pod to enroll: what ZDS and capture need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// `metadata.uid`, the key everywhere.
    pub uid: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// The pod's network namespace as a path on the host
    /// (`/var/run/netns/cni-…` from CNI, `/proc/<pid>/ns/net` when found by IP).
    pub netns: PathBuf,
    /// The pod's IPs.
    pub ips: Vec<IpAddr>,
}

impl std::fmt::Display for PodInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}
