//! Headers that belong to one connection, not to the request, and the
//! request id every proxied request carries.
//!
//! A proxy that forwarded `Connection`, `Transfer-Encoding` and friends would
//! let a client steer the waypoint's upstream connection (and HTTP/2 forbids
//! them outright), so they are removed in both directions.

use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;

/// The request id header Istio and Envoy propagate.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The comma-separated tokens of every `Connection` header, lower case.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// An HTTP/1.1 upgrade request (WebSocket…): `Connection: upgrade` and an
/// `Upgrade` header. The forwarding code decides whether to proxy it.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE) && connection_tokens(headers).any(|t| t == "upgrade")
}

/// Removes hop-by-hop headers: `Connection` and every header it names,
/// `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `TE` (except its
/// `trailers`, which gRPC needs end to end) and `Upgrade`. When `upgrade` is
/// being proxied, `Upgrade` stays and `Connection` becomes just `upgrade`,
/// so the next hop sees the same upgrade request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<String> = connection_tokens(headers).collect();
    for name in &named {
        if upgrade && name == "upgrade" {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            if name != TE {
                headers.remove(name);
            }
        }
    }
    let trailers = headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("trailers"));
    for name in [CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TRANSFER_ENCODING, TE] {
        headers.remove(name);
    }
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
}

/// The request's `x-request-id`, added first when missing or empty: a
/// random UUID v4 from `rng`.
pub fn ensure_request_id(headers: &mut HeaderMap, rng: &mut impl Rng) -> HeaderValue {
    if let Some(id) = headers.get(X_REQUEST_ID).filter(|v| !v.is_empty()) {
        return id.clone();
    }
    let id = uuid_v4(rng);
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

/// RFC 9562 version 4 UUID, lower-case hex `8-4-4-4-12`.
fn uuid_v4(rng: &mut impl Rng) -> HeaderValue {
    let mut b: [u8; 16] = rng.random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{byte:02x}"));
    }
    HeaderValue::try_from(s).expect("hex and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        names
    }

    #[test]
    fn removes_fixed_hop_by_hop_headers() {
        let mut h = headers(&[
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("connection", "keep-alive"),
            ("te", "gzip"),
            ("x-end-to-end", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["x-end-to-end"]);
    }

    #[test]
    fn removes_headers_named_by_connection() {
        let mut h = headers(&[("connection", "X-Foo, x-bar"), ("connection", "close"), ("x-foo", "1"), ("x-bar", "2")]);
        h.insert("x-baz", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["x-baz"]);
    }

    #[test]
    fn te_trailers_is_kept() {
        let mut h = headers(&[("te", "gzip, trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[TE], "trailers");
        let mut h = headers(&[("te", "trailers"), ("connection", "te")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[TE], "trailers");
    }

    #[test]
    fn proxied_upgrade_keeps_upgrade_and_connection_upgrade() {
        let mut h = headers(&[("connection", "Upgrade, keep-alive"), ("upgrade", "websocket"), ("keep-alive", "x")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "upgrade"]);
        assert_eq!(
            (&h[CONNECTION], &h[UPGRADE]),
            (&HeaderValue::from_static("upgrade"), &HeaderValue::from_static("websocket"))
        );
    }

    #[test]
    fn upgrade_needs_both_headers() {
        assert!(!is_upgrade(&headers(&[("upgrade", "websocket")])));
        assert!(!is_upgrade(&headers(&[("connection", "upgrade")])));
    }

    #[test]
    fn request_id_is_added_when_missing_as_uuid_v4() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h, &mut StdRng::seed_from_u64(3));
        assert_eq!(h[X_REQUEST_ID], id);
        let s = id.to_str().unwrap();
        let groups: Vec<_> = s.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{s}");
        assert_eq!(&s[14..15], "4", "version: {s}");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "variant: {s}");
        assert!(s.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn request_id_present_is_kept() {
        let mut h = headers(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut h, &mut StdRng::seed_from_u64(3)), "abc");
        assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);
    }

    #[test]
    fn request_ids_differ() {
        let mut rng = StdRng::seed_from_u64(3);
        assert_ne!(
            ensure_request_id(&mut HeaderMap::new(), &mut rng),
            ensure_request_id(&mut HeaderMap::new(), &mut rng)
        );
    }
}
