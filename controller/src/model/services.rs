//! Kubernetes Services → `istio.workload.Service`, and their endpoints: the
//! pods their selector picks, or, when EndpointSlices exist for the service,
//! the pods those slices list.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ambit_api::workload::{NetworkAddress, Port, PortList, Service};
use k8s_openapi::api::core::v1::{Pod, Service as KubeService, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::index::{validate_labels, PodIndex};
use super::objects::ObjectKey;
use super::waypoint::{Resolved, WaypointIndex};

/// Label an EndpointSlice carries naming its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a Service is rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceError {
    /// The selector is not valid label syntax.
    #[error("bad selector: {0}")]
    BadSelector(String),
    /// A service port is outside 1..=65535.
    #[error("port {0} out of range 1-65535")]
    BadPort(i32),
    /// A numeric targetPort is outside 1..=65535.
    #[error("targetPort {0} out of range 1-65535")]
    BadTargetPort(i32),
    /// A cluster IP does not parse.
    #[error("bad clusterIP {0:?}")]
    BadClusterIp(String),
}

/// A service and the pods behind it.
#[derive(Debug, PartialEq)]
pub struct ServiceModel {
    /// xDS name: `namespace/hostname`.
    pub key: String,
    /// The resource.
    pub service: Service,
    /// Cluster IPs, to find duplicates across services.
    pub vips: Vec<IpAddr>,
    /// Endpoints: pod index → port mappings for this service.
    pub endpoints: Vec<(usize, PortList)>,
    /// Notes (an unknown waypoint…).
    pub warnings: Vec<String>,
}

/// A service port: its number, and the target (a number, or a container port name).
struct PortSpec<'a> {
    name: &'a str,
    port: u32,
    target: Target<'a>,
}

enum Target<'a> {
    Number(u32),
    Named(&'a str),
}

/// EndpointSlices by (namespace, service name).
pub fn slices_by_service(slices: &BTreeMap<ObjectKey, EndpointSlice>) -> HashMap<(&str, &str), Vec<&EndpointSlice>> {
    let mut out: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for ((ns, _), s) in slices {
        if let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            out.entry((ns.as_str(), svc.as_str())).or_default().push(s);
        }
    }
    out
}

/// Everything a service build needs besides the service itself.
pub struct Context<'a> {
    /// Usable pods.
    pub pods: &'a PodIndex<'a>,
    /// Waypoints.
    pub waypoints: &'a WaypointIndex<'a>,
    /// EndpointSlices by service.
    pub slices: &'a HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    /// Cluster DNS suffix.
    pub domain_suffix: &'a str,
}

/// Builds one service; `None` for services ztunnel does not serve (ExternalName).
pub fn build(
    key: &ObjectKey,
    svc: &KubeService,
    ns_labels: Option<&BTreeMap<String, String>>,
    cx: &Context<'_>,
) -> Result<Option<ServiceModel>, ServiceError> {
    let (ns, name) = (key.0.as_str(), key.1.as_str());
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        tracing::debug!(%ns, %name, "ExternalName services are not served to ztunnel");
        return Ok(None);
    }
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty());
    if let Some(s) = selector {
        validate_labels(s).map_err(ServiceError::BadSelector)?;
    }
    let ports = spec.ports.iter().flatten().filter(|p| is_tcp(p)).map(port_spec).collect::<Result<Vec<_>, _>>()?;
    let mut vips = Vec::new();
    let listed = spec.cluster_ips.iter().flatten();
    for ip in spec.cluster_ip.iter().chain(listed) {
        if ip.is_empty() || ip == "None" {
            continue; // headless
        }
        let ip: IpAddr = ip.parse().map_err(|_| ServiceError::BadClusterIp(ip.clone()))?;
        if !vips.contains(&ip) {
            vips.push(ip);
        }
    }
    let hostname = format!("{name}.{ns}.svc.{}", cx.domain_suffix);
    let mut warnings = Vec::new();
    let waypoint = match cx.waypoints.resolve(ns, svc.metadata.labels.as_ref(), ns_labels, false) {
        Resolved::NoWaypoint => None,
        Resolved::Waypoint(w) => Some(w),
        Resolved::Missing(gw) => {
            warnings.push(format!("waypoint {gw} does not exist; traffic goes direct"));
            None
        }
    };
    let endpoints = match cx.slices.get(&(ns, name)) {
        Some(slices) => slice_endpoints(ns, slices, &ports, cx.pods),
        None => match selector {
            Some(sel) => cx
                .pods
                .select(Some(ns), sel)
                .into_iter()
                .filter_map(|i| pod_ports(cx.pods.pods[i].pod, &ports).map(|p| (i, p)))
                .collect(),
            None => Vec::new(),
        },
    };
    let service = Service {
        name: name.into(),
        namespace: ns.into(),
        hostname: hostname.clone(),
        addresses: vips.iter().map(|ip| NetworkAddress { network: String::new(), address: ip_bytes(ip) }).collect(),
        ports: ports
            .iter()
            .map(|p| Port {
                service_port: p.port,
                target_port: match p.target {
                    Target::Number(t) => t,
                    Target::Named(_) => 0, // resolved per pod
                },
            })
            .collect(),
        waypoint,
        ..Default::default()
    };
    Ok(Some(ServiceModel { key: format!("{ns}/{hostname}"), service, vips, endpoints, warnings }))
}

