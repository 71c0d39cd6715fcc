//! The waypoint's whole configuration at one moment: what the data path reads.
//!
//! A [`Snapshot`] is built from every resource the controller sent
//! ([`Resources`]: `istio.workload.Address`, `ambit.waypoint.v1.ServiceRoutes`
//! and `ambit.waypoint.v1.AuthorizationPolicy`), is immutable, and is swapped
//! whole behind an `Arc` ([`SnapshotHandle`]): a request reads one consistent
//! configuration from start to end, and a change never waits for requests.
//!
//! It answers the data path's questions:
//! - which service (and port configuration) an HBONE `:authority` targets —
//!   [`Snapshot::served`] by VIP:port, [`Snapshot::served_by_hostname`];
//! - where a backend service's endpoints are, with the SPIFFE identity their
//!   ztunnel must present — [`Snapshot::endpoints`], [`Endpoint::target`];
//! - the L7 authorization policies as received — [`Snapshot::policies`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ambit_api::waypoint as pb;
use ambit_api::workload::{self as wl, address};
use ambit_identity::Identity;
use tokio::sync::watch;

use super::convert::{self, PortConfig, Problem, ServiceConfig};
use crate::target::ServiceTarget;

/// Every resource received, by xDS name, as decoded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    /// `istio.workload.Address` by name (`namespace/hostname` for a service,
    /// the uid for a workload).
    pub addresses: BTreeMap<String, wl::Address>,
    /// `ambit.waypoint.v1.ServiceRoutes` by `namespace/hostname`.
    pub service_routes: BTreeMap<String, pb::ServiceRoutes>,
    /// `ambit.waypoint.v1.AuthorizationPolicy` by `namespace/name`.
    pub policies: BTreeMap<String, pb::AuthorizationPolicy>,
}

/// A port of a service's Address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    /// `None`: a named targetPort, resolved per endpoint.
    pub target_port: Option<u16>,
}

/// A service, from its `istio.workload.Address`.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// Its VIPs (cluster IPs).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Identities its endpoints may present besides their own (SANs).
    pub subject_alt_names: Vec<String>,
    /// `load_balancing.health_policy: ALLOW_ALL`: unhealthy endpoints are used
    /// too (else only healthy ones are).
    pub allow_unhealthy: bool,
}

impl Service {
    /// `namespace/hostname`, the Address name.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// How a workload is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// HBONE to its node's ztunnel (port 15008), `:authority` = pod IP:port.
    Hbone,
    /// Not in the mesh: plain TCP to the pod.
    None,
}

/// A workload (pod), from its `istio.workload.Address`.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub addresses: Vec<IpAddr>,
    /// What its ztunnel presents for it (the destination's expected peer).
    pub identity: Identity,
    pub node: String,
    pub healthy: bool,
    pub tunnel: Tunnel,
    /// For metrics labels.
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    pub cluster_id: String,
    /// Services it backs: `namespace/hostname` → (service port, target port).
    pub services: BTreeMap<String, Vec<(u16, u16)>>,
}

/// One workload behind a service.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    /// The address traffic goes to (the workload's first).
    pub address: IpAddr,
    /// Service port → the workload's port (resolved: the workload's own
    /// mapping, else the service's numeric targetPort).
    ports: Vec<(u16, u16)>,
}

impl Endpoint {
    /// Where a request to `service_port` of the service goes on this
    /// endpoint (the HBONE `:authority`), or `None` when it does not serve
    /// that port (a named targetPort it does not define).
    pub fn target(&self, service_port: u16) -> Option<SocketAddr> {
        let (_, t) = self.ports.iter().find(|(p, _)| *p == service_port)?;
        Some(SocketAddr::new(self.address, *t))
    }

    /// The identity the endpoint's ztunnel must present.
    pub fn identity(&self) -> &Identity {
        &self.workload.identity
    }
}

/// A service known to the waypoint: its Address, its endpoints and, when
/// the waypoint serves it, its routes.
#[derive(Debug)]
pub struct ServiceEntry {
    pub service: Service,
    /// Usable endpoints (healthy, or any with `allow_unhealthy`), ordered by
    /// workload uid.
    pub endpoints: Vec<Endpoint>,
    /// Present when the waypoint serves this service (a `ServiceRoutes`).
    pub routes: Option<ServiceConfig>,
}

/// A served service port: what a request to it is handled with.
#[derive(Clone, Copy, Debug)]
pub struct Served<'a> {
    pub service: &'a ServiceEntry,
    pub port: &'a PortConfig,
}

/// What could not be taken into a snapshot; the rest applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildReport {
    /// Routes, ports, mirrors left out of `ServiceRoutes`.
    pub routes: Vec<Problem>,
    /// Addresses left out, with why.
    pub addresses: Vec<String>,
}

