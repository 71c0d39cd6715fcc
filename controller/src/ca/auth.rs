//! Who is calling: the node a ztunnel runs on, proven by a credential in the
//! gRPC metadata. Kubernetes mode reviews the ztunnel's service-account token
//! ([`super::token_review`]); file mode maps per-node bootstrap tokens to their
//! nodes ([`super::node_tokens`]), or admits one bootstrap token shared by all
//! ztunnels ([`BootstrapTokenAuthenticator`]), which proves no node: a caller
//! may name its node in `x-ambit-node`, else the xDS stream takes it from the
//! Node the caller declares and the CA refuses. All sit behind
//! [`AsyncCallerAuthenticator`], which the xDS and CA handlers call first.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tonic::metadata::MetadataMap;
use tonic::Status;

/// Metadata key in which Ambit's ztunnel names its node (optional: never
/// required, and never stronger than a credential that names the node).
pub const NODE_METADATA_KEY: &str = "x-ambit-node";
const BEARER: &str = "Bearer ";

/// An authenticated caller: a node proxy (ztunnel), whose credential names its
/// node (or, with the shared bootstrap token, nothing), or a workload (a
/// waypoint), whose credential names its own identity and no node. A workload
/// caller may get only its own certificate, and its xDS stream serves the
/// waypoint Gateway named after its service account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller {
    /// The Kubernetes node the caller runs on, when known: from its credential
    /// (a per-node token, a TokenReview) or, with the shared bootstrap token,
    /// from its `x-ambit-node` header. `None`: the xDS stream takes the node
    /// the caller declares in its `Node`, and the CA refuses the caller.
    pub node: Option<String>,
    /// The caller's own workload identity, `(namespace, service account)`,
    /// when its credential names one (a TokenReview's user).
    pub service_account: Option<(String, String)>,
}

impl Caller {
    /// A caller on `node`, with no identity of its own.
    pub fn on_node(node: impl Into<String>) -> Self {
        Caller { node: Some(node.into()), service_account: None }
    }

    /// A workload with identity `(namespace, service account)`, on no node it could speak for.
    pub fn workload(namespace: impl Into<String>, service_account: impl Into<String>) -> Self {
        Caller { node: None, service_account: Some((namespace.into(), service_account.into())) }
    }

    /// The identity of a workload caller; `None` for node proxies.
    pub fn workload_identity(&self) -> Option<&(String, String)> {
        self.service_account.as_ref().filter(|_| self.node.is_none())
    }
}

/// A boxed authentication future (the trait stays object-safe).
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Caller, Status>> + Send + 'a>>;

/// Authenticates a gRPC caller from its metadata, possibly over the network.
///
/// Object-safe so it can be held as `Arc<dyn AsyncCallerAuthenticator>`.
pub trait AsyncCallerAuthenticator: Send + Sync {
    /// The caller, `unauthenticated` when the credential is refused, or
    /// `unavailable` when it cannot be checked now.
    fn authenticate_async<'a>(&'a self, metadata: &'a MetadataMap) -> AuthFuture<'a>;
}

/// Why the bootstrap token cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token file cannot be read.
    #[error("cannot read the bootstrap token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The token file holds only whitespace.
    #[error("the bootstrap token file {0} is empty")]
    Empty(PathBuf),
    /// The token cannot travel in an HTTP header.
    #[error("the bootstrap token holds characters not allowed in a header")]
    NotHeaderSafe,
}

/// File mode with one token shared by every caller: it proves membership of
/// the mesh but no node, so the node is the one the caller names (header
/// `x-ambit-node`), if any. Per-node tokens ([`super::node_tokens`]) are the
/// credential that scopes a caller to its node.
pub struct BootstrapTokenAuthenticator {
    token: Vec<u8>,
}

impl std::fmt::Debug for BootstrapTokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapTokenAuthenticator").finish_non_exhaustive()
    }
}

impl BootstrapTokenAuthenticator {
    /// Reads the token from `path` (trimmed, non-empty).
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: path.to_owned(), source })?;
        Self::new(&text).map_err(|e| match e {
            AuthError::Empty(_) => AuthError::Empty(path.to_owned()),
            other => other,
        })
    }

    /// Uses `token` (trimmed, non-empty).
    pub fn new(token: &str) -> Result<Self, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Empty(PathBuf::new()));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::NotHeaderSafe);
        }
        Ok(BootstrapTokenAuthenticator { token: token.as_bytes().to_vec() })
    }
}

