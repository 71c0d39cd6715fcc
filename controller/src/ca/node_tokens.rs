//! File mode with per-node bootstrap tokens (`--bootstrap-tokens`): each token
//! names the one node it was given to, so a caller is authenticated by its
//! token alone and its node comes from the credential, as a TokenReview gives
//! it in Kubernetes mode. This is what lets an unmodified Istio ztunnel, which
//! sends no `x-ambit-node` header and whose certificate requests carry no node
//! at all, be scoped to the identities of its own node.
//!
//! The file holds one `<token> <node>` pair per line, separated by
//! whitespace; blank lines and lines starting with `#` are ignored. A node may
//! have several tokens (to rotate them); a token belongs to exactly one node.

use std::path::{Path, PathBuf};

use tonic::metadata::MetadataMap;
use tonic::Status;

use super::auth::{bearer_token, declared_node, AsyncCallerAuthenticator, AuthFuture, Caller, NODE_METADATA_KEY};
use super::token_table::{LineError, TokenTable};

/// Why the per-node token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeTokensError {
    /// The file cannot be read.
    #[error("cannot read the bootstrap tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line is not `<token> <node>` or holds a bad token or node name.
    #[error("{path}:{line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
    /// The same token is given twice (the token itself is not printed).
    #[error("{path}:{line}: the token of this line is already given on line {first}; each token belongs to one node")]
    DuplicateToken { path: PathBuf, line: usize, first: usize },
    /// No token at all: nobody could connect.
    #[error("the bootstrap tokens file {0} holds no `<token> <node>` line")]
    Empty(PathBuf),
}

/// Authenticates callers by a per-node bootstrap token.
pub struct NodeTokenAuthenticator {
    nodes: TokenTable<String>,
}

impl std::fmt::Debug for NodeTokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTokenAuthenticator").field("tokens", &self.nodes.len()).finish_non_exhaustive()
    }
}

impl NodeTokenAuthenticator {
    /// Reads and checks the token file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, NodeTokensError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| NodeTokensError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses `text` (the contents of `path`, which errors name).
    pub fn parse(text: &str, path: &Path) -> Result<Self, NodeTokensError> {
        let node = |n: &str| {
            is_node_name(n).then(|| n.to_owned()).ok_or_else(|| {
                format!("{n:?} is not a Kubernetes node name (lowercase letters, digits, '-' and '.', at most 253)")
            })
        };
        let nodes = TokenTable::parse(text, "<node>", node).map_err(|e| match e {
            LineError::Bad { line, reason } => NodeTokensError::Line { path: path.to_owned(), line, reason },
            LineError::Duplicate { line, first } => {
                NodeTokensError::DuplicateToken { path: path.to_owned(), line, first }
            }
        })?;
        if nodes.is_empty() {
            return Err(NodeTokensError::Empty(path.to_owned()));
        }
        Ok(NodeTokenAuthenticator { nodes })
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no token is configured (never, once parsed).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The caller, whose node is its token's. An `x-ambit-node` header may
    /// come along (Ambit's ztunnel sends one) but must then name that node.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer_token(metadata)?;
        let node =
            self.nodes.lookup(token.as_bytes()).ok_or_else(|| Status::unauthenticated("invalid bootstrap token"))?;
        if let Some(declared) = declared_node(metadata) {
            if declared != node {
                return Err(Status::permission_denied(format!(
                    "{NODE_METADATA_KEY} names node {declared:?} but the token is node {node:?}'s"
                )));
            }
        }
        Ok(Caller::on_node(node))
    }
}

/// A Kubernetes node name: a DNS subdomain (RFC 1123).
fn is_node_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Needs no round trip: the token table is in memory.
impl AsyncCallerAuthenticator for NodeTokenAuthenticator {
    fn authenticate_async<'a>(&'a self, metadata: &'a MetadataMap) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.authenticate(metadata)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/etc/ambit/tokens";

    fn parse(text: &str) -> Result<NodeTokenAuthenticator, NodeTokensError> {
        NodeTokenAuthenticator::parse(text, Path::new(PATH))
    }

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    const FILE: &str = "# token node\n\ntok-a node-a\n  tok-a2\tnode-a  \ntok-b node-b.example\n";

