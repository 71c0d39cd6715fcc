//! The local state file: the mesh as YAML, for running without a control
//! plane. Field names are camelCase; unknown fields are errors (with line and
//! column). Example, with every field and its default:
//!
//! ```yaml
//! workloads:
//! - uid: lab/Pod/default/client          # required, unique
//!   name: client
//!   namespace: default
//!   addresses: [10.1.0.2]                # each IP belongs to one workload
//!   node: node1
//!   network: ""
//!   serviceAccount: client               # default "default"
//!   trustDomain: cluster.local           # default: ztunnel's trust domain
//!   protocol: HBONE                      # HBONE = captured, reached through HBONE; NONE = plain TCP (default NONE)
//!   status: Healthy                      # Healthy | Unhealthy (default Healthy)
//!   canonicalName: client                # telemetry: canonical service, app label
//!   canonicalRevision: v1                # telemetry: canonical revision, version label
//!   workloadName: client                 # telemetry: owning workload, e.g. the Deployment
//!   workloadType: deployment             # deployment | cronjob | pod | job (default deployment)
//!   clusterId: Kubernetes                # telemetry: cluster label
//!   services:                            # services this workload backs: "namespace/hostname" -> port mappings
//!     default/echo.default.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]
//!   authorizationPolicies: [default/allow-client]   # selector-scoped policies that apply to it
//!   waypoint: {address: 10.1.0.9}        # traffic to this workload's own IP goes through this waypoint (none by default)
//! services:
//! - name: echo
//!   namespace: default
//!   hostname: echo.default.svc.cluster.local
//!   addresses: [10.96.0.10]              # VIPs; each belongs to one service
//!   ports: [{servicePort: 80, targetPort: 8080}]   # targetPort defaults to servicePort
//!   loadBalancing: RoundRobin            # RoundRobin | LeastConnections (default RoundRobin)
//!   waypoint:                            # traffic to the VIPs goes through this waypoint (none by default)
//!     hostname: waypoint.default.svc.cluster.local   # its service; or `address: <ip>` (and `network: <name>`)
//!     namespace: default                 # of that service (default: this object's namespace)
//!     hboneMtlsPort: 15008               # its HBONE port (default 15008)
//! policies:                              # istio.security.Authorization, as YAML
//! - name: allow-client
//!   namespace: default
//!   scope: WorkloadSelector              # Global | Namespace | WorkloadSelector (default Global)
//!   action: Allow                        # Allow | Deny (default Allow)
//!   rules:                               # OR-ed; no rules matches nothing
//!   - clauses:                           # AND-ed; no clauses matches everything
//!     - matches:                         # OR-ed
//!       - principals: [{exact: cluster.local/ns/default/sa/client}]  # Istio's form, no spiffe:// (with it works too)
//!         namespaces: [{prefix: team-}]  # exact | prefix | suffix | presence: {}
//!         serviceAccounts: [{namespace: default, serviceAccount: client}]
//!         sourceIps: [10.0.0.0/8]        # CIDRs; a bare address is a /32 or /128
//!         destinationIps: [10.1.0.3]
//!         destinationPorts: [8080]
//!         notPrincipals: [{presence: {}}]
//!         notNamespaces: [{suffix: -dev}]
//!         notServiceAccounts: []
//!         notSourceIps: [10.9.0.0/16]
//!         notDestinationIps: []
//!         notDestinationPorts: [15000]
//! peerAuthentications:                   # mTLS mode, namespace-wide or mesh-wide
//! - namespace: default                   # the mesh root namespace (LoadOptions::root_namespace) = mesh-wide
//!   mode: STRICT                         # STRICT | PERMISSIVE | UNSET (inherit)
//! ```

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hasher};
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use serde_yaml::with::singleton_map_recursive;

use super::convert::port;
use super::model::{
    Action, Authorization, Clause, GatewayAddress, GatewayDestination, HealthStatus, LoadBalancer, Match, PortMapping,
    Rule, Scope, Service, ServiceAccountMatch, StringMatch, TunnelProtocol, Workload, WorkloadType,
};
use super::peer_auth::{self, PeerAuthentication};
use super::{ProxyState, StateError};

/// Settings that complete a loaded state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Trust domain of workloads that name none.
    pub default_trust_domain: String,
    /// Namespace whose PeerAuthentication applies mesh-wide.
    pub root_namespace: String,
}

