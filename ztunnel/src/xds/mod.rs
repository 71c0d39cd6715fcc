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

use std::collections::HashMap;
use std::time::Duration;

#[cfg(test)]
use ambit_api::discovery::DeltaDiscoveryRequest;
use ambit_api::discovery::DeltaDiscoveryResponse;
use ambit_xds_client::ads::{AdsClient, DeltaHandler};
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::info;

pub use ambit_xds_client::ads::{BearerToken, XdsError};
pub use node::ProxyNode;
pub use resources::{ApplyError, Kind, Resources};

use crate::state::ProxyState;

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

/// The xDS client of one ztunnel. Create it, take [`XdsClient::synced`], then
/// spawn [`XdsClient::run`]. The stream loop (ACK/NACK, reconnects) is the
/// one shared with the waypoint ([`AdsClient`]).
#[derive(Debug)]
pub struct XdsClient {
    ads: AdsClient,
    trust_domain: String,
    resources: Resources,
}

impl XdsClient {
    /// A client on `channel` (TLS, if any, is the caller's: a lazily
    /// connecting channel is best, it reconnects by itself).
    pub fn new(channel: Channel, auth: BearerToken, config: XdsConfig) -> Self {
        let ads = AdsClient::new(channel, auth, config.node.to_node())
            .with_backoff(config.backoff_initial, config.backoff_max);
        XdsClient { ads, trust_domain: config.trust_domain, resources: Resources::default() }
    }

    /// Becomes `true` once the first response of both types has been applied
    /// (the readiness hook); stays `true` across reconnects.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.ads.synced()
    }

    /// Runs forever (until the task is dropped): streams, applies, reconnects.
    /// `on_state` gets every new complete state, starting with the first
    /// synced one.
    pub async fn run(self, on_state: impl FnMut(ProxyState) + Send) {
        let handler =
            StateHandler { resources: self.resources, trust_domain: self.trust_domain, on_state, synced: false };
        self.ads.run(handler).await
    }

    /// The first request of a type: wildcard, with what we already hold.
    #[cfg(test)]
    fn subscribe(&self, kind: Kind) -> DeltaDiscoveryRequest {
        self.ads.subscription(kind.type_url(), self.resources.versions(kind))
    }
}

/// Addresses and authorizations → a [`ProxyState`] per applied response.
struct StateHandler<F> {
    resources: Resources,
    trust_domain: String,
    on_state: F,
    synced: bool,
}

impl<F: FnMut(ProxyState) + Send> DeltaHandler for StateHandler<F> {
    fn type_urls(&self) -> Vec<&'static str> {
        vec![Kind::Address.type_url(), Kind::Authorization.type_url()]
    }

    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        match [Kind::Address, Kind::Authorization].into_iter().find(|k| k.type_url() == type_url) {
            Some(kind) => self.resources.versions(kind),
            None => HashMap::new(),
        }
    }

    /// A response that does not decode, convert or validate is NACKed with
    /// the error text and the last good state stays in force.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse, complete: bool) -> Result<(), String> {
        let (_, state) = self.resources.apply(resp, &self.trust_domain).map_err(|e| e.to_string())?;
        // Hold back the first state until both types are in: a mesh
        // without its policies would allow what they deny.
        if complete {
            (self.on_state)(state);
            if !self.synced {
                let (a, p) = self.resources.len();
                info!(addresses = a, authorizations = p, "xds: synced");
                self.synced = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
