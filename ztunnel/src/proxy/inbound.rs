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
use super::socket::connect_from_pod;
use super::{Pod, ProxyInputs};
use crate::hbone::{relay, server_builder, tls_socket, tune_tls};
use crate::metrics::{Direction, FailureReason, Peers, Reporter};
use crate::state::{ConnectionAttributes, ProxyState, Workload};

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
    while let Some(next) = conn.accept().await {
        match next {
            Ok((req, respond)) => {
                tokio::spawn(handle_stream(inputs.clone(), pod.clone(), peer, src_identity.clone(), req, respond));
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
    let request = InboundRequest { src: peer, src_identity: Some((*src_identity).clone()), target };
    let (upstream, peers) = match authorize_and_connect(&inputs, &pod, &request).await {
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
    let mut metrics = ConnMetrics::open(&inputs.metrics, Reporter::destination, &peers, true);
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = %pod.uid, %peer, error = %e, "hbone stream gone before the response");
            inputs.metrics.failure(Direction::inbound, FailureReason::stream_error);
            return;
        }
    };
    let (t, r) = relay(upstream, send, req.into_body()).await;
    metrics.record(ConnBytes { received: t.from_tunnel, sent: t.to_tunnel });
    if let Err(e) = r {
        warn!(pod = %pod.uid, %peer, %target, error = %e, "hbone stream broke");
        inputs.metrics.failure(Direction::inbound, FailureReason::stream_error);
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
}

/// The service an inbound connection most likely came through: HBONE names
/// only the pod, so, as Istio's ztunnel does, take the first of the pod's
/// services with a target port equal to the connection's.
fn inbound_service(state: &ProxyState, dst: &Workload, port: u16) -> Option<String> {
    let (key, _) = dst.services.iter().find(|(_, ports)| {
        ports.iter().any(|p| (if p.target_port == 0 { p.service_port } else { p.target_port }) == port)
    })?;
    state.service_by_key(key).map(|s| s.hostname.clone())
}

/// Checks that `req` targets this pod and is allowed by policy, then
/// connects to the application as the client's address. On failure returns
/// the reason, having logged it.
pub(super) async fn authorize_and_connect(
    inputs: &ProxyInputs,
    pod: &Pod,
    req: &InboundRequest,
) -> Result<(TcpStream, Peers), FailureReason> {
    let state = inputs.state.snapshot();
    let Some(dst) = state.workload_by_ip(req.target.ip()).filter(|w| pod.is(w)) else {
        warn!(pod = %pod.uid, src = %req.src, target = %req.target, "inbound target is not this pod; refusing");
        return Err(FailureReason::bad_request);
    };
    let src = state.workload_by_ip(req.src.ip());
    let peers = Peers {
        source_workload: src.map(|w| w.name.clone()),
        source_namespace: src.map(|w| w.namespace.clone()),
        source_principal: req.src_identity.as_ref().map(|i| i.to_string()),
        destination_workload: Some(dst.name.clone()),
        destination_namespace: Some(dst.namespace.clone()),
        destination_principal: Some(pod.identity.to_string()),
        destination_service: inbound_service(&state, dst, req.target.port()),
    };
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
        return Err(FailureReason::policy_denied);
    }
    let cfg = &inputs.config;
    match connect_from_pod(&pod.netns, req.target, Some(req.src.ip()), cfg.connect_timeout).await {
        Ok(s) => Ok((s, peers)),
        Err(e) => {
            warn!(pod = %pod.uid, src = %req.src, target = %req.target, error = %e, "application unreachable");
            Err(FailureReason::unreachable)
        }
    }
}
