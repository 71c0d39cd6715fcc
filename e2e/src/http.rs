//! A minimal blocking HTTP/1.1 client for the lab: GET requests to admin, metrics and readiness ports inside a
//! namespace (`Connection: close`; handles `Content-Length`, chunked and read-to-end bodies), and
//! [`HttpConnection`], which sends any method with custom headers and keeps its connection open between requests
//! (keep-alive), for tests of L7 proxies.

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

/// A request for [`HttpConnection::send`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Request target (path and query).
    pub path: String,
    /// `Host` header.
    pub host: String,
    /// More headers, in order.
    pub headers: Vec<(String, String)>,
    /// Body (sent with `Content-Length` when not empty, or for methods that carry one).
    pub body: Vec<u8>,
    /// Ask the server to close the connection after this request (`Connection: close`).
    pub close: bool,
    /// Send the body chunked (`Transfer-Encoding: chunked`, 16 KiB chunks) instead of with `Content-Length`.
    pub chunked: bool,
}

impl Request {
    /// `GET path` with `Host: host`, keep-alive.
    pub fn get(host: &str, path: &str) -> Self {
        Self::new("GET", host, path)
    }

    /// `method path` with `Host: host`, keep-alive, no body.
    pub fn new(method: &str, host: &str, path: &str) -> Self {
        Request {
            method: method.into(),
            path: path.into(),
            host: host.into(),
            headers: Vec::new(),
            body: Vec::new(),
            close: false,
            chunked: false,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Asks the server to close the connection after the response.
    pub fn close(mut self) -> Self {
        self.close = true;
        self
    }

    /// Sends the body chunked: its length unknown to the server until the end.
    pub fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }

    /// The request's bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head =
            format!("{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ambit-lab\r\n", self.method, self.path, self.host);
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if self.chunked {
            head.push_str("Transfer-Encoding: chunked\r\n");
        } else if !self.body.is_empty() || matches!(self.method.as_str(), "POST" | "PUT" | "PATCH") {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        if self.close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if self.chunked {
            for chunk in self.body.chunks(16 * 1024) {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        } else {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// A response with its headers, from [`HttpConnection::send`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// Headers as received (names as sent, in order).
    pub headers: Vec<(String, String)>,
    /// Body text (lossily decoded as UTF-8).
    pub body: String,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether the server said it closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.header("connection").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }
}

/// One HTTP/1.1 client connection, opened inside a namespace, that sends requests one after the other and keeps
/// the connection open between them unless a side asks to close it.
#[derive(Debug)]
pub struct HttpConnection {
    stream: std::net::TcpStream,
    /// Bytes read past the previous response.
    buf: Vec<u8>,
    /// Whether the connection can take another request.
    open: bool,
}

impl HttpConnection {
    /// Connects to `addr` from inside `netns`; `timeout` bounds the connect and each later read and write.
    pub fn connect(netns: &NetNs, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let stream = crate::apps::connect(netns, addr, timeout)
            .with_context(|| format!("connect {addr} in {}", netns.name()))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection { stream, buf: Vec::new(), open: true })
    }

    /// Whether another request may be sent (neither side asked to close, and the previous response was complete).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// Sends `req` and reads its response (for `HEAD`, without a body).
    pub fn send(&mut self, req: &Request) -> anyhow::Result<HttpResponse> {
        self.exchange(req, false)
    }

    /// Sends `req`, shuts down the sending side (as `nc` and scripts do when their input ends: a half-close), and
    /// reads the response.
    pub fn send_and_half_close(&mut self, req: &Request) -> anyhow::Result<HttpResponse> {
        self.exchange(req, true)
    }

    /// Sends `req`'s head alone (the caller adds `Expect: 100-continue`), waits up to `wait` for an interim response,
    /// then sends the body and reads the final response, as a client that honours `Expect` does. Returns the interim
    /// response (`None` if none came within `wait`: the body is then sent anyway, as RFC 9110 §10.1.1 lets a client,
    /// and a late interim response is skipped) and the final one. A final response that comes before the body is returned with `None`, and the body is not
    /// sent (the connection is then not reused).
    pub fn send_expecting_continue(
        &mut self,
        req: &Request,
        wait: Duration,
    ) -> anyhow::Result<(Option<HttpResponse>, HttpResponse)> {
        if !self.open {
            bail!("the connection was closed by the previous exchange");
        }
        let bytes = req.to_bytes();
        let (head, body) = bytes.split_at(bytes.len() - req.body.len());
        self.stream.write_all(head).with_context(|| format!("send the head of {} {}", req.method, req.path))?;
        let timeout = self.stream.read_timeout()?;
        self.stream.set_read_timeout(Some(wait))?;
        let first = read_response(&mut self.stream, &mut self.buf, false);
        self.stream.set_read_timeout(timeout)?;
        let interim = match first {
            Ok((r, _)) if (100..200).contains(&r.status) => Some(r),
            Ok((r, _)) => {
                self.open = false;
                return Ok((None, r));
            }
            Err(e) if self.buf.is_empty() && is_timeout(&e) => None,
            Err(e) => return Err(e.context(format!("interim response to {} {}", req.method, req.path))),
        };
        self.stream.write_all(body).with_context(|| format!("send the body of {} {}", req.method, req.path))?;
        loop {
            let (resp, complete) = read_response(&mut self.stream, &mut self.buf, false)
                .with_context(|| format!("response to {} {}", req.method, req.path))?;
            // An interim response that came after `wait` is not the answer.
            if !(100..200).contains(&resp.status) {
                self.open = complete && !req.close && !resp.closes();
                return Ok((interim, resp));
            }
        }
    }

    /// The connection after a `101 Switching Protocols`: the stream and the bytes already read past the response.
    pub fn into_upgraded(self) -> (std::net::TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }

    fn exchange(&mut self, req: &Request, half_close: bool) -> anyhow::Result<HttpResponse> {
        if !self.open {
            bail!("the connection was closed by the previous exchange");
        }
        self.stream.write_all(&req.to_bytes()).with_context(|| format!("send {} {}", req.method, req.path))?;
        if half_close {
            self.stream.shutdown(std::net::Shutdown::Write).context("shutdown(SHUT_WR)")?;
        }
        let head_only = req.method.eq_ignore_ascii_case("HEAD");
        let (resp, complete) = read_response(&mut self.stream, &mut self.buf, head_only)
            .with_context(|| format!("response to {} {}", req.method, req.path))?;
        self.open = complete && !req.close && !resp.closes() && !half_close;
        Ok(resp)
    }
}

/// Whether `e` is a read that timed out.
fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    })
}

