//! Requests from the node agent to ztunnel, as ztunnel sees them, and the
//! checks that turn a received packet into one.

use std::os::fd::OwnedFd;

use ambit_api::workload::zds::{workload_request::Payload, AddWorkload, WorkloadInfo, WorkloadRequest};
use prost::Message;

/// One request from the node agent, validated.
#[derive(Debug)]
pub enum ZdsRequest {
    /// Enroll a pod: run its proxy inside `netns`.
    Add {
        /// The pod's UID.
        uid: String,
        /// Name, namespace and service account (empty when an old agent omits them).
        info: WorkloadInfo,
        /// The pod's network namespace, closed on drop.
        netns: OwnedFd,
    },
    /// During the snapshot only: keep the pod although its namespace is not resent.
    Keep {
        /// The pod's UID.
        uid: String,
    },
    /// Release a pod.
    Del {
        /// The pod's UID.
        uid: String,
    },
    /// The snapshot is complete: pods neither added nor kept since the hello are gone.
    SnapshotSent,
}

impl ZdsRequest {
    /// The pod UID the request is about, if any.
    pub fn uid(&self) -> Option<&str> {
        match self {
            Self::Add { uid, .. } | Self::Keep { uid } | Self::Del { uid } => Some(uid),
            Self::SnapshotSent => None,
        }
    }

