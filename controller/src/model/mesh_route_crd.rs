//! Serde types for the routing APIs users bring from other meshes: Istio's `VirtualService`
//! (`networking.istio.io` v1, v1beta1, v1alpha3: one schema) and SMI's `TrafficSplit` (`split.smi-spec.io` v1alpha2,
//! v1alpha3, v1alpha4), the fields the waypoint applies. As for Gateway API routes, the types are closed: a field
//! Ambit does not apply (a CORS policy, a delegate, `sourceLabels`…) fails the parse, so the object is refused with a
//! status that names the field instead of being applied in part.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::crd::Resource;

/// `networking.istio.io` VirtualService.
pub type VirtualService = Resource<VirtualServiceSpec>;
/// `split.smi-spec.io` TrafficSplit.
pub type TrafficSplit = Resource<TrafficSplitSpec>;

/// `spec` of a VirtualService.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    /// Destination hosts: `name`, `name.namespace`, or the FQDN of a Service.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Gateways the routes apply to; absent (or naming `mesh`) means mesh traffic, which is what a waypoint carries.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// HTTP routes, tried in order.
    #[serde(default)]
    pub http: Vec<VsHttpRoute>,
    /// TCP routes: parsed so that a manifest carrying them applies, reported as not applied.
    #[serde(default)]
    pub tcp: Vec<serde_yaml::Value>,
    /// Namespaces the VirtualService is visible to. Ambit applies a VirtualService only to Services of its own
    /// namespace, at their waypoint, whatever this says.
    #[serde(default)]
    pub export_to: Vec<String>,
}

/// `http[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsHttpRoute {
    /// For logs and metrics.
    #[serde(default)]
    pub name: Option<String>,
    /// OR-ed; none matches every request.
    #[serde(default, rename = "match")]
    pub matches: Vec<VsMatch>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<VsRouteDestination>,
    /// Answered by the waypoint instead of routed.
    #[serde(default)]
    pub redirect: Option<VsRedirect>,
    /// Rewrites before forwarding.
    #[serde(default)]
    pub rewrite: Option<VsRewrite>,
    /// The whole request (all attempts), Go duration syntax.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Retry policy; absent is Istio's default.
    #[serde(default)]
    pub retries: Option<VsRetries>,
    /// Delays and aborts.
    #[serde(default)]
    pub fault: Option<VsFault>,
    /// One mirror destination.
    #[serde(default)]
    pub mirror: Option<VsDestination>,
    /// Share of requests mirrored to `mirror` (100 when absent).
    #[serde(default)]
    pub mirror_percentage: Option<VsPercent>,
    /// Several mirrors, each with its share.
    #[serde(default)]
    pub mirrors: Vec<VsMirror>,
    /// Header changes for every destination.
    #[serde(default)]
    pub headers: Option<VsHeaders>,
}

/// `http[].match[]`: all set fields must match.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsMatch {
    /// For logs.
    #[serde(default)]
    pub name: Option<String>,
    /// The path.
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// The method.
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// Request headers by (lower-case) name.
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Query parameters by name.
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Compare `uri` ignoring case.
    #[serde(default)]
    pub ignore_uri_case: bool,
    /// Only requests to this service port.
    #[serde(default)]
    pub port: Option<u32>,
}

/// Istio's `StringMatch`: one of exact, prefix, regex (RE2, whole value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

/// `http[].route[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsRouteDestination {
    pub destination: VsDestination,
    /// Share of requests; absent on every destination: equal shares.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Header changes for requests sent here.
    #[serde(default)]
    pub headers: Option<VsHeaders>,
}

/// A destination Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsDestination {
    /// `name`, `name.namespace` or a Service FQDN.
    pub host: String,
    /// A DestinationRule subset.
    #[serde(default)]
    pub subset: Option<String>,
    /// The service port; may be left out when the service has one port or serves the request's port.
    #[serde(default)]
    pub port: Option<VsPort>,
}

/// `port: {number: N}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsPort {
    pub number: u32,
}

/// `{value: <percent>}`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsPercent {
    pub value: f64,
}

/// `mirrors[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsMirror {
    pub destination: VsDestination,
    #[serde(default)]
    pub percentage: Option<VsPercent>,
}

/// `headers`: changes to the request and to the response.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsHeaders {
    #[serde(default)]
    pub request: Option<VsHeaderOps>,
    #[serde(default)]
    pub response: Option<VsHeaderOps>,
}

/// `set` replaces, `add` appends, `remove` deletes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsHeaderOps {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `http[].redirect`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsRedirect {
    /// The new path.
    #[serde(default)]
    pub uri: Option<String>,
    /// The new host.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub scheme: Option<String>,
    /// 301 when absent (Istio's default).
    #[serde(default)]
    pub redirect_code: Option<u32>,
}

/// `http[].rewrite`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsRewrite {
    /// Replaces the matched prefix (a prefix match), else the whole path.
    #[serde(default)]
    pub uri: Option<String>,
    /// The new Host.
    #[serde(default)]
    pub authority: Option<String>,
}

/// `http[].retries`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsRetries {
    /// Retries allowed; 0 disables retries.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Timeout of each attempt.
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// Envoy's retry conditions, comma-separated.
    #[serde(default)]
    pub retry_on: Option<String>,
}

/// `http[].fault`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsFault {
    #[serde(default)]
    pub delay: Option<VsDelay>,
    #[serde(default)]
    pub abort: Option<VsAbort>,
}

/// `fault.delay`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsDelay {
    pub fixed_delay: String,
    /// Absent (with `percent`): every request.
    #[serde(default)]
    pub percentage: Option<VsPercent>,
    /// Deprecated integer percentage.
    #[serde(default)]
    pub percent: Option<u32>,
}

/// `fault.abort`: `httpStatus` or `grpcStatus`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsAbort {
    #[serde(default)]
    pub http_status: Option<u32>,
    /// A gRPC status name, e.g. `UNAVAILABLE`.
    #[serde(default)]
    pub grpc_status: Option<String>,
    /// Absent: every request.
    #[serde(default)]
    pub percentage: Option<VsPercent>,
}

/// `spec` of a TrafficSplit (v1alpha2 to v1alpha4 share these fields).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSplitSpec {
    /// The apex Service (in the split's namespace) whose traffic is split.
    pub service: String,
    /// Where it goes.
    #[serde(default)]
    pub backends: Vec<TrafficSplitBackend>,
    /// HTTPRouteGroup references (v1alpha3+): not applied; a split with matches is refused.
    #[serde(default)]
    pub matches: Vec<serde_yaml::Value>,
}

/// `backends[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSplitBackend {
    /// A Service of the split's namespace.
    pub service: String,
    /// Relative share.
    pub weight: u32,
}