/// An IP as the bytes the workload API carries (4 or 16).
pub fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// ztunnel carries TCP only.
fn is_tcp(p: &ServicePort) -> bool {
    matches!(p.protocol.as_deref(), None | Some("TCP"))
}

fn port_spec(p: &ServicePort) -> Result<PortSpec<'_>, ServiceError> {
    let port = u16::try_from(p.port).ok().filter(|p| *p != 0).ok_or(ServiceError::BadPort(p.port))?;
    let target = match &p.target_port {
        None => Target::Number(u32::from(port)),
        Some(IntOrString::Int(t)) => {
            let t = u16::try_from(*t).ok().filter(|t| *t != 0).ok_or(ServiceError::BadTargetPort(*t))?;
            Target::Number(u32::from(t))
        }
        Some(IntOrString::String(s)) => match s.parse::<i32>() {
            // Some tools write numbers as strings.
            Ok(t) => Target::Number(u32::from(
                u16::try_from(t).ok().filter(|t| *t != 0).ok_or(ServiceError::BadTargetPort(t))?,
            )),
            Err(_) => Target::Named(s),
        },
    };
    Ok(PortSpec { name: p.name.as_deref().unwrap_or(""), port: u32::from(port), target })
}

/// The pod's mappings for `ports`, resolving named target ports against its
/// container ports; `None` when the service has ports and none resolve.
fn pod_ports(pod: &Pod, ports: &[PortSpec<'_>]) -> Option<PortList> {
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        let target = match p.target {
            Target::Number(t) => t,
            Target::Named(n) => match container_port(pod, n) {
                Some(t) => t,
                None => continue,
            },
        };
        out.push(Port { service_port: p.port, target_port: target });
    }
    (ports.is_empty() || !out.is_empty()).then_some(PortList { ports: out })
}

fn container_port(pod: &Pod, name: &str) -> Option<u32> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|cp| cp.name.as_deref() == Some(name))
        .and_then(|cp| u32::try_from(cp.container_port).ok())
}

/// Endpoints listed by EndpointSlices: pods found by targetRef or address;
/// target ports are the slice's ports of the same name as the service port.
fn slice_endpoints(
    ns: &str,
    slices: &[&EndpointSlice],
    ports: &[PortSpec<'_>],
    pods: &PodIndex<'_>,
) -> Vec<(usize, PortList)> {
    let mut by_pod: BTreeMap<usize, Vec<Port>> = BTreeMap::new();
    for s in slices {
        let slice_ports: Vec<(&str, u32)> = s
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.as_deref().unwrap_or(""), u32::try_from(p.port?).ok()?)))
            .collect();
        let mapped: Vec<Port> = ports
            .iter()
            .filter_map(|sp| {
                let (_, target) = slice_ports.iter().find(|(n, _)| *n == sp.name)?;
                Some(Port { service_port: sp.port, target_port: *target })
            })
            .collect();
        for e in s.endpoints.iter().flatten() {
            let by_ref = e.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| {
                let pod_ns = r.namespace.clone().unwrap_or_else(|| ns.to_owned());
                pods.by_key(&(pod_ns, r.name.clone()?))
            });
            let by_addr = || e.addresses.iter().find_map(|a| a.parse().ok().and_then(|ip| pods.by_ip(&ip)));
            let Some(i) = by_ref.or_else(by_addr) else {
                tracing::debug!(%ns, addresses = ?e.addresses, "endpoint without a known pod; skipped");
                continue;
            };
            let list = by_pod.entry(i).or_default();
            for p in &mapped {
                if !list.contains(p) {
                    list.push(*p);
                }
            }
        }
    }
    by_pod.into_iter().map(|(i, ports)| (i, PortList { ports })).collect()
}