/// Compares in time that depends only on the lengths, never on where the
/// first difference is, so a caller cannot guess the token byte by byte.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// The bearer token of `metadata`, or why there is none.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization metadata (want \"Bearer <token>\")"))?;
    let value = value.to_str().map_err(|_| Status::unauthenticated("authorization metadata is not ascii"))?;
    value
        .strip_prefix(BEARER)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization metadata is not \"Bearer <token>\""))
}

/// The node named in `x-ambit-node`, if the caller sent a non-empty one.
pub fn declared_node(metadata: &MetadataMap) -> Option<&str> {
    metadata.get(NODE_METADATA_KEY).and_then(|v| v.to_str().ok()).map(str::trim).filter(|n| !n.is_empty())
}

impl BootstrapTokenAuthenticator {
    /// The caller (on the node it names, if any), or `Status::unauthenticated`
    /// saying what is missing or wrong.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer_token(metadata)?;
        if !constant_time_eq(token.as_bytes(), &self.token) {
            return Err(Status::unauthenticated("invalid bootstrap token"));
        }
        Ok(Caller { node: declared_node(metadata).map(str::to_owned), service_account: None })
    }
}

/// File mode needs no round trip: the bootstrap token is checked in place.
impl AsyncCallerAuthenticator for BootstrapTokenAuthenticator {
    fn authenticate_async<'a>(&'a self, metadata: &'a MetadataMap) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.authenticate(metadata)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn the_right_token_and_a_node_name_authenticate_the_node() {
        let auth = BootstrapTokenAuthenticator::new(" s3cret\n").unwrap();
        let caller =
            auth.authenticate(&metadata(&[("authorization", "Bearer s3cret"), ("x-ambit-node", "node-a")])).unwrap();
        assert_eq!(caller, Caller::on_node("node-a"));
    }

    #[test]
    fn the_shared_token_without_a_node_header_authenticates_no_node() {
        let auth = BootstrapTokenAuthenticator::new("s3cret").unwrap();
        for md in [
            metadata(&[("authorization", "Bearer s3cret")]),
            metadata(&[("authorization", "Bearer s3cret"), ("x-ambit-node", " ")]),
        ] {
            assert_eq!(auth.authenticate(&md).unwrap(), Caller::default());
        }
    }

    #[test]
    fn a_wrong_or_missing_token_is_unauthenticated() {
        let auth = BootstrapTokenAuthenticator::new("s3cret").unwrap();
        for (md, want) in [
            (metadata(&[("x-ambit-node", "n")]), "missing authorization"),
            (metadata(&[("authorization", "Bearer s3creT"), ("x-ambit-node", "n")]), "invalid bootstrap token"),
            (metadata(&[("authorization", "Bearer s3cre"), ("x-ambit-node", "n")]), "invalid bootstrap token"),
            (metadata(&[("authorization", "Basic s3cret"), ("x-ambit-node", "n")]), "not \"Bearer"),
        ] {
            let status = auth.authenticate(&md).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(status.message().contains(want), "{} does not say {want}", status.message());
        }
    }

    #[test]
    fn an_empty_token_file_is_refused_with_its_name() {
        let path = std::env::temp_dir().join(format!("ambit-empty-token-{}", std::process::id()));
        std::fs::write(&path, "  \n").unwrap();
        let err = BootstrapTokenAuthenticator::from_file(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, AuthError::Empty(_)));
        assert!(err.to_string().contains("ambit-empty-token"), "{err}");
    }

    #[tokio::test]
    async fn the_async_path_answers_as_the_sync_one() {
        let auth: Box<dyn AsyncCallerAuthenticator> = Box::new(BootstrapTokenAuthenticator::new("t").unwrap());
        let md = metadata(&[("authorization", "Bearer t"), ("x-ambit-node", "node-b")]);
        assert_eq!(auth.authenticate_async(&md).await.unwrap(), Caller::on_node("node-b"));
        let err = auth.authenticate_async(&MetadataMap::new()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
