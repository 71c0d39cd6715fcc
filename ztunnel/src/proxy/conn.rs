//! Per-connection bookkeeping: Istio's TCP metrics (opened at start; closed
//! and byte counts at the end, whatever the outcome), the access log, and
//! the plain-TCP relay.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::access_log::{AccessLog, Ends};
use crate::metrics::{ConnectionLabels, FailureReason, Metrics, Peers, Reporter, ResponseFlags};

/// Bytes of one connection in Istio's terms.
#[derive(Debug, Default, Clone, Copy)]
pub struct Bytes {
    /// From the source toward the destination (the request).
    pub received: u64,
    /// From the destination back to the source (the response).
    pub sent: u64,
}

/// Counts a connection as opened now, and as closed when dropped, with the
/// response flags set meanwhile (as Istio's ztunnel, bytes stay under the
/// labels the connection opened with); logs both ends of it when given
/// [`Ends`] (access logs on).
pub struct ConnMetrics {
    metrics: Arc<Metrics>,
    labels: ConnectionLabels,
    bytes: Bytes,
    log: Option<AccessLog>,
    error: Option<FailureReason>,
}

impl ConnMetrics {
    pub fn open(metrics: &Arc<Metrics>, reporter: Reporter, peers: Peers, mtls: bool, log: Option<Ends>) -> Self {
        let labels = ConnectionLabels::new(reporter, peers, mtls);
        metrics.connections_opened.get_or_create(&labels).inc();
        let log = log.map(|ends| AccessLog::open(ends, &labels));
        ConnMetrics { metrics: metrics.clone(), labels, bytes: Bytes::default(), log, error: None }
    }

    /// Notes why the connection failed, for its access log (the failure
    /// counter is counted where the failure is handled).
    pub fn error(&mut self, reason: FailureReason) {
        self.error = Some(reason);
    }

    /// Records the bytes moved; reported when the connection closes.
    pub fn record(&mut self, bytes: Bytes) {
        self.bytes = bytes;
    }

    /// Marks how the connection ended (Istio's `response_flags`).
    pub fn flag(&mut self, flags: ResponseFlags) {
        self.labels.response_flags = flags;
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            log.close(&self.labels, self.bytes.received, self.bytes.sent, self.error);
        }
        let m = &self.metrics;
        m.connections_closed.get_or_create(&self.labels).inc();
        self.labels.response_flags = ResponseFlags::None;
        m.received_bytes.get_or_create(&self.labels).inc_by(self.bytes.received);
        m.sent_bytes.get_or_create(&self.labels).inc_by(self.bytes.sent);
    }
}

// Per-direction buffer of the plain-TCP relay.
const PLAIN_BUF: usize = 64 * 1024;

/// Relays bytes between the downstream (source side) and upstream
/// (destination side) sockets until both directions close.
pub async fn relay_plain(downstream: TcpStream, upstream: TcpStream) -> (Bytes, std::io::Result<()>) {
    relay_plain_until(downstream, upstream, std::future::pending()).await
}

/// [`relay_plain`], ended early when `abort` completes: both sockets are
/// then reset, as on an error.
pub async fn relay_plain_until(
    downstream: TcpStream,
    upstream: TcpStream,
    abort: impl Future<Output = ()>,
) -> (Bytes, std::io::Result<()>) {
    let (mut down, mut up) = (NotingActivity::new(downstream), NotingActivity::new(upstream));
    let copied = tokio::select! {
        biased;
        copied = tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, PLAIN_BUF, PLAIN_BUF) => copied,
        () = abort => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed by ztunnel")),
    };
    match copied {
        Ok((received, sent)) => (Bytes { received, sent }, Ok(())),
        Err(e) => {
            for s in [&down.stream, &up.stream] {
                let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
            }
            // Bytes read on one side, most of them written to the other.
            (Bytes { received: down.read, sent: up.read }, Err(e))
        }
    }
}

/// A socket that tells its worker when bytes arrive, so the worker busy polls
/// after plain-TCP traffic as it does after HBONE traffic, and counts them
/// (for a relay that ends early).
struct NotingActivity {
    stream: TcpStream,
    read: u64,
}

impl NotingActivity {
    fn new(stream: TcpStream) -> Self {
        NotingActivity { stream, read: 0 }
    }
}

impl AsyncRead for NotingActivity {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.read += read as u64;
            ambit_hbone::workers::note_activity();
        }
        result
    }
}

impl AsyncWrite for NotingActivity {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
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

    #[test]
    fn a_flagged_connection_opens_with_dash_and_closes_with_its_flag_bytes_staying_under_dash() {
        let mut reg = prometheus_client::registry::Registry::default();
        let m = Metrics::new(&mut reg);
        let mut c = ConnMetrics::open(&m, Reporter::destination, Peers::default(), true, None);
        c.record(Bytes { received: 3, sent: 4 });
        c.flag(ResponseFlags::Deny);
        drop(c);
        let dash = ConnectionLabels::new(Reporter::destination, Peers::default(), true);
        let deny = ConnectionLabels { response_flags: ResponseFlags::Deny, ..dash.clone() };
        assert_eq!(m.connections_opened.get_or_create(&dash).get(), 1);
        assert_eq!(m.connections_opened.get_or_create(&deny).get(), 0);
        assert_eq!(m.connections_closed.get_or_create(&deny).get(), 1);
        assert_eq!(m.connections_closed.get_or_create(&dash).get(), 0);
        assert_eq!((m.received_bytes.get_or_create(&dash).get(), m.sent_bytes.get_or_create(&dash).get()), (3, 4));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_plain_relay_carries_both_ways_and_notes_activity_for_busy_polling() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ((mut client, down), (up, mut server)) = (pair(&l).await, pair(&l).await);
        let before = ambit_hbone::workers::activity_count();
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
        assert!(ambit_hbone::workers::activity_count() - before >= 2, "each direction's read noted activity");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_aborted_plain_relay_resets_both_sockets_and_keeps_the_counts() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ((mut client, down), (up, mut server)) = (pair(&l).await, pair(&l).await);
        let (abort, aborted) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(relay_plain_until(down, up, async {
            let _ = aborted.await;
        }));
        client.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        server.read_exact(&mut b).await.unwrap();
        abort.send(()).unwrap();
        let (bytes, result) = relay.await.unwrap();
        assert!(result.is_err());
        assert_eq!((bytes.received, bytes.sent), (4, 0));
        for s in [&mut client, &mut server] {
            let err = s.read(&mut b).await.expect_err("a reset, not an end of stream");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        }
    }
}
