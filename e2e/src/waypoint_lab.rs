//! The lab of the waypoint proxy, shared by its end-to-end tests (`e2e/tests/mesh_waypoint.rs`) and the L7
//! benchmark ([`crate::bench_l7`]): the real `ambit-controller` (file mode) on an external host, two nodes with
//! their ztunnels, a client pod and the waypoint's pod on node 1 (the waypoint's pod labelled
//! `istio.io/dataplane-mode: none`, so not captured, running as the service account `waypoint`, the Gateway's
//! name), and server pods on node 2. As a cluster's deployer would, the lab declares the waypoint `Gateway`
//! (class `ambit-waypoint`) and its `Service` (port 15008, selecting the waypoint pod) — see [`GATEWAY_OBJECTS`];
//! the waypoint proves its identity to the controller with its own workload token.

use std::time::Duration;

use anyhow::Context;

use crate::lab::{Lab, NodeId, PodId, PodSpec};
use crate::mesh::Mesh;
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
        let servers =
            node2_pods.iter().map(|p| lab.add_pod(n2, PodSpec::new(p, NS, p))).collect::<anyhow::Result<Vec<_>>>()?;
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
        let mut args = WaypointArgs::for_pod(&self.mesh, self.wp)?;
        args.waypoint_name = Some(GATEWAY.into());
        args.access_log = Some(access_log);
        WaypointProcess::start_ready(&self.mesh, self.wp, args, PROPAGATION).context("the waypoint is ready")
    }
}
