//! SPIFFE identities of workloads: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";

/// Why a string is not a workload SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The string does not start with `spiffe://`.
    #[error("not a spiffe uri (want spiffe://<trust domain>/ns/<namespace>/sa/<service account>): {0:?}")]
    NotSpiffe(String),
    /// Nothing between `spiffe://` and the path.
    #[error("empty trust domain in {0:?}")]
    EmptyTrustDomain(String),
    /// The trust domain holds a character SPIFFE does not allow (only `a-z 0-9 . - _`).
    #[error("invalid character {found:?} in trust domain of {uri:?}")]
    InvalidTrustDomain { uri: String, found: char },
    /// The path is not `/ns/<namespace>/sa/<service account>`.
    #[error("wrong path shape in {0:?}: want /ns/<namespace>/sa/<service account>")]
    WrongPathShape(String),
    /// The namespace or the service account is empty.
    #[error("empty {segment} in {uri:?}")]
    EmptySegment { uri: String, segment: &'static str },
    /// A path segment holds a character SPIFFE does not allow (only `a-z A-Z 0-9 . - _`).
    #[error("invalid character {found:?} in {segment} of {uri:?}")]
    InvalidSegment { uri: String, segment: &'static str, found: char },
}

/// A workload identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
///
/// `Debug` prints `Identity(<uri>)` so that logs and errors stay readable.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The mesh's trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// The Kubernetes namespace of the workload.
    pub namespace: String,
    /// The Kubernetes service account of the workload.
    pub service_account: String,
}

impl Identity {
    /// Builds an identity from its parts without validating them (use `parse` for untrusted input).
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Self { trust_domain: trust_domain.into(), namespace: namespace.into(), service_account: service_account.into() }
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let rest = uri.strip_prefix(SCHEME).ok_or_else(|| IdentityError::NotSpiffe(uri.to_owned()))?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        check_trust_domain(uri, trust_domain)?;
        let mut segments = path.split('/');
        let shape = (segments.next(), segments.next(), segments.next(), segments.next(), segments.next());
        let (namespace, service_account) = match shape {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => (ns, sa),
            _ => return Err(IdentityError::WrongPathShape(uri.to_owned())),
        };
        check_segment(uri, "namespace", namespace)?;
        check_segment(uri, "service account", service_account)?;
        Ok(Self::new(trust_domain, namespace, service_account))
    }
}

/// Checks that `trust_domain` is a valid SPIFFE trust domain (non-empty, only `a-z 0-9 . - _`).
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), IdentityError> {
    check_trust_domain(trust_domain, trust_domain)
}

fn check_trust_domain(uri: &str, trust_domain: &str) -> Result<(), IdentityError> {
    if trust_domain.is_empty() {
        return Err(IdentityError::EmptyTrustDomain(uri.to_owned()));
    }
    match trust_domain.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')) {
        Some(found) => Err(IdentityError::InvalidTrustDomain { uri: uri.to_owned(), found }),
        None => Ok(()),
    }
}

fn check_segment(uri: &str, segment: &'static str, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError::EmptySegment { uri: uri.to_owned(), segment });
    }
    // "." and ".." are forbidden by the SPIFFE ID spec even though their characters are allowed.
    if let Some(found) = value
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        .or(if value == "." || value == ".." { Some('.') } else { None })
    {
        return Err(IdentityError::InvalidSegment { uri: uri.to_owned(), segment, found });
    }
    Ok(())
}

/// How a principal pattern compares with an identity, in Istio's terms
/// (`StringMatch`): the pattern is written without `spiffe://`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrincipalPattern<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Suffix(&'a str),
    /// Any identity.
    Presence,
}

impl Identity {
    /// Whether `<td>/ns/<ns>/sa/<sa>` (the SPIFFE ID without its scheme, as
    /// Istio's policies name principals) matches `pattern`, without
    /// building that string: authorization runs it per connection and per
    /// request.
    pub fn principal_matches(&self, pattern: PrincipalPattern<'_>) -> bool {
        let pieces = [
            self.trust_domain.as_bytes(),
            b"/ns/",
            self.namespace.as_bytes(),
            b"/sa/",
            self.service_account.as_bytes(),
        ];
        match pattern {
            PrincipalPattern::Exact(s) => {
                s.len() == pieces.iter().map(|p| p.len()).sum::<usize>() && starts_with(&pieces, s.as_bytes())
            }
            PrincipalPattern::Prefix(s) => starts_with(&pieces, s.as_bytes()),
            PrincipalPattern::Suffix(s) => ends_with(&pieces, s.as_bytes()),
            PrincipalPattern::Presence => true,
        }
    }
}

