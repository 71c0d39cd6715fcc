//! The lab of the waypoint proxy, shared by its end-to-end tests (`e2e/tests/mesh_waypoint*.rs`) and the L7
//! benchmark ([`crate::bench_l7`]): the real `ambit-controller` (file mode) on an external host, two nodes with
//! their ztunnels, a client pod and the waypoint's pod on node 1 (the waypoint's pod labelled
//! `istio.io/dataplane-mode: none`, so not captured, running as the service account `waypoint`, the Gateway's
//! name), and server pods on node 2. As a cluster's deployer would, the lab declares the waypoint `Gateway`
//! (class `ambit-waypoint`) and its `Service` (port 15008, selecting the waypoint pod) — see [`GATEWAY_OBJECTS`];
//! the waypoint proves its identity to the controller with its own workload token.
//!
//! [`WaypointMesh`] is that lab with nothing declared yet; [`WaypointLab`] is the one the tests of
//! `mesh_waypoint.rs` and `mesh_waypoint_http.rs` share: the services `echo` (using the waypoint, backed by
//! `echo-v1`) and `echo-v2` ([`SERVICES`]), HTTP echo servers in both pods, and the waypoint running.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::check::{metric, TIMEOUT};
use crate::dump;
use crate::http::{HttpConnection, HttpResponse, Request};
use crate::http_server::{EchoReply, HttpEchoServer};
use crate::lab::{Lab, NodeId, PodId, PodSpec};
use crate::mesh::Mesh;
use crate::netns::NetNs;
use crate::objects::DATAPLANE_MODE_LABEL;
use crate::waypoint::{WaypointArgs, WaypointProcess};

/// The namespace of every pod and object (ambient).
pub const NS: &str = "default";
/// The waypoint Gateway's name, and its pod's service account.
pub const GATEWAY: &str = "waypoint";
/// The label that ties the waypoint's pods and Service to the Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The waypoint Service's host name.
pub const WAYPOINT_HOST: &str = "waypoint.default.svc.cluster.local";

/// How long a route or policy change may take to reach the waypoint (and the waypoint to start): a bound, not a
/// figure.
pub const PROPAGATION: Duration = Duration::from_secs(20);

/// The waypoint Gateway and its Service, as the controller's deployer writes it in Kubernetes: port 15008 `mesh`,
/// 15021 `status-port`, selecting the waypoint's pods. Services that use the waypoint carry the label
/// `istio.io/use-waypoint: waypoint`.
pub const GATEWAY_OBJECTS: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: default, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.99
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  ports:
  - {name: mesh, port: 15008, targetPort: 15008, protocol: TCP, appProtocol: all}
  - {name: status-port, port: 15021, targetPort: 15021, protocol: TCP}
"#;

/// A lab with the controller and both ztunnels running; no pod enrolled, no Service declared yet.
pub struct WaypointMesh {
    pub mesh: Mesh,
    /// Node 1 (client, waypoint), node 2 (servers).
    pub nodes: [NodeId; 2],
    /// `client` (service account `client`) on node 1.
    pub client: PodId,
    /// The waypoint's pod on node 1.
    pub wp: PodId,
    /// The pods named in [`WaypointMesh::new`]'s `node2_pods`, in order (each its own service account).
    pub servers: Vec<PodId>,
}

impl WaypointMesh {
    /// Builds lab `name`: nodes 1 and 2, `client` and `waypoint` on node 1, the pods `node2_pods` on node 2; starts
    /// the controller (namespace [`NS`] ambient, admitting the waypoint's token) and both ztunnels.
    pub fn new(name: &str, node2_pods: &[&str]) -> anyhow::Result<Self> {
        Self::with_controller_args(name, node2_pods, &[])
    }

    /// [`WaypointMesh::new`], with the controller started with the flags `controller_args` too.
    pub fn with_controller_args(name: &str, node2_pods: &[&str], controller_args: &[&str]) -> anyhow::Result<Self> {
        let mut lab = Lab::new(name)?;
        let n1 = lab.add_node("node1")?;
        let n2 = lab.add_node("node2")?;
        let client = lab.add_pod(n1, PodSpec::new("client", NS, "client"))?;
        let mut spec = PodSpec::new("waypoint", NS, GATEWAY);
        spec.labels.insert(DATAPLANE_MODE_LABEL.into(), "none".into());
        spec.labels.insert(GATEWAY_NAME_LABEL.into(), GATEWAY.into());
        let wp = lab.add_pod(n1, spec)?;
        // `echo-v1` is also labelled `app.kubernetes.io/name: echo` and `version: v1`, as a versioned Deployment's
        // pods are (for DestinationRule subsets); every node-2 pod `app.kubernetes.io/component: server`.
        let server = |p: &str| {
            let mut spec = PodSpec::new(p, NS, p);
            spec.labels.insert("app.kubernetes.io/component".into(), "server".into());
            if let Some((name, version)) = p.rsplit_once('-') {
                spec.labels.insert("app.kubernetes.io/name".into(), name.into());
                spec.labels.insert("version".into(), version.into());
            }
            spec
        };
        let servers = node2_pods.iter().map(|p| lab.add_pod(n2, server(p))).collect::<anyhow::Result<Vec<_>>>()?;
        let ctrl = lab.add_external_host("ctrl")?;
        let mut mesh = Mesh::with_controller_and_workloads(lab, ctrl, &[NS], &[(NS, GATEWAY)], controller_args)
            .context("mesh with the controller admitting the waypoint's token")?;
        for n in [n1, n2] {
            mesh.start_ztunnel(n).context("start ztunnel")?;
        }
        Ok(WaypointMesh { mesh, nodes: [n1, n2], client, wp, servers })
    }

