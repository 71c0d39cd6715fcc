//! How an endpoint of a backend is chosen (DestinationRule
//! `trafficPolicy.loadBalancer`): a simple policy, or consistent hashing:
//! the same key (a header, a cookie, the client's address, a query
//! parameter) reaches the same endpoint while the endpoints stay the same,
//! and when one is added or removed only about its share of keys moves.
//!
//! The table is Maglev's (Eisenbud et al., NSDI 2016; Envoy's `MAGLEV`): each
//! endpoint fills the slots of its own permutation of a prime-sized table in
//! turn, so every endpoint owns an equal share of slots (within one), and a
//! key is looked up in O(1). A table is built once per endpoint set (by the
//! endpoints' uids) and cached by the picker; a new set builds a new one.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, HeaderValue};
use rand::Rng;

/// How a backend's endpoint is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LbPolicy {
    /// Two endpoints at random, the one with fewer requests in flight
    /// (Envoy's and Istio's default): close to the least loaded without a
    /// global scan, and no herd on one endpoint.
    #[default]
    LeastRequest,
    RoundRobin,
    /// Uniformly at random.
    Random,
}

/// `trafficPolicy.loadBalancer`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LoadBalancer {
    /// The choice without a hash key (and when the request has none).
    pub simple: LbPolicy,
    /// Consistent hashing by this key.
    pub hash: Option<HashKey>,
    /// With a cookie key and a TTL: the cookie given to a request without one.
    pub make_cookie: Option<CookieMaker>,
}

/// `consistentHash.httpCookie` with a `ttl`: as Envoy does, a request
/// without the cookie is hashed on a new value, which the response sets.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CookieMaker {
    pub name: String,
    /// `Max-Age`; zero: a session cookie (none).
    pub ttl: Duration,
    /// `Path`; empty: none.
    pub path: String,
}

impl CookieMaker {
    /// A new cookie: the hash of its value (as [`request_hash`] takes it
    /// when the client sends it back) and the `Set-Cookie` header value.
    pub fn make(&self, rng: &mut impl Rng) -> Option<(u64, HeaderValue)> {
        // Quoted, as Envoy writes it; the quotes come back and are hashed too.
        let value = format!("\"{:016x}\"", rng.random::<u64>());
        let mut set = format!("{}={value}", self.name);
        if !self.ttl.is_zero() {
            set.push_str(&format!("; Max-Age={}", self.ttl.as_secs()));
        }
        if !self.path.is_empty() {
            set.push_str(&format!("; Path={}", self.path));
        }
        set.push_str("; HttpOnly");
        Some((hash(value.as_bytes()), HeaderValue::try_from(set).ok()?))
    }
}

/// Envoy's default Maglev table size (a prime).
pub const TABLE_SIZE: usize = 65_537;

/// What the hash of a request is taken from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// A request header's value (the first one).
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's address (the HBONE peer).
    SourceIp,
    /// A query parameter's value.
    QueryParameter(String),
}

/// The hash of `parts` by `key`; `None` when the request has no such value
/// (the endpoint is then chosen as without hashing).
pub fn request_hash(key: &HashKey, parts: &Parts, peer: IpAddr) -> Option<u64> {
    match key {
        HashKey::Header(name) => parts.headers.get(name).map(|v| hash(v.as_bytes())),
        HashKey::Cookie(name) => parts
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| hash(v.as_bytes())),
        HashKey::SourceIp => Some(hash(&peer)),
        HashKey::QueryParameter(name) => parts
            .uri
            .query()?
            .split('&')
            .filter_map(|p| p.split_once('=').or(Some((p, ""))))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| hash(v.as_bytes())),
    }
}

