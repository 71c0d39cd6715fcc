//! ztunnel's configuration: command-line flags and environment variables,
//! turned into a plain [`Config`] by a pure function and validated once at
//! start. Bad configuration fails with one clear line.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;

/// Marks ztunnel puts on every socket it opens inside a pod, so the pod's
/// capture rules let them through. Must match `ambit_cni::capture` (the
/// lab's tests prove they agree).
pub const DEFAULT_SOCKET_MARK: u32 = 0x400;

/// Longest busy-poll window accepted: beyond it spinning buys nothing.
const MAX_BUSY_POLL: Duration = Duration::from_millis(1);

/// Flags and environment variables. Every flag has a documented default.
#[derive(Debug, Clone, Parser)]
#[command(name = "ztunnel", version, about = "Ambit's node proxy: HBONE tunnels between ambient pods")]
pub struct Args {
    /// Name of the node this ztunnel serves; only pods on this node are enrolled.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// This ztunnel's pod name, which names it to the control plane in its xDS
    /// `Node` as Istio's ztunnel does (metadata `NAME`, and the id
    /// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`).
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,

    /// This ztunnel's namespace (`Node` metadata `NAMESPACE`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,

    /// This ztunnel's pod IP (`Node` metadata `INSTANCE_IPS`); unset, the
    /// `Node` carries Istio's placeholder 1.1.1.1.
    #[arg(long, env = "INSTANCE_IP")]
    pub instance_ip: Option<IpAddr>,

    /// The cluster's id (`Node` metadata `CLUSTER_ID`).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Mesh root namespace: policies there apply mesh-wide.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = "ambit-system")]
    pub root_namespace: String,

    /// Local state file (workloads, services, policies as YAML), polled for
    /// changes. Exactly one of --state-file and --xds-address.
    #[arg(long, env = "AMBIT_STATE_FILE")]
    pub state_file: Option<PathBuf>,

    /// The controller's xDS endpoint (e.g. https://10.0.0.200:15012): state
    /// comes from delta xDS instead of a file.
    #[arg(long, env = "AMBIT_XDS_ADDRESS")]
    pub xds_address: Option<String>,

    /// The controller's CA endpoint: workload certificates come from it
    /// instead of a development CA. Exactly one of --ca-address and --ca-cert/--ca-key.
    #[arg(long, env = "AMBIT_CA_ADDRESS")]
    pub ca_address: Option<String>,

    /// PEM root certificate of the mesh: verifies the controller's serving
    /// certificate (with --xds-address / --ca-address).
    #[arg(long, env = "AMBIT_MESH_ROOT")]
    pub mesh_root: Option<PathBuf>,

    /// File holding the bearer token presented to the controller.
    #[arg(long, env = "AMBIT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Name the controller's serving certificate must carry.
    #[arg(long, env = "AMBIT_CONTROLLER_SERVER_NAME", default_value = "ambit-controller.ambit-system.svc")]
    pub controller_server_name: String,

    /// How often the state file is checked for changes, in milliseconds.
    #[arg(long, env = "AMBIT_STATE_POLL_MS", default_value_t = 250)]
    pub state_poll_ms: u64,

    /// Development CA: PEM root certificate. With --ca-key, ztunnel signs its
    /// workloads' certificates itself (development mode; the controller's CA
    /// replaces it in production).
    #[arg(long, env = "AMBIT_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// Development CA: PEM private key of --ca-cert.
    #[arg(long, env = "AMBIT_CA_KEY")]
    pub ca_key: Option<PathBuf>,

    /// Lifetime of workload certificates, in seconds; rotated at half-life.
    #[arg(long, env = "AMBIT_CERT_TTL_SECS", default_value_t = 86_400)]
    pub cert_ttl_secs: u64,

    /// Unix socket of the CNI node agent (ZDS), to which ztunnel connects.
    #[arg(long, env = "AMBIT_ZDS_SOCKET", default_value = "/var/run/ztunnel/ztunnel.sock")]
    pub zds_socket: PathBuf,

