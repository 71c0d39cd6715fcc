//! The HBONE listener on 15008: mutual TLS with the waypoint's own
//! certificate (the client's identity comes from its certificate), HTTP/2
//! CONNECT streams whose `:authority` is a service VIP:port the waypoint
//! serves, then the stream is served by its port's protocol — HTTP (hyper,
//! HTTP/1.1 or HTTP/2 by the bytes) through [`crate::proxy`], or TCP relayed
//! to an endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_hbone::headers::parse_baggage;
use ambit_hbone::stream::TunnelStream;
use ambit_hbone::{server_builder, tls_socket, tune_tls};
use ambit_identity::{peer_identity, Identity};
use ambit_xds_client::certs::CertManager;
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::config::Protocol;
use crate::detect::{detect, Detected, Rewind};
use crate::metrics::{RefusedReason, ServiceLabels, WorkloadLabels};
use crate::proxy::{handle, Downstream, Shared};

// A peer that does not finish its TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
// How long a client on an undeclared port may stay silent before it is taken for TCP.
const DETECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the listener needs.
pub struct Listener {
    pub shared: Arc<Shared>,
    pub certs: Arc<CertManager>,
    pub identity: Identity,
    pub max_streams: u32,
    /// Turns `true` on SIGTERM: stop accepting, let open connections finish.
    pub draining: watch::Receiver<bool>,
    /// Held by every task of the listener (through its `Arc`): once all are
    /// gone, the receiver's `recv` ends and the drain is complete.
    pub active: mpsc::Sender<()>,
}

impl Listener {
    /// Accepts HBONE connections for ever.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        let mut draining = self.draining.clone();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = signaled(&mut draining) => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.connection(stream, peer).await });
                }
                Err(e) => {
                    warn!(error = %e, "hbone accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let metrics = &self.shared.metrics;
        let certs = match self.certs.get(&self.identity).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "no certificate for the waypoint; refusing hbone");
                metrics.refused(RefusedReason::no_certificate);
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let accept = TlsAcceptor::from(certs.server_config()).accept(tls_socket(stream));
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
            Ok(Ok(mut tls)) => {
                tune_tls(tls.get_mut().1);
                tls
            }
            Ok(Err(e)) => {
                warn!(%peer, error = %e, "hbone tls handshake failed");
                metrics.refused(RefusedReason::tls_handshake);
                return;
            }
            Err(_) => {
                warn!(%peer, "hbone tls handshake timed out");
                metrics.refused(RefusedReason::tls_handshake);
                return;
            }
        };
        let Some(identity) = peer_identity(tls.get_ref().1) else {
            warn!(%peer, "bug: hbone peer without identity after handshake");
            metrics.refused(RefusedReason::tls_handshake);
            return;
        };
        let identity = Arc::new(identity);
        let mut conn = match server_builder(self.max_streams).handshake::<_, Bytes>(tls).await {
            Ok(c) => c,
            Err(e) => {
                warn!(%peer, error = %e, "hbone http/2 handshake failed");
                metrics.refused(RefusedReason::bad_request);
                return;
            }
        };
        let mut draining = self.draining.clone();
        let mut going_away = false;
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                // GOAWAY: the client's ztunnel opens new tunnels elsewhere;
                // streams already open are served to their end.
                _ = signaled(&mut draining), if !going_away => {
                    conn.graceful_shutdown();
                    going_away = true;
                    continue;
                }
            };
            let Some(next) = next else { break };
            match next {
                Ok((req, respond)) => {
                    let me = self.clone();
                    let identity = identity.clone();
                    tokio::spawn(async move { me.stream(peer, identity, req, respond).await });
                }
                Err(e) => {
                    debug!(%peer, error = %e, "hbone connection ended with error");
                    break;
                }
            }
        }
    }

    async fn stream(
        self: Arc<Self>,
        peer: SocketAddr,
        identity: Arc<Identity>,
        req: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let metrics = &self.shared.metrics;
        let target = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let target = match (req.method(), target) {
            (&Method::CONNECT, Some(t)) => t,
            (m, _) => {
                warn!(%peer, method = %m, uri = %req.uri(), "malformed hbone request; expected CONNECT ip:port");
                metrics.refused(RefusedReason::bad_request);
                reply(&mut respond, StatusCode::BAD_REQUEST);
                return;
            }
        };
        let snapshot = self.shared.snapshots.current();
        let Some(served) = snapshot.served(target) else {
            warn!(%peer, %target, client = %identity, "hbone target is not a service this waypoint serves");
            metrics.refused(RefusedReason::unknown_target);
            reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            return;
        };
        let protocol = served.port.protocol;
        // Clients are seldom in the waypoint's configuration: their ztunnel's baggage names them.
        let labels = match snapshot.workload_by_ip(peer.ip()) {
            Some(w) if w.identity == *identity => WorkloadLabels::from_workload(w),
            _ => WorkloadLabels::from_baggage(&identity, parse_baggage(req.headers()).as_ref()),
        };
        let service = ServiceLabels::from_service(&served.service.service);
        drop(snapshot);
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(e) => {
                debug!(%peer, error = %e, "hbone stream ended before the response");
                return;
            }
        };
        let stream = TunnelStream::new(send, req.into_body());
        let down = Arc::new(Downstream { peer, identity, target, labels, service });
        let (kind, stream) = match protocol {
            Protocol::Tcp => (Detected::Tcp, Rewind::new(stream)),
            Protocol::Http1 | Protocol::Http2 | Protocol::Grpc => (Detected::Http, Rewind::new(stream)),
            Protocol::Detect => match detect(stream, DETECT_TIMEOUT).await {
                Ok(d) => d,
                Err(e) => {
                    debug!(%peer, error = %e, "stream ended while detecting its protocol");
                    return;
                }
            },
        };
        match kind {
            Detected::Http => self.serve_http(down, protocol, stream).await,
            Detected::Tcp => crate::tcp::forward(&self.shared, &down, stream).await,
        }
    }

    async fn serve_http(&self, down: Arc<Downstream>, protocol: Protocol, stream: Rewind<TunnelStream>) {
        let shared = self.shared.clone();
        let peer = down.peer;
        let service = service_fn(move |req| {
            let (shared, down) = (shared.clone(), down.clone());
            async move { Ok::<_, std::convert::Infallible>(handle(shared, down, req).await) }
        });
        let builder = http_builder(protocol);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let mut draining = self.draining.clone();
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = signaled(&mut draining) => {
                // Finish the request in flight, then close (HTTP/2: GOAWAY).
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            if is_head_too_large(&*e) {
                // hyper answered 431 (or 414) itself: no request reached the handler, so count the refusal here.
                debug!(%peer, error = %e, "request head over the limits");
                self.shared.metrics.refused(RefusedReason::head_too_large);
            } else {
                debug!(%peer, error = %e, "http connection ended with error");
            }
        }
    }
}

