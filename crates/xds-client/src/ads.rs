//! The delta ADS client loop (`envoy.service.discovery.v3`
//! `DeltaAggregatedResources`), independent of what the resources mean.
//!
//! [`AdsClient::run`] subscribes (wildcard) to the handler's types, hands
//! every response to the [`DeltaHandler`] and answers it: an ACK when the
//! handler applied it, a NACK with the handler's error text (INVALID_ARGUMENT)
//! when it refused it — the handler then keeps its last good state. When the
//! stream fails the client reconnects with exponential backoff (1 s to 30 s,
//! ±20 % jitter, reset once a response came), listing the versions the
//! handler holds so that only differences come back; whatever the handler
//! published keeps serving meanwhile.

use std::collections::HashMap;
use std::time::Duration;

use ambit_api::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status as RpcStatus};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tracing::{debug, warn};

use crate::token::{TokenError, TokenSource};

/// gRPC status code INVALID_ARGUMENT, sent in NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// Largest xDS response accepted: the first response carries the whole mesh
/// (about 3 MB per 10,000 pods), above tonic's 4 MiB default.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Why an xDS stream ended or the client could not start.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The node name cannot be sent as gRPC metadata.
    #[error("node name is not valid metadata: {0}")]
    InvalidNode(#[from] tonic::metadata::errors::InvalidMetadataValue),
    /// No bearer token can be presented.
    #[error("bearer token: {0}")]
    Token(#[from] TokenError),
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

/// Adds `authorization: Bearer <token>` to every call (nothing if no token).
#[derive(Debug, Clone, Default)]
pub struct BearerToken {
    token: Option<TokenSource>,
    node: Option<MetadataValue<Ascii>>,
}

impl BearerToken {
    /// A token for the header; `None` sends no header.
    pub fn new(token: Option<&str>) -> Result<Self, XdsError> {
        Ok(BearerToken { token: token.map(TokenSource::fixed).transpose()?, node: None })
    }

    /// The token of `source`, read at every call when it is a file.
    pub fn from_source(source: TokenSource) -> Self {
        BearerToken { token: Some(source), node: None }
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
        if let Some(source) = &self.token {
            let v = source.header().map_err(|e| tonic::Status::unauthenticated(e.to_string()))?;
            req.metadata_mut().insert("authorization", v);
        }
        if let Some(v) = &self.node {
            req.metadata_mut().insert("x-ambit-node", v.clone());
        }
        Ok(req)
    }
}

/// Exponential backoff with ±20 % jitter, so that proxies restarted together
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

/// What the resources mean: the caller's side of the stream.
pub trait DeltaHandler: Send {
    /// The type URLs subscribed to (wildcard), in subscription order.
    fn type_urls(&self) -> Vec<&'static str>;

    /// The names and versions of `type_url` held now, sent when
    /// (re)subscribing so the server sends only differences.
    fn versions(&self, type_url: &str) -> HashMap<String, String>;

    /// Applies one response all or nothing. `complete` says whether every
    /// subscribed type will have been received at least once if this one
    /// applies (a handler publishes only complete states: a mesh without its
    /// policies would allow what they deny). `Err(text)` NACKs the response
    /// with `text`; the handler must then keep its previous state.
    fn apply(&mut self, response: &DeltaDiscoveryResponse, complete: bool) -> Result<(), String>;
}

/// A delta ADS client. Create it, take [`AdsClient::synced`], then spawn
/// [`AdsClient::run`].
#[derive(Debug)]
pub struct AdsClient {
    channel: Channel,
    auth: BearerToken,
    node: Node,
    backoff_initial: Duration,
    backoff_max: Duration,
    /// Every type received at least once: the state is complete.
    synced: watch::Sender<bool>,
}

impl AdsClient {
    /// A client on `channel` (TLS, if any, is the caller's: a lazily
    /// connecting channel is best, it reconnects by itself) that names itself
    /// `node` on every subscription. Backoff 1 s → 30 s.
    pub fn new(channel: Channel, auth: BearerToken, node: Node) -> Self {
        AdsClient {
            channel,
            auth,
            node,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            synced: watch::Sender::new(false),
        }
    }

    /// Reconnect delays: the first, and the longest.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// Becomes `true` once a response of every type has been applied (the
    /// readiness hook); stays `true` across reconnects.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Runs forever (until the task is dropped): streams, applies,
    /// reconnects. The handler's last applied state stays in force while
    /// the controller is away.
    pub async fn run(self, mut handler: impl DeltaHandler) {
        let mut backoff = Backoff::new(self.backoff_initial, self.backoff_max);
        loop {
            let mut progressed = false;
            let err = match self.stream(&mut handler, &mut progressed).await {
                Ok(()) => XdsError::Closed,
                Err(e) => e,
            };
            if progressed {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            warn!(error = %err, retry_in = ?delay, "xds: stream failed; keeping the last configuration");
            tokio::time::sleep(delay).await;
        }
    }

    /// One stream, until it fails. `progressed` is set once a response came.
    async fn stream(&self, handler: &mut impl DeltaHandler, progressed: &mut bool) -> Result<(), XdsError> {
        let types = handler.type_urls();
        // Requests: the subscriptions, then one ACK/NACK per response; tonic
        // drains this concurrently, so a small buffer never blocks for long.
        let (tx, rx) = mpsc::channel(types.len() + 6);
        for type_url in &types {
            let request = self.subscription(type_url, handler.versions(type_url));
            tx.send(request).await.map_err(|_| XdsError::RequestsClosed)?;
        }
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut responses = client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        debug!("xds: stream open");
        let mut seen = vec![*self.synced.borrow(); types.len()];
        while let Some(resp) = responses.message().await? {
            *progressed = true;
            let reply = self.handle(handler, &types, &resp, &mut seen);
            tx.send(reply).await.map_err(|_| XdsError::RequestsClosed)?;
        }
        Ok(())
    }

    /// Applies one response and returns the ACK or NACK for it.
    fn handle(
        &self,
        handler: &mut impl DeltaHandler,
        types: &[&'static str],
        resp: &DeltaDiscoveryResponse,
        seen: &mut [bool],
    ) -> DeltaDiscoveryRequest {
        let mut reply = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        let index = types.iter().position(|t| *t == resp.type_url);
        let complete = seen.iter().enumerate().all(|(i, s)| *s || Some(i) == index);
        let result = match index {
            None => Err(format!("unsupported type {}", resp.type_url)),
            Some(_) => handler.apply(resp, complete),
        };
        match result {
            Ok(()) => {
                debug!(
                    type_url = %resp.type_url,
                    updated = resp.resources.len(),
                    removed = resp.removed_resources.len(),
                    version = %resp.system_version_info,
                    "xds: applied"
                );
                if let Some(i) = index {
                    seen[i] = true;
                }
                if complete && !*self.synced.borrow() {
                    self.synced.send_replace(true);
                }
            }
            Err(e) => {
                warn!(type_url = %resp.type_url, nonce = %resp.nonce, error = %e, "xds: rejecting configuration (NACK); keeping the last good state");
                reply.error_detail = Some(RpcStatus { code: INVALID_ARGUMENT, message: e, details: Vec::new() });
            }
        }
        reply
    }

    /// The first request of a type: wildcard, with what is already held.
    pub fn subscription(&self, type_url: &str, versions: HashMap<String, String>) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.to_owned(),
            resource_names_subscribe: vec!["*".to_owned()],
            initial_resource_versions: versions,
            ..Default::default()
        }
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

    #[test]
    fn bearer_token_adds_the_authorization_header() {
        let mut t = BearerToken::new(Some("abc\n")).unwrap();
        let req = t.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer abc");
        let mut none = BearerToken::new(None).unwrap();
        assert!(none.call(tonic::Request::new(())).unwrap().metadata().get("authorization").is_none());
        assert!(BearerToken::new(Some("a\u{7}b")).is_err());
    }

    /// Refuses responses whose nonce is "bad"; records `complete`.
    #[derive(Default)]
    struct Recorder {
        applied: Vec<(String, bool)>,
    }

    impl DeltaHandler for Recorder {
        fn type_urls(&self) -> Vec<&'static str> {
            vec!["a", "b"]
        }

        fn versions(&self, type_url: &str) -> HashMap<String, String> {
            [(format!("{type_url}-held"), "v1".to_owned())].into()
        }

        fn apply(&mut self, response: &DeltaDiscoveryResponse, complete: bool) -> Result<(), String> {
            if response.nonce == "bad" {
                return Err("refused".into());
            }
            self.applied.push((response.type_url.clone(), complete));
            Ok(())
        }
    }

    fn response(type_url: &str, nonce: &str) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse { type_url: type_url.into(), nonce: nonce.into(), ..Default::default() }
    }

    #[tokio::test]
    async fn responses_are_acked_or_nacked_and_synced_waits_for_every_type() {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let client = AdsClient::new(channel, BearerToken::default(), Node::default());
        let synced = client.synced();
        let (mut h, types) = (Recorder::default(), ["a", "b"]);
        let mut seen = vec![false; 2];
        let ack = client.handle(&mut h, &types, &response("a", "1"), &mut seen);
        assert_eq!((ack.type_url.as_str(), ack.response_nonce.as_str(), ack.error_detail), ("a", "1", None));
        assert!(!*synced.borrow());
        let nack = client.handle(&mut h, &types, &response("b", "bad"), &mut seen);
        assert_eq!(nack.error_detail.unwrap().message, "refused");
        assert!(!*synced.borrow(), "a refused type is not received");
        let unknown = client.handle(&mut h, &types, &response("c", "2"), &mut seen);
        assert_eq!(unknown.error_detail.unwrap().code, INVALID_ARGUMENT);
        client.handle(&mut h, &types, &response("b", "3"), &mut seen);
        assert!(*synced.borrow());
        assert_eq!(h.applied, [("a".to_owned(), false), ("b".to_owned(), true)]);
    }

    #[tokio::test]
    async fn every_subscription_carries_the_node_and_the_versions_held() {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let node = Node { id: "waypoint~x".into(), ..Default::default() };
        let client = AdsClient::new(channel, BearerToken::default(), node.clone());
        let req = client.subscription("a", Recorder::default().versions("a"));
        assert_eq!(req.node, Some(node));
        assert_eq!(req.resource_names_subscribe, ["*"]);
        assert_eq!(req.initial_resource_versions["a-held"], "v1");
    }
}
