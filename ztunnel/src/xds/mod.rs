//! The delta xDS client: subscribes to the controller's `istio.workload.Address`
//! and `istio.security.Authorization` resources (wildcard), keeps them by name
//! and version, and hands each new [`ProxyState`] to a callback.
//!
//! A response that does not decode, convert or validate is NACKed with the
//! error text and the last good state stays in force. When the stream fails
//! the client reconnects with exponential backoff (1 s to 30 s, jittered),
//! listing the versions it holds so that only differences come back; the
//! last state keeps serving meanwhile.

mod node;
mod resources;

use std::time::Duration;

use ambit_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status as RpcStatus};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

pub use node::ProxyNode;
pub use resources::{ApplyError, Kind, Resources};

use crate::state::ProxyState;

/// gRPC status code INVALID_ARGUMENT, sent in NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// Why an xDS stream ended or the client could not start.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The bearer token cannot be sent as gRPC metadata.
    #[error("bearer token is not valid metadata: {0}")]
    InvalidToken(#[from] tonic::metadata::errors::InvalidMetadataValue),
    /// Opening or reading the stream failed.
    #[error("xds stream: {0}")]
    Rpc(#[from] tonic::Status),
    /// The server ended the stream.
    #[error("xds stream closed by the server")]
    Closed,
    /// Our request stream was dropped by tonic while responses still came.
    #[error("bug: xds request stream closed while the response stream is open")]
    RequestsClosed,
}

/// Who this ztunnel is and how patiently it reconnects.
#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// Who this ztunnel is, sent as the `Node` of every subscription.
    pub node: ProxyNode,
    /// Trust domain for workloads that carry none.
    pub trust_domain: String,
    /// First reconnect delay (default 1 s).
    pub backoff_initial: Duration,
    /// Longest reconnect delay (default 30 s).
    pub backoff_max: Duration,
}

