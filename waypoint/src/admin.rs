//! The waypoint's HTTP endpoints: admin (15000: config dump, run-time log
//! level), metrics (15020, Prometheus text) and readiness (15021).

use std::sync::Arc;

use ambit_telemetry::{logging_endpoint, serve, text, Body, LogControl};
use ambit_xds_client::certs::CertManager;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Snapshot, SnapshotHandle};
use crate::proxy::Shared;
use crate::route::RouteTable;

/// What the admin endpoint reads.
pub struct AdminInputs {
    pub snapshots: SnapshotHandle,
    pub certs: Arc<CertManager>,
    pub log: Arc<LogControl>,
    /// `namespace/name` of the waypoint Gateway and its identity.
    pub gateway: String,
    pub identity: String,
    /// The request path's state (outlier ejections).
    pub shared: Arc<Shared>,
}

fn admin(inputs: &AdminInputs, req: &Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => {
            let dump = json!({
                "gateway": inputs.gateway,
                "identity": inputs.identity,
                "certificates": inputs.certs.summaries(),
                "state": snapshot_dump(&inputs.snapshots.current()),
                "outlierDetection": outlier_dump(&inputs.shared),
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

/// Per upstream service with outlier detection: the endpoints ejected now, each with the seconds until it returns
/// and how many times it was ejected, and the ejections so far.
fn outlier_dump(shared: &Shared) -> serde_json::Value {
    let now = std::time::Instant::now();
    let services: Vec<_> = shared
        .ejections()
        .into_iter()
        .map(|(service, ejected, total)| {
            let ejected: Vec<_> = ejected
                .iter()
                .map(|e| {
                    let left = e.until.saturating_duration_since(now).as_secs_f64();
                    json!({"endpoint": e.endpoint, "returnsInSeconds": left, "timesEjected": e.times})
                })
                .collect();
            json!({"service": service, "ejected": ejected, "ejectionsTotal": total})
        })
        .collect();
    json!(services)
}

/// The snapshot as JSON: served services with their ports' routes, the
/// backends' endpoints, policies, and what could not be applied.
fn snapshot_dump(s: &Snapshot) -> serde_json::Value {
    let services: Vec<_> = s
        .services()
        .map(|e| {
            let svc = &e.service;
            let ports: Vec<_> = e.routes.as_ref().map_or_else(Vec::new, |r| {
                r.ports
                    .iter()
                    .map(|p| {
                        let names = |t: &RouteTable| -> Vec<_> {
                            t.routes().iter().map(|r| format!("{}/{}", r.namespace, r.name)).collect()
                        };
                        let consumers: serde_json::Map<_, _> =
                            p.consumers.iter().map(|(ns, t)| (ns.clone(), json!(names(t)))).collect();
                        json!({
                            "port": p.port, "targetPort": p.target_port, "name": p.name,
                            "protocol": format!("{:?}", p.protocol), "routes": names(&p.table),
                            "defaultRoute": p.default_route, "consumerRoutes": consumers,
                            "tcpRoute": p.tcp.as_ref().map(|t| format!("{}/{} tcp[{}]", t.namespace, t.name, t.rule)),
                        })
                    })
                    .collect()
            });
            let endpoints: Vec<_> = e
                .endpoints
                .iter()
                .map(|ep| json!({"address": ep.address, "workload": ep.workload.uid, "identity": ep.identity().to_string()}))
                .collect();
            json!({
                "hostname": svc.hostname, "namespace": svc.namespace, "addresses": svc.vips,
                "served": e.routes.is_some(), "ports": ports, "endpoints": endpoints,
            })
        })
        .collect();
    let report = s.report();
    json!({
        "version": s.version(),
        "services": services,
        "policies": s.policies().keys().collect::<Vec<_>>(),
        "problems": {
            "routes": report.routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "addresses": report.addresses,
        },
    })
}

/// Serves the admin endpoint.
pub async fn serve_admin(listener: TcpListener, inputs: Arc<AdminInputs>) {
    serve(listener, move |req| admin(&inputs, &req)).await
}

/// Serves `/healthz/ready`: ready once `ready` says so, until `draining` does.
pub async fn serve_readiness(listener: TcpListener, ready: watch::Receiver<bool>, draining: watch::Receiver<bool>) {
    serve(listener, move |req| match req.uri().path() {
        "/healthz/ready" if *ready.borrow() && !*draining.borrow() => text(StatusCode::OK, "ready\n"),
        "/healthz/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
    .await
}
