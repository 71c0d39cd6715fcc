//! The open inbound connections (HBONE streams and plaintext), each with what
//! authorization needs to decide it again. When the policies change, the
//! connections the new state denies are closed, as Istio's ztunnel does;
//! allowed ones are left alone. A connection costs one registration when it
//! opens and one removal when it ends, nothing per byte.
//!
//! A connection whose destination workload left the state is decided with
//! the workload it was admitted to (as Istio's ztunnel does): it is closed
//! only if a policy change denies it, not because the workload went away.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::warn;

use crate::metrics::Metrics;
use crate::state::{ConnectionAttributes, Denied, ProxyState, SharedState, Workload};

/// An inbound connection admitted by policy.
#[derive(Clone, Debug)]
pub struct InboundConnection {
    /// The client's address.
    pub src: SocketAddr,
    /// What authorization decided on.
    pub attrs: ConnectionAttributes,
    /// The destination workload as it was when the connection was admitted.
    pub dst: Arc<Workload>,
}

impl InboundConnection {
    /// Decides the connection by `state`, with the destination workload as
    /// `state` has it (its listed policies may have changed).
    fn authorize(&self, state: &ProxyState) -> Result<(), Denied> {
        let dst = state.workload_by_uid(&self.dst.uid).unwrap_or(&self.dst);
        state.authorize(&self.attrs, dst)
    }
}

/// A connection closed because the policies now deny it.
#[derive(Debug)]
pub struct Closed {
    pub conn: InboundConnection,
    pub denied: Denied,
}

struct Entry {
    conn: InboundConnection,
    close: oneshot::Sender<()>,
}

/// The open inbound connections of this ztunnel (all pods).
#[derive(Default)]
pub struct InboundRegistry {
    open: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
}

impl InboundRegistry {
    /// Registers `conn`, which `authorized_by` admitted. A state swapped in
    /// since may have been re-evaluated before `conn` was here to be seen, so
    /// if `current` has moved on, it decides again; on `Err` (logged here)
    /// nothing stays registered and the caller refuses the connection.
    pub fn register(
        self: &Arc<Self>,
        conn: InboundConnection,
        authorized_by: &Arc<ProxyState>,
        current: &SharedState,
    ) -> Result<Registration, Denied> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = oneshot::channel();
        self.lock().insert(id, Entry { conn, close });
        let registration = Registration { registry: self.clone(), id, closed, fired: false };
        // Read after the insert: a state swapped in later is re-evaluated with this entry in.
        let now = current.snapshot();
        if !Arc::ptr_eq(&now, authorized_by) {
            // No entry: a re-evaluation closed it already, and `closed` fires at once.
            let denied = self.lock().get(&id).and_then(|e| {
                let denied = e.conn.authorize(&now).err()?;
                log_denied(&e.conn, &denied, "connection denied by a policy changed while it was admitted");
                Some(denied)
            });
            if let Some(denied) = denied {
                return Err(denied); // dropping `registration` unregisters it
            }
        }
        Ok(registration)
    }

    /// Decides every open connection again by `state`, closes those it
    /// denies, and returns them.
    pub fn reevaluate(&self, state: &ProxyState) -> Vec<Closed> {
        let mut open = self.lock();
        let denied: Vec<(u64, Denied)> =
            open.iter().filter_map(|(&id, e)| e.conn.authorize(state).err().map(|d| (id, d))).collect();
        denied
            .into_iter()
            .filter_map(|(id, denied)| {
                let entry = open.remove(&id)?;
                // An error means the connection is ending anyway.
                let _ = entry.close.send(());
                Some(Closed { conn: entry.conn, denied })
            })
            .collect()
    }

    /// How many inbound connections are open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no inbound connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // Entries are inserted and removed whole, so a poisoned map is consistent.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An open connection's place in the registry; dropping it (the connection
/// ended) removes it.
pub struct Registration {
    registry: Arc<InboundRegistry>,
    id: u64,
    closed: oneshot::Receiver<()>,
    fired: bool,
}

impl Registration {
    /// Resolves when a policy change closed the connection; never otherwise.
    pub async fn closed(&mut self) {
        if (&mut self.closed).await.is_ok() {
            self.fired = true;
            return;
        }
        std::future::pending().await
    }

