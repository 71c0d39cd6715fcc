//! The commands without an API server or agent, and against a fake agent.

use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use super::*;
use crate::agent::protocol::{read_message, write_message};

fn env(command: &str, args: &str) -> CniEnv {
    CniEnv::from_vars(|k| {
        let v = match k {
            "CNI_COMMAND" => command,
            "CNI_CONTAINERID" => "c1",
            "CNI_NETNS" => "/var/run/netns/x",
            "CNI_IFNAME" => "eth0",
            "CNI_ARGS" => args,
            _ => return None,
        };
        Some(v.to_string())
    })
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ambit-plugin-{name}-{}", std::process::id()))
}

fn conf(socket: &Path, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni","agent_socket":"{}",
            "kubeconfig":"/nonexistent/kubeconfig"{extra}}}"#,
        socket.display()
    )
    .into_bytes()
}

const POD_ARGS: &str = "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web;K8S_POD_UID=u1";
const PREV: &str = r#","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"}]}"#;

/// An agent that answers one request with `response` and returns the request.
async fn fake_agent(socket: &Path, response: Response) -> tokio::task::JoinHandle<Request> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let request: Request = read_message(&mut stream).await.unwrap();
        write_message(&mut stream, &response).await.unwrap();
        request
    })
}

#[tokio::test]
async fn version_lists_the_supported_versions() {
    let out = run(&env("VERSION", ""), br#"{"cniVersion":"0.4.0"}"#).await.unwrap().unwrap();
    assert_eq!(out["cniVersion"], "0.4.0");
    assert_eq!(out["supportedVersions"], serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
    let bare = run(&env("VERSION", ""), b"").await.unwrap().unwrap();
    assert_eq!(bare["cniVersion"], "1.1.0");
}

#[tokio::test]
async fn missing_or_unknown_commands_and_missing_pod_args_are_code_4() {
    let c = conf(Path::new("/nonexistent.sock"), PREV);
    assert_eq!(run(&env("", POD_ARGS), &c).await.unwrap_err().code, code::INVALID_ENV);
    assert_eq!(run(&env("FROB", POD_ARGS), &c).await.unwrap_err().code, code::INVALID_ENV);
    let err = run(&env("ADD", "IgnoreUnknown=1"), &c).await.unwrap_err();
    assert_eq!(err.code, code::INVALID_ENV);
    assert!(err.msg.contains("K8S_POD_NAMESPACE"), "{err}");
}

#[tokio::test]
async fn add_needs_a_prev_result_and_fails_retryably_without_the_api_server() {
    let no_prev = conf(Path::new("/nonexistent.sock"), "");
    assert_eq!(run(&env("ADD", POD_ARGS), &no_prev).await.unwrap_err().code, code::INVALID_CONFIG);
    let err = run(&env("ADD", POD_ARGS), &conf(Path::new("/nonexistent.sock"), PREV)).await.unwrap_err();
    assert_eq!(err.code, code::TRY_AGAIN_LATER, "{err}");
    assert!(err.msg.contains("demo/web") && err.msg.contains("/nonexistent/kubeconfig"), "{err}");
}

#[tokio::test]
async fn del_succeeds_without_agent_or_api_server() {
    let c = conf(Path::new("/nonexistent.sock"), PREV);
    assert_eq!(run(&env("DEL", POD_ARGS), &c).await.unwrap(), None);
    assert_eq!(run(&env("DEL", POD_ARGS), b"garbage").await.unwrap(), None);
}

#[tokio::test]
async fn del_tells_the_agent_the_uid_and_container() {
    let socket = temp("del.sock");
    let agent = fake_agent(&socket, Response::Ok { ztunnel_ready: true }).await;
    assert_eq!(run(&env("DEL", POD_ARGS), &conf(&socket, "")).await.unwrap(), None);
    assert_eq!(agent.await.unwrap(), Request::Del { uid: Some("u1".into()), container_id: "c1".into() });
    let _ = std::fs::remove_file(&socket);
}

#[tokio::test]
async fn status_is_50_without_agent_and_ready_without_ztunnel() {
    let err = run(&env("STATUS", ""), &conf(Path::new("/nonexistent.sock"), "")).await.unwrap_err();
    assert_eq!(err.code, code::PLUGIN_NOT_AVAILABLE);
    assert!(err.msg.contains("/nonexistent.sock"), "{err}");
    let socket = temp("status.sock");
    let agent = fake_agent(&socket, Response::Ok { ztunnel_ready: false }).await;
    assert_eq!(run(&env("STATUS", ""), &conf(&socket, "")).await.unwrap(), None);
    assert_eq!(agent.await.unwrap(), Request::Status);
    let _ = std::fs::remove_file(&socket);
}

#[tokio::test]
async fn gc_sends_the_valid_container_ids() {
    let socket = temp("gc.sock");
    let agent = fake_agent(&socket, Response::Ok { ztunnel_ready: true }).await;
    let extra =
        r#","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"},{"containerID":"c2","ifname":"eth0"}]"#;
    assert_eq!(run(&env("GC", ""), &conf(&socket, extra)).await.unwrap(), None);
    assert_eq!(agent.await.unwrap(), Request::Gc { valid_container_ids: vec!["c1".into(), "c2".into()] });
    let _ = std::fs::remove_file(&socket);
}

#[test]
fn passthrough_keeps_the_result_in_the_calls_version() {
    let conf = NetConf::parse(br#"{"cniVersion":"1.1.0","prevResult":{"cniVersion":"1.0.0","ips":[]}}"#).unwrap();
    let out = passthrough(conf.prev_result.as_ref().unwrap(), &conf);
    assert_eq!(out, serde_json::json!({"cniVersion": "1.1.0", "ips": []}));
}
