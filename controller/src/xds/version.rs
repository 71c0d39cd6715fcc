//! Resource versions and the per-snapshot encoding shared by all streams.
//!
//! A version is a content hash (FNV-1a 64 of a canonical encoding, hex), so an
//! unchanged resource is never resent, also across controller restarts: a
//! reconnecting ztunnel lists the versions it holds and gets only the others.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ambit_api::security::Authorization;
use ambit_api::workload::{address, Address};
use ambit_api::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, SERVICE_ROUTES_TYPE_URL, WAYPOINT_POLICY_TYPE_URL};
use prost::Message;

use crate::model::Snapshot;

/// The resource types served: the two a ztunnel subscribes to, and the two of a waypoint's L7 configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceType {
    /// `istio.workload.Address`: workloads and services.
    Address,
    /// `istio.security.Authorization`: L4 policies.
    Authorization,
    /// `ambit.waypoint.v1.ServiceRoutes`: a waypoint's routes, per service.
    ServiceRoutes,
    /// `ambit.waypoint.v1.AuthorizationPolicy`: a waypoint's L7 policies.
    WaypointPolicy,
}

/// How many types there are.
const TYPES: usize = 4;

impl ResourceType {
    /// Every type, in the order they are sent.
    pub const ALL: [ResourceType; TYPES] =
        [ResourceType::Address, ResourceType::Authorization, ResourceType::ServiceRoutes, ResourceType::WaypointPolicy];

    /// The xDS type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Address => ADDRESS_TYPE_URL,
            ResourceType::Authorization => AUTHORIZATION_TYPE_URL,
            ResourceType::ServiceRoutes => SERVICE_ROUTES_TYPE_URL,
            ResourceType::WaypointPolicy => WAYPOINT_POLICY_TYPE_URL,
        }
    }

    /// The type for a type URL, if it is one this server knows.
    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    pub(crate) fn index(self) -> usize {
        match self {
            ResourceType::Address => 0,
            ResourceType::Authorization => 1,
            ResourceType::ServiceRoutes => 2,
            ResourceType::WaypointPolicy => 3,
        }
    }
}

/// FNV-1a, 64 bit: tiny, stable across releases and platforms.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Length-prefixed, so that adjacent fields cannot alias.
    fn write_field(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }
}

/// The version of an `Address`. prost encodes `map` fields in hash order,
/// which differs between processes, so a workload's service map is hashed
/// sorted by key.
pub fn address_version(a: &Address) -> u64 {
    let mut h = Fnv::new();
    match &a.r#type {
        Some(address::Type::Workload(w)) if w.services.len() > 1 => {
            let mut rest = w.clone();
            let services = std::mem::take(&mut rest.services);
            h.write_field(b"workload");
            h.write_field(&rest.encode_to_vec());
            let mut entries: Vec<_> = services.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (key, ports) in entries {
                h.write_field(key.as_bytes());
                h.write_field(&ports.encode_to_vec());
            }
        }
        _ => h.write_field(&a.encode_to_vec()),
    }
    h.0
}

/// The version of an `Authorization` (no map fields: plain encoding).
pub fn authorization_version(p: &Authorization) -> u64 {
    plain_version(p)
}

/// The version of a message without map fields (the waypoint types): a hash of its encoding.
pub fn plain_version<M: Message>(m: &M) -> u64 {
    let mut h = Fnv::new();
    h.write_field(&m.encode_to_vec());
    h.0
}

/// A version as it travels in xDS: 16 hex digits.
pub fn version_string(v: u64) -> String {
    format!("{v:016x}")
}

/// The version a client declares, if it is one this server could have sent.
pub fn parse_version(s: &str) -> Option<u64> {
    (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok()).flatten()
}

/// One resource ready to send.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub version: u64,
    pub any: prost_types::Any,
}

