//! Ambit's waypoint: the per-namespace L7 proxy.
//!
//! Request handling runs in phases — route → authorize → pick backend →
//! forward → respond. The decisions of those phases are pure functions over
//! `http` types, without I/O, so each is tested alone; the proxy modules
//! carry them out.
//!
//! The proxy (entry point first; each uses only those below it):
//! - [`app`]: startup — configuration client, certificate, listeners.
//! - [`listener`]: HBONE termination (mutual TLS, CONNECT to a served
//!   service), then HTTP through [`proxy`] or TCP through [`tcp`], with
//!   [`detect`] for ports that declare no protocol.
//! - [`proxy`]: one request through the phases; [`upstream`]: pooled HTTP
//!   connections to endpoints inside HBONE tunnels; [`upgrade`]: HTTP/1.1
//!   upgrades (WebSocket) spliced through.
//! - [`admin`]: config dump, log level, readiness; [`flags`]: the command line.
//! - [`trace`]: OpenTelemetry spans of requests and attempts, W3C and B3
//!   propagation, OTLP export.
//!
//! The decisions:
//! - [`plan`]: the phases composed with their defaults — routing, then
//!   (after authorization) [`plan::prepare`] → forward or reply.
//! - [`route`]: the routing model of a service port and the rule a request
//!   takes (Gateway API precedence across routes, the order written for
//!   VirtualService and TrafficSplit); 404 / gRPC UNIMPLEMENTED.
//! - [`filters`]: header changes, redirects, rewrites, mirrors; [`fault`]:
//!   injected delays and aborts (VirtualService `fault`).
//! - [`balance`]: the weighted backend choice, then the endpoint (least
//!   request by two random choices, or round robin).
//! - [`circuit`]: DestinationRule `connectionPool`: circuit breakers per
//!   upstream cluster (503 `UO` on overflow) and connection settings.
//! - [`retry`]: whether and when to retry, the retry budget, deadlines.
//! - [`hop`]: hop-by-hop headers and `x-request-id`.
//! - [`normalize`]: the request path normalized before routing and policy.
//! - [`config`]: the controller's configuration, converted for these phases.
//!
//! Random choices take the caller's [`rand::Rng`], so tests are repeatable.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod authority;
pub mod authz;
pub mod balance;
pub mod circuit;
pub mod config;
pub mod detect;
pub mod fault;
pub mod filters;
pub mod flags;
pub mod hop;
pub mod lb;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod normalize;
pub mod outlier;
pub mod plan;
pub mod proxy;
pub mod replay;
pub mod reply;
pub mod retry;
pub mod route;
pub mod target;
pub mod tcp;
pub mod trace;
pub mod upgrade;
pub mod upstream;

pub use reply::{Reply, ReplyReason};
