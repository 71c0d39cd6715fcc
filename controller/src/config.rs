//! The controller's configuration: flags and environment variables built
//! into a plain [`Config`] by a pure function and validated once at start.
//!
//! Two modes. With `--config-dir` the controller reads a directory of
//! Kubernetes YAML, keeps the root in `--ca-dir` and admits callers with the
//! per-node bootstrap tokens of `--bootstrap-tokens`, or the one shared token
//! of `--bootstrap-token-file` (file mode: the lab, the demo).
//! Without it, it watches the Kubernetes API (`--kubeconfig`, else in-cluster
//! credentials or `KUBECONFIG`), keeps the root in the Secret `ambit-ca-root`
//! of `--namespace`, admits ztunnels by TokenReview and deploys waypoints.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Serialize;

use crate::waypoints::WaypointSettings;

/// Where file mode keeps the root when `--ca-dir` is not given.
pub const DEFAULT_CA_DIR: &str = "/var/lib/ambit/ca";

/// Flags and environment variables, each with a documented default.
#[derive(Debug, Clone, Parser)]
#[command(name = "ambit-controller", version, about = "Ambit's control plane: delta xDS and the certificate authority")]
pub struct Args {
    /// File mode: read the cluster from this directory of Kubernetes YAML
    /// (multi-document files, Pods with status.podIP and spec.nodeName)
    /// instead of an API server, and watch it for changes. Without it the
    /// controller runs in Kubernetes mode.
    #[arg(long, env = "AMBIT_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,

    /// How often the config directory is checked for changes, in milliseconds (file mode).
    #[arg(long, env = "AMBIT_CONFIG_POLL_MS", default_value_t = 500)]
    pub config_poll_ms: u64,

    /// xDS and CA over TLS.
    #[arg(long, env = "AMBIT_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// Plaintext xDS and CA (still token-authenticated). Off unless set; use
    /// only on a trusted network.
    #[arg(long, env = "AMBIT_PLAINTEXT_LISTEN")]
    pub plaintext_listen: Option<SocketAddr>,

    /// File mode: where the mesh root (root-cert.pem, root-key.pem) is loaded
    /// from, or generated and saved on first start [default: /var/lib/ambit/ca].
    /// Kubernetes mode keeps it in the Secret ambit-ca-root instead.
    #[arg(long, env = "AMBIT_CA_DIR")]
    pub ca_dir: Option<PathBuf>,

    /// File mode: file with one bootstrap token shared by all callers. It
    /// proves no node: the CA serves only callers that also name their node
    /// (`x-ambit-node`). Exactly one of this and --bootstrap-tokens in file
    /// mode; refused in Kubernetes mode.
    #[arg(long, env = "AMBIT_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,

    /// File mode: file of per-node bootstrap tokens, one `<token> <node>` per
    /// line (`#` comments). A caller's node is its token's, so the CA scopes
    /// it to its node whatever it sends (an unmodified Istio ztunnel too).
    #[arg(long, env = "AMBIT_BOOTSTRAP_TOKENS")]
    pub bootstrap_tokens: Option<PathBuf>,

    /// File mode: file of workload tokens (waypoints), one `<token>
    /// <namespace>/<service-account>` per line (`#` comments). Such a caller
    /// gets only its own certificate and, over xDS, the configuration of the
    /// waypoint Gateway named after its service account (as a waypoint's own
    /// service-account token gives in Kubernetes mode).
    #[arg(long, env = "AMBIT_WORKLOAD_TOKENS")]
    pub workload_tokens: Option<PathBuf>,

    /// Longest workload certificate the CA signs, in seconds.
    #[arg(long, env = "AMBIT_CERT_MAX_TTL_SECS", default_value_t = 86_400)]
    pub cert_max_ttl_secs: u64,