/// The configuration of the waypoint at one moment. Immutable.
#[derive(Debug, Default)]
pub struct Snapshot {
    version: u64,
    services: HashMap<String, Arc<ServiceEntry>>,
    by_vip: HashMap<IpAddr, Arc<ServiceEntry>>,
    by_hostname: HashMap<String, Arc<ServiceEntry>>,
    workloads: BTreeMap<String, Arc<Workload>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    policies: BTreeMap<String, pb::AuthorizationPolicy>,
    report: BuildReport,
}

impl Snapshot {
    /// Builds a snapshot from everything received; `trust_domain` is used
    /// for workloads that carry none. `version` only labels it (logs, dump).
    pub fn build(resources: &Resources, trust_domain: &str, version: u64) -> Snapshot {
        let mut report = BuildReport::default();
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        let mut workloads = BTreeMap::new();
        for (name, a) in &resources.addresses {
            match &a.r#type {
                Some(address::Type::Service(s)) => match service(s) {
                    Ok(s) => {
                        services.insert(s.key(), s);
                    }
                    Err(e) => report.addresses.push(format!("service {name}: {e}")),
                },
                Some(address::Type::Workload(w)) => match workload(w, trust_domain) {
                    Ok(w) => {
                        workloads.insert(w.uid.clone(), Arc::new(w));
                    }
                    Err(e) => report.addresses.push(format!("workload {name}: {e}")),
                },
                None => report.addresses.push(format!("address {name}: neither a workload nor a service")),
            }
        }
        // Services served without an Address (not expected from the
        // controller) can still be reached by hostname.
        for sr in resources.service_routes.values() {
            let key = format!("{}/{}", sr.namespace, sr.hostname);
            services.entry(key).or_insert_with(|| Service {
                name: sr.name.clone(),
                namespace: sr.namespace.clone(),
                hostname: sr.hostname.clone(),
                vips: Vec::new(),
                ports: Vec::new(),
                subject_alt_names: Vec::new(),
                allow_unhealthy: false,
            });
        }
        let mut endpoints: HashMap<&str, Vec<Endpoint>> = HashMap::new();
        for w in workloads.values() {
            let Some(&address) = w.addresses.first() else { continue };
            for (key, ports) in &w.services {
                let Some(svc) = services.get(key) else { continue };
                if !w.healthy && !svc.allow_unhealthy {
                    continue;
                }
                let resolved = svc
                    .ports
                    .iter()
                    .filter_map(|sp| {
                        let own = ports.iter().find(|(p, t)| *p == sp.port && *t != 0).map(|(_, t)| *t);
                        own.or(sp.target_port).map(|t| (sp.port, t))
                    })
                    .collect();
                endpoints.entry(key.as_str()).or_default().push(Endpoint {
                    workload: w.clone(),
                    address,
                    ports: resolved,
                });
            }
        }
        let mut routes: HashMap<String, ServiceConfig> = HashMap::new();
        for sr in resources.service_routes.values() {
            let (config, problems) = convert::service_routes(sr);
            report.routes.extend(problems);
            routes.insert(config.key(), config);
        }
        let mut snapshot = Snapshot { version, policies: resources.policies.clone(), ..Snapshot::default() };
        for (key, service) in services {
            let entry = Arc::new(ServiceEntry {
                endpoints: endpoints.remove(key.as_str()).unwrap_or_default(),
                routes: routes.remove(&key),
                service,
            });
            for vip in &entry.service.vips {
                snapshot.by_vip.insert(*vip, entry.clone());
            }
            snapshot.by_hostname.insert(entry.service.hostname.clone(), entry.clone());
            snapshot.services.insert(key, entry);
        }
        for w in workloads.values() {
            for ip in &w.addresses {
                snapshot.by_ip.insert(*ip, w.clone());
            }
        }
        snapshot.workloads = workloads;
        snapshot.report = report;
        snapshot
    }

    /// The label given to [`Snapshot::build`].
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The served service port an HBONE `:authority` of a service VIP:port
    /// names; `None` when the waypoint does not serve it (refuse it).
    pub fn served(&self, target: SocketAddr) -> Option<Served<'_>> {
        served(self.by_vip.get(&target.ip())?, target.port())
    }

    /// As [`Snapshot::served`], by hostname (`<name>.<ns>.svc.<suffix>`).
    pub fn served_by_hostname(&self, hostname: &str, port: u16) -> Option<Served<'_>> {
        served(self.by_hostname.get(hostname)?, port)
    }

    /// A service by its Address name `namespace/hostname`.
    pub fn service(&self, key: &str) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }

    /// Every service known (served ones and backends).
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    /// The usable endpoints of a route's backend; empty (503) when the
    /// service is unknown or has none. Use [`Endpoint::target`] with
    /// `target.port` for the address to call.
    pub fn endpoints(&self, target: &ServiceTarget) -> &[Endpoint] {
        let key = format!("{}/{}", target.namespace, target.hostname);
        self.services.get(&key).map_or(&[], |e| &e.endpoints)
    }

    /// A workload by one of its IPs.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// Every workload, by uid.
    pub fn workloads(&self) -> &BTreeMap<String, Arc<Workload>> {
        &self.workloads
    }

    /// The L7 authorization policies, by `namespace/name`, as received.
    pub fn policies(&self) -> &BTreeMap<String, pb::AuthorizationPolicy> {
        &self.policies
    }

    /// What was left out of this snapshot.
    pub fn report(&self) -> &BuildReport {
        &self.report
    }
}

