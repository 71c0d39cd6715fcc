//! Workload certificates held in memory, fetched on first use (or when a pod
//! is enrolled), shared by every connection of that identity and rotated at
//! half-life: shared with the waypoint (`ambit-xds-client`). ztunnel counts
//! every request's outcome in its `certificates` metric ([`observer`]).

use std::sync::Arc;

pub use ambit_xds_client::certs::{
    CertError, CertManager, CertificateProvider, Certs, FetchObserver, LocalCa, HBONE_ALPN,
};

use crate::metrics::{Metrics, OutcomeLabels};

/// Counts certificate requests by outcome in `metrics`.
pub fn observer(metrics: Arc<Metrics>) -> FetchObserver {
    Box::new(move |ok| {
        let outcome = if ok { "success" } else { "failure" };
        metrics.certificates_issued.get_or_create(&OutcomeLabels { outcome }).inc();
    })
}
