//! Ambit's CNI plugin library.
//!
//! [`capture`] installs the traffic-capture rules inside a pod's network
//! namespace so that the pod's TCP goes through the node's ztunnel, which
//! listens inside that same namespace. [`membership`] decides which pods
//! are in the mesh, from Istio's labels. [`plugin`] is the chained CNI
//! plugin (binary `ambit-cni`): on ADD of a mesh pod it asks the node agent
//! over a unix socket ([`agent::protocol`]) to enroll it. [`agent`] is the
//! node agent's core: the [`agent::Enroller`] installs capture and hands pods
//! to every connected ztunnel over ZDS, and [`agent::plugin_server`] answers
//! the plugin; [`agent::app`] is the `ambit-node-agent`
//! binary (plugin install, Kubernetes watches, reconcile).

pub mod agent;
pub mod capture;
pub mod membership;
pub mod plugin;

#[cfg(test)]
mod test_support;
