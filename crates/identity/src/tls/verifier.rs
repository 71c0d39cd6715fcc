//! Certificate verifiers that replace hostname checks with SPIFFE identity checks.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use super::{PeerError, TlsError};
use crate::cert::{self, LeafFacts};
use crate::spiffe::Identity;

/// Chain validation against the mesh's trust anchors, shared by both verifiers.
struct Anchors {
    anchors: Vec<TrustAnchor<'static>>,
    /// Subjects of the anchors, sent as CA hints in the CertificateRequest.
    subjects: Vec<DistinguishedName>,
    algs: WebPkiSupportedAlgorithms,
}

impl Anchors {
    fn new(roots: &[CertificateDer<'static>]) -> Result<Self, TlsError> {
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let anchors = roots
            .iter()
            .map(|root| webpki::anchor_from_trusted_cert(root).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TlsError::BadRoot)?;
        let subjects = anchors.iter().map(|a| DistinguishedName::from(a.subject.as_ref().to_vec())).collect();
        Ok(Self { anchors, subjects, algs: crate::provider().signature_verification_algorithms })
    }

    /// Validates the chain for `usage` at `now`, then reads the leaf's identity and EKUs.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<LeafFacts, rustls::Error> {
        let leaf = EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        leaf.verify_for_usage(self.algs.all, &self.anchors, intermediates, now, usage, None, None)
            .map_err(pki_error)?;
        cert::leaf_facts(end_entity).map_err(|e| peer_error(PeerError::NoIdentity(e)))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

/// Server side: requires a client certificate from the mesh's CA, with EKU clientAuth and a
/// SPIFFE identity in the server's trust domain.
pub(crate) struct SpiffeClientVerifier {
    anchors: Anchors,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(roots: &[CertificateDer<'static>], trust_domain: String) -> Result<Self, TlsError> {
        Ok(Self { anchors: Anchors::new(roots)?, trust_domain })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.anchors.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let facts = self.anchors.verify(end_entity, intermediates, now, KeyUsage::client_auth())?;
        // webpki accepts a leaf without any EKU; the mesh's leaves always carry it.
        if !facts.client_auth {
            return Err(CertificateError::InvalidPurpose.into());
        }
        if facts.identity.trust_domain != self.trust_domain {
            return Err(peer_error(PeerError::ForeignTrustDomain {
                peer: facts.identity,
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.anchors.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.anchors.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.anchors.algs.supported_schemes()
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.anchors.anchors.len())
            .finish()
    }
}

/// Client side: the server's chain must lead to the mesh's roots and its identity must be one
/// of `expected`. The TLS server name is ignored.
pub(crate) struct SpiffeServerVerifier {
    anchors: Anchors,
    expected: Vec<Identity>,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(roots: &[CertificateDer<'static>], expected: Vec<Identity>) -> Result<Self, TlsError> {
        if expected.is_empty() {
            return Err(TlsError::NoExpectedIdentity);
        }
        Ok(Self { anchors: Anchors::new(roots)?, expected })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let facts = self.anchors.verify(end_entity, intermediates, now, KeyUsage::server_auth())?;
        if !facts.server_auth {
            return Err(CertificateError::InvalidPurpose.into());
        }
        if !self.expected.contains(&facts.identity) {
            return Err(peer_error(PeerError::Unexpected { peer: facts.identity, expected: self.expected.clone() }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.anchors.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.anchors.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.anchors.algs.supported_schemes()
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .field("roots", &self.anchors.anchors.len())
            .finish()
    }
}

fn peer_error(e: PeerError) -> rustls::Error {
    CertificateError::Other(OtherError(Arc::new(e))).into()
}

/// The same mapping rustls' own webpki verifiers apply (theirs is private).
fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error::*;
    match error {
        BadDer | BadDerTime | TrailingData(_) => CertificateError::BadEncoding.into(),
        CertNotValidYet { time, not_before } => CertificateError::NotValidYetContext { time, not_before }.into(),
        CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after }.into(),
        InvalidCertValidity => CertificateError::Expired.into(),
        UnknownIssuer => CertificateError::UnknownIssuer.into(),
        CertRevoked => CertificateError::Revoked.into(),
        InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        #[allow(deprecated)]
        UnsupportedSignatureAlgorithm | UnsupportedSignatureAlgorithmForPublicKey => {
            CertificateError::UnsupportedSignatureAlgorithm.into()
        }
        #[allow(deprecated)]
        RequiredEkuNotFound | RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose.into(),
        other => CertificateError::Other(OtherError(Arc::new(other))).into(),
    }
}
