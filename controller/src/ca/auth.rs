//! Who is calling: the node a ztunnel runs on, proven by a credential in the
//! gRPC metadata. File mode uses one bootstrap token shared by all ztunnels,
//! which then name their node in `x-ambit-node`; Kubernetes mode (TokenReview of
//! the ztunnel's service-account token) comes later behind the same trait.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

/// Metadata key carrying the caller's node name in file mode.
pub const NODE_METADATA_KEY: &str = "x-ambit-node";
const BEARER: &str = "Bearer ";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The Kubernetes node the caller runs on.
    pub node: String,
}

impl Caller {
    /// The caller an [`AuthInterceptor`] put into `request`'s extensions.
    pub fn of<T>(request: &Request<T>) -> Option<&Caller> {
        request.extensions().get::<Caller>()
    }
}

/// Authenticates a gRPC caller from its metadata.
pub trait CallerAuthenticator: Send + Sync {
    /// The caller, or `Status::unauthenticated` saying what is missing or wrong.
    fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status>;
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

/// File mode: every caller presents the same bootstrap token and names its node.
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
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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

impl CallerAuthenticator for BootstrapTokenAuthenticator {
    fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer_token(metadata)?;
        if !constant_time_eq(token.as_bytes(), &self.token) {
            return Err(Status::unauthenticated("invalid bootstrap token"));
        }
        let node = metadata
            .get(NODE_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Status::unauthenticated(format!("missing {NODE_METADATA_KEY} metadata naming the node")))?;
        Ok(Caller { node: node.to_owned() })
    }
}

/// A tonic interceptor that authenticates every request and puts the
/// [`Caller`] into its extensions (read it back with [`Caller::of`]).
#[derive(Clone)]
pub struct AuthInterceptor {
    auth: Arc<dyn CallerAuthenticator>,
}

impl AuthInterceptor {
    /// An interceptor using `auth`.
    pub fn new(auth: Arc<dyn CallerAuthenticator>) -> Self {
        AuthInterceptor { auth }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.auth.authenticate(request.metadata())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

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
        assert_eq!(caller, Caller { node: "node-a".into() });
    }

    #[test]
    fn a_wrong_or_missing_token_or_node_is_unauthenticated() {
        let auth = BootstrapTokenAuthenticator::new("s3cret").unwrap();
        for (md, want) in [
            (metadata(&[("x-ambit-node", "n")]), "missing authorization"),
            (metadata(&[("authorization", "Bearer s3creT"), ("x-ambit-node", "n")]), "invalid bootstrap token"),
            (metadata(&[("authorization", "Bearer s3cre"), ("x-ambit-node", "n")]), "invalid bootstrap token"),
            (metadata(&[("authorization", "Basic s3cret"), ("x-ambit-node", "n")]), "not \"Bearer"),
            (metadata(&[("authorization", "Bearer s3cret")]), "x-ambit-node"),
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

    #[test]
    fn the_interceptor_puts_the_caller_into_the_request() {
        let auth: Arc<dyn CallerAuthenticator> = Arc::new(BootstrapTokenAuthenticator::new("t").unwrap());
        let mut interceptor = AuthInterceptor::new(auth);
        let mut req = Request::new(());
        *req.metadata_mut() = metadata(&[("authorization", "Bearer t"), ("x-ambit-node", "node-b")]);
        let req = interceptor.call(req).unwrap();
        assert_eq!(Caller::of(&req), Some(&Caller { node: "node-b".into() }));
        assert_eq!(interceptor.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
