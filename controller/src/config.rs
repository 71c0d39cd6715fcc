//! The controller's configuration: flags and environment variables built
//! into a plain [`Config`] by a pure function and validated once at start.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;

/// Flags and environment variables, each with a documented default.
#[derive(Debug, Clone, Parser)]
#[command(name = "ambit-controller", version, about = "Ambit's control plane: delta xDS and the certificate authority")]
pub struct Args {
    /// Read the cluster from this directory of Kubernetes YAML (multi-document
    /// files, Pods with status.podIP and spec.nodeName) instead of an API
    /// server, and watch it for changes.
    #[arg(long, env = "AMBIT_CONFIG_DIR")]
    pub config_dir: PathBuf,

    /// How often the config directory is checked for changes, in milliseconds.
    #[arg(long, env = "AMBIT_CONFIG_POLL_MS", default_value_t = 500)]
    pub config_poll_ms: u64,

    /// xDS and CA over TLS.
    #[arg(long, env = "AMBIT_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// Plaintext xDS and CA (still token-authenticated). Off unless set; use
    /// only on a trusted network.
    #[arg(long, env = "AMBIT_PLAINTEXT_LISTEN")]
    pub plaintext_listen: Option<SocketAddr>,

    /// Where the mesh root (root-cert.pem, root-key.pem) is loaded from, or
    /// generated and saved on first start.
    #[arg(long, env = "AMBIT_CA_DIR", default_value = "/var/lib/ambit/ca")]
    pub ca_dir: PathBuf,

    /// File with the bootstrap token callers must present (file mode).
    #[arg(long, env = "AMBIT_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: PathBuf,

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

    /// Prometheus metrics endpoint.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    pub metrics_addr: SocketAddr,
}

/// Validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub config_dir: PathBuf,
    pub config_poll: Duration,
    pub listen: SocketAddr,
    pub plaintext_listen: Option<SocketAddr>,
    pub ca_dir: PathBuf,
    pub bootstrap_token_file: PathBuf,
    pub cert_max_ttl: Duration,
    pub serving_dns_names: Vec<String>,
    pub serving_ips: Vec<IpAddr>,
    pub trust_domain: String,
    pub root_namespace: String,
    pub cluster_id: String,
    pub domain_suffix: String,
    pub metrics_addr: SocketAddr,
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
            cert_max_ttl: Duration::from_secs(a.cert_max_ttl_secs),
            serving_dns_names: a.serving_dns_names.into_iter().filter(|s| !s.trim().is_empty()).collect(),
            serving_ips: a.serving_ips,
            trust_domain: a.trust_domain,
            root_namespace: a.root_namespace,
            cluster_id: a.cluster_id,
            domain_suffix: a.domain_suffix,
            metrics_addr: a.metrics_addr,
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Config {
        let mut v = vec!["ambit-controller", "--config-dir", "/tmp/c", "--bootstrap-token-file", "/tmp/t"];
        v.extend_from_slice(extra);
        Config::from_args(Args::try_parse_from(v).expect("flags parse"))
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
}
