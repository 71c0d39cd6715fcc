//! The agent's side of the plugin protocol: answers the CNI plugin on a unix
//! socket by calling the [`Enroller`].

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};

use super::enroll::{EnrollError, Enroller};
use super::protocol::{read_message, write_message, Request, Response};

/// How long a plugin has to send its request. The answer to an ADD may take
/// longer (capture plus ztunnel's acks); the plugin bounds that itself.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound plugin socket; removed when dropped.
#[derive(Debug)]
pub struct PluginServer {
    listener: UnixListener,
    path: PathBuf,
}

impl PluginServer {
    /// Listens on `path` (parent directories created, a stale socket
    /// replaced, mode 0600: only root's plugin may enroll pods).
    pub fn bind(path: &Path) -> io::Result<PluginServer> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(PluginServer { listener, path: path.to_owned() })
    }

    /// Serves requests for ever, each on its own task.
    pub async fn run(self, enroller: Arc<Enroller>) -> io::Result<()> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            tokio::spawn(handle(stream, enroller.clone()));
        }
    }
}

impl Drop for PluginServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `socket_path` and serves the plugin with `enroller` for ever.
pub async fn serve(socket_path: &Path, enroller: Arc<Enroller>) -> io::Result<()> {
    PluginServer::bind(socket_path)?.run(enroller).await
}

async fn handle(mut stream: UnixStream, enroller: Arc<Enroller>) {
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_message::<Request>(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "bad request from the CNI plugin");
            let _ = write_message(&mut stream, &Response::Error { retryable: false, message: e.to_string() }).await;
            return;
        }
        Err(_) => return tracing::warn!("CNI plugin sent no request in time"),
    };
    tracing::debug!(?request, "CNI plugin request");
    let response = answer(&enroller, request).await;
    if let Err(e) = write_message(&mut stream, &response).await {
        tracing::warn!(error = %e, "cannot answer the CNI plugin");
    }
}

async fn answer(enroller: &Enroller, request: Request) -> Response {
    let result = match request {
        Request::Add { pod, container_id } => enroller.enroll_attachment(pod, Some(container_id)).await,
        Request::Del { uid, container_id } => enroller.release_cni(uid.as_deref(), &container_id).await,
        Request::Check { uid } => enroller.check(&uid).await,
        Request::Status => Ok(()),
        Request::Gc { valid_container_ids } => {
            enroller.gc(&valid_container_ids.into_iter().collect::<HashSet<_>>()).await.map(drop)
        }
    };
    match result {
        Ok(()) => Response::Ok { ztunnel_ready: enroller.ztunnel_ready() },
        Err(e) => error_response(&e),
    }
}

fn error_response(e: &EnrollError) -> Response {
    Response::Error { retryable: e.is_retryable(), message: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::call;
    use crate::agent::{EnrollConfig, PodInfo};

    #[tokio::test]
    async fn without_ztunnel_add_is_retryable_and_status_answers() {
        let dir = std::env::temp_dir().join(format!("ambit-plugin-server-{}", std::process::id()));
        let enroller = Enroller::start(EnrollConfig::new(dir.join("zds.sock"))).await.unwrap();
        let socket = dir.join("cni.sock");
        let server = PluginServer::bind(&socket).unwrap();
        let task = tokio::spawn(server.run(enroller));
        let t = Duration::from_secs(5);

        let status = call(&socket, &Request::Status, t).await.unwrap();
        assert_eq!(status, Response::Ok { ztunnel_ready: false });
        let pod = PodInfo {
            uid: "u1".into(),
            name: "web".into(),
            namespace: "demo".into(),
            service_account: "sa".into(),
            netns: "/nonexistent/netns".into(),
            ips: vec![],
        };
        let add = call(&socket, &Request::Add { pod, container_id: "c1".into() }, t).await.unwrap();
        assert_eq!(
            add,
            Response::Error { retryable: true, message: "no ztunnel is connected to the node agent".into() }
        );
        let del = Request::Del { uid: Some("u1".into()), container_id: "c1".into() };
        assert_eq!(call(&socket, &del, t).await.unwrap(), Response::Ok { ztunnel_ready: false });
        let gc = Request::Gc { valid_container_ids: vec![] };
        assert_eq!(call(&socket, &gc, t).await.unwrap(), Response::Ok { ztunnel_ready: false });
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