/// Reads one response from `stream` (with `buf` holding bytes already read past the previous one); returns it and
/// whether its end was delimited (so the connection can be reused), leaving any extra bytes in `buf`.
fn read_response(
    stream: &mut std::net::TcpStream,
    buf: &mut Vec<u8>,
    head_only: bool,
) -> anyhow::Result<(HttpResponse, bool)> {
    let mut chunk = [0u8; 16 * 1024];
    let mut fill = |buf: &mut Vec<u8>| -> anyhow::Result<bool> {
        // A signal to this thread (a child process of another test ending) interrupts a read with a timeout.
        let n = loop {
            match stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.context("read")?,
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() as u64 > MAX_RESPONSE {
            bail!("response larger than {MAX_RESPONSE} bytes");
        }
        Ok(n > 0)
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if !fill(buf)? {
            bail!("connection closed after {} bytes, before the end of the headers", buf.len());
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("headers are not UTF-8")?.to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let resp = HttpResponse { status, headers, body: String::new() };
    buf.drain(..head_end + 4);
    let no_body = head_only || status == 204 || status == 304 || (100..200).contains(&status);
    let chunked = resp.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = match resp.header("content-length") {
        Some(v) => Some(v.parse::<usize>().with_context(|| format!("bad content-length {v:?}"))?),
        None => None,
    };
    let (body, complete) = if no_body {
        (Vec::new(), true)
    } else if chunked {
        loop {
            if let Some((body, used)) = dechunk_prefix(buf)? {
                buf.drain(..used);
                break (body, true);
            }
            if !fill(buf)? {
                bail!("connection closed inside a chunked body");
            }
        }
    } else if let Some(n) = length {
        while buf.len() < n {
            if !fill(buf)? {
                bail!("connection closed after {} of {n} body bytes", buf.len());
            }
        }
        (buf.drain(..n).collect(), true)
    } else {
        while fill(buf)? {}
        (std::mem::take(buf), false)
    };
    Ok((HttpResponse { body: String::from_utf8_lossy(&body).into_owned(), ..resp }, complete))
}

/// Decodes a chunked body at the start of `data` if it is complete (through the trailers' empty line): the body
/// and how many bytes it took; `None` if more bytes are needed.
fn dechunk_prefix(data: &[u8]) -> anyhow::Result<Option<(Vec<u8>, usize)>> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let Some(line_end) = data[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let size_text = std::str::from_utf8(&data[at..at + line_end]).context("chunk size is not text")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).with_context(|| format!("bad chunk size {size_text:?}"))?;
        at += line_end + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = data[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
                at += end + 2;
                if end == 0 {
                    return Ok(Some((out, at)));
                }
            }
        }
        if data.len() < at + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&data[at..at + size]);
        at += size + 2;
    }
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
    fn a_chunked_prefix_is_decoded_only_once_complete() {
        let data = b"3\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\nHTTP/1.1";
        let full = data.len() - "HTTP/1.1".len();
        assert_eq!(dechunk_prefix(data).unwrap(), Some((b"abcde".to_vec(), full)));
        for cut in [0, 2, 5, 9, 15, full - 1] {
            assert_eq!(dechunk_prefix(&data[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn requests_carry_their_headers_and_body_length() {
        let r = Request::new("POST", "echo", "/x").header("x-test", "1").body("hi").close();
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "POST /x HTTP/1.1\r\nHost: echo\r\nUser-Agent: ambit-lab\r\nx-test: 1\r\nContent-Length: 2\r\n\
             Connection: close\r\n\r\nhi"
        );
        let g = String::from_utf8(Request::get("echo", "/").to_bytes()).unwrap();
        assert!(!g.contains("Content-Length") && !g.contains("Connection"), "{g}");
    }

    #[test]
    fn a_response_without_headers_end_is_an_error() {
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
