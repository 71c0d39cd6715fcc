//! The waypoint's configuration as the controller sends it (`ambit.waypoint.v1`
//! and `istio.workload.Address` over delta ADS), converted into what the
//! request phases use.
//!
//! - [`convert`]: one `ServiceRoutes` → per port a [`crate::route::RouteTable`],
//!   its protocol and target port; what cannot be converted is reported, never
//!   a panic.

pub mod convert;

pub use convert::{service_routes, Consequence, PortConfig, Problem, Protocol, ServiceConfig};
