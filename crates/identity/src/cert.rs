//! Workload certificates: a key, its certificate chain and the mesh's trust anchors.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::spiffe::{Identity, IdentityError};

/// Why a certificate, key or chain cannot be used as a workload certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The PEM text is malformed.
    #[error("bad pem: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    /// The chain PEM holds no certificate.
    #[error("no certificate in the chain pem")]
    NoCertificate,
    /// The roots PEM holds no certificate.
    #[error("no root certificate in the roots pem")]
    NoRoots,
    /// A certificate is not valid DER X.509.
    #[error("cannot parse certificate: {0}")]
    Parse(#[from] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// An extension of the leaf cannot be parsed.
    #[error("cannot parse certificate extension: {0}")]
    Extension(#[from] x509_parser::error::X509Error),
    /// The leaf has no URI subject alternative name.
    #[error("certificate has no uri subject alternative name")]
    NoUriSan,
    /// The leaf has more than one URI SAN, so its identity is ambiguous.
    #[error("certificate has {0} uri subject alternative names, want exactly one")]
    ManyUriSans(usize),
    /// The leaf's URI SAN is not a workload SPIFFE identity.
    #[error("certificate uri san is not a workload identity: {0}")]
    Identity(#[from] IdentityError),
    /// The private key cannot be loaded.
    #[error("cannot load private key: {0}")]
    Key(#[source] rustls::Error),
    /// The private key is not the key of the leaf certificate.
    #[error("private key does not match the leaf certificate")]
    KeyMismatch,
}

/// A workload's private key and certificate chain, with the mesh's trust anchors.
///
/// `Debug` prints the identity, serial and validity, never the key.
pub struct WorkloadCertificate {
    identity: Identity,
    /// Leaf first, then intermediates; never the root.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

/// What an admin config dump shows of a workload certificate: no key material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertificateSummary {
    /// The SPIFFE URI of the leaf.
    pub identity: String,
    /// The leaf's serial number in lowercase hex.
    pub serial: String,
    /// Start of validity, RFC 3339.
    pub not_before: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
    /// The chain as PEM blocks, leaf first.
    pub chain_pem: Vec<String>,
    /// The trust anchors as PEM blocks.
    pub roots_pem: Vec<String>,
}

impl WorkloadCertificate {
    /// Loads a workload certificate from PEM. The identity is the leaf's URI SAN.
    ///
    /// `chain_pem` is leaf first; a trailing copy of a root (as CA services often return) is dropped.
    pub fn from_pem(chain_pem: &str, key_pem: &str, roots_pem: &str) -> Result<Self, CertError> {
        let chain = parse_certs_pem(chain_pem)?;
        let roots = parse_certs_pem(roots_pem).map_err(|e| match e {
            CertError::NoCertificate => CertError::NoRoots,
            other => other,
        })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        Self::from_der(chain, key, roots)
    }

    /// Builds a workload certificate from DER parts, checking that the key matches the leaf.
    pub fn from_der(
        mut chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        if roots.is_empty() {
            return Err(CertError::NoRoots);
        }
        if chain.len() > 1 && chain.last().is_some_and(|last| roots.contains(last)) {
            chain.pop();
        }
        let leaf_der = chain.first().ok_or(CertError::NoCertificate)?;
        let (_, leaf) = X509Certificate::from_der(leaf_der)?;
        let identity = identity_of(&leaf)?;

        let signing_key = crate::provider().key_provider.load_private_key(key.clone_key()).map_err(CertError::Key)?;
        match signing_key.public_key() {
            Some(spki) if spki.as_ref() == leaf.public_key().raw => {}
            _ => return Err(CertError::KeyMismatch),
        }

        Ok(Self {
            identity,
            not_before: asn1_to_system_time(leaf.validity().not_before),
            not_after: asn1_to_system_time(leaf.validity().not_after),
            serial: hex(leaf.raw_serial()),
            chain,
            key,
            roots,
        })
    }

    /// The SPIFFE identity of the leaf.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Leaf first, then intermediates (not the root).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key of the leaf.
    pub fn private_key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The trust anchors of the mesh.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The leaf's serial number in lowercase hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When to fetch a new certificate: halfway through the validity, leaving the
    /// other half to ride out a CA outage.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self.not_after.duration_since(self.not_before).unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }

    /// Whether the leaf is past its validity at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now > self.not_after
    }

    /// The chain as PEM, leaf first.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| to_pem("CERTIFICATE", c)).collect()
    }

    /// The trust anchors as PEM.
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(|c| to_pem("CERTIFICATE", c)).collect()
    }

    /// The private key as PEM (to hand to another process; never log it).
    pub fn key_pem(&self) -> String {
        let tag = match &self.key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        to_pem(tag, self.key.secret_der())
    }

    /// What an admin dump shows: identity, serial, validity and the public certificates.
    pub fn summary(&self) -> CertificateSummary {
        CertificateSummary {
            identity: self.identity.to_string(),
            serial: self.serial.clone(),
            not_before: rfc3339(self.not_before),
            not_after: rfc3339(self.not_after),
            chain_pem: self.chain.iter().map(|c| to_pem("CERTIFICATE", c)).collect(),
            roots_pem: self.roots.iter().map(|c| to_pem("CERTIFICATE", c)).collect(),
        }
    }
}

