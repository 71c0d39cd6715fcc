//! The raw cluster: every object the model is built from, by kind and
//! (namespace, name). Sources (a directory of YAML, later Kubernetes watches)
//! fill it; `build` reads it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::crd::{AuthorizationPolicy, Gateway, PeerAuthentication};
use super::mesh_route_crd::{DestinationRule, TrafficSplit, VirtualService};
use super::reference_grant::ReferenceGrant;
use super::route_crd::{GrpcRoute, HttpRoute};

/// (namespace, name); cluster-scoped objects have an empty namespace.
pub type ObjectKey = (String, String);

/// One object of a kind the model understands.
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterObject {
    /// `v1 Namespace`.
    Namespace(Box<Namespace>),
    /// `v1 Pod`.
    Pod(Box<Pod>),
    /// `v1 Service`.
    Service(Box<Service>),
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice(Box<EndpointSlice>),
    /// `security.istio.io/v1 AuthorizationPolicy`.
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    /// `security.istio.io/v1 PeerAuthentication`.
    PeerAuthentication(Box<PeerAuthentication>),
    /// `gateway.networking.k8s.io/v1 Gateway`.
    Gateway(Box<Gateway>),
    /// `gateway.networking.k8s.io/v1 HTTPRoute`.
    HttpRoute(Box<HttpRoute>),
    /// `gateway.networking.k8s.io/v1 GRPCRoute`.
    GrpcRoute(Box<GrpcRoute>),
    /// `gateway.networking.k8s.io/v1beta1` (or v1) `ReferenceGrant`.
    ReferenceGrant(Box<ReferenceGrant>),
    /// `networking.istio.io` (v1, v1beta1, v1alpha3) `VirtualService`.
    VirtualService(Box<VirtualService>),
    /// `split.smi-spec.io` (v1alpha2 to v1alpha4) `TrafficSplit`.
    TrafficSplit(Box<TrafficSplit>),
    /// `networking.istio.io` (v1, v1beta1, v1alpha3) `DestinationRule`.
    DestinationRule(Box<DestinationRule>),
}

impl ClusterObject {
    /// The object's kind, as Kubernetes spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Namespace(_) => "Namespace",
            Self::Pod(_) => "Pod",
            Self::Service(_) => "Service",
            Self::EndpointSlice(_) => "EndpointSlice",
            Self::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Self::PeerAuthentication(_) => "PeerAuthentication",
            Self::Gateway(_) => "Gateway",
            Self::HttpRoute(_) => "HTTPRoute",
            Self::GrpcRoute(_) => "GRPCRoute",
            Self::ReferenceGrant(_) => "ReferenceGrant",
            Self::VirtualService(_) => "VirtualService",
            Self::TrafficSplit(_) => "TrafficSplit",
            Self::DestinationRule(_) => "DestinationRule",
        }
    }

    /// The object's (namespace, name).
    pub fn key(&self) -> ObjectKey {
        let meta = match self {
            Self::Namespace(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::AuthorizationPolicy(o) => &o.metadata,
            Self::PeerAuthentication(o) => &o.metadata,
            Self::Gateway(o) => &o.metadata,
            Self::HttpRoute(o) => &o.metadata,
            Self::GrpcRoute(o) => &o.metadata,
            Self::ReferenceGrant(o) => &o.metadata,
            Self::VirtualService(o) => &o.metadata,
            Self::TrafficSplit(o) => &o.metadata,
            Self::DestinationRule(o) => &o.metadata,
        };
        (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
    }
}

/// All objects, by kind and key. Ordered maps so builds are deterministic
/// ("the later object by name" is well defined).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterObjects {
    /// Namespaces by `("", name)`.
    pub namespaces: BTreeMap<ObjectKey, Namespace>,
    /// Pods.
    pub pods: BTreeMap<ObjectKey, Pod>,
    /// Services.
    pub services: BTreeMap<ObjectKey, Service>,
    /// EndpointSlices.
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// AuthorizationPolicies.
    pub authorization_policies: BTreeMap<ObjectKey, AuthorizationPolicy>,
    /// PeerAuthentications.
    pub peer_authentications: BTreeMap<ObjectKey, PeerAuthentication>,
    /// Gateways (all classes).
    pub gateways: BTreeMap<ObjectKey, Gateway>,
    /// HTTPRoutes.
    pub http_routes: BTreeMap<ObjectKey, HttpRoute>,
    /// GRPCRoutes.
    pub grpc_routes: BTreeMap<ObjectKey, GrpcRoute>,
    /// ReferenceGrants.
    pub reference_grants: BTreeMap<ObjectKey, ReferenceGrant>,
    /// VirtualServices.
    pub virtual_services: BTreeMap<ObjectKey, VirtualService>,
    /// TrafficSplits.
    pub traffic_splits: BTreeMap<ObjectKey, TrafficSplit>,
    /// DestinationRules.
    pub destination_rules: BTreeMap<ObjectKey, DestinationRule>,
}

impl ClusterObjects {
    /// Whether there is no object at all.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.pods.is_empty()
            && self.services.is_empty()
            && self.endpoint_slices.is_empty()
            && self.authorization_policies.is_empty()
            && self.peer_authentications.is_empty()
            && self.gateways.is_empty()
            && self.http_routes.is_empty()
            && self.grpc_routes.is_empty()
            && self.reference_grants.is_empty()
            && self.virtual_services.is_empty()
            && self.traffic_splits.is_empty()
            && self.destination_rules.is_empty()
    }

    /// Adds `obj` unless one of the same kind and key exists; returns whether it was added.
    pub fn insert(&mut self, obj: ClusterObject) -> bool {
        fn put<T>(map: &mut BTreeMap<ObjectKey, T>, key: ObjectKey, v: T) -> bool {
            match map.entry(key) {
                std::collections::btree_map::Entry::Occupied(_) => false,
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(v);
                    true
                }
            }
        }
        let key = obj.key();
        match obj {
            ClusterObject::Namespace(o) => put(&mut self.namespaces, key, *o),
            ClusterObject::Pod(o) => put(&mut self.pods, key, *o),
            ClusterObject::Service(o) => put(&mut self.services, key, *o),
            ClusterObject::EndpointSlice(o) => put(&mut self.endpoint_slices, key, *o),
            ClusterObject::AuthorizationPolicy(o) => put(&mut self.authorization_policies, key, *o),
            ClusterObject::PeerAuthentication(o) => put(&mut self.peer_authentications, key, *o),
            ClusterObject::Gateway(o) => put(&mut self.gateways, key, *o),
            ClusterObject::HttpRoute(o) => put(&mut self.http_routes, key, *o),
            ClusterObject::GrpcRoute(o) => put(&mut self.grpc_routes, key, *o),
            ClusterObject::ReferenceGrant(o) => put(&mut self.reference_grants, key, *o),
            ClusterObject::VirtualService(o) => put(&mut self.virtual_services, key, *o),
            ClusterObject::TrafficSplit(o) => put(&mut self.traffic_splits, key, *o),
            ClusterObject::DestinationRule(o) => put(&mut self.destination_rules, key, *o),
        }
    }

    /// Labels of namespace `ns` (empty when the namespace is unknown).
    pub fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(&(String::new(), ns.to_owned())).and_then(|n| n.metadata.labels.as_ref())
    }
}
