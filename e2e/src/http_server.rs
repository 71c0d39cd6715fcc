//! A small HTTP/1.1 server for L7 tests: it answers every request with 200 and a text body naming the server and
//! echoing what it saw (method, path, `Host`, every header, the body's length), and records each request with the
//! peer address of its connection. Connections are kept open between requests (keep-alive) unless the client asks
//! to close, as a proxy that reuses its upstream connections needs. One std thread per connection.
//!
//! The body, one `key value` per line, is read back with [`EchoReply::parse`]:
//!
//! ```text
//! server echo-v1
//! method GET
//! path /v2/x?q=1
//! host echo.default.svc.cluster.local
//! body-bytes 0
//! header x-test 1
//! ```
//!
//! The response also carries `x-served-by: <name>`. A request to `/status/<code>` is answered with that status (same
//! body); one to `/delay/<ms>` is answered after that many milliseconds, and one to `/delay/<ms>/status/<code>` both. An upgrade request (`Connection: upgrade`, `Upgrade: echo`, as a WebSocket handshake is) is answered with
//! `101 Switching Protocols`, after which the connection echoes every byte back until the peer closes it.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::netns::NetNs;

/// The most a request head or body may hold.
const MAX_REQUEST: usize = 1 << 20;

/// How long a connection may stay idle between requests before the server closes it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// One request the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    /// The peer of the connection it came on.
    pub peer: SocketAddr,
    /// Which request of its connection it was (1 for the first).
    pub nth_on_connection: usize,
    /// Method.
    pub method: String,
    /// Request target.
    pub path: String,
    /// Headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct Seen {
    requests: Vec<SeenRequest>,
    connections: Vec<SocketAddr>,
}

/// The HTTP echo server (see the module docs); stops accepting on drop (open connections end with the process or
/// when their peer closes).
#[derive(Debug)]
pub struct HttpEchoServer {
    name: String,
    listener: Arc<TcpListener>,
    local: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpEchoServer {
    /// Listens on `addr` (port 0 picks one) inside `netns`, answering as `name`.
    pub fn start(netns: &NetNs, addr: SocketAddr, name: &str) -> anyhow::Result<Self> {
        let listener = netns
            .run(move || TcpListener::bind(addr))
            .with_context(|| format!("listen on {addr} in netns {}", netns.name()))?;
        let local = listener.local_addr()?;
        let listener = Arc::new(listener);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (l, s, n) = (listener.clone(), seen.clone(), name.to_string());
        let thread = std::thread::Builder::new().name(format!("http-{name}")).spawn(move || {
            // accept fails once Drop shuts the listener down.
            while let Ok((stream, peer)) = l.accept() {
                s.lock().expect("http server lock").connections.push(peer);
                let (s, n) = (s.clone(), n.clone());
                let spawned = std::thread::Builder::new().name(format!("http-{n}-conn")).spawn(move || {
                    if let Err(e) = serve(stream, peer, &n, &s) {
                        if !matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) {
                            eprintln!("http server {n}: connection from {peer}: {e}");
                        }
                    }
                });
                if let Err(e) = spawned {
                    eprintln!("http server: spawn: {e}");
                }
            }
        })?;
        Ok(HttpEchoServer { name: name.to_string(), listener, local, seen, thread: Some(thread) })
    }

    /// The name it answers as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The requests answered so far, in order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().expect("http server lock").requests.clone()
    }

    /// The peers of the connections accepted so far, in order.
    pub fn connections(&self) -> Vec<SocketAddr> {
        self.seen.lock().expect("http server lock").connections.clone()
    }
}

