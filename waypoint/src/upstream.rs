//! Connections to endpoints: HTTP clients (hyper-util's pooled client) whose
//! connections are HBONE tunnels to the endpoint pod's ztunnel, or plain TCP
//! to a pod outside the mesh.
//!
//! A request is addressed to `http://<pod IP>:<port>`; the connector finds
//! the workload with that address in the current snapshot and opens a tunnel
//! (`:authority` = pod IP:port) through the shared [`HbonePool`], presenting
//! the waypoint's certificate and accepting only the workload's identity.
//! HTTP connections are pooled per endpoint by the client (so requests reuse
//! a tunnel), and tunnels to one node share its HBONE connection.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_hbone::pool::{BoxError, Dialer, HbonePool, PoolKey, StreamGuard};
use ambit_hbone::stream::TunnelStream;
use ambit_hbone::HBONE_PORT;
use ambit_identity::Identity;
use ambit_xds_client::certs::CertManager;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri, Version};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::{SnapshotHandle, Tunnel};

/// The body of a forwarded request or response.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Why an endpoint could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no workload has address {0}")]
    UnknownEndpoint(IpAddr),
    #[error("request URI {0} does not name an endpoint")]
    BadUri(Uri),
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

/// Opens connections to endpoints (a `tower` service of `Uri`s, as hyper-util's client wants).
#[derive(Clone)]
pub struct Connector(Arc<Inner>);

/// Sockets of the waypoint's own network namespace: it is not captured.
struct PlainDialer;

impl Dialer for PlainDialer {
    async fn socket(&self, peer: SocketAddr) -> io::Result<socket2::Socket> {
        let domain = socket2::Domain::for_address(peer);
        socket2::Socket::new(domain, socket2::Type::STREAM.nonblocking(), Some(socket2::Protocol::TCP))
    }
}

impl Connector {
    async fn connect(self, uri: Uri) -> Result<UpstreamIo, ConnectError> {
        let addr = uri
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
            .ok_or_else(|| ConnectError::BadUri(uri.clone()))?;
        let snapshot = self.0.snapshots.current();
        let workload = snapshot.workload_by_ip(addr.ip()).ok_or(ConnectError::UnknownEndpoint(addr.ip()))?;
        let settings = &self.0.settings;
        if workload.tunnel == Tunnel::None {
            let connect = TcpStream::connect(addr);
            let tcp = match tokio::time::timeout(settings.connect_timeout, connect).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return Err(ConnectError::Tcp(addr, e)),
                Err(_) => return Err(ConnectError::Timeout(addr)),
            };
            let _ = tcp.set_nodelay(true);
            return Ok(UpstreamIo { io: TokioIo::new(Io::Tcp(tcp)), _guard: None });
        }
        let certs = self.0.certs.get(&settings.identity).await.map_err(|e| ConnectError::Certificate(e.to_string()))?;
        let key = PoolKey {
            src: settings.source_ip,
            src_identity: settings.identity.clone(),
            dst: SocketAddr::new(addr.ip(), HBONE_PORT),
            dst_identity: workload.identity.clone(),
        };
        let tunnel = self
            .0
            .pool
            .open(&key, &PlainDialer, &*certs, addr, HeaderMap::new())
            .await
            .map_err(|e| ConnectError::Hbone(addr, e))?;
        let stream = TunnelStream::new(tunnel.send, tunnel.recv);
        Ok(UpstreamIo { io: TokioIo::new(Io::Tunnel(stream)), _guard: Some(tunnel.guard) })
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
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
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
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

/// The HTTP clients to endpoints: HTTP/1.1 and HTTP/2 (prior knowledge).
#[derive(Clone)]
pub struct Upstream {
    http1: Client<Connector, ProxyBody>,
    http2: Client<Connector, ProxyBody>,
    connector: Connector,
}

impl Upstream {
    pub fn new(
        pool: Arc<HbonePool>,
        certs: Arc<CertManager>,
        snapshots: SnapshotHandle,
        settings: UpstreamSettings,
    ) -> Upstream {
        let idle = settings.idle_timeout;
        let connector = Connector(Arc::new(Inner { pool, certs, snapshots, settings }));
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(idle).pool_timer(TokioTimer::new()).timer(TokioTimer::new());
            b
        };
        let http1 = builder().build(connector.clone());
        let http2 = builder().http2_only(true).build(connector.clone());
        Upstream { http1, http2, connector }
    }

    /// Sends `req` (its URI `http://<endpoint>/<path>`) over HTTP/2 or
    /// HTTP/1.1, on a pooled connection when one is free.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
        http2: bool,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        if http2 {
            *req.version_mut() = Version::HTTP_2;
            self.http2.request(req).await
        } else {
            *req.version_mut() = Version::HTTP_11;
            self.http1.request(req).await
        }
    }

    /// A raw connection to an endpoint, for TCP forwarding.
    pub async fn connect(
        &self,
        endpoint: SocketAddr,
    ) -> Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin, ConnectError> {
        let uri =
            Uri::try_from(format!("http://{endpoint}")).map_err(|_| ConnectError::UnknownEndpoint(endpoint.ip()))?;
        let io = self.connector.clone().connect(uri).await?;
        Ok(TokioIo::new(io))
    }
}