    /// Admin endpoint (config dump, log level). Keep it on loopback.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics endpoint.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Mark set (SO_MARK) on sockets ztunnel opens in pods; capture skips it.
    #[arg(long, env = "AMBIT_SOCKET_MARK", default_value_t = DEFAULT_SOCKET_MARK)]
    pub socket_mark: u32,

    /// bpffs directory of the node agent's eBPF capture: a pod captured with eBPF has a listener map there,
    /// where ztunnel puts its in-pod plaintext listener; pods captured with nftables have none.
    #[arg(long, env = "AMBIT_BPF_PIN_ROOT", default_value = ambit_ebpf::DEFAULT_PIN_ROOT)]
    pub bpf_pin_root: PathBuf,

    /// Most concurrent streams on one pooled HBONE connection before another is opened.
    #[arg(long, env = "AMBIT_POOL_MAX_STREAMS", default_value_t = 100)]
    pub pool_max_streams: usize,

    /// Connections per (source, destination) pair over which concurrent
    /// streams are spread before they share one. Default: one per worker.
    #[arg(long, env = "AMBIT_POOL_MAX_CONNECTIONS", default_value_t = 2)]
    pub pool_max_connections: usize,

    /// Pooled HBONE connections idle this long (seconds) are closed.
    #[arg(long, env = "AMBIT_POOL_IDLE_SECS", default_value_t = 60)]
    pub pool_idle_secs: u64,

    /// Timeout for connecting to an upstream (ztunnel or application), in milliseconds.
    #[arg(long, env = "AMBIT_CONNECT_TIMEOUT_MS", default_value_t = 5_000)]
    pub connect_timeout_ms: u64,

    /// Data-plane worker threads, each a single-threaded runtime that runs
    /// the connections it is given from start to end. One per core the
    /// proxy may use.
    #[arg(long, env = "AMBIT_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// After moving bytes, a worker keeps polling its sockets this long (in
    /// microseconds) before it sleeps, so the answer to a request it just
    /// forwarded does not have to wake a sleeping core. Costs up to that much
    /// CPU per burst of traffic, only while there is traffic; 0 disables it
    /// (do so when ztunnel runs under a CPU limit).
    #[arg(long, env = "AMBIT_BUSY_POLL_US", default_value_t = 50)]
    pub busy_poll_us: u64,

    /// TCP congestion control for HBONE connections, the ones ztunnel opens
    /// and the ones it accepts (for example `cubic`). Default: the node's
    /// (`net.ipv4.tcp_congestion_control`). A pod's side of a veth has no
    /// queueing discipline, so BBR paces every connection there with a timer
    /// per packet burst; where BBR is the node default, `cubic` spares
    /// ztunnel that cost (see the README's benchmark).
    #[arg(long, env = "AMBIT_HBONE_CONGESTION_CONTROL")]
    pub hbone_congestion_control: Option<String>,

    /// On SIGTERM, how long open connections may finish before ztunnel exits
    /// (`25s`, `500ms`, `2m`; a bare number is seconds). Listeners close at
    /// once, so a replacement ztunnel takes the new connections; keep it under
    /// the pod's terminationGracePeriodSeconds. A second signal exits at once.
    #[arg(long, env = "AMBIT_DRAIN_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Log format: `plain` or `json`.
    #[arg(long, env = "AMBIT_LOG_FORMAT", default_value = "plain")]
    pub log_format: LogFormat,

    /// Access logs: a line at info level (target `access`) when each
    /// connection opens and closes; `false` turns them off.
    #[arg(long, env = "AMBIT_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// Validated configuration, passed down read-only. Serialisable for the
/// admin config dump (it holds no secrets: key *paths* only).
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub node_name: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ip: Option<IpAddr>,
    pub cluster_id: String,
    pub trust_domain: String,
    pub root_namespace: String,
    pub state: StateSource,
    pub state_poll_interval: Duration,
    pub certificates: CertificateSource,
    pub controller: Option<ControllerConnection>,
    pub cert_ttl: Duration,
    pub zds_socket: PathBuf,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub socket_mark: u32,
    pub bpf_pin_root: PathBuf,
    pub pool_max_streams: usize,
    pub pool_max_connections: usize,
    pub pool_idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub worker_threads: usize,
    pub busy_poll: Duration,
    pub hbone_congestion_control: Option<String>,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    pub access_log: bool,
}

