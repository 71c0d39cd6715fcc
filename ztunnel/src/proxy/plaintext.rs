//! Inbound plaintext: connections from outside the mesh to the pod, TPROXY'd
//! to 15006. They carry no identity, so PeerAuthentication STRICT (compiled
//! to a DENY policy on peers without identity) rejects them; PERMISSIVE
//! lets them through, subject to the other policies, which are checked
//! again when they change (see [`super::registry`]).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::conn::relay_plain_until;
use super::inbound::{authorize_and_connect, Accepted, InboundRequest};
use super::{Pod, ProxyInputs};
use crate::metrics::{Direction, FailureReason};

pub(super) async fn handle(inputs: ProxyInputs, pod: Arc<Pod>, stream: TcpStream, peer: SocketAddr) {
    // With TPROXY the accepted socket's local address is the original destination.
    let dst = match stream.local_addr() {
        Ok(d) => d,
        Err(e) => {
            warn!(pod = %pod.uid, error = %e, "no local address; closing");
            inputs.metrics.failure(Direction::inbound, FailureReason::original_destination);
            return;
        }
    };
    let req = InboundRequest { src: peer, src_identity: None, target: dst, claims: Default::default() };
    let Accepted { upstream, mut metrics, mut registration, .. } =
        match authorize_and_connect(&inputs, &pod, &req).await {
            Ok(ok) => ok,
            Err(reason) => {
                inputs.metrics.failure(Direction::inbound, reason);
                let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
                return;
            }
        };
    let (bytes, r) = relay_plain_until(stream, upstream, registration.closed()).await;
    metrics.record(bytes);
    match r {
        Ok(()) => {}
        // A close by policy was logged and counted where it was decided.
        Err(_) if registration.closed_by_policy() => metrics.error(FailureReason::policy_denied),
        Err(e) => {
            debug!(pod = %pod.uid, %dst, error = %e, "plaintext connection broke");
            metrics.error(FailureReason::stream_error);
            inputs.metrics.failure(Direction::inbound, FailureReason::stream_error);
        }
    }
}
