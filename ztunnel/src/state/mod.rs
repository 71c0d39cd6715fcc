//! ztunnel's view of the mesh: workloads, services and L4 authorization
//! policies, indexed for the per-connection lookups of the proxy.
//!
//! A [`ProxyState`] is immutable once built (from the local file today, from
//! xDS next). [`SharedState`] holds the current one and swaps it on reload;
//! load-balancing cursors and connection counters live beside it, not in it,
//! so they survive reloads.

mod authz;
mod convert;
mod file;
mod lookup;
mod model;
mod peer_auth;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

pub use authz::{ConnectionAttributes, Denied};
pub use convert::ConvertError;
pub use file::{parse_local_config, LoadOptions, StateFile};
pub use lookup::{EndpointGuard, Upstream};
pub use model::*;
pub use peer_auth::{MtlsMode, PeerAuthentication, STATIC_STRICT_POLICY};

/// Why a state could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state file could not be read.
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// The file holds nothing (a truncated write, a wrong mount): never read as "no workloads".
    #[error("{path} is empty; keeping the previous state (write `workloads: []` to empty it on purpose)")]
    Empty { path: String },
    /// The YAML is malformed or has unknown fields (message carries line and column).
    #[error("parsing state: {0}")]
    Parse(#[from] serde_yaml::Error),
    /// A value could not be converted to the model.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// A workload has no uid.
    #[error("workload {name:?} in namespace {namespace:?} has no uid")]
    MissingUid { name: String, namespace: String },
    /// Two workloads share a uid.
    #[error("duplicate workload uid {0}")]
    DuplicateUid(String),
    /// An IP is claimed by two workloads.
    #[error("address {ip} is owned by both workload {first} and workload {second}")]
    DuplicateWorkloadIp { ip: IpAddr, first: String, second: String },
    /// Two services share `namespace/hostname`.
    #[error("duplicate service {0}")]
    DuplicateService(String),
    /// A VIP is claimed by two services.
    #[error("address {ip} is a VIP of both service {first} and service {second}")]
    DuplicateVip { ip: IpAddr, first: String, second: String },
    /// Two policies share `namespace/name`.
    #[error("duplicate policy {0}")]
    DuplicatePolicy(String),
    /// Two PeerAuthentications for one namespace.
    #[error("duplicate peer authentication for namespace {0}")]
    DuplicatePeerAuthentication(String),
    /// A state file's waypoint names both or neither of an address and a hostname.
    #[error("{object}: waypoint needs exactly one of address and hostname")]
    WaypointDestination { object: String },
    /// A port is 0 where one is required.
    #[error("{object}: port 0 is not a port (1-65535)")]
    ZeroPort { object: String },
}

/// One service with its precomputed endpoints.
#[derive(Debug)]
struct ServiceEntry {
    service: Arc<Service>,
    key: String,
    /// Healthy backing workloads that have an address, in load-balancing order.
    endpoints: Vec<Endpoint>,
}

/// A healthy workload backing a service.
#[derive(Debug)]
struct Endpoint {
    /// Index into `ProxyState::workloads`.
    workload: usize,
    /// The workload's own port mappings for this service.
    ports: Vec<PortMapping>,
}

/// An immutable, indexed snapshot of the mesh.
#[derive(Debug, Default)]
pub struct ProxyState {
    workloads: Vec<Arc<Workload>>,
    by_uid: HashMap<String, usize>,
    by_ip: HashMap<IpAddr, usize>,
    services: Vec<ServiceEntry>,
    by_vip: HashMap<IpAddr, usize>,
    by_service_key: HashMap<String, usize>,
    policies: Vec<Arc<Authorization>>,
    by_policy_key: HashMap<String, usize>,
    global_policies: Vec<usize>,
    namespace_policies: HashMap<String, Vec<usize>>,
}

