//! The HBONE mutual-TLS 1.3 configurations: both sides present a workload certificate and
//! check the peer's SPIFFE identity instead of a hostname.
//!
//! Configurations are built once per certificate and shared (`Arc`); a handshake allocates
//! nothing beyond what rustls does, plus one parse of the peer's leaf.

mod verifier;

use std::sync::Arc;

use rustls::{ClientConfig, CommonState, ServerConfig};

use crate::cert::{self, CertError, WorkloadCertificate};
use crate::spiffe::Identity;
use verifier::{SpiffeClientVerifier, SpiffeServerVerifier};

/// Why a TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration (for example a key it cannot use).
    #[error("cannot build tls config: {0}")]
    Rustls(#[from] rustls::Error),
    /// The certificate carries no trust anchors.
    #[error("no root certificates to verify peers against")]
    NoRoots,
    /// A root certificate cannot serve as a trust anchor.
    #[error("root certificate is not a usable trust anchor: {0}")]
    BadRoot(#[source] webpki::Error),
    /// A client config must expect at least one server identity.
    #[error("no expected server identity: every server would be rejected")]
    NoExpectedIdentity,
}

/// Why a peer's certificate was refused after its chain checked out. Carried inside
/// `rustls::Error::InvalidCertificate(CertificateError::Other(..))`, whose message shows
/// this error's `Debug`, so `Debug` is the readable message too.
#[derive(thiserror::Error)]
pub enum PeerError {
    /// The peer's leaf has no usable SPIFFE identity.
    #[error("peer certificate has no spiffe identity: {0}")]
    NoIdentity(#[source] CertError),
    /// A client from another trust domain.
    #[error("peer identity {peer} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The client's identity.
        peer: Identity,
        /// The server's trust domain.
        trust_domain: String,
    },
    /// A server whose identity is not one the client expects.
    #[error("peer identity {peer} is not one of the expected identities {expected:?}")]
    Unexpected {
        /// The server's identity.
        peer: Identity,
        /// What the client accepts.
        expected: Vec<Identity>,
    },
}

impl std::fmt::Debug for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Server side of HBONE: presents `cert` and requires a client certificate that chains to
/// `cert`'s roots, is valid now, has EKU clientAuth and a SPIFFE identity in the same trust
/// domain. TLS 1.3 only; `alpn` in order of preference (e.g. `b"h2"`).
pub fn server_config(cert: &WorkloadCertificate, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = SpiffeClientVerifier::new(cert.roots(), cert.identity().trust_domain.clone())?;
    let mut config = ServerConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain().to_vec(), cert.private_key().clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Client side of HBONE: presents `cert`, and accepts a server whose chain leads to `cert`'s
/// roots and whose SPIFFE identity is one of `expected`. The server name given to the
/// connector is not checked (pass e.g. `ServerName::IpAddress` of the peer).
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: Vec<Identity>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = SpiffeServerVerifier::new(cert.roots(), expected)?;
    let mut config = ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.private_key().clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// True when a handshake failed because the server's certificate verified
/// (chain, validity, purpose) but its identity is not one the client
/// expected; false for every other failure, e.g. an unknown issuer.
pub fn is_unexpected_identity(err: &rustls::Error) -> bool {
    match err {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            matches!(other.0.downcast_ref::<PeerError>(), Some(PeerError::Unexpected { .. }))
        }
        _ => false,
    }
}

/// The SPIFFE identity of the peer of an established connection (its leaf's URI SAN).
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    cert::identity_from_der(leaf).ok()
}

#[cfg(test)]
mod tests;
