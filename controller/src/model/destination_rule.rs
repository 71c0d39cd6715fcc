//! What a DestinationRule's `trafficPolicy` comes to at the waypoint: its `loadBalancer` and `outlierDetection`
//! become an `ambit.waypoint.v1.TrafficPolicy` (a subset's fields over the rule's, as Istio merges them); the policies
//! the waypoint does not apply yet are named, so the object's status says so instead of the rule looking applied.

use ambit_api::waypoint::load_balancer::{HashKey, Simple};
use ambit_api::waypoint::{LoadBalancer, OutlierDetection, TrafficPolicy as WaypointPolicy};

use super::mesh_route_convert::go_duration;
use super::mesh_route_crd::{DestinationRule, Outlier, TrafficPolicy};

/// Whether the waypoint can use `dr`; an invalid one is left out whole (its subsets too).
pub fn check(dr: &DestinationRule) -> Result<(), String> {
    if dr.spec.workload_selector.is_some() {
        return Err("workloadSelector applies to sidecars; ambient has none".into());
    }
    let policies =
        dr.spec.traffic_policy.iter().chain(dr.spec.subsets.iter().filter_map(|s| s.traffic_policy.as_ref()));
    for tp in policies {
        load_balancer(tp)?;
        tp.outlier_detection.as_ref().map(outlier_detection).transpose()?;
    }
    Ok(())
}

/// The traffic policy of `dr` for subset `subset` (its fields over the rule's), or for the whole host; `None` when
/// it sets nothing the waypoint applies. `dr` has passed [`check`].
pub fn policy_for(dr: &DestinationRule, subset: Option<&str>) -> Option<WaypointPolicy> {
    let convert = |tp: &TrafficPolicy| WaypointPolicy {
        load_balancer: load_balancer(tp).ok().flatten(),
        outlier_detection: tp.outlier_detection.as_ref().and_then(|o| outlier_detection(o).ok()),
    };
    let top = dr.spec.traffic_policy.as_ref().map(convert).unwrap_or_default();
    let own = subset
        .and_then(|name| dr.spec.subsets.iter().find(|s| s.name == name))
        .and_then(|s| s.traffic_policy.as_ref())
        .map(convert)
        .unwrap_or_default();
    let merged = WaypointPolicy {
        load_balancer: own.load_balancer.or(top.load_balancer),
        outlier_detection: own.outlier_detection.or(top.outlier_detection),
    };
    (merged != WaypointPolicy::default()).then_some(merged)
}

/// `outlierDetection` with Istio's defaults: 5 consecutive 5xx (`consecutiveErrors`, its old name, too), gateway
/// errors off, 10 s interval, 30 s base ejection, at most 10 % ejected, no minimum health.
pub fn outlier_detection(o: &Outlier) -> Result<OutlierDetection, String> {
    let duration = |d: &Option<String>, default: u64, what: &str| -> Result<prost_types::Duration, String> {
        match d {
            None => Ok(prost_types::Duration { seconds: default as i64, nanos: 0 }),
            Some(d) => go_duration(d).map_err(|e| format!("outlierDetection.{what}: {e}")),
        }
    };
    let percent = |p: Option<u32>, default: u32, what: &str| match p.unwrap_or(default) {
        p @ 0..=100 => Ok(p),
        p => Err(format!("outlierDetection.{what} {p} is over 100")),
    };
    Ok(OutlierDetection {
        consecutive_5xx_errors: o.consecutive_5xx_errors.or(o.consecutive_errors).unwrap_or(5),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval: Some(duration(&o.interval, 10, "interval")?),
        base_ejection_time: Some(duration(&o.base_ejection_time, 30, "baseEjectionTime")?),
        max_ejection_percent: percent(o.max_ejection_percent, 10, "maxEjectionPercent")?,
        min_health_percent: percent(o.min_health_percent, 0, "minHealthPercent")?,
    })
}

