//! Runs the real `ambit-waypoint` binary inside a lab pod's network namespace, as a waypoint Deployment's pod runs
//! in a cluster (not captured: `istio.io/dataplane-mode: none`), and talks to its admin, metrics and readiness
//! ports. It takes its configuration and certificate from the lab's controller with its own workload token (see
//! [`crate::controller::ControllerProcess::start_with_workloads`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::controller::SERVER_NAME;
use crate::daemon::Daemon;
use crate::lab::PodId;
use crate::mesh::{Mesh, TRUST_DOMAIN};
use crate::netns::NetNs;

/// The waypoint's HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// Arguments of one waypoint process (its final CLI flags, plus the log file and level).
#[derive(Clone, Debug)]
pub struct WaypointArgs {
    /// `--xds-address`: the controller, `https://<ip>:15012`.
    pub xds_address: String,
    /// `--mesh-root`: the controller's root certificate (PEM).
    pub mesh_root: PathBuf,
    /// `--controller-server-name`.
    pub controller_server_name: String,
    /// `--token-file`: the waypoint's own workload token.
    pub token_file: PathBuf,
    /// `--pod-name`.
    pub pod_name: String,
    /// `--pod-namespace` (the Gateway's namespace).
    pub pod_namespace: String,
    /// `--instance-ip`.
    pub instance_ip: Ipv4Addr,
    /// `--service-account`: its SPIFFE identity's `sa`.
    pub service_account: String,
    /// `--waypoint-name`; `None` leaves the binary's default (the service account).
    pub waypoint_name: Option<String>,
    /// `--trust-domain`.
    pub trust_domain: String,
    /// `--hbone-addr`.
    pub hbone_addr: SocketAddr,
    /// `--admin-addr` (inside the pod's namespace).
    pub admin_addr: SocketAddr,
    /// `--metrics-addr`.
    pub metrics_addr: SocketAddr,
    /// `--readiness-addr`.
    pub readiness_addr: SocketAddr,
    /// `--access-log`; `None` leaves the binary's default.
    pub access_log: Option<bool>,
    /// `RUST_LOG` of the child (default `info`, or `AMBIT_E2E_WAYPOINT_LOG` when set).
    pub log_level: String,
    /// Where stdout and stderr go.
    pub log_file: PathBuf,
    /// More flags, appended as they are.
    pub extra: Vec<String>,
}

impl WaypointArgs {
    /// The arguments for a waypoint in lab pod `pod` of `mesh` (controller mode): the pod's name, namespace, IP and
    /// service account, the controller's address and root, the workload token the controller was started with for
    /// `<namespace>/<service account>`, the usual ports on the pod's IP (admin on 127.0.0.1), and the log in
    /// `<lab dir>/waypoint-<pod>.log`.
    pub fn for_pod(mesh: &Mesh, pod: PodId) -> anyhow::Result<Self> {
        let controller = mesh.controller().context("a waypoint needs the lab's controller (controller mode)")?;
        let p = mesh.lab().pod(pod);
        let token_file = controller.workload_token_file(&p.namespace, &p.service_account);
        if !token_file.exists() {
            bail!(
                "no workload token for {}/{}: start the mesh with Mesh::with_controller_and_workloads",
                p.namespace,
                p.service_account
            );
        }
        let on_pod = |port: u16| SocketAddr::from((p.ip, port));
        Ok(WaypointArgs {
            xds_address: controller.address(),
            mesh_root: controller.mesh_root(),
            controller_server_name: SERVER_NAME.into(),
            token_file,
            pod_name: p.name.clone(),
            pod_namespace: p.namespace.clone(),
            instance_ip: p.ip,
            service_account: p.service_account.clone(),
            waypoint_name: None,
            trust_domain: TRUST_DOMAIN.into(),
            hbone_addr: on_pod(HBONE_PORT),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            metrics_addr: on_pod(15020),
            readiness_addr: on_pod(15021),
            access_log: None,
            log_level: std::env::var("AMBIT_E2E_WAYPOINT_LOG").unwrap_or_else(|_| "info".into()),
            log_file: mesh.lab().dir().join(format!("waypoint-{}.log", p.name)),
            extra: Vec::new(),
        })
    }

