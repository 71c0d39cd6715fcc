//! ztunnel: Ambit's node proxy. It captures the TCP traffic of every
//! enrolled pod on its node (listeners inside each pod's network namespace)
//! and carries it to other pods in HBONE tunnels: HTTP/2 CONNECT over mutual
//! TLS 1.3 with SPIFFE identities, with L4 authorization at the destination.
//!
//! Module layering, top down: `app` → `inpod` → `proxy` → `state`, `certs`,
//! `netns`, `metrics`; HBONE (settings, pool, relay, headers) and the
//! workers that run the connections come from the `ambit-hbone` crate;
//! `config` is plain data.

pub mod admin;
pub mod app;
pub mod ca_client;
pub mod certs;
pub mod config;
pub mod drain;
pub mod inpod;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod state;
pub mod xds;
