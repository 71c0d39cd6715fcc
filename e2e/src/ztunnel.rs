//! Runs the real `ztunnel` binary inside a node's namespace and talks to its admin, metrics and readiness ports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::daemon::Daemon;
use crate::lab::{Lab, Node, NodeId};
use crate::netns::NetNs;

/// ztunnel's `--drain-timeout` default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

/// How far [`ZtunnelArgs::replacement`] moves the admin, metrics and readiness ports.
const REPLACEMENT_PORT_SHIFT: u16 = 100;

/// Arguments of one ztunnel process (its final CLI flags, plus the log file and level).
#[derive(Clone, Debug)]
pub struct ZtunnelArgs {
    /// `--node-name`.
    pub node_name: String,
    /// `--trust-domain`.
    pub trust_domain: String,
    /// `--state-file`: the YAML state ztunnel polls.
    pub state_file: PathBuf,
    /// `--ca-cert`: the development CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// `--ca-key`: the development CA key (PEM).
    pub ca_key: PathBuf,
    /// `--zds-socket`: where the node agent (the lab's ZDS server) listens.
    pub zds_socket: PathBuf,
    /// `--cert-ttl-secs`; `None` keeps ztunnel's default (one day).
    pub cert_ttl_secs: Option<u64>,
    /// `--drain-timeout`; `None` keeps ztunnel's default ([`DEFAULT_DRAIN_TIMEOUT`]).
    pub drain_timeout: Option<Duration>,
    /// `--admin-addr` (inside the node namespace).
    pub admin_addr: SocketAddr,
    /// `--metrics-addr`.
    pub metrics_addr: SocketAddr,
    /// `--readiness-addr`.
    pub readiness_addr: SocketAddr,
    /// `--root-namespace`.
    pub root_namespace: String,
    /// `RUST_LOG` of the child (default `info`).
    pub log_level: String,
    /// Where stdout and stderr go.
    pub log_file: PathBuf,
    /// More flags, appended as they are.
    pub extra: Vec<String>,
    /// Take state and certificates from a controller instead of the state
    /// file and the development CA.
    pub controller: Option<ControllerFlags>,
}

/// How a ztunnel reaches the controller (xDS and CA on one address).
#[derive(Clone, Debug)]
pub struct ControllerFlags {
    /// `https://<ip>:15012`.
    pub address: String,
    /// The controller's root certificate (PEM).
    pub mesh_root: PathBuf,
    /// The bootstrap token file.
    pub token_file: PathBuf,
}

impl ZtunnelArgs {
    /// The lab's conventional arguments for `node`: files in the lab directory (`state.yaml`, `ca-cert.pem`,
    /// `ca-key.pem`, `<node>/ztunnel.sock`, `<node>-ztunnel.log`) and ztunnel's default ports.
    pub fn for_node(lab: &Lab, node: NodeId) -> Self {
        let dir = lab.dir();
        let name = &lab.node(node).name;
        ZtunnelArgs {
            node_name: name.clone(),
            trust_domain: "cluster.local".into(),
            state_file: dir.join("state.yaml"),
            ca_cert: dir.join("ca-cert.pem"),
            ca_key: dir.join("ca-key.pem"),
            zds_socket: dir.join(name).join("ztunnel.sock"),
            cert_ttl_secs: None,
            drain_timeout: None,
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 15000)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 15020)),
            readiness_addr: SocketAddr::from(([0, 0, 0, 0], 15021)),
            root_namespace: "ambit-system".into(),
            log_level: "info".into(),
            log_file: dir.join(format!("{name}-ztunnel.log")),
            extra: Vec::new(),
            controller: None,
        }
    }

    /// The arguments of a ztunnel that replaces this one while it still runs (an overlapping restart): the same,
    /// but for the admin, metrics and readiness ports and the log file. In a cluster each ztunnel pod has a network
    /// namespace of its own; in the lab both processes share the node's, so the replacement takes the other of two
    /// port sets (a third restart takes the first set again) and logs to the other of two files.
    pub fn replacement(&self) -> Self {
        let shifted = self.admin_addr.port() >= 15000 + REPLACEMENT_PORT_SHIFT;
        let shift = |a: SocketAddr| {
            let port = if shifted { a.port() - REPLACEMENT_PORT_SHIFT } else { a.port() + REPLACEMENT_PORT_SHIFT };
            SocketAddr::new(a.ip(), port)
        };
        let log = self.log_file.to_string_lossy();
        let log_file = match log.strip_suffix(".2.log") {
            Some(first) => PathBuf::from(format!("{first}.log")),
            None => PathBuf::from(format!("{}.2.log", log.trim_end_matches(".log"))),
        };
        ZtunnelArgs {
            admin_addr: shift(self.admin_addr),
            metrics_addr: shift(self.metrics_addr),
            readiness_addr: shift(self.readiness_addr),
            log_file,
            ..self.clone()
        }
    }

    /// How long it may drain after SIGTERM.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT)
    }

    /// The command-line arguments (without the program).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--node-name".to_string(),
            self.node_name.clone(),
            "--trust-domain".into(),
            self.trust_domain.clone(),
            "--zds-socket".into(),
            self.zds_socket.display().to_string(),
            "--admin-addr".into(),
            self.admin_addr.to_string(),
            "--metrics-addr".into(),
            self.metrics_addr.to_string(),
            "--readiness-addr".into(),
            self.readiness_addr.to_string(),
            "--root-namespace".into(),
            self.root_namespace.clone(),
        ];
        match &self.controller {
            Some(c) => a.extend([
                "--xds-address".into(),
                c.address.clone(),
                "--ca-address".into(),
                c.address.clone(),
                "--mesh-root".into(),
                c.mesh_root.display().to_string(),
                "--token-file".into(),
                c.token_file.display().to_string(),
            ]),
            None => a.extend([
                "--state-file".into(),
                self.state_file.display().to_string(),
                "--ca-cert".into(),
                self.ca_cert.display().to_string(),
                "--ca-key".into(),
                self.ca_key.display().to_string(),
            ]),
        }
        if let Some(ttl) = self.cert_ttl_secs {
            a.push("--cert-ttl-secs".into());
            a.push(ttl.to_string());
        }
        if let Some(d) = self.drain_timeout {
            a.push("--drain-timeout".into());
            a.push(format!("{}ms", d.as_millis()));
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// Path of the ztunnel binary: `AMBIT_ZTUNNEL_BIN`, else `ztunnel` in the profile directory of the running test
/// executable (`<target>/<profile>/deps/<test>` → `<target>/<profile>/ztunnel`).
pub fn ztunnel_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("ztunnel", "AMBIT_ZTUNNEL_BIN")
}