/// Where the mesh state comes from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateSource {
    /// A local YAML file, polled.
    File(PathBuf),
    /// The controller's delta xDS.
    Xds(String),
}

/// Who signs workload certificates.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateSource {
    /// Development mode: a root key on disk, signing in-process.
    LocalCa { cert: PathBuf, key: PathBuf },
    /// The controller's CA service.
    CaService(String),
}

/// How to reach and trust the controller (xDS and CA).
#[derive(Debug, Clone, Serialize)]
pub struct ControllerConnection {
    pub mesh_root: PathBuf,
    pub token_file: PathBuf,
    pub server_name: String,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("give exactly one of --state-file and --xds-address")]
    StateSource,
    #[error("give exactly one of --ca-address and the pair --ca-cert, --ca-key")]
    CertificateSource,
    #[error("--xds-address and --ca-address need --mesh-root and --token-file")]
    ControllerTrust,
    #[error("--node-name must not be empty")]
    EmptyNodeName,
    #[error("--trust-domain {0:?} is not a valid trust domain (lowercase letters, digits, '.', '-', '_')")]
    BadTrustDomain(String),
    #[error("--cert-ttl-secs must be at least 60, got {0}")]
    CertTtlTooShort(u64),
    #[error("--socket-mark must be non-zero")]
    ZeroSocketMark,
    #[error("--pool-max-streams must be between 1 and 10000, got {0}")]
    BadPoolMaxStreams(usize),
    #[error("--pool-max-connections must be between 1 and 64, got {0}")]
    BadPoolMaxConnections(usize),
    #[error("--busy-poll-us must be at most 1000, got {0}")]
    BadBusyPoll(u64),
    #[error(
        "--hbone-congestion-control must be a kernel congestion control name (1-15 letters, digits or _), got {0:?}"
    )]
    BadCongestionControl(String),
    #[error("--worker-threads must be between 1 and 64, got {0}")]
    BadWorkerThreads(usize),
    #[error("--state-poll-ms must be between 10 and 60000, got {0}")]
    BadPollInterval(u64),
    #[error("--drain-timeout must be at most 1h, got {0:?}")]
    BadDrainTimeout(Duration),
}

/// Longest drain accepted: a pod's grace period is seconds to minutes.
const MAX_DRAIN: Duration = Duration::from_secs(3600);

/// Parses `25s`, `500ms`, `2m` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a duration like 25s, 500ms or 2m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

