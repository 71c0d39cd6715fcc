//! Per-connection bookkeeping: Istio's TCP metrics (opened at start; closed
//! and byte counts at the end, whatever the outcome) and the plain-TCP relay.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::metrics::{ConnectionLabels, Metrics, Peers, Reporter};

/// Bytes of one connection in Istio's terms.
#[derive(Debug, Default, Clone, Copy)]
pub struct Bytes {
    /// From the source toward the destination (the request).
    pub received: u64,
    /// From the destination back to the source (the response).
    pub sent: u64,
}

/// Counts a connection as opened now, and as closed when dropped.
pub struct ConnMetrics {
    metrics: Arc<Metrics>,
    labels: ConnectionLabels,
    bytes: Bytes,
}

impl ConnMetrics {
    pub fn open(metrics: &Arc<Metrics>, reporter: Reporter, peers: &Peers, mtls: bool) -> Self {
        let labels = ConnectionLabels::new(reporter, peers, mtls);
        metrics.connections_opened.get_or_create(&labels).inc();
        ConnMetrics { metrics: metrics.clone(), labels, bytes: Bytes::default() }
    }

    /// Records the bytes moved; reported when the connection closes.
    pub fn record(&mut self, bytes: Bytes) {
        self.bytes = bytes;
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.connections_closed.get_or_create(&self.labels).inc();
        m.received_bytes.get_or_create(&self.labels).inc_by(self.bytes.received);
        m.sent_bytes.get_or_create(&self.labels).inc_by(self.bytes.sent);
    }
}

// Per-direction buffer of the plain-TCP relay.
const PLAIN_BUF: usize = 64 * 1024;

/// Relays bytes between the downstream (source side) and upstream
/// (destination side) sockets until both directions close.
pub async fn relay_plain(downstream: TcpStream, upstream: TcpStream) -> (Bytes, std::io::Result<()>) {
    let (mut down, mut up) = (NotingActivity(downstream), NotingActivity(upstream));
    match tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, PLAIN_BUF, PLAIN_BUF).await {
        Ok((received, sent)) => (Bytes { received, sent }, Ok(())),
        Err(e) => {
            for s in [&down.0, &up.0] {
                let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
            }
            (Bytes::default(), Err(e))
        }
    }
}

/// A socket that tells its worker when bytes arrive, so the worker busy polls
/// after plain-TCP traffic as it does after HBONE traffic.
struct NotingActivity(TcpStream);

impl AsyncRead for NotingActivity {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            crate::workers::note_activity();
        }
        result
    }
}

impl AsyncWrite for NotingActivity {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_plain_relay_carries_both_ways_and_notes_activity_for_busy_polling() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ((mut client, down), (up, mut server)) = (pair(&l).await, pair(&l).await);
        let before = crate::workers::activity_count();
        let relay = tokio::spawn(relay_plain(down, up));
        client.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        server.read_exact(&mut b).await.unwrap();
        server.write_all(b"pong!").await.unwrap();
        drop(server);
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        let (bytes, result) = relay.await.unwrap();
        assert_eq!((&b, back.as_slice()), (b"ping", b"pong!".as_slice()));
        assert!(result.is_ok());
        assert_eq!((bytes.received, bytes.sent), (4, 5));
        assert!(crate::workers::activity_count() - before >= 2, "each direction's read noted activity");
    }
}
