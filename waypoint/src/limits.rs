//! Limits on a request's headers, Envoy's defaults (which Istio's waypoint
//! has): at most 100 fields and 60 KiB of names and values. A request over
//! them is answered 431 and counted (`ambit_waypoint_refused_total{reason=
//! "head_too_large"}`), whatever its HTTP version.
//!
//! hyper enforces its own ceilings before a request exists: for HTTP/1.1,
//! 100 fields and a ~400 KiB head (the listener counts those 431s); for
//! HTTP/2, the header list size the waypoint advertises,
//! [`HTTP2_MAX_HEADER_LIST_SIZE`], above this module's limit so that a
//! compliant client's request over 60 KiB reaches this check.

use http::HeaderMap;

/// Most header fields in a request (Envoy's `max_request_headers_count`).
pub const MAX_REQUEST_HEADERS: usize = 100;

/// Most bytes of header names and values in a request (Envoy's
/// `max_request_headers_kb`: 60).
pub const MAX_REQUEST_HEADER_BYTES: usize = 60 * 1024;

/// The `SETTINGS_MAX_HEADER_LIST_SIZE` the waypoint's HTTP/2 server advertises: the byte limit plus HPACK's 32 bytes
/// per field for the most fields, rounded up.
pub const HTTP2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// Whether `headers` are over [`MAX_REQUEST_HEADERS`] or [`MAX_REQUEST_HEADER_BYTES`].
pub fn over_limits(headers: &HeaderMap) -> bool {
    if headers.len() > MAX_REQUEST_HEADERS {
        return true;
    }
    let bytes: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
    bytes > MAX_REQUEST_HEADER_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(fields: usize, value_len: usize) -> HeaderMap {
        let value = HeaderValue::from_str(&"v".repeat(value_len)).unwrap();
        (0..fields).map(|i| (format!("x-h-{i}").parse().unwrap(), value.clone())).collect()
    }

    #[test]
    fn counts_fields_and_bytes_as_envoy_does() {
        assert!(!over_limits(&with(MAX_REQUEST_HEADERS, 10)));
        assert!(over_limits(&with(MAX_REQUEST_HEADERS + 1, 1)), "one field too many");
        // Two fields of "x-h-N" (5 bytes) and a value: exactly the limit, then one byte over.
        let at_limit = MAX_REQUEST_HEADER_BYTES / 2 - 5;
        assert!(!over_limits(&with(2, at_limit)));
        assert!(over_limits(&with(2, at_limit + 1)));
        assert!(
            HTTP2_MAX_HEADER_LIST_SIZE as usize >= MAX_REQUEST_HEADER_BYTES + 32 * MAX_REQUEST_HEADERS,
            "HTTP/2 clients may send up to the limit"
        );
    }
}
