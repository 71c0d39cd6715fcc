//! An HBONE tunnel as a byte stream (`AsyncRead` + `AsyncWrite`), for code
//! that speaks a protocol over it rather than relaying it to a socket: the
//! waypoint runs HTTP (hyper) on the CONNECT streams it accepts and on the
//! tunnels it opens to endpoints.
//!
//! h2 flow control is the backpressure: received bytes are released to the
//! peer's window only once the reader took them, and a write waits for send
//! capacity instead of queueing without bound. Writes reuse one buffer
//! (reclaimed once h2 has sent the previous chunk), so carrying bytes does
//! not allocate per write.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

// The most one write hands to h2 at once: a DATA frame's worth.
const MAX_WRITE: usize = 256 * 1024;

// A stream dropped after its END_STREAM waits this long for the peer's,
// discarding at most LINGER_BYTES, before it is reset.
const LINGER: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 1024 * 1024;

/// Both halves of one HBONE stream, read and written as bytes.
pub struct TunnelStream {
    send: SendStream<Bytes>,
    /// Always `Some` until dropped (see the `Drop` impl).
    recv: Option<RecvStream>,
    /// Received, not yet read.
    pending: Bytes,
    /// The peer ended its side (END_STREAM).
    eof: bool,
    /// The buffer writes are copied into before h2 takes them.
    out: BytesMut,
    /// END_STREAM was sent.
    closed: bool,
}

impl TunnelStream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        TunnelStream { send, recv: Some(recv), pending: Bytes::new(), eof: false, out: BytesMut::new(), closed: false }
    }

    fn recv(&mut self) -> &mut RecvStream {
        self.recv.as_mut().expect("bug: receive half taken before drop")
    }

    /// Resets the stream (RST_STREAM CANCEL): the peer sees an error, not a
    /// clean end, as when a relay breaks.
    pub fn reset(&mut self) {
        self.send.send_reset(h2::Reason::CANCEL);
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 i/o error"))
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let taken = self.pending.split_to(n);
                buf.put_slice(&taken);
                // Only now may the peer send more: the reader took the bytes.
                let _ = self.recv().flow_control().release_capacity(n);
                crate::workers::note_activity();
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv().poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => self.eof = true,
            }
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = data.len().min(MAX_WRITE);
        self.send.reserve_capacity(want);
        let granted = loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => break n.min(want),
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        };
        let this = &mut *self;
        this.out.reserve(granted);
        this.out.extend_from_slice(&data[..granted]);
        let chunk = this.out.split().freeze();
        this.send.send_data(chunk, false).map_err(to_io)?;
        crate::workers::note_activity();
        Poll::Ready(Ok(granted))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The HTTP/2 connection's task writes the frames out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closed {
            self.closed = true;
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// A stream ended on this side (shut down) whose peer has not ended its own
/// side yet: dropping both halves now would reset it (RST_STREAM), which the
/// peer takes for a broken tunnel — an HTTP server that answered and closed
/// does that on every `Connection: close`. Keep the receive half open for
/// a bounded time instead, discarding what still arrives, until the peer's
/// END_STREAM closes the stream cleanly.
impl Drop for TunnelStream {
    fn drop(&mut self) {
        if !self.closed || self.eof {
            return;
        }
        let (Some(mut recv), Ok(runtime)) = (self.recv.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        runtime.spawn(async move {
            let drain = async {
                let mut discarded = 0;
                while let Some(Ok(data)) = recv.data().await {
                    discarded += data.len();
                    let _ = recv.flow_control().release_capacity(data.len());
                    if discarded > LINGER_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{Method, Request, Response, StatusCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A CONNECT stream over a real HTTP/2 connection on loopback TCP: the
    /// client's and the server's ends.
    async fn stream_pair() -> (TunnelStream, TunnelStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = crate::server_builder(10).handshake::<_, Bytes>(tcp).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond.send_response(Response::new(()), false).unwrap();
            TunnelStream::new(send, req.into_body())
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = crate::client_builder().handshake::<_, Bytes>(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut sender = sender.ready().await.unwrap();
        let req = Request::builder().method(Method::CONNECT).uri("10.0.0.1:80").body(()).unwrap();
        let (resp, send) = sender.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        (TunnelStream::new(send, resp.into_body()), server.await.unwrap())
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_exactly_and_a_shutdown_is_an_end_of_stream() {
        let (mut client, mut server) = stream_pair().await;
        // More than the stream's flow-control window, so capacity must be released as it is read.
        let sent: Vec<u8> = (0..9 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == expected, "{} bytes received of {}", got.len(), expected.len());
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
    }

    #[tokio::test]
    async fn a_side_that_answers_and_drops_lets_the_peer_finish_cleanly() {
        let (mut client, mut server) = stream_pair().await;
        client.write_all(b"request").await.unwrap();
        let mut got = [0u8; 7];
        server.read_exact(&mut got).await.unwrap();
        // The server answers, ends its side and goes away before the client ends its own (HTTP's
        // `Connection: close`).
        server.write_all(b"response").await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response");
        // Time for a reset to arrive, were one sent: the client's end must still be accepted.
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b"late bytes, discarded").await.expect("no reset after the server's clean end");
        client.shutdown().await.expect("the client ends its side cleanly");
    }

    #[tokio::test]
    async fn a_reader_that_stops_holds_the_writer_back() {
        let (mut client, _server) = stream_pair().await;
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        let blocked = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                client.write_all(&chunk).await.unwrap();
                written += chunk.len();
            }
        })
        .await;
        assert!(blocked.is_err(), "the writer never waited");
        // Bounded by the stream's window plus h2's send buffer, not by the data offered.
        assert!(written <= 8 * 1024 * 1024, "{written} bytes buffered for a reader that reads nothing");
    }

    #[tokio::test]
    async fn a_reset_reaches_the_reader_as_an_error() {
        let (mut client, mut server) = stream_pair().await;
        client.write_all(b"partial").await.unwrap();
        client.reset();
        let mut got = Vec::new();
        let r = server.read_to_end(&mut got).await;
        assert!(r.is_err(), "a reset read as a clean end after {got:?}");
    }
}
