//! The resources an xDS client holds, by name and version, and how a delta
//! response changes them. A response is applied all or nothing: any resource
//! that does not decode or convert, or a result that does not validate as a
//! [`ProxyState`], leaves the held resources as they were.

use std::collections::{BTreeMap, HashMap};

use ambit_api::discovery::DeltaDiscoveryResponse;
use ambit_api::security as pb_sec;
use ambit_api::workload::{self as pb, address};
use ambit_api::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;

use crate::state::{Authorization, ConvertError, ProxyState, Service, StateError, Workload};

/// Why a response was rejected (the text goes back to the server in a NACK).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The response's type is neither Address nor Authorization.
    #[error("unsupported type {0}")]
    UnknownType(String),
    /// A resource entry carries no payload.
    #[error("resource {name}: no payload")]
    MissingPayload { name: String },
    /// A payload's type differs from the response's type.
    #[error("resource {name}: payload type {got}, expected {expected}")]
    WrongPayloadType { name: String, got: String, expected: &'static str },
    /// A payload does not decode.
    #[error("resource {name}: decoding: {source}")]
    Decode { name: String, source: prost::DecodeError },
    /// An Address holds neither a workload nor a service.
    #[error("resource {name}: address is neither a workload nor a service")]
    EmptyAddress { name: String },
    /// A resource's values cannot be represented.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// The resources together are not a valid state (duplicate IPs, ...).
    #[error(transparent)]
    State(#[from] StateError),
}

/// Which of the two types a response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `istio.workload.Address`.
    Address,
    /// `istio.security.Authorization`.
    Authorization,
}

impl Kind {
    /// The xDS type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Address => ADDRESS_TYPE_URL,
            Kind::Authorization => AUTHORIZATION_TYPE_URL,
        }
    }

    fn from_type_url(url: &str) -> Option<Kind> {
        [Kind::Address, Kind::Authorization].into_iter().find(|k| k.type_url() == url)
    }
}

/// A converted `Address`. Most addresses are workloads, so boxing the
/// larger variant would not save memory.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
enum AddressEntry {
    Workload(Workload),
    Service(Service),
}

/// A converted resource of either type (boxed: a workload is large).
enum Entry {
    Address(Box<AddressEntry>),
    Authorization(Authorization),
}

/// Everything the client holds: name → (version, converted resource).
#[derive(Debug, Clone, Default)]
pub struct Resources {
    addresses: BTreeMap<String, (String, AddressEntry)>,
    authorizations: BTreeMap<String, (String, Authorization)>,
}

impl Resources {
    /// name → version of one type, for `initial_resource_versions`.
    pub fn versions(&self, kind: Kind) -> HashMap<String, String> {
        match kind {
            Kind::Address => self.addresses.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect(),
            Kind::Authorization => self.authorizations.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect(),
        }
    }

    /// How many resources of each type are held: (addresses, authorizations).
    pub fn len(&self) -> (usize, usize) {
        (self.addresses.len(), self.authorizations.len())
    }

    /// Applies a delta response; on success returns its type and the new
    /// state built from everything held. On error nothing changes.
    pub fn apply(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        trust_domain: &str,
    ) -> Result<(Kind, ProxyState), ApplyError> {
        let kind = Kind::from_type_url(&resp.type_url).ok_or_else(|| ApplyError::UnknownType(resp.type_url.clone()))?;
        let decoded = resp
            .resources
            .iter()
            .map(|r| Ok((r.name.clone(), r.version.clone(), decode(kind, r)?)))
            .collect::<Result<Vec<_>, ApplyError>>()?;
        // Control path, a few times a minute: cloning keeps the old maps
        // intact until the new state has validated.
        let mut next = self.clone();
        for name in &resp.removed_resources {
            match kind {
                Kind::Address => {
                    next.addresses.remove(name);
                }
                Kind::Authorization => {
                    next.authorizations.remove(name);
                }
            }
        }
        for (name, version, entry) in decoded {
            match entry {
                Entry::Address(a) => {
                    next.addresses.insert(name, (version, *a));
                }
                Entry::Authorization(p) => {
                    next.authorizations.insert(name, (version, p));
                }
            }
        }
        let state = next.to_state(trust_domain)?;
        *self = next;
        Ok((kind, state))
    }

    /// Builds the proxy state from everything held.
    pub fn to_state(&self, trust_domain: &str) -> Result<ProxyState, StateError> {
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        for (_, a) in self.addresses.values() {
            match a {
                AddressEntry::Workload(w) => workloads.push(w.clone()),
                AddressEntry::Service(s) => services.push(s.clone()),
            }
        }
        let policies = self.authorizations.values().map(|(_, p)| p.clone()).collect();
        ProxyState::new(workloads, services, policies, trust_domain)
    }
}

