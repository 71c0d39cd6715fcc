//! The host a request is addressed to, as routes and redirects see it.

use http::header::HOST;
use http::request::Parts;

/// The request's host without its port: from the URI's authority (HTTP/2
/// `:authority`, HTTP/1.1 absolute form), else from the `Host` header.
/// Routes compare it case-insensitively.
pub fn request_host(parts: &Parts) -> Option<&str> {
    if let Some(host) = parts.uri.host() {
        return Some(host);
    }
    let value = parts.headers.get(HOST)?.to_str().ok()?;
    Some(strip_port(value))
}

/// `host:port` → `host`, keeping an IPv6 literal's brackets whole.
fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.find(']') {
            Some(end) => &authority[..end + 2],
            None => authority,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// Gateway API hostname match: exact (case-insensitive), or `*.suffix`
/// matching one or more labels before `.suffix` (never `suffix` itself).
pub fn hostname_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(uri: &str, host: Option<&str>) -> Parts {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn host_comes_from_authority_then_host_header_without_port() {
        assert_eq!(request_host(&parts("http://a.example:8080/x", Some("b"))), Some("a.example"));
        assert_eq!(request_host(&parts("/x", Some("b.example:80"))), Some("b.example"));
        assert_eq!(request_host(&parts("/x", Some("[::1]:80"))), Some("[::1]"));
        assert_eq!(request_host(&parts("/x", None)), None);
    }

    #[test]
    fn wildcard_hostname_needs_at_least_one_label() {
        assert!(hostname_matches("*.example.com", "a.b.example.com"));
        assert!(hostname_matches("*.example.com", "A.Example.COM"));
        assert!(!hostname_matches("*.example.com", "example.com"));
        assert!(hostname_matches("echo.ns", "ECHO.ns"));
        assert!(!hostname_matches("echo.ns", "echo.ns2"));
    }
}