impl XdsConfig {
    /// Defaults: backoff 1 s → 30 s.
    pub fn new(node: ProxyNode, trust_domain: impl Into<String>) -> Self {
        XdsConfig {
            node,
            trust_domain: trust_domain.into(),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call (nothing if no token).
#[derive(Debug, Clone, Default)]
pub struct BearerToken {
    token: Option<MetadataValue<Ascii>>,
    node: Option<MetadataValue<Ascii>>,
}

impl BearerToken {
    /// A token for the header; `None` sends no header.
    pub fn new(token: Option<&str>) -> Result<Self, XdsError> {
        let token = token.map(|t| MetadataValue::try_from(format!("Bearer {}", t.trim()))).transpose()?;
        Ok(BearerToken { token, node: None })
    }

    /// Also names the caller's node in `x-ambit-node`: an extra for Ambit's
    /// controller with one shared bootstrap token, which proves no node (the
    /// `Node` of the stream names it too, as Istio's ztunnel does).
    pub fn with_node(mut self, node: &str) -> Result<Self, XdsError> {
        self.node = Some(MetadataValue::try_from(node)?);
        Ok(self)
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.token {
            req.metadata_mut().insert("authorization", v.clone());
        }
        if let Some(v) = &self.node {
            req.metadata_mut().insert("x-ambit-node", v.clone());
        }
        Ok(req)
    }
}

/// Largest xDS response accepted.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Exponential backoff with ±20 % jitter, so that ztunnels restarted together
/// do not reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, next: initial }
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(rand::random_range(0.8..1.2)).min(self.max)
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// The xDS client of one ztunnel. Create it, take [`XdsClient::synced`], then
/// spawn [`XdsClient::run`].
#[derive(Debug)]
pub struct XdsClient {
    channel: Channel,
    auth: BearerToken,
    config: XdsConfig,
    resources: Resources,
    /// Both types received at least once: the state is complete.
    synced: watch::Sender<bool>,
}

impl XdsClient {
    /// A client on `channel` (TLS, if any, is the caller's: a lazily
    /// connecting channel is best, it reconnects by itself).
    pub fn new(channel: Channel, auth: BearerToken, config: XdsConfig) -> Self {
        XdsClient { channel, auth, config, resources: Resources::default(), synced: watch::Sender::new(false) }
    }

    /// Becomes `true` once the first response of both types has been applied
    /// (the readiness hook); stays `true` across reconnects.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Runs forever (until the task is dropped): streams, applies, reconnects.
    /// `on_state` gets every new complete state, starting with the first
    /// synced one.
    pub async fn run(mut self, mut on_state: impl FnMut(ProxyState) + Send) {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            let mut progressed = false;
            let err = self.run_stream(&mut on_state, &mut progressed).await;
            if progressed {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            warn!(error = %err, retry_in = ?delay, "xds: stream failed; keeping the last configuration");
            tokio::time::sleep(delay).await;
        }
    }

    /// One stream, until it fails. `progressed` is set once a response came.
    async fn run_stream(&mut self, on_state: &mut (impl FnMut(ProxyState) + Send), progressed: &mut bool) -> XdsError {
        match self.stream(on_state, progressed).await {
            Ok(()) => XdsError::Closed,
            Err(e) => e,
        }
    }

    async fn stream(
        &mut self,
        on_state: &mut (impl FnMut(ProxyState) + Send),
        progressed: &mut bool,
    ) -> Result<(), XdsError> {
        // Requests: 2 subscriptions, then one ACK/NACK per response; tonic
        // drains this concurrently, so a small buffer never blocks for long.
        let (tx, rx) = mpsc::channel(8);
        for kind in [Kind::Address, Kind::Authorization] {
            tx.send(self.subscribe(kind)).await.map_err(|_| XdsError::RequestsClosed)?;
        }
        // The first response carries the whole mesh (about 3 MB per 10,000
        // pods): lift tonic's 4 MiB default.
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut responses = client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        debug!("xds: stream open");
        let mut seen = [*self.synced.borrow(); 2];
        while let Some(resp) = responses.message().await? {
            *progressed = true;
            let reply = self.handle(&resp, &mut seen, on_state);
            tx.send(reply).await.map_err(|_| XdsError::RequestsClosed)?;
        }
        Ok(())
    }

    /// Applies one response and returns the ACK or NACK for it.
    fn handle(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        seen: &mut [bool; 2],
        on_state: &mut (impl FnMut(ProxyState) + Send),
    ) -> DeltaDiscoveryRequest {
        let mut reply = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        match self.resources.apply(resp, &self.config.trust_domain) {
            Ok((kind, state)) => {
                debug!(
                    type_url = %resp.type_url,
                    updated = resp.resources.len(),
                    removed = resp.removed_resources.len(),
                    version = %resp.system_version_info,
                    "xds: applied"
                );
                seen[kind as usize] = true;
                // Hold back the first state until both types are in: a mesh
                // without its policies would allow what they deny.
                if seen.iter().all(|s| *s) {
                    on_state(state);
                    if !*self.synced.borrow() {
                        let (a, p) = self.resources.len();
                        info!(addresses = a, authorizations = p, "xds: synced");
                        self.synced.send_replace(true);
                    }
                }
            }
            Err(e) => {
                warn!(type_url = %resp.type_url, nonce = %resp.nonce, error = %e, "xds: rejecting configuration (NACK); keeping the last good state");
                reply.error_detail =
                    Some(RpcStatus { code: INVALID_ARGUMENT, message: e.to_string(), details: Vec::new() });
            }
        }
        reply
    }

    /// The first request of a type: wildcard, with what we already hold.
    fn subscribe(&self, kind: Kind) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(self.node()),
            type_url: kind.type_url().to_owned(),
            resource_names_subscribe: vec!["*".to_owned()],
            initial_resource_versions: self.resources.versions(kind),
            ..Default::default()
        }
    }

    fn node(&self) -> Node {
        self.config.node.to_node()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(800) && d[0] <= Duration::from_millis(1200), "{d:?}");
        assert!(d[1] >= Duration::from_millis(1600) && d[1] <= Duration::from_millis(2400), "{d:?}");
        assert!(d.iter().all(|x| *x <= Duration::from_secs(30)), "{d:?}");
        assert!(d[7] >= Duration::from_secs(24), "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }

    #[tokio::test]
    async fn every_subscription_carries_the_istio_node() {
        let mut proxy = ProxyNode::new("node-a");
        proxy.pod_name = "ztunnel-1".into();
        proxy.pod_namespace = "ambit-system".into();
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let client = XdsClient::new(channel, BearerToken::default(), XdsConfig::new(proxy.clone(), "cluster.local"));
        for kind in [Kind::Address, Kind::Authorization] {
            let req = client.subscribe(kind);
            assert_eq!(req.node, Some(proxy.to_node()), "{kind:?}");
            assert_eq!(req.node.unwrap().id, "ztunnel~1.1.1.1~ztunnel-1.ambit-system~ambit-system.svc.cluster.local");
        }
    }

    #[test]
    fn bearer_token_adds_the_authorization_header() {
        let mut t = BearerToken::new(Some("abc\n")).unwrap();
        let req = t.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer abc");
        let mut none = BearerToken::new(None).unwrap();
        assert!(none.call(tonic::Request::new(())).unwrap().metadata().get("authorization").is_none());
        assert!(BearerToken::new(Some("a\u{7}b")).is_err());
    }
}
