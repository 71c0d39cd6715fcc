//! The bearer token a proxy presents to the controller. A Kubernetes
//! projected service-account token expires (the manifests ask for 12 hours)
//! and the kubelet rewrites the file before it does, so a token from a file
//! is read again for every call: a reconnect or a certificate rotation a day
//! after start presents the current token, not the first one.

use std::path::PathBuf;

use tonic::metadata::AsciiMetadataValue;

/// Why no token can be presented.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the token file {0} is empty")]
    Empty(PathBuf),
    #[error("the token is empty")]
    EmptyToken,
    #[error("the token has characters a gRPC header cannot carry")]
    Invalid,
}

/// Where the token comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// Given once (file-mode bootstrap tokens, tests).
    Fixed(AsciiMetadataValue),
    /// Read from this file at every use.
    File(PathBuf),
}

impl TokenSource {
    /// A token given as a string.
    pub fn fixed(token: &str) -> Result<Self, TokenError> {
        bearer(token).map(TokenSource::Fixed).map_err(|e| match e {
            TokenError::Empty(_) => TokenError::EmptyToken,
            e => e,
        })
    }

    /// A token read from `path` at every use; read once now, so that a
    /// missing or empty file stops the proxy at start with a clear error.
    pub fn file(path: impl Into<PathBuf>) -> Result<Self, TokenError> {
        let source = TokenSource::File(path.into());
        source.header()?;
        Ok(source)
    }

    /// The `authorization` header value: `Bearer <token>`, the token trimmed
    /// (a file written with a trailing newline holds the same token).
    pub fn header(&self) -> Result<AsciiMetadataValue, TokenError> {
        match self {
            TokenSource::Fixed(v) => Ok(v.clone()),
            TokenSource::File(path) => {
                let token =
                    std::fs::read_to_string(path).map_err(|source| TokenError::Read { path: path.clone(), source })?;
                bearer(&token).map_err(|e| match e {
                    TokenError::EmptyToken => TokenError::Empty(path.clone()),
                    e => e,
                })
            }
        }
    }
}

fn bearer(token: &str) -> Result<AsciiMetadataValue, TokenError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::EmptyToken);
    }
    AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| TokenError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_read_at_every_use() {
        let path = std::env::temp_dir().join(format!("ambit-token-{}", std::process::id()));
        std::fs::write(&path, "first\n").unwrap();
        let source = TokenSource::file(&path).unwrap();
        assert_eq!(source.header().unwrap(), "Bearer first");
        // The kubelet rotates the projected token: the next call presents the new one.
        std::fs::write(&path, "second").unwrap();
        assert_eq!(source.header().unwrap(), "Bearer second");
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(source.header(), Err(TokenError::Empty(_))));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(source.header(), Err(TokenError::Read { .. })));
        assert!(TokenSource::file(&path).is_err(), "a missing file is an error at start");
    }

    #[test]
    fn a_fixed_token_is_checked_once() {
        assert_eq!(TokenSource::fixed("abc\n").unwrap().header().unwrap(), "Bearer abc");
        assert!(matches!(TokenSource::fixed(""), Err(TokenError::EmptyToken)));
        assert!(matches!(TokenSource::fixed("a\u{7}b"), Err(TokenError::Invalid)));
    }
}
