//! File mode's credential for workloads that talk to the controller themselves — waypoints — as Kubernetes mode's
//! TokenReview of their own service-account token: `--workload-tokens` holds one `<token> <namespace>/<service
//! account>` per line (blank lines and `#` comments ignored). A caller presenting such a token is that workload: the
//! CA signs only its own identity, and its xDS stream is the waypoint Gateway named after its service account. Any
//! other token goes on to the node credentials (per-node or shared bootstrap tokens).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::metadata::MetadataMap;
use tonic::Status;

use super::auth::{bearer_token, AsyncCallerAuthenticator, AuthFuture, Caller};
use super::token_table::{LineError, TokenTable};

/// Why the workload token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadTokensError {
    /// The file cannot be read.
    #[error("cannot read the workload tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line is not `<token> <namespace>/<service account>`.
    #[error("{path}:{line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
}

/// Workload tokens first, then the node credentials of `nodes`.
pub struct WorkloadTokenAuthenticator {
    workloads: TokenTable<(String, String)>,
    nodes: Arc<dyn AsyncCallerAuthenticator>,
}

impl std::fmt::Debug for WorkloadTokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadTokenAuthenticator").field("tokens", &self.workloads.len()).finish_non_exhaustive()
    }
}

impl WorkloadTokenAuthenticator {
    /// Reads the file at `path`; other tokens are checked by `nodes`.
    pub fn from_file(path: &Path, nodes: Arc<dyn AsyncCallerAuthenticator>) -> Result<Self, WorkloadTokensError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| WorkloadTokensError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path, nodes)
    }

    /// Parses `text` (the contents of `path`, which errors name).
    pub fn parse(
        text: &str,
        path: &Path,
        nodes: Arc<dyn AsyncCallerAuthenticator>,
    ) -> Result<Self, WorkloadTokensError> {
        let workload = |id: &str| match id.split_once('/') {
            Some((ns, sa)) if is_name(ns) && is_name(sa) => Ok((ns.to_owned(), sa.to_owned())),
            _ => Err(format!("{id:?} is not <namespace>/<service account>")),
        };
        let workloads = TokenTable::parse(text, "<namespace>/<service account>", workload).map_err(|e| {
            let (line, reason) = match e {
                LineError::Bad { line, reason } => (line, reason),
                LineError::Duplicate { line, first } => {
                    (line, format!("the token of this line is given twice (first on line {first}); each token belongs to one workload"))
                }
            };
            WorkloadTokensError::Line { path: path.to_owned(), line, reason }
        })?;
        Ok(Self { workloads, nodes })
    }

    /// How many workload tokens are configured.
    pub fn len(&self) -> usize {
        self.workloads.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty()
    }
}

/// A Kubernetes namespace or service account name: an RFC 1123 subdomain.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

impl AsyncCallerAuthenticator for WorkloadTokenAuthenticator {
    fn authenticate_async<'a>(&'a self, metadata: &'a MetadataMap) -> AuthFuture<'a> {
        let token = match bearer_token(metadata) {
            Ok(t) => t,
            Err(e) => return Box::pin(std::future::ready(Err::<Caller, Status>(e))),
        };
        match self.workloads.lookup(token.as_bytes()) {
            Some((ns, sa)) => Box::pin(std::future::ready(Ok(Caller::workload(ns, sa)))),
            None => self.nodes.authenticate_async(metadata),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::NodeTokenAuthenticator;

    fn auth(text: &str) -> Result<WorkloadTokenAuthenticator, WorkloadTokensError> {
        let nodes = NodeTokenAuthenticator::parse("node-token node-a\n", Path::new("nodes")).unwrap();
        WorkloadTokenAuthenticator::parse(text, Path::new("workloads"), Arc::new(nodes))
    }

    fn bearer(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[tokio::test]
    async fn a_workload_token_is_its_workload_and_other_tokens_go_to_the_node_credentials() {
        let a = auth("# waypoints\nwp-token mesh/waypoint\n\n").unwrap();
        assert_eq!(a.len(), 1);
        let caller = a.authenticate_async(&bearer("wp-token")).await.unwrap();
        assert_eq!(caller, Caller::workload("mesh", "waypoint"));
        assert_eq!(caller.workload_identity(), Some(&("mesh".to_owned(), "waypoint".to_owned())));
        let node = a.authenticate_async(&bearer("node-token")).await.unwrap();
        assert_eq!(node, Caller::on_node("node-a"));
        assert_eq!(node.workload_identity(), None);
        let err = a.authenticate_async(&bearer("nope")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let err = a.authenticate_async(&MetadataMap::new()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        for (text, want) in [
            ("t\n", "found 1 fields"),
            ("t mesh\n", "not <namespace>/<service account>"),
            ("t Mesh/wp\n", "not <namespace>/<service account>"),
            ("t mesh/\n", "not <namespace>/<service account>"),
            ("t a/b\nt c/d\n", "given twice"),
        ] {
            let err = auth(text).unwrap_err().to_string();
            assert!(err.contains(want) && err.starts_with("workloads:"), "{text:?}: {err}");
        }
    }
}
