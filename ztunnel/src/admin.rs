//! The HTTP endpoints: admin (15000: config dump, run-time log level),
//! metrics (15020: Prometheus text) and readiness (15021).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ambit_telemetry::{logging_endpoint, serve, text, Body, LogControl};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::certs::CertManager;
use crate::config::Config;
use crate::state::{ProxyState, SharedState};

pub use ambit_telemetry::serve_metrics;

/// A pod as listed in the config dump.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PodSummary {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub netns_inode: u64,
}

/// Everything the admin endpoint reads.
pub struct AdminInputs {
    pub config: Arc<Config>,
    pub state: Arc<SharedState>,
    pub certs: Arc<CertManager>,
    pub pods: Arc<Mutex<Vec<PodSummary>>>,
    pub log: Arc<LogControl>,
}

/// Whether ztunnel is ready: the mesh state is loaded, the node agent's
/// snapshot applied (every pod it named has its listeners bound, so a
/// replacement ztunnel serves before the old one is stopped), and it is not
/// draining.
#[derive(Default)]
pub struct Readiness {
    state_loaded: AtomicBool,
    state_notify: Notify,
    pub pods_listening: AtomicBool,
    pub draining: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.is_state_loaded() && self.pods_listening.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    pub fn is_state_loaded(&self) -> bool {
        self.state_loaded.load(Ordering::Relaxed)
    }

    /// Notes that the first state arrived.
    pub fn set_state_loaded(&self) {
        self.state_loaded.store(true, Ordering::Relaxed);
        self.state_notify.notify_waiters();
    }

    /// Waits until the first state arrived.
    pub async fn state_loaded(&self) {
        loop {
            let notified = self.state_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state_loaded.load(Ordering::Relaxed) {
                return;
            }
            notified.await;
        }
    }
}

fn admin(inputs: &AdminInputs, req: &Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => {
            let dump = json!({
                "config": &*inputs.config,
                "pods": &*inputs.pods.lock().expect("bug: poisoned"),
                "certificates": inputs.certs.summaries(),
                "state": state_dump(&inputs.state.snapshot()),
            });
            let mut r = text(StatusCode::OK, serde_json::to_vec_pretty(&dump).unwrap_or_default());
            r.headers_mut().insert(http::header::CONTENT_TYPE, "application/json".parse().expect("bug: header"));
            r
        }
        (_, "/logging") => logging_endpoint(&inputs.log, req),
        (&Method::GET, "/") => text(StatusCode::OK, "GET /config_dump\nGET /logging\nPOST /logging?level=debug\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The state as JSON (workloads, services, policies).
fn state_dump(s: &ProxyState) -> serde_json::Value {
    let workloads: Vec<_> = s
        .workloads()
        .map(|w| {
            json!({
                "uid": w.uid, "name": w.name, "namespace": w.namespace, "addresses": w.addresses,
                "node": w.node, "protocol": format!("{:?}", w.protocol), "identity": w.identity().to_string(),
                "status": format!("{:?}", w.status), "services": w.services.keys().collect::<Vec<_>>(),
                "authorizationPolicies": w.authorization_policies,
                "waypoint": w.waypoint.as_ref().map(ToString::to_string),
            })
        })
        .collect();
    let services: Vec<_> = s
        .services()
        .map(|v| {
            json!({
                "name": v.name, "namespace": v.namespace, "hostname": v.hostname, "addresses": v.vips,
                "ports": v.ports.iter().map(|p| json!({"servicePort": p.service_port, "targetPort": p.target_port})).collect::<Vec<_>>(),
                "loadBalancing": format!("{:?}", v.load_balancer),
                "waypoint": v.waypoint.as_ref().map(ToString::to_string),
            })
        })
        .collect();
    let policies: Vec<_> = s
        .policies()
        .map(|p| {
            json!({
                "name": p.name, "namespace": p.namespace, "scope": format!("{:?}", p.scope),
                "action": format!("{:?}", p.action), "rules": format!("{:?}", p.rules),
            })
        })
        .collect();
    json!({ "workloads": workloads, "services": services, "policies": policies })
}

/// Serves the admin endpoint.
pub async fn serve_admin(listener: TcpListener, inputs: Arc<AdminInputs>) {
    serve(listener, move |req| admin(&inputs, &req)).await
}

/// Serves `/healthz/ready`.
pub async fn serve_readiness(listener: TcpListener, readiness: Arc<Readiness>) {
    serve(listener, move |req| match req.uri().path() {
        "/healthz/ready" if readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/healthz/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
    .await
}
