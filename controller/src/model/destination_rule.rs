//! What a DestinationRule's `trafficPolicy` comes to at the waypoint: its `loadBalancer`, `connectionPool` and
//! `outlierDetection` become an `ambit.waypoint.v1.TrafficPolicy`, merged as Istio merges them (the rule's
//! `portLevelSettings` for the port replace its policy; a subset's fields override; then the subset's own port-level
//! settings replace those); the policies the waypoint does not apply are named, so the object's status says so instead
//! of the rule looking applied.

use ambit_api::waypoint::load_balancer::{HashKey, Simple};
use ambit_api::waypoint::{ConnectionPool, LoadBalancer, OutlierDetection, TrafficPolicy as WaypointPolicy};

use super::mesh_route_convert::go_duration;
use super::mesh_route_crd::{
    ConnectionPoolSettings, DestinationRule, LoadBalancerSettings, Outlier, PortTrafficPolicy, TrafficPolicy,
};

/// Whether the waypoint can use `dr`; an invalid one is left out whole (its subsets too).
pub fn check(dr: &DestinationRule) -> Result<(), String> {
    if dr.spec.workload_selector.is_some() {
        return Err("workloadSelector applies to sidecars; ambient has none".into());
    }
    let policies =
        dr.spec.traffic_policy.iter().chain(dr.spec.subsets.iter().filter_map(|s| s.traffic_policy.as_ref()));
    for tp in policies {
        Parts::of(tp).convert()?;
        for (i, pl) in tp.port_level_settings.iter().enumerate() {
            match pl.port.as_ref().map(|p| p.number) {
                Some(1..=65535) => {}
                _ => return Err(format!("portLevelSettings[{i}]: needs port.number between 1 and 65535")),
            }
            Parts::of_port(pl).convert().map_err(|e| format!("portLevelSettings[{i}].{e}"))?;
        }
    }
    Ok(())
}

/// The policies a traffic policy (or one of its `portLevelSettings`) sets that the waypoint applies.
#[derive(Clone, Copy, Default)]
struct Parts<'a> {
    load_balancer: Option<&'a LoadBalancerSettings>,
    connection_pool: Option<&'a ConnectionPoolSettings>,
    outlier_detection: Option<&'a Outlier>,
}

impl<'a> Parts<'a> {
    fn of(tp: &'a TrafficPolicy) -> Self {
        Parts {
            load_balancer: tp.load_balancer.as_ref(),
            connection_pool: tp.connection_pool.as_ref(),
            outlier_detection: tp.outlier_detection.as_ref(),
        }
    }

    fn of_port(pl: &'a PortTrafficPolicy) -> Self {
        Parts {
            load_balancer: pl.load_balancer.as_ref(),
            connection_pool: pl.connection_pool.as_ref(),
            outlier_detection: pl.outlier_detection.as_ref(),
        }
    }

    /// `tp` for Service port `port`: its `portLevelSettings` entry for the port replaces it whole (a field that
    /// entry does not set takes the default, not the policy's, as Istio documents).
    fn at_port(tp: &'a TrafficPolicy, port: u32) -> Self {
        let own = tp.port_level_settings.iter().find(|pl| pl.port.as_ref().map(|p| p.number) == Some(port));
        own.map_or_else(|| Parts::of(tp), Parts::of_port)
    }

    /// Each field `over` sets replaces this one's.
    fn overridden_by(self, over: Parts<'a>) -> Self {
        Parts {
            load_balancer: over.load_balancer.or(self.load_balancer),
            connection_pool: over.connection_pool.or(self.connection_pool),
            outlier_detection: over.outlier_detection.or(self.outlier_detection),
        }
    }

    fn convert(self) -> Result<WaypointPolicy, String> {
        Ok(WaypointPolicy {
            load_balancer: self.load_balancer.map(load_balancer).transpose()?,
            outlier_detection: self.outlier_detection.map(outlier_detection).transpose()?,
            connection_pool: self.connection_pool.map(connection_pool).transpose()?,
        })
    }
}