impl Default for LoadOptions {
    /// `cluster.local` and `ambit-system`.
    fn default() -> Self {
        LoadOptions { default_trust_domain: "cluster.local".into(), root_namespace: "ambit-system".into() }
    }
}

/// Parses and validates a state file's content (see the module docs).
pub fn parse_local_config(yaml: &str, opts: &LoadOptions) -> Result<ProxyState, StateError> {
    build(serde_yaml::from_str(yaml)?, opts)
}

/// A state file polled for changes.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    opts: LoadOptions,
    /// Hash of the content last read, parsed or not; `None` after a read error.
    last: Option<u64>,
}

impl StateFile {
    /// Watches `path`; the first `poll` loads it.
    pub fn new(path: impl Into<PathBuf>, opts: LoadOptions) -> Self {
        StateFile { path: path.into(), opts, last: None }
    }

    /// Polled by ztunnel: returns Some(new state) only when the file's content changed since the last successful or
    /// failed read (hash the bytes); a read or parse error is returned as Err and the caller keeps the previous state.
    pub fn poll(&mut self) -> Result<Option<ProxyState>, StateError> {
        let bytes = std::fs::read(&self.path).map_err(|source| {
            self.last = None;
            StateError::Read { path: self.path.display().to_string(), source }
        })?;
        let mut h = DefaultHasher::new();
        h.write(&bytes);
        let hash = h.finish();
        if self.last == Some(hash) {
            return Ok(None);
        }
        self.last = Some(hash);
        let content = bytes.split(|b| *b == b'\n').any(|l| {
            let l = l.trim_ascii();
            !l.is_empty() && !l.starts_with(b"#") && l != b"---"
        });
        if !content {
            return Err(StateError::Empty { path: self.path.display().to_string() });
        }
        build(serde_yaml::from_slice(&bytes)?, &self.opts).map(Some)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalConfig {
    #[serde(default)]
    workloads: Vec<LocalWorkload>,
    #[serde(default)]
    services: Vec<LocalService>,
    #[serde(default)]
    policies: Vec<LocalPolicy>,
    #[serde(default)]
    peer_authentications: Vec<PeerAuthentication>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalWorkload {
    uid: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    addresses: Vec<IpAddr>,
    #[serde(default)]
    node: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    trust_domain: String,
    #[serde(default)]
    protocol: LocalProtocol,
    #[serde(default)]
    status: LocalStatus,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    workload_type: LocalWorkloadType,
    #[serde(default)]
    cluster_id: String,
    #[serde(default)]
    services: BTreeMap<String, Vec<LocalPort>>,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    waypoint: Option<LocalWaypoint>,
}

/// A waypoint: exactly one of `address` and `hostname`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalWaypoint {
    #[serde(default)]
    address: Option<IpAddr>,
    #[serde(default)]
    network: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default = "default_hbone_mtls_port")]
    hbone_mtls_port: u32,
}

