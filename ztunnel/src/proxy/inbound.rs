//! Inbound HBONE on 15008: terminates mutual TLS (the peer must present a
//! SPIFFE certificate of the mesh's trust domain), accepts HTTP/2 CONNECT
//! streams, applies L4 authorization, and connects to the application from
//! inside the pod keeping the client's pod IP as the source address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambit_identity::{tls, Identity};
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::conn::{Bytes as ConnBytes, ConnMetrics};
use super::peers::{fill_from_baggage, inbound_service, Claims};
use super::registry::{InboundConnection, Registration};
use super::socket::connect_from_pod;
use super::{Pod, ProxyInputs};
use crate::metrics::{Direction, FailureReason, PeerLabels, Peers, Reporter, ResponseFlags};
use crate::state::{ConnectionAttributes, ProxyState, Workload};
use ambit_hbone::headers::{forwarded_host, parse_baggage, response_baggage, TraceParent, BAGGAGE};
use ambit_hbone::{relay_until, server_builder, tls_socket, tune_tls};

// A peer that does not finish its TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn handle_connection(inputs: ProxyInputs, pod: Arc<Pod>, stream: TcpStream, peer: SocketAddr) {
    let certs = match inputs.certs.get(&pod.identity).await {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %pod.uid, error = %e, "no certificate for this pod; refusing hbone");
            inputs.metrics.failure(Direction::inbound, FailureReason::certificate);
            return;
        }
    };
    let accept = TlsAcceptor::from(certs.server_config()).accept(tls_socket(stream));
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(mut tls)) => {
            tune_tls(tls.get_mut().1);
            tls
        }
        Ok(Err(e)) => {
            warn!(pod = %pod.uid, %peer, error = %e, "hbone tls handshake failed");
            inputs.metrics.failure(Direction::inbound, FailureReason::tls_handshake);
            return;
        }
        Err(_) => {
            warn!(pod = %pod.uid, %peer, "hbone tls handshake timed out");
            inputs.metrics.failure(Direction::inbound, FailureReason::tls_handshake);
            return;
        }
    };
    let Some(src_identity) = tls::peer_identity(tls.get_ref().1) else {
        // The verifier requires a SPIFFE certificate; reaching here is a bug.
        warn!(pod = %pod.uid, %peer, "bug: hbone peer without identity after handshake");
        inputs.metrics.failure(Direction::inbound, FailureReason::tls_handshake);
        return;
    };
    let max_streams = inputs.config.pool_max_streams as u32;
    let mut conn = match server_builder(max_streams).handshake::<_, Bytes>(tls).await {
        Ok(c) => c,
        Err(e) => {
            warn!(pod = %pod.uid, %peer, error = %e, "hbone http/2 handshake failed");
            inputs.metrics.failure(Direction::inbound, FailureReason::bad_request);
            return;
        }
    };
    let src_identity = Arc::new(src_identity);
    let mut drain = inputs.drain.clone();
    let mut going_away = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            // Draining: GOAWAY tells the peer to open new tunnels elsewhere (to
            // the ztunnel replacing this one); streams it already sent are
            // served, and `accept` ends once the last of them is done.
            () = drain.signaled(), if !going_away => {
                debug!(pod = %pod.uid, %peer, "draining: sending GOAWAY");
                conn.graceful_shutdown();
                going_away = true;
                continue;
            }
        };
        let Some(next) = next else { break };
        match next {
            Ok((req, respond)) => {
                let guard = inputs.drain.track();
                let stream = handle_stream(inputs.clone(), pod.clone(), peer, src_identity.clone(), req, respond);
                tokio::spawn(async move {
                    stream.await;
                    drop(guard);
                });
            }
            Err(e) => {
                debug!(pod = %pod.uid, %peer, error = %e, "hbone connection ended with error");
                break;
            }
        }
    }
}

async fn handle_stream(
    inputs: ProxyInputs,
    pod: Arc<Pod>,
    peer: SocketAddr,
    src_identity: Arc<Identity>,
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let target = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    let target = match (req.method(), target) {
        (&Method::CONNECT, Some(t)) => t,
        (m, _) => {
            warn!(pod = %pod.uid, %peer, method = %m, uri = %req.uri(), "malformed hbone request; expected CONNECT ip:port");
            inputs.metrics.failure(Direction::inbound, FailureReason::bad_request);
            reply(&mut respond, StatusCode::BAD_REQUEST);
            return;
        }
    };
    let claims = Claims { service_host: forwarded_host(req.headers()), baggage: parse_baggage(req.headers()) };
    if let Some(trace) = TraceParent::from_headers(req.headers()) {
        debug!(pod = %pod.uid, %peer, %target, %trace, "hbone request");
    }
    let request = InboundRequest { src: peer, src_identity: Some((*src_identity).clone()), target, claims };
    let Accepted { upstream, mut metrics, destination, mut registration } =
        match authorize_and_connect(&inputs, &pod, &request).await {
            Ok(ok) => ok,
            Err(reason) => {
                inputs.metrics.failure(Direction::inbound, reason);
                let status = match reason {
                    FailureReason::policy_denied => StatusCode::UNAUTHORIZED,
                    FailureReason::bad_request => StatusCode::BAD_REQUEST,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                reply(&mut respond, status);
                return;
            }
        };
    // As Istio's ztunnel, the reply names the destination in `baggage`.
    let mut ok = Response::new(());
    if let Some(b) = response_baggage(&destination.baggage()) {
        ok.headers_mut().insert(BAGGAGE, b);
    }
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = %pod.uid, %peer, error = %e, "hbone stream gone before the response");
            inputs.metrics.failure(Direction::inbound, FailureReason::stream_error);
            return;
        }
    };
    let (t, r) = relay_until(upstream, send, req.into_body(), registration.closed()).await;
    metrics.record(ConnBytes { received: t.from_tunnel, sent: t.to_tunnel });
    match r {
        Ok(()) => {}
        // A close by policy was logged and counted where it was decided.
        Err(_) if registration.closed_by_policy() => metrics.error(FailureReason::policy_denied),
        Err(e) => {
            warn!(pod = %pod.uid, %peer, %target, error = %e, "hbone stream broke");
            metrics.error(FailureReason::stream_error);
            inputs.metrics.failure(Direction::inbound, FailureReason::stream_error);
        }
    }
}

