//! The chained CNI plugin `ambit-cni` (CNI spec 1.1; also 0.3.x to 1.0).
//!
//! It runs after the main network plugin. ADD looks the pod up in the API
//! server and, for a pod in the mesh, asks the node agent to enroll it
//! (capture, then ztunnel's ack over ZDS) before passing the previous result
//! on; a pod outside the mesh passes through without contacting the agent.
//! A pod in the mesh never starts uncaptured: when the agent or ztunnel is
//! not there, ADD fails with code 11 (try again later) and the kubelet
//! retries.
//!
//! - DEL never fails on a missing agent or API server: the kubelet must be
//!   able to tear pods down; the agent's watcher and GC clean up later.
//! - STATUS fails (code 50) only when the agent does not answer. It does not
//!   report "not ready" because ztunnel is not connected: ztunnel is itself a
//!   pod on the pod network, and a node whose CNI is not ready never starts
//!   it, a deadlock. Until ztunnel connects, ADDs of mesh pods return 11.
//! - GC keys on the container ID: the runtime's `cni.dev/valid-attachments`
//!   name containers, and the agent records the container ID of each pod the
//!   plugin enrolled. Pods the agent enrolled on its own (already running
//!   when their namespace joined the mesh) have none and are left to the
//!   agent's watcher.

pub mod config;
pub mod error;
pub mod lookup;

use std::time::Duration;

use serde_json::Value;

use crate::agent::protocol::{call, Request, Response};
use crate::agent::PodInfo;
use config::{result_ips, CniEnv, NetConf, SUPPORTED_VERSIONS};
use error::{code, CniError};

/// How long ADD waits for the agent: capture plus every ztunnel's ack.
const ADD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long DEL, CHECK and GC wait for the agent.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long STATUS waits: the agent only has to answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// The newest version, for answers when the config names none.
pub const LATEST_VERSION: &str = "1.1.0";

/// Runs one CNI command; `Ok(Some(json))` is printed on stdout.
pub async fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    match env.command.as_str() {
        "VERSION" => Ok(Some(version(stdin))),
        "ADD" => add(env, &config(stdin)?).await.map(Some),
        "DEL" => {
            del(env, stdin).await;
            Ok(None)
        }
        "CHECK" => check(env, &config(stdin)?).await.map(|()| None),
        "STATUS" => status(&config(stdin)?).await.map(|()| None),
        "GC" => gc(&config(stdin)?).await.map(|()| None),
        "" => Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set", "")),
        other => Err(CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND {other:?}"), "")),
    }
}

/// The version an answer (or error) carries: the config's, else the newest.
pub fn answer_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string())
}

fn config(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf = NetConf::parse(stdin)?;
    conf.check_version()?;
    Ok(conf)
}

fn version(stdin: &[u8]) -> Value {
    serde_json::json!({"cniVersion": answer_version(stdin), "supportedVersions": SUPPORTED_VERSIONS})
}

/// The pod the runtime is asking about, from `CNI_ARGS`.
struct PodRef<'a> {
    namespace: &'a str,
    name: &'a str,
}

impl std::fmt::Display for PodRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn pod_ref(env: &CniEnv) -> Result<PodRef<'_>, CniError> {
    Ok(PodRef { namespace: env.require_arg("K8S_POD_NAMESPACE")?, name: env.require_arg("K8S_POD_NAME")? })
}

/// Looks the pod up; `None` when it is not in the mesh.
async fn mesh_pod(env: &CniEnv, conf: &NetConf, pod: &PodRef<'_>) -> Result<Option<lookup::PodFound>, CniError> {
    let found = lookup::look_up(&conf.kubeconfig, pod.namespace, pod.name).await.map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!("ambit-cni: cannot read pod {pod} from the API server (kubeconfig {})", conf.kubeconfig.display()),
            e,
        )
    })?;
    if !found.membership.enrolled() {
        tracing::info!(%pod, membership = ?found.membership, container = %env.container_id, "pod not in the mesh");
        return Ok(None);
    }
    Ok(Some(found))
}

async fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let prev = conf.require_prev_result()?;
    let container_id = env.require("CNI_CONTAINERID", &env.container_id)?;
    let netns = env.require("CNI_NETNS", &env.netns)?;
    let pod = pod_ref(env)?;
    let output = passthrough(prev, conf);
    let Some(found) = mesh_pod(env, conf, &pod).await? else { return Ok(output) };
    // The runtime's UID names this very sandbox; the API's may belong to a
    // pod of the same name created since.
    let uid = env.args.get("K8S_POD_UID").filter(|u| !u.is_empty()).cloned().unwrap_or(found.uid);
    let info = PodInfo {
        uid,
        name: pod.name.to_string(),
        namespace: pod.namespace.to_string(),
        service_account: found.service_account,
        netns: netns.into(),
        ips: result_ips(prev),
    };
    let request = Request::Add { pod: info, container_id: container_id.to_string() };
    agent(conf, &pod, request, ADD_TIMEOUT, "cannot enroll").await?;
    tracing::info!(%pod, container = container_id, "pod enrolled in the mesh");
    Ok(output)
}