    /// DNS names of the serving certificate (comma-separated).
    #[arg(
        long,
        env = "AMBIT_SERVING_DNS_NAMES",
        value_delimiter = ',',
        default_value = "ambit-controller.ambit-system.svc,localhost"
    )]
    pub serving_dns_names: Vec<String>,

    /// IP addresses of the serving certificate (comma-separated).
    #[arg(long, env = "AMBIT_SERVING_IPS", value_delimiter = ',', default_value = "127.0.0.1")]
    pub serving_ips: Vec<IpAddr>,

    /// SPIFFE trust domain.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Mesh root namespace: policies there apply mesh-wide.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = "ambit-system")]
    pub root_namespace: String,

    /// Cluster id, the first part of workload uids.
    #[arg(long, env = "AMBIT_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// Cluster DNS suffix of service hostnames.
    #[arg(long, env = "AMBIT_DOMAIN_SUFFIX", default_value = "cluster.local")]
    pub domain_suffix: String,

    /// Send Istio's implicit allow-from-waypoint policy (istiod's
    /// PILOT_AUTO_ALLOW_WAYPOINT_POLICY): a workload a waypoint serves admits
    /// the waypoint, and anyone else only as its other ALLOW policies say, so
    /// traffic that goes around the waypoint (straight to a pod) is refused.
    /// Off by default, as in Istio.
    #[arg(long, env = "AMBIT_AUTO_ALLOW_WAYPOINT_POLICY")]
    pub auto_allow_waypoint_policy: bool,

    /// Prometheus metrics endpoint.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    pub metrics_addr: SocketAddr,

    /// Kubernetes mode: kubeconfig to use (its current context). Default:
    /// in-cluster credentials, else $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "AMBIT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes mode: the controller's own namespace, where the root Secret
    /// ambit-ca-root and the ConfigMap ambit-ca-root-cert live.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ambit-system")]
    pub namespace: String,

    /// Kubernetes mode: audience the ztunnels' service-account tokens must be issued for.
    #[arg(long, env = "AMBIT_TOKEN_AUDIENCE", default_value = "ambit-ca")]
    pub token_audience: String,

    /// Kubernetes mode: service accounts (namespace/name, comma-separated)
    /// whose tokens may fetch xDS and certificates for their pod's node.
    #[arg(long, env = "AMBIT_ZTUNNEL_SERVICE_ACCOUNT", value_delimiter = ',', default_value = "ambit-system/ztunnel")]
    pub ztunnel_service_account: Vec<String>,

    /// Kubernetes mode: how long a TokenReview's admission is trusted, in seconds (0: review every call).
    #[arg(long, env = "AMBIT_TOKEN_CACHE_SECS", default_value_t = 60)]
    pub token_cache_secs: u64,

    /// Kubernetes mode: container image of the waypoint Deployments.
    #[arg(long, env = "AMBIT_WAYPOINT_IMAGE", default_value = "ghcr.io/ambit-mesh/waypoint:latest")]
    pub waypoint_image: String,

    /// Kubernetes mode: imagePullPolicy of the waypoints (empty: Kubernetes' default).
    #[arg(long, env = "AMBIT_WAYPOINT_IMAGE_PULL_POLICY", default_value = "")]
    pub waypoint_image_pull_policy: String,

    /// Kubernetes mode: replicas of each waypoint Deployment.
    #[arg(long, env = "AMBIT_WAYPOINT_REPLICAS", default_value_t = 1)]
    pub waypoint_replicas: i32,

    /// Kubernetes mode: CPU request of a waypoint (a Kubernetes quantity; empty: none).
    #[arg(long, env = "AMBIT_WAYPOINT_CPU_REQUEST", default_value = "100m")]
    pub waypoint_cpu_request: String,

    /// Kubernetes mode: memory request of a waypoint (empty: none).
    #[arg(long, env = "AMBIT_WAYPOINT_MEMORY_REQUEST", default_value = "128Mi")]
    pub waypoint_memory_request: String,

    /// Kubernetes mode: CPU limit of a waypoint (empty: none).
    #[arg(long, env = "AMBIT_WAYPOINT_CPU_LIMIT", default_value = "")]
    pub waypoint_cpu_limit: String,

    /// Kubernetes mode: memory limit of a waypoint (empty: none).
    #[arg(long, env = "AMBIT_WAYPOINT_MEMORY_LIMIT", default_value = "")]
    pub waypoint_memory_limit: String,

    /// Kubernetes mode: the controller's xDS/CA address (host:port) given to waypoints.
    #[arg(long, env = "AMBIT_WAYPOINT_XDS_ADDRESS", default_value = "ambit-controller.ambit-system.svc:15012")]
    pub waypoint_xds_address: String,
}

/// Validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub config_dir: Option<PathBuf>,
    pub config_poll: Duration,
    pub listen: SocketAddr,
    pub plaintext_listen: Option<SocketAddr>,
    pub ca_dir: Option<PathBuf>,
    pub bootstrap_token_file: Option<PathBuf>,
    pub bootstrap_tokens: Option<PathBuf>,
    pub workload_tokens: Option<PathBuf>,
    pub cert_max_ttl: Duration,
    pub serving_dns_names: Vec<String>,
    pub serving_ips: Vec<IpAddr>,
    pub trust_domain: String,
    pub root_namespace: String,
    pub cluster_id: String,
    pub domain_suffix: String,
    pub auto_allow_waypoint_policy: bool,
    pub metrics_addr: SocketAddr,
    pub kube: KubeConfig,
}

/// The Kubernetes mode's settings (ignored in file mode).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KubeConfig {
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub token_audience: String,
    /// As given: `namespace/name`.
    pub ztunnel_service_accounts: Vec<String>,
    pub token_cache: Duration,
    pub waypoint_image: String,
    pub waypoint_image_pull_policy: Option<String>,
    pub waypoint_replicas: i32,
    pub waypoint_cpu_request: Option<String>,
    pub waypoint_memory_request: Option<String>,
    pub waypoint_cpu_limit: Option<String>,
    pub waypoint_memory_limit: Option<String>,
    pub waypoint_xds_address: String,
}

