//! Connections to endpoints: HTTP clients (hyper-util's pooled client) whose
//! connections are HBONE tunnels to the endpoint pod's ztunnel, or plain TCP
//! to a pod outside the mesh.
//!
//! Each endpoint (pod IP:port) has its own pair of pooled clients, whose
//! connector finds the workload with that address in the current snapshot
//! and opens a tunnel (CONNECT `:authority` = pod IP:port) through the shared
//! [`HbonePool`], presenting the waypoint's certificate and accepting only
//! the workload's identity. A request keeps the authority the client sent
//! (`Host`, or HTTP/2's `:authority`, as Envoy forwards it): hyper's HTTP/2
//! client takes `:authority` from the URI, which therefore cannot carry the
//! endpoint. HTTP connections are pooled per endpoint (so requests reuse a
//! tunnel), and tunnels to one node share its HBONE connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_hbone::pool::{BoxError, Dialer, HbonePool, PoolKey, StreamGuard};
use ambit_hbone::stream::TunnelStream;
use ambit_hbone::HBONE_PORT;
use ambit_identity::Identity;
use ambit_xds_client::certs::CertManager;
use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderMap, Request, Response, Uri, Version};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{capture_connection, Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::circuit::ConnectionSettings;
use crate::config::{SnapshotHandle, Tunnel};

/// The body of a forwarded request or response.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Why an endpoint could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no workload has address {0}")]
    UnknownEndpoint(IpAddr),
    #[error("no certificate for the waypoint: {0}")]
    Certificate(String),
    #[error("hbone to {0}: {1}")]
    Hbone(SocketAddr, ambit_hbone::pool::PoolError),
    #[error("connect to {0}: {1}")]
    Tcp(SocketAddr, io::Error),
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
}

/// What the connector needs.
pub struct UpstreamSettings {
    pub identity: Identity,
    /// The waypoint pod's IP (the source of its tunnels).
    pub source_ip: IpAddr,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

struct Inner {
    pool: Arc<HbonePool>,
    certs: Arc<CertManager>,
    snapshots: SnapshotHandle,
    settings: UpstreamSettings,
}

/// Opens connections to one endpoint, whatever the request's URI says (a
/// `tower` service of `Uri`s, as hyper-util's client wants).
#[derive(Clone)]
pub struct Connector {
    inner: Arc<Inner>,
    endpoint: SocketAddr,
    /// The whole opening: TCP connect, or the tunnel (TLS to the node's ztunnel, CONNECT).
    connect_timeout: Duration,
}

/// Sockets of the waypoint's own network namespace: it is not captured.
struct PlainDialer;

impl Dialer for PlainDialer {
    async fn socket(&self, peer: SocketAddr) -> io::Result<socket2::Socket> {
        let domain = socket2::Domain::for_address(peer);
        socket2::Socket::new(domain, socket2::Type::STREAM.nonblocking(), Some(socket2::Protocol::TCP))
    }
}

impl Connector {
    async fn connect(self) -> Result<UpstreamIo, ConnectError> {
        let addr = self.endpoint;
        match tokio::time::timeout(self.connect_timeout, self.open()).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(addr)),
        }
    }

    async fn open(self) -> Result<UpstreamIo, ConnectError> {
        let addr = self.endpoint;
        let snapshot = self.inner.snapshots.current();
        let workload = snapshot.workload_by_ip(addr.ip()).ok_or(ConnectError::UnknownEndpoint(addr.ip()))?;
        let settings = &self.inner.settings;
        if workload.tunnel == Tunnel::None {
            let tcp = TcpStream::connect(addr).await.map_err(|e| ConnectError::Tcp(addr, e))?;
            let _ = tcp.set_nodelay(true);
            return Ok(UpstreamIo { io: TokioIo::new(Io::Tcp(tcp)), _guard: None, uses: Uses::default() });
        }
        let certs =
            self.inner.certs.get(&settings.identity).await.map_err(|e| ConnectError::Certificate(e.to_string()))?;
        let key = PoolKey {
            src: settings.source_ip,
            src_identity: settings.identity.clone(),
            dst: SocketAddr::new(addr.ip(), HBONE_PORT),
            dst_identity: workload.identity.clone(),
        };
        let tunnel = self
            .inner
            .pool
            .open(&key, &PlainDialer, &*certs, addr, HeaderMap::new(), Bytes::new())
            .await
            .map_err(|e| ConnectError::Hbone(addr, e))?;
        let stream = TunnelStream::new(tunnel.send, tunnel.recv);
        Ok(UpstreamIo { io: TokioIo::new(Io::Tunnel(stream)), _guard: Some(tunnel.guard), uses: Uses::default() })
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        Box::pin(self.clone().connect())
    }
}

