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
    /// TCP routes, tried in order: the first whose match names the port (or that has no match) takes a TCP port's
    /// connections.
    #[serde(default)]
    pub tcp: Vec<VsTcpRoute>,
    /// TLS routes (by SNI): read so that the refusal can say why, never applied.
    #[serde(default)]
    pub tls: Vec<serde_yaml::Value>,
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

/// `tcp[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsTcpRoute {
    /// OR-ed; none matches every TCP port of the host.
    #[serde(default, rename = "match")]
    pub matches: Vec<VsL4Match>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<VsL4Destination>,
}

/// `tcp[].match[]` (Istio's `L4MatchAttributes`): only `port` is applied, so the other attributes (source labels,
/// subnets…) are not in the type and fail the parse by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsL4Match {
    /// Only connections to this service port.
    #[serde(default)]
    pub port: Option<u32>,
}

/// `tcp[].route[]` (Istio's `RouteDestination`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VsL4Destination {
    pub destination: VsDestination,
    /// Share of connections; absent on every destination: equal shares.
    #[serde(default)]
    pub weight: Option<u32>,
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

/// `networking.istio.io` DestinationRule (v1, v1beta1, v1alpha3).
pub type DestinationRule = Resource<DestinationRuleSpec>;

/// `spec` of a DestinationRule: subsets and load balancers are applied; the other traffic policies are read so that
/// a manifest carrying them applies, and reported as not applied.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    /// The Service: `name`, `name.namespace` or its FQDN.
    pub host: String,
    /// For every request to the host (a subset's own policy replaces it for the subset's).
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named groups of the Service's endpoints, by label.
    #[serde(default)]
    pub subsets: Vec<DrSubset>,
    /// Visibility; a VirtualService finds the DestinationRules of its own namespace and of the Service's.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Sidecar-only: refused if set.
    #[serde(default)]
    pub workload_selector: Option<serde_yaml::Value>,
}

/// `subsets[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DrSubset {
    pub name: String,
    /// The endpoints whose pods carry all these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `trafficPolicy`: `loadBalancer`, `connectionPool`, `outlierDetection` and `portLevelSettings` are applied; the
/// others are read and reported as not applied.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<Outlier>,
    #[serde(default)]
    pub tls: Option<serde_yaml::Value>,
    /// Per Service port: each replaces the policy's `loadBalancer`, `connectionPool`, `outlierDetection` and `tls`
    /// for its port (unset fields fall back to the defaults, not to the policy's, as Istio documents).
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    #[serde(default)]
    pub proxy_protocol: Option<serde_yaml::Value>,
    #[serde(default)]
    pub tunnel: Option<serde_yaml::Value>,
    #[serde(default)]
    pub retry_budget: Option<serde_yaml::Value>,
}

/// `trafficPolicy.portLevelSettings[]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    /// The Service port it applies to.
    #[serde(default)]
    pub port: Option<VsPort>,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<Outlier>,
    #[serde(default)]
    pub tls: Option<serde_yaml::Value>,
}

/// `trafficPolicy.connectionPool`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    #[serde(default)]
    pub tcp: Option<TcpPoolSettings>,
    #[serde(default)]
    pub http: Option<HttpPoolSettings>,
}

/// `connectionPool.tcp`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpPoolSettings {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub connect_timeout: Option<String>,
    /// Not applied (reported): the kernel's keepalive on the tunnel's connection is ztunnel's.
    #[serde(default)]
    pub tcp_keepalive: Option<serde_yaml::Value>,
    /// Not applied (reported).
    #[serde(default)]
    pub max_connection_duration: Option<String>,
    /// Not applied (reported).
    #[serde(default)]
    pub idle_timeout: Option<String>,
}

/// `connectionPool.http`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPoolSettings {
    #[serde(default)]
    pub http1_max_pending_requests: Option<u32>,
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// Not applied (reported): the waypoint speaks the protocol the Service port declares.
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
    /// Not applied (reported).
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    /// Not applied (reported).
    #[serde(default)]
    pub max_concurrent_streams: Option<u32>,
}

/// `trafficPolicy.loadBalancer`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    /// `ROUND_ROBIN`, `LEAST_REQUEST`, `LEAST_CONN` (its old name), `RANDOM`, `PASSTHROUGH`, `UNSPECIFIED`.
    #[serde(default)]
    pub simple: Option<String>,
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    /// Not applied (one locality here).
    #[serde(default)]
    pub locality_lb_setting: Option<serde_yaml::Value>,
    /// Not applied.
    #[serde(default)]
    pub warmup_duration_secs: Option<serde_yaml::Value>,
    /// Not applied.
    #[serde(default)]
    pub warmup: Option<serde_yaml::Value>,
}

/// `loadBalancer.consistentHash`: one key.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    #[serde(default)]
    pub http_header_name: Option<String>,
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    /// The table is always Maglev's; a ring hash's settings are reported.
    #[serde(default)]
    pub ring_hash: Option<serde_yaml::Value>,
    #[serde(default)]
    pub maglev: Option<serde_yaml::Value>,
    #[serde(default)]
    pub minimum_ring_size: Option<serde_yaml::Value>,
}

/// `consistentHash.httpCookie`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookie {
    pub name: String,
    #[serde(default)]
    pub path: Option<String>,
    /// With a TTL, the waypoint makes the cookie when a request has none (as Envoy does).
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub attributes: Option<serde_yaml::Value>,
}

/// `trafficPolicy.outlierDetection`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Outlier {
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// Deprecated name of `consecutive5xxErrors`.
    #[serde(default)]
    pub consecutive_errors: Option<u32>,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    #[serde(default)]
    pub min_health_percent: Option<u32>,
    /// Not applied (reported).
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    /// Not applied (reported).
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<u32>,
}
