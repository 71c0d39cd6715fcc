//! Conversions from the xDS protobuf types (`istio.workload`, `istio.security`)
//! to the model. Field values the model cannot represent are errors, never
//! silently dropped; authorization conditions ztunnel cannot evaluate
//! (extensions, string matches of an unknown kind) mark their match
//! [`Match::unsupported`], so that its rule fails closed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ambit_api::security as pb_sec;
use ambit_api::workload as pb;
use ipnet::IpNet;

use super::model::{
    Action, Authorization, Clause, GatewayAddress, GatewayDestination, HealthStatus, LoadBalancer, Match, PortMapping,
    Rule, Scope, Service, ServiceAccountMatch, StringMatch, TunnelProtocol, Workload, WorkloadType,
};

/// Why a protobuf resource could not be converted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    /// An address field is neither 4 nor 16 bytes long.
    #[error("{object}: {field} holds {len} bytes, expected 4 (IPv4) or 16 (IPv6)")]
    BadIp { object: String, field: &'static str, len: usize },
    /// A CIDR prefix length is longer than its address.
    #[error("{object}: {field} has prefix length {len}, longer than the address")]
    BadPrefixLen { object: String, field: &'static str, len: u32 },
    /// A port is 0 where one is required, or above 65535.
    #[error("{object}: {field} {port} is not a port (1-65535)")]
    BadPort { object: String, field: &'static str, port: u32 },
    /// An enum field holds a value this version does not know.
    #[error("{object}: {field} has unknown value {value}")]
    UnknownEnum { object: String, field: &'static str, value: i32 },
    /// A waypoint address names neither an address nor a hostname.
    #[error("{object}: {field} names neither an address nor a hostname")]
    NoGatewayDestination { object: String, field: &'static str },
}

/// Parses an IP from its network-order bytes (4 or 16).
fn ip_from_bytes(b: &[u8], object: &str, field: &'static str) -> Result<IpAddr, ConvertError> {
    if let Ok(a) = <[u8; 4]>::try_from(b) {
        Ok(IpAddr::V4(Ipv4Addr::from(a)))
    } else if let Ok(a) = <[u8; 16]>::try_from(b) {
        Ok(IpAddr::V6(Ipv6Addr::from(a)))
    } else {
        Err(ConvertError::BadIp { object: object.to_owned(), field, len: b.len() })
    }
}

/// A port that must be set (1-65535).
pub(crate) fn port(p: u32, object: &str, field: &'static str) -> Result<u16, ConvertError> {
    match u16::try_from(p) {
        Ok(v) if v != 0 => Ok(v),
        _ => Err(ConvertError::BadPort { object: object.to_owned(), field, port: p }),
    }
}

/// A target port, where 0 means "same as the service port".
fn target_port(p: u32, object: &str) -> Result<u16, ConvertError> {
    u16::try_from(p).map_err(|_| ConvertError::BadPort { object: object.to_owned(), field: "target_port", port: p })
}

fn mappings(ports: &[pb::Port], object: &str) -> Result<Vec<PortMapping>, ConvertError> {
    ports
        .iter()
        .map(|p| {
            Ok(PortMapping {
                service_port: port(p.service_port, object, "service_port")?,
                target_port: target_port(p.target_port, object)?,
            })
        })
        .collect()
}

/// A waypoint (`GatewayAddress`); absent is `None`, present it must name
/// where the waypoint is and its HBONE port.
fn gateway(
    g: Option<pb::GatewayAddress>,
    object: &str,
    field: &'static str,
) -> Result<Option<GatewayAddress>, ConvertError> {
    use pb::gateway_address::Destination;
    let Some(g) = g else { return Ok(None) };
    let destination = match g.destination {
        Some(Destination::Address(a)) => {
            GatewayDestination::Address { ip: ip_from_bytes(&a.address, object, field)?, network: a.network }
        }
        Some(Destination::Hostname(h)) => GatewayDestination::Hostname { namespace: h.namespace, hostname: h.hostname },
        None => return Err(ConvertError::NoGatewayDestination { object: object.to_owned(), field }),
    };
    Ok(Some(GatewayAddress { destination, hbone_mtls_port: port(g.hbone_mtls_port, object, "hbone_mtls_port")? }))
}

fn unknown(object: &str, field: &'static str, value: i32) -> ConvertError {
    ConvertError::UnknownEnum { object: object.to_owned(), field, value }
}

impl TryFrom<pb::Workload> for Workload {
    type Error = ConvertError;

    fn try_from(w: pb::Workload) -> Result<Self, ConvertError> {
        let object = format!("workload {}", w.uid);
        let addresses = w.addresses.iter().map(|a| ip_from_bytes(a, &object, "addresses")).collect::<Result<_, _>>()?;
        let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
            Ok(pb::TunnelProtocol::None) => TunnelProtocol::None,
            Ok(pb::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
            Err(_) => return Err(unknown(&object, "tunnel_protocol", w.tunnel_protocol)),
        };
        let status = match pb::WorkloadStatus::try_from(w.status) {
            Ok(pb::WorkloadStatus::Healthy) => HealthStatus::Healthy,
            Ok(pb::WorkloadStatus::Unhealthy) => HealthStatus::Unhealthy,
            Err(_) => return Err(unknown(&object, "status", w.status)),
        };
        let workload_type = match pb::WorkloadType::try_from(w.workload_type) {
            Ok(pb::WorkloadType::Deployment) => WorkloadType::Deployment,
            Ok(pb::WorkloadType::Cronjob) => WorkloadType::CronJob,
            Ok(pb::WorkloadType::Pod) => WorkloadType::Pod,
            Ok(pb::WorkloadType::Job) => WorkloadType::Job,
            Err(_) => return Err(unknown(&object, "workload_type", w.workload_type)),
        };
        let services = w
            .services
            .iter()
            .map(|(k, v)| Ok((k.clone(), mappings(&v.ports, &object)?)))
            .collect::<Result<_, ConvertError>>()?;
        let waypoint = gateway(w.waypoint, &object, "waypoint")?;
        Ok(Workload {
            waypoint,
            addresses,
            protocol,
            status,
            services,
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            node: w.node,
            network: w.network,
            trust_domain: w.trust_domain,
            service_account: w.service_account,
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            workload_name: w.workload_name,
            workload_type,
            cluster_id: w.cluster_id,
            authorization_policies: w.authorization_policies,
        })
    }
}

impl TryFrom<pb::Service> for Service {
    type Error = ConvertError;

    /// The workload API has no least-connections mode, so services from xDS
    /// are round robin.
    fn try_from(s: pb::Service) -> Result<Self, ConvertError> {
        let object = format!("service {}/{}", s.namespace, s.hostname);
        let vips =
            s.addresses.iter().map(|a| ip_from_bytes(&a.address, &object, "addresses")).collect::<Result<_, _>>()?;
        let ports = mappings(&s.ports, &object)?;
        let waypoint = gateway(s.waypoint, &object, "waypoint")?;
        Ok(Service {
            waypoint,
            vips,
            ports,
            load_balancer: LoadBalancer::RoundRobin,
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
        })
    }
}

impl TryFrom<pb_sec::Authorization> for Authorization {
    type Error = ConvertError;

    fn try_from(a: pb_sec::Authorization) -> Result<Self, ConvertError> {
        let object = format!("policy {}/{}", a.namespace, a.name);
        let scope = match pb_sec::Scope::try_from(a.scope) {
            Ok(pb_sec::Scope::Global) => Scope::Global,
            Ok(pb_sec::Scope::Namespace) => Scope::Namespace,
            Ok(pb_sec::Scope::WorkloadSelector) => Scope::WorkloadSelector,
            Err(_) => return Err(unknown(&object, "scope", a.scope)),
        };
        let action = match pb_sec::Action::try_from(a.action) {
            Ok(pb_sec::Action::Allow) => Action::Allow,
            Ok(pb_sec::Action::Deny) => Action::Deny,
            Err(_) => return Err(unknown(&object, "action", a.action)),
        };
        let rules = a
            .rules
            .into_iter()
            .map(|r| {
                let clauses = r
                    .clauses
                    .into_iter()
                    .map(|c| {
                        let matches =
                            c.matches.into_iter().map(|m| convert_match(m, &object)).collect::<Result<_, _>>()?;
                        Ok(Clause { matches })
                    })
                    .collect::<Result<_, ConvertError>>()?;
                Ok(Rule { clauses })
            })
            .collect::<Result<_, ConvertError>>()?;
        Ok(Authorization { name: a.name, namespace: a.namespace, scope, action, rules, dry_run: a.dry_run })
    }
}

fn convert_match(m: pb_sec::Match, object: &str) -> Result<Match, ConvertError> {
    // Fields holding something this version cannot evaluate.
    let mut unknown = Vec::new();
    let mut strings = |v: Vec<pb_sec::StringMatch>, field| string_matches(v, field, &mut unknown);
    let namespaces = strings(m.namespaces, "namespaces");
    let not_namespaces = strings(m.not_namespaces, "not_namespaces");
    let principals = strings(m.principals, "principals").into_iter().map(StringMatch::principal).collect();
    let not_principals = strings(m.not_principals, "not_principals").into_iter().map(StringMatch::principal).collect();
    if !m.extensions.is_empty() {
        unknown.push("extensions");
    }
    if !unknown.is_empty() {
        tracing::warn!(
            %object,
            fields = ?unknown,
            "authorization rule holds conditions ztunnel cannot evaluate; it fails closed \
             (in an ALLOW it never matches, in a DENY it always does)"
        );
    }
    let nets =
        |v: Vec<pb_sec::Address>, field| -> Result<Vec<_>, _> { v.iter().map(|a| ip_net(a, object, field)).collect() };
    let ports = |v: Vec<u32>, field| -> Result<Vec<_>, _> { v.into_iter().map(|p| port(p, object, field)).collect() };
    Ok(Match {
        namespaces,
        not_namespaces,
        principals,
        not_principals,
        service_accounts: m.service_accounts.into_iter().map(service_account).collect(),
        not_service_accounts: m.not_service_accounts.into_iter().map(service_account).collect(),
        source_ips: nets(m.source_ips, "source_ips")?,
        not_source_ips: nets(m.not_source_ips, "not_source_ips")?,
        destination_ips: nets(m.destination_ips, "destination_ips")?,
        not_destination_ips: nets(m.not_destination_ips, "not_destination_ips")?,
        destination_ports: ports(m.destination_ports, "destination_ports")?,
        not_destination_ports: ports(m.not_destination_ports, "not_destination_ports")?,
        unsupported: !unknown.is_empty(),
    })
}

/// One field's string matches. A match with no type decoded is one this
/// version does not know (a newer control plane's kind): it is left out and
/// `field` is noted in `unknown`, which makes the rule fail closed.
fn string_matches(
    v: Vec<pb_sec::StringMatch>,
    field: &'static str,
    unknown: &mut Vec<&'static str>,
) -> Vec<StringMatch> {
    use pb_sec::string_match::MatchType;
    let mut out = Vec::with_capacity(v.len());
    for s in v {
        match s.match_type {
            Some(MatchType::Exact(v)) => out.push(StringMatch::Exact(v)),
            Some(MatchType::Prefix(v)) => out.push(StringMatch::Prefix(v)),
            Some(MatchType::Suffix(v)) => out.push(StringMatch::Suffix(v)),
            Some(MatchType::Presence(_)) => out.push(StringMatch::Presence),
            None if unknown.last() != Some(&field) => unknown.push(field),
            None => {}
        }
    }
    out
}

fn service_account(s: pb_sec::ServiceAccountMatch) -> ServiceAccountMatch {
    ServiceAccountMatch { namespace: s.namespace, service_account: s.service_account }
}

fn ip_net(a: &pb_sec::Address, object: &str, field: &'static str) -> Result<IpNet, ConvertError> {
    let ip = ip_from_bytes(&a.address, object, field)?;
    let bad = || ConvertError::BadPrefixLen { object: object.to_owned(), field, len: a.length };
    let len = u8::try_from(a.length).map_err(|_| bad())?;
    IpNet::new(ip, len).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn pb_workload() -> pb::Workload {
        pb::Workload {
            uid: "cluster1//Pod/default/client".into(),
            name: "client".into(),
            namespace: "default".into(),
            addresses: vec![vec![10, 1, 0, 2], Ipv6Addr::LOCALHOST.octets().to_vec()],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            status: pb::WorkloadStatus::Unhealthy as i32,
            service_account: "client".into(),
            services: HashMap::from([(
                "default/echo.default.svc.cluster.local".to_owned(),
                pb::PortList { ports: vec![pb::Port { service_port: 80, target_port: 8080 }] },
            )]),
            authorization_policies: vec!["default/allow".into()],
            ..Default::default()
        }
    }

    #[test]
    fn workload_converts_addresses_protocol_status_and_services() {
        let w = Workload::try_from(pb_workload()).unwrap();
        assert_eq!(w.addresses, vec!["10.1.0.2".parse::<IpAddr>().unwrap(), "::1".parse().unwrap()]);
        assert_eq!(w.protocol, TunnelProtocol::Hbone);
        assert_eq!(w.status, HealthStatus::Unhealthy);
        assert_eq!(
            w.services["default/echo.default.svc.cluster.local"],
            vec![PortMapping { service_port: 80, target_port: 8080 }]
        );
        assert_eq!(w.authorization_policies, vec!["default/allow".to_owned()]);
    }

    #[test]
    fn workload_with_five_address_bytes_is_rejected_naming_it() {
        let mut w = pb_workload();
        w.addresses = vec![vec![1, 2, 3, 4, 5]];
        let err = Workload::try_from(w).unwrap_err();
        assert!(matches!(err, ConvertError::BadIp { len: 5, .. }));
        assert!(err.to_string().contains("workload cluster1//Pod/default/client"), "{err}");
    }

    #[test]
    fn workload_with_unknown_protocol_is_rejected() {
        let mut w = pb_workload();
        w.tunnel_protocol = 7;
        assert!(matches!(
            Workload::try_from(w),
            Err(ConvertError::UnknownEnum { field: "tunnel_protocol", value: 7, .. })
        ));
    }

    #[test]
    fn service_port_above_65535_is_rejected() {
        let s = pb::Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            addresses: vec![pb::NetworkAddress { network: String::new(), address: vec![10, 96, 0, 10] }],
            ports: vec![pb::Port { service_port: 70000, target_port: 0 }],
            ..Default::default()
        };
        assert!(matches!(Service::try_from(s.clone()), Err(ConvertError::BadPort { port: 70000, .. })));
        let mut ok = s;
        ok.ports[0].service_port = 80;
        let svc = Service::try_from(ok).unwrap();
        assert_eq!(svc.vips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(svc.ports, vec![PortMapping { service_port: 80, target_port: 0 }]);
        assert_eq!(svc.load_balancer, LoadBalancer::RoundRobin);
    }

    fn pb_waypoint(destination: pb::gateway_address::Destination) -> Option<pb::GatewayAddress> {
        Some(pb::GatewayAddress { destination: Some(destination), hbone_mtls_port: 15008 })
    }

    #[test]
    fn a_service_waypoint_given_as_a_hostname_is_kept() {
        let s = pb::Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            waypoint: pb_waypoint(pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: "default".into(),
                hostname: "waypoint.default.svc.cluster.local".into(),
            })),
            ..Default::default()
        };
        let svc = Service::try_from(s).unwrap();
        let wp = svc.waypoint.unwrap();
        assert_eq!(
            wp.destination,
            GatewayDestination::Hostname {
                namespace: "default".into(),
                hostname: "waypoint.default.svc.cluster.local".into()
            }
        );
        assert_eq!(wp.hbone_mtls_port, 15008);
        assert_eq!(wp.destination.service_key().unwrap(), "default/waypoint.default.svc.cluster.local");
    }

    #[test]
    fn a_workload_waypoint_given_as_an_address_is_kept_and_no_waypoint_is_none() {
        assert_eq!(Workload::try_from(pb_workload()).unwrap().waypoint, None);
        let mut w = pb_workload();
        w.waypoint = pb_waypoint(pb::gateway_address::Destination::Address(pb::NetworkAddress {
            network: "net1".into(),
            address: vec![10, 1, 0, 9],
        }));
        let wp = Workload::try_from(w).unwrap().waypoint.unwrap();
        assert_eq!(
            wp.destination,
            GatewayDestination::Address { network: "net1".into(), ip: "10.1.0.9".parse().unwrap() }
        );
        assert_eq!(wp.to_string(), "10.1.0.9:15008");
    }

    #[test]
    fn a_waypoint_without_destination_or_port_or_with_a_bad_ip_is_rejected() {
        let mut w = pb_workload();
        w.waypoint = Some(pb::GatewayAddress { destination: None, hbone_mtls_port: 15008 });
        let err = Workload::try_from(w).unwrap_err();
        assert_eq!(
            err.to_string(),
            "workload cluster1//Pod/default/client: waypoint names neither an address nor a hostname"
        );
        let mut w = pb_workload();
        w.waypoint = pb_waypoint(pb::gateway_address::Destination::Address(pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 1, 0],
        }));
        assert!(matches!(Workload::try_from(w), Err(ConvertError::BadIp { field: "waypoint", len: 3, .. })));
        let mut w = pb_workload();
        w.waypoint = pb_waypoint(pb::gateway_address::Destination::Address(pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 1, 0, 9],
        }));
        w.waypoint.as_mut().unwrap().hbone_mtls_port = 0;
        assert!(matches!(Workload::try_from(w), Err(ConvertError::BadPort { field: "hbone_mtls_port", port: 0, .. })));
    }

    fn pb_policy(m: pb_sec::Match) -> pb_sec::Authorization {
        pb_sec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: pb_sec::Scope::Namespace as i32,
            action: pb_sec::Action::Deny as i32,
            rules: vec![pb_sec::Rule { clauses: vec![pb_sec::Clause { matches: vec![m] }] }],
            dry_run: false,
        }
    }

    #[test]
    fn authorization_converts_every_match_field() {
        use pb_sec::string_match::MatchType;
        let sa =
            |ns: &str, name: &str| pb_sec::ServiceAccountMatch { namespace: ns.into(), service_account: name.into() };
        let m = pb_sec::Match {
            principals: vec![pb_sec::StringMatch { match_type: Some(MatchType::Exact("td/ns/a/sa/b".into())) }],
            not_principals: vec![pb_sec::StringMatch { match_type: Some(MatchType::Presence(())) }],
            service_accounts: vec![sa("a", "b")],
            not_service_accounts: vec![sa("c", "d")],
            namespaces: vec![pb_sec::StringMatch { match_type: Some(MatchType::Prefix("team-".into())) }],
            not_namespaces: vec![pb_sec::StringMatch { match_type: Some(MatchType::Suffix("-dev".into())) }],
            source_ips: vec![pb_sec::Address { address: vec![10, 0, 0, 0], length: 8 }],
            destination_ports: vec![8080],
            ..Default::default()
        };
        let a = Authorization::try_from(pb_policy(m)).unwrap();
        assert_eq!((a.scope, a.action), (Scope::Namespace, Action::Deny));
        let m = &a.rules[0].clauses[0].matches[0];
        assert_eq!(m.principals, vec![StringMatch::Exact("td/ns/a/sa/b".into())]);
        assert_eq!(m.not_principals, vec![StringMatch::Presence]);
        let sa = |ns: &str, name: &str| ServiceAccountMatch { namespace: ns.into(), service_account: name.into() };
        assert_eq!(m.service_accounts, vec![sa("a", "b")]);
        assert_eq!(m.not_service_accounts, vec![sa("c", "d")]);
        assert!(!m.unsupported);
        assert_eq!(m.namespaces, vec![StringMatch::Prefix("team-".into())]);
        assert_eq!(m.not_namespaces, vec![StringMatch::Suffix("-dev".into())]);
        assert_eq!(m.source_ips, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(m.destination_ports, vec![8080]);
    }

    #[test]
    fn authorization_with_ipv4_prefix_33_is_rejected() {
        let m = pb_sec::Match {
            source_ips: vec![pb_sec::Address { address: vec![10, 0, 0, 0], length: 33 }],
            ..Default::default()
        };
        let err = Authorization::try_from(pb_policy(m)).unwrap_err();
        assert_eq!(err.to_string(), "policy ns/p: source_ips has prefix length 33, longer than the address");
    }

    #[test]
    fn principals_written_with_the_scheme_lose_it() {
        use pb_sec::string_match::MatchType;
        let sm = |t| pb_sec::StringMatch { match_type: Some(t) };
        let m = pb_sec::Match {
            principals: vec![
                sm(MatchType::Exact("spiffe://td/ns/a/sa/b".into())),
                sm(MatchType::Prefix("spiffe://td/ns/a/".into())),
                sm(MatchType::Suffix("spiffe://td/ns/a/sa/c".into())),
                sm(MatchType::Suffix("/sa/d".into())),
            ],
            not_principals: vec![sm(MatchType::Exact("spiffe://td/ns/x/sa/y".into()))],
            ..Default::default()
        };
        let a = Authorization::try_from(pb_policy(m)).unwrap();
        let m = &a.rules[0].clauses[0].matches[0];
        assert_eq!(
            m.principals,
            vec![
                StringMatch::Exact("td/ns/a/sa/b".into()),
                StringMatch::Prefix("td/ns/a/".into()),
                StringMatch::Exact("td/ns/a/sa/c".into()),
                StringMatch::Suffix("/sa/d".into()),
            ]
        );
        assert_eq!(m.not_principals, vec![StringMatch::Exact("td/ns/x/sa/y".into())]);
    }

    #[test]
    fn extensions_or_an_unknown_string_match_mark_the_match_unsupported() {
        let m = pb_sec::Match { extensions: vec![vec![0x0a, 0x01, b'x']], ..Default::default() };
        assert!(Authorization::try_from(pb_policy(m)).unwrap().rules[0].clauses[0].matches[0].unsupported);
        let m = pb_sec::Match { principals: vec![pb_sec::StringMatch { match_type: None }], ..Default::default() };
        let a = Authorization::try_from(pb_policy(m)).unwrap();
        let m = &a.rules[0].clauses[0].matches[0];
        assert!(m.unsupported && m.principals.is_empty(), "{m:?}");
    }

    #[test]
    fn authorization_with_port_zero_is_rejected() {
        let m = pb_sec::Match { destination_ports: vec![0], ..Default::default() };
        assert!(matches!(Authorization::try_from(pb_policy(m)), Err(ConvertError::BadPort { port: 0, .. })));
    }
}

#[cfg(test)]
#[path = "istio_authz_tests.rs"]
mod istio_authz_tests;
