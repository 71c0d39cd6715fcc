//! What the runtime passes: the network configuration on stdin (with
//! `prevResult` and our own keys) and the `CNI_*` environment.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use super::error::{code, CniError};
use crate::agent::protocol::DEFAULT_AGENT_SOCKET;

/// The CNI versions this plugin speaks (VERSION's `supportedVersions`).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Where the kubeconfig the installer writes is, unless configured.
pub const DEFAULT_KUBECONFIG: &str = "/etc/cni/net.d/ambit-cni-kubeconfig";

/// The plugin's network configuration (the keys it reads; others are
/// ignored, as other plugins' keys in a chain must be).
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    /// The version of the spec the runtime speaks for this call.
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// The network name.
    #[serde(default)]
    pub name: String,
    /// The previous plugin's result, passed through unchanged.
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
    /// The node agent's socket.
    #[serde(default = "default_agent_socket")]
    pub agent_socket: PathBuf,
    /// The kubeconfig used to read pods and namespaces.
    #[serde(default = "default_kubeconfig")]
    pub kubeconfig: PathBuf,
    /// `tracing` filter for the plugin's stderr (default `info`).
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// GC: the attachments the runtime still has.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Vec<Attachment>,
    /// GC, the spec's earlier name for the same list; libcni sends both,
    /// so it is a field of its own (an alias would reject the duplicate).
    #[serde(rename = "cni.dev/attachments", default)]
    pub legacy_attachments: Vec<Attachment>,
}

/// One item of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    /// The container (sandbox) ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// The interface name.
    #[serde(default)]
    pub ifname: String,
}

fn default_agent_socket() -> PathBuf {
    PathBuf::from(DEFAULT_AGENT_SOCKET)
}
fn default_kubeconfig() -> PathBuf {
    PathBuf::from(DEFAULT_KUBECONFIG)
}
fn default_log_level() -> String {
    "info".into()
}

impl NetConf {
    /// Parses stdin: not JSON is code 6, a wrong shape code 7.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(stdin)
            .map_err(|e| CniError::new(code::DECODE, "network configuration on stdin is not JSON", e))?;
        serde_json::from_value(value)
            .map_err(|e| CniError::new(code::INVALID_CONFIG, "invalid network configuration", e))
    }

    /// Fails with code 1 unless `cniVersion` is one this plugin speaks.
    pub fn check_version(&self) -> Result<(), CniError> {
        if SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return Ok(());
        }
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("ambit-cni does not support CNI version {:?}", self.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ))
    }

    /// GC's valid attachments, under either name.
    pub fn gc_attachments(&self) -> &[Attachment] {
        if self.valid_attachments.is_empty() {
            &self.legacy_attachments
        } else {
            &self.valid_attachments
        }
    }

    /// The previous result, which a chained plugin requires.
    pub fn require_prev_result(&self) -> Result<&Value, CniError> {
        self.prev_result.as_ref().ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "ambit-cni is a chained plugin: it must follow the main network plugin (no prevResult)",
                "",
            )
        })
    }
}

/// The addresses of a result's `ips` (`10.1.0.2/24` → `10.1.0.2`); the same
/// in every result version since 0.3.0.
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
    let Some(ips) = result.get("ips").and_then(Value::as_array) else { return Vec::new() };
    ips.iter().filter_map(|ip| ip.get("address")?.as_str()).filter_map(|a| a.split('/').next()?.parse().ok()).collect()
}

/// The `CNI_*` environment of one call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, split into pairs.
    pub args: HashMap<String, String>,
}

impl CniEnv {
    /// Reads the variables from `get` (the process environment in the binary).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> CniEnv {
        let var = |k: &str| get(k).unwrap_or_default();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: parse_cni_args(&var("CNI_ARGS")),
        }
    }

    /// A variable the command needs; code 4 when it is empty.
    pub fn require<'a>(&self, name: &str, value: &'a str) -> Result<&'a str, CniError> {
        if value.is_empty() {
            return Err(CniError::new(code::INVALID_ENV, format!("{name} is not set"), ""));
        }
        Ok(value)
    }

    /// A `CNI_ARGS` key the command needs; code 4 when missing.
    pub fn require_arg(&self, key: &str) -> Result<&str, CniError> {
        match self.args.get(key).map(String::as_str) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS has no {key}: ambit-cni needs the Kubernetes pod (kubelet/CRI passes it)"),
                "",
            )),
        }
    }
}

/// `K8S_POD_NAME=a;K8S_POD_NAMESPACE=b;IgnoreUnknown=1` into pairs.
pub fn parse_cni_args(args: &str) -> HashMap<String, String> {
    args.split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_split_into_pairs() {
        let args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0;K8S_POD_UID=u-1;junk");
        assert_eq!(args["K8S_POD_NAME"], "web-0");
        assert_eq!(args["K8S_POD_UID"], "u-1");
        assert_eq!(args.len(), 4);
    }

    #[test]
    fn config_takes_our_keys_defaults_and_the_gc_list() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"k8s","type":"ambit-cni","agent_socket":"/tmp/a.sock",
                "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(conf.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(conf.kubeconfig, PathBuf::from(DEFAULT_KUBECONFIG));
        assert_eq!(conf.gc_attachments(), [Attachment { container_id: "c1".into(), ifname: "eth0".into() }]);
        let both = NetConf::parse(
            br#"{"cniVersion":"1.1.0","cni.dev/valid-attachments":[{"containerID":"c1"}],
                "cni.dev/attachments":[{"containerID":"c1"}]}"#,
        )
        .unwrap();
        assert_eq!(both.gc_attachments().len(), 1);
        conf.check_version().unwrap();
        assert_eq!(conf.require_prev_result().unwrap_err().code, code::INVALID_CONFIG);
    }

    #[test]
    fn bad_stdin_and_versions_get_their_codes() {
        assert_eq!(NetConf::parse(b"not json").unwrap_err().code, code::DECODE);
        assert_eq!(NetConf::parse(br#"{"cniVersion": 7}"#).unwrap_err().code, code::INVALID_CONFIG);
        let old = NetConf::parse(br#"{"cniVersion":"0.2.0"}"#).unwrap();
        assert_eq!(old.check_version().unwrap_err().code, code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn result_ips_drop_the_prefix_length() {
        let result = serde_json::json!({"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24","gateway":"10.1.0.1"},
            {"address":"fd00::5/64"}]});
        assert_eq!(result_ips(&result), ["10.1.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        assert!(result_ips(&serde_json::json!({})).is_empty());
    }
}
