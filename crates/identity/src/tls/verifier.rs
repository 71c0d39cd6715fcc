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

    /// Validates the chain for `role` at `now`, requires the leaf's EKU for it, then lets `accept` judge the
    /// leaf's identity.
    fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        role: Role,
        accept: impl FnOnce(Identity) -> Result<(), PeerError>,
    ) -> Result<(), rustls::Error> {
        let leaf = EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        leaf.verify_for_usage(self.algs.all, &self.anchors, intermediates, now, role.usage(), None, None)
            .map_err(pki_error)?;
        let facts = cert::leaf_facts(end_entity).map_err(|e| peer_error(PeerError::NoIdentity(e)))?;
        // webpki accepts a leaf without any EKU; the mesh's leaves always carry it.
        if !role.has_eku(&facts) {
            return Err(CertificateError::InvalidPurpose.into());
        }
        accept(facts.identity).map_err(peer_error)
    }
}

/// Which end of the handshake a leaf authenticates.
#[derive(Clone, Copy)]
enum Role {
    Client,
    Server,
}

impl Role {
    fn usage(self) -> KeyUsage {
        match self {
            Role::Client => KeyUsage::client_auth(),
            Role::Server => KeyUsage::server_auth(),
        }
    }

    fn has_eku(self, facts: &LeafFacts) -> bool {
        match self {
            Role::Client => facts.client_auth,
            Role::Server => facts.server_auth,
        }
    }
}

/// The signature checks and schemes both verifier traits ask for, answered by the verifier's `anchors` (the two
/// traits are distinct, so a macro rather than a shared impl).
macro_rules! signatures_by_anchors {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.anchors.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.anchors.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.anchors.algs.supported_schemes()
        }
    };
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
        self.anchors.verify_peer(end_entity, intermediates, now, Role::Client, |peer| {
            if peer.trust_domain != self.trust_domain {
                return Err(PeerError::ForeignTrustDomain { peer, trust_domain: self.trust_domain.clone() });
            }
            Ok(())
        })?;
        Ok(ClientCertVerified::assertion())
    }

    signatures_by_anchors!();
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
        self.anchors.verify_peer(end_entity, intermediates, now, Role::Server, |peer| {
            if !self.expected.contains(&peer) {
                return Err(PeerError::Unexpected { peer, expected: self.expected.clone() });
            }
            Ok(())
        })?;
        Ok(ServerCertVerified::assertion())
    }

    signatures_by_anchors!();
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