fn decode(kind: Kind, r: &ambit_api::discovery::Resource) -> Result<Entry, ApplyError> {
    let name = || r.name.clone();
    let any = r.resource.as_ref().ok_or_else(|| ApplyError::MissingPayload { name: name() })?;
    if any.type_url != kind.type_url() {
        return Err(ApplyError::WrongPayloadType {
            name: name(),
            got: any.type_url.clone(),
            expected: kind.type_url(),
        });
    }
    let decode_err = |source| ApplyError::Decode { name: name(), source };
    Ok(match kind {
        Kind::Address => {
            let a = pb::Address::decode(any.value.as_slice()).map_err(decode_err)?;
            match a.r#type {
                Some(address::Type::Workload(w)) => Entry::Address(Box::new(AddressEntry::Workload(w.try_into()?))),
                Some(address::Type::Service(s)) => Entry::Address(Box::new(AddressEntry::Service(s.try_into()?))),
                None => return Err(ApplyError::EmptyAddress { name: name() }),
            }
        }
        Kind::Authorization => {
            let p = pb_sec::Authorization::decode(any.value.as_slice()).map_err(decode_err)?;
            Entry::Authorization(p.try_into()?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_api::discovery::Resource;

    fn workload(uid: &str, ip: [u8; 4]) -> pb::Address {
        pb::Address {
            r#type: Some(address::Type::Workload(pb::Workload {
                uid: uid.into(),
                name: uid.into(),
                namespace: "default".into(),
                addresses: vec![ip.to_vec()],
                ..Default::default()
            })),
        }
    }

    fn response(kind: Kind, res: Vec<(&str, pb::Address)>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: kind.type_url().into(),
            resources: res
                .into_iter()
                .map(|(n, a)| Resource {
                    name: n.into(),
                    version: format!("v-{n}"),
                    resource: Some(prost_types::Any { type_url: ADDRESS_TYPE_URL.into(), value: a.encode_to_vec() }),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn applying_adds_and_removes_and_reports_versions() {
        let mut r = Resources::default();
        let (kind, st) = r
            .apply(
                &response(
                    Kind::Address,
                    vec![("a", workload("a", [10, 0, 0, 1])), ("b", workload("b", [10, 0, 0, 2]))],
                    &[],
                ),
                "td",
            )
            .unwrap();
        assert_eq!(kind, Kind::Address);
        assert_eq!(st.workloads().count(), 2);
        let (_, st) = r.apply(&response(Kind::Address, vec![], &["a"]), "td").unwrap();
        assert_eq!(st.workloads().count(), 1);
        assert!(st.workload_by_uid("b").is_some());
        assert_eq!(r.versions(Kind::Address), HashMap::from([("b".to_string(), "v-b".to_string())]));
    }

    #[test]
    fn a_resource_that_does_not_convert_rejects_the_whole_response() {
        let mut r = Resources::default();
        r.apply(&response(Kind::Address, vec![("a", workload("a", [10, 0, 0, 1]))], &[]), "td").unwrap();
        let mut bad = workload("b", [10, 0, 0, 2]);
        if let Some(address::Type::Workload(w)) = &mut bad.r#type {
            w.addresses = vec![vec![1, 2, 3, 4, 5]];
        }
        let err = r
            .apply(&response(Kind::Address, vec![("c", workload("c", [10, 0, 0, 3])), ("b", bad)], &["a"]), "td")
            .unwrap_err();
        assert!(err.to_string().contains("5 bytes"), "{err}");
        assert_eq!(r.len(), (1, 0), "previous resources kept");
        assert!(r.versions(Kind::Address).contains_key("a"));
    }

    #[test]
    fn a_duplicate_ip_across_resources_is_rejected_as_invalid_state() {
        let mut r = Resources::default();
        let err = r
            .apply(
                &response(
                    Kind::Address,
                    vec![("a", workload("a", [10, 0, 0, 1])), ("b", workload("b", [10, 0, 0, 1]))],
                    &[],
                ),
                "td",
            )
            .unwrap_err();
        assert!(matches!(err, ApplyError::State(StateError::DuplicateWorkloadIp { .. })), "{err}");
        assert_eq!(r.len(), (0, 0));
    }

    #[test]
    fn a_payload_of_the_wrong_type_is_rejected() {
        let mut r = Resources::default();
        let resp = response(Kind::Authorization, vec![("a", workload("a", [10, 0, 0, 1]))], &[]);
        let err = r.apply(&resp, "td").unwrap_err();
        assert!(matches!(err, ApplyError::WrongPayloadType { .. }), "{err}");
    }
}
