//! ambit-controller: the control plane. It builds one consistent model of
//! workloads, services and policies from what it watches (Kubernetes, or a
//! directory of the same YAML), serves it to every ztunnel over delta xDS,
//! and runs the certificate authority.
//!
//! Layering, top down: `app` → `xds`, `ca` → `model` ← `sources`.

pub mod app;
pub mod bench;
pub mod ca;
pub mod config;
pub mod model;
pub mod sources;
pub mod waypoints;
pub mod xds;
