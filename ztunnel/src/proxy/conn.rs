//! Per-connection bookkeeping: Istio's TCP metrics (opened at start; closed
//! and byte counts at the end, whatever the outcome) and the plain-TCP relay.

use std::sync::Arc;

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
pub async fn relay_plain(mut downstream: TcpStream, mut upstream: TcpStream) -> (Bytes, std::io::Result<()>) {
    match tokio::io::copy_bidirectional_with_sizes(&mut downstream, &mut upstream, PLAIN_BUF, PLAIN_BUF).await {
        Ok((received, sent)) => (Bytes { received, sent }, Ok(())),
        Err(e) => {
            for s in [&downstream, &upstream] {
                let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
            }
            (Bytes::default(), Err(e))
        }
    }
}