/// The HTTP server of a stream of a port declared `protocol` (HTTP/1.1 or
/// HTTP/2 by the bytes when undeclared), with hyper's default limits but
/// HTTP/2's header list size ([`crate::limits`]).
fn http_builder(protocol: Protocol) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client may shut down its sending side once its request is written (nc, scripts): answer it anyway, as
    // Envoy does, instead of closing on that end of input.
    builder.http1().half_close(true);
    builder.http2().max_header_list_size(crate::limits::HTTP2_MAX_HEADER_LIST_SIZE);
    match protocol {
        Protocol::Http1 => builder.http1_only(),
        Protocol::Http2 | Protocol::Grpc => builder.http2_only(),
        Protocol::Detect | Protocol::Tcp => builder,
    }
}

/// Whether an HTTP connection ended because a request head was over
/// hyper's limits (it answered 431 or 414 before calling the handler).
fn is_head_too_large(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_parse_too_large)
}

/// Resolves once `draining` turns `true` (or its sender is gone).
async fn signaled(draining: &mut watch::Receiver<bool>) {
    let _ = draining.wait_for(|d| *d).await;
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut r = Response::new(());
    *r.status_mut() = status;
    let _ = respond.send_response(r, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves one connection with the waypoint's HTTP/1 settings: what the client read, and how the connection ended.
    async fn serve_one(request: String) -> (String, Result<(), Box<dyn std::error::Error + Send + Sync>>) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let service = service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
        });
        let served = tokio::spawn(async move {
            http_builder(Protocol::Http1).serve_connection_with_upgrades(TokioIo::new(server), service).await
        });
        client.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        (String::from_utf8_lossy(&answer).into_owned(), served.await.unwrap())
    }

    #[tokio::test]
    async fn a_head_over_the_header_count_is_answered_431_and_recognized() {
        let many: String = (0..110).map(|i| format!("x-h-{i}: v\r\n")).collect();
        let (answer, ended) = serve_one(format!("GET / HTTP/1.1\r\nhost: a\r\n{many}\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let e = ended.expect_err("the connection ends with hyper's parse error");
        assert!(is_head_too_large(&*e), "{e:?}");

        let (answer, ended) = serve_one("GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n".into()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(ended.is_ok(), "{ended:?}");
    }
}
