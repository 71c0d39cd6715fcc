//! Ambit's waypoint: the per-namespace L7 proxy.
//!
//! Request handling runs in phases — route → authorize → pick backend →
//! forward → respond. This crate holds the decisions of those phases as pure
//! functions over `http` types, without I/O, so each is tested alone and the
//! forwarding code only carries them out:
//!
//! - [`plan`]: the phases composed with their defaults — routing, then
//!   (after authorization) [`plan::prepare`] → forward or reply.
//! - [`route`]: the routing model of a service port and the rule a request
//!   takes (Gateway API precedence across routes); 404 / gRPC UNIMPLEMENTED.
//! - [`filters`]: header changes, redirects, rewrites, mirrors.
//! - [`balance`]: the weighted backend choice, then the endpoint (least
//!   request by two random choices, or round robin).
//! - [`retry`]: whether and when to retry, the retry budget, deadlines.
//! - [`hop`]: hop-by-hop headers and `x-request-id`.
//! - [`config`]: the controller's configuration, converted for these phases.
//!
//! Random choices take the caller's [`rand::Rng`], so tests are repeatable.

pub mod authority;
pub mod balance;
pub mod config;
pub mod filters;
pub mod flags;
pub mod hop;
pub mod plan;
pub mod reply;
pub mod retry;
pub mod route;
pub mod target;

pub use reply::{Reply, ReplyReason};
