//! AuthorizationPolicy with `targetRefs` → `ambit.waypoint.v1.AuthorizationPolicy`, enforced by the waypoint with
//! every L7 attribute (Istio's semantics). Such a policy never reaches ztunnel ([`super::authz`] leaves it out);
//! policies with a selector (or none) stay L4 policies for ztunnel.
//!
//! Targets are a waypoint `Gateway` (group `gateway.networking.k8s.io`) or a `Service` (core group), in the policy's
//! namespace, as Istio binds them. CUSTOM and AUDIT are not enforced by Ambit's waypoint: the policy is not sent and
//! its status says so.

use ambit_api::waypoint::{
    policy_target, string_match, Action, AuthorizationPolicy, Condition, GatewayTarget, IpBlock, Operation, PolicyRule,
    PolicyTarget, ServiceAccount, ServiceTarget, Source, StringMatch,
};

use super::authz::{self, PolicyError, DRY_RUN_ANNOTATION};
use super::crd::{self, AuthorizationAction, AuthorizationPolicy as PolicyCrd, PolicyTargetReference};

/// `when` keys a waypoint evaluates (`request.headers[…]` and `request.auth.claims[…]` by prefix).
const CONDITION_KEYS: [&str; 10] = [
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
];

/// What a targeted policy becomes.
#[derive(Debug, Default, PartialEq)]
pub struct Converted {
    /// The resource; `None` when the waypoint does not enforce it (see `problem`).
    pub policy: Option<AuthorizationPolicy>,
    /// Why it is not enforced, or what of it is not.
    pub problem: Option<String>,
}

/// Whether `p` is bound by `targetRefs` (the waypoint's, not ztunnel's).
pub fn is_targeted(p: &PolicyCrd) -> bool {
    !p.spec.target_refs.is_empty() || p.spec.target_ref.is_some()
}

/// Converts a targeted policy; `domain_suffix` makes Service hostnames.
pub fn convert(p: &PolicyCrd, domain_suffix: &str) -> Result<Converted, PolicyError> {
    let namespace = p.metadata.namespace.clone().unwrap_or_default();
    let name = p.metadata.name.clone().unwrap_or_default();
    let action = match p.spec.action {
        AuthorizationAction::Allow => Action::Allow,
        AuthorizationAction::Deny => Action::Deny,
        a @ (AuthorizationAction::Audit | AuthorizationAction::Custom) => {
            let problem = format!("action {} is not supported by Ambit's waypoint", format!("{a:?}").to_uppercase());
            return Ok(Converted { policy: None, problem: Some(problem) });
        }
    };
    let mut ignored = Vec::new();
    let mut targets = Vec::new();
    for t in p.spec.target_refs.iter().chain(&p.spec.target_ref) {
        match target(t, &namespace, domain_suffix) {
            Some(t) => targets.push(t),
            None => ignored.push(format!("{}/{} {}", t.group, t.kind, t.name)),
        }
    }
    let rules = p.spec.rules.iter().map(|r| rule(r, &namespace)).collect::<Result<_, _>>()?;
    let dry_run = p.metadata.annotations.as_ref().and_then(|a| a.get(DRY_RUN_ANNOTATION)).is_some_and(|v| v == "true");
    let problem = (!ignored.is_empty()).then(|| {
        format!(
            "targetRefs {} ignored: a waypoint enforces policies targeting a waypoint Gateway or a Service of the \
             policy's namespace",
            ignored.join(", ")
        )
    });
    let policy = AuthorizationPolicy { namespace, name, targets, action: action.into(), rules, dry_run };
    Ok(Converted { policy: Some(policy), problem })
}

fn target(t: &PolicyTargetReference, ns: &str, domain_suffix: &str) -> Option<PolicyTarget> {
    if !t.namespace.is_empty() && t.namespace != ns {
        return None;
    }
    let kind = match (t.group.as_str(), t.kind.as_str()) {
        ("gateway.networking.k8s.io", "Gateway") => {
            policy_target::Kind::Gateway(GatewayTarget { namespace: ns.into(), name: t.name.clone() })
        }
        ("" | "core", "Service") => policy_target::Kind::Service(ServiceTarget {
            namespace: ns.into(),
            hostname: format!("{}.{ns}.svc.{domain_suffix}", t.name),
        }),
        _ => return None,
    };
    Some(PolicyTarget { kind: Some(kind) })
}

fn rule(r: &crd::AuthorizationRule, ns: &str) -> Result<PolicyRule, PolicyError> {
    Ok(PolicyRule {
        from: r.from.iter().map(|f| source(&f.source, ns)).collect::<Result<_, _>>()?,
        to: r.to.iter().map(|t| operation(&t.operation)).collect::<Result<_, _>>()?,
        when: r.when.iter().map(condition).collect::<Result<_, _>>()?,
    })
}

