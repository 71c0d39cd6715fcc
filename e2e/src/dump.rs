//! Reading ztunnel's `/config_dump` (the `state` part: workloads, services, policies), so tests and the mesh can
//! wait until a change has reached a ztunnel instead of sleeping.

use std::net::Ipv4Addr;

use serde_json::Value;

/// The workload with address `ip` in a config dump.
pub fn workload(dump: &Value, ip: Ipv4Addr) -> Option<&Value> {
    let ip = ip.to_string();
    dump["state"]["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["addresses"].as_array().is_some_and(|a| a.iter().any(|x| x.as_str() == Some(ip.as_str()))))
}

/// Whether the workload with address `ip` is known and captured (HBONE).
pub fn has_captured_workload(dump: &Value, ip: Ipv4Addr) -> bool {
    workload(dump, ip).is_some_and(|w| w["protocol"] == "Hbone")
}

/// Whether policy `namespace/name` is in the dump.
pub fn has_policy(dump: &Value, namespace: &str, name: &str) -> bool {
    dump["state"]["policies"]
        .as_array()
        .is_some_and(|ps| ps.iter().any(|p| p["namespace"] == namespace && p["name"] == name))
}

/// The service with this hostname.
pub fn service<'a>(dump: &'a Value, hostname: &str) -> Option<&'a Value> {
    dump["state"]["services"].as_array()?.iter().find(|s| s["hostname"] == hostname)
}

/// How many workloads list service `namespace/hostname` among their services (its endpoints).
pub fn endpoints(dump: &Value, namespace: &str, hostname: &str) -> usize {
    let key = format!("{namespace}/{hostname}");
    dump["state"]["workloads"].as_array().map_or(0, |ws| {
        ws.iter().filter(|w| w["services"].as_array().is_some_and(|s| s.iter().any(|x| x == key.as_str()))).count()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lookups_find_workloads_policies_services_and_endpoints() {
        let dump = json!({"state": {
            "workloads": [
                {"addresses": ["10.1.0.2"], "protocol": "Hbone", "services": ["default/echo.default.svc.cluster.local"]},
                {"addresses": ["10.2.0.2"], "protocol": "None", "services": []},
            ],
            "services": [{"hostname": "echo.default.svc.cluster.local"}],
            "policies": [{"namespace": "default", "name": "deny-all"}],
        }});
        assert!(has_captured_workload(&dump, Ipv4Addr::new(10, 1, 0, 2)));
        assert!(!has_captured_workload(&dump, Ipv4Addr::new(10, 2, 0, 2)), "a NONE workload is not captured");
        assert!(workload(&dump, Ipv4Addr::new(10, 2, 0, 2)).is_some());
        assert!(workload(&dump, Ipv4Addr::new(10, 9, 0, 2)).is_none());
        assert!(has_policy(&dump, "default", "deny-all") && !has_policy(&dump, "other", "deny-all"));
        assert!(service(&dump, "echo.default.svc.cluster.local").is_some());
        assert_eq!(endpoints(&dump, "default", "echo.default.svc.cluster.local"), 1);
    }
}