/// How the controller runs, decided by [`Config::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode<'a> {
    /// A directory of YAML, a root in files, bootstrap tokens.
    File { config_dir: &'a Path, ca_dir: &'a Path, credentials: FileCredentials<'a> },
    /// The Kubernetes API, a root in a Secret, TokenReview.
    Kubernetes(&'a KubeConfig),
}

/// How file mode admits callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCredentials<'a> {
    /// `--bootstrap-token-file`: one token for all; the node is the one the caller names.
    SharedToken(&'a Path),
    /// `--bootstrap-tokens`: each token names its node.
    NodeTokens(&'a Path),
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--trust-domain {0:?} is not a valid trust domain")]
    BadTrustDomain(String),
    #[error("--cert-max-ttl-secs must be between 60 and 31536000, got {0}")]
    BadMaxTtl(u64),
    #[error("--config-poll-ms must be between 10 and 60000, got {0}")]
    BadPoll(u64),
    #[error("the serving certificate needs at least one --serving-dns-names or --serving-ips entry")]
    NoServingNames,
    #[error("file mode (--config-dir) needs --bootstrap-tokens (per-node tokens) or --bootstrap-token-file")]
    MissingBootstrapToken,
    #[error("give one of --bootstrap-tokens and --bootstrap-token-file, not both")]
    TwoBootstrapTokenKinds,
    #[error(
        "--bootstrap-token-file, --bootstrap-tokens and --workload-tokens are for file mode only: without \
         --config-dir the controller runs in Kubernetes mode and admits callers by TokenReview"
    )]
    BootstrapTokenInKubeMode,
    #[error("--{0} is for Kubernetes mode only (remove --config-dir to use it)")]
    KubeFlagInFileMode(&'static str),
    #[error("--ca-dir is for file mode only: Kubernetes mode keeps the root in the Secret ambit-ca-root")]
    CaDirInKubeMode,
    #[error("--namespace {0:?} is not a valid namespace name")]
    BadNamespace(String),
    #[error("--token-audience must not be empty")]
    EmptyAudience,
    #[error("--ztunnel-service-account {0:?} is not namespace/name")]
    BadServiceAccount(String),
    #[error("--waypoint-image must not be empty")]
    EmptyWaypointImage,
    #[error("--waypoint-replicas must be between 0 and 1000, got {0}")]
    BadReplicas(i32),
    #[error("--waypoint-{flag} {value:?} is not a Kubernetes quantity (like 100m, 0.5, 128Mi, 1G)")]
    BadQuantity { flag: &'static str, value: String },
    #[error("--waypoint-image-pull-policy must be Always, IfNotPresent or Never, got {0:?}")]
    BadPullPolicy(String),
    #[error("--waypoint-xds-address {0:?} is not host:port")]
    BadXdsAddress(String),
}

/// `None` for a flag left empty.
fn non_empty(s: String) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

impl Config {
    /// Builds the configuration from parsed flags (pure).
    pub fn from_args(a: Args) -> Config {
        Config {
            config_dir: a.config_dir,
            config_poll: Duration::from_millis(a.config_poll_ms),
            listen: a.listen,
            plaintext_listen: a.plaintext_listen,
            ca_dir: a.ca_dir,
            bootstrap_token_file: a.bootstrap_token_file,
            bootstrap_tokens: a.bootstrap_tokens,
            workload_tokens: a.workload_tokens,
            cert_max_ttl: Duration::from_secs(a.cert_max_ttl_secs),
            serving_dns_names: a.serving_dns_names.into_iter().filter(|s| !s.trim().is_empty()).collect(),
            serving_ips: a.serving_ips,
            trust_domain: a.trust_domain,
            root_namespace: a.root_namespace,
            cluster_id: a.cluster_id,
            domain_suffix: a.domain_suffix,
            auto_allow_waypoint_policy: a.auto_allow_waypoint_policy,
            metrics_addr: a.metrics_addr,
            kube: KubeConfig {
                kubeconfig: a.kubeconfig,
                namespace: a.namespace,
                token_audience: a.token_audience,
                ztunnel_service_accounts: a
                    .ztunnel_service_account
                    .into_iter()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
                token_cache: Duration::from_secs(a.token_cache_secs),
                waypoint_image: a.waypoint_image,
                waypoint_image_pull_policy: non_empty(a.waypoint_image_pull_policy),
                waypoint_replicas: a.waypoint_replicas,
                waypoint_cpu_request: non_empty(a.waypoint_cpu_request),
                waypoint_memory_request: non_empty(a.waypoint_memory_request),
                waypoint_cpu_limit: non_empty(a.waypoint_cpu_limit),
                waypoint_memory_limit: non_empty(a.waypoint_memory_limit),
                waypoint_xds_address: a.waypoint_xds_address,
            },
        }
    }

    /// The mode the flags select, or why they do not fit it.
    pub fn mode(&self) -> Result<Mode<'_>, ConfigError> {
        match &self.config_dir {
            Some(config_dir) => {
                if self.kube.kubeconfig.is_some() {
                    return Err(ConfigError::KubeFlagInFileMode("kubeconfig"));
                }
                let credentials = match (self.bootstrap_tokens.as_deref(), self.bootstrap_token_file.as_deref()) {
                    (Some(tokens), None) => FileCredentials::NodeTokens(tokens),
                    (None, Some(token)) => FileCredentials::SharedToken(token),
                    (Some(_), Some(_)) => return Err(ConfigError::TwoBootstrapTokenKinds),
                    (None, None) => return Err(ConfigError::MissingBootstrapToken),
                };
                let ca_dir = self.ca_dir.as_deref().unwrap_or(Path::new(DEFAULT_CA_DIR));
                Ok(Mode::File { config_dir, ca_dir, credentials })
            }
            None if self.bootstrap_token_file.is_some()
                || self.bootstrap_tokens.is_some()
                || self.workload_tokens.is_some() =>
            {
                Err(ConfigError::BootstrapTokenInKubeMode)
            }
            None if self.ca_dir.is_some() => Err(ConfigError::CaDirInKubeMode),
            None => Ok(Mode::Kubernetes(&self.kube)),
        }
    }

    /// Checks what flag types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if ambit_identity::spiffe::validate_trust_domain(&self.trust_domain).is_err() {
            return Err(ConfigError::BadTrustDomain(self.trust_domain.clone()));
        }
        let ttl = self.cert_max_ttl.as_secs();
        if !(60..=31_536_000).contains(&ttl) {
            return Err(ConfigError::BadMaxTtl(ttl));
        }
        let poll = self.config_poll.as_millis() as u64;
        if !(10..=60_000).contains(&poll) {
            return Err(ConfigError::BadPoll(poll));
        }
        if self.serving_dns_names.is_empty() && self.serving_ips.is_empty() {
            return Err(ConfigError::NoServingNames);
        }
        match self.mode()? {
            Mode::File { .. } => Ok(()),
            Mode::Kubernetes(kube) => kube.validate(),
        }
    }
}