async fn del(env: &CniEnv, stdin: &[u8]) {
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return tracing::warn!(error = %e, "DEL: unreadable configuration; nothing to release"),
    };
    let uid = env.args.get("K8S_POD_UID").filter(|u| !u.is_empty()).cloned();
    if uid.is_none() && env.container_id.is_empty() {
        return tracing::warn!("DEL names neither a pod UID nor a container; nothing to release");
    }
    let request = Request::Del { uid: uid.clone(), container_id: env.container_id.clone() };
    // Whatever happens, DEL succeeds: the agent's watcher and GC release
    // what a DEL could not.
    match call(&conf.agent_socket, &request, CALL_TIMEOUT).await {
        Ok(Response::Ok { .. }) => tracing::info!(?uid, container = %env.container_id, "released"),
        Ok(Response::Error { message, .. }) => tracing::warn!(?uid, %message, "the node agent could not release"),
        Err(e) => tracing::warn!(?uid, error = %e, "node agent unreachable on DEL; it cleans up when it returns"),
    }
}

async fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    conf.require_prev_result()?;
    let pod = pod_ref(env)?;
    let Some(found) = mesh_pod(env, conf, &pod).await? else { return Ok(()) };
    let uid = env.args.get("K8S_POD_UID").filter(|u| !u.is_empty()).cloned().unwrap_or(found.uid);
    agent(conf, &pod, Request::Check { uid }, CALL_TIMEOUT, "check failed for").await
}

async fn status(conf: &NetConf) -> Result<(), CniError> {
    match call(&conf.agent_socket, &Request::Status, STATUS_TIMEOUT).await {
        Ok(Response::Ok { ztunnel_ready }) => {
            if !ztunnel_ready {
                // Ready anyway: see the module doc (ztunnel needs pod networking).
                tracing::info!("ztunnel is not connected yet; mesh pods will be retried");
            }
            Ok(())
        }
        Ok(Response::Error { message, .. }) => Err(unavailable(conf, message)),
        Err(e) => Err(unavailable(conf, e)),
    }
}

fn unavailable(conf: &NetConf, details: impl std::fmt::Display) -> CniError {
    let msg = format!("ambit-cni: the Ambit node agent does not answer at {}", conf.agent_socket.display());
    CniError::new(code::PLUGIN_NOT_AVAILABLE, msg, details)
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid_container_ids = conf.gc_attachments().iter().map(|a| a.container_id.clone()).collect();
    let request = Request::Gc { valid_container_ids };
    match call(&conf.agent_socket, &request, CALL_TIMEOUT).await {
        Ok(Response::Ok { .. }) => Ok(()),
        Ok(Response::Error { retryable, message }) => Err(CniError::new(
            if retryable { code::TRY_AGAIN_LATER } else { code::ENROLL_FAILED },
            "ambit-cni: GC failed in the node agent",
            message,
        )),
        Err(e) => Err(CniError::new(code::TRY_AGAIN_LATER, "ambit-cni: GC: the node agent does not answer", e)),
    }
}

/// Calls the agent about `pod`; every failure names the pod and the socket.
async fn agent(
    conf: &NetConf,
    pod: &PodRef<'_>,
    request: Request,
    timeout: Duration,
    what: &str,
) -> Result<(), CniError> {
    let socket = conf.agent_socket.display();
    match call(&conf.agent_socket, &request, timeout).await {
        Ok(Response::Ok { .. }) => Ok(()),
        Ok(Response::Error { retryable, message }) => Err(CniError::new(
            if retryable { code::TRY_AGAIN_LATER } else { code::ENROLL_FAILED },
            format!("ambit-cni: {what} pod {pod} in the mesh: {message}"),
            format!("node agent at {socket}"),
        )),
        Err(e) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!("ambit-cni: {what} pod {pod} in the mesh: the Ambit node agent does not answer at {socket}"),
            e,
        )),
    }
}

/// The previous result, in the version of this call's config.
fn passthrough(prev: &Value, conf: &NetConf) -> Value {
    let mut out = prev.clone();
    if let Some(obj) = out.as_object_mut() {
        obj.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    out
}

#[cfg(test)]
mod tests;