/// Every part of `dr` the waypoint does not apply yet.
pub fn not_applied_in(dr: &DestinationRule) -> Vec<String> {
    let top = dr.spec.traffic_policy.iter().flat_map(not_applied).map(|w| format!("trafficPolicy.{w}"));
    let subsets = dr.spec.subsets.iter().flat_map(|s| {
        s.traffic_policy.iter().flat_map(not_applied).map(move |w| format!("subsets[{}].trafficPolicy.{w}", s.name))
    });
    top.chain(subsets).collect()
}

/// The load balancer `tp` sets (`None`: the waypoint's default), or why it is invalid.
pub fn load_balancer(tp: &TrafficPolicy) -> Result<Option<LoadBalancer>, String> {
    let Some(lb) = &tp.load_balancer else { return Ok(None) };
    let simple = match lb.simple.as_deref().unwrap_or("UNSPECIFIED") {
        "UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN" => Simple::LeastRequest,
        "ROUND_ROBIN" => Simple::RoundRobin,
        "RANDOM" => Simple::Random,
        "PASSTHROUGH" => {
            return Err(
                "loadBalancer.simple PASSTHROUGH is not supported: a waypoint sends to the Service's endpoints".into()
            )
        }
        other => return Err(format!("loadBalancer.simple {other:?} is not a load balancer Istio defines")),
    };
    let hash_key = match &lb.consistent_hash {
        None => None,
        Some(c) => {
            let keys = [
                c.http_header_name.as_ref().map(|h| HashKey::HttpHeaderName(h.to_ascii_lowercase())),
                c.http_cookie.as_ref().map(|k| HashKey::HttpCookie(k.name.clone())),
                c.use_source_ip.filter(|u| *u).map(HashKey::UseSourceIp),
                c.http_query_parameter_name.as_ref().map(|q| HashKey::HttpQueryParameterName(q.clone())),
            ];
            let mut set = keys.into_iter().flatten();
            let (Some(key), None) = (set.next(), set.next()) else {
                return Err("consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, \
                            httpQueryParameterName"
                    .into());
            };
            // An HTTP token (RFC 9110 §5.6.2), as a header name must be.
            let token = |h: &str| {
                !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            };
            if let HashKey::HttpHeaderName(h) = &key {
                if !token(h) {
                    return Err(format!("consistentHash header {h:?} is not a header name"));
                }
            }
            Some(key)
        }
    };
    Ok(Some(LoadBalancer { simple: simple.into(), hash_key }))
}

