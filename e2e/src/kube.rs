//! A real Kubernetes API server for tests: etcd, kube-apiserver and kube-controller-manager on 127.0.0.1, started by
//! `e2e/kube/start.sh` in a temporary directory and stopped (processes killed, directory removed) on drop.
//!
//! There is no kubelet and no scheduler: [`KubeCluster::set_pod_running`] and [`KubeCluster::create_node`] play
//! those parts through the API, as `e2e/kube/smoke.sh` does.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// A running API server; Drop runs `stop.sh` (kills exactly its processes) and removes its directory.
#[derive(Debug)]
pub struct KubeCluster {
    dir: PathBuf,
    env: HashMap<String, String>,
    kube_dir: PathBuf,
}

/// Whether the Kubernetes binaries can run here. They need the Go build (`e2e/kube/build.sh`) to have succeeded
/// once; a test calls [`KubeCluster::start`] and gets its error. This helper is for tests that would rather note
/// and return: it panics when `CI` is set (such a test must fail, not skip, in CI).
pub fn skip_without_kube(test: &str, err: &anyhow::Error) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: cannot start the Kubernetes API server and CI is set: {err:#}");
    }
    eprintln!("note: {test} skipped: cannot start the Kubernetes API server: {err:#}");
    true
}

impl KubeCluster {
    /// Builds (or finds cached) the binaries and starts a cluster in a fresh temporary directory named after `name`
    /// (the test) and this process. Takes a few seconds.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let kube_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube");
        let safe: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' }).collect();
        let dir = std::env::temp_dir().join(format!("ambit-kube-{safe}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove stale {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        let build =
            Command::new(kube_dir.join("build.sh")).stdin(Stdio::null()).output().context("run e2e/kube/build.sh")?;
        if !build.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("e2e/kube/build.sh failed: {}", String::from_utf8_lossy(&build.stderr).trim());
        }
        let bin = String::from_utf8_lossy(&build.stdout).trim().to_string();
        let start = Command::new(kube_dir.join("start.sh"))
            .arg(&dir)
            .env("KUBE_BIN", &bin)
            .stdin(Stdio::null())
            .output()
            .context("run e2e/kube/start.sh")?;
        // From here the guard owns the directory: a failed start still stops whatever did start.
        let mut cluster = KubeCluster { dir, env: HashMap::new(), kube_dir };
        if !start.status.success() {
            cluster.load_env().ok();
            bail!("e2e/kube/start.sh failed ({}): {}", start.status, String::from_utf8_lossy(&start.stderr).trim());
        }
        cluster.load_env()?;
        Ok(cluster)
    }

    fn load_env(&mut self) -> anyhow::Result<()> {
        let path = self.dir.join("env");
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        self.env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(())
    }

