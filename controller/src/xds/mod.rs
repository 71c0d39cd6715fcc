//! The delta xDS server (`envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`): pushes the model's `istio.workload.Address` and
//! `istio.security.Authorization` resources to every ztunnel.
//!
//! One task per stream. It reads the latest [`Snapshot`](crate::model::Snapshot)
//! from the watch channel (so a slow stream skips intermediate snapshots
//! instead of queueing them) and writes into a small bounded channel that
//! tonic drains; a client that stops reading blocks only its own task.
//! Resource versions are content hashes ([`version`]), so a reconnecting
//! client that lists what it holds gets only what changed.
//!
//! Every stream starts by authenticating its caller (bootstrap token or
//! TokenReview). The node decides which workloads a stream is sent in full:
//! it is the caller's when its credential names one, and a `NODE_NAME` the
//! stream declares in its `Node` must then agree; with a credential that names
//! no node (the shared bootstrap token), it is the node the stream declares.
//!
//! A caller whose credential names a workload identity and no node (a
//! waypoint's own service-account token, or its per-workload token in file
//! mode) gets a waypoint stream instead: the waypoint Gateway named after its
//! service account, in its namespace, decides what it is sent (its
//! [`WaypointScope`](crate::model::WaypointScope)): the
//! `ambit.waypoint.v1` resources and the Address resources of what it serves.
//! A ztunnel's stream never gets the waypoint types.

mod metrics;
mod stream;
pub mod version;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod waypoint_tests;

use std::sync::Arc;

use ambit_api::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ambit_api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

pub use metrics::{TypeLabel, TypeLabels, XdsMetrics};
pub use stream::{visible_to_node, visible_to_waypoint, NodeInfo};
pub use version::ResourceType;

use crate::ca::AsyncCallerAuthenticator;
use crate::model::SnapshotRx;
use stream::{Outgoing, StreamState};
use version::{Cache, Prepared};

/// Responses buffered per stream before its task waits for the client.
const STREAM_BUFFER: usize = 4;

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The client went away (its response stream was dropped).
    #[error("client disconnected")]
    ClientGone,
    /// Reading a request failed.
    #[error("receiving request: {0}")]
    Receive(#[from] Status),
    /// The model's publisher is gone: the controller is shutting down.
    #[error("snapshot publisher closed")]
    PublisherClosed,
    /// The stream declared a node other than the one its caller runs on.
    #[error("stream declares node {declared:?} but the caller runs on {caller:?}")]
    NodeMismatch { declared: String, caller: String },
}

/// The delta ADS service. Cheap to clone the handles it holds; wrap it with
/// [`XdsServer::into_service`] to add it to a tonic router.
#[derive(Clone)]
pub struct XdsServer {
    snapshots: SnapshotRx,
    metrics: Arc<XdsMetrics>,
    cache: Arc<Cache>,
    auth: Arc<dyn AsyncCallerAuthenticator>,
}

impl std::fmt::Debug for XdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsServer").field("metrics", &self.metrics).finish_non_exhaustive()
    }
}

impl XdsServer {
    /// A server that publishes whatever `snapshots` holds to callers `auth` admits.
    pub fn new(snapshots: SnapshotRx, metrics: Arc<XdsMetrics>, auth: Arc<dyn AsyncCallerAuthenticator>) -> Self {
        XdsServer { snapshots, metrics, cache: Arc::default(), auth }
    }

    /// The tonic service, ready for `Server::builder().add_service(...)`.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let caller = self.auth.authenticate_async(request.metadata()).await.inspect_err(|status| {
            info!(?peer, code = ?status.code(), message = status.message(), "xds: caller refused");
        })?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut state = StreamState::new(self.metrics.clone());
        if let Some(waypoint) = caller.workload_identity() {
            debug!(?peer, namespace = %waypoint.0, name = %waypoint.1, "xds: waypoint stream");
            state.set_waypoint(waypoint.clone());
        } else if let Some(node) = caller.node {
            state.set_node(NodeInfo { id: String::new(), name: node });
        }
        let conn = Connection {
            requests: request.into_inner(),
            tx,
            snapshots: self.snapshots.clone(),
            cache: self.cache.clone(),
            state,
            metrics: self.metrics.clone(),
        };
        tokio::spawn(async move {
            let _connected = conn.metrics.connected();
            let (result, node) = conn.run().await;
            match result {
                Ok(()) | Err(XdsError::ClientGone) => {
                    debug!(?peer, node = ?node, "xds: stream closed")
                }
                Err(e) => info!(?peer, node = ?node, error = %e, "xds: stream ended"),
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One stream's task.
struct Connection {
    requests: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    snapshots: SnapshotRx,
    cache: Arc<Cache>,
    state: StreamState,
    metrics: Arc<XdsMetrics>,
}

impl Connection {
    /// Serves until the client leaves; returns why, and the node's name.
    async fn run(mut self) -> (Result<(), XdsError>, Option<String>) {
        let r = self.serve().await;
        let who = match self.state.waypoint() {
            Some((ns, name)) => Some(format!("waypoint {ns}/{name}")),
            None => self.state.node().map(|n| n.name.clone()),
        };
        (r, who)
    }

    async fn serve(&mut self) -> Result<(), XdsError> {
        let mut prepared = self.latest();
        loop {
            tokio::select! {
                req = self.requests.message() => {
                    let Some(req) = req? else { return Ok(()) };
                    if let Some(node) = req.node.as_ref().filter(|_| self.state.waypoint().is_none()) {
                        self.check_node(node).await?;
                    }
                    if let Some(out) = self.state.on_request(req, &prepared) {
                        self.send(out, None).await?;
                    }
                }
                changed = self.snapshots.changed() => {
                    changed.map_err(|_| XdsError::PublisherClosed)?;
                    prepared = self.latest();
                    for out in self.state.on_snapshot(&prepared) {
                        self.send(out, Some(&prepared)).await?;
                    }
                }
                () = self.tx.closed() => return Err(XdsError::ClientGone),
            }
        }
    }

    /// Takes the node `node` declares as the stream's, or ends the stream with
    /// `permission_denied` when it names another than the one already known.
    async fn check_node(&mut self, node: &ambit_api::discovery::Node) -> Result<(), XdsError> {
        let known = self.state.node().map(|n| n.name.clone());
        let declared = match NodeInfo::for_caller(known.as_deref(), node) {
            Ok(info) => {
                self.state.set_node(info);
                return Ok(());
            }
            Err(declared) => declared,
        };
        let e = XdsError::NodeMismatch { declared, caller: known.unwrap_or_default() };
        // Best effort: the client may already be gone.
        let _ = self.tx.send(Err(Status::permission_denied(e.to_string()))).await;
        Err(e)
    }

    /// The newest snapshot, marked seen so `changed()` waits for the next.
    fn latest(&mut self) -> Arc<Prepared> {
        let snap = self.snapshots.borrow_and_update().clone();
        self.cache.prepare(snap)
    }

    /// Sends one response; `pushed` is set for pushes caused by a new
    /// snapshot, whose latency is measured from its publication.
    async fn send(&mut self, out: Outgoing, pushed: Option<&Prepared>) -> Result<(), XdsError> {
        let ty = out.ty;
        self.tx.send(Ok(out.response)).await.map_err(|_| XdsError::ClientGone)?;
        self.metrics.push(ty);
        if let Some(p) = pushed {
            self.metrics.push_latency(p.observed.elapsed());
        }
        Ok(())
    }
}