    /// The SPIFFE identity the waypoint runs as.
    pub fn identity(&self) -> String {
        format!("spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.pod_namespace, self.service_account)
    }

    /// The command-line arguments (without the program).
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            ("--xds-address", self.xds_address.clone()),
            ("--mesh-root", self.mesh_root.display().to_string()),
            ("--controller-server-name", self.controller_server_name.clone()),
            ("--token-file", self.token_file.display().to_string()),
            ("--pod-name", self.pod_name.clone()),
            ("--pod-namespace", self.pod_namespace.clone()),
            ("--instance-ip", self.instance_ip.to_string()),
            ("--service-account", self.service_account.clone()),
            ("--trust-domain", self.trust_domain.clone()),
            ("--hbone-addr", self.hbone_addr.to_string()),
            ("--admin-addr", self.admin_addr.to_string()),
            ("--metrics-addr", self.metrics_addr.to_string()),
            ("--readiness-addr", self.readiness_addr.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
        if let Some(name) = &self.waypoint_name {
            a.extend(["--waypoint-name".into(), name.clone()]);
        }
        if let Some(on) = self.access_log {
            a.extend(["--access-log".into(), on.to_string()]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// Path of the waypoint binary: `AMBIT_WAYPOINT_BIN`, else `ambit-waypoint` next to the running test executable's
/// profile directory (see [`crate::ztunnel::workspace_binary`]).
pub fn waypoint_binary() -> anyhow::Result<PathBuf> {
    crate::ztunnel::workspace_binary("ambit-waypoint", "AMBIT_WAYPOINT_BIN")
}

/// A running waypoint. Drop stops it (see [`Daemon`]): SIGTERM, up to 5 s of grace, then SIGKILL (this PID only); if
/// the test is failing (the thread is panicking) the last lines of its log are printed.
#[derive(Debug)]
pub struct WaypointProcess {
    daemon: Daemon,
    args: WaypointArgs,
}

impl WaypointProcess {
    /// Starts the binary from [`waypoint_binary`] inside lab pod `pod`'s namespace.
    pub fn start(mesh: &Mesh, pod: PodId, args: WaypointArgs) -> anyhow::Result<Self> {
        Self::start_binary(&waypoint_binary()?, mesh, pod, args)
    }

    /// Starts `binary` (a waypoint) inside lab pod `pod`'s namespace.
    pub fn start_binary(binary: &Path, mesh: &Mesh, pod: PodId, args: WaypointArgs) -> anyhow::Result<Self> {
        let p = mesh.lab().pod(pod);
        // The child gets a handle of its own on the pod's namespace file (the Pod keeps the namespace alive).
        let netns = NetNs::borrowed(p.netns.name());
        let child = netns.spawn_logged(binary, args.to_args(), &args.log_level, &args.log_file)?;
        Ok(WaypointProcess { daemon: Daemon::new("ambit-waypoint", child, netns, args.log_file.clone()), args })
    }

    /// [`WaypointProcess::start`], then [`WaypointProcess::wait_ready`].
    pub fn start_ready(mesh: &Mesh, pod: PodId, args: WaypointArgs, timeout: Duration) -> anyhow::Result<Self> {
        let mut w = Self::start(mesh, pod, args)?;
        w.wait_ready(timeout)?;
        Ok(w)
    }

    /// Waits until `GET /healthz/ready` on the readiness port answers 200; fails early, with the log, if the
    /// process exits, and with the log and the last answer after `timeout`.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.daemon.wait_ready(self.args.readiness_addr, timeout).map_err(|e| anyhow!("{e}; log:\n{}", self.log_text()))
    }

    /// `GET /healthz/ready` on the readiness port: whether it answers 200.
    pub fn is_ready(&self) -> bool {
        self.daemon.is_ready(self.args.readiness_addr)
    }

    /// `GET /metrics` on the metrics port (Prometheus text).
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.daemon.get_ok(self.args.metrics_addr, "/metrics")
    }

    /// `GET <path>` on the admin port.
    pub fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        self.daemon.get_ok(self.args.admin_addr, path)
    }

    /// `GET /config_dump` on the admin port, parsed.
    pub fn config_dump(&self) -> anyhow::Result<serde_json::Value> {
        let text = self.admin_get("/config_dump")?;
        serde_json::from_str(&text).with_context(|| format!("config_dump is not JSON: {text}"))
    }

    /// The arguments it was started with.
    pub fn args(&self) -> &WaypointArgs {
        &self.args
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Whether it is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// How many file descriptors it holds now (`/proc/<pid>/fd`); 0 once it exited.
    pub fn open_fds(&self) -> usize {
        self.daemon.open_fds()
    }

    /// Resident set size now (`VmRSS`), in bytes; 0 once it exited.
    pub fn rss_bytes(&self) -> u64 {
        self.daemon.rss_bytes()
    }

    /// User plus system CPU time so far, in seconds; 0 once it exited.
    pub fn cpu_seconds(&self) -> f64 {
        self.daemon.cpu_seconds()
    }

    /// Peak resident set size (`VmHWM`), in bytes; 0 once it exited.
    pub fn peak_rss_bytes(&self) -> u64 {
        self.daemon.peak_rss_bytes()
    }

    /// Its whole log so far.
    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        self.daemon.log_tail(n)
    }

    /// Sends SIGTERM and waits up to `within` for it to exit; its exit
    /// status, or an error with its log when it is still running.
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.sigterm();
        self.wait_exit(within)
    }

    /// Sends SIGTERM: the waypoint drains, then exits.
    pub fn sigterm(&mut self) {
        self.daemon.terminate();
    }

    /// Waits up to `within` for it to exit: its exit status, or an error
    /// with its log when it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        match self.daemon.wait_exit(within)? {
            Some(status) => Ok(status),
            None => bail!("ambit-waypoint still running {within:?} after SIGTERM; log:\n{}", self.log_text()),
        }
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_render_the_binarys_flags() {
        let args = WaypointArgs {
            xds_address: "https://10.0.0.201:15012".into(),
            mesh_root: "/lab/controller/ca/root-cert.pem".into(),
            controller_server_name: SERVER_NAME.into(),
            token_file: "/lab/controller/tokens/workload-default-waypoint".into(),
            pod_name: "waypoint".into(),
            pod_namespace: "default".into(),
            instance_ip: Ipv4Addr::new(10, 1, 0, 4),
            service_account: "waypoint".into(),
            waypoint_name: Some("waypoint".into()),
            trust_domain: "cluster.local".into(),
            hbone_addr: "10.1.0.4:15008".parse().unwrap(),
            admin_addr: "127.0.0.1:15000".parse().unwrap(),
            metrics_addr: "10.1.0.4:15020".parse().unwrap(),
            readiness_addr: "10.1.0.4:15021".parse().unwrap(),
            access_log: Some(true),
            log_level: "info".into(),
            log_file: "/lab/waypoint.log".into(),
            extra: vec!["--pool-idle-secs".into(), "5".into()],
        };
        let line = args.to_args().join(" ");
        assert!(line.starts_with("--xds-address https://10.0.0.201:15012 --mesh-root /lab/controller/ca/root-cert.pem"));
        assert!(
            line.contains("--controller-server-name ambit-controller.ambit-system.svc --token-file /lab/"),
            "{line}"
        );
        assert!(
            line.contains("--instance-ip 10.1.0.4 --service-account waypoint --trust-domain cluster.local"),
            "{line}"
        );
        assert!(line.contains("--hbone-addr 10.1.0.4:15008 --admin-addr 127.0.0.1:15000"), "{line}");
        assert!(line.contains("--metrics-addr 10.1.0.4:15020 --readiness-addr 10.1.0.4:15021"), "{line}");
        assert!(line.ends_with("--waypoint-name waypoint --access-log true --pool-idle-secs 5"), "{line}");
        assert_eq!(args.identity(), "spiffe://cluster.local/ns/default/sa/waypoint");
        let defaults = WaypointArgs { waypoint_name: None, access_log: None, extra: Vec::new(), ..args };
        let line = defaults.to_args().join(" ");
        assert!(!line.contains("--waypoint-name") && !line.contains("--access-log"), "{line}");
    }
}