impl Drop for HttpEchoServer {
    fn drop(&mut self) {
        // shutdown() on a listening socket wakes a blocked accept() with an error on Linux.
        // SAFETY: the fd is owned by the listener, which outlives this call.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    version: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Whether the connection stays open after this request (HTTP/1.1 default; HTTP/1.0 needs keep-alive).
    fn keep_alive(&self) -> bool {
        let tokens = |v: &str, t: &str| v.split(',').any(|x| x.trim().eq_ignore_ascii_case(t));
        match self.header("connection") {
            Some(v) if tokens(v, "close") => false,
            Some(v) if tokens(v, "keep-alive") => true,
            _ => self.version == "HTTP/1.1",
        }
    }
}

/// Serves requests on one connection until the peer closes it or asks to.
fn serve(mut stream: TcpStream, peer: SocketAddr, name: &str, seen: &Mutex<Seen>) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::new();
    let mut nth = 0;
    loop {
        let Some(head) = read_head(&mut stream, &mut buf)? else { return Ok(()) };
        let body = read_body(&mut stream, &mut buf, &head)?;
        nth += 1;
        let path = head.path.clone();
        // `/delay/<ms>` first, then `/status/<code>` (either alone, or both: `/delay/<ms>/status/<code>`).
        let (delay, rest) = match path.strip_prefix("/delay/") {
            Some(d) => {
                let end = d.find(['/', '?']).unwrap_or(d.len());
                (d[..end].parse::<u64>().ok(), &d[end..])
            }
            None => (None, path.as_str()),
        };
        let status = rest
            .strip_prefix("/status/")
            .and_then(|c| c.split(['/', '?']).next()?.parse::<u16>().ok())
            .filter(|c| (200..600).contains(c))
            .unwrap_or(200);
        // Recorded as it arrives, before any delay: a test can count attempts its proxy gave up on.
        seen.lock().expect("http server lock").requests.push(SeenRequest {
            peer,
            nth_on_connection: nth,
            method: head.method.clone(),
            path,
            headers: head.headers.clone(),
        });
        if let Some(ms) = delay {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let mut text = format!(
            "server {name}\nmethod {}\npath {}\nhost {}\nbody-bytes {}\n",
            head.method,
            head.path,
            head.header("host").unwrap_or_default(),
            body.len()
        );
        for (n, v) in &head.headers {
            text.push_str(&format!("header {n} {v}\n"));
        }
        let keep = head.keep_alive();
        if head.header("upgrade") == Some("echo") && head.header("connection").is_some_and(|c| c.contains("pgrade")) {
            let switch = format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\nx-served-by: {name}\r\n\r\n"
            );
            stream.write_all(switch.as_bytes())?;
            stream.write_all(&buf)?;
            return io::copy(&mut stream.try_clone()?, &mut stream).map(drop);
        }
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-served-by: {name}\r\n",
            reason(status),
            if head.method == "HEAD" { 0 } else { text.len() }
        );
        if !keep {
            out.push_str("connection: close\r\n");
        }
        out.push_str("\r\n");
        if head.method != "HEAD" {
            out.push_str(&text);
        }
        stream.write_all(out.as_bytes())?;
        if !keep {
            return Ok(());
        }
    }
}

/// Reads the next request head; `None` when the peer closed the connection cleanly between requests.
fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Head>> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_REQUEST {
            return Err(io::Error::other("request head too large"));
        }
        if !fill(stream, buf)? {
            if buf.iter().all(u8::is_ascii_whitespace) {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed inside a request head"));
        }
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 4);
    // Tolerate empty lines before a request (RFC 9112 §2.2).
    let mut lines = text.trim_start_matches("\r\n").split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(io::Error::other(format!("bad request line {line:?}")));
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Some(Head { method: method.into(), path: path.into(), version: version.into(), headers }))
}

/// Reads the request body (`Content-Length` or chunked; none otherwise).
fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, head: &Head) -> io::Result<Vec<u8>> {
    if head.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line = read_line(stream, buf)?;
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {size_text:?}")))?;
            if size == 0 {
                // Trailers up to the empty line.
                while !read_line(stream, buf)?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > MAX_REQUEST {
                return Err(io::Error::other("request body too large"));
            }
            while buf.len() < size + 2 {
                if !fill(stream, buf)? {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed inside a chunk"));
                }
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    let n = match head.header("content-length") {
        Some(v) => v.parse::<usize>().map_err(|_| io::Error::other(format!("bad content-length {v:?}")))?,
        None => 0,
    };
    if n > MAX_REQUEST {
        return Err(io::Error::other("request body too large"));
    }
    while buf.len() < n {
        if !fill(stream, buf)? {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed inside a request body"));
        }
    }
    Ok(buf.drain(..n).collect())
}

/// Reads one CRLF-terminated line (without the CRLF).
fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<String> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 2);
            return Ok(line);
        }
        if buf.len() > MAX_REQUEST {
            return Err(io::Error::other("line too long"));
        }
        if !fill(stream, buf)? {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed inside a line"));
        }
    }
}