    /// Declares [`GATEWAY_OBJECTS`] and `services` (YAML documents) to the controller (file `waypoint.yaml`).
    pub fn declare(&self, services: &str) -> anyhow::Result<()> {
        let controller = self.mesh.controller().context("no controller")?;
        controller.write("waypoint.yaml", &format!("{GATEWAY_OBJECTS}---\n{services}"))
    }

    /// Starts `ambit-waypoint` in the waypoint's pod (`--waypoint-name waypoint`, `--access-log access_log`) and
    /// waits until it is ready.
    pub fn start_waypoint(&self, access_log: bool) -> anyhow::Result<WaypointProcess> {
        self.start_waypoint_with(access_log, &[])
    }

    /// [`WaypointMesh::start_waypoint`] with the flags `extra` appended.
    pub fn start_waypoint_with(&self, access_log: bool, extra: &[&str]) -> anyhow::Result<WaypointProcess> {
        let mut args = WaypointArgs::for_pod(&self.mesh, self.wp)?;
        args.waypoint_name = Some(GATEWAY.into());
        args.access_log = Some(access_log);
        args.extra.extend(extra.iter().map(|f| f.to_string()));
        WaypointProcess::start_ready(&self.mesh, self.wp, args, PROPAGATION).context("the waypoint is ready")
    }
}

/// The service that uses the waypoint, backed by `echo-v1`.
pub const ECHO_HOST: &str = "echo.default.svc.cluster.local";
/// A route's backend, without a waypoint.
pub const ECHO_V2_HOST: &str = "echo-v2.default.svc.cluster.local";
/// `echo`'s cluster IP.
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The port the echo servers listen on (`echo`'s `http` port 80 and `tcp` port 9000 target it).
pub const APP_PORT: u16 = 8080;
/// The port named `tcp` of `echo` and `echo-v2`: opaque to the waypoint, relayed at L4.
pub const TCP_PORT: u16 = 9000;
/// `echo`'s port declared HTTP/2 (`appProtocol: kubernetes.io/h2c`), to [`H2_APP_PORT`] on `echo-v1`.
pub const H2_PORT: u16 = 81;
/// Where an HTTP/2 server in `echo-v1` listens for `echo`'s port [`H2_PORT`] (the lab starts none).
pub const H2_APP_PORT: u16 = 8081;
/// The client pod's SPIFFE identity.
pub const CLIENT_PRINCIPAL: &str = "spiffe://cluster.local/ns/default/sa/client";

/// The service `echo` (backed by `echo-v1`) that uses the waypoint, and `echo-v2`, a route's backend (declared
/// with the waypoint's Gateway and Service, [`GATEWAY_OBJECTS`]).
pub const SERVICES: &str = r#"apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  selector: {app: echo-v1}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: tcp, port: 9000, targetPort: 8080, protocol: TCP}
  - {name: web-h2, port: 81, targetPort: 8081, protocol: TCP, appProtocol: kubernetes.io/h2c}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: default}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.11
  selector: {app: echo-v2}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: tcp, port: 9000, targetPort: 8080, protocol: TCP}
"#;

/// The lab: nodes 1 and 2; `client` and the waypoint pod on node 1,
/// `echo-v1`, `echo-v2` and `intruder` on node 2; every pod but the
/// waypoint's enrolled; an HTTP echo server on 8080 in `echo-v1` and
/// `echo-v2`; the waypoint process running and ready.
pub struct WaypointLab {
    // Field order is drop order: the waypoint first, then the servers, then the mesh (ztunnels, controller, lab).
    pub waypoint: WaypointProcess,
    pub v1: HttpEchoServer,
    pub v2: HttpEchoServer,
    pub mesh: Mesh,
    pub nodes: [NodeId; 2],
    pub client: PodId,
    pub intruder: PodId,
    pub wp: PodId,
    /// The pods `echo-v1` (behind the waypoint, as `echo`'s endpoint) and `echo-v2` (no waypoint).
    pub servers: [PodId; 2],
}