    /// Whether [`Registration::closed`] resolved: the connection ended
    /// because a policy change denied it (already logged and counted).
    pub fn closed_by_policy(&self) -> bool {
        self.fired
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// Re-evaluates the open inbound connections whenever the policies in the
/// state change, closing the denied ones with a log line and a count.
pub async fn close_denied_on_policy_change(
    registry: Arc<InboundRegistry>,
    state: Arc<SharedState>,
    metrics: Arc<Metrics>,
) {
    let mut changes = state.subscribe();
    let mut last = changes.borrow_and_update().clone();
    while changes.changed().await.is_ok() {
        let new = changes.borrow_and_update().clone();
        if !new.same_authorization(&last) {
            for closed in registry.reevaluate(&new) {
                log_denied(&closed.conn, &closed.denied, "open connection closed: the policy now denies it");
                metrics.connections_closed_by_policy.inc();
            }
        }
        last = new;
    }
}

fn log_denied(conn: &InboundConnection, denied: &Denied, what: &str) {
    let target = SocketAddr::new(conn.attrs.dst_ip, conn.attrs.dst_port);
    let principal = conn.attrs.src_identity.as_ref().map(|i| i.to_string());
    warn!(
        src = %conn.src, principal = principal.as_deref().unwrap_or("none"), %target, workload = %conn.dst.uid,
        policy = denied.policy.as_deref().unwrap_or(denied.reason), "{what}"
    );
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use ambit_identity::Identity;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::state::{Action, Authorization, Clause, Match, Rule, Scope};

    const CLIENT_IP: &str = "10.1.0.2";
    const OTHER_IP: &str = "10.1.0.9";

    fn server() -> Workload {
        Workload {
            uid: "server".into(),
            name: "server".into(),
            namespace: "default".into(),
            addresses: vec!["10.1.0.3".parse().unwrap()],
            ..Default::default()
        }
    }

    /// A policy in `default` whose one rule matches sources in `cidr`.
    fn from_ips(name: &str, scope: Scope, action: Action, cidr: &str) -> Authorization {
        let m = Match { source_ips: vec![cidr.parse().unwrap()], ..Default::default() };
        Authorization {
            name: name.into(),
            namespace: "default".into(),
            scope,
            action,
            rules: vec![Rule { clauses: vec![Clause { matches: vec![m] }] }],
            dry_run: false,
        }
    }

    fn state_with(server: Workload, policies: Vec<Authorization>) -> ProxyState {
        ProxyState::new(vec![server], vec![], policies, "cluster.local").unwrap()
    }

    fn state(policies: Vec<Authorization>) -> ProxyState {
        state_with(server(), policies)
    }

    fn conn(src_ip: &str, dst: &Arc<Workload>) -> InboundConnection {
        let src = SocketAddr::new(src_ip.parse().unwrap(), 40000);
        let identity =
            Identity { trust_domain: "cluster.local".into(), namespace: "default".into(), service_account: "c".into() };
        let attrs = ConnectionAttributes {
            src_identity: Some(identity),
            src_ip: src.ip(),
            dst_ip: dst.addresses[0],
            dst_port: 8080,
        };
        InboundConnection { src, attrs, dst: dst.clone() }
    }

    /// Registers a connection from `src_ip` to `server`, admitted by the current state.
    fn open(registry: &Arc<InboundRegistry>, shared: &SharedState, src_ip: &str) -> Registration {
        let now = shared.snapshot();
        let dst = now.workload_by_uid("server").unwrap();
        let c = conn(src_ip, dst);
        c.authorize(&now).expect("admitted when opened");
        registry.register(c, &now, shared).expect("registered")
    }

    /// Whether the connection was told to close (polls once).
    fn is_closed(r: &mut Registration) -> bool {
        let mut fut = std::pin::pin!(r.closed());
        let waker = futures::task::noop_waker();
        fut.as_mut().poll(&mut std::task::Context::from_waker(&waker)).is_ready()
    }

    #[test]
    fn a_deny_closes_the_connections_it_matches_and_leaves_the_others() {
        let registry = Arc::new(InboundRegistry::default());
        let shared = SharedState::new(state(vec![]));
        let (mut client, mut other) = (open(&registry, &shared, CLIENT_IP), open(&registry, &shared, OTHER_IP));
        assert_eq!(registry.len(), 2);

        let deny = state(vec![from_ips("deny-client", Scope::Namespace, Action::Deny, "10.1.0.2/32")]);
        let closed = registry.reevaluate(&deny);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].conn.src.ip().to_string(), CLIENT_IP);
        assert_eq!(closed[0].denied.policy.as_deref(), Some("default/deny-client"));
        assert!(is_closed(&mut client) && client.closed_by_policy());
        assert!(!is_closed(&mut other) && !other.closed_by_policy());
        assert_eq!(registry.len(), 1, "the closed connection left the registry");
        assert!(registry.reevaluate(&deny).is_empty(), "a connection is closed once");
        drop(other);
        assert!(registry.is_empty(), "a connection that ends leaves the registry");
    }