enum Io {
    Tunnel(TunnelStream),
    Tcp(TcpStream),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tunnel(s) => Pin::new(s).poll_flush(cx),
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One connection to an endpoint; holds its tunnel's slot in the pool.
pub struct UpstreamIo {
    io: TokioIo<Io>,
    _guard: Option<StreamGuard>,
    uses: Uses,
}

/// The requests a connection has carried (for `maxRequestsPerConnection`),
/// reached through the connection's metadata.
#[derive(Clone, Default)]
struct Uses(Arc<AtomicU32>);

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new().extra(self.uses.clone())
    }
}

impl Read for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The HTTP clients of one endpoint: HTTP/1.1 and HTTP/2 (prior knowledge).
struct EndpointClients {
    http1: Client<Connector, ProxyBody>,
    http2: Client<Connector, ProxyBody>,
}

/// The pooled HTTP clients of every endpoint in use, by the connection
/// settings their DestinationRule asks for.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
    clients: Arc<Mutex<ClientsByEndpoint>>,
}

/// Pooled clients by endpoint and the connection settings they were made with.
type ClientsByEndpoint = HashMap<(SocketAddr, ConnectionSettings), Arc<EndpointClients>>;

impl Upstream {
    pub fn new(
        pool: Arc<HbonePool>,
        certs: Arc<CertManager>,
        snapshots: SnapshotHandle,
        settings: UpstreamSettings,
    ) -> Upstream {
        let inner = Arc::new(Inner { pool, certs, snapshots, settings });
        Upstream { inner, clients: Arc::default() }
    }

    fn clients(&self, endpoint: SocketAddr, conn: &ConnectionSettings) -> Arc<EndpointClients> {
        let mut clients = self.clients.lock().expect("bug: poisoned");
        let make = || {
            let connector = self.connector(endpoint, conn);
            let idle = conn.idle_timeout.unwrap_or(self.inner.settings.idle_timeout);
            let builder = || {
                let mut b = Client::builder(TokioExecutor::new());
                b.pool_idle_timeout(idle).pool_timer(TokioTimer::new()).timer(TokioTimer::new());
                b
            };
            Arc::new(EndpointClients {
                http1: builder().build(connector.clone()),
                http2: builder().http2_only(true).build(connector),
            })
        };
        clients.entry((endpoint, *conn)).or_insert_with(make).clone()
    }

    fn connector(&self, endpoint: SocketAddr, conn: &ConnectionSettings) -> Connector {
        let connect_timeout = conn.connect_timeout.unwrap_or(self.inner.settings.connect_timeout);
        Connector { inner: self.inner.clone(), endpoint, connect_timeout }
    }

    /// Sends `req` to `endpoint` over HTTP/2 or HTTP/1.1, on a pooled
    /// connection when one is free (and has carried fewer than `conn`'s
    /// `max_requests_per_connection`). Its URI is `http://<authority><path>`
    /// with the authority the client asked for ([`request_uri`]).
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
        endpoint: SocketAddr,
        http2: bool,
        conn: ConnectionSettings,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let clients = self.clients(endpoint, &conn);
        let max_uses = conn.max_requests_per_connection;
        let captured = (max_uses != 0).then(|| capture_connection(&mut req));
        let response = if http2 {
            *req.version_mut() = Version::HTTP_2;
            host_into_authority(&mut req);
            clients.http2.request(req).await
        } else {
            *req.version_mut() = Version::HTTP_11;
            clients.http1.request(req).await
        };
        if let Some(captured) = &captured {
            if let Some(connected) = captured.connection_metadata().as_ref() {
                retire_when_used_up(connected, max_uses);
            }
        }
        response
    }

    /// Forgets the clients (and their idle connections) of endpoints whose
    /// address `keep` no longer accepts, so churn does not grow the map.
    pub fn prune(&self, keep: impl Fn(IpAddr) -> bool) {
        self.clients.lock().expect("bug: poisoned").retain(|(addr, _), _| keep(addr.ip()));
    }

    /// A raw connection to an endpoint, for TCP forwarding (`conn`: its connect timeout).
    pub async fn connect(
        &self,
        endpoint: SocketAddr,
        conn: &ConnectionSettings,
    ) -> Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin, ConnectError> {
        let io = self.connector(endpoint, conn).connect().await?;
        Ok(TokioIo::new(io))
    }
}

