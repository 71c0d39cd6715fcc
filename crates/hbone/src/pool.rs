//! Pooled HBONE client connections. Tunnels from the same source pod and
//! identity to the same destination pod and identity share one mutual-TLS
//! HTTP/2 connection (multiplexed streams); a connection carries at most
//! `max_streams` tunnels before another is opened, concurrent streams are
//! spread over up to `max_connections` connections, and idle connections
//! close after `idle_timeout`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_identity::Identity;
use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::workers::Workers;

/// Where a connection's socket comes from: ztunnel makes it inside the
/// source pod's network namespace, the waypoint in its own.
pub trait Dialer: Sync {
    /// A new, unconnected TCP socket for a connection to `peer`.
    fn socket(&self, peer: SocketAddr) -> impl std::future::Future<Output = std::io::Result<socket2::Socket>> + Send;
}

/// The client side's certificate, as the pool needs it.
pub trait ClientCerts: Sync {
    /// The serial of the certificate presented: a pooled connection opened
    /// with another one is not reused (the certificate was rotated).
    fn serial(&self) -> &str;
    /// TLS client settings presenting this certificate and accepting only
    /// a peer of identity `peer`.
    fn client_config(&self, peer: &Identity) -> Result<Arc<rustls::ClientConfig>, BoxError>;
}

/// An error from a [`ClientCerts`] implementation.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The pool's metrics, registered by the proxy that owns it (clones share
/// their values).
#[derive(Clone, Debug, Default)]
pub struct PoolMetrics {
    /// Open pooled connections.
    pub pooled_connections: Gauge,
    /// Requests the peer did not process (GOAWAY, REFUSED_STREAM), sent again.
    pub retries: Counter,
}

/// What identifies a shareable connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    /// Source pod IP (the connection leaves from that pod's netns).
    pub src: IpAddr,
    pub src_identity: Identity,
    /// Destination ztunnel: pod IP and HBONE port.
    pub dst: SocketAddr,
    pub dst_identity: Identity,
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot create a socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("tls handshake with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: std::io::Error },
    #[error("tls configuration: {0}")]
    Certs(BoxError),
    #[error("http/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("bad CONNECT request for {0}")]
    BadRequest(String),
    #[error("the destination refused the tunnel with status {0}")]
    Refused(StatusCode),
}

impl PoolError {
    /// True when the peer's certificate chains to our roots but names
    /// another identity than the expected one. A certificate that does not
    /// verify (unknown issuer, bad chain, expired) is a TLS failure, not this.
    pub fn is_identity_failure(&self) -> bool {
        match self {
            PoolError::Tls { source, .. } => source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .is_some_and(ambit_identity::tls::is_unexpected_identity),
            _ => false,
        }
    }
}

// Stream count of a connection leaving the pool; above any max_streams.
const RETIRED: usize = usize::MAX / 2;

struct Conn {
    sender: SendRequest<Bytes>,
    streams: AtomicUsize,
    /// The connection ended, or left the pool.
    closed: AtomicBool,
    /// Serial of the client certificate it was opened with: after a
    /// rotation, new tunnels go to a connection with the new certificate
    /// and this one closes once its last stream ends.
    cert_serial: String,
    /// The worker thread driving it (see [`crate::workers`]).
    worker: Option<usize>,
}

/// Counts one open tunnel on a pooled connection.
pub struct StreamGuard(Arc<Conn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open tunnel: the two halves of the HTTP/2 stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub guard: StreamGuard,
    /// The headers of the destination's 200 response (its `baggage`).
    pub response: HeaderMap,
}

/// How to dial new connections.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub max_streams: usize,
    /// Connections per key before streams share one.
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// TCP congestion control of its sockets (`None`: the kernel default).
    pub congestion_control: Option<String>,
}

/// The connection pool of one ztunnel.
pub struct HbonePool {
    settings: PoolSettings,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    metrics: PoolMetrics,
    /// Set by [`HbonePool::drain`].
    draining: AtomicBool,
}

/// How one attempt to open a stream failed.
enum Attempt {
    /// The peer did not act on the request: it may go elsewhere.
    Unprocessed(PoolError),
    Failed(PoolError),
}