    #[test]
    fn removing_a_policy_keeps_connections_and_an_allow_that_does_not_admit_one_closes_it() {
        let registry = Arc::new(InboundRegistry::default());
        let allow_client = || from_ips("allow-client", Scope::Global, Action::Allow, "10.1.0.2/32");
        let shared = SharedState::new(state(vec![allow_client()]));
        let mut client = open(&registry, &shared, CLIENT_IP);
        // Removal widens access: nothing closes.
        assert!(registry.reevaluate(&state(vec![])).is_empty());
        assert!(!is_closed(&mut client));

        shared.replace(state(vec![]));
        let mut other = open(&registry, &shared, OTHER_IP);
        let closed = registry.reevaluate(&state(vec![allow_client()]));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].conn.src.ip().to_string(), OTHER_IP);
        assert_eq!(closed[0].denied.policy, None);
        assert_eq!(closed[0].denied.reason, "no allow policy matched");
        assert!(is_closed(&mut other) && !is_closed(&mut client));
    }

    #[test]
    fn a_workload_that_starts_listing_a_deny_has_its_connections_closed() {
        let registry = Arc::new(InboundRegistry::default());
        let deny = || from_ips("deny-selected", Scope::WorkloadSelector, Action::Deny, "10.0.0.0/8");
        let shared = SharedState::new(state(vec![deny()]));
        let mut client = open(&registry, &shared, CLIENT_IP);
        let listing = Workload { authorization_policies: vec!["default/deny-selected".into()], ..server() };
        let new = state_with(listing, vec![deny()]);
        assert!(!new.same_authorization(&shared.snapshot()), "the workload's policy list is part of authorization");
        assert_eq!(registry.reevaluate(&new).len(), 1);
        assert!(is_closed(&mut client));
    }

    #[test]
    fn a_vanished_destination_is_decided_as_it_was_admitted() {
        let registry = Arc::new(InboundRegistry::default());
        let shared = SharedState::new(state(vec![]));
        let mut client = open(&registry, &shared, CLIENT_IP);
        let empty = |policies| ProxyState::new(vec![], vec![], policies, "cluster.local").unwrap();
        assert!(registry.reevaluate(&empty(vec![])).is_empty(), "a workload leaving does not close its connections");
        assert!(!is_closed(&mut client));
        // Its namespace's policies still apply to it.
        let deny = from_ips("deny-all", Scope::Namespace, Action::Deny, "0.0.0.0/0");
        assert_eq!(registry.reevaluate(&empty(vec![deny])).len(), 1);
        assert!(is_closed(&mut client));
    }

    #[test]
    fn a_connection_registered_after_a_swap_is_decided_by_the_new_state() {
        let registry = Arc::new(InboundRegistry::default());
        let shared = SharedState::new(state(vec![]));
        let admitted_by = shared.snapshot();
        let c = conn(CLIENT_IP, admitted_by.workload_by_uid("server").unwrap());
        shared.replace(state(vec![from_ips("deny-client", Scope::Namespace, Action::Deny, "10.1.0.2/32")]));
        let denied = registry.register(c.clone(), &admitted_by, &shared).err().expect("denied by the new state");
        assert_eq!(denied.policy.as_deref(), Some("default/deny-client"));
        assert!(registry.is_empty(), "a refused connection is not left registered");
        // Admitted by the current state: no second decision needed.
        shared.replace(state(vec![]));
        let now = shared.snapshot();
        assert!(registry.register(c, &now, &shared).is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_watcher_closes_denied_connections_on_a_policy_change_and_counts_them() {
        let registry = Arc::new(InboundRegistry::default());
        let shared = Arc::new(SharedState::new(state(vec![])));
        let metrics = Metrics::new(&mut Registry::default());
        tokio::spawn(close_denied_on_policy_change(registry.clone(), shared.clone(), metrics.clone()));
        tokio::task::yield_now().await;
        let (mut client, mut other) = (open(&registry, &shared, CLIENT_IP), open(&registry, &shared, OTHER_IP));

        // A change that leaves the policies alone closes nothing.
        let with_status = Workload { status: crate::state::HealthStatus::Unhealthy, ..server() };
        shared.replace(state_with(with_status, vec![]));
        tokio::task::yield_now().await;
        assert!(!is_closed(&mut client) && !is_closed(&mut other));

        shared.replace(state(vec![from_ips("deny-client", Scope::Namespace, Action::Deny, "10.1.0.2/32")]));
        tokio::time::timeout(Duration::from_secs(5), client.closed()).await.expect("closed after the change");
        assert!(!is_closed(&mut other), "an allowed connection is untouched");
        assert_eq!(metrics.connections_closed_by_policy.get(), 1);
    }
}