    /// Decodes and validates one packet. Every descriptor in `fds` is either
    /// moved into the result or closed.
    pub(crate) fn decode(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<Self, RequestError> {
        let request = WorkloadRequest::decode(bytes)?;
        // An unknown oneof field decodes as no payload.
        let (kind, request) = match request.payload.ok_or(RequestError::UnknownPayload)? {
            Payload::Add(add) => return Self::decode_add(add, fds),
            Payload::Keep(k) => ("keep", Self::Keep { uid: k.uid }),
            Payload::Del(d) => ("del", Self::Del { uid: d.uid }),
            Payload::SnapshotSent(_) => ("snapshot_sent", Self::SnapshotSent),
        };
        if !fds.is_empty() {
            return Err(RequestError::UnexpectedFds { kind, count: fds.len() });
        }
        if request.uid() == Some("") {
            return Err(RequestError::EmptyUid { kind });
        }
        Ok(request)
    }

    fn decode_add(add: AddWorkload, mut fds: Vec<OwnedFd>) -> Result<Self, RequestError> {
        if add.uid.is_empty() {
            return Err(RequestError::EmptyUid { kind: "add" });
        }
        if fds.len() > 1 {
            return Err(RequestError::TooManyFds { uid: add.uid, count: fds.len() });
        }
        let Some(netns) = fds.pop() else {
            return Err(RequestError::MissingFd { uid: add.uid });
        };
        Ok(Self::Add { uid: add.uid, info: add.workload_info.unwrap_or_default(), netns })
    }
}

/// A request ztunnel cannot act on. The connection stays usable: ztunnel acks
/// the request with this error's text and reads the next one.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The bytes are not a `WorkloadRequest`.
    #[error("malformed request")]
    Decode(#[from] prost::DecodeError),
    /// The request names no payload this implementation knows.
    #[error("request has no known payload")]
    UnknownPayload,
    /// A request that must name a pod has an empty UID.
    #[error("{kind} request has an empty uid")]
    EmptyUid {
        /// Request kind.
        kind: &'static str,
    },
    /// An add arrived without its network namespace.
    #[error("add for {uid} carries no network namespace descriptor")]
    MissingFd {
        /// The pod's UID.
        uid: String,
    },
    /// An add arrived with more than one descriptor (all of them are closed).
    #[error("add for {uid} carries {count} descriptors, expected exactly one")]
    TooManyFds {
        /// The pod's UID.
        uid: String,
        /// Descriptors received.
        count: usize,
    },
    /// A request other than add carried descriptors (they are closed).
    #[error("{kind} request carries {count} descriptors, expected none")]
    UnexpectedFds {
        /// Request kind.
        kind: &'static str,
        /// Descriptors received.
        count: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_api::workload::zds::{DelWorkload, KeepWorkload, SnapshotSent};

    fn encode(payload: Payload) -> Vec<u8> {
        WorkloadRequest { payload: Some(payload) }.encode_to_vec()
    }

    fn netns() -> OwnedFd {
        std::fs::File::open("/proc/self/ns/net").unwrap().into()
    }

    fn add(uid: &str) -> Vec<u8> {
        encode(Payload::Add(AddWorkload {
            uid: uid.into(),
            workload_info: Some(WorkloadInfo { name: "p".into(), namespace: "n".into(), service_account: "sa".into() }),
        }))
    }

    #[test]
    fn add_with_one_descriptor_decodes() {
        let req = ZdsRequest::decode(&add("u1"), vec![netns()]).unwrap();
        let ZdsRequest::Add { uid, info, .. } = req else { panic!("not an add: {req:?}") };
        assert_eq!(uid, "u1");
        assert_eq!(info.service_account, "sa");
    }

    #[test]
    fn add_without_workload_info_gets_empty_info() {
        let bytes = encode(Payload::Add(AddWorkload { uid: "u1".into(), workload_info: None }));
        let req = ZdsRequest::decode(&bytes, vec![netns()]).unwrap();
        assert!(matches!(req, ZdsRequest::Add { info, .. } if info == WorkloadInfo::default()));
    }

    #[test]
    fn add_without_descriptor_is_rejected() {
        let err = ZdsRequest::decode(&add("u1"), vec![]).unwrap_err();
        assert!(matches!(err, RequestError::MissingFd { .. }), "{err:?}");
        assert_eq!(err.to_string(), "add for u1 carries no network namespace descriptor");
    }

    #[test]
    fn add_with_two_descriptors_is_rejected() {
        let err = ZdsRequest::decode(&add("u1"), vec![netns(), netns()]).unwrap_err();
        assert!(matches!(err, RequestError::TooManyFds { count: 2, .. }), "{err:?}");
    }

    #[test]
    fn del_with_a_descriptor_is_rejected() {
        let bytes = encode(Payload::Del(DelWorkload { uid: "u1".into() }));
        let err = ZdsRequest::decode(&bytes, vec![netns()]).unwrap_err();
        assert!(matches!(err, RequestError::UnexpectedFds { kind: "del", count: 1 }), "{err:?}");
    }

    #[test]
    fn keep_del_and_snapshot_sent_decode() {
        let keep = encode(Payload::Keep(KeepWorkload { uid: "k".into() }));
        assert!(matches!(ZdsRequest::decode(&keep, vec![]), Ok(ZdsRequest::Keep { uid }) if uid == "k"));
        let del = encode(Payload::Del(DelWorkload { uid: "d".into() }));
        assert!(matches!(ZdsRequest::decode(&del, vec![]), Ok(ZdsRequest::Del { uid }) if uid == "d"));
        let snap = encode(Payload::SnapshotSent(SnapshotSent {}));
        assert!(matches!(ZdsRequest::decode(&snap, vec![]), Ok(ZdsRequest::SnapshotSent)));
    }

    #[test]
    fn empty_uid_is_rejected() {
        let bytes = encode(Payload::Del(DelWorkload { uid: String::new() }));
        assert!(matches!(ZdsRequest::decode(&bytes, vec![]), Err(RequestError::EmptyUid { kind: "del" })));
    }

    #[test]
    fn unknown_payload_field_is_rejected() {
        // field 9, varint 1: a payload a future agent might send.
        let err = ZdsRequest::decode(&[0x48, 0x01], vec![]).unwrap_err();
        assert!(matches!(err, RequestError::UnknownPayload), "{err:?}");
    }

    #[test]
    fn garbage_is_malformed() {
        let err = ZdsRequest::decode(&[0xff, 0xff, 0xff], vec![]).unwrap_err();
        assert!(matches!(err, RequestError::Decode(_)), "{err:?}");
    }
}