/// The parts of `tp` the waypoint does not apply yet, by field name.
pub fn not_applied(tp: &TrafficPolicy) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut note = |present: bool, what: &'static str| {
        if present {
            out.push(what);
        }
    };
    note(tp.connection_pool.is_some(), "connectionPool");
    if let Some(o) = &tp.outlier_detection {
        note(o.split_external_local_origin_errors.is_some(), "outlierDetection.splitExternalLocalOriginErrors");
        note(o.consecutive_local_origin_failures.is_some(), "outlierDetection.consecutiveLocalOriginFailures");
    }
    note(tp.tls.is_some(), "tls");
    note(tp.port_level_settings.is_some(), "portLevelSettings");
    note(tp.proxy_protocol.is_some(), "proxyProtocol");
    note(tp.tunnel.is_some(), "tunnel");
    note(tp.retry_budget.is_some(), "retryBudget");
    if let Some(lb) = &tp.load_balancer {
        note(lb.locality_lb_setting.is_some(), "loadBalancer.localityLbSetting");
        note(lb.warmup_duration_secs.is_some() || lb.warmup.is_some(), "loadBalancer.warmup");
        if let Some(c) = &lb.consistent_hash {
            note(
                c.ring_hash.is_some() || c.minimum_ring_size.is_some(),
                "consistentHash.ringHash (a Maglev table is used)",
            );
            note(
                c.http_cookie.as_ref().is_some_and(|k| k.ttl.is_some()),
                "consistentHash.httpCookie.ttl (a request without the cookie is not given one)",
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outlier_detection_takes_istios_defaults_and_a_subset_overrides_field_by_field() {
        let o = tp(
            "outlierDetection: {consecutive5xxErrors: 3, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 50}",
        );
        let od = outlier_detection(o.outlier_detection.as_ref().unwrap()).unwrap();
        assert_eq!((od.consecutive_5xx_errors, od.max_ejection_percent, od.min_health_percent), (3, 50, 0));
        assert_eq!((od.interval.unwrap().seconds, od.base_ejection_time.unwrap().seconds), (30, 30));
        let d = outlier_detection(&Default::default()).unwrap();
        assert_eq!((d.consecutive_5xx_errors, d.consecutive_gateway_errors, d.max_ejection_percent), (5, 0, 10));
        assert_eq!(d.interval.unwrap().seconds, 10);

        let dr: DestinationRule = serde_yaml::from_str(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec:\n  host: web\n  \
             trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 7}}\n  \
             subsets: [{name: v1, trafficPolicy: {loadBalancer: {simple: RANDOM}}}, {name: v2}]\n",
        )
        .unwrap();
        let v1 = policy_for(&dr, Some("v1")).unwrap();
        assert_eq!(v1.load_balancer.unwrap().simple(), Simple::Random, "the subset's own");
        assert_eq!(v1.outlier_detection.unwrap().consecutive_5xx_errors, 7, "the rule's, where the subset sets none");
        assert_eq!(policy_for(&dr, Some("v2")).unwrap().load_balancer.unwrap().simple(), Simple::RoundRobin);
    }

    fn tp(yaml: &str) -> TrafficPolicy {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn simple_and_hash_load_balancers_convert() {
        let lb = load_balancer(&tp("loadBalancer: {simple: ROUND_ROBIN}")).unwrap().unwrap();
        assert_eq!((lb.simple(), lb.hash_key), (Simple::RoundRobin, None));
        let lb = load_balancer(&tp("loadBalancer: {simple: LEAST_CONN}")).unwrap().unwrap();
        assert_eq!(lb.simple(), Simple::LeastRequest, "LEAST_CONN is LEAST_REQUEST's old name");
        let lb = load_balancer(&tp("loadBalancer: {consistentHash: {httpHeaderName: X-User}}")).unwrap().unwrap();
        assert_eq!(lb.hash_key, Some(HashKey::HttpHeaderName("x-user".into())));
        let lb = load_balancer(&tp("loadBalancer: {consistentHash: {useSourceIp: true}}")).unwrap().unwrap();
        assert_eq!(lb.hash_key, Some(HashKey::UseSourceIp(true)));
        let c = tp("loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 0s}, minimumRingSize: 1024}}");
        assert_eq!(load_balancer(&c).unwrap().unwrap().hash_key, Some(HashKey::HttpCookie("session".into())));
        assert_eq!(not_applied(&c).len(), 2, "{:?}", not_applied(&c));
        assert_eq!(load_balancer(&tp("connectionPool: {tcp: {maxConnections: 10}}")).unwrap(), None);
    }

    #[test]
    fn what_cannot_be_applied_is_refused_or_named() {
        assert!(load_balancer(&tp("loadBalancer: {simple: PASSTHROUGH}")).unwrap_err().contains("PASSTHROUGH"));
        assert!(load_balancer(&tp("loadBalancer: {simple: FASTEST}")).is_err());
        let two = tp("loadBalancer: {consistentHash: {httpHeaderName: a, useSourceIp: true}}");
        assert!(load_balancer(&two).unwrap_err().contains("exactly one"));
        assert!(load_balancer(&tp("loadBalancer: {consistentHash: {httpHeaderName: 'a b'}}")).is_err());
        let all =
            tp("{connectionPool: {}, outlierDetection: {}, loadBalancer: {simple: RANDOM, localityLbSetting: {}}}");
        assert_eq!(not_applied(&all), ["connectionPool", "loadBalancer.localityLbSetting"]);
        let bad = tp("outlierDetection: {maxEjectionPercent: 150}");
        assert!(outlier_detection(bad.outlier_detection.as_ref().unwrap()).unwrap_err().contains("150"));
    }
}
