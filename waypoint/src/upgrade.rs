//! HTTP/1.1 upgrades (WebSocket and the like) carried through the waypoint.
//!
//! The upgrade request is routed and authorized like any other and sent to
//! the endpoint with its `Upgrade` header; when the endpoint answers
//! `101 Switching Protocols`, the client's connection and the endpoint's are
//! spliced and bytes flow both ways untouched until either side closes.
//! Over an HTTP/2 upstream there is no such handshake: the request goes out
//! as a plain one (its `Upgrade` stripped as hop-by-hop).

use http::request::Parts;
use http::{Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::hop::is_upgrade;

/// The client side of an upgrade request to be forwarded over HTTP/1.1:
/// taken out of the request, to be completed once the endpoint agrees.
pub fn take(parts: &mut Parts, http2_upstream: bool) -> Option<OnUpgrade> {
    if parts.version != Version::HTTP_11 || http2_upstream || !is_upgrade(&parts.headers) {
        return None;
    }
    parts.extensions.remove::<OnUpgrade>()
}

/// If the endpoint switched protocols, splices the two connections in the
/// background (once the client has its `101` as well). Returns whether the
/// response is a switch that will be carried through; `false` for any other
/// response, or a `101` that cannot be (it must not reach the client then).
pub fn splice<B>(client: OnUpgrade, response: &mut Response<B>) -> bool {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return false;
    }
    let Some(upstream) = response.extensions_mut().remove::<OnUpgrade>() else { return false };
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    Ok((sent, received)) => debug!(sent, received, "upgraded connection closed"),
                    Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
                }
            }
            Err(e) => debug!(error = %e, "upgrade not completed"),
        }
    });
    true
}
