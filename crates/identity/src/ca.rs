//! A certificate authority that signs workload certificates (dev mode in ztunnel, the CA
//! service in the controller), and the CSR a CA client sends.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::cert::{self, CertError, WorkloadCertificate};
use crate::spiffe::{self, Identity, IdentityError};

/// Clock skew allowed between the CA and the peers that check its certificates.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// OID of the subjectAltName extension (2.5.29.17).
const OID_SUBJECT_ALT_NAME: &[u64] = &[2, 5, 29, 17];

/// Why the CA cannot be loaded or cannot sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen failed to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA's PEM bundle is unusable.
    #[error("bad ca certificate: {0}")]
    Cert(#[from] CertError),
    /// The CA's certificate is not a CA.
    #[error("certificate is not a ca (basicConstraints ca is not set)")]
    NotCa,
    /// The CA's private key cannot be loaded (PKCS#8 PEM is expected).
    #[error("cannot load ca private key (want pkcs#8 pem): {0}")]
    Key(#[source] rcgen::Error),
    /// The CA's private key does not belong to its certificate.
    #[error("private key does not match the ca certificate")]
    KeyMismatch,
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("invalid trust domain: {0}")]
    TrustDomain(#[from] IdentityError),
    /// The CSR cannot be parsed or its signature is wrong.
    #[error("bad csr: {0}")]
    Csr(#[source] rcgen::Error),
    /// The CSR asks for names other than exactly the identity the caller may hold.
    #[error("csr subject alternative names {found:?} are not exactly [{expected}]")]
    CsrIdentity {
        /// The identity the caller may hold.
        expected: String,
        /// What the CSR asked for.
        found: Vec<String>,
    },
    /// The requested validity is empty or reversed.
    #[error("invalid validity: not_after is not after not_before")]
    InvalidValidity,
    /// The system random source failed.
    #[error("cannot get random bytes for a serial number")]
    Random,
}

/// Signs workload certificates with a root (or intermediate) key.
pub struct CertificateAuthority {
    /// The CA certificate as rcgen needs it for signing (issuer name and key identifier).
    issuer: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate first, then its chain up to the root.
    bundle: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
}

impl CertificateAuthority {
    /// Generates a self-signed ECDSA P-256 root for `trust_domain`, valid for `validity`.
    pub fn generate_root(trust_domain: &str, validity: Duration) -> Result<Self, CaError> {
        spiffe::validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        // A unique name per root: verifiers match issuers by name, so a leaf from another root
        // of the same trust domain then fails as "unknown issuer", not "bad signature".
        let tag: String = serial.to_bytes()[..4].iter().map(|b| format!("{b:02x}")).collect();
        params.distinguished_name.push(DnType::CommonName, format!("ambit root ca {tag}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(serial);
        let issuer = params.self_signed(&key)?;
        Ok(Self { bundle: vec![issuer.der().clone()], not_after: now + validity, issuer, key })
    }

    /// Loads a CA from PEM: `cert_pem` is the CA certificate, optionally followed by its chain up
    /// to the root; `key_pem` its PKCS#8 key. The certificate must be a CA and match the key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let bundle = cert::parse_certs_pem(cert_pem)?;
        let (_, ca) = X509Certificate::from_der(&bundle[0]).map_err(CertError::from)?;
        let is_ca = ca.basic_constraints().map_err(CertError::from)?.is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(CaError::NotCa);
        }
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        if key.public_key_der() != ca.public_key().raw {
            return Err(CaError::KeyMismatch);
        }
        let not_after = cert::asn1_to_system_time(ca.validity().not_after);
        // rcgen signs with a Certificate; rebuilding one from the parsed CA keeps its subject
        // name and key identifier, which is what the leaves refer to.
        let issuer = CertificateParams::from_ca_cert_der(&bundle[0])?.self_signed(&key)?;
        Ok(Self { issuer, key, bundle, not_after })
    }

    /// The CA certificate followed by its chain, as PEM (the file a dev CA is loaded from).
    pub fn cert_pem(&self) -> String {
        self.bundle.iter().map(|c| cert::to_pem("CERTIFICATE", c)).collect()
    }

    /// The CA's private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The trust anchor (the last certificate of the bundle) as PEM.
    pub fn roots_pem(&self) -> String {
        cert::to_pem("CERTIFICATE", self.root())
    }

    /// End of the CA certificate's validity; leaves never outlive it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Development-mode signing: a new P-256 key and a leaf for `identity`, valid from five
    /// minutes ago (clock skew) for `ttl`.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCertificate, CaError> {
        let now = SystemTime::now();
        self.issue_with_validity(identity, now - CLOCK_SKEW, now + ttl)
    }

    /// Like [`issue`](Self::issue) with an explicit validity, which may lie in the past (tests of
    /// expiry and rotation use this). `not_after` is capped at the CA's own `not_after`.
    pub fn issue_with_validity(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.sign_leaf(&key, identity, not_before, not_after)?;
        let mut chain = Vec::with_capacity(self.bundle.len());
        chain.push(leaf.der().clone());
        chain.extend_from_slice(&self.bundle[..self.bundle.len() - 1]);
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok(WorkloadCertificate::from_der(chain, key, vec![self.root().clone()])?)
    }

    /// Signs a PEM PKCS#10 CSR for the CA service. The CSR must ask for exactly one subject
    /// alternative name, the URI `identity`; every other field of the leaf is set by the CA.
    /// Returns the PEM chain `[leaf, ..intermediates, root]`.
    pub fn sign_csr(&self, csr_pem: &str, identity: &Identity, ttl: Duration) -> Result<Vec<String>, CaError> {
        // from_pem checks the CSR's self-signature: the caller holds the key.
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::Csr)?;
        let expected = identity.to_string();
        let sans = &csr.params.subject_alt_names;
        let matches = matches!(sans.as_slice(), [SanType::URI(uri)] if uri.as_str() == expected);
        if !matches {
            return Err(CaError::CsrIdentity { expected, found: sans.iter().map(describe_san).collect() });
        }
        let now = SystemTime::now();
        let leaf = self.sign_leaf(&csr.public_key, identity, now - CLOCK_SKEW, now + ttl)?;
        let mut chain = Vec::with_capacity(self.bundle.len() + 1);
        chain.push(leaf.pem());
        chain.extend(self.bundle.iter().map(|c| cert::to_pem("CERTIFICATE", c)));
        Ok(chain)
    }

    fn root(&self) -> &CertificateDer<'static> {
        self.bundle.last().expect("bug: a ca bundle is never empty")
    }

    fn sign_leaf(
        &self,
        public_key: &impl PublicKeyData,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<rcgen::Certificate, CaError> {
        let not_after = not_after.min(self.not_after);
        if not_after <= not_before {
            return Err(CaError::InvalidValidity);
        }
        let mut params = CertificateParams::default();
        // Like Istio: an empty subject, so the SAN carries the identity and must be critical
        // (RFC 5280 4.2.1.6), which rcgen's own SAN writer does not do.
        params.distinguished_name = DistinguishedName::new();
        let mut san = CustomExtension::from_oid_content(OID_SUBJECT_ALT_NAME, uri_san_der(&identity.to_string()));
        san.set_criticality(true);
        params.custom_extensions = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        Ok(params.signed_by(public_key, &self.issuer, &self.key)?)
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("bundle_len", &self.bundle.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// For a CA client: a fresh P-256 key and a CSR carrying `identity` as its only URI SAN.
/// Returns `(csr_pem, key_pem)`.
pub fn generate_csr(identity: &Identity) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// A positive 128-bit serial (RFC 5280: positive, at most 20 bytes, unpredictable).
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    crate::provider().secure_random.fill(&mut bytes).map_err(|_| CaError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// DER of a subjectAltName holding one URI: SEQUENCE { [6] IMPLICIT IA5String }.
fn uri_san_der(uri: &str) -> Vec<u8> {
    let mut name = vec![0x86];
    push_der_len(&mut name, uri.len());
    name.extend_from_slice(uri.as_bytes());
    let mut seq = vec![0x30];
    push_der_len(&mut seq, name.len());
    seq.extend_from_slice(&name);
    seq
}

fn push_der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(uri) => uri.as_str().to_owned(),
        SanType::DnsName(name) => format!("dns:{}", name.as_str()),
        SanType::Rfc822Name(name) => format!("email:{}", name.as_str()),
        SanType::IpAddress(ip) => format!("ip:{ip}"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    const HOUR: Duration = Duration::from_secs(3600);

    fn root() -> CertificateAuthority {
        CertificateAuthority::generate_root("cluster.local", 24 * HOUR).unwrap()
    }

    fn reviews() -> Identity {
        Identity::new("cluster.local", "default", "reviews")
    }

    #[test]
    fn issued_leaf_has_the_identity_eku_and_validity_of_a_workload_certificate() {
        let ca = root();
        let before = SystemTime::now();
        let cert = ca.issue(&reviews(), HOUR).unwrap();
        assert_eq!(cert.identity(), &reviews());
        assert_eq!(cert.chain().len(), 1, "a root signs directly: no intermediates");
        assert_eq!(cert.roots().len(), 1);

        let (_, leaf) = X509Certificate::from_der(&cert.chain()[0]).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "an empty subject needs a critical san");
        assert_eq!(san.value.general_names, vec![GeneralName::URI("spiffe://cluster.local/ns/default/sa/reviews")]);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature());
        assert!(!ku.key_cert_sign());
        assert!(!leaf.is_ca());
        assert_eq!(leaf.subject().iter().count(), 0);

        let skew = before.duration_since(cert.not_before()).unwrap();
        assert!((CLOCK_SKEW - Duration::from_secs(2)..=CLOCK_SKEW + Duration::from_secs(2)).contains(&skew));
        let ttl = cert.not_after().duration_since(before).unwrap();
        assert!(ttl <= HOUR && ttl > HOUR - Duration::from_secs(2), "{ttl:?}");

        // The leaf chains to the root for both usages.
        let (_, root) = X509Certificate::from_der(&cert.roots()[0]).unwrap();
        assert!(root.is_ca());
        assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
        leaf.verify_signature(Some(root.public_key())).unwrap();
    }

    #[test]
    fn serials_are_random() {
        let ca = root();
        let a = ca.issue(&reviews(), HOUR).unwrap();
        let b = ca.issue(&reviews(), HOUR).unwrap();
        assert_ne!(a.serial(), b.serial());
        assert_eq!(a.serial().len(), 32);
    }

    #[test]
    fn leaves_never_outlive_the_ca() {
        let ca = CertificateAuthority::generate_root("cluster.local", HOUR).unwrap();
        let cert = ca.issue(&reviews(), 10 * HOUR).unwrap();
        assert!(cert.not_after() <= ca.not_after() + Duration::from_secs(1));
    }

    #[test]
    fn from_pem_round_trips_and_signs_leaves_that_chain_to_the_same_root() {
        let ca = root();
        let loaded = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.roots_pem(), ca.roots_pem());
        let cert = loaded.issue(&reviews(), HOUR).unwrap();
        assert_eq!(cert.roots_pem(), ca.roots_pem());
        let (_, leaf) = X509Certificate::from_der(&cert.chain()[0]).unwrap();
        let (_, root) = X509Certificate::from_der(&cert.roots()[0]).unwrap();
        assert_eq!(leaf.issuer().as_raw(), root.subject().as_raw());
        leaf.verify_signature(Some(root.public_key())).unwrap();
    }

    #[test]
    fn from_pem_rejects_a_certificate_that_is_not_a_ca() {
        let ca = root();
        let leaf = ca.issue(&reviews(), HOUR).unwrap();
        let err = CertificateAuthority::from_pem(&leaf.chain_pem(), &leaf.key_pem()).unwrap_err();
        assert!(matches!(err, CaError::NotCa), "{err}");
    }

    #[test]
    fn from_pem_rejects_a_key_that_does_not_match() {
        let ca = root();
        let other = root();
        let err = CertificateAuthority::from_pem(&ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch), "{err}");
    }

    #[test]
    fn invalid_trust_domains_are_rejected() {
        let err = CertificateAuthority::generate_root("Cluster Local", HOUR).unwrap_err();
        assert!(matches!(err, CaError::TrustDomain(_)), "{err}");
    }

    #[test]
    fn sign_csr_accepts_a_csr_for_the_callers_identity() {
        let ca = root();
        let (csr, key) = generate_csr(&reviews()).unwrap();
        let chain = ca.sign_csr(&csr, &reviews(), HOUR).unwrap();
        assert_eq!(chain.len(), 2, "leaf and root");
        assert_eq!(chain[1], ca.roots_pem());
        let cert = WorkloadCertificate::from_pem(&chain.concat(), &key, &ca.roots_pem()).unwrap();
        assert_eq!(cert.identity(), &reviews());
        assert_eq!(cert.chain().len(), 1);
        let (_, leaf) = X509Certificate::from_der(&cert.chain()[0]).unwrap();
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
    }

    #[test]
    fn sign_csr_rejects_a_csr_for_another_identity() {
        let ca = root();
        let (csr, _) = generate_csr(&Identity::new("cluster.local", "kube-system", "admin")).unwrap();
        let err = ca.sign_csr(&csr, &reviews(), HOUR).unwrap_err();
        match err {
            CaError::CsrIdentity { expected, found } => {
                assert_eq!(expected, reviews().to_string());
                assert_eq!(found, vec!["spiffe://cluster.local/ns/kube-system/sa/admin"]);
            }
            other => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn sign_csr_rejects_extra_names() {
        let ca = root();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(reviews().to_string().try_into().unwrap()),
            SanType::DnsName("kubernetes.default.svc".try_into().unwrap()),
        ];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = ca.sign_csr(&csr, &reviews(), HOUR).unwrap_err();
        assert!(matches!(err, CaError::CsrIdentity { .. }), "{err}");
    }

    #[test]
    fn sign_csr_rejects_garbage() {
        let err = root().sign_csr("not a csr", &reviews(), HOUR).unwrap_err();
        assert!(matches!(err, CaError::Csr(_)), "{err}");
    }

    #[test]
    fn ca_is_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CertificateAuthority>();
        assert_send_sync::<WorkloadCertificate>();
    }

    #[test]
    fn long_uris_get_long_form_der_lengths() {
        let der = uri_san_der(&"a".repeat(300));
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x30]);
        assert_eq!(&der[4..8], &[0x86, 0x82, 0x01, 0x2c]);
    }
}