/// Appends what one read returns; false at end of stream.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// What an [`HttpEchoServer`] said it saw, parsed from its response body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EchoReply {
    /// The server's name.
    pub server: String,
    /// The method it saw.
    pub method: String,
    /// The request target it saw.
    pub path: String,
    /// The `Host` header it saw.
    pub host: String,
    /// The length of the request body it read.
    pub body_bytes: usize,
    /// The headers it saw (names lowercased; the last value of a repeated header wins, see
    /// [`EchoReply::header_values`] for all).
    pub headers: BTreeMap<String, String>,
    /// Every header line, in order.
    pub header_lines: Vec<(String, String)>,
}

impl EchoReply {
    /// Parses a body; `None` if it is not an echo server's (no `server` line).
    pub fn parse(body: &str) -> Option<Self> {
        let mut r = EchoReply::default();
        for line in body.lines() {
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "server" => r.server = rest.into(),
                "method" => r.method = rest.into(),
                "path" => r.path = rest.into(),
                "host" => r.host = rest.into(),
                "body-bytes" => r.body_bytes = rest.parse().unwrap_or_default(),
                "header" => {
                    let (n, v) = rest.split_once(' ').unwrap_or((rest, ""));
                    r.headers.insert(n.into(), v.into());
                    r.header_lines.push((n.into(), v.into()));
                }
                _ => {}
            }
        }
        (!r.server.is_empty()).then_some(r)
    }

    /// The value of header `name` (lowercase) the server saw.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Every value of header `name` (lowercase) the server saw, in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.header_lines.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{HttpConnection, Request};

    #[test]
    fn a_reply_body_is_parsed_back() {
        let r = EchoReply::parse(
            "server a\nmethod GET\npath /x?y=1\nhost h\nbody-bytes 3\nheader host h\nheader x-a 1 2\nheader x-a 3\n",
        )
        .unwrap();
        assert_eq!(
            (r.server.as_str(), r.method.as_str(), r.path.as_str(), r.host.as_str()),
            ("a", "GET", "/x?y=1", "h")
        );
        assert_eq!(r.body_bytes, 3);
        assert_eq!(r.header("x-a"), Some("3"));
        assert_eq!(r.header_values("x-a"), ["1 2", "3"]);
        assert_eq!(EchoReply::parse("RBAC: access denied"), None);
    }

    #[test]
    fn the_server_answers_requests_on_one_kept_alive_connection() {
        if !crate::require_root("the_server_answers_requests_on_one_kept_alive_connection") {
            return;
        }
        let ns = NetNs::create(&format!("http-unit-keepalive-{}", std::process::id())).unwrap();
        let server = HttpEchoServer::start(&ns, "127.0.0.1:0".parse().unwrap(), "unit").unwrap();
        let mut conn = HttpConnection::connect(&ns, server.local_addr(), Duration::from_secs(5)).unwrap();
        for i in 0..5 {
            let r = conn.send(&Request::get("unit.test", &format!("/n/{i}")).header("x-test", "yes")).unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-served-by"), Some("unit"));
            let echo = EchoReply::parse(&r.body).unwrap();
            assert_eq!((echo.path.as_str(), echo.host.as_str()), (format!("/n/{i}").as_str(), "unit.test"));
            assert_eq!(echo.header("x-test"), Some("yes"));
        }
        let posted = conn.send(&Request::new("POST", "unit.test", "/status/503").body("abc")).unwrap();
        assert_eq!((posted.status, EchoReply::parse(&posted.body).unwrap().body_bytes), (503, 3));
        let started = std::time::Instant::now();
        let slow_failure = conn.send(&Request::get("unit.test", "/delay/100/status/500/x")).unwrap();
        assert_eq!(slow_failure.status, 500, "{slow_failure:?}");
        assert!(started.elapsed() >= Duration::from_millis(100), "no delay before the status");
        let last = conn.send(&Request::get("unit.test", "/bye").close()).unwrap();
        assert!(last.closes() && !conn.is_open());
        assert_eq!(server.connections().len(), 1, "one connection for every request");
        let seen = server.requests();
        assert_eq!(seen.len(), 8);
        assert_eq!(seen[7].nth_on_connection, 8);
        assert_eq!(seen[0].header("x-test"), Some("yes"));
    }
}
