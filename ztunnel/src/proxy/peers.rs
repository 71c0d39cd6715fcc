//! Telemetry labels of a connection's two ends, from the state and, where
//! the state is silent, from what the HBONE headers claim. Headers label
//! telemetry only: principals come from certificates.

use ambit_identity::Identity;
use tracing::debug;

use crate::metrics::{PeerLabels, ServiceLabels};
use crate::state::{ProxyState, Workload};
use ambit_hbone::headers::Baggage;

/// What an inbound HBONE request's headers say (nothing for plaintext).
#[derive(Clone, Debug, Default)]
pub(super) struct Claims {
    /// The service the client addressed (`forwarded: …;host=`).
    pub service_host: Option<String>,
    /// The source workload (`baggage`).
    pub baggage: Option<Baggage>,
}

/// `labels` with what the state left unknown filled from the peer's
/// baggage, unless the baggage names another namespace than the peer's
/// certificate (then it is ignored, with a debug log).
pub(super) fn fill_from_baggage(labels: PeerLabels, b: &Baggage, peer: &Identity) -> PeerLabels {
    if b.namespace.as_deref().is_some_and(|ns| ns != peer.namespace) {
        debug!(%peer, namespace = ?b.namespace, "ignoring baggage naming another namespace than the peer's certificate");
        return labels;
    }
    labels.fill_from(b)
}

/// The service an inbound connection came through. As Istio's ztunnel
/// does: the one the client named in `forwarded`, if `dst` backs it; else
/// the first of `dst`'s services with a target port equal to `port`.
pub(super) fn inbound_service(state: &ProxyState, dst: &Workload, host: Option<&str>, port: u16) -> ServiceLabels {
    let services = || dst.services.iter().filter_map(|(key, ports)| Some((state.service_by_key(key)?, ports)));
    if let Some(host) = host {
        if let Some((s, _)) = services().find(|(s, _)| s.hostname == host) {
            return ServiceLabels::of(s);
        }
        debug!(host, workload = %dst.uid, "forwarded host is not a service of the destination; guessing by port");
    }
    let by_port = services().find(|(_, ports)| {
        ports.iter().any(|p| (if p.target_port == 0 { p.service_port } else { p.target_port }) == port)
    });
    by_port.map(|(s, _)| ServiceLabels::of(s)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::metrics::Value;
    use crate::state::{PortMapping, Service};

    fn state() -> (ProxyState, Workload) {
        let svc = |name: &str, port: u16| Service {
            name: name.into(),
            namespace: "default".into(),
            hostname: format!("{name}.default.svc.cluster.local"),
            vips: vec![],
            ports: vec![PortMapping { service_port: 80, target_port: port }],
            ..Default::default()
        };
        let mut services = BTreeMap::new();
        for (name, port) in [("alpha", 8080), ("beta", 8080)] {
            let pm = vec![PortMapping { service_port: 80, target_port: port }];
            services.insert(format!("default/{name}.default.svc.cluster.local"), pm);
        }
        let w = Workload {
            uid: "c//Pod/default/server".into(),
            name: "server".into(),
            namespace: "default".into(),
            addresses: vec!["10.1.0.3".parse().unwrap()],
            services,
            ..Default::default()
        };
        let st = ProxyState::new(
            vec![w.clone()],
            vec![svc("alpha", 8080), svc("beta", 8080), svc("other", 9)],
            vec![],
            "cluster.local",
        )
        .unwrap();
        (st, w)
    }

    #[test]
    fn the_forwarded_host_picks_the_service_else_the_port_guess() {
        let (st, w) = state();
        let named = inbound_service(&st, &w, Some("beta.default.svc.cluster.local"), 8080);
        assert_eq!(named.hostname, Value::new("beta.default.svc.cluster.local"));
        assert_eq!((named.name, named.namespace), (Value::new("beta"), Value::new("default")));
        // Not a service the destination backs: the claim is not trusted, the port guess stands.
        let guessed = inbound_service(&st, &w, Some("other.default.svc.cluster.local"), 8080);
        assert_eq!(guessed.hostname, Value::new("alpha.default.svc.cluster.local"));
        assert_eq!(inbound_service(&st, &w, None, 8080).hostname, Value::new("alpha.default.svc.cluster.local"));
        assert!(inbound_service(&st, &w, None, 9999).hostname.is_unknown());
    }

    #[test]
    fn baggage_fills_only_unknown_labels_and_only_for_the_certificates_namespace() {
        let peer = Identity::new("cluster.local", "shop", "web");
        let b = Baggage {
            cluster_id: Some("east".into()),
            namespace: Some("shop".into()),
            workload_name: Some("web".into()),
            service_name: Some("web-app".into()),
            revision: Some("v2".into()),
        };
        let known = PeerLabels { canonical_service: Value::new("from-state"), ..Default::default() };
        let l = fill_from_baggage(known.clone(), &b, &peer);
        assert_eq!(l.canonical_service, Value::new("from-state"), "the state wins");
        assert_eq!(
            (l.workload, l.canonical_revision, l.cluster),
            (Value::new("web"), Value::new("v2"), Value::new("east"))
        );
        assert!(l.principal.is_unknown(), "baggage never sets a principal");
        let foreign = Baggage { namespace: Some("bank".into()), ..b };
        let l = fill_from_baggage(known, &foreign, &peer);
        assert!(l.workload.is_unknown() && l.namespace.is_unknown(), "baggage for another namespace ignored");
    }
}