fn default_hbone_mtls_port() -> u32 {
    u32::from(ambit_hbone::HBONE_PORT)
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LocalWorkloadType {
    #[default]
    Deployment,
    CronJob,
    Pod,
    Job,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum LocalProtocol {
    #[default]
    None,
    Hbone,
}

#[derive(Default, Deserialize)]
enum LocalStatus {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalPort {
    service_port: u32,
    target_port: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalService {
    name: String,
    namespace: String,
    hostname: String,
    #[serde(default)]
    addresses: Vec<IpAddr>,
    #[serde(default)]
    ports: Vec<LocalPort>,
    #[serde(default)]
    load_balancing: LocalLoadBalancing,
    #[serde(default)]
    waypoint: Option<LocalWaypoint>,
}

#[derive(Default, Deserialize)]
enum LocalLoadBalancing {
    #[default]
    RoundRobin,
    LeastConnections,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalPolicy {
    name: String,
    namespace: String,
    #[serde(default)]
    scope: LocalScope,
    #[serde(default)]
    action: LocalAction,
    #[serde(default)]
    rules: Vec<LocalRule>,
    /// Evaluated and logged, never enforced.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Default, Deserialize)]
enum LocalScope {
    #[default]
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Default, Deserialize)]
enum LocalAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalRule {
    #[serde(default)]
    clauses: Vec<LocalClause>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalClause {
    #[serde(default)]
    matches: Vec<LocalMatch>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct LocalMatch {
    // serde_yaml reads enums as `!tag value` unless told to read `{tag: value}`.
    #[serde(deserialize_with = "singleton_map_recursive::deserialize")]
    namespaces: Vec<LocalStringMatch>,
    #[serde(deserialize_with = "singleton_map_recursive::deserialize")]
    not_namespaces: Vec<LocalStringMatch>,
    #[serde(deserialize_with = "singleton_map_recursive::deserialize")]
    principals: Vec<LocalStringMatch>,
    #[serde(deserialize_with = "singleton_map_recursive::deserialize")]
    not_principals: Vec<LocalStringMatch>,
    service_accounts: Vec<LocalServiceAccount>,
    not_service_accounts: Vec<LocalServiceAccount>,
    source_ips: Vec<Cidr>,
    not_source_ips: Vec<Cidr>,
    destination_ips: Vec<Cidr>,
    not_destination_ips: Vec<Cidr>,
    destination_ports: Vec<u32>,
    not_destination_ports: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum LocalStringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence {},
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalServiceAccount {
    namespace: String,
    service_account: String,
}

/// A CIDR, or a bare address meaning a single host.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct Cidr(IpNet);

/// A CIDR that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad CIDR {0:?}: expected an address with an optional /prefix length")]
struct BadCidr(String);

impl TryFrom<String> for Cidr {
    type Error = BadCidr;

    fn try_from(s: String) -> Result<Self, BadCidr> {
        match (s.parse::<IpNet>(), s.parse::<IpAddr>()) {
            (Ok(net), _) => Ok(Cidr(net)),
            (_, Ok(ip)) => Ok(Cidr(IpNet::from(ip))),
            _ => Err(BadCidr(s)),
        }
    }
}

fn ports(ps: Vec<LocalPort>, object: &str) -> Result<Vec<PortMapping>, StateError> {
    ps.into_iter()
        .map(|p| {
            let service_port = port(p.service_port, object, "servicePort")?;
            let target_port = match p.target_port {
                Some(t) => port(t, object, "targetPort")?,
                None => 0,
            };
            Ok(PortMapping { service_port, target_port })
        })
        .collect()
}

/// The waypoint of `object` (in namespace `ns`, the default of a hostname's).
fn waypoint(w: Option<LocalWaypoint>, object: &str, ns: &str) -> Result<Option<GatewayAddress>, StateError> {
    let Some(w) = w else { return Ok(None) };
    let destination = match (w.address, w.hostname) {
        (Some(ip), None) => GatewayDestination::Address { network: w.network, ip },
        (None, Some(hostname)) => {
            GatewayDestination::Hostname { namespace: w.namespace.unwrap_or_else(|| ns.to_owned()), hostname }
        }
        _ => return Err(StateError::WaypointDestination { object: object.to_owned() }),
    };
    let hbone_mtls_port = port(w.hbone_mtls_port, object, "waypoint.hboneMtlsPort")?;
    Ok(Some(GatewayAddress { destination, hbone_mtls_port }))
}

fn build(cfg: LocalConfig, opts: &LoadOptions) -> Result<ProxyState, StateError> {
    let mut workloads = Vec::with_capacity(cfg.workloads.len());
    for w in cfg.workloads {
        let object = format!("workload {}", w.uid);
        let services =
            w.services.into_iter().map(|(k, v)| Ok((k, ports(v, &object)?))).collect::<Result<_, StateError>>()?;
        let waypoint = waypoint(w.waypoint, &object, &w.namespace)?;
        workloads.push(Workload {
            waypoint,
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            addresses: w.addresses,
            node: w.node,
            network: w.network,
            protocol: match w.protocol {
                LocalProtocol::None => TunnelProtocol::None,
                LocalProtocol::Hbone => TunnelProtocol::Hbone,
            },
            trust_domain: w.trust_domain,
            service_account: w.service_account,
            status: match w.status {
                LocalStatus::Healthy => HealthStatus::Healthy,
                LocalStatus::Unhealthy => HealthStatus::Unhealthy,
            },
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            workload_name: w.workload_name,
            workload_type: match w.workload_type {
                LocalWorkloadType::Deployment => WorkloadType::Deployment,
                LocalWorkloadType::CronJob => WorkloadType::CronJob,
                LocalWorkloadType::Pod => WorkloadType::Pod,
                LocalWorkloadType::Job => WorkloadType::Job,
            },
            cluster_id: w.cluster_id,
            services,
            authorization_policies: w.authorization_policies,
        });
    }
    let mut services = Vec::with_capacity(cfg.services.len());
    for s in cfg.services {
        let object = format!("service {}/{}", s.namespace, s.hostname);
        services.push(Service {
            waypoint: waypoint(s.waypoint, &object, &s.namespace)?,
            ports: ports(s.ports, &object)?,
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips: s.addresses,
            load_balancer: match s.load_balancing {
                LocalLoadBalancing::RoundRobin => LoadBalancer::RoundRobin,
                LocalLoadBalancing::LeastConnections => LoadBalancer::LeastConnections,
            },
        });
    }
    let mut policies = cfg.policies.into_iter().map(policy).collect::<Result<Vec<_>, _>>()?;
    let namespaces = workloads
        .iter()
        .map(|w| w.namespace.as_str())
        .chain(services.iter().map(|s| s.namespace.as_str()))
        .chain(policies.iter().map(|p| p.namespace.as_str()))
        .chain([opts.root_namespace.as_str()]);
    let strict = peer_auth::compile(&cfg.peer_authentications, namespaces, &opts.root_namespace)?;
    policies.extend(strict);
    ProxyState::new(workloads, services, policies, &opts.default_trust_domain)
}

fn policy(p: LocalPolicy) -> Result<Authorization, StateError> {
    let object = format!("policy {}/{}", p.namespace, p.name);
    let strings = |v: Vec<LocalStringMatch>| -> Vec<StringMatch> {
        v.into_iter()
            .map(|s| match s {
                LocalStringMatch::Exact(v) => StringMatch::Exact(v),
                LocalStringMatch::Prefix(v) => StringMatch::Prefix(v),
                LocalStringMatch::Suffix(v) => StringMatch::Suffix(v),
                LocalStringMatch::Presence {} => StringMatch::Presence,
            })
            .collect()
    };
    let principals = |v| strings(v).into_iter().map(StringMatch::principal).collect();
    let service_accounts = |v: Vec<LocalServiceAccount>| {
        v.into_iter()
            .map(|s| ServiceAccountMatch { namespace: s.namespace, service_account: s.service_account })
            .collect()
    };
    let nets = |v: Vec<Cidr>| v.into_iter().map(|c| c.0).collect::<Vec<_>>();
    let port_list = |v: Vec<u32>, field| v.into_iter().map(|p| port(p, &object, field)).collect::<Result<Vec<_>, _>>();
    let mut rules = Vec::with_capacity(p.rules.len());
    for r in p.rules {
        let mut clauses = Vec::with_capacity(r.clauses.len());
        for c in r.clauses {
            let mut matches = Vec::with_capacity(c.matches.len());
            for m in c.matches {
                matches.push(Match {
                    namespaces: strings(m.namespaces),
                    not_namespaces: strings(m.not_namespaces),
                    principals: principals(m.principals),
                    not_principals: principals(m.not_principals),
                    service_accounts: service_accounts(m.service_accounts),
                    not_service_accounts: service_accounts(m.not_service_accounts),
                    source_ips: nets(m.source_ips),
                    not_source_ips: nets(m.not_source_ips),
                    destination_ips: nets(m.destination_ips),
                    not_destination_ips: nets(m.not_destination_ips),
                    destination_ports: port_list(m.destination_ports, "destinationPorts")?,
                    not_destination_ports: port_list(m.not_destination_ports, "notDestinationPorts")?,
                    unsupported: false,
                });
            }
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(Authorization {
        name: p.name,
        namespace: p.namespace,
        scope: match p.scope {
            LocalScope::Global => Scope::Global,
            LocalScope::Namespace => Scope::Namespace,
            LocalScope::WorkloadSelector => Scope::WorkloadSelector,
        },
        action: match p.action {
            LocalAction::Allow => Action::Allow,
            LocalAction::Deny => Action::Deny,
        },
        rules,
        dry_run: p.dry_run,
    })
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
