//! The waypoint's command line. Every flag has an environment variable: the
//! Deployment the controller writes sets `POD_NAME`, `POD_NAMESPACE`,
//! `INSTANCE_IP`, `SERVICE_ACCOUNT`, `WAYPOINT_NAME` and `XDS_ADDRESS`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ambit_identity::Identity;
use clap::Parser;

use crate::trace::OtlpProtocol;

/// Ambit's waypoint: the per-namespace L7 proxy of the ambient mesh.
#[derive(Clone, Debug, Parser)]
#[command(name = "ambit-waypoint", version)]
pub struct Flags {
    /// The controller's xDS and CA endpoint (e.g. https://10.96.0.20:15012).
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: String,

    /// PEM root certificate of the mesh: verifies the controller's serving
    /// certificate (the ConfigMap `ambit-ca-root-cert`).
    #[arg(long, env = "AMBIT_MESH_ROOT", default_value = "/var/run/secrets/ambit/root-cert.pem")]
    pub mesh_root: PathBuf,

    /// Name the controller's serving certificate must carry.
    #[arg(long, env = "AMBIT_CONTROLLER_SERVER_NAME", default_value = "ambit-controller.ambit-system.svc")]
    pub controller_server_name: String,

    /// The waypoint's own service-account token, presented to the
    /// controller (xDS and CA); read again at every call (the kubelet
    /// rotates projected tokens).
    #[arg(long, env = "AMBIT_TOKEN_FILE", default_value = "/var/run/secrets/tokens/ambit-ca-token")]
    pub token_file: PathBuf,

    /// This pod's name.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,

    /// This pod's namespace (the waypoint Gateway's).
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: String,

    /// This pod's IP: HBONE tunnels to endpoints leave from it.
    #[arg(long, env = "INSTANCE_IP")]
    pub instance_ip: IpAddr,

    /// The service account the pod runs as: its SPIFFE identity.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    pub service_account: String,

    /// The waypoint Gateway's name (defaults to the service account's, as
    /// the controller names them alike).
    #[arg(long, env = "WAYPOINT_NAME")]
    pub waypoint_name: Option<String>,

    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// HBONE listener (mutual TLS, HTTP/2 CONNECT).
    #[arg(long, env = "AMBIT_HBONE_ADDR", default_value = "0.0.0.0:15008")]
    pub hbone_addr: SocketAddr,

    /// Admin endpoint (`/config_dump`, `/logging`); keep it on loopback.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics (`/metrics`, `/stats/prometheus`).
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness (`/healthz/ready`): 200 once the configuration arrived and
    /// the certificate was issued.
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Lifetime of the waypoint's certificate, in seconds; rotated at half-life.
    #[arg(long, env = "AMBIT_CERT_TTL_SECS", default_value_t = 86_400)]
    pub cert_ttl_secs: u64,

    /// Tunnels one pooled HBONE connection to an endpoint carries.
    #[arg(long, env = "AMBIT_POOL_MAX_STREAMS", default_value_t = 100)]
    pub pool_max_streams: usize,

    /// Pooled connections (HBONE and HTTP) idle this long are closed, in seconds.
    #[arg(long, env = "AMBIT_POOL_IDLE_SECS", default_value_t = 60)]
    pub pool_idle_secs: u64,

    /// TCP connect timeout towards endpoints, in milliseconds.
    #[arg(long, env = "AMBIT_CONNECT_TIMEOUT_MS", default_value_t = 5_000)]
    pub connect_timeout_ms: u64,

    /// How many proxies in front of the waypoint are trusted to have appended
    /// to `X-Forwarded-For` (Envoy's `xff_num_trusted_hops`, Istio's
    /// `numTrustedProxies`): `remoteIpBlocks` and `remote.ip` use the address
    /// this many entries from the right. 0 (the default): the peer's address,
    /// which a client cannot forge.
    #[arg(long, env = "AMBIT_XFF_NUM_TRUSTED_HOPS", default_value_t = 0)]
    pub xff_num_trusted_hops: u32,

    /// On SIGTERM, how long open connections may finish (in seconds) before
    /// the waypoint exits: it stops accepting, turns not-ready, sends GOAWAY
    /// on its HBONE connections and closes HTTP connections after their
    /// current request.
    #[arg(long, env = "AMBIT_DRAIN_TIMEOUT_SECS", default_value_t = 25)]
    pub drain_timeout_secs: u64,

    /// Threads that run connections. 1 (the default) runs everything on one
    /// thread, which measured about 40 % less CPU per request than a
    /// two-thread pool on a 2-core node (no cross-thread wake-ups); raise it
    /// where one core is not enough, or run more replicas.
    #[arg(long, env = "AMBIT_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,

    /// Mirror copies (VirtualService `mirror`, HTTPRoute `RequestMirror`)
    /// in flight at once; each waits at most 30 s for its answer. A copy
    /// over the bound is not sent, and counted in
    /// `ambit_waypoint_mirror_dropped_total` (Envoy's default circuit
    /// breaker bounds its shadow requests at 1024 alike).
    #[arg(long, env = "AMBIT_MAX_MIRROR_REQUESTS", default_value_t = 1024)]
    pub max_mirror_requests: usize,

    /// Log format: `plain` or `json`.
    #[arg(long, env = "AMBIT_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,

    /// One access-log line per request at info level.
    #[arg(long, env = "AMBIT_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,

    /// OpenTelemetry collector the waypoint sends its spans to (OTLP), as a
    /// plain-text `http://host:port` URL: e.g. `http://otel-collector.observability:4317`
    /// for gRPC, `:4318` for HTTP (which adds `/v1/traces` to a URL without
    /// a path). Absent (the default): no tracing, and no cost.
    #[arg(long, env = "AMBIT_TRACING_ENDPOINT")]
    pub tracing_endpoint: Option<String>,

    /// OTLP transport for `--tracing-endpoint`: `grpc` or `http` (protobuf).
    #[arg(long, env = "AMBIT_TRACING_PROTOCOL", value_enum, default_value = "grpc")]
    pub tracing_protocol: OtlpProtocol,

    /// Percent (0 to 100) of the requests that start a trace to sample, as
    /// Istio's `sampling` (default 1); a request that carries a sampling
    /// decision (W3C `traceparent`, B3) keeps it.
    #[arg(long, env = "AMBIT_TRACING_SAMPLING", default_value_t = 1.0, value_parser = percent)]
    pub tracing_sampling: f64,
}

fn percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

impl Flags {
    /// The waypoint's SPIFFE identity.
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.pod_namespace, &self.service_account)
    }

    /// The Gateway this waypoint implements.
    pub fn gateway_name(&self) -> &str {
        self.waypoint_name.as_deref().unwrap_or(&self.service_account)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn pool_idle(&self) -> Duration {
        Duration::from_secs(self.pool_idle_secs)
    }
}