impl Attempt {
    fn into_error(self) -> PoolError {
        match self {
            Attempt::Unprocessed(e) | Attempt::Failed(e) => e,
        }
    }
}

/// Whether the peer says it did not process a stream: refused it
/// (REFUSED_STREAM), or announced with GOAWAY that it stops before it.
/// HTTP/2 guarantees such a request may be retried on another connection.
fn unprocessed(e: &h2::Error) -> bool {
    (e.is_go_away() && e.is_remote()) || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

impl HbonePool {
    pub fn new(settings: PoolSettings, metrics: PoolMetrics) -> Arc<Self> {
        Arc::new(HbonePool {
            settings,
            conns: Mutex::default(),
            dialing: Mutex::default(),
            metrics,
            draining: AtomicBool::new(false),
        })
    }

    /// Opens a tunnel to `authority` (the final destination, `ip:port`)
    /// through the ztunnel at `key.dst`, reusing a pooled connection when
    /// one has room. `headers` go on the CONNECT request (see
    /// [`super::headers`]). A request the peer did not process, because it
    /// is going away (a draining ztunnel's GOAWAY, REFUSED_STREAM) or the
    /// connection had already ended, is sent once more on a new connection:
    /// that one reaches the ztunnel that replaced it.
    ///
    /// `early` (possibly empty) is what the source already sent: it goes
    /// with the request, before the response, so a client that speaks first
    /// waits one round trip less (the peer holds it in the stream until it
    /// has connected, and drops it with the stream when it refuses).
    pub async fn open(
        self: &Arc<Self>,
        key: &PoolKey,
        dialer: &impl Dialer,
        certs: &impl ClientCerts,
        authority: SocketAddr,
        headers: HeaderMap,
        early: Bytes,
    ) -> Result<Tunnel, PoolError> {
        let conn = self.acquire(key, dialer, certs).await?;
        match self.request(&conn, key, authority, headers.clone(), early.clone()).await {
            Err(Attempt::Unprocessed(source)) => {
                // Out of the pool: its driver closes it once its streams end.
                conn.closed.store(true, Ordering::Relaxed);
                drop(conn);
                debug!(dst = %key.dst, error = %source, "hbone request not processed by the peer; retrying on a new connection");
                self.metrics.retries.inc();
                let fresh = self.dial(key, dialer, certs).await?;
                self.request(&fresh, key, authority, headers, early).await.map_err(Attempt::into_error)
            }
            other => other.map_err(Attempt::into_error),
        }
    }

    /// A connection with a stream slot reserved: a pooled one, else a new one.
    async fn acquire(
        self: &Arc<Self>,
        key: &PoolKey,
        dialer: &impl Dialer,
        certs: &impl ClientCerts,
    ) -> Result<Arc<Conn>, PoolError> {
        let serial = certs.serial();
        if let Some(c) = self.pick(key, serial) {
            return Ok(c);
        }
        let lock = self.dialing.lock().expect("bug: poisoned").entry(key.clone()).or_default().clone();
        let _g = lock.lock().await;
        match self.pick(key, serial) {
            Some(c) => Ok(c),
            None => self.dial(key, dialer, certs).await,
        }
    }

    /// Sends the CONNECT on `conn` (whose slot the caller reserved), and
    /// `early` after it, and waits for the response.
    async fn request(
        &self,
        conn: &Arc<Conn>,
        key: &PoolKey,
        authority: SocketAddr,
        headers: HeaderMap,
        early: Bytes,
    ) -> Result<Tunnel, Attempt> {
        let guard = StreamGuard(conn.clone());
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(authority.to_string())
            .body(())
            .map_err(|_| Attempt::Failed(PoolError::BadRequest(authority.to_string())))?;
        *req.headers_mut() = headers;
        let h2err = |source| Attempt::Failed(PoolError::H2 { addr: key.dst, source });
        // Nothing was sent when these fail: always safe to send elsewhere.
        let not_sent = |source| Attempt::Unprocessed(PoolError::H2 { addr: key.dst, source });
        let mut sender = conn.sender.clone().ready().await.map_err(not_sent)?;
        let (resp, mut send) = sender.send_request(req, false).map_err(not_sent)?;
        if !early.is_empty() {
            // Within the stream's initial window (far larger than `early`): h2 sends it with the headers.
            send.send_data(early, false).map_err(h2err)?;
        }
        let resp = match resp.await {
            Ok(r) => r,
            Err(e) if unprocessed(&e) => return Err(not_sent(e)),
            Err(e) => return Err(h2err(e)),
        };
        if resp.status() != StatusCode::OK {
            return Err(Attempt::Failed(PoolError::Refused(resp.status())));
        }
        let (parts, recv) = resp.into_parts();
        Ok(Tunnel { send, recv, guard, response: parts.headers })
    }

    /// Stops handing out pooled connections: ztunnel is draining, so each
    /// connection closes once its last stream ends, and tunnels opened from
    /// now on get a connection of their own that does not outlive them.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        for c in self.conns.lock().expect("bug: poisoned pool").values().flatten() {
            c.closed.store(true, Ordering::Relaxed);
        }
    }

    /// A live connection for `key` with a free stream slot, reserving it.
    /// Streams go to the least-loaded connection driven by the calling
    /// worker, else the least-loaded one; while a key has fewer than
    /// `max_connections`, a busy connection or one on another worker makes
    /// way for a new one here, so concurrent bulk streams are encrypted on
    /// several cores and a stream's bytes stay on one thread.
    fn pick(&self, key: &PoolKey, cert_serial: &str) -> Option<Arc<Conn>> {
        if self.draining.load(Ordering::Relaxed) {
            return None;
        }
        let mut conns = self.conns.lock().expect("bug: poisoned pool");
        let list = conns.get_mut(key)?;
        list.retain(|c| {
            if c.cert_serial != cert_serial {
                c.closed.store(true, Ordering::Relaxed); // its driver retires it when idle
            }
            !c.closed.load(Ordering::Relaxed)
        });
        let here = Workers::current();
        loop {
            let best = list.iter().min_by_key(|c| (c.worker != here, c.streams.load(Ordering::Relaxed)))?;
            let n = best.streams.load(Ordering::Relaxed);
            let elsewhere = n > 0 || best.worker != here;
            if n >= self.settings.max_streams || (elsewhere && list.len() < self.settings.max_connections) {
                return None;
            }
            if best.streams.compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                return Some(best.clone());
            }
        }
    }

    async fn dial(
        self: &Arc<Self>,
        key: &PoolKey,
        dialer: &impl Dialer,
        certs: &impl ClientCerts,
    ) -> Result<Arc<Conn>, PoolError> {
        let addr = key.dst;
        let sock = dialer.socket(addr).await.map_err(PoolError::Socket)?;
        super::set_congestion_control((&sock).into(), self.settings.congestion_control.as_deref())
            .map_err(|source| PoolError::Connect { addr, source })?;
        let connect = tokio::net::TcpSocket::from_std_stream(sock.into()).connect(addr);
        let tcp = match tokio::time::timeout(self.settings.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(PoolError::Connect { addr, source }),
            Err(_) => return Err(PoolError::ConnectTimeout(addr)),
        };
        let tls_config = certs.client_config(&key.dst_identity).map_err(PoolError::Certs)?;
        let mut tls = TlsConnector::from(tls_config)
            .connect(ServerName::IpAddress(addr.ip().into()), super::tls_socket(tcp))
            .await
            .map_err(|source| PoolError::Tls { addr, source })?;
        super::tune_tls(tls.get_mut().1);
        let (sender, connection) =
            super::client_builder().handshake(tls).await.map_err(|source| PoolError::H2 { addr, source })?;
        let conn = Arc::new(Conn {
            sender,
            streams: AtomicUsize::new(1),
            closed: AtomicBool::new(self.draining.load(Ordering::Relaxed)),
            cert_serial: certs.serial().to_owned(),
            worker: Workers::current(),
        });
        self.conns.lock().expect("bug: poisoned pool").entry(key.clone()).or_default().push(conn.clone());
        self.metrics.pooled_connections.inc();
        debug!(src = %key.src, dst = %addr, peer = %key.dst_identity, "opened pooled hbone connection");
        self.spawn_driver(key.clone(), conn.clone(), connection);
        Ok(conn)
    }

    /// Drives the HTTP/2 connection; closes it when idle too long.
    fn spawn_driver(
        self: &Arc<Self>,
        key: PoolKey,
        conn: Arc<Conn>,
        mut connection: h2::client::Connection<tokio_rustls::client::TlsStream<super::TlsSocket>, Bytes>,
    ) {
        let pool = Arc::downgrade(self);
        let idle = self.settings.idle_timeout;
        tokio::spawn(async move {
            let mut idle_since: Option<tokio::time::Instant> = None;
            let mut tick = tokio::time::interval(idle.min(Duration::from_secs(5)).max(Duration::from_millis(100)));
            loop {
                tokio::select! {
                    r = &mut connection => {
                        if let Err(e) = r {
                            warn!(dst = %key.dst, error = %e, "pooled hbone connection failed");
                        }
                        break;
                    }
                    _ = tick.tick() => {
                        if conn.streams.load(Ordering::Relaxed) != 0 {
                            idle_since = None;
                            continue;
                        }
                        let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                        // Retire only if no tunnel slipped in meanwhile: the
                        // sentinel count keeps `pick` away from it from now on.
                        // A connection that left the pool goes at once.
                        let done = conn.closed.load(Ordering::Relaxed) || since.elapsed() >= idle;
                        if done
                            && conn.streams.compare_exchange(0, RETIRED, Ordering::AcqRel, Ordering::Relaxed).is_ok()
                        {
                            debug!(dst = %key.dst, "closing idle pooled hbone connection");
                            break;
                        }
                    }
                }
            }
            conn.closed.store(true, Ordering::Relaxed);
            if let Some(p) = pool.upgrade() {
                p.remove(&key, &conn);
                p.metrics.pooled_connections.dec();
            }
        });
    }

    fn remove(&self, key: &PoolKey, conn: &Arc<Conn>) {
        let mut conns = self.conns.lock().expect("bug: poisoned pool");
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| !Arc::ptr_eq(c, conn));
            if list.is_empty() {
                conns.remove(key);
                self.dialing.lock().expect("bug: poisoned").remove(key);
            }
        }
    }

    /// Number of open pooled connections (for tests and the config dump).
    pub fn connection_count(&self) -> usize {
        self.conns.lock().expect("bug: poisoned pool").values().map(|v| v.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ambit_identity::{tls, CertificateAuthority};
    use rustls_pki_types::ServerName;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const H2: &[&[u8]] = &[b"h2"];

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa)
    }

    /// A real handshake from a client of `client_ca` expecting `reviews` to
    /// a server whose certificate `server_ca` issued for `server_sa`; the
    /// client's error.
    async fn handshake(
        server_ca: &CertificateAuthority,
        server_sa: &str,
        client_ca: &CertificateAuthority,
    ) -> PoolError {
        let server = tls::server_config(&server_ca.issue(&id(server_sa), HOUR).unwrap(), H2).unwrap();
        let client =
            tls::client_config(&client_ca.issue(&id("productpage"), HOUR).unwrap(), vec![id("reviews")], H2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = TlsAcceptor::from(server).accept(tcp).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let result = TlsConnector::from(client).connect(ServerName::IpAddress(addr.ip().into()), tcp).await;
        server.await.unwrap();
        match result {
            Ok(_) => panic!("the handshake should fail"),
            Err(source) => PoolError::Tls { addr, source },
        }
    }

    /// A CONNECT sent once the peer has said GOAWAY (a draining ztunnel) is one the peer never processed, and so
    /// one the pool sends again on a new connection; a refused CONNECT is not.
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_after_the_peers_goaway_is_unprocessed_and_a_refusal_is_not() {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let (go_away, mut told) = tokio::sync::mpsc::channel::<()>(1);
        let server = tokio::spawn(async move {
            let mut conn = crate::server_builder(100).handshake::<_, Bytes>(server_io).await.unwrap();
            loop {
                tokio::select! {
                    next = conn.accept() => {
                        let Some(Ok((_, mut respond))) = next else { break };
                        let mut refused = http::Response::new(());
                        *refused.status_mut() = StatusCode::FORBIDDEN;
                        respond.send_response(refused, true).unwrap();
                    }
                    Some(()) = told.recv() => conn.graceful_shutdown(),
                }
            }
        });
        let (sender, conn) = crate::client_builder().handshake::<_, Bytes>(client_io).await.unwrap();
        tokio::spawn(conn);
        let connect = || Request::builder().method(Method::CONNECT).uri("10.0.0.1:80").body(()).unwrap();
        let mut s = sender.clone().ready().await.unwrap();
        let (resp, _send) = s.send_request(connect(), false).unwrap();
        assert_eq!(resp.await.unwrap().status(), StatusCode::FORBIDDEN, "an answer, not an error");
        go_away.send(()).await.unwrap();
        let err = loop {
            // Until the GOAWAY arrives, requests still go through.
            let attempt = async {
                let mut s = sender.clone().ready().await?;
                let (resp, _send) = s.send_request(connect(), false)?;
                resp.await.map(drop)
            };
            match attempt.await {
                Ok(()) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => break e,
            }
        };
        assert!(unprocessed(&err), "{err:?}");
        assert!(!unprocessed(&h2::Error::from(h2::Reason::INTERNAL_ERROR)));
        server.await.unwrap();
    }

    struct LoopbackDialer;

    impl Dialer for LoopbackDialer {
        async fn socket(&self, _: SocketAddr) -> std::io::Result<socket2::Socket> {
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM.nonblocking(), None)
        }
    }

    struct Certs(Arc<rustls::ClientConfig>);

    impl ClientCerts for Certs {
        fn serial(&self) -> &str {
            "1"
        }
        fn client_config(&self, _: &Identity) -> Result<Arc<rustls::ClientConfig>, BoxError> {
            Ok(self.0.clone())
        }
    }

    /// What the source already sent travels with the CONNECT: a peer that waits for it before answering (as no
    /// real peer does) gets it, so the source saves the round trip to the answer.
    #[tokio::test(flavor = "current_thread")]
    async fn early_data_goes_with_the_request_before_the_answer() {
        let ca = CertificateAuthority::generate_root("cluster.local", 24 * HOUR).unwrap();
        let server = tls::server_config(&ca.issue(&id("reviews"), HOUR).unwrap(), H2).unwrap();
        let client = tls::client_config(&ca.issue(&id("productpage"), HOUR).unwrap(), vec![id("reviews")], H2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = TlsAcceptor::from(server).accept(tcp).await.unwrap();
            let mut conn = crate::server_builder(100).handshake::<_, Bytes>(tls).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = req.into_body();
            let early = tokio::time::timeout(Duration::from_secs(5), body.data()).await;
            let early = early.ok().flatten().map(Result::unwrap).unwrap_or_default();
            respond.send_response(http::Response::new(()), true).unwrap();
            early
        });
        let settings = PoolSettings {
            max_streams: 100,
            max_connections: 1,
            idle_timeout: HOUR,
            connect_timeout: Duration::from_secs(5),
            congestion_control: None,
        };
        let pool = HbonePool::new(settings, PoolMetrics::default());
        let key = PoolKey { src: addr.ip(), src_identity: id("productpage"), dst: addr, dst_identity: id("reviews") };
        let request = Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n");
        let (certs, authority) = (Certs(client), "10.0.0.1:80".parse().unwrap());
        let open = pool.open(&key, &LoopbackDialer, &certs, authority, HeaderMap::new(), request.clone());
        let tunnel = tokio::time::timeout(Duration::from_secs(10), open).await.expect("no answer").unwrap();
        assert_eq!(server.await.unwrap(), request, "the peer got the early data before it answered");
        drop(tunnel);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_unknown_issuer_is_a_tls_failure_and_a_wrong_identity_a_mismatch() {
        let mesh = CertificateAuthority::generate_root("cluster.local", 24 * HOUR).unwrap();
        let foreign = CertificateAuthority::generate_root("cluster.local", 24 * HOUR).unwrap();
        let unknown_issuer = handshake(&foreign, "reviews", &mesh).await;
        assert!(!unknown_issuer.is_identity_failure(), "{unknown_issuer}");
        let wrong_identity = handshake(&mesh, "ratings", &mesh).await;
        assert!(wrong_identity.is_identity_failure(), "{wrong_identity}");
    }
}
