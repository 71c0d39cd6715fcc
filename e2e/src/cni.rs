//! Running CNI plugins as a container runtime does: the reference plugins of `/usr/lib/cni` (bridge, host-local)
//! chained with the built `ambit-cni`, each exec'd with the `CNI_*` environment and its network configuration on
//! stdin, the next plugin getting the previous one's result as `prevResult`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::netns::NetNs;

/// Where Debian's `containernetworking-plugins` installs the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// What a plugin printed and how it exited.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Stdout parsed as JSON (`Null` when empty or not JSON).
    pub json: Value,
    /// Stdout as text.
    pub stdout: String,
    /// Stderr (the plugin's log).
    pub stderr: String,
}

impl PluginOutput {
    /// The result on success, else an error with the CNI error object and the log.
    pub fn ok(self) -> anyhow::Result<Value> {
        if self.code != Some(0) {
            bail!("plugin failed ({:?}): {}\nstderr: {}", self.code, self.stdout.trim(), self.stderr.trim());
        }
        Ok(self.json)
    }

    /// The CNI error code of a failed call (`code` of the error object).
    pub fn error_code(&self) -> Option<u64> {
        if self.code == Some(0) {
            return None;
        }
        self.json.get("code").and_then(Value::as_u64)
    }
}

/// One attachment of a pod: the runtime's view.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_ARGS` pairs (`K8S_POD_NAME`, ...).
    pub args: Vec<(String, String)>,
}

impl Attachment {
    /// A Kubernetes pod's attachment, with the `CNI_ARGS` the CRI passes.
    pub fn pod(container_id: &str, netns: &Path, namespace: &str, name: &str, uid: &str) -> Self {
        let args = [
            ("IgnoreUnknown", "1"),
            ("K8S_POD_NAMESPACE", namespace),
            ("K8S_POD_NAME", name),
            ("K8S_POD_INFRA_CONTAINER_ID", container_id),
            ("K8S_POD_UID", uid),
        ];
        Attachment {
            container_id: container_id.into(),
            netns: netns.to_owned(),
            args: args.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn cni_args(&self) -> String {
        self.args.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")
    }
}

/// Runs `binary` with `command` for `attachment` (or none, for STATUS/GC/VERSION), `config` on stdin, inside
/// `netns` (the node's namespace; `None`: this process's).
pub fn exec_plugin(
    binary: &Path,
    netns: Option<&NetNs>,
    command: &str,
    attachment: Option<&Attachment>,
    config: &Value,
) -> anyhow::Result<PluginOutput> {
    let mut cmd = match netns {
        Some(ns) => ns.command(binary),
        None => Command::new(binary),
    };
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", REFERENCE_PLUGINS)
        .env("CNI_IFNAME", "eth0");
    if let Some(a) = attachment {
        cmd.env("CNI_CONTAINERID", &a.container_id).env("CNI_NETNS", &a.netns).env("CNI_ARGS", a.cni_args());
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {}", binary.display()))?;
    child.stdin.take().context("bug: stdin not piped")?.write_all(config.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(PluginOutput {
        code: out.status.code(),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A network configuration list of plugins, run in order on ADD and in reverse on DEL, as libcni does.
#[derive(Debug)]
pub struct Chain {
    /// `cniVersion` of the list.
    pub version: String,
    /// `name` of the list.
    pub name: String,
    /// Each plugin's configuration and the binary that runs it (`None`: `/usr/lib/cni/<type>`).
    pub plugins: Vec<(Value, Option<PathBuf>)>,
    /// Where the main plugins run: the node's namespace.
    pub node: NetNs,
}

impl Chain {
    /// Plugin `i`'s configuration as the runtime passes it.
    fn config(&self, i: usize, prev: Option<&Value>) -> Value {
        let mut conf = self.plugins[i].0.clone();
        conf["cniVersion"] = json!(self.version);
        conf["name"] = json!(self.name);
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    fn binary(&self, i: usize) -> PathBuf {
        match &self.plugins[i].1 {
            Some(b) => b.clone(),
            None => Path::new(REFERENCE_PLUGINS).join(self.plugins[i].0["type"].as_str().unwrap_or_default()),
        }
    }

    /// Our plugin (not from `/usr/lib/cni`) runs in this process's namespace, where the API server is; the
    /// reference plugins in the node's.
    fn netns(&self, i: usize) -> Option<&NetNs> {
        self.plugins[i].1.is_none().then_some(&self.node)
    }

    /// ADD through the chain: every plugin's output, the last being the attachment's result. Stops at the first
    /// failure, which is returned as the last output.
    pub fn add(&self, a: &Attachment) -> anyhow::Result<Vec<PluginOutput>> {
        let mut outs: Vec<PluginOutput> = Vec::new();
        for i in 0..self.plugins.len() {
            let prev = outs.last().map(|o| o.json.clone());
            let out = exec_plugin(&self.binary(i), self.netns(i), "ADD", Some(a), &self.config(i, prev.as_ref()))?;
            let failed = out.code != Some(0);
            outs.push(out);
            if failed {
                break;
            }
        }
        Ok(outs)
    }

    /// DEL through the chain, in reverse, each with the cached result as `prevResult`; every plugin's output.
    pub fn del(&self, a: &Attachment, cached: Option<&Value>) -> anyhow::Result<Vec<PluginOutput>> {
        (0..self.plugins.len())
            .rev()
            .map(|i| exec_plugin(&self.binary(i), self.netns(i), "DEL", Some(a), &self.config(i, cached)))
            .collect()
    }

    /// `command` to plugin `i` alone, for `attachment` (none for STATUS, GC, VERSION), with `prev` as
    /// `prevResult` and `extra` keys added to its configuration.
    pub fn exec(
        &self,
        i: usize,
        command: &str,
        attachment: Option<&Attachment>,
        prev: Option<&Value>,
        extra: &Value,
    ) -> anyhow::Result<PluginOutput> {
        let mut conf = self.config(i, prev);
        if let (Some(conf), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
            conf.extend(extra.clone());
        }
        exec_plugin(&self.binary(i), self.netns(i), command, attachment, &conf)
    }
}
