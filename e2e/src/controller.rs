//! Runs the real `ambit-controller` in the lab: in file mode, on an external
//! host of the fabric, reading Kubernetes YAML generated from the lab's pods.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ambit_identity::CertificateAuthority;
use anyhow::{bail, Context};

use crate::daemon::Daemon;
use crate::lab::{Host, Lab};
use crate::netns::NetNs;
use crate::objects::KubeObjects;
use crate::statefile::write_atomic;
use crate::ztunnel::{workspace_binary, ControllerFlags};

/// The controller's TLS gRPC port (xDS and CA).
pub const GRPC_PORT: u16 = 15012;

/// The controller's Prometheus port.
pub const METRICS_PORT: u16 = 15014;

/// The name on the controller's serving certificate (`--serving-dns-names`), which its clients verify.
pub const SERVER_NAME: &str = "ambit-controller.ambit-system.svc";

/// A running controller; Drop stops it (see [`Daemon`]: SIGTERM, then SIGKILL; this PID only).
#[derive(Debug)]
pub struct ControllerProcess {
    daemon: Daemon,
    dir: PathBuf,
    ip: Ipv4Addr,
}

impl ControllerProcess {
    /// Starts the controller on `host`, with its files under `lab.dir()/controller`: `cluster/` (the watched
    /// YAML), `ca/` (the root it generates), `bootstrap-tokens` (one token per lab node, `--bootstrap-tokens`)
    /// and `tokens/<node>` (each node's token, as its ztunnel reads it). Waits until its port accepts.
    pub fn start(lab: &Lab, host: &Host) -> anyhow::Result<Self> {
        Self::start_with_workloads(lab, host, &[], &[])
    }