/// The traffic policy of `dr` for Service port `port` of subset `subset`, or of the whole host; `None` when it sets
/// nothing the waypoint applies. Istio's merge: the rule's policy at the port, each field the subset's policy sets
/// over it, and the subset's own `portLevelSettings` for the port over all. `dr` has passed [`check`].
pub fn policy_for(dr: &DestinationRule, subset: Option<&str>, port: u32) -> Option<WaypointPolicy> {
    let top = dr.spec.traffic_policy.as_ref().map(|tp| Parts::at_port(tp, port)).unwrap_or_default();
    let own =
        subset.and_then(|name| dr.spec.subsets.iter().find(|s| s.name == name)).and_then(|s| s.traffic_policy.as_ref());
    let merged = match own {
        None => top,
        Some(tp) => match tp.port_level_settings.iter().find(|pl| pl.port.as_ref().map(|p| p.number) == Some(port)) {
            Some(pl) => Parts::of_port(pl),
            None => top.overridden_by(Parts::of(tp)),
        },
    };
    let policy = merged.convert().ok()?;
    (policy != WaypointPolicy::default()).then_some(policy)
}

/// `connectionPool`: Istio's 0 (or absent) is no limit; durations as Istio writes them.
pub fn connection_pool(cp: &ConnectionPoolSettings) -> Result<ConnectionPool, String> {
    let duration = |d: Option<&String>, what: &str| {
        d.map(|d| go_duration(d).map_err(|e| format!("connectionPool.{what}: {e}"))).transpose()
    };
    let tcp = cp.tcp.clone().unwrap_or_default();
    let http = cp.http.clone().unwrap_or_default();
    Ok(ConnectionPool {
        max_connections: tcp.max_connections.unwrap_or(0),
        connect_timeout: duration(tcp.connect_timeout.as_ref(), "tcp.connectTimeout")?,
        http1_max_pending_requests: http.http1_max_pending_requests.unwrap_or(0),
        http2_max_requests: http.http2_max_requests.unwrap_or(0),
        max_requests_per_connection: http.max_requests_per_connection.unwrap_or(0),
        max_retries: http.max_retries.unwrap_or(0),
        idle_timeout: duration(http.idle_timeout.as_ref(), "http.idleTimeout")?,
    })
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

/// Every part of `dr` the waypoint does not apply.
pub fn not_applied_in(dr: &DestinationRule) -> Vec<String> {
    let top = dr.spec.traffic_policy.iter().flat_map(not_applied).map(|w| format!("trafficPolicy.{w}"));
    let subsets = dr.spec.subsets.iter().flat_map(|s| {
        s.traffic_policy.iter().flat_map(not_applied).map(move |w| format!("subsets[{}].trafficPolicy.{w}", s.name))
    });
    top.chain(subsets).collect()
}

/// A `loadBalancer`, or why it is invalid.
pub fn load_balancer(lb: &LoadBalancerSettings) -> Result<LoadBalancer, String> {
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
    // With a TTL the waypoint makes the cookie for a request that has none.
    let cookie = lb.consistent_hash.as_ref().and_then(|c| c.http_cookie.as_ref());
    let cookie_ttl = cookie
        .and_then(|k| k.ttl.as_deref())
        .map(|ttl| go_duration(ttl).map_err(|e| format!("consistentHash.httpCookie.ttl: {e}")))
        .transpose()?;
    let cookie_path = cookie.and_then(|k| k.path.clone()).unwrap_or_default();
    Ok(LoadBalancer { simple: simple.into(), hash_key, cookie_ttl, cookie_path })
}

/// The parts of `tp` the waypoint does not apply, by field path.
pub fn not_applied(tp: &TrafficPolicy) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |present: bool, what: &str| {
        if present {
            out.push(what.to_owned());
        }
    };
    note(tp.tls.is_some(), "tls");
    note(tp.proxy_protocol.is_some(), "proxyProtocol");
    note(tp.tunnel.is_some(), "tunnel");
    note(tp.retry_budget.is_some(), "retryBudget");
    parts_not_applied(Parts::of(tp), "", &mut out);
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let at = format!("portLevelSettings[{i}].");
        if pl.tls.is_some() {
            out.push(format!("{at}tls"));
        }
        parts_not_applied(Parts::of_port(pl), &at, &mut out);
    }
    out
}