impl ProxyState {
    /// Validates and indexes a mesh. Workloads with an empty trust domain get
    /// `default_trust_domain`; an empty service account becomes `default`.
    /// A workload may name services and policies that are not (yet) known.
    pub fn new(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<Authorization>,
        default_trust_domain: &str,
    ) -> Result<Self, StateError> {
        let mut st = ProxyState::default();
        for mut w in workloads {
            if w.uid.is_empty() {
                return Err(StateError::MissingUid { name: w.name, namespace: w.namespace });
            }
            if w.trust_domain.is_empty() {
                w.trust_domain = default_trust_domain.to_owned();
            }
            if w.service_account.is_empty() {
                w.service_account = DEFAULT_SERVICE_ACCOUNT.to_owned();
            }
            for ports in w.services.values() {
                check_ports(ports, || format!("workload {}", w.uid))?;
            }
            let idx = st.workloads.len();
            if st.by_uid.insert(w.uid.clone(), idx).is_some() {
                return Err(StateError::DuplicateUid(w.uid));
            }
            for ip in &w.addresses {
                if let Some(prev) = st.by_ip.insert(*ip, idx) {
                    let first = st.workloads[prev].uid.clone();
                    return Err(StateError::DuplicateWorkloadIp { ip: *ip, first, second: w.uid });
                }
            }
            st.workloads.push(Arc::new(w));
        }
        for s in services {
            let key = s.key();
            check_ports(&s.ports, || format!("service {key}"))?;
            let idx = st.services.len();
            if st.by_service_key.insert(key.clone(), idx).is_some() {
                return Err(StateError::DuplicateService(key));
            }
            for ip in &s.vips {
                if let Some(prev) = st.by_vip.insert(*ip, idx) {
                    let first = st.services[prev].key.clone();
                    return Err(StateError::DuplicateVip { ip: *ip, first, second: key });
                }
            }
            st.services.push(ServiceEntry { service: Arc::new(s), key, endpoints: Vec::new() });
        }
        for (widx, w) in st.workloads.iter().enumerate() {
            if w.status != HealthStatus::Healthy || w.addresses.is_empty() {
                continue;
            }
            for (key, ports) in &w.services {
                if let Some(&sidx) = st.by_service_key.get(key) {
                    st.services[sidx].endpoints.push(Endpoint { workload: widx, ports: ports.clone() });
                }
            }
        }
        for p in policies {
            let key = p.key();
            let zero_port = p
                .rules
                .iter()
                .flat_map(|r| &r.clauses)
                .flat_map(|c| &c.matches)
                .any(|m| m.destination_ports.contains(&0) || m.not_destination_ports.contains(&0));
            if zero_port {
                return Err(StateError::ZeroPort { object: format!("policy {key}") });
            }
            let idx = st.policies.len();
            if st.by_policy_key.insert(key.clone(), idx).is_some() {
                return Err(StateError::DuplicatePolicy(key));
            }
            match p.scope {
                Scope::Global => st.global_policies.push(idx),
                Scope::Namespace => st.namespace_policies.entry(p.namespace.clone()).or_default().push(idx),
                Scope::WorkloadSelector => {}
            }
            st.policies.push(Arc::new(p));
        }
        Ok(st)
    }

    /// The workload that owns `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip).map(|&i| &self.workloads[i])
    }

    /// The workload with this uid.
    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.by_uid.get(uid).map(|&i| &self.workloads[i])
    }

    /// The service that owns VIP `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip).map(|&i| &self.services[i].service)
    }

    /// The service with key `namespace/hostname`.
    pub fn service_by_key(&self, key: &str) -> Option<&Arc<Service>> {
        self.by_service_key.get(key).map(|&i| &self.services[i].service)
    }

    /// Healthy workloads backing the service `namespace/hostname`.
    pub fn endpoints(&self, service_key: &str) -> impl Iterator<Item = &Arc<Workload>> {
        let eps = self.by_service_key.get(service_key).map(|&i| self.services[i].endpoints.as_slice());
        eps.unwrap_or_default().iter().map(|e| &self.workloads[e.workload])
    }

    /// The policy with key `namespace/name`.
    pub fn policy(&self, key: &str) -> Option<&Arc<Authorization>> {
        self.by_policy_key.get(key).map(|&i| &self.policies[i])
    }

    /// All workloads, in load order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.iter()
    }

    /// All services, in load order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.iter().map(|s| &s.service)
    }

    /// All policies, in load order (compiled PeerAuthentications included).
    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.iter()
    }

    /// Whether [`ProxyState::authorize`] decides every connection in `other`
    /// as in `self`: it reads the policies and, of the destination workload,
    /// its namespace and the policies it lists, so those are compared (by
    /// content: every update builds new values). A workload in only one of
    /// the two counts as no change, since its connections are decided with
    /// the workload they were admitted to.
    pub fn same_authorization(&self, other: &ProxyState) -> bool {
        let same_policies = self.policies.len() == other.policies.len()
            && self.by_policy_key.iter().all(|(key, &i)| other.policy(key).is_some_and(|p| *p == self.policies[i]));
        same_policies
            && self.workloads.iter().all(|w| {
                other
                    .workload_by_uid(&w.uid)
                    .is_none_or(|o| o.namespace == w.namespace && o.authorization_policies == w.authorization_policies)
            })
    }
}