/// Resource name → encoding. Names are shared (`Arc<str>`) by consecutive
/// snapshots and by every stream's record of what its client holds, so a
/// stream costs a pointer per resource, not a copy of each name.
pub(crate) type EncodedMap = BTreeMap<Arc<str>, Arc<Encoded>>;

/// A snapshot with every resource encoded and versioned once, shared by all
/// streams.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub snapshot: Arc<Snapshot>,
    /// When this server first saw the snapshot: the start of push latency.
    pub observed: Instant,
    by_type: [EncodedMap; TYPES],
    /// The version of the snapshot this one was compared with.
    pub base: Option<u64>,
    /// Per type, the names added, changed or removed since `base`: a stream
    /// that is up to date with `base` looks only at these.
    changed: [Vec<String>; TYPES],
}

impl Prepared {
    /// Encodes `snapshot`, reusing the encoding of resources equal to those in
    /// `prev` (most snapshots change a handful of resources).
    pub fn build(snapshot: Arc<Snapshot>, prev: Option<&Prepared>) -> Self {
        let (addresses, changed_addresses) = encode_all(
            &snapshot.addresses,
            prev.map(|p| (&p.snapshot.addresses, &p.by_type[0])),
            ADDRESS_TYPE_URL,
            address_version,
        );
        let (authorizations, changed_authorizations) = encode_all(
            &snapshot.authorizations,
            prev.map(|p| (&p.snapshot.authorizations, &p.by_type[1])),
            AUTHORIZATION_TYPE_URL,
            authorization_version,
        );
        let (routes, changed_routes) = encode_all(
            &snapshot.service_routes,
            prev.map(|p| (&p.snapshot.service_routes, &p.by_type[2])),
            SERVICE_ROUTES_TYPE_URL,
            plain_version,
        );
        let (policies, changed_policies) = encode_all(
            &snapshot.waypoint_policies,
            prev.map(|p| (&p.snapshot.waypoint_policies, &p.by_type[3])),
            WAYPOINT_POLICY_TYPE_URL,
            plain_version,
        );
        Prepared {
            base: prev.map(|p| p.snapshot.version),
            snapshot,
            observed: Instant::now(),
            by_type: [addresses, authorizations, routes, policies],
            changed: [changed_addresses, changed_authorizations, changed_routes, changed_policies],
        }
    }

    /// Names of type `ty` added, changed or removed since [`Prepared::base`].
    pub fn changed(&self, ty: ResourceType) -> &[String] {
        &self.changed[ty.index()]
    }

    /// The encoded resources of one type, by name.
    pub fn resources(&self, ty: ResourceType) -> &EncodedMap {
        &self.by_type[ty.index()]
    }
}

/// The previous snapshot's messages of one type and their encodings.
type Previous<'a, M> = (&'a BTreeMap<String, M>, &'a EncodedMap);

/// Encodes `current`, reusing `prev`'s encodings of equal messages; also
/// returns the names that differ from `prev` (added, changed, removed).
fn encode_all<M: Message + PartialEq>(
    current: &BTreeMap<String, M>,
    prev: Option<Previous<'_, M>>,
    type_url: &str,
    version: fn(&M) -> u64,
) -> (EncodedMap, Vec<String>) {
    let mut changed = Vec::new();
    let encoded = current
        .iter()
        .map(|(name, msg)| {
            let reused = prev.and_then(|(msgs, enc)| {
                (msgs.get(name) == Some(msg)).then(|| enc.get_key_value(name.as_str())).flatten()
            });
            match reused {
                Some((name, e)) => (name.clone(), e.clone()),
                None => {
                    changed.push(name.clone());
                    let any = prost_types::Any { type_url: type_url.to_owned(), value: msg.encode_to_vec() };
                    (Arc::from(name.as_str()), Arc::new(Encoded { version: version(msg), any }))
                }
            }
        })
        .collect();
    if let Some((msgs, _)) = prev {
        changed.extend(msgs.keys().filter(|n| !current.contains_key(*n)).cloned());
    }
    (encoded, changed)
}