impl Config {
    /// Builds the configuration from parsed flags (pure: no I/O).
    pub fn from_args(a: Args) -> Result<Config, ConfigError> {
        let state = match (a.state_file, a.xds_address) {
            (Some(f), None) => StateSource::File(f),
            (None, Some(x)) => StateSource::Xds(x),
            _ => return Err(ConfigError::StateSource),
        };
        let certificates = match (a.ca_address, a.ca_cert, a.ca_key) {
            (Some(addr), None, None) => CertificateSource::CaService(addr),
            (None, Some(cert), Some(key)) => CertificateSource::LocalCa { cert, key },
            _ => return Err(ConfigError::CertificateSource),
        };
        let needs_controller =
            matches!(state, StateSource::Xds(_)) || matches!(certificates, CertificateSource::CaService(_));
        let controller = match (needs_controller, a.mesh_root, a.token_file) {
            (false, _, _) => None,
            (true, Some(mesh_root), Some(token_file)) => {
                Some(ControllerConnection { mesh_root, token_file, server_name: a.controller_server_name })
            }
            (true, _, _) => return Err(ConfigError::ControllerTrust),
        };
        Ok(Config {
            node_name: a.node_name,
            pod_name: a.pod_name,
            pod_namespace: a.pod_namespace,
            instance_ip: a.instance_ip,
            cluster_id: a.cluster_id,
            trust_domain: a.trust_domain,
            root_namespace: a.root_namespace,
            state,
            state_poll_interval: Duration::from_millis(a.state_poll_ms),
            certificates,
            controller,
            cert_ttl: Duration::from_secs(a.cert_ttl_secs),
            zds_socket: a.zds_socket,
            admin_addr: a.admin_addr,
            metrics_addr: a.metrics_addr,
            readiness_addr: a.readiness_addr,
            socket_mark: a.socket_mark,
            bpf_pin_root: a.bpf_pin_root,
            pool_max_streams: a.pool_max_streams,
            pool_max_connections: a.pool_max_connections,
            pool_idle_timeout: Duration::from_secs(a.pool_idle_secs),
            connect_timeout: Duration::from_millis(a.connect_timeout_ms),
            worker_threads: a.worker_threads,
            busy_poll: Duration::from_micros(a.busy_poll_us),
            hbone_congestion_control: a.hbone_congestion_control,
            drain_timeout: a.drain_timeout,
            log_format: a.log_format,
            access_log: a.access_log,
        })
    }