fn check_ports(ports: &[PortMapping], object: impl Fn() -> String) -> Result<(), StateError> {
    if ports.iter().any(|p| p.service_port == 0) {
        return Err(StateError::ZeroPort { object: object() });
    }
    Ok(())
}

/// The state and the counters that go with its indexes.
#[derive(Clone)]
struct Current {
    state: Arc<ProxyState>,
    counters: Arc<lookup::Counters>,
}

/// Shared, swappable state; readers take a cheap snapshot per connection.
pub struct SharedState {
    current: RwLock<Current>,
    /// The latest state, for those that act on changes.
    changes: watch::Sender<Arc<ProxyState>>,
}

impl SharedState {
    /// Starts with `state`.
    pub fn new(state: ProxyState) -> Self {
        let counters = Arc::new(lookup::Counters::carry_over(&state, None));
        let state = Arc::new(state);
        let (changes, _) = watch::channel(state.clone());
        SharedState { current: RwLock::new(Current { state, counters }), changes }
    }

    /// The latest state now, and each later one (intermediate states may be
    /// skipped when they follow each other quickly).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ProxyState>> {
        self.changes.subscribe()
    }

    fn current(&self) -> Current {
        // A poisoned lock still holds a consistent pair: writers only assign.
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current state; stays valid (and unchanged) after a `replace`.
    pub fn snapshot(&self) -> Arc<ProxyState> {
        self.current().state
    }

    /// Swaps in a new state, keeping round-robin cursors and connection counts
    /// of services and workloads that still exist.
    pub fn replace(&self, state: ProxyState) {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        let counters = Arc::new(lookup::Counters::carry_over(&state, Some((&cur.state, &cur.counters))));
        let state = Arc::new(state);
        *cur = Current { state: state.clone(), counters };
        // Under the lock, so subscribers see the states in the order they were swapped in.
        self.changes.send_replace(state);
    }

    /// Picks where an outbound connection from `src` to `dst` goes: a
    /// service VIP or workload IP that names a waypoint goes to that waypoint
    /// (unless `src` is the waypoint), else a service VIP is load-balanced
    /// over its healthy endpoints and a workload IP goes to that workload;
    /// anything else passes through.
    pub fn resolve(&self, src: IpAddr, dst: SocketAddr) -> Upstream {
        let cur = self.current();
        lookup::resolve(&cur.state, &cur.counters, src, dst)
    }

    /// Connections currently counted against workload `uid` (by live guards).
    pub fn active_connections(&self, uid: &str) -> usize {
        let cur = self.current();
        cur.state.by_uid.get(uid).map_or(0, |&i| cur.counters.active(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(uid: &str, ip: &str) -> Workload {
        Workload { uid: uid.into(), namespace: "ns".into(), addresses: vec![ip.parse().unwrap()], ..Default::default() }
    }

    #[test]
    fn workloads_are_indexed_by_uid_and_ip_with_defaults_filled() {
        let st = ProxyState::new(vec![w("a", "10.0.0.1"), w("b", "10.0.0.2")], vec![], vec![], "example.org").unwrap();
        let b = st.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(b.uid, "b");
        assert_eq!(b.trust_domain, "example.org");
        assert_eq!(b.service_account, "default");
        assert_eq!(st.workload_by_uid("a").unwrap().addresses[0], "10.0.0.1".parse::<IpAddr>().unwrap());
        assert!(st.workload_by_ip("10.0.0.3".parse().unwrap()).is_none());
    }

    #[test]
    fn an_ip_owned_by_two_workloads_is_an_error_naming_both() {
        let err = ProxyState::new(vec![w("a", "10.0.0.1"), w("b", "10.0.0.1")], vec![], vec![], "td").unwrap_err();
        assert_eq!(err.to_string(), "address 10.0.0.1 is owned by both workload a and workload b");
    }

    #[test]
    fn a_duplicate_uid_is_an_error() {
        let err = ProxyState::new(vec![w("a", "10.0.0.1"), w("a", "10.0.0.2")], vec![], vec![], "td").unwrap_err();
        assert!(matches!(err, StateError::DuplicateUid(u) if u == "a"));
    }

    #[test]
    fn a_vip_on_two_services_is_an_error() {
        let s = |name: &str| Service {
            name: name.into(),
            namespace: "ns".into(),
            hostname: format!("{name}.ns"),
            vips: vec!["10.96.0.1".parse().unwrap()],
            ..Default::default()
        };
        let err = ProxyState::new(vec![], vec![s("x"), s("y")], vec![], "td").unwrap_err();
        assert_eq!(err.to_string(), "address 10.96.0.1 is a VIP of both service ns/x.ns and service ns/y.ns");
    }

    #[test]
    fn same_authorization_compares_policies_by_content_and_the_policies_workloads_list() {
        let deny = |port| Authorization {
            name: "deny".into(),
            namespace: "ns".into(),
            action: Action::Deny,
            rules: vec![Rule {
                clauses: vec![Clause { matches: vec![Match { destination_ports: vec![port], ..Default::default() }] }],
            }],
            ..Default::default()
        };
        let st = |ws: Vec<Workload>, ps: Vec<Authorization>| ProxyState::new(ws, vec![], ps, "td").unwrap();
        let base = st(vec![w("a", "10.0.0.1")], vec![deny(80)]);
        assert!(base.same_authorization(&st(vec![w("a", "10.0.0.1")], vec![deny(80)])), "rebuilt, same content");
        let unhealthy = Workload { status: HealthStatus::Unhealthy, ..w("a", "10.0.0.9") };
        let moved = st(vec![unhealthy, w("new", "10.0.0.2")], vec![deny(80)]);
        assert!(base.same_authorization(&moved), "workload changes outside authorization are not policy changes");
        assert!(!base.same_authorization(&st(vec![w("a", "10.0.0.1")], vec![deny(81)])), "a policy edited");
        assert!(!base.same_authorization(&st(vec![w("a", "10.0.0.1")], vec![])), "a policy removed");
        assert!(!st(vec![], vec![]).same_authorization(&st(vec![], vec![deny(80)])), "a policy added");
        let listing = Workload { authorization_policies: vec!["ns/deny".into()], ..w("a", "10.0.0.1") };
        assert!(!base.same_authorization(&st(vec![listing], vec![deny(80)])), "a workload lists another policy");
        let elsewhere = Workload { namespace: "other".into(), ..w("a", "10.0.0.1") };
        assert!(!base.same_authorization(&st(vec![elsewhere], vec![deny(80)])), "a workload changed namespace");
    }

    #[test]
    fn subscribers_see_each_replaced_state() {
        let shared = SharedState::new(ProxyState::new(vec![w("a", "10.0.0.1")], vec![], vec![], "td").unwrap());
        let mut changes = shared.subscribe();
        assert!(changes.borrow_and_update().workload_by_uid("a").is_some());
        shared.replace(ProxyState::new(vec![w("b", "10.0.0.2")], vec![], vec![], "td").unwrap());
        assert!(changes.has_changed().unwrap());
        assert!(Arc::ptr_eq(&changes.borrow_and_update(), &shared.snapshot()));
    }

    #[test]
    fn replaced_state_is_seen_by_new_snapshots_but_not_old_ones() {
        let shared = SharedState::new(ProxyState::new(vec![w("a", "10.0.0.1")], vec![], vec![], "td").unwrap());
        let old = shared.snapshot();
        shared.replace(ProxyState::new(vec![w("b", "10.0.0.2")], vec![], vec![], "td").unwrap());
        assert!(old.workload_by_uid("a").is_some());
        assert!(shared.snapshot().workload_by_uid("a").is_none());
        assert!(shared.snapshot().workload_by_uid("b").is_some());
    }
}