fn served(entry: &ServiceEntry, port: u16) -> Option<Served<'_>> {
    let port = entry.routes.as_ref()?.port(port)?;
    Some(Served { service: entry, port })
}

fn ip(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).expect("4 bytes")))),
        16 => Ok(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes")))),
        n => Err(format!("an address of {n} bytes")),
    }
}

fn port(p: u32, what: &str) -> Result<u16, String> {
    u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| format!("{what} {p} out of range 1-65535"))
}

fn service(s: &wl::Service) -> Result<Service, String> {
    let vips = s.addresses.iter().map(|a| ip(&a.address)).collect::<Result<_, _>>()?;
    let ports = s
        .ports
        .iter()
        .map(|p| {
            let target_port = match p.target_port {
                0 => None,
                t => Some(port(t, "targetPort")?),
            };
            Ok(ServicePort { port: port(p.service_port, "port")?, target_port })
        })
        .collect::<Result<_, String>>()?;
    let allow_unhealthy =
        s.load_balancing.as_ref().is_some_and(|lb| lb.health_policy() == wl::load_balancing::HealthPolicy::AllowAll);
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports,
        subject_alt_names: s.subject_alt_names.clone(),
        allow_unhealthy,
    })
}

fn workload(w: &wl::Workload, trust_domain: &str) -> Result<Workload, String> {
    if w.uid.is_empty() {
        return Err("no uid".into());
    }
    let addresses = w.addresses.iter().map(|a| ip(a)).collect::<Result<_, _>>()?;
    let td = if w.trust_domain.is_empty() { trust_domain } else { &w.trust_domain };
    let sa = if w.service_account.is_empty() { "default" } else { &w.service_account };
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        let ports = list
            .ports
            .iter()
            .map(|p| {
                let target = if p.target_port == 0 { 0 } else { port(p.target_port, "targetPort")? };
                Ok((port(p.service_port, "service port")?, target))
            })
            .collect::<Result<_, String>>()?;
        services.insert(key.clone(), ports);
    }
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses,
        identity: Identity::new(td, &w.namespace, sa),
        node: w.node.clone(),
        healthy: w.status() == wl::WorkloadStatus::Healthy,
        tunnel: if w.tunnel_protocol() == wl::TunnelProtocol::Hbone { Tunnel::Hbone } else { Tunnel::None },
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_name: w.workload_name.clone(),
        cluster_id: w.cluster_id.clone(),
        services,
    })
}

/// Where the current snapshot is read and changes are watched. Cheap to
/// clone; one per task is fine.
#[derive(Clone, Debug)]
pub struct SnapshotHandle(watch::Receiver<Arc<Snapshot>>);

impl SnapshotHandle {
    /// The snapshot in force now; hold it for the whole request.
    pub fn current(&self) -> Arc<Snapshot> {
        self.0.borrow().clone()
    }

    /// Waits for the next snapshot and returns it; `None` once the
    /// configuration client is gone (the last snapshot stays readable).
    pub async fn changed(&mut self) -> Option<Arc<Snapshot>> {
        self.0.changed().await.ok()?;
        Some(self.0.borrow_and_update().clone())
    }
}

/// Swaps snapshots in: held by the configuration client.
#[derive(Debug)]
pub struct SnapshotPublisher(watch::Sender<Arc<Snapshot>>);

impl SnapshotPublisher {
    /// Starts with an empty snapshot (nothing served: every target refused).
    pub fn new() -> SnapshotPublisher {
        SnapshotPublisher(watch::Sender::new(Arc::new(Snapshot::default())))
    }

    /// A reader of the snapshots.
    pub fn handle(&self) -> SnapshotHandle {
        SnapshotHandle(self.0.subscribe())
    }

    /// Makes `snapshot` the current one.
    pub fn publish(&self, snapshot: Snapshot) {
        self.0.send_replace(Arc::new(snapshot));
    }
}

impl Default for SnapshotPublisher {
    fn default() -> Self {
        SnapshotPublisher::new()
    }
}

#[cfg(test)]
#[path = "snapshot_tests.rs"]
mod tests;