fn source(s: &crd::Source, ns: &str) -> Result<Source, PolicyError> {
    let strings = |v: &[String]| v.iter().map(|s| string(s)).collect();
    let principals = |v: &[String]| v.iter().map(|s| principal(s)).collect();
    let accounts = |v: &[String]| v.iter().map(|s| service_account(s, ns)).collect::<Result<_, _>>();
    Ok(Source {
        principals: principals(&s.principals),
        not_principals: principals(&s.not_principals),
        namespaces: strings(&s.namespaces),
        not_namespaces: strings(&s.not_namespaces),
        ip_blocks: ip_blocks(&s.ip_blocks)?,
        not_ip_blocks: ip_blocks(&s.not_ip_blocks)?,
        remote_ip_blocks: ip_blocks(&s.remote_ip_blocks)?,
        not_remote_ip_blocks: ip_blocks(&s.not_remote_ip_blocks)?,
        request_principals: strings(&s.request_principals),
        not_request_principals: strings(&s.not_request_principals),
        service_accounts: accounts(&s.service_accounts)?,
        not_service_accounts: accounts(&s.not_service_accounts)?,
    })
}

fn operation(o: &crd::Operation) -> Result<Operation, PolicyError> {
    let strings = |v: &[String]| v.iter().map(|s| string(s)).collect();
    Ok(Operation {
        hosts: strings(&o.hosts),
        not_hosts: strings(&o.not_hosts),
        ports: authz::ports(&o.ports)?,
        not_ports: authz::ports(&o.not_ports)?,
        methods: strings(&o.methods),
        not_methods: strings(&o.not_methods),
        paths: strings(&o.paths),
        not_paths: strings(&o.not_paths),
    })
}

/// Checks the key and the values the controller can check (addresses, ports); the rest travels as written.
fn condition(c: &crd::Condition) -> Result<Condition, PolicyError> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(PolicyError::EmptyCondition(c.key.clone()));
    }
    let bracketed = |prefix: &str| {
        c.key.strip_prefix(prefix).and_then(|r| r.strip_suffix(']')).is_some_and(|inner| !inner.is_empty())
    };
    let known =
        CONDITION_KEYS.contains(&c.key.as_str()) || bracketed("request.headers[") || bracketed("request.auth.claims[");
    if !known {
        return Err(PolicyError::UnknownConditionKey(c.key.clone()));
    }
    let all = || c.values.iter().chain(&c.not_values);
    match c.key.as_str() {
        "source.ip" | "remote.ip" | "destination.ip" => {
            all().try_for_each(|v| authz::ip_block(v).map(drop))?;
        }
        "destination.port" => {
            authz::ports(&all().cloned().collect::<Vec<_>>())?;
        }
        _ => {}
    }
    Ok(Condition { key: c.key.clone(), values: c.values.clone(), not_values: c.not_values.clone() })
}

/// Istio's string syntax as this package's StringMatch.
fn string(v: &str) -> StringMatch {
    from_l4(authz::string_match(v))
}

/// A principal without `spiffe://`, as ztunnel's L4 policies carry it ([`authz::principal`]).
fn principal(v: &str) -> StringMatch {
    from_l4(authz::principal(v))
}

/// The same match in this package's type (one parser of Istio's syntax for L4 and L7).
fn from_l4(m: ambit_api::security::StringMatch) -> StringMatch {
    use ambit_api::security::string_match::MatchType;
    let kind = match m.match_type {
        Some(MatchType::Presence(())) => string_match::Kind::Presence(true),
        Some(MatchType::Prefix(p)) => string_match::Kind::Prefix(p),
        Some(MatchType::Suffix(s)) => string_match::Kind::Suffix(s),
        Some(MatchType::Exact(e)) => string_match::Kind::Exact(e),
        None => string_match::Kind::Exact(String::new()),
    };
    StringMatch { kind: Some(kind) }
}

fn service_account(v: &str, ns: &str) -> Result<ServiceAccount, PolicyError> {
    let m = authz::service_account(v, ns)?;
    Ok(ServiceAccount { namespace: m.namespace, name: m.service_account })
}

fn ip_blocks(v: &[String]) -> Result<Vec<IpBlock>, PolicyError> {
    v.iter().map(|s| authz::ip_block(s).map(|a| IpBlock { address: a.address, length: a.length })).collect()
}

#[cfg(test)]
#[path = "authz_l7_tests.rs"]
mod tests;
