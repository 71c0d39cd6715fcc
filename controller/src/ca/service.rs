//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: signs a workload
//! certificate for a caller, but only for an identity that runs on the
//! caller's node according to the latest snapshot (a node proxy), or the
//! caller's own (a workload such as a waypoint, with its own token; any other
//! identity is `permission_denied`).
//!
//! The identity asked for is the CSR's one SPIFFE name. Istio's ztunnel also
//! names it in the request's `metadata` struct as `ImpersonatedIdentity`
//! (Ambit's does too); when present it must be the CSR's. The node is never
//! taken from the request: it comes from the caller's credential.

use std::sync::Arc;
use std::time::Duration;

use ambit_api::ca::istio_certificate_service_server::{IstioCertificateService, IstioCertificateServiceServer};
use ambit_api::ca::{IstioCertificateRequest, IstioCertificateResponse};
use ambit_identity::{CertificateAuthority, Identity};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rcgen::{CertificateSigningRequestParams, SanType};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::auth::AsyncCallerAuthenticator;
use crate::model::SnapshotRx;

/// Key of the request metadata naming the identity a node proxy asks for on
/// behalf of one of its pods (as Istio's ztunnel sends it).
pub const IMPERSONATED_IDENTITY_KEY: &str = "ImpersonatedIdentity";

/// Longest validity the CA grants unless configured otherwise.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// How a certificate request ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// A certificate was issued.
    success,
    /// No or a wrong credential.
    unauthenticated,
    /// The identity does not run on the caller's node.
    permission_denied,
    /// The CSR is malformed or asks for the wrong kind of name.
    invalid_argument,
    /// Signing failed.
    internal,
}

/// Labels of `ambit_ca_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// How the request ended.
    pub outcome: Outcome,
}

/// The CA service (cheap to clone: one per listener).
#[derive(Clone)]
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    trust_domain: String,
    auth: Arc<dyn AsyncCallerAuthenticator>,
    snapshots: SnapshotRx,
    max_ttl: Duration,
    requests: Family<OutcomeLabels, Counter>,
}

impl CaService {
    /// A CA service signing with `ca` for identities of `trust_domain`, for
    /// callers `auth` accepts, as allowed by the latest of `snapshots`.
    /// Registers `ambit_ca_requests_total{outcome}` into `registry`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        trust_domain: impl Into<String>,
        auth: Arc<dyn AsyncCallerAuthenticator>,
        snapshots: SnapshotRx,
        registry: &mut Registry,
    ) -> Self {
        let requests = Family::<OutcomeLabels, Counter>::default();
        registry.register("ambit_ca_requests", "Certificate signing requests, by outcome", requests.clone());
        CaService { ca, trust_domain: trust_domain.into(), auth, snapshots, max_ttl: DEFAULT_MAX_TTL, requests }
    }

    /// Caps the validity of issued certificates at `max_ttl` (default 24 h).
    pub fn with_max_ttl(mut self, max_ttl: Duration) -> Self {
        self.max_ttl = max_ttl;
        self
    }

    /// The service wrapped for a tonic server.
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }

    async fn handle(&self, request: &Request<IstioCertificateRequest>) -> Result<(Identity, Vec<String>), Status> {
        let caller = self.auth.authenticate_async(request.metadata()).await?;
        let req = request.get_ref();
        let identity = csr_identity(&req.csr, &self.trust_domain)?;
        if let Some(impersonated) = impersonated_identity(req.metadata.as_ref())? {
            if impersonated != identity {
                return Err(Status::invalid_argument(format!(
                    "{IMPERSONATED_IDENTITY_KEY} {impersonated} is not the csr's identity {identity}"
                )));
            }
        }
        let key = (identity.namespace.clone(), identity.service_account.clone());
        let own = caller.service_account.as_ref() == Some(&key);
        if let Some((ns, sa)) = caller.workload_identity().filter(|_| !own) {
            return Err(Status::permission_denied(format!(
                "a workload may get only its own identity: the caller is {ns}/{sa}, the csr asks for {identity}"
            )));
        }
        if !own {
            let node = caller.node.as_deref().ok_or_else(|| {
                Status::unauthenticated(
                    "the credential names no node (a shared bootstrap token without x-ambit-node): \
                     give each node its own token (--bootstrap-tokens)",
                )
            })?;
            let on_node = self.snapshots.borrow().identities_by_node.get(node).is_some_and(|ids| ids.contains(&key));
            if !on_node {
                return Err(Status::permission_denied(format!(
                    "node {node} runs no workload with identity {identity}"
                )));
            }
        }
        let ttl = match u64::try_from(req.validity_duration) {
            Ok(secs) if secs > 0 => Duration::from_secs(secs).min(self.max_ttl),
            _ => self.max_ttl,
        };
        let chain = self.ca.sign_csr(&req.csr, &identity, ttl).map_err(|e| match e {
            ambit_identity::CaError::Csr(_) | ambit_identity::CaError::CsrIdentity { .. } => {
                Status::invalid_argument(e.to_string())
            }
            other => Status::internal(format!("cannot sign: {other}")),
        })?;
        info!(node = caller.node.as_deref().unwrap_or("-"), own, identity = %identity, ttl_secs = ttl.as_secs(), "issued workload certificate");
        Ok((identity, chain))
    }
}

/// The identity named by `ImpersonatedIdentity` in the request metadata, if any.
fn impersonated_identity(metadata: Option<&prost_types::Struct>) -> Result<Option<Identity>, Status> {
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY_KEY)) else {
        return Ok(None);
    };
    let Some(prost_types::value::Kind::StringValue(uri)) = &value.kind else {
        return Err(Status::invalid_argument(format!("metadata {IMPERSONATED_IDENTITY_KEY} is not a string")));
    };
    uri.parse()
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("metadata {IMPERSONATED_IDENTITY_KEY} {uri:?}: {e}")))
}

/// The one SPIFFE identity of `trust_domain` a PEM CSR asks for.
fn csr_identity(csr_pem: &str, trust_domain: &str) -> Result<Identity, Status> {
    // from_pem also checks the CSR's signature: the caller holds the key.
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| Status::invalid_argument(format!("bad csr: {e}")))?;
    let uri = match csr.params.subject_alt_names.as_slice() {
        [SanType::URI(uri)] => uri.as_str().to_owned(),
        [other] => {
            return Err(Status::invalid_argument(format!("csr subject alternative name {other:?} is not a spiffe uri")))
        }
        sans => {
            return Err(Status::invalid_argument(format!(
                "csr has {} subject alternative names, want exactly one spiffe uri",
                sans.len()
            )))
        }
    };
    let identity: Identity =
        uri.parse().map_err(|e| Status::invalid_argument(format!("csr subject alternative name: {e}")))?;
    if identity.trust_domain != trust_domain {
        return Err(Status::invalid_argument(format!("csr identity {identity} is not in trust domain {trust_domain}")));
    }
    Ok(identity)
}

fn outcome_of(code: tonic::Code) -> Outcome {
    match code {
        tonic::Code::Unauthenticated => Outcome::unauthenticated,
        tonic::Code::PermissionDenied => Outcome::permission_denied,
        tonic::Code::InvalidArgument => Outcome::invalid_argument,
        _ => Outcome::internal,
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        match self.handle(&request).await {
            Ok((_, cert_chain)) => {
                self.requests.get_or_create(&OutcomeLabels { outcome: Outcome::success }).inc();
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(status) => {
                let outcome = outcome_of(status.code());
                self.requests.get_or_create(&OutcomeLabels { outcome }).inc();
                warn!(code = ?status.code(), message = status.message(), "refused a certificate request");
                Err(status)
            }
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
