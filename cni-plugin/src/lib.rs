//! Ambit's CNI plugin library.
//!
//! [`capture`] installs the traffic-capture rules inside a pod's network
//! namespace so that the pod's TCP goes through the node's ztunnel, which
//! listens inside that same namespace. [`membership`] decides which pods
//! are in the mesh, from Istio's labels. [`agent`] is the node agent.

pub mod agent;
pub mod capture;
pub mod membership;
