//! The `ambit-node-agent` process: flags, startup order, readiness, and
//! shutdown.
//!
//! Startup: the enroller (ZDS server, ztunnel connects to it), the plugin
//! server (the CNI plugin calls it), the plugin installed on the node
//! (from then on new pods call the plugin, which needs the two servers), then
//! the Kubernetes watches. On SIGTERM the watches stop and the plugin is
//! removed from the node when this is an uninstall (`--uninstall-on-exit`,
//! and, given `--owner-daemonset`, that DaemonSet gone or being deleted; see
//! [`super::owner`]), else left for the next agent; enrolled pods
//! are NOT released: their capture stays and ztunnel keeps serving them
//! across an agent restart, and the next agent re-enrolls them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Map};

use super::enroll::{EnrollConfig, EnrollError, Enroller};
use super::install::{InstallConfig, InstallError, Installed, Installer};
use super::owner::OwnerDaemonSet;
use super::plugin_server::PluginServer;

/// How often the plugin's installation is checked and repaired (the primary
/// CNI may rewrite its conflist; the service-account token rotates). A poll
/// is simpler than inotify and also survives the directory being replaced.
const INSTALL_CHECK: Duration = Duration::from_secs(2);
/// The in-cluster service account, mounted by Kubernetes.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `ambit-node-agent`: enrolls this node's ambient pods into ztunnel (capture
/// rules + ZDS), serves the CNI plugin, and installs the plugin on the node.
/// Runs as a hostNetwork DaemonSet, apart from ztunnel.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ambit-node-agent", version)]
pub struct Args {
    /// This node's name: only pods with this spec.nodeName are watched.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// ZDS socket: the agent listens, ztunnel connects.
    #[arg(long, env = "AMBIT_ZDS_SOCKET", default_value = ambit_zds::DEFAULT_SOCKET_PATH)]
    pub zds_socket: PathBuf,
    /// Socket the CNI plugin calls the agent on.
    #[arg(long, env = "AMBIT_CNI_SOCKET", default_value = "/var/run/ambit/cni.sock")]
    pub cni_socket: PathBuf,
    /// The node's CNI bin dir (host path, mounted): the plugin binary goes there.
    #[arg(long, env = "AMBIT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The node's CNI conf dir (host path, mounted): the plugin is appended to
    /// the lexically first *.conflist or *.conf, and its kubeconfig written.
    #[arg(long, env = "AMBIT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The CNI conf dir as the node (the container runtime running the
    /// plugin) sees it: the plugin's entry names its kubeconfig there.
    #[arg(long, env = "AMBIT_HOST_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub host_cni_conf_dir: PathBuf,
    /// The plugin binary in the agent's image, copied to --cni-bin-dir.
    #[arg(long, env = "AMBIT_CNI_PLUGIN_BINARY", default_value = "/usr/local/bin/ambit-cni")]
    pub cni_plugin_binary: PathBuf,
    /// The agent's state: the enrolled pods (replayed after a restart) and the
    /// primary conflist's original text (restored on uninstall).
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/run/ambit")]
    pub state_dir: PathBuf,
    /// Serves GET /healthz/ready: 200 once the enroller runs and the plugin is
    /// installed. Not 15021 (ztunnel's, on the same host network).
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15022")]
    pub readiness_addr: SocketAddr,
    /// Remove the plugin (entry, binary, kubeconfig) on SIGTERM; with
    /// `--owner-daemonset`, only when that DaemonSet is gone or being deleted.
    #[arg(long, env = "AMBIT_UNINSTALL_ON_EXIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub uninstall_on_exit: bool,
    /// The agent's own DaemonSet (`namespace/name`). While it stands, an exit
    /// is a restart and the plugin stays: a mesh pod that starts meanwhile
    /// waits (a retryable CNI error) instead of starting uncaptured. Unset:
    /// every exit with `--uninstall-on-exit` removes the plugin.
    #[arg(long, env = "AMBIT_OWNER_DAEMONSET")]
    pub owner_daemonset: Option<OwnerDaemonSet>,
    /// Install the kubelet-probe SNAT (table `inet ambit-node`) in the node's
    /// network namespace, so probes reach enrolled pods under STRICT mTLS;
    /// removed on exit together with the plugin (`--uninstall-on-exit`).
    #[arg(long, env = "AMBIT_NODE_PROBE_SNAT", default_value_t = true, action = clap::ArgAction::Set)]
    pub node_probe_snat: bool,
    /// The node's pod CIDRs for the probe SNAT, comma-separated. Default: the
    /// Node's spec.podCIDRs (spec.podCIDR), read from the API server.
    #[arg(long, env = "AMBIT_POD_CIDRS", value_delimiter = ',')]
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// How enrolled pods are captured: `nftables` (rules in the pod's network
    /// namespace) or `ebpf` (sk_lookup on the pod's namespace and cgroup
    /// hooks, no netfilter; needs a cgroup v2 hierarchy and bpffs, and
    /// ztunnel given the same --bpf-pin-root).
    #[arg(long, env = "AMBIT_CAPTURE_MODE", value_enum, default_value = "nftables")]
    pub capture_mode: crate::capture::CaptureMode,
    /// bpffs directory where eBPF capture pins its programs and maps; they
    /// stay attached across agent restarts and are re-adopted.
    #[arg(long, env = "AMBIT_BPF_PIN_ROOT", default_value = ambit_ebpf::DEFAULT_PIN_ROOT)]
    pub bpf_pin_root: PathBuf,
    /// With eBPF capture, splice each pod's pod-local legs (application ↔
    /// ztunnel) with the sockmap, so their bytes skip TCP/IP (needs Linux
    /// 6.10). Off by default: the kernel can wake an application's blocking
    /// read on such a socket with EAGAIN, which applications that do not
    /// retry treat as an error.
    #[arg(long, env = "AMBIT_BPF_SPLICE", default_value_t = false, action = clap::ArgAction::Set)]
    pub bpf_splice: bool,
    /// Kubeconfig of the agent (and, copied, of the plugin). Default: the
    /// in-cluster service account.
    #[arg(long, env = "AMBIT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Log filter (`info`, `debug`, `info,ambit_cni=debug`). Default: RUST_LOG, else info.
    #[arg(long, env = "AMBIT_LOG_LEVEL")]
    pub log_level: Option<String>,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The Kubernetes client could not be configured.
    #[error("kubernetes client: {0}")]
    Kube(String),
    /// The enroller (ZDS server) could not start.
    #[error("cannot start the enroller: {0}")]
    Enroll(#[from] EnrollError),
    /// Installing or removing the plugin failed.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// A local file or socket could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(args: Args, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    let client = kube_client(args.kubeconfig.as_deref()).await?;
    let readiness = tokio::net::TcpListener::bind(args.readiness_addr)
        .await
        .map_err(|source| AgentError::Io { what: format!("bind {}", args.readiness_addr), source })?;

    let mut enroll = EnrollConfig::new(&args.zds_socket);
    enroll.state_dir = Some(args.state_dir.clone());
    enroll.capture.mode = args.capture_mode;
    enroll.capture.bpf_pin_root = args.bpf_pin_root.clone();
    enroll.capture.bpf_splice = args.bpf_splice;
    let enroller = Enroller::start(enroll).await?;
    tracing::info!(socket = %args.zds_socket.display(), "enroller started; waiting for ztunnel");
    // Bound before the plugin is installed: from then on the plugin calls it.
    let plugin_server = PluginServer::bind(&args.cni_socket)
        .map_err(|source| AgentError::Io { what: format!("bind {}", args.cni_socket.display()), source })?;
    let plugin_task = tokio::spawn(plugin_server.run(enroller.clone()));

    let installer = Arc::new(Installer::new(install_config(&args)));
    let installed = Arc::new(AtomicBool::new(false));
    // Held by every ensure() and by the uninstall; true once stopping. Aborting the install task does not stop an
    // ensure() already running on a blocking thread, which could otherwise write the entry, the kubeconfig or the
    // backup again after (or while) the uninstall removes them.
    let stopping = Arc::new(std::sync::Mutex::new(false));
    let install_task =
        tokio::spawn(keep_installed(installer.clone(), args.kubeconfig.clone(), installed.clone(), stopping.clone()));
    let ready = installed.clone();
    let readiness_task = tokio::spawn(ambit_telemetry::serve(readiness, move |req| {
        use http::StatusCode;
        match (req.uri().path(), ready.load(Ordering::Relaxed)) {
            ("/healthz/ready", true) => ambit_telemetry::text(StatusCode::OK, "ready\n"),
            ("/healthz/ready", false) => {
                ambit_telemetry::text(StatusCode::SERVICE_UNAVAILABLE, "CNI plugin not installed\n")
            }
            _ => ambit_telemetry::text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }));
    let snat_task = args
        .node_probe_snat
        .then(|| tokio::spawn(keep_probe_snat(client.clone(), args.node_name.clone(), args.pod_cidrs.clone())));
    let watch_task =
        tokio::spawn(super::kube::run(client.clone(), args.node_name.clone(), enroller.clone(), "/proc".into()));
    tracing::info!(node = %args.node_name, "node agent started");

    shutdown.await;
    tracing::info!("stopping: pods stay enrolled");
    watch_task.abort();
    install_task.abort();
    readiness_task.abort();
    plugin_task.abort();
    let _ = install_task.await;
    if let Some(t) = snat_task {
        t.abort();
        let _ = t.await;
    }
    let uninstall = match (&args.owner_daemonset, args.uninstall_on_exit) {
        (_, false) => false,
        (None, true) => true,
        (Some(owner), true) => owner.going_away(&client).await,
    };
    if !uninstall {
        tracing::info!("the agent's DaemonSet stands: the plugin stays for the next agent");
    }
    // Waits for an ensure() in progress; none starts after this.
    let mut stopped = stopping.lock().unwrap_or_else(|e| e.into_inner());
    *stopped = true;
    if uninstall {
        installer.uninstall()?;
        tracing::info!("CNI plugin uninstalled");
        if args.node_probe_snat {
            match crate::capture::uninstall_node_probe_snat(&own_netns()) {
                Ok(()) => tracing::info!("node probe SNAT removed"),
                Err(e) => tracing::warn!(error = %e, "cannot remove the node probe SNAT"),
            }
        }
    }
    drop(stopped);
    Ok(())
}

/// The agent's own network namespace: the node's (the agent is hostNetwork).
fn own_netns() -> PathBuf {
    PathBuf::from(format!("/proc/{}/ns/net", std::process::id()))
}

/// Installs the kubelet-probe SNAT for the node's pod CIDRs (`cidrs`, else
/// the Node's spec.podCIDRs), retrying until it is in place.
async fn keep_probe_snat(client: kube::Client, node: String, cidrs: Vec<ipnet::IpNet>) {
    let mut delay = Duration::from_secs(1);
    let mut last_error = None::<String>;
    loop {
        let found = if cidrs.is_empty() { node_pod_cidrs(&client, &node).await } else { Ok(cidrs.clone()) };
        let result = match found {
            Ok(c) if c.is_empty() => Err(format!("Node {node} has no spec.podCIDRs (pass --pod-cidrs)")),
            Ok(c) => tokio::task::spawn_blocking(move || {
                let snat = crate::capture::NodeProbeSnat::new(c);
                crate::capture::install_node_probe_snat(&own_netns(), &snat).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("bug: probe SNAT panicked: {e}"))),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return,
            Err(e) => {
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(problem = %e, "node probe SNAT not installed; kubelet probes of enrolled pods may fail under STRICT mTLS");
                    last_error = Some(e);
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// The Node's spec.podCIDRs, else its spec.podCIDR.
async fn node_pod_cidrs(client: &kube::Client, node: &str) -> Result<Vec<ipnet::IpNet>, String> {
    let api = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    let n = api.get(node).await.map_err(|e| format!("get Node {node}: {e}"))?;
    let spec = n.spec.unwrap_or_default();
    let mut texts = spec.pod_cidrs.unwrap_or_default();
    if texts.is_empty() {
        texts.extend(spec.pod_cidr);
    }
    texts.iter().map(|t| t.parse().map_err(|e| format!("Node {node}: pod CIDR {t:?}: {e}"))).collect()
}

fn install_config(args: &Args) -> InstallConfig {
    let mut fields = Map::new();
    fields.insert("agent_socket".into(), json!(args.cni_socket));
    fields.insert("kubeconfig".into(), json!(args.host_cni_conf_dir.join(super::install::KUBECONFIG_FILE)));
    InstallConfig {
        bin_dir: args.cni_bin_dir.clone(),
        conf_dir: args.cni_conf_dir.clone(),
        plugin_binary: args.cni_plugin_binary.clone(),
        state_dir: args.state_dir.clone(),
        plugin_fields: fields,
    }
}

/// Installs the plugin and repairs it for ever; `installed` says whether it
/// is in place now.
async fn keep_installed(
    installer: Arc<Installer>,
    kubeconfig: Option<PathBuf>,
    installed: Arc<AtomicBool>,
    stopping: Arc<std::sync::Mutex<bool>>,
) {
    let mut last_error = None::<String>;
    loop {
        let kc = kubeconfig.clone();
        let i = installer.clone();
        let stop = stopping.clone();
        let result = tokio::task::spawn_blocking(move || {
            let stopped = stop.lock().unwrap_or_else(|e| e.into_inner());
            if *stopped {
                return Err("stopping".to_string());
            }
            let text = plugin_kubeconfig(kc.as_deref())?;
            i.ensure(&text).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("bug: install panicked: {e}")));
        let (ok, problem) = match result {
            Ok(Installed::Ready(_)) => (true, None),
            Ok(Installed::NoPrimary) => (false, Some("no CNI network config yet; waiting for the primary CNI".into())),
            Err(e) => (false, Some(e)),
        };
        installed.store(ok, Ordering::Relaxed);
        if problem != last_error {
            if let Some(p) = &problem {
                tracing::warn!(problem = %p, "CNI plugin not installed");
            }
            last_error = problem;
        }
        tokio::time::sleep(INSTALL_CHECK).await;
    }
}

/// The kubeconfig the plugin uses: a copy of the agent's when one was given,
/// else one made from the in-cluster service account (its token rotates, so
/// this is read again on each check).
fn plugin_kubeconfig(agent_kubeconfig: Option<&Path>) -> Result<String, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("read {}: {e}", p.display()));
    if let Some(path) = agent_kubeconfig {
        return String::from_utf8(read(path)?).map_err(|_| format!("{} is not UTF-8", path.display()));
    }
    let dir = Path::new(SERVICE_ACCOUNT_DIR);
    let token = String::from_utf8_lossy(&read(&dir.join("token"))?).trim().to_owned();
    let ca = read(&dir.join("ca.crt"))?;
    let env = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set (not in a pod?)"));
    let (host, port) = (env("KUBERNETES_SERVICE_HOST")?, env("KUBERNETES_SERVICE_PORT")?);
    Ok(in_cluster_kubeconfig(&host, &port, &ca, &token))
}

/// A kubeconfig for `https://host:port` trusting `ca` with bearer `token`.
fn in_cluster_kubeconfig(host: &str, port: &str, ca: &[u8], token: &str) -> String {
    let server = if host.contains(':') { format!("https://[{host}]:{port}") } else { format!("https://{host}:{port}") };
    let ca = base64::engine::general_purpose::STANDARD.encode(ca);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": "ambit-cni", "user": {"token": token}}],
        "contexts": [{"name": "ambit-cni", "context": {"cluster": "local", "user": "ambit-cni"}}],
        "current-context": "ambit-cni",
    });
    // JSON is YAML: kubeconfig readers take either.
    serde_json::to_string_pretty(&config).expect("bug: a JSON value always serializes") + "\n"
}

async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client, AgentError> {
    let err = |e: &dyn std::fmt::Display| AgentError::Kube(e.to_string());
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| err(&e))?
        }
        None => kube::Config::incluster().map_err(|e| err(&e))?,
    };
    kube::Client::try_from(config).map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_and_required_flags() {
        let a = Args::try_parse_from(["ambit-node-agent", "--node-name", "n1"]).unwrap();
        assert_eq!(a.readiness_addr.port(), 15022);
        assert!(a.uninstall_on_exit);
        assert_eq!(a.cni_conf_dir, Path::new("/etc/cni/net.d"));
        assert!(a.node_probe_snat && a.pod_cidrs.is_empty());
        let a =
            Args::try_parse_from(["ambit-node-agent", "--node-name", "n1", "--pod-cidrs", "10.244.1.0/24,fd00::/64"])
                .unwrap();
        assert_eq!(a.pod_cidrs.len(), 2);
        let a =
            Args::try_parse_from(["ambit-node-agent", "--node-name", "n1", "--cni-conf-dir", "/host/etc/cni/net.d"])
                .unwrap();
        assert_eq!(install_config(&a).plugin_fields["kubeconfig"], "/etc/cni/net.d/ambit-cni-kubeconfig");
        let a =
            Args::try_parse_from(["ambit-node-agent", "--node-name", "n1", "--uninstall-on-exit", "false"]).unwrap();
        assert!(!a.uninstall_on_exit);
        let entry = install_config(&a).plugin_fields;
        assert_eq!(entry["agent_socket"], "/var/run/ambit/cni.sock");
        assert_eq!(entry["kubeconfig"], "/etc/cni/net.d/ambit-cni-kubeconfig");
    }

    #[test]
    fn the_in_cluster_kubeconfig_embeds_ca_and_token() {
        let text = in_cluster_kubeconfig("10.96.0.1", "443", b"CA PEM", "tok");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["clusters"][0]["cluster"]["server"], "https://10.96.0.1:443");
        assert_eq!(v["clusters"][0]["cluster"]["certificate-authority-data"], "Q0EgUEVN");
        assert_eq!(v["users"][0]["user"]["token"], "tok");
        let v6 = in_cluster_kubeconfig("fd00::1", "443", b"", "t");
        assert!(v6.contains("https://[fd00::1]:443"), "{v6}");
    }
}