impl KubeConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !is_dns_label(&self.namespace) {
            return Err(ConfigError::BadNamespace(self.namespace.clone()));
        }
        if self.token_audience.trim().is_empty() {
            return Err(ConfigError::EmptyAudience);
        }
        if self.ztunnel_service_accounts.is_empty() {
            return Err(ConfigError::BadServiceAccount(String::new()));
        }
        for sa in &self.ztunnel_service_accounts {
            service_account_user(sa)?;
        }
        if self.waypoint_image.trim().is_empty() {
            return Err(ConfigError::EmptyWaypointImage);
        }
        if !(0..=1000).contains(&self.waypoint_replicas) {
            return Err(ConfigError::BadReplicas(self.waypoint_replicas));
        }
        if let Some(p) = &self.waypoint_image_pull_policy {
            if !["Always", "IfNotPresent", "Never"].contains(&p.as_str()) {
                return Err(ConfigError::BadPullPolicy(p.clone()));
            }
        }
        for (flag, value) in [
            ("cpu-request", &self.waypoint_cpu_request),
            ("memory-request", &self.waypoint_memory_request),
            ("cpu-limit", &self.waypoint_cpu_limit),
            ("memory-limit", &self.waypoint_memory_limit),
        ] {
            if let Some(v) = value.as_deref().filter(|v| !is_quantity(v)) {
                return Err(ConfigError::BadQuantity { flag, value: v.to_owned() });
            }
        }
        let addr = &self.waypoint_xds_address;
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok || addr.contains("://") {
            return Err(ConfigError::BadXdsAddress(addr.clone()));
        }
        Ok(())
    }

    /// The Kubernetes users (`system:serviceaccount:<ns>:<name>`) whose tokens are admitted.
    pub fn allowed_users(&self) -> Result<Vec<String>, ConfigError> {
        self.ztunnel_service_accounts.iter().map(|sa| service_account_user(sa)).collect()
    }

    /// The waypoint Deployments' settings.
    pub fn waypoint_settings(&self) -> WaypointSettings {
        WaypointSettings {
            image: self.waypoint_image.clone(),
            image_pull_policy: self.waypoint_image_pull_policy.clone(),
            replicas: self.waypoint_replicas,
            cpu_request: self.waypoint_cpu_request.clone(),
            memory_request: self.waypoint_memory_request.clone(),
            cpu_limit: self.waypoint_cpu_limit.clone(),
            memory_limit: self.waypoint_memory_limit.clone(),
            xds_address: Some(self.waypoint_xds_address.clone()),
            token_audience: self.token_audience.clone(),
        }
    }
}

/// `namespace/name` as the Kubernetes user of that service account.
fn service_account_user(sa: &str) -> Result<String, ConfigError> {
    match sa.split_once('/') {
        Some((ns, name)) if is_dns_label(ns) && is_dns_subdomain(name) => {
            Ok(format!("system:serviceaccount:{ns}:{name}"))
        }
        _ => Err(ConfigError::BadServiceAccount(sa.to_owned())),
    }
}

