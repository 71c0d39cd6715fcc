//! Protocol detection for a port that declares none: the first bytes the
//! client sends decide between HTTP (an HTTP/1 request line or the HTTP/2
//! preface) and opaque TCP. The bytes read are replayed ([`Rewind`]), so
//! whatever serves the stream sees it whole.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What the client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http,
    Tcp,
}

// Long enough for "OPTIONS " and the HTTP/2 preface's "PRI * ".
const SNIFF_LEN: usize = 8;

// Request methods, with the space after them (RFC 9110 and WebDAV's common ones).
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
    b"PRI ",
    b"MKCOL ",
    b"COPY ",
    b"MOVE ",
    b"LOCK ",
    b"UNLOCK ",
];

/// Classifies a prefix: `Some` once it is decided, `None` while it could
/// still become a request line.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    let mut possible = false;
    for m in METHODS {
        let n = prefix.len().min(m.len());
        if prefix[..n] == m[..n] {
            if prefix.len() >= m.len() {
                return Some(Detected::Http);
            }
            possible = true;
        }
    }
    (!possible).then_some(Detected::Tcp)
}

/// Reads the first bytes of `stream` (waiting at most `wait` for them) and
/// decides. A client that sends nothing in time (a server-first protocol)
/// is TCP. Returns the stream with the bytes read put back.
pub async fn detect<S: AsyncRead + Unpin>(mut stream: S, wait: Duration) -> io::Result<(Detected, Rewind<S>)> {
    let mut buf = [0u8; SNIFF_LEN];
    let mut len = 0;
    let deadline = tokio::time::Instant::now() + wait;
    let detected = loop {
        if let Some(d) = classify(&buf[..len]).filter(|_| len > 0) {
            break d;
        }
        if len == SNIFF_LEN {
            break Detected::Tcp;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf[len..])).await {
            Ok(Ok(0)) | Err(_) => break Detected::Tcp,
            Ok(Ok(n)) => len += n,
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((detected, Rewind { prefix: buf, start: 0, end: len, inner: stream }))
}

/// A stream with bytes already read put back in front.
pub struct Rewind<S> {
    prefix: [u8; SNIFF_LEN],
    start: usize,
    end: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// A stream with nothing put back.
    pub fn new(inner: S) -> Self {
        Rewind { prefix: [0; SNIFF_LEN], start: 0, end: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.start < me.end {
            let n = (me.end - me.start).min(buf.remaining());
            buf.put_slice(&me.prefix[me.start..me.start + n]);
            me.start += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn request_lines_and_the_h2_preface_are_http_anything_else_tcp() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0"), Some(Detected::Http));
        assert_eq!(classify(b"OPTIONS "), Some(Detected::Http));
        assert_eq!(classify(b"GE"), None, "could still be GET");
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tcp), "a TLS ClientHello");
        assert_eq!(classify(b"GETX"), Some(Detected::Tcp));
        assert_eq!(classify(b"SSH-2.0-"), Some(Detected::Tcp));
    }

    #[tokio::test]
    async fn sniffed_bytes_are_replayed_whole() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"POST /x HTTP/1.1\r\n").await.unwrap();
        drop(client);
        let (d, mut s) = detect(server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d, Detected::Http);
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"POST /x HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_silent_client_is_tcp_after_the_wait() {
        let (_client, server) = tokio::io::duplex(64);
        let (d, _) = detect(server, Duration::from_millis(50)).await.unwrap();
        assert_eq!(d, Detected::Tcp);
    }

    #[tokio::test]
    async fn a_request_line_split_over_reads_is_http() {
        let (mut client, server) = tokio::io::duplex(64);
        let sniff = tokio::spawn(detect(server, Duration::from_secs(5)));
        client.write_all(b"DE").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"LETE /a HTTP/1.1\r\n").await.unwrap();
        let (d, _) = sniff.await.unwrap().unwrap();
        assert_eq!(d, Detected::Http);
    }
}
