//! The waypoint's configuration as the controller sends it (`ambit.waypoint.v1`
//! and `istio.workload.Address` over delta ADS), converted into what the
//! request phases use.
//!
//! - [`convert`]: one `ServiceRoutes` → per port a [`crate::route::RouteTable`],
//!   its protocol and target port; what cannot be converted is reported, never
//!   a panic.
//! - [`snapshot`]: everything received as one immutable [`Snapshot`] (services
//!   by VIP and hostname, their ports' tables, endpoints with their
//!   identities, L7 policies), swapped whole behind an `Arc`.
//! - [`client`]: the controller's delta ADS stream that feeds the snapshots,
//!   and the waypoint's certificates from the controller's CA.

pub mod client;
pub mod convert;
pub mod snapshot;

pub use client::{certificates, ConfigClient, WaypointNode};

pub use convert::{service_routes, Consequence, PortConfig, Problem, Protocol, ServiceConfig};
pub use snapshot::{
    BuildReport, Endpoint, Resources, Served, Service, ServiceEntry, ServicePort, Snapshot, SnapshotHandle,
    SnapshotPublisher, Tunnel, Workload,
};
