//! ztunnel's internal model of the mesh, shaped after Istio's workload API
//! (`istio.workload.Workload` / `Service`, `istio.security.Authorization`) so
//! that the local file and xDS feed the same types.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambit_identity::Identity;
use ipnet::IpNet;

/// Trust domain used by [`Workload::identity`] when a workload was built
/// without one and never went through [`super::ProxyState::new`].
pub const FALLBACK_TRUST_DOMAIN: &str = "cluster.local";
/// Service account of a workload that names none (Kubernetes' default).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// How a workload is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TunnelProtocol {
    /// Plain TCP: the workload is outside the mesh.
    #[default]
    None,
    /// Captured by a ztunnel: reached through HBONE on port 15008.
    Hbone,
}

/// Whether a workload may receive load-balanced traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthStatus {
    /// Ready to receive traffic.
    #[default]
    Healthy,
    /// Skipped by load balancing; still reachable when addressed directly.
    Unhealthy,
}

/// The kind of controller that owns a workload (Istio's `WorkloadType`);
/// names the workload in HBONE baggage (`k8s.<type>.name`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkloadType {
    /// Owned by a Deployment (the workload API's default).
    #[default]
    Deployment,
    /// Owned by a CronJob.
    CronJob,
    /// A bare pod, or one whose owner is none of the others.
    Pod,
    /// Owned by a Job.
    Job,
}

impl WorkloadType {
    /// The lower-case name Istio's baggage uses.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadType::Deployment => "deployment",
            WorkloadType::CronJob => "cronjob",
            WorkloadType::Pod => "pod",
            WorkloadType::Job => "job",
        }
    }
}

/// A service port and the port the backing workload listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMapping {
    /// Port clients connect to on the service VIP.
    pub service_port: u16,
    /// Port on the workload; 0 means "same as `service_port`".
    pub target_port: u16,
}

/// One pod, VM or other endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Primary key, unique in the mesh.
    pub uid: String,
    /// Name (for a pod, the pod's name).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// IPs the workload owns; each IP belongs to at most one workload.
    pub addresses: Vec<IpAddr>,
    /// Node the workload runs on.
    pub node: String,
    /// Network the addresses belong to (empty = the default network).
    pub network: String,
    /// How the workload is reached.
    pub protocol: TunnelProtocol,
    /// SPIFFE trust domain (empty until filled with the load-time default).
    pub trust_domain: String,
    /// Service account (empty means [`DEFAULT_SERVICE_ACCOUNT`]).
    pub service_account: String,
    /// Health, used by load balancing.
    pub status: HealthStatus,
    /// Canonical service name (telemetry).
    pub canonical_name: String,
    /// Canonical revision, e.g. `v1` (telemetry).
    pub canonical_revision: String,
    /// Owning workload's name, e.g. the Deployment (telemetry).
    pub workload_name: String,
    /// Kind of the owning workload (telemetry).
    pub workload_type: WorkloadType,
    /// Cluster the workload runs in (telemetry).
    pub cluster_id: String,
    /// Services this workload backs, keyed `namespace/hostname`.
    pub services: BTreeMap<String, Vec<PortMapping>>,
    /// Selector-scoped authorization policies (`namespace/name`) that apply to it.
    pub authorization_policies: Vec<String>,
    /// The waypoint that traffic addressed to this workload's own IP goes
    /// through (`istio.io/waypoint-for: workload` or `all`).
    pub waypoint: Option<GatewayAddress>,
}

