//! SKELETON (interface agreed between the agent's parts; the body is being
//! written on a branch and replaces this file before it reaches main).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::capture::CaptureConfig;

/// A pod to enroll: what ZDS and capture need.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// How the enroller captures and where it serves ZDS.
#[derive(Debug, Clone)]
pub struct EnrollConfig {
    /// ztunnel connects here (`/var/run/ztunnel/ztunnel.sock`).
    pub zds_socket: PathBuf,
    /// The capture rules' ports and marks.
    pub capture: CaptureConfig,
}

/// Why a pod could not be enrolled or released.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// No ztunnel is connected: retry later.
    #[error("no ztunnel is connected to the node agent")]
    NoZtunnel,
}

/// Enrolls and releases pods; shared (`Arc`) by the plugin server and the
/// Kubernetes watcher.
#[derive(Debug)]
pub struct Enroller;

impl Enroller {
    /// Binds the ZDS socket and starts serving ztunnel.
    pub async fn start(_config: EnrollConfig) -> Result<Arc<Enroller>, EnrollError> {
        unimplemented!("skeleton")
    }

    /// Installs capture in the pod's namespace, hands the pod to ztunnel and
    /// returns once ztunnel acknowledged it. Enrolling an enrolled pod
    /// re-checks and repairs its rules.
    pub async fn enroll(&self, _pod: PodInfo) -> Result<(), EnrollError> {
        unimplemented!("skeleton")
    }

    /// Removes capture (if the namespace still exists) and tells ztunnel to
    /// drop the pod. Releasing an unknown pod is not an error.
    pub async fn release(&self, _uid: &str) -> Result<(), EnrollError> {
        unimplemented!("skeleton")
    }

    /// Verifies the pod's capture is in place and ztunnel holds it.
    pub async fn check(&self, _uid: &str) -> Result<(), EnrollError> {
        unimplemented!("skeleton")
    }

    /// The pods enrolled now.
    pub fn enrolled(&self) -> Vec<PodInfo> {
        unimplemented!("skeleton")
    }

    /// Whether a ztunnel is connected and has taken the snapshot.
    pub fn ztunnel_ready(&self) -> bool {
        unimplemented!("skeleton")
    }
}