/// Counts a request on its connection; the one that reaches `max_uses` is
/// the connection's last (poisoned: the pool closes it instead of reusing it).
fn retire_when_used_up(connected: &Connected, max_uses: u32) {
    let mut extras = http::Extensions::new();
    connected.get_extras(&mut extras);
    if let Some(Uses(count)) = extras.get::<Uses>() {
        if count.fetch_add(1, Ordering::Relaxed) + 1 >= max_uses {
            connected.poison();
        }
    }
}

/// Over HTTP/2 the host travels as `:authority` alone: a `Host` header beside it is a duplicate that servers refuse
/// (nginx answers 400). The `Host` the request carries (as filters left it) becomes the URI's authority.
fn host_into_authority<B>(req: &mut Request<B>) {
    let Some(host) = req.headers_mut().remove(http::header::HOST) else { return };
    let Ok(authority) = Authority::try_from(host.as_bytes()) else { return };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.authority = Some(authority);
    parts.scheme.get_or_insert(http::uri::Scheme::HTTP);
    parts.path_and_query.get_or_insert_with(|| http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
}

/// The URI of a forwarded request: `http://`, the authority the client
/// asked for (HTTP/2's `:authority`, else `Host`; the endpoint's address if
/// it named none usable), and its path and query.
pub fn request_uri(original: &Uri, headers: &HeaderMap, endpoint: SocketAddr) -> Uri {
    let pq = original.path_and_query().map_or("/", |pq| pq.as_str());
    let authority = original
        .authority()
        .cloned()
        .or_else(|| headers.get(http::header::HOST)?.to_str().ok()?.parse::<Authority>().ok());
    let builder = Uri::builder().scheme("http").path_and_query(pq);
    let uri = match authority {
        Some(a) => builder.authority(a).build(),
        None => builder.authority(endpoint.to_string()).build(),
    };
    uri.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_http2_the_host_header_becomes_the_authority() {
        let mut req = Request::builder().uri("http://echo:81/a?b=1").header("host", "echo-shadow:81").body(()).unwrap();
        host_into_authority(&mut req);
        assert_eq!(req.uri().to_string(), "http://echo-shadow:81/a?b=1");
        assert!(req.headers().get("host").is_none(), "no duplicate of :authority");
        let mut bare = Request::builder().uri("http://echo/x").body(()).unwrap();
        host_into_authority(&mut bare);
        assert_eq!(bare.uri().to_string(), "http://echo/x", "no Host: the URI stays");
    }

    fn headers(host: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(http::header::HOST, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_forwarded_uri_keeps_the_authority_the_client_asked_for() {
        let endpoint: SocketAddr = "10.2.0.2:8080".parse().unwrap();
        // HTTP/2: `:authority` is the URI's; HTTP/2 upstreams send it as `:authority`, not the endpoint.
        let h2: Uri = "http://echo.default.svc.cluster.local:80/a?b=1".parse().unwrap();
        let uri = request_uri(&h2, &headers(None), endpoint);
        assert_eq!(uri.to_string(), "http://echo.default.svc.cluster.local:80/a?b=1");
        // HTTP/1.1: origin-form target, the authority in `Host`.
        let h1: Uri = "/a?b=1".parse().unwrap();
        assert_eq!(request_uri(&h1, &headers(Some("echo")), endpoint).to_string(), "http://echo/a?b=1");
        // Neither (HTTP/1.0), or a Host that is no authority: the endpoint's address.
        assert_eq!(request_uri(&h1, &headers(None), endpoint).to_string(), "http://10.2.0.2:8080/a?b=1");
        assert_eq!(request_uri(&h1, &headers(Some("a b")), endpoint).to_string(), "http://10.2.0.2:8080/a?b=1");
    }
}
