//! Clients of Ambit's controller, shared by ztunnel and the waypoint (one
//! implementation for both proxies):
//!
//! - [`ads`]: the delta ADS stream — wildcard subscriptions, one ACK or NACK
//!   per response, reconnects with jittered exponential backoff that list the
//!   versions held, and the last good configuration kept in force while the
//!   controller is away. What the resources mean is the caller's
//!   ([`ads::DeltaHandler`]).
//! - [`ca`]: the CA client (`istio.v1.auth.IstioCertificateService`): a CSR
//!   per identity, the key never leaves the process, the answer checked.
//! - [`certs`]: workload certificates in memory, fetched on first use and
//!   rotated at half-life, with the TLS configurations made from them.
//! - [`token`]: the bearer token both present, read again at every use when
//!   it comes from a file (projected tokens rotate).

pub mod ads;
pub mod ca;
pub mod certs;
pub mod token;