    /// [`ControllerProcess::start`], also admitting the workloads `(namespace, service account)` in `workloads`
    /// (waypoints, which fetch their own configuration and certificate): `workload-tokens` holds one
    /// `<token> <namespace>/<service account>` per workload (`--workload-tokens`) and
    /// `tokens/workload-<namespace>-<service account>` each one's token (see
    /// [`ControllerProcess::workload_token_file`]). The file is read once, at start. `extra_args` are more
    /// flags (e.g. `--auto-allow-waypoint-policy`).
    pub fn start_with_workloads(
        lab: &Lab,
        host: &Host,
        workloads: &[(&str, &str)],
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = lab.dir().join("controller");
        std::fs::create_dir_all(dir.join("cluster"))?;
        std::fs::create_dir_all(dir.join("tokens"))?;
        let mut table = String::from("# <token> <node>\n");
        for node in lab.nodes() {
            let token = node_token(&node.name);
            table.push_str(&format!("{token} {}\n", node.name));
            // No trailing newline: a client that sends the file's bytes verbatim (Istio's ztunnel) must work.
            std::fs::write(dir.join("tokens").join(&node.name), &token)?;
        }
        std::fs::write(dir.join("bootstrap-tokens"), table)?;
        let mut workload_table = String::from("# <token> <namespace>/<service account>\n");
        for (ns, sa) in workloads {
            let token = node_token(&format!("wl-{ns}-{sa}"));
            workload_table.push_str(&format!("{token} {ns}/{sa}\n"));
            std::fs::write(workload_token_path(&dir, ns, sa), &token)?;
        }
        std::fs::write(dir.join("workload-tokens"), workload_table)?;
        let log = dir.join("controller.log");
        let out = File::options().create(true).append(true).open(&log)?;
        let bin = workspace_binary("ambit-controller", "AMBIT_CONTROLLER_BIN")?;
        let netns = NetNs::borrowed(host.netns.name());
        let mut cmd = netns.command(&bin);
        cmd.args(["--config-dir", &dir.join("cluster").display().to_string()])
            .args(["--config-poll-ms", "100"])
            .args(["--ca-dir", &dir.join("ca").display().to_string()])
            .args(["--bootstrap-tokens", &dir.join("bootstrap-tokens").display().to_string()])
            .args(["--listen", &format!("0.0.0.0:{GRPC_PORT}")])
            .args(["--serving-ips", &host.ip.to_string()])
            .args(["--serving-dns-names", SERVER_NAME])
            .args(["--metrics-addr", &format!("0.0.0.0:{METRICS_PORT}")]);
        if !workloads.is_empty() {
            cmd.args(["--workload-tokens", &dir.join("workload-tokens").display().to_string()]);
        }
        cmd.args(extra_args);
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        // Tests print its log where they need it (log_text); a tail on every failure would bury the ztunnels'.
        let daemon = Daemon::new("ambit-controller", child, netns, log).without_log_on_panic();
        let mut c = ControllerProcess { daemon, dir, ip: host.ip };
        let addr = SocketAddr::from((host.ip, GRPC_PORT));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = c.daemon.try_exited()? {
                bail!("controller exited with {status}; log:\n{}", c.log_text());
            }
            if c.daemon
                .netns()
                .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
                .is_ok()
            {
                return Ok(c);
            }
            if Instant::now() > deadline {
                bail!("controller not listening on {addr} after 15 s; log:\n{}", c.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The flags the ztunnel of `node` needs to use this controller (its token proves that node).
    pub fn flags(&self, node: &str) -> ControllerFlags {
        ControllerFlags { address: self.address(), mesh_root: self.mesh_root(), token_file: self.token_file(node) }
    }

    /// The file holding `node`'s bootstrap token (no trailing newline).
    pub fn token_file(&self, node: &str) -> PathBuf {
        self.dir.join("tokens").join(node)
    }

    /// The file holding the token of workload `namespace/service_account` (no trailing newline); it exists only
    /// for the workloads given to [`ControllerProcess::start_with_workloads`].
    pub fn workload_token_file(&self, namespace: &str, service_account: &str) -> PathBuf {
        workload_token_path(&self.dir, namespace, service_account)
    }

    /// The xDS and CA address its clients dial: `https://<ip>:15012`.
    pub fn address(&self) -> String {
        format!("https://{}:{GRPC_PORT}", self.ip)
    }

    /// The root certificate (PEM) its clients verify its serving certificate with.
    pub fn mesh_root(&self) -> PathBuf {
        self.ca_dir().join("root-cert.pem")
    }

    /// The directory of the root it generated (`root-cert.pem`, `root-key.pem`).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The mesh root the ztunnels trust, with its key (to mint certificates in tests).
    pub fn root(&self) -> anyhow::Result<CertificateAuthority> {
        let read = |f: &str| {
            let path = self.ca_dir().join(f);
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
        };
        CertificateAuthority::from_pem(&read("root-cert.pem")?, &read("root-key.pem")?)
            .context("load the controller's root")
    }

    /// `GET /metrics` on the controller's metrics port (Prometheus text).
    pub fn metrics(&self) -> anyhow::Result<String> {
        let addr = SocketAddr::from((self.ip, METRICS_PORT));
        let r = crate::http::get(self.daemon.netns(), addr, "/metrics", Duration::from_secs(5))?;
        if r.status != 200 {
            bail!("controller /metrics: status {}", r.status);
        }
        Ok(r.body)
    }

    /// The watched directory of Kubernetes YAML.
    pub fn cluster_dir(&self) -> PathBuf {
        self.dir.join("cluster")
    }

    /// Writes `file` (a name in the watched directory) atomically.
    pub fn write(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        write_atomic(&self.cluster_dir().join(file), yaml)
    }

    /// Removes `file` from the watched directory.
    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.cluster_dir().join(file)).with_context(|| format!("remove {file}"))
    }

    /// The controller's log so far.
    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

/// Where the token of workload `namespace/service_account` is written under the controller's directory `dir`.
fn workload_token_path(dir: &std::path::Path, namespace: &str, service_account: &str) -> PathBuf {
    dir.join("tokens").join(format!("workload-{namespace}-{service_account}"))
}

/// A bootstrap token for `node`, unique to this run.
fn node_token(node: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("lab-{node}-{}-{nanos:x}", std::process::id())
}

/// Kubernetes YAML for the lab's pods: a Namespace per pod namespace (labelled
/// `istio.io/dataplane-mode=ambient` when listed in `ambient`) and a Pod per
/// pod, scheduled, with its IP and Ready, as a kubelet would report it (see
/// [`KubeObjects`], which also declares services).
pub fn cluster_yaml(lab: &Lab, ambient: &[&str]) -> String {
    KubeObjects::new(ambient).render(lab)
}