impl Clone for WorkloadCertificate {
    fn clone(&self) -> Self {
        Self {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            serial: self.serial.clone(),
        }
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &rfc3339(self.not_before))
            .field("not_after", &rfc3339(self.not_after))
            .field("chain_len", &self.chain.len())
            .field("roots_len", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// What the TLS verifiers need from a peer's leaf, read in one parse.
pub(crate) struct LeafFacts {
    pub identity: Identity,
    pub server_auth: bool,
    pub client_auth: bool,
}

/// Reads identity and extended key usages of a leaf certificate.
pub(crate) fn leaf_facts(der: &[u8]) -> Result<LeafFacts, CertError> {
    let (_, cert) = X509Certificate::from_der(der)?;
    let identity = identity_of(&cert)?;
    let eku = cert.extended_key_usage()?;
    Ok(LeafFacts {
        identity,
        server_auth: eku.as_ref().is_some_and(|e| e.value.server_auth),
        client_auth: eku.as_ref().is_some_and(|e| e.value.client_auth),
    })
}

/// The SPIFFE identity of a certificate: its one URI SAN.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, CertError> {
    let (_, cert) = X509Certificate::from_der(der)?;
    identity_of(&cert)
}

fn identity_of(cert: &X509Certificate<'_>) -> Result<Identity, CertError> {
    let san = cert.subject_alternative_name()?;
    let mut uris = san.iter().flat_map(|s| s.value.general_names.iter()).filter_map(|name| match name {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let first = uris.next().ok_or(CertError::NoUriSan)?;
    let extra = uris.count();
    if extra > 0 {
        return Err(CertError::ManyUriSans(extra + 1));
    }
    Ok(first.parse()?)
}

/// All certificates of a PEM bundle, in order.
pub(crate) fn parse_certs_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(certs)
}

/// One PEM block.
pub(crate) fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

pub(crate) fn asn1_to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| format!("bug: unformattable time: {e}"))
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::CertificateAuthority;

    const HOUR: Duration = Duration::from_secs(3600);

    fn issued() -> (CertificateAuthority, WorkloadCertificate) {
        let ca = CertificateAuthority::generate_root("cluster.local", 24 * HOUR).unwrap();
        let id = Identity::new("cluster.local", "default", "reviews");
        let cert = ca.issue(&id, HOUR).unwrap();
        (ca, cert)
    }

    #[test]
    fn from_pem_round_trips_a_workload_certificate() {
        let (_, cert) = issued();
        let loaded = WorkloadCertificate::from_pem(&cert.chain_pem(), &cert.key_pem(), &cert.roots_pem()).unwrap();
        assert_eq!(loaded.identity(), cert.identity());
        assert_eq!(loaded.chain(), cert.chain());
        assert_eq!(loaded.roots(), cert.roots());
        assert_eq!(loaded.serial(), cert.serial());
        assert_eq!(loaded.not_after(), cert.not_after());
        assert_eq!(loaded.private_key().secret_der(), cert.private_key().secret_der());
    }

    #[test]
    fn from_pem_drops_a_trailing_root_from_the_chain() {
        let (_, cert) = issued();
        let chain_with_root = cert.chain_pem() + &cert.roots_pem();
        let loaded = WorkloadCertificate::from_pem(&chain_with_root, &cert.key_pem(), &cert.roots_pem()).unwrap();
        assert_eq!(loaded.chain().len(), 1);
    }

    #[test]
    fn from_pem_rejects_a_key_of_another_certificate() {
        let (ca, cert) = issued();
        let other = ca.issue(&Identity::new("cluster.local", "default", "other"), HOUR).unwrap();
        let err = WorkloadCertificate::from_pem(&cert.chain_pem(), &other.key_pem(), &cert.roots_pem()).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch), "{err}");
    }

    #[test]
    fn from_pem_rejects_empty_inputs() {
        let (_, cert) = issued();
        let err = WorkloadCertificate::from_pem("", &cert.key_pem(), &cert.roots_pem()).unwrap_err();
        assert!(matches!(err, CertError::NoCertificate), "{err}");
        let err = WorkloadCertificate::from_pem(&cert.chain_pem(), &cert.key_pem(), "").unwrap_err();
        assert!(matches!(err, CertError::NoRoots), "{err}");
    }

    #[test]
    fn refresh_is_due_halfway_through_the_validity() {
        let (_, cert) = issued();
        let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
        assert_eq!(cert.refresh_at(), cert.not_before() + lifetime / 2);
        assert!(!cert.is_expired(SystemTime::now()));
        assert!(cert.is_expired(cert.not_after() + Duration::from_secs(1)));
    }

    #[test]
    fn debug_output_holds_no_key_material() {
        let (_, cert) = issued();
        let debug = format!("{cert:?}");
        let key_pem = cert.key_pem();
        let key_b64: String = key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(debug.contains("spiffe://cluster.local/ns/default/sa/reviews"), "{debug}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
        // No 16-character run of the key's base64 (nor its bytes in hex) appears.
        for window in key_b64.as_bytes().windows(16) {
            assert!(!debug.contains(std::str::from_utf8(window).unwrap()), "{debug}");
        }
        assert!(!debug.contains(&hex(&cert.private_key().secret_der()[..16])));
        assert!(!debug.contains(&format!("{:?}", &cert.private_key().secret_der()[..8])));
    }

    #[test]
    fn summary_shows_identity_validity_and_chain_but_no_key() {
        let (_, cert) = issued();
        let summary = cert.summary();
        assert_eq!(summary.identity, "spiffe://cluster.local/ns/default/sa/reviews");
        assert_eq!(summary.serial, cert.serial());
        assert!(summary.not_after.ends_with('Z'), "{}", summary.not_after);
        assert_eq!(summary.chain_pem.concat(), cert.chain_pem());
        let json = serde_json::to_string(&summary).unwrap();
        assert!(!json.contains("PRIVATE KEY"), "{json}");
        assert!(json.contains("\"not_before\""), "{json}");
    }
}