fn reply(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let _ = respond.send_response(resp, true);
}

/// An inbound connection to authorize: who, from where, to which socket.
pub(super) struct InboundRequest {
    pub src: SocketAddr,
    pub src_identity: Option<Identity>,
    pub target: SocketAddr,
    /// What the HBONE request's headers say (telemetry only).
    pub claims: Claims,
}

/// An authorized connection to the application.
pub(super) struct Accepted {
    pub upstream: TcpStream,
    /// Counted open; closes when dropped.
    pub metrics: ConnMetrics,
    /// The destination workload (this pod) as the state knows it.
    pub destination: Arc<Workload>,
    /// Its place among the open connections a policy change may close.
    pub registration: Registration,
}

/// The labels of an inbound connection, as Istio's ztunnel sets them: the
/// source from the state (by IP), what the state lacks from its baggage,
/// its principal from its certificate; the destination from the state.
fn inbound_peers(state: &ProxyState, pod: &Pod, dst: &Workload, req: &InboundRequest) -> Peers {
    let mut source = state.workload_by_ip(req.src.ip()).map(|w| PeerLabels::of(w)).unwrap_or_default();
    if let Some(id) = &req.src_identity {
        if let Some(b) = &req.claims.baggage {
            source = fill_from_baggage(source, b, id);
        }
        source = source.with_principal(id);
    }
    let service = inbound_service(state, dst, req.claims.service_host.as_deref(), req.target.port());
    Peers { source, destination: PeerLabels::of(dst).with_principal(&pod.identity), service }
}

/// Checks that `req` targets this pod and is allowed by policy, registers it
/// among the open connections (which a later policy change may close), then
/// connects to the application as the client's address. A connection that
/// gets that far is counted in Istio's metrics, a denied or failed one
/// closing with `DENY` or `CONNECT`. On failure returns the reason, having
/// logged it.
pub(super) async fn authorize_and_connect(
    inputs: &ProxyInputs,
    pod: &Pod,
    req: &InboundRequest,
) -> Result<Accepted, FailureReason> {
    let state = inputs.state.snapshot();
    let Some(dst) = state.workload_by_ip(req.target.ip()).filter(|w| pod.is(w)) else {
        warn!(pod = %pod.uid, src = %req.src, target = %req.target, "inbound target is not this pod; refusing");
        return Err(FailureReason::bad_request);
    };
    let peers = inbound_peers(&state, pod, dst, req);
    let log = inputs.access_log(req.src, req.target);
    let mut metrics = ConnMetrics::open(&inputs.metrics, Reporter::destination, peers, req.src_identity.is_some(), log);
    let attrs = ConnectionAttributes {
        src_identity: req.src_identity.clone(),
        src_ip: req.src.ip(),
        dst_ip: req.target.ip(),
        dst_port: req.target.port(),
    };
    if let Err(denied) = state.authorize(&attrs, dst) {
        warn!(
            pod = %pod.uid, src = %req.src, principal = ?req.src_identity.as_ref().map(|i| i.to_string()),
            target = %req.target, policy = ?denied.policy, reason = denied.reason, "connection denied by policy"
        );
        metrics.flag(ResponseFlags::Deny);
        metrics.error(FailureReason::policy_denied);
        return Err(FailureReason::policy_denied);
    }
    let conn = InboundConnection { src: req.src, attrs, dst: dst.clone() };
    let Ok(registration) = inputs.inbound.register(conn, &state, &inputs.state) else {
        metrics.flag(ResponseFlags::Deny);
        metrics.error(FailureReason::policy_denied);
        return Err(FailureReason::policy_denied); // logged by the registry
    };
    let cfg = &inputs.config;
    match connect_from_pod(&pod.netns, req.target, Some(req.src.ip()), cfg.connect_timeout).await {
        Ok(upstream) => Ok(Accepted { upstream, metrics, destination: dst.clone(), registration }),
        Err(e) => {
            warn!(pod = %pod.uid, src = %req.src, target = %req.target, error = %e, "application unreachable");
            metrics.flag(ResponseFlags::Connect);
            metrics.error(FailureReason::unreachable);
            Err(FailureReason::unreachable)
        }
    }
}