/// An RFC 1123 label: what namespace names are.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// An RFC 1123 subdomain: what service account names are.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A Kubernetes resource quantity: a decimal number, then an optional binary
/// (Ki..Ei) or decimal (n, u, m, k, M..E) suffix, or an exponent (1e3).
fn is_quantity(s: &str) -> bool {
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty()
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit())
        && !number.ends_with('.');
    let suffix_ok = matches!(
        suffix,
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    number_ok && suffix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_parse(args: &[&str]) -> Config {
        let mut v = vec!["ambit-controller"];
        v.extend_from_slice(args);
        Config::from_args(Args::try_parse_from(v).expect("flags parse"))
    }

    fn parse(extra: &[&str]) -> Config {
        let mut v = vec!["--config-dir", "/tmp/c", "--bootstrap-token-file", "/tmp/t"];
        v.extend_from_slice(extra);
        try_parse(&v)
    }

    #[test]
    fn defaults_serve_tls_on_15012_and_no_plaintext() {
        let c = parse(&[]);
        assert_eq!(c.listen.port(), 15012);
        assert_eq!(c.plaintext_listen, None);
        assert_eq!(c.serving_dns_names, vec!["ambit-controller.ambit-system.svc", "localhost"]);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn a_bad_trust_domain_and_a_tiny_ttl_are_refused() {
        assert!(matches!(parse(&["--trust-domain", "Not Valid"]).validate(), Err(ConfigError::BadTrustDomain(_))));
        assert_eq!(parse(&["--cert-max-ttl-secs", "5"]).validate(), Err(ConfigError::BadMaxTtl(5)));
    }

    #[test]
    fn a_config_dir_selects_file_mode_with_the_default_ca_dir() {
        let c = parse(&[]);
        assert_eq!(
            c.mode(),
            Ok(Mode::File {
                config_dir: Path::new("/tmp/c"),
                ca_dir: Path::new(DEFAULT_CA_DIR),
                credentials: FileCredentials::SharedToken(Path::new("/tmp/t")),
            })
        );
        let c = try_parse(&["--config-dir", "/tmp/c", "--bootstrap-tokens", "/tmp/nt"]);
        assert!(
            matches!(c.mode(), Ok(Mode::File { credentials: FileCredentials::NodeTokens(p), .. }) if p == Path::new("/tmp/nt"))
        );
        let c = parse(&["--ca-dir", "/tmp/ca"]);
        assert!(matches!(c.mode(), Ok(Mode::File { ca_dir, .. }) if ca_dir == Path::new("/tmp/ca")));
    }

    #[test]
    fn file_mode_needs_the_bootstrap_token_and_refuses_a_kubeconfig() {
        let c = try_parse(&["--config-dir", "/tmp/c"]);
        assert_eq!(c.validate(), Err(ConfigError::MissingBootstrapToken));
        let c = parse(&["--kubeconfig", "/tmp/kc"]);
        assert_eq!(c.validate(), Err(ConfigError::KubeFlagInFileMode("kubeconfig")));
        let c = parse(&["--bootstrap-tokens", "/tmp/nt"]);
        assert_eq!(c.validate(), Err(ConfigError::TwoBootstrapTokenKinds));
    }

    #[test]
    fn without_a_config_dir_the_controller_runs_in_kubernetes_mode_with_documented_defaults() {
        let c = try_parse(&[]);
        assert_eq!(c.validate(), Ok(()));
        let Ok(Mode::Kubernetes(k)) = c.mode() else { panic!("{:?}", c.mode()) };
        assert_eq!(k.kubeconfig, None);
        assert_eq!(k.namespace, "ambit-system");
        assert_eq!(k.token_audience, "ambit-ca");
        assert_eq!(k.allowed_users(), Ok(vec![crate::ca::token_review::DEFAULT_ZTUNNEL_IDENTITY.to_owned()]));
        assert_eq!(k.token_cache, Duration::from_secs(60));
        let w = k.waypoint_settings();
        assert_eq!(w.image, WaypointSettings::default().image);
        assert_eq!(w.replicas, 1);
        assert_eq!((w.cpu_request.as_deref(), w.memory_request.as_deref()), (Some("100m"), Some("128Mi")));
        assert_eq!((w.cpu_limit, w.memory_limit, w.image_pull_policy), (None, None, None));
        assert_eq!(w.xds_address.as_deref(), Some("ambit-controller.ambit-system.svc:15012"));
    }

    #[test]
    fn kubernetes_mode_refuses_the_bootstrap_token_and_the_ca_dir() {
        let c = try_parse(&["--bootstrap-token-file", "/tmp/t"]);
        assert_eq!(c.validate(), Err(ConfigError::BootstrapTokenInKubeMode));
        assert!(ConfigError::BootstrapTokenInKubeMode.to_string().contains("Kubernetes mode"));
        let c = try_parse(&["--bootstrap-tokens", "/tmp/nt"]);
        assert_eq!(c.validate(), Err(ConfigError::BootstrapTokenInKubeMode));
        assert_eq!(try_parse(&["--ca-dir", "/tmp/ca"]).validate(), Err(ConfigError::CaDirInKubeMode));
        let c = try_parse(&["--workload-tokens", "/tmp/wt"]);
        assert_eq!(c.validate(), Err(ConfigError::BootstrapTokenInKubeMode), "TokenReview admits waypoints there");
    }

    #[test]
    fn file_mode_takes_workload_tokens_next_to_the_node_credentials() {
        let c = try_parse(&["--config-dir", "/tmp/c", "--bootstrap-tokens", "/tmp/nt", "--workload-tokens", "/tmp/wt"]);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.workload_tokens.as_deref(), Some(Path::new("/tmp/wt")));
        assert!(matches!(c.mode(), Ok(Mode::File { credentials: FileCredentials::NodeTokens(_), .. })));
    }

    #[test]
    fn kubernetes_flags_map_onto_the_authenticator_and_the_waypoint_settings() {
        let c = try_parse(&[
            "--kubeconfig=/tmp/kc",
            "--namespace=mesh-system",
            "--token-audience=istio-ca",
            "--ztunnel-service-account=mesh-system/ztunnel,other/zt",
            "--token-cache-secs=0",
            "--waypoint-image=registry.local/waypoint:1",
            "--waypoint-image-pull-policy=Never",
            "--waypoint-replicas=3",
            "--waypoint-cpu-request=0.5",
            "--waypoint-memory-request=256Mi",
            "--waypoint-cpu-limit=2",
            "--waypoint-memory-limit=1Gi",
            "--waypoint-xds-address=ctl.mesh-system.svc:15012",
        ]);
        assert_eq!(c.validate(), Ok(()));
        let k = &c.kube;
        assert_eq!(k.kubeconfig.as_deref(), Some(Path::new("/tmp/kc")));
        assert_eq!(k.namespace, "mesh-system");
        assert_eq!(
            k.allowed_users().unwrap(),
            ["system:serviceaccount:mesh-system:ztunnel", "system:serviceaccount:other:zt"]
        );
        assert_eq!(k.token_cache, Duration::ZERO);
        assert_eq!(
            k.waypoint_settings(),
            WaypointSettings {
                image: "registry.local/waypoint:1".into(),
                image_pull_policy: Some("Never".into()),
                replicas: 3,
                cpu_request: Some("0.5".into()),
                memory_request: Some("256Mi".into()),
                cpu_limit: Some("2".into()),
                memory_limit: Some("1Gi".into()),
                xds_address: Some("ctl.mesh-system.svc:15012".into()),
                token_audience: "istio-ca".into(),
            }
        );
        let none = try_parse(&["--waypoint-cpu-request=", "--waypoint-memory-request="]);
        assert_eq!(none.kube.waypoint_settings().cpu_request, None, "an empty flag means no request");
        assert_eq!(none.validate(), Ok(()));
    }

    #[test]
    fn bad_kubernetes_settings_are_refused_each_with_its_flag() {
        for (flag, want) in [
            ("--namespace=Ambit_System", "--namespace"),
            ("--token-audience= ", "--token-audience"),
            ("--ztunnel-service-account=ztunnel", "--ztunnel-service-account"),
            ("--ztunnel-service-account=ambit-system/", "--ztunnel-service-account"),
            ("--waypoint-image=", "--waypoint-image"),
            ("--waypoint-replicas=-1", "--waypoint-replicas"),
            ("--waypoint-cpu-request=lots", "--waypoint-cpu-request"),
            ("--waypoint-memory-limit=1GB", "--waypoint-memory-limit"),
            ("--waypoint-image-pull-policy=Sometimes", "--waypoint-image-pull-policy"),
            ("--waypoint-xds-address=ambit-controller", "--waypoint-xds-address"),
            ("--waypoint-xds-address=https://ctl:15012", "--waypoint-xds-address"),
        ] {
            let err = try_parse(&[flag]).validate().expect_err(flag);
            assert!(err.to_string().contains(want), "{flag}: {err} does not name {want}");
        }
    }

    #[test]
    fn quantities_follow_the_kubernetes_syntax() {
        for ok in ["1", "100m", "0.5", "128Mi", "1Gi", "2G", "1e3", "1E-2", "500u"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "1.", ".", "1.2.3", "1GB", "-1", "1 Gi", "1e", "lots"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