impl Workload {
    /// Who this workload is, as HBONE's `baggage` header names it.
    pub fn baggage(&self) -> ambit_hbone::headers::BaggageWorkload<'_> {
        ambit_hbone::headers::BaggageWorkload {
            cluster_id: &self.cluster_id,
            namespace: &self.namespace,
            workload_type: self.workload_type.as_str(),
            workload_name: &self.workload_name,
            canonical_name: &self.canonical_name,
            canonical_revision: &self.canonical_revision,
        }
    }

    /// The workload's SPIFFE identity. An empty service account is `default`;
    /// an empty trust domain (only possible for a workload not loaded through
    /// [`super::ProxyState::new`]) is [`FALLBACK_TRUST_DOMAIN`].
    pub fn identity(&self) -> Identity {
        let or = |s: &str, d: &str| {
            if s.is_empty() {
                d.to_owned()
            } else {
                s.to_owned()
            }
        };
        Identity::new(
            or(&self.trust_domain, FALLBACK_TRUST_DOMAIN),
            self.namespace.clone(),
            or(&self.service_account, DEFAULT_SERVICE_ACCOUNT),
        )
    }
}

/// How a service spreads connections over its endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoadBalancer {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The endpoint with the fewest active connections (ties: round robin).
    LeastConnections,
}

/// A group of workloads reachable together through virtual IPs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Short name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Fully qualified host name, e.g. `echo.default.svc.cluster.local`.
    pub hostname: String,
    /// Virtual IPs; each VIP belongs to at most one service.
    pub vips: Vec<IpAddr>,
    /// Declared ports.
    pub ports: Vec<PortMapping>,
    /// Endpoint selection.
    pub load_balancer: LoadBalancer,
    /// The waypoint that traffic addressed to a VIP of this service goes
    /// through (`istio.io/waypoint-for: service` or `all`).
    pub waypoint: Option<GatewayAddress>,
}

impl Service {
    /// The service's key, `namespace/hostname`, as used in [`Workload::services`].
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// Where a waypoint is reached (Istio's `GatewayAddress`): connections to
/// the service or workload that names it are tunnelled to it instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayAddress {
    /// The waypoint itself.
    pub destination: GatewayDestination,
    /// Port of its HBONE (mutual TLS) listener, 15008 for waypoints.
    pub hbone_mtls_port: u16,
}

/// How a [`GatewayAddress`] names its waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayDestination {
    /// An IP (a waypoint workload's, or its service's VIP) on a network
    /// (empty = the default network).
    Address { network: String, ip: IpAddr },
    /// The waypoint's service, e.g. `waypoint.ns.svc.cluster.local` in `ns`,
    /// reached through one of its endpoints.
    Hostname { namespace: String, hostname: String },
}

impl GatewayDestination {
    /// The key of the service a hostname names (`namespace/hostname`).
    pub fn service_key(&self) -> Option<String> {
        match self {
            GatewayDestination::Hostname { namespace, hostname } => Some(format!("{namespace}/{hostname}")),
            GatewayDestination::Address { .. } => None,
        }
    }
}

impl std::fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.destination {
            GatewayDestination::Address { ip, .. } => {
                write!(f, "{}", std::net::SocketAddr::new(*ip, self.hbone_mtls_port))
            }
            GatewayDestination::Hostname { namespace, hostname } => {
                write!(f, "{namespace}/{hostname}:{}", self.hbone_mtls_port)
            }
        }
    }
}

/// Which workloads a policy applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every workload in the mesh.
    #[default]
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Workloads that list the policy in [`Workload::authorization_policies`].
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Action {
    /// Allow matching connections (and, if any ALLOW applies, deny the rest).
    #[default]
    Allow,
    /// Deny matching connections; takes precedence over ALLOW.
    Deny,
}

/// An L4 authorization policy (`istio.security.Authorization`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Authorization {
    /// Name, unique in its namespace.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Which workloads it applies to.
    pub scope: Scope,
    /// Allow or deny.
    pub action: Action,
    /// OR-ed: the policy matches when any rule matches; no rules matches nothing.
    pub rules: Vec<Rule>,
    /// Evaluated and logged, never enforced (Istio's `istio.io/dry-run`).
    pub dry_run: bool,
}

impl Authorization {
    /// The policy's key, `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// AND of clauses; a rule with no clauses matches every connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// All must match.
    pub clauses: Vec<Clause>,
}