/// Whether the concatenation of `pieces` starts with `pat`.
fn starts_with(pieces: &[&[u8]], mut pat: &[u8]) -> bool {
    for p in pieces {
        if pat.len() <= p.len() {
            return p.starts_with(pat);
        }
        match pat.strip_prefix(*p) {
            Some(rest) => pat = rest,
            None => return false,
        }
    }
    pat.is_empty()
}

/// Whether the concatenation of `pieces` ends with `pat`.
fn ends_with(pieces: &[&[u8]], mut pat: &[u8]) -> bool {
    for p in pieces.iter().rev() {
        if pat.len() <= p.len() {
            return p.ends_with(pat);
        }
        match pat.strip_suffix(*p) {
            Some(rest) => pat = rest,
            None => return false,
        }
    }
    pat.is_empty()
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_match_across_the_pieces_of_the_id_without_its_scheme() {
        let id = Identity::new("cluster.local", "shop", "web");
        let yes = [
            PrincipalPattern::Exact("cluster.local/ns/shop/sa/web"),
            PrincipalPattern::Prefix("cluster.local/ns/sh"),
            PrincipalPattern::Prefix(""),
            PrincipalPattern::Suffix("/sa/web"),
            PrincipalPattern::Suffix("local/ns/shop/sa/web"),
            PrincipalPattern::Presence,
        ];
        for p in yes {
            assert!(id.principal_matches(p), "{p:?}");
        }
        let no = [
            PrincipalPattern::Exact("spiffe://cluster.local/ns/shop/sa/web"),
            PrincipalPattern::Exact("cluster.local/ns/shop/sa/we"),
            PrincipalPattern::Exact("cluster.local/ns/shop/sa/webx"),
            PrincipalPattern::Prefix("cluster.local/ns/shop/sa/web/"),
            PrincipalPattern::Suffix("x/ns/shop/sa/web"),
            PrincipalPattern::Suffix("spiffe://cluster.local/ns/shop/sa/web"),
        ];
        for p in no {
            assert!(!id.principal_matches(p), "{p:?}");
        }
    }

    #[test]
    fn identity_round_trips_through_its_uri() {
        let id = Identity::new("cluster.local", "default", "bookinfo-reviews");
        let uri = id.to_string();
        assert_eq!(uri, "spiffe://cluster.local/ns/default/sa/bookinfo-reviews");
        assert_eq!(uri.parse::<Identity>().unwrap(), id);
    }

    #[test]
    fn other_schemes_are_rejected() {
        for uri in ["https://cluster.local/ns/a/sa/b", "spiffe:/cluster.local/ns/a/sa/b", ""] {
            assert!(matches!(uri.parse::<Identity>(), Err(IdentityError::NotSpiffe(_))), "{uri}");
        }
    }

    #[test]
    fn wrong_path_shapes_are_rejected() {
        for uri in [
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local//ns/a/sa/b",
        ] {
            assert!(
                matches!(uri.parse::<Identity>(), Err(IdentityError::WrongPathShape(_))),
                "{uri}: {:?}",
                uri.parse::<Identity>()
            );
        }
    }

    #[test]
    fn empty_segments_are_rejected() {
        assert!(matches!("spiffe:///ns/a/sa/b".parse::<Identity>(), Err(IdentityError::EmptyTrustDomain(_))));
        assert!(matches!(
            "spiffe://td/ns//sa/b".parse::<Identity>(),
            Err(IdentityError::EmptySegment { segment: "namespace", .. })
        ));
        assert!(matches!(
            "spiffe://td/ns/a/sa/".parse::<Identity>(),
            Err(IdentityError::EmptySegment { segment: "service account", .. })
        ));
    }

    #[test]
    fn forbidden_characters_are_rejected() {
        for uri in [
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://td:8080/ns/a/sa/b",
            "spiffe://td/ns/a b/sa/b",
            "spiffe://td/ns/a/sa/b?x=1",
            "spiffe://td/ns/../sa/b",
        ] {
            let err = uri.parse::<Identity>().unwrap_err();
            assert!(
                matches!(err, IdentityError::InvalidTrustDomain { .. } | IdentityError::InvalidSegment { .. }),
                "{uri}: {err}"
            );
        }
    }

    #[test]
    fn debug_output_is_the_uri() {
        let id = Identity::new("td", "ns", "sa");
        assert_eq!(format!("{id:?}"), "Identity(spiffe://td/ns/ns/sa/sa)");
    }

    #[test]
    fn error_messages_name_the_offending_uri() {
        let err = "spiffe://td/ns/a".parse::<Identity>().unwrap_err();
        assert!(err.to_string().contains("spiffe://td/ns/a"), "{err}");
    }
}