/// The fields of the applied policies that are not applied, each prefixed with `at`.
fn parts_not_applied(parts: Parts, at: &str, out: &mut Vec<String>) {
    let mut note = |present: bool, what: &str| {
        if present {
            out.push(format!("{at}{what}"));
        }
    };
    if let Some(o) = parts.outlier_detection {
        note(o.split_external_local_origin_errors.is_some(), "outlierDetection.splitExternalLocalOriginErrors");
        note(o.consecutive_local_origin_failures.is_some(), "outlierDetection.consecutiveLocalOriginFailures");
    }
    if let Some(cp) = parts.connection_pool {
        if let Some(t) = &cp.tcp {
            note(t.tcp_keepalive.is_some(), "connectionPool.tcp.tcpKeepalive");
            note(t.max_connection_duration.is_some(), "connectionPool.tcp.maxConnectionDuration");
            note(t.idle_timeout.is_some(), "connectionPool.tcp.idleTimeout");
        }
        if let Some(h) = &cp.http {
            note(h.h2_upgrade_policy.is_some(), "connectionPool.http.h2UpgradePolicy");
            note(h.use_client_protocol.is_some(), "connectionPool.http.useClientProtocol");
            note(h.max_concurrent_streams.is_some(), "connectionPool.http.maxConcurrentStreams");
        }
    }
    if let Some(lb) = parts.load_balancer {
        note(lb.locality_lb_setting.is_some(), "loadBalancer.localityLbSetting");
        note(lb.warmup_duration_secs.is_some() || lb.warmup.is_some(), "loadBalancer.warmup");
        if let Some(c) = &lb.consistent_hash {
            note(
                c.ring_hash.is_some() || c.minimum_ring_size.is_some(),
                "loadBalancer.consistentHash.ringHash (a Maglev table is used)",
            );
            note(
                c.http_cookie.as_ref().is_some_and(|k| k.attributes.is_some()),
                "loadBalancer.consistentHash.httpCookie.attributes",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(yaml: &str) -> TrafficPolicy {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn dr(spec: &str) -> DestinationRule {
        let yaml =
            format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r}}\nspec:\n{spec}");
        serde_yaml::from_str(&yaml).unwrap()
    }

    /// The load balancer of `yaml`'s policy.
    fn lb(yaml: &str) -> Result<LoadBalancer, String> {
        load_balancer(tp(yaml).load_balancer.as_ref().unwrap())
    }

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

        let dr = dr("  host: web\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: \
                     {consecutive5xxErrors: 7}}\n  subsets: [{name: v1, trafficPolicy: {loadBalancer: {simple: RANDOM}}}, \
                     {name: v2}]\n");
        let v1 = policy_for(&dr, Some("v1"), 80).unwrap();
        assert_eq!(v1.load_balancer.unwrap().simple(), Simple::Random, "the subset's own");
        assert_eq!(v1.outlier_detection.unwrap().consecutive_5xx_errors, 7, "the rule's, where the subset sets none");
        assert_eq!(policy_for(&dr, Some("v2"), 80).unwrap().load_balancer.unwrap().simple(), Simple::RoundRobin);
    }

    #[test]
    fn connection_pools_convert_with_istios_no_limit_default() {
        let cp = tp("connectionPool: {tcp: {maxConnections: 10, connectTimeout: 250ms}, http: \
                     {http1MaxPendingRequests: 10, maxRequestsPerConnection: 2, maxRetries: 3, idleTimeout: 1m}}");
        let pool = connection_pool(cp.connection_pool.as_ref().unwrap()).unwrap();
        assert_eq!(
            (pool.max_connections, pool.http1_max_pending_requests, pool.max_requests_per_connection, pool.max_retries),
            (10, 10, 2, 3)
        );
        assert_eq!(pool.http2_max_requests, 0, "absent: no limit");
        assert_eq!(pool.connect_timeout.unwrap().nanos, 250_000_000);
        assert_eq!(pool.idle_timeout.unwrap().seconds, 60);
        assert!(not_applied(&cp).is_empty(), "{:?}", not_applied(&cp));
        let bad = tp("connectionPool: {tcp: {connectTimeout: soon}}");
        assert!(connection_pool(bad.connection_pool.as_ref().unwrap()).unwrap_err().contains("connectTimeout"));
        let unapplied = tp("connectionPool: {tcp: {tcpKeepalive: {time: 7200s}}, http: {h2UpgradePolicy: UPGRADE}}");
        assert_eq!(not_applied(&unapplied), ["connectionPool.tcp.tcpKeepalive", "connectionPool.http.h2UpgradePolicy"]);
    }

    #[test]
    fn port_level_settings_replace_the_policy_at_their_port_as_istio_merges() {
        let rule = dr("  host: web\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    \
                     connectionPool: {http: {http2MaxRequests: 100}}\n    portLevelSettings:\n    \
                     - port: {number: 8080}\n      loadBalancer: {simple: RANDOM}\n  subsets:\n  - name: v2\n    \
                     labels: {version: v2}\n    trafficPolicy:\n      outlierDetection: {consecutive5xxErrors: 2}\n      \
                     portLevelSettings:\n      - port: {number: 9090}\n        connectionPool: {tcp: {maxConnections: 1}}\n");
        check(&rule).unwrap();
        let at_80 = policy_for(&rule, None, 80).unwrap();
        assert_eq!(at_80.load_balancer.unwrap().simple(), Simple::RoundRobin);
        assert_eq!(at_80.connection_pool.unwrap().http2_max_requests, 100);
        let at_8080 = policy_for(&rule, None, 8080).unwrap();
        assert_eq!(at_8080.load_balancer.unwrap().simple(), Simple::Random, "the port's own");
        assert_eq!(at_8080.connection_pool, None, "not inherited from the policy, as Istio documents");
        let v2 = policy_for(&rule, Some("v2"), 8080).unwrap();
        assert_eq!(v2.load_balancer.unwrap().simple(), Simple::Random, "the rule's at the port");
        assert_eq!(v2.outlier_detection.unwrap().consecutive_5xx_errors, 2, "the subset's field over it");
        let v2_9090 = policy_for(&rule, Some("v2"), 9090).unwrap();
        assert_eq!(v2_9090.connection_pool.unwrap().max_connections, 1);
        assert_eq!((v2_9090.load_balancer, v2_9090.outlier_detection), (None, None), "the subset's port replaces all");
        let no_port = dr("  host: web\n  trafficPolicy: {portLevelSettings: [{loadBalancer: {simple: RANDOM}}]}\n");
        assert!(check(&no_port).unwrap_err().contains("portLevelSettings[0]"));
    }

    #[test]
    fn simple_and_hash_load_balancers_convert() {
        let b = lb("loadBalancer: {simple: ROUND_ROBIN}").unwrap();
        assert_eq!((b.simple(), b.hash_key), (Simple::RoundRobin, None));
        assert_eq!(lb("loadBalancer: {simple: LEAST_CONN}").unwrap().simple(), Simple::LeastRequest, "the old name");
        let b = lb("loadBalancer: {consistentHash: {httpHeaderName: X-User}}").unwrap();
        assert_eq!(b.hash_key, Some(HashKey::HttpHeaderName("x-user".into())));
        let b = lb("loadBalancer: {consistentHash: {useSourceIp: true}}").unwrap();
        assert_eq!(b.hash_key, Some(HashKey::UseSourceIp(true)));
        let c = "loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 0s}, minimumRingSize: 1024}}";
        let b = lb(c).unwrap();
        assert_eq!(b.hash_key, Some(HashKey::HttpCookie("session".into())));
        assert_eq!((b.cookie_ttl.map(|d| d.seconds), b.cookie_path.as_str()), (Some(0), ""), "0 s: a session cookie");
        assert_eq!(not_applied(&tp(c)), ["loadBalancer.consistentHash.ringHash (a Maglev table is used)"]);
        let b = lb("loadBalancer: {consistentHash: {httpCookie: {name: s, path: /app, ttl: 1h}}}").unwrap();
        assert_eq!((b.cookie_ttl.map(|d| d.seconds), b.cookie_path.as_str()), (Some(3600), "/app"));
        assert_eq!(lb("loadBalancer: {consistentHash: {httpCookie: {name: s}}}").unwrap().cookie_ttl, None);
    }

    #[test]
    fn what_cannot_be_applied_is_refused_or_named() {
        assert!(lb("loadBalancer: {simple: PASSTHROUGH}").unwrap_err().contains("PASSTHROUGH"));
        assert!(lb("loadBalancer: {simple: FASTEST}").is_err());
        let two = "loadBalancer: {consistentHash: {httpHeaderName: a, useSourceIp: true}}";
        assert!(lb(two).unwrap_err().contains("exactly one"));
        assert!(lb("loadBalancer: {consistentHash: {httpHeaderName: 'a b'}}").is_err());
        let all = tp("{connectionPool: {}, outlierDetection: {}, tls: {mode: ISTIO_MUTUAL}, \
                      loadBalancer: {simple: RANDOM, localityLbSetting: {}}}");
        assert_eq!(not_applied(&all), ["tls", "loadBalancer.localityLbSetting"]);
        let bad = tp("outlierDetection: {maxEjectionPercent: 150}");
        assert!(outlier_detection(bad.outlier_detection.as_ref().unwrap()).unwrap_err().contains("150"));
    }
}