impl WaypointLab {
    /// Builds the lab `test` (`None`, after a note, when not root and CI is unset).
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, &[])
    }

    /// [`WaypointLab::start`] with more controller flags.
    pub fn start_with(test: &str, controller_args: &[&str]) -> Option<Self> {
        Self::start_with_flags(test, controller_args, &[])
    }

    /// [`WaypointLab::start`] with more controller flags and more waypoint flags.
    pub fn start_with_flags(test: &str, controller_args: &[&str], waypoint_flags: &[&str]) -> Option<Self> {
        if !crate::require_root(test) {
            return None;
        }
        let mut lab = WaypointMesh::with_controller_args(test, &["echo-v1", "echo-v2", "intruder"], controller_args)
            .expect("the waypoint lab");
        let [v1, v2, intruder] = lab.servers[..] else { unreachable!("three server pods") };
        let client = lab.client;
        for p in [client, v1, v2, intruder] {
            lab.mesh.enroll(p).expect("enroll");
        }
        let serve = |p: PodId, name: &str| {
            HttpEchoServer::start(&lab.mesh.lab().pod(p).netns, SocketAddr::from(([0, 0, 0, 0], APP_PORT)), name)
                .expect("http server")
        };
        let (s1, s2) = (serve(v1, "echo-v1"), serve(v2, "echo-v2"));
        lab.declare(SERVICES).unwrap();
        let ips: Vec<Ipv4Addr> = [client, v1, v2, intruder].iter().map(|p| lab.mesh.lab().pod(*p).ip).collect();
        lab.mesh
            .wait_for_config("the pods, the waypoint's service and echo with its waypoint", |d| {
                ips.iter().all(|ip| dump::has_captured_workload(d, *ip))
                    && dump::service(d, ECHO_HOST).is_some_and(|s| s["waypoint"].is_string())
                    && dump::endpoints(d, NS, ECHO_HOST) == 1
                    && dump::endpoints(d, NS, ECHO_V2_HOST) == 1
                    && dump::endpoints(d, NS, WAYPOINT_HOST) == 1
            })
            .expect("ztunnels know the waypoint");
        let waypoint = lab.start_waypoint_with(true, waypoint_flags).expect("the waypoint is ready");
        let WaypointMesh { mesh, nodes, wp, .. } = lab;
        Some(WaypointLab { waypoint, v1: s1, v2: s2, mesh, nodes, client, intruder, wp, servers: [v1, v2] })
    }

    pub fn ns(&self, pod: PodId) -> &NetNs {
        &self.mesh.lab().pod(pod).netns
    }

    pub fn ip(&self, pod: PodId) -> Ipv4Addr {
        self.mesh.lab().pod(pod).ip
    }

    /// Sends `req` to `echo`'s VIP from `pod` on a new connection, closed after the response.
    pub fn send_from(&self, pod: PodId, req: Request) -> anyhow::Result<HttpResponse> {
        let mut conn = HttpConnection::connect(self.ns(pod), SocketAddr::from((ECHO_VIP, 80)), TIMEOUT)?;
        conn.send(&req.close())
    }

    /// `GET path` to `echo` from the client, with `headers`.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<HttpResponse> {
        let req = headers.iter().fold(Request::get(ECHO_HOST, path), |r, (n, v)| r.header(n, v));
        self.send_from(self.client, req)
    }

    /// Polls `check` until it yields a value; after [`PROPAGATION`], panics with
    /// `what`, the last failure and the waypoint's config dump (its log is
    /// printed as it stops).
    pub fn until<T>(&self, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
        let start = Instant::now();
        loop {
            let last = match check() {
                Ok(v) => return v,
                Err(e) => e,
            };
            if start.elapsed() > PROPAGATION {
                let dump = self.waypoint.admin_get("/config_dump").unwrap_or_else(|e| format!("{e:#}"));
                let dump: String = dump.chars().take(8000).collect();
                panic!("{what}: not within {PROPAGATION:?}; last: {last}\nwaypoint /config_dump:\n{dump}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Polls until `GET path` (with `headers`) from `pod` is answered by the echo server `server`; the response and
    /// what the server saw.
    pub fn until_served_by(
        &self,
        pod: PodId,
        path: &str,
        headers: &[(&str, &str)],
        server: &str,
    ) -> (HttpResponse, EchoReply) {
        self.until(&format!("GET {path} answered by {server}"), || {
            let req = headers.iter().fold(Request::get(ECHO_HOST, path), |r, (n, v)| r.header(n, v));
            let r = self.send_from(pod, req).map_err(|e| format!("{e:#}"))?;
            match EchoReply::parse(&r.body) {
                Some(echo) if r.status == 200 && echo.server == server => Ok((r, echo)),
                _ => Err(format!("status {} body {:?}", r.status, r.body)),
            }
        })
    }

    /// Polls until `GET path` from `pod` is refused by the waypoint's authorization (403); the response.
    pub fn until_denied(&self, pod: PodId, path: &str) -> HttpResponse {
        self.until(&format!("GET {path} denied"), || {
            let r = self.send_from(pod, Request::get(ECHO_HOST, path)).map_err(|e| format!("{e:#}"))?;
            if r.status == 403 {
                Ok(r)
            } else {
                Err(format!("status {} body {:?}", r.status, r.body))
            }
        })
    }

    /// The waypoint's `istio_requests_total` with `reporter="waypoint"` and `labels`.
    pub fn waypoint_requests(&self, labels: &[(&str, &str)]) -> f64 {
        let m = self.waypoint.metrics().expect("waypoint metrics");
        let mut all = vec![("reporter", "waypoint")];
        all.extend_from_slice(labels);
        metric(&m, "istio_requests_total", &all)
    }
}