    #[test]
    fn each_token_authenticates_its_node_without_any_header() {
        let auth = parse(FILE).unwrap();
        assert_eq!(auth.len(), 3);
        for (token, node) in [("tok-a", "node-a"), ("tok-a2", "node-a"), ("tok-b", "node-b.example")] {
            let caller = auth.authenticate(&metadata(&[("authorization", &format!("Bearer {token}"))])).unwrap();
            assert_eq!(caller, Caller::on_node(node), "{token}");
        }
    }

    #[test]
    fn a_header_naming_the_tokens_node_is_accepted_and_another_node_refused() {
        let auth = parse(FILE).unwrap();
        let same = metadata(&[("authorization", "Bearer tok-a"), ("x-ambit-node", "node-a")]);
        assert_eq!(auth.authenticate(&same).unwrap(), Caller::on_node("node-a"));
        let other = metadata(&[("authorization", "Bearer tok-a"), ("x-ambit-node", "node-b.example")]);
        let err = auth.authenticate(&other).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("node-b.example") && err.message().contains("node-a"), "{}", err.message());
    }

    #[test]
    fn unknown_or_missing_tokens_are_unauthenticated() {
        let auth = parse(FILE).unwrap();
        for (md, want) in [
            (metadata(&[("authorization", "Bearer tok-c")]), "invalid bootstrap token"),
            (metadata(&[("authorization", "Bearer tok-")]), "invalid bootstrap token"),
            (metadata(&[("authorization", "Bearer tok-a-longer")]), "invalid bootstrap token"),
            (metadata(&[("x-ambit-node", "node-a")]), "missing authorization"),
            (metadata(&[("authorization", "tok-a")]), "not \"Bearer"),
        ] {
            let err = auth.authenticate(&md).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
            assert!(err.message().contains(want), "{} does not say {want}", err.message());
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        for (text, want) in [
            ("tok-a\n", ":1: want `<token> <node>`, found 1 fields"),
            ("tok-a node-a extra\n", "found 3 fields"),
            ("# c\ntok-a Node-A\n", ":2: \"Node-A\" is not a Kubernetes node name"),
            ("tok-a node_a\n", "not a Kubernetes node name"),
            ("tok-a -node\n", "not a Kubernetes node name"),
            ("tok-a node..a\n", "not a Kubernetes node name"),
            ("tok\u{7f} node-a\n", ":1: the token holds characters not allowed in a header"),
            ("tok-é node-a\n", "not allowed in a header"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.to_string().contains(want), "{text:?}: {err} does not say {want}");
            assert!(err.to_string().starts_with(PATH), "{err}");
        }
    }

    #[test]
    fn a_duplicate_token_is_refused_without_printing_it() {
        let err = parse("tok-a node-a\ntok-b node-b\n\ntok-a node-b\n").unwrap_err();
        assert!(matches!(err, NodeTokensError::DuplicateToken { line: 4, first: 1, .. }), "{err:?}");
        assert!(!err.to_string().contains("tok-a"), "{err}");
    }

    #[test]
    fn an_empty_or_unreadable_file_is_refused_with_its_name() {
        for text in ["", "\n  \n# only a comment\n"] {
            let err = parse(text).unwrap_err();
            assert!(matches!(err, NodeTokensError::Empty(_)), "{err:?}");
            assert!(err.to_string().contains(PATH), "{err}");
        }
        let missing = std::env::temp_dir().join(format!("ambit-no-such-tokens-{}", std::process::id()));
        let err = NodeTokenAuthenticator::from_file(&missing).unwrap_err();
        assert!(matches!(err, NodeTokensError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("ambit-no-such-tokens"), "{err}");
    }

    #[test]
    fn a_file_with_a_trailing_newline_or_crlf_reads_the_same() {
        let path = std::env::temp_dir().join(format!("ambit-node-tokens-{}", std::process::id()));
        std::fs::write(&path, "tok-a node-a\r\ntok-b node-b\r\n").unwrap();
        let auth = NodeTokenAuthenticator::from_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let caller = auth.authenticate(&metadata(&[("authorization", "Bearer tok-b")])).unwrap();
        assert_eq!(caller, Caller::on_node("node-b"));
    }

    #[tokio::test]
    async fn the_async_path_answers_as_the_sync_one() {
        let auth: Box<dyn AsyncCallerAuthenticator> = Box::new(parse(FILE).unwrap());
        let md = metadata(&[("authorization", "Bearer tok-b")]);
        assert_eq!(auth.authenticate_async(&md).await.unwrap(), Caller::on_node("node-b.example"));
    }
}
