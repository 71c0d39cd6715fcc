//! The serving certificate of the controller's gRPC port (xDS and the CA on
//! 15012): a server certificate with DNS and IP names, signed by the mesh
//! root, which ztunnels already trust.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use ambit_identity::CertificateAuthority;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;

/// Validity of a serving certificate (capped at the root's own end).
pub const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Clock skew allowed for peers checking the certificate.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
const PEM_END: &str = "-----END CERTIFICATE-----";

/// Why the serving certificate cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// Neither a DNS name nor an IP address was given.
    #[error("a serving certificate needs at least one dns name or ip address")]
    NoNames,
    /// A DNS name is not valid in a certificate.
    #[error("invalid dns name {name:?}: {source}")]
    DnsName {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    /// The root's certificate or key cannot be used by rcgen.
    #[error("cannot use the root to sign: {0}")]
    Root(#[source] rcgen::Error),
    /// Building or signing the certificate failed.
    #[error("cannot sign the serving certificate: {0}")]
    Sign(#[source] rcgen::Error),
}

/// A PEM server certificate chain `[leaf, ..intermediates]` (without the root)
/// for `dns_names` and `ips`, and its new PKCS#8 key as PEM.
pub fn serving_identity(
    ca: &CertificateAuthority,
    dns_names: &[String],
    ips: &[IpAddr],
) -> Result<(String, String), ServingError> {
    if dns_names.is_empty() && ips.is_empty() {
        return Err(ServingError::NoNames);
    }
    let bundle_pem = ca.cert_pem();
    let ca_der = rustls_pki_types::CertificateDer::from_pem_slice(bundle_pem.as_bytes())
        .map_err(|_| ServingError::Root(rcgen::Error::CouldNotParseCertificate))?;
    let ca_key = KeyPair::from_pem(&ca.key_pem()).map_err(ServingError::Root)?;
    // Rebuilt from the CA's DER so the leaf's issuer name and key identifier match it.
    let issuer = CertificateParams::from_ca_cert_der(&ca_der)
        .and_then(|p| p.self_signed(&ca_key))
        .map_err(ServingError::Root)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let common_name = dns_names.first().cloned().unwrap_or_else(|| ips[0].to_string());
    params.distinguished_name.push(DnType::CommonName, common_name);
    for name in dns_names {
        let dns = name.clone().try_into().map_err(|source| ServingError::DnsName { name: name.clone(), source })?;
        params.subject_alt_names.push(SanType::DnsName(dns));
    }
    params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + SERVING_VALIDITY).min(ca.not_after()).into();

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(ServingError::Sign)?;
    let leaf = params.signed_by(&key, &issuer, &ca_key).map_err(ServingError::Sign)?;
    let mut chain = leaf.pem();
    chain.push_str(&intermediates_pem(&bundle_pem));
    Ok((chain, key.serialize_pem()))
}

/// The blocks of a CA bundle PEM except the last (the root).
fn intermediates_pem(bundle_pem: &str) -> String {
    let blocks: Vec<&str> = bundle_pem.split_inclusive(PEM_END).filter(|b| b.contains(PEM_END)).collect();
    let mut out = String::new();
    for block in &blocks[..blocks.len().saturating_sub(1)] {
        out.push_str(block.trim_start());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use std::sync::Arc;

    #[test]
    fn serving_certificate_verifies_against_the_root_for_its_dns_name_and_ip() {
        let ca = CertificateAuthority::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let (chain, _key) =
            serving_identity(&ca, &["ambit-controller.ambit-system.svc".to_string()], &["127.0.0.1".parse().unwrap()])
                .unwrap();
        let certs: Vec<_> =
            rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(certs.len(), 1, "a root signs directly: the chain is the leaf");
        let mut roots = rustls::RootCertStore::empty();
        for root in rustls_pki_types::CertificateDer::pem_slice_iter(ca.roots_pem().as_bytes()) {
            roots.add(root.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
        let now = rustls_pki_types::UnixTime::now();
        for name in ["ambit-controller.ambit-system.svc", "127.0.0.1"] {
            let name = rustls_pki_types::ServerName::try_from(name).unwrap();
            verifier.verify_server_cert(&certs[0], &[], &name, &[], now).unwrap();
        }
        let other = rustls_pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(verifier.verify_server_cert(&certs[0], &[], &other, &[], now).is_err());
    }

    #[test]
    fn a_serving_certificate_needs_a_name() {
        let ca = CertificateAuthority::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
        assert!(matches!(serving_identity(&ca, &[], &[]), Err(ServingError::NoNames)));
    }

    #[test]
    fn intermediates_are_every_block_but_the_root() {
        let bundle = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n";
        assert_eq!(intermediates_pem(bundle), "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n");
        assert_eq!(intermediates_pem(&bundle[..bundle.len() / 2 + 1]), "");
    }
}