/// The latest prepared snapshot, so that N streams encode a snapshot once.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    latest: Mutex<Option<Arc<Prepared>>>,
}

impl Cache {
    /// The prepared form of `snapshot`, built on first use.
    pub fn prepare(&self, snapshot: Arc<Snapshot>) -> Arc<Prepared> {
        // A poisoned lock only means a panic mid-build; the cache is rebuilt.
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = latest.as_ref() {
            if Arc::ptr_eq(&p.snapshot, &snapshot) {
                return p.clone();
            }
        }
        let p = Arc::new(Prepared::build(snapshot, latest.as_deref()));
        // A stream that lags behind must not replace a newer entry.
        if latest.as_ref().is_none_or(|l| l.snapshot.version <= p.snapshot.version) {
            *latest = Some(p.clone());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_api::workload::{PortList, Workload};

    fn workload(uid: &str, services: &[&str]) -> Address {
        Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                services: services.iter().map(|s| (s.to_string(), PortList::default())).collect(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn equal_workloads_with_many_services_have_equal_versions() {
        let names: Vec<String> = (0..32).map(|i| format!("ns/svc{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        // Separate HashMaps iterate in different orders; the version must not care.
        let a = workload("u", &refs);
        let mut rev = refs.clone();
        rev.reverse();
        let b = workload("u", &rev);
        assert_eq!(address_version(&a), address_version(&b));
    }

    #[test]
    fn any_field_change_changes_the_version() {
        assert_ne!(address_version(&workload("u1", &["a", "b"])), address_version(&workload("u2", &["a", "b"])));
        assert_ne!(address_version(&workload("u", &["a", "b"])), address_version(&workload("u", &["a", "c"])));
        assert_ne!(address_version(&workload("u", &[])), address_version(&workload("v", &[])));
    }

    #[test]
    fn version_is_stable_across_processes() {
        // Pinned value: a change here means every ztunnel re-downloads everything
        // after an upgrade; change the constant only on purpose.
        assert_eq!(address_version(&workload("u", &[])), {
            let mut h = Fnv::new();
            h.write_field(&workload("u", &[]).encode_to_vec());
            h.0
        });
        assert_eq!(version_string(0xab), "00000000000000ab");
        assert_eq!(parse_version("00000000000000ab"), Some(0xab));
        assert_eq!(parse_version("ab"), None, "not one of ours");
        assert_eq!(parse_version("zzzzzzzzzzzzzzzz"), None);
        let mut h = Fnv::new();
        h.write(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c, "FNV-1a 64 of \"a\"");
    }

    #[test]
    fn preparing_reuses_unchanged_encodings_and_the_cache_returns_the_same_prepared() {
        let mut s = Snapshot::default();
        s.addresses.insert("u".into(), workload("u", &["a"]));
        let s = Arc::new(s);
        let cache = Cache::default();
        let p1 = cache.prepare(s.clone());
        let p2 = cache.prepare(s.clone());
        assert!(Arc::ptr_eq(&p1, &p2));
        let mut s2 = (*s).clone();
        s2.version += 1;
        s2.addresses.insert("v".into(), workload("v", &[]));
        let p3 = cache.prepare(Arc::new(s2));
        let r = p3.resources(ResourceType::Address);
        assert_eq!(r.len(), 2);
        assert_eq!(r["u"].version, p1.resources(ResourceType::Address)["u"].version);
        let (old_name, old_enc) = p1.resources(ResourceType::Address).get_key_value("u").unwrap();
        let (new_name, new_enc) = r.get_key_value("u").unwrap();
        assert!(Arc::ptr_eq(old_name, new_name) && Arc::ptr_eq(old_enc, new_enc), "unchanged resource not shared");
        assert_eq!(r["u"].any.type_url, ADDRESS_TYPE_URL);
    }
}