/// A stable hash (SipHash with fixed keys: the same in every waypoint
/// replica, so replicas agree on where a key goes).
pub fn hash(v: &(impl Hash + ?Sized)) -> u64 {
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// A Maglev lookup table over a set of endpoints named by uid.
#[derive(Debug)]
pub struct Maglev {
    /// Identifies the endpoint set the table was built for.
    pub fingerprint: u64,
    /// Slot → index of the endpoint in the set, in the order given.
    slots: Vec<u32>,
}

impl Maglev {
    /// The fingerprint of an endpoint set, to tell whether a table fits it.
    pub fn fingerprint<'a>(names: impl Iterator<Item = &'a str>) -> u64 {
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new();
        for n in names {
            n.hash(&mut h);
        }
        h.finish()
    }

    /// Builds the table for `names` (at least one) with `size` slots (a
    /// prime larger than the number of names).
    pub fn build(names: &[&str], size: usize) -> Maglev {
        assert!(!names.is_empty() && names.len() < size, "bug: Maglev over {} names, {size} slots", names.len());
        let m = size as u64;
        // Each endpoint's permutation: offset + j·skip (mod m), skip ≠ 0.
        let perms: Vec<(u64, u64)> =
            names.iter().map(|n| (hash(&(n, 0u8)) % m, hash(&(n, 1u8)) % (m - 1) + 1)).collect();
        let mut next = vec![0u64; names.len()];
        let mut slots = vec![u32::MAX; size];
        let mut filled = 0;
        'fill: loop {
            for (i, (offset, skip)) in perms.iter().enumerate() {
                let mut c = ((offset + next[i] * skip) % m) as usize;
                while slots[c] != u32::MAX {
                    next[i] += 1;
                    c = ((offset + next[i] * skip) % m) as usize;
                }
                slots[c] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Maglev { fingerprint: Maglev::fingerprint(names.iter().copied()), slots }
    }

    /// The endpoint (its index in the set) for a request hash.
    pub fn lookup(&self, hash: u64) -> usize {
        self.slots[(hash % self.slots.len() as u64) as usize] as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("Kubernetes//Pod/ns/web-{i}")).collect()
    }

    #[test]
    fn every_endpoint_owns_an_equal_share_of_slots() {
        let owned = names(4);
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        let t = Maglev::build(&refs, TABLE_SIZE);
        let mut count = [0usize; 4];
        t.slots.iter().for_each(|s| count[*s as usize] += 1);
        assert!(count.iter().all(|c| c.abs_diff(TABLE_SIZE / 4) <= 1), "{count:?}");
    }

    #[test]
    fn removing_one_of_four_endpoints_moves_about_its_share_of_keys() {
        let owned = names(4);
        let four: Vec<&str> = owned.iter().map(String::as_str).collect();
        let three: Vec<&str> = four[..3].to_vec();
        let (t4, t3) = (Maglev::build(&four, TABLE_SIZE), Maglev::build(&three, TABLE_SIZE));
        let keys: Vec<u64> = (0..10_000u32).map(|k| hash(&k)).collect();
        let moved = keys.iter().filter(|k| four[t4.lookup(**k)] != three[t3.lookup(**k)]).count();
        let on_removed = keys.iter().filter(|k| t4.lookup(**k) == 3).count();
        // Every key of the removed endpoint moves; of the others only Maglev's small disruption (a few percent).
        assert!(moved >= on_removed, "{moved} < {on_removed}");
        let share = moved as f64 / keys.len() as f64;
        assert!((0.22..=0.30).contains(&share), "{share:.3} of keys moved, want about a quarter");
    }

    #[test]
    fn the_same_key_maps_to_the_same_endpoint_and_keys_spread() {
        let owned = names(3);
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        let t = Maglev::build(&refs, TABLE_SIZE);
        assert_eq!(t.lookup(hash(b"user-42".as_slice())), t.lookup(hash(b"user-42".as_slice())));
        let mut seen = [0usize; 3];
        (0..3000u32).for_each(|k| seen[t.lookup(hash(&k))] += 1);
        assert!(seen.iter().all(|n| (800..1200).contains(n)), "{seen:?}");
        assert_ne!(t.fingerprint, Maglev::fingerprint(refs[..2].iter().copied()));
    }

    #[test]
    fn keys_come_from_the_request() {
        let req = http::Request::get("/p?a=1&user=jo&b")
            .header("x-user", "jo")
            .header("cookie", "a=1; session=abc")
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let h = |k: HashKey| request_hash(&k, &parts, peer);
        assert_eq!(h(HashKey::Header(HeaderName::from_static("x-user"))), Some(hash(b"jo".as_slice())));
        assert_eq!(h(HashKey::Cookie("session".into())), Some(hash(b"abc".as_slice())));
        assert_eq!(h(HashKey::QueryParameter("user".into())), Some(hash(b"jo".as_slice())));
        assert_eq!(h(HashKey::QueryParameter("b".into())), Some(hash(b"".as_slice())));
        assert_eq!(h(HashKey::QueryParameter("missing".into())), None);
        assert_eq!(h(HashKey::Header(HeaderName::from_static("x-none"))), None);
        assert_eq!(h(HashKey::SourceIp), Some(hash(&peer)));
    }

    #[test]
    fn a_made_cookie_hashes_as_it_will_when_the_client_sends_it_back() {
        use rand::SeedableRng;
        let maker = CookieMaker { name: "session".into(), ttl: Duration::from_secs(3600), path: "/app".into() };
        let (made, set) = maker.make(&mut rand::rngs::SmallRng::seed_from_u64(7)).unwrap();
        let set = set.to_str().unwrap();
        assert!(set.starts_with("session=\"") && set.ends_with("; Max-Age=3600; Path=/app; HttpOnly"), "{set}");
        let pair = set.split(';').next().unwrap();
        let back =
            http::Request::get("/").header("cookie", format!("other=1; {pair}")).body(()).unwrap().into_parts().0;
        assert_eq!(request_hash(&HashKey::Cookie("session".into()), &back, "10.0.0.1".parse().unwrap()), Some(made));
        let session = CookieMaker { ttl: Duration::ZERO, path: String::new(), ..maker };
        let (_, set) = session.make(&mut rand::rng()).unwrap();
        assert!(!set.to_str().unwrap().contains("Max-Age") && !set.to_str().unwrap().contains("Path"), "{set:?}");
    }
}
