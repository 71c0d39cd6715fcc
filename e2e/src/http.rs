//! A minimal blocking HTTP/1.1 client for the lab: GET requests to admin, metrics and readiness ports inside a
//! namespace (`Connection: close`; handles `Content-Length`, chunked and read-to-end bodies).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::netns::NetNs;

/// The most a response may carry (admin dumps and metrics are small; this bounds a runaway server).
const MAX_RESPONSE: u64 = 64 << 20;

/// A response: status code and body (lossily decoded as UTF-8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Body text.
    pub body: String,
}

/// Sends `GET path` to `addr` from inside `netns`; `timeout` bounds the connect and each read.
pub fn get(netns: &NetNs, addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<Response> {
    let mut stream =
        crate::apps::connect(netns, addr, timeout).with_context(|| format!("connect {addr} in {}", netns.name()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: ambit-lab\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut raw).with_context(|| format!("read response of GET {addr}{path}"))?;
    parse_response(&raw).with_context(|| format!("GET {addr}{path}"))
}

/// Parses a complete HTTP/1.1 response.
fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no end of headers in {} bytes", raw.len());
    };
    let head = std::str::from_utf8(&raw[..head_end]).context("headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().with_context(|| format!("bad content-length {value:?}"))?);
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n).with_context(|| format!("body has {} of {n} bytes", rest.len()))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body: String::from_utf8_lossy(&body).into_owned() })
}

/// Decodes a chunked body.
fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").context("chunk size line not terminated")?;
        let size_text = std::str::from_utf8(&data[..line_end]).context("chunk size is not text")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).context("chunk shorter than its size")?);
        data = data.get(size + 2..).context("chunk not terminated")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_length_response_is_parsed() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").unwrap();
        assert_eq!(r, Response { status: 200, body: "hello".into() });
    }

    #[test]
    fn a_chunked_response_is_decoded() {
        let r = parse_response(
            b"HTTP/1.1 503 NA\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r, Response { status: 503, body: "abcde".into() });
    }

    #[test]
    fn a_response_without_headers_end_is_an_error() {
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
