//! SPIFFE identities, workload certificates, a certificate authority, and the mutual-TLS 1.3
//! configurations that ztunnel, the waypoint and the controller use for HBONE.
//!
//! Certificates are ECDSA P-256. All TLS configurations use the ring provider explicitly, never
//! a process-wide default.

pub mod ca;
pub mod cert;
pub mod spiffe;
pub mod tls;

use std::sync::{Arc, OnceLock};

pub use ca::{generate_csr, CaError, CertificateAuthority};
pub use cert::{CertError, CertificateSummary, WorkloadCertificate};
pub use spiffe::{Identity, IdentityError, PrincipalPattern};
pub use tls::{client_config, peer_identity, server_config, PeerError, TlsError};

/// The one crypto provider of the crate, built once.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}