    /// A value from `DIR/env` (e.g. `CA_CERT`, `SA_ISSUER`, `APISERVER_PORT`).
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    /// The cluster's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig (credentials embedded).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The API server's URL, `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.env("APISERVER_URL").unwrap_or_default().to_string()
    }

    /// Runs the built kubectl against this cluster and returns its stdout; fails with its stderr.
    pub fn kubectl<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.kubectl_stdin(args, None)
    }

    fn kubectl_stdin<I, S>(&self, args: I, stdin: Option<&str>) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let bin = Path::new(self.env("KUBE_BIN").context("KUBE_BIN missing from env")?).join("kubectl");
        let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut child = Command::new(&bin)
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(&args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {}", bin.display()))?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().context("bug: kubectl stdin not piped")?;
            pipe.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl {:?} failed ({}): {}", args, out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Server-side applies YAML (one or more documents) as field manager `ambit-e2e`.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        self.kubectl_stdin(
            ["apply", "--server-side", "--force-conflicts", "--field-manager=ambit-e2e", "-f", "-"],
            Some(yaml),
        )
    }

    /// Waits (up to 60 s) until the CRDs named by `crds` (`crd/NAME`s, or `crd -l SELECTOR`) are Established.
    pub fn wait_established(&self, crds: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
        args.extend_from_slice(crds);
        self.kubectl(args)
    }

    /// The `Accepted` condition of AuthorizationPolicy `ns/name` as "status|reason|message" (empty while none).
    pub fn policy_accepted(&self, ns: &str, name: &str) -> anyhow::Result<String> {
        self.policy_condition(ns, name, "Accepted")
    }

    /// The condition `type_` of AuthorizationPolicy `ns/name` as "status|reason|message" (empty while none).
    pub fn policy_condition(&self, ns: &str, name: &str, type_: &str) -> anyhow::Result<String> {
        let path = format!(
            "jsonpath={{range .status.conditions[?(@.type==\"{type_}\")]}}{{.status}}|{{.reason}}|{{.message}}{{end}}"
        );
        self.kubectl(["-n", ns, "get", "authorizationpolicy", name, "-o", &path])
    }

    /// [`KubeCluster::apply`], retrying for up to 30 s while the namespace's service accounts (made by the
    /// controller-manager) are missing; panics otherwise.
    pub fn apply_retrying(&self, yaml: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match self.apply(yaml) {
                Ok(_) => return,
                Err(e) if std::time::Instant::now() < deadline && format!("{e:#}").contains("serviceaccount") => {
                    std::thread::sleep(std::time::Duration::from_millis(200))
                }
                Err(e) => panic!("{e:#}"),
            }
        }
    }

    /// A kube-rs client for this cluster, from the admin kubeconfig.
    pub async fn client(&self) -> anyhow::Result<::kube::Client> {
        let kubeconfig = ::kube::config::Kubeconfig::read_from(self.kubeconfig())?;
        let config =
            ::kube::Config::from_custom_kubeconfig(kubeconfig, &::kube::config::KubeConfigOptions::default()).await?;
        Ok(::kube::Client::try_from(config)?)
    }

    /// Mints a token of service account `ns/sa` (`kubectl create token`) with `extra` arguments (for example
    /// `--audience`, `--bound-object-kind`, `--bound-object-name`).
    pub fn create_token(&self, ns: &str, sa: &str, extra: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["create", "token", sa, "-n", ns];
        args.extend_from_slice(extra);
        Ok(self.kubectl(args)?.trim().to_string())
    }

    /// Writes a kubeconfig at `path` holding only the API server's URL and CA and a freshly minted token of
    /// service account `ns/sa` (valid for two hours): a client using it has exactly that account's rights.
    pub fn write_service_account_kubeconfig(&self, ns: &str, sa: &str, path: &Path) -> anyhow::Result<()> {
        let token = self.create_token(ns, sa, &["--duration=2h"])?;
        let ca = self.env("CA_CERT").context("CA_CERT missing from env")?;
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {"server": self.url(), "certificate-authority": ca}}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{"name": sa, "context": {"cluster": "e2e", "user": sa, "namespace": ns}}],
            "current-context": sa,
        });
        // JSON is YAML: kubeconfig readers take either.
        std::fs::write(path, serde_json::to_vec_pretty(&kubeconfig)?)
            .with_context(|| format!("write {}", path.display()))
    }

    /// Plays the kubelet: marks the pod Running and Ready with `ip` (a merge patch of its status).
    pub fn set_pod_running(&self, ns: &str, name: &str, ip: &str) -> anyhow::Result<()> {
        let patch = serde_json::json!({
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "hostIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        });
        self.kubectl([
            "-n",
            ns,
            "patch",
            "pod",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])?;
        Ok(())
    }

    /// Creates a Node object that reports Ready and has no `not-ready` taint (nothing runs behind it).
    pub fn create_node(&self, name: &str) -> anyhow::Result<()> {
        self.apply(&format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n"))?;
        let status = serde_json::json!({
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}
        });
        self.kubectl(["patch", "node", name, "--subresource=status", "--type=merge", "-p", &status.to_string()])?;
        // The API server taints new nodes not-ready and only the node-lifecycle controller (not run) would lift it.
        if let Err(e) = self.kubectl(["taint", "node", name, "node.kubernetes.io/not-ready:NoSchedule-"]) {
            if !format!("{e:#}").contains("not found") {
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        if self.dir.join("env").exists() {
            let stop = Command::new(self.kube_dir.join("stop.sh"))
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .status();
            if let Err(e) = stop {
                eprintln!("kube: stop.sh {}: {e}", self.dir.display());
            }
        }
        if std::env::var_os("AMBIT_KEEP_KUBE").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_starts_serves_kubectl_and_kube_rs_and_plays_kubelet() {
        let cluster = match KubeCluster::start("kube-selftest") {
            Ok(c) => c,
            Err(e) if skip_without_kube("kube-selftest", &e) => return,
            Err(e) => panic!("{e:#}"),
        };
        assert!(cluster.url().starts_with("https://127.0.0.1:"), "{}", cluster.url());
        cluster.create_node("node-1").unwrap();
        cluster
            .apply(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: default\nspec:\n  nodeName: node-1\n  \
                 containers:\n  - name: c\n    image: x\n",
            )
            .unwrap();
        cluster.set_pod_running("default", "p", "10.1.0.5").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let pod = rt.block_on(async {
            let client = cluster.client().await.unwrap();
            let pods: ::kube::Api<k8s_openapi::api::core::v1::Pod> = ::kube::Api::namespaced(client, "default");
            pods.get("p").await.unwrap()
        });
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.1.0.5"));
        let taints = cluster.kubectl(["get", "node", "node-1", "-o", "jsonpath={.spec.taints}"]).unwrap();
        assert!(!taints.contains("not-ready"), "{taints}");
        let dir = cluster.dir().to_path_buf();
        let pid: u32 = cluster.env("APISERVER_PID").unwrap().parse().unwrap();
        drop(cluster);
        assert!(!dir.exists());
        // Dead means gone or a zombie (its parent, start.sh, has exited; reaping is init's job).
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = state.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        assert!(matches!(state, None | Some(Some('Z' | 'X'))), "apiserver {pid} still running: {state:?}");
    }
}
