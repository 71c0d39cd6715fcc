//! CNI error results: `{cniVersion, code, msg, details}` on stdout.

use serde::Serialize;

/// The CNI spec's error codes that the plugin returns.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Invalid necessary environment variables, like `CNI_COMMAND`.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content (stdin is not JSON).
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: the runtime retries.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD requests.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific (100+): the node agent failed to enroll or check
    /// the pod for a reason retrying will not fix by itself.
    pub const ENROLL_FAILED: u32 = 100;
}

/// A failed CNI command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg} {details}")]
pub struct CniError {
    /// The CNI error code.
    pub code: u32,
    /// A short message, shown in the kubelet's event.
    pub msg: String,
    /// More detail (the underlying error).
    pub details: String,
}

impl CniError {
    /// An error with `code`, message and details.
    pub fn new(code: u32, msg: impl Into<String>, details: impl std::fmt::Display) -> Self {
        CniError { code, msg: msg.into(), details: details.to_string() }
    }

    /// The error object printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_value(Out { cni_version, code: self.code, msg: &self.msg, details: &self.details })
            .unwrap_or_else(|e| panic!("bug: error object does not serialize: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_object_has_the_spec_fields() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "node agent not reachable", "connect: no such file");
        assert_eq!(
            e.to_json("1.1.0"),
            serde_json::json!({"cniVersion": "1.1.0", "code": 11, "msg": "node agent not reachable",
                "details": "connect: no such file"})
        );
        let bare = CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set", "");
        assert!(bare.to_json("1.0.0").get("details").is_none());
    }
}
