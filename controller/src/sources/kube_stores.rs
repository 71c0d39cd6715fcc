//! What the Kubernetes source reads: the custom resource kinds, the
//! reflector stores of every watched kind, and what the watchers and the
//! model build tell the status writer. A leaf: both the source
//! ([`super::kube`]) and the status writer ([`super::kube_status`]) use it.

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::Store;

/// A custom resource the source reads.
#[derive(Clone, Copy, Debug)]
pub(super) struct Crd {
    pub(super) group: &'static str,
    pub(super) version: &'static str,
    pub(super) kind: &'static str,
    plural: &'static str,
}

pub(super) const AUTHORIZATION_POLICY: Crd =
    Crd { group: "security.istio.io", version: "v1", kind: "AuthorizationPolicy", plural: "authorizationpolicies" };
pub(super) const PEER_AUTHENTICATION: Crd =
    Crd { group: "security.istio.io", version: "v1", kind: "PeerAuthentication", plural: "peerauthentications" };
pub(super) const GATEWAY: Crd =
    Crd { group: "gateway.networking.k8s.io", version: "v1", kind: "Gateway", plural: "gateways" };
/// Read only for their status ([`super::route_status`]); the model does not wait for them.
pub(super) const GATEWAY_CLASS: Crd =
    Crd { group: "gateway.networking.k8s.io", version: "v1", kind: "GatewayClass", plural: "gatewayclasses" };
/// Read by the model (cross-namespace backendRefs). v1beta1: served by every Gateway API release since v0.6 (v1
/// only since v1.5).
pub(super) const REFERENCE_GRANT: Crd =
    Crd { group: "gateway.networking.k8s.io", version: "v1beta1", kind: "ReferenceGrant", plural: "referencegrants" };
/// Istio's VirtualService: routes the model reads (for waypoints) and that get conditions as policies do. v1 (served
/// by Istio's CRD since 1.22, and by Ambit's).
pub(super) const VIRTUAL_SERVICE: Crd =
    Crd { group: "networking.istio.io", version: "v1", kind: "VirtualService", plural: "virtualservices" };
/// SMI's TrafficSplit, read and given conditions like [`VIRTUAL_SERVICE`]. v1alpha4: the storage version of SMI's
/// CRD and Ambit's (the API server converts objects written as v1alpha2 or v1alpha3).
pub(super) const TRAFFIC_SPLIT: Crd =
    Crd { group: "split.smi-spec.io", version: "v1alpha4", kind: "TrafficSplit", plural: "trafficsplits" };
/// Istio's DestinationRule: its subsets resolve VirtualService destinations; conditions as for [`VIRTUAL_SERVICE`].
pub(super) const DESTINATION_RULE: Crd =
    Crd { group: "networking.istio.io", version: "v1", kind: "DestinationRule", plural: "destinationrules" };
/// The routes the model reads and whose parent entries Ambit writes, in the order of [`Stores`]' route stores.
pub(super) const ROUTES: [Crd; 2] = [
    Crd { group: "gateway.networking.k8s.io", version: "v1", kind: "HTTPRoute", plural: "httproutes" },
    Crd { group: "gateway.networking.k8s.io", version: "v1", kind: "GRPCRoute", plural: "grpcroutes" },
];

impl Crd {
    pub(super) fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(self.group, self.version, self.kind), self.plural)
    }
}

/// What the watcher tasks tell the build loop.
#[derive(Clone, Copy, Debug)]
pub(super) enum Signal {
    /// Objects of a kind the model reads changed.
    Changed,
    /// Objects read only for their status (GatewayClasses) changed: no model build, only their status.
    StatusInput,
    /// A kind's initial list is complete (or its CRD is absent, which counts as empty).
    Ready(&'static str),
}

/// The reflector stores, one per kind.
#[derive(Clone)]
pub(super) struct Stores {
    pub(super) namespaces: Store<Namespace>,
    pub(super) pods: Store<Pod>,
    pub(super) services: Store<Service>,
    pub(super) endpoint_slices: Store<EndpointSlice>,
    pub(super) policies: Store<DynamicObject>,
    pub(super) peer_auths: Store<DynamicObject>,
    pub(super) gateways: Store<DynamicObject>,
    pub(super) gateway_classes: Store<DynamicObject>,
    pub(super) http_routes: Store<DynamicObject>,
    pub(super) grpc_routes: Store<DynamicObject>,
    pub(super) reference_grants: Store<DynamicObject>,
    pub(super) virtual_services: Store<DynamicObject>,
    pub(super) traffic_splits: Store<DynamicObject>,
    pub(super) destination_rules: Store<DynamicObject>,
}

/// (kind, namespace, name) of an object that gets conditions from the model build: a policy, a VirtualService, a
/// TrafficSplit or a DestinationRule.
pub(super) type PolicyKey = (&'static str, String, String);

/// What the last model build decided that route status needs.
#[derive(Debug, Default)]
pub(super) struct ModelFacts {
    /// Services a waypoint serves.
    pub(super) served: std::collections::HashSet<(String, String)>,
    /// Routes the model refused, by (kind, namespace, name), with why.
    pub(super) invalid: std::collections::HashMap<(String, String, String), String>,
    /// The ReferenceGrants the model read.
    pub(super) grants: crate::model::reference_grant::Grants,
}

/// What the last model build decided that the conditions of policies, VirtualServices and TrafficSplits need (besides
/// the rejections).
#[derive(Debug, Default)]
pub(super) struct BuildOutcome {
    /// Parts not applied, by object.
    pub(super) warnings: Vec<crate::model::Warning>,
    /// Where each valid AuthorizationPolicy with `targetRefs` went.
    pub(super) bindings: std::collections::BTreeMap<crate::model::ObjectKey, crate::model::PolicyBinding>,
    /// VirtualServices, TrafficSplits and DestinationRules `(kind, namespace, name)` applied at a waypoint.
    pub(super) mesh_routes_applied: std::collections::BTreeSet<(String, String, String)>,
}