/// Path of a binary of this workspace: `$env_var`, else `name` in the profile directory of the running test
/// executable.
pub fn workspace_binary(name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe.parent().context("bug: the executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("bug: deps has no parent")?;
    }
    let bin = dir.join(name);
    if !bin.exists() {
        bail!("{} not found: build it first (cargo build --release --bins) or set {env_var}", bin.display());
    }
    Ok(bin)
}

/// A running ztunnel. Drop stops it (see [`Daemon`]): SIGTERM, up to 5 s of grace, then SIGKILL (this PID only); if
/// the test is failing (the thread is panicking) the last lines of its log are printed.
#[derive(Debug)]
pub struct ZtunnelProcess {
    daemon: Daemon,
    args: ZtunnelArgs,
}

impl ZtunnelProcess {
    /// Starts the binary from [`ztunnel_binary`] inside `node`'s namespace.
    pub fn start(node: &Node, args: ZtunnelArgs) -> anyhow::Result<Self> {
        Self::start_binary(&ztunnel_binary()?, node, args)
    }

    /// Starts `binary` (a ztunnel) inside `node`'s namespace.
    pub fn start_binary(binary: &Path, node: &Node, args: ZtunnelArgs) -> anyhow::Result<Self> {
        if let Some(parent) = args.zds_socket.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        }
        // The child gets a handle of its own on the node's namespace file (the Node keeps the namespace alive).
        let netns = NetNs::borrowed(node.netns.name());
        let child = netns.spawn_logged(binary, args.to_args(), &args.log_level, &args.log_file)?;
        Ok(ZtunnelProcess { daemon: Daemon::new("ztunnel", child, netns, args.log_file.clone()), args })
    }

    /// Waits until `GET /healthz/ready` on the readiness port answers 200; fails early, with the log's tail, if
    /// the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        self.daemon
            .wait_ready(self.args.readiness_addr, timeout)
            .map_err(|e| anyhow!("{e}; log:\n{}", self.log_tail(50)))
    }

    /// `GET /metrics` on the metrics port (Prometheus text).
    pub fn metrics(&self) -> anyhow::Result<String> {
        self.daemon.get_ok(self.args.metrics_addr, "/metrics")
    }

    /// `GET <path>` on the admin port.
    pub fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        self.daemon.get_ok(self.args.admin_addr, path)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// The arguments it was started with.
    pub fn args(&self) -> &ZtunnelArgs {
        &self.args
    }

    /// Kills it with SIGKILL (for crash tests) and reaps it.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Sends SIGTERM (it starts draining; a second one makes it exit at once) without waiting.
    pub fn terminate(&mut self) {
        self.daemon.terminate();
    }

    /// Waits up to `timeout` for it to exit; its exit status, or an error with the log's tail.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        match self.daemon.wait_exit(timeout)? {
            Some(status) => Ok(status),
            None => bail!("ztunnel {} still running after {timeout:?}; log:\n{}", self.pid(), self.log_tail(50)),
        }
    }

    /// `GET /healthz/ready` on the readiness port: whether it answers 200.
    pub fn is_ready(&self) -> bool {
        self.daemon.is_ready(self.args.readiness_addr)
    }

    /// Whether it is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }

    /// User plus system CPU time so far, in seconds (from `/proc/<pid>/stat`); 0 once it exited.
    pub fn cpu_seconds(&self) -> f64 {
        self.daemon.cpu_seconds()
    }

    /// Resident set size now (`VmRSS`), in bytes; 0 once it exited.
    pub fn rss_bytes(&self) -> u64 {
        self.daemon.rss_bytes()
    }

    /// Peak resident set size (`VmHWM`), in bytes; 0 once it exited.
    pub fn peak_rss_bytes(&self) -> u64 {
        self.daemon.peak_rss_bytes()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        self.daemon.log_tail(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_render_the_final_flags() {
        let args = ZtunnelArgs {
            node_name: "node1".into(),
            trust_domain: "cluster.local".into(),
            state_file: "/s.yaml".into(),
            ca_cert: "/c.pem".into(),
            ca_key: "/k.pem".into(),
            zds_socket: "/z.sock".into(),
            cert_ttl_secs: Some(60),
            drain_timeout: None,
            admin_addr: "127.0.0.1:15000".parse().unwrap(),
            metrics_addr: "0.0.0.0:15020".parse().unwrap(),
            readiness_addr: "0.0.0.0:15021".parse().unwrap(),
            root_namespace: "ambit-system".into(),
            log_level: "debug".into(),
            log_file: "/l.log".into(),
            extra: vec!["--worker-threads".into(), "1".into()],
            controller: None,
        };
        let line = args.to_args().join(" ");
        assert!(line.starts_with("--node-name node1 --trust-domain cluster.local"), "{line}");
        assert!(line.contains("--state-file /s.yaml --ca-cert /c.pem --ca-key /k.pem"), "{line}");
        let with_controller = ZtunnelArgs {
            controller: Some(ControllerFlags {
                address: "https://10.0.0.200:15012".into(),
                mesh_root: "/r.pem".into(),
                token_file: "/t".into(),
            }),
            ..args.clone()
        };
        let line2 = with_controller.to_args().join(" ");
        assert!(
            line2.contains("--xds-address https://10.0.0.200:15012 --ca-address https://10.0.0.200:15012"),
            "{line2}"
        );
        assert!(!line2.contains("--state-file") && !line2.contains("--ca-key"), "{line2}");
        assert!(line.contains("--zds-socket /z.sock"), "{line}");
        assert!(line.ends_with("--cert-ttl-secs 60 --worker-threads 1"), "{line}");
    }

    #[test]
    fn a_replacement_takes_the_other_ports_and_log_and_a_third_process_the_first_again() {
        let first = ZtunnelArgs {
            node_name: "node1".into(),
            trust_domain: "cluster.local".into(),
            state_file: "/s".into(),
            ca_cert: "/c".into(),
            ca_key: "/k".into(),
            zds_socket: "/z".into(),
            cert_ttl_secs: None,
            drain_timeout: Some(Duration::from_millis(1500)),
            admin_addr: "127.0.0.1:15000".parse().unwrap(),
            metrics_addr: "0.0.0.0:15020".parse().unwrap(),
            readiness_addr: "0.0.0.0:15021".parse().unwrap(),
            root_namespace: "ambit-system".into(),
            log_level: "info".into(),
            log_file: "/lab/node1-ztunnel.log".into(),
            extra: Vec::new(),
            controller: None,
        };
        let second = first.replacement();
        assert_eq!(
            (second.admin_addr.port(), second.metrics_addr.port(), second.readiness_addr.port()),
            (15100, 15120, 15121)
        );
        assert_eq!(second.log_file, PathBuf::from("/lab/node1-ztunnel.2.log"));
        assert_eq!(second.zds_socket, first.zds_socket, "the same node agent");
        let third = second.replacement();
        assert_eq!((third.admin_addr, third.log_file.clone()), (first.admin_addr, first.log_file.clone()));
        assert!(first.to_args().join(" ").ends_with("--drain-timeout 1500ms"), "{:?}", first.to_args());
        assert_eq!(first.drain_timeout(), Duration::from_millis(1500));
    }
}