    /// Checks values that flags' types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.trim().is_empty() {
            return Err(ConfigError::EmptyNodeName);
        }
        if ambit_identity::spiffe::validate_trust_domain(&self.trust_domain).is_err() {
            return Err(ConfigError::BadTrustDomain(self.trust_domain.clone()));
        }
        if self.cert_ttl < Duration::from_secs(60) {
            return Err(ConfigError::CertTtlTooShort(self.cert_ttl.as_secs()));
        }
        if self.socket_mark == 0 {
            return Err(ConfigError::ZeroSocketMark);
        }
        if !(1..=10_000).contains(&self.pool_max_streams) {
            return Err(ConfigError::BadPoolMaxStreams(self.pool_max_streams));
        }
        if !(1..=64).contains(&self.pool_max_connections) {
            return Err(ConfigError::BadPoolMaxConnections(self.pool_max_connections));
        }
        if !(1..=64).contains(&self.worker_threads) {
            return Err(ConfigError::BadWorkerThreads(self.worker_threads));
        }
        if self.busy_poll > MAX_BUSY_POLL {
            return Err(ConfigError::BadBusyPoll(self.busy_poll.as_micros() as u64));
        }
        if let Some(name) = &self.hbone_congestion_control {
            // The kernel's names: up to 15 characters (TCP_CA_NAME_MAX).
            let valid = (1..=15).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(ConfigError::BadCongestionControl(name.clone()));
            }
        }
        if self.drain_timeout > MAX_DRAIN {
            return Err(ConfigError::BadDrainTimeout(self.drain_timeout));
        }
        let poll = self.state_poll_interval.as_millis() as u64;
        if !(10..=60_000).contains(&poll) {
            return Err(ConfigError::BadPollInterval(poll));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec![
            "ztunnel",
            "--node-name",
            "n1",
            "--state-file",
            "/tmp/s.yaml",
            "--ca-cert",
            "/tmp/ca.pem",
            "--ca-key",
            "/tmp/ca.key",
        ];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).expect("flags parse")
    }

    #[test]
    fn defaults_follow_the_documented_ports() {
        let c = Config::from_args(args(&[])).unwrap();
        assert_eq!(c.admin_addr.port(), 15000);
        assert_eq!(c.metrics_addr.port(), 15020);
        assert_eq!(c.readiness_addr.port(), 15021);
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn a_bad_trust_domain_is_refused_with_its_value() {
        let c = Config::from_args(args(&["--trust-domain", "Bad Domain"])).unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("\"Bad Domain\""), "{err}");
    }

    #[test]
    fn a_certificate_lifetime_under_a_minute_is_refused() {
        let c = Config::from_args(args(&["--cert-ttl-secs", "5"])).unwrap();
        assert_eq!(c.validate(), Err(ConfigError::CertTtlTooShort(5)));
    }

    #[test]
    fn busy_polling_is_on_by_default_and_bounded() {
        let c = Config::from_args(args(&[])).unwrap();
        assert_eq!(c.busy_poll, Duration::from_micros(50));
        let off = Config::from_args(args(&["--busy-poll-us", "0"])).unwrap();
        assert_eq!(off.validate(), Ok(()));
        let long = Config::from_args(args(&["--busy-poll-us", "5000"])).unwrap();
        assert_eq!(long.validate(), Err(ConfigError::BadBusyPoll(5000)));
    }

    #[test]
    fn the_hbone_congestion_control_is_the_nodes_unless_named() {
        assert_eq!(Config::from_args(args(&[])).unwrap().hbone_congestion_control, None);
        let cubic = Config::from_args(args(&["--hbone-congestion-control", "cubic"])).unwrap();
        assert_eq!((cubic.hbone_congestion_control.as_deref(), cubic.validate()), (Some("cubic"), Ok(())));
        for bad in ["", "bbr;rm", "a_name_longer_than_15"] {
            let c = Config::from_args(args(&["--hbone-congestion-control", bad])).unwrap();
            assert_eq!(c.validate(), Err(ConfigError::BadCongestionControl(bad.into())), "{bad:?}");
        }
    }

    #[test]
    fn the_drain_timeout_defaults_to_25s_and_reads_units() {
        assert_eq!(Config::from_args(args(&[])).unwrap().drain_timeout, Duration::from_secs(25));
        for (text, want) in
            [("500ms", Duration::from_millis(500)), ("2m", Duration::from_secs(120)), ("7", Duration::from_secs(7))]
        {
            assert_eq!(Config::from_args(args(&["--drain-timeout", text])).unwrap().drain_timeout, want, "{text}");
        }
        assert!(Args::try_parse_from(["ztunnel", "--node-name", "n", "--drain-timeout", "5h"]).is_err());
        assert!(Args::try_parse_from(["ztunnel", "--node-name", "n", "--drain-timeout", "soon"]).is_err());
        let long = Config::from_args(args(&["--drain-timeout", "61m"])).unwrap();
        assert_eq!(long.validate(), Err(ConfigError::BadDrainTimeout(Duration::from_secs(3660))));
    }

    #[test]
    fn a_missing_required_flag_is_a_parse_error() {
        assert!(Args::try_parse_from(["ztunnel"]).is_err());
    }

    #[test]
    fn state_and_certificates_come_from_exactly_one_place() {
        let both = args(&["--xds-address", "https://c:15012"]);
        assert_eq!(Config::from_args(both).unwrap_err(), ConfigError::StateSource);
        let half_ca =
            Args::try_parse_from(["ztunnel", "--node-name", "n", "--state-file", "s", "--ca-cert", "c"]).unwrap();
        assert_eq!(Config::from_args(half_ca).unwrap_err(), ConfigError::CertificateSource);
        let untrusted =
            Args::try_parse_from(["ztunnel", "--node-name", "n", "--xds-address", "x", "--ca-address", "x"]).unwrap();
        assert_eq!(Config::from_args(untrusted).unwrap_err(), ConfigError::ControllerTrust);
        let ok = Args::try_parse_from([
            "ztunnel",
            "--node-name",
            "n",
            "--xds-address",
            "https://c:15012",
            "--ca-address",
            "https://c:15012",
            "--mesh-root",
            "/r.pem",
            "--token-file",
            "/t",
        ])
        .unwrap();
        let c = Config::from_args(ok).unwrap();
        assert!(matches!(c.state, StateSource::Xds(_)) && matches!(c.certificates, CertificateSource::CaService(_)));
        assert_eq!(c.controller.unwrap().server_name, "ambit-controller.ambit-system.svc");
    }
}
