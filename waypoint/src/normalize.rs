//! Request paths normalized before routing and authorization, as Istio does
//! by default (`meshConfig.pathNormalization: BASE`, Envoy's
//! `normalize_path`, RFC 3986 §6.2.2): percent-encoded unreserved characters
//! decoded, other escapes upper-cased, dot segments removed (§5.2.4). Without
//! it a DENY on `/admin*` would let `/public/../admin` or `/%61dmin` through
//! to an application that resolves them to `/admin`. The normalized path is
//! also what is forwarded, so the application sees what policy saw. Slashes
//! are not merged and `%2F` stays encoded (as in Istio's `BASE`).
//!
//! A path with a malformed escape (`%` not followed by two hex digits) is
//! refused rather than guessed at: two parsers could read it differently.

use http::uri::{PathAndQuery, Uri};

/// The request path is not one the waypoint will route or authorize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPath;

/// Normalizes `uri`'s path in place; an already normal path (the common
/// case) is decided without allocating.
pub fn normalize(uri: &mut Uri) -> Result<(), BadPath> {
    let Some(path) = normalized(uri)? else { return Ok(()) };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(path);
    *uri = Uri::from_parts(parts).map_err(|_| BadPath)?;
    Ok(())
}

/// The normalized form of `uri`'s path and query, or `None` when it is
/// already normal.
fn normalized(uri: &Uri) -> Result<Option<PathAndQuery>, BadPath> {
    let path = uri.path();
    // Only origin-form paths are normalized (`*` of `OPTIONS *` stays).
    if !path.starts_with('/') || (!path.contains('%') && !path.contains("/.")) {
        return Ok(None);
    }
    let decoded = decode_unreserved(path)?;
    let normal = remove_dot_segments(&decoded);
    if normal == path {
        return Ok(None);
    }
    let with_query = match uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    with_query.parse().map(Some).map_err(|_| BadPath)
}

/// Decodes `%XX` of unreserved characters (ALPHA, DIGIT, `-._~`) and
/// upper-cases the hex digits of every other escape.
fn decode_unreserved(path: &str) -> Result<String, BadPath> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            let next = bytes[i..].iter().position(|&b| b == b'%').map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).ok_or(BadPath)?;
        let value = std::str::from_utf8(hex).ok().and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or(BadPath)?;
        if value.is_ascii_alphanumeric() || b"-._~".contains(&value) {
            out.push(value as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.extend(['%', HEX[usize::from(value >> 4)] as char, HEX[usize::from(value & 15)] as char]);
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 for an absolute path: `.` segments dropped, `..` removes
/// the segment before it (never above the root).
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = path[1..].split('/').peekable();
    // A path ending in `.` or `..` keeps its trailing slash: `/a/b/..` is `/a/`.
    let mut trailing_slash = false;
    while let Some(segment) = parts.next() {
        let last = parts.peek().is_none();
        match segment {
            "." => trailing_slash = last,
            ".." => {
                segments.pop();
                trailing_slash = last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(target: &str) -> Result<String, BadPath> {
        let mut uri: Uri = target.parse().unwrap();
        normalize(&mut uri)?;
        Ok(uri.to_string())
    }

    #[test]
    fn normal_paths_are_left_alone_without_allocating_a_new_one() {
        for p in ["/", "/a/b", "/a/b/", "/a.b/c..d/.e", "/a?x=/../y", "/a//b", "*"] {
            let uri: Uri = p.parse().unwrap();
            assert_eq!(normalized(&uri), Ok(None), "{p}");
        }
    }

    #[test]
    fn dot_segments_are_removed_never_above_the_root() {
        assert_eq!(norm("/public/../admin"), Ok("/admin".into()));
        assert_eq!(norm("/a/./b/../c"), Ok("/a/c".into()));
        assert_eq!(norm("/../../admin"), Ok("/admin".into()));
        assert_eq!(norm("/a/b/.."), Ok("/a/".into()));
        assert_eq!(norm("/a/."), Ok("/a/".into()));
        assert_eq!(norm("/.."), Ok("/".into()));
        assert_eq!(norm("/a/../b?q=/../x"), Ok("/b?q=/../x".into()), "the query is not a path");
    }

    #[test]
    fn escapes_of_unreserved_characters_are_decoded_others_upper_cased() {
        assert_eq!(norm("/%61dmin"), Ok("/admin".into()));
        assert_eq!(norm("/%2e%2E/admin"), Ok("/admin".into()), "encoded dots are dot segments");
        assert_eq!(norm("/a/%2e%2e/b"), Ok("/b".into()));
        assert_eq!(norm("/a%2fb"), Ok("/a%2Fb".into()), "an encoded slash is no separator");
        assert_eq!(norm("/a%20b%7e"), Ok("/a%20b~".into()));
    }

    #[test]
    fn an_absolute_uri_keeps_its_scheme_and_authority() {
        assert_eq!(norm("http://echo.default:80/a/../b?x"), Ok("http://echo.default:80/b?x".into()));
    }

    #[test]
    fn malformed_escapes_are_refused() {
        for p in ["/a%", "/a%2", "/a%zz", "/%g1"] {
            assert_eq!(norm(p), Err(BadPath), "{p}");
        }
    }
}