/// OR of matches; a clause without matches matches every connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clause {
    /// Any may match.
    pub matches: Vec<Match>,
}

/// Conditions on one connection: every non-empty positive field must match
/// (its values OR-ed) and no `not_*` field may match. A match with no field
/// set matches nothing, as in Istio's ztunnel. A match marked
/// [`Match::unsupported`] makes its whole rule fail closed instead.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    /// Source identity's namespace.
    pub namespaces: Vec<StringMatch>,
    /// Source identity's namespace, negated.
    pub not_namespaces: Vec<StringMatch>,
    /// Source identity as `<td>/ns/<ns>/sa/<sa>`, without the `spiffe://`
    /// scheme (as Istio writes principals); see [`StringMatch::principal`].
    pub principals: Vec<StringMatch>,
    /// Source identity without the scheme, negated.
    pub not_principals: Vec<StringMatch>,
    /// Source identity's namespace and service account.
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// Source identity's namespace and service account, negated.
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Source IP ranges.
    pub source_ips: Vec<IpNet>,
    /// Source IP ranges, negated.
    pub not_source_ips: Vec<IpNet>,
    /// Destination IP ranges.
    pub destination_ips: Vec<IpNet>,
    /// Destination IP ranges, negated.
    pub not_destination_ips: Vec<IpNet>,
    /// Destination ports.
    pub destination_ports: Vec<u16>,
    /// Destination ports, negated.
    pub not_destination_ports: Vec<u16>,
    /// The resource carried a condition ztunnel cannot evaluate (an
    /// extension, a string match of an unknown kind). The rule holding this
    /// match fails closed: in an ALLOW policy it never matches, in a DENY
    /// policy it always does.
    pub unsupported: bool,
}

impl Match {
    /// Whether no field is set (and nothing unsupported was dropped).
    pub fn is_empty(&self) -> bool {
        let Match {
            namespaces,
            not_namespaces,
            principals,
            not_principals,
            service_accounts,
            not_service_accounts,
            source_ips,
            not_source_ips,
            destination_ips,
            not_destination_ips,
            destination_ports,
            not_destination_ports,
            unsupported,
        } = self;
        !unsupported
            && namespaces.is_empty()
            && not_namespaces.is_empty()
            && principals.is_empty()
            && not_principals.is_empty()
            && service_accounts.is_empty()
            && not_service_accounts.is_empty()
            && source_ips.is_empty()
            && not_source_ips.is_empty()
            && destination_ips.is_empty()
            && not_destination_ips.is_empty()
            && destination_ports.is_empty()
            && not_destination_ports.is_empty()
    }
}

/// A Kubernetes service account: both parts must equal the peer identity's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountMatch {
    /// Namespace.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
}

/// A string condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    /// Equal to.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// The value exists at all (for principals: the peer has an identity).
    Presence,
}

/// The scheme of a SPIFFE ID, which principals are compared without.
pub const SPIFFE_SCHEME: &str = "spiffe://";

impl StringMatch {
    /// A principal pattern in the form it is compared in: without the
    /// `spiffe://` scheme, as Istio writes principals. Patterns written with
    /// the scheme (older Ambit controllers, state files) keep their meaning:
    /// an exact or prefix pattern loses the scheme, and a suffix that spells
    /// it pinned the whole ID, so it becomes an exact pattern.
    pub fn principal(self) -> StringMatch {
        match self {
            StringMatch::Exact(s) => StringMatch::Exact(strip_scheme(s)),
            StringMatch::Prefix(s) => StringMatch::Prefix(strip_scheme(s)),
            StringMatch::Suffix(s) if s.starts_with(SPIFFE_SCHEME) => StringMatch::Exact(strip_scheme(s)),
            m => m,
        }
    }
}

fn strip_scheme(s: String) -> String {
    match s.strip_prefix(SPIFFE_SCHEME) {
        Some(rest) => rest.to_owned(),
        None => s,
    }
}
