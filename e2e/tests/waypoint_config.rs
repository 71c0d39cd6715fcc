//! The waypoint's configuration client against the real `ambit-controller`
//! binary in file mode (TLS on 127.0.0.1, no lab needed): authenticated with a
//! `--workload-tokens` token, it receives an HTTPRoute written as YAML in the
//! controller's config dir and builds the expected route table and endpoints;
//! a route change is seen; the same token gets the waypoint its own
//! certificate and no other; with the controller stopped, the last snapshot
//! (and the certificate) stay.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_e2e::statefile::write_atomic;
use ambit_e2e::ztunnel::workspace_binary;
use ambit_identity::Identity;
use ambit_waypoint::config::{certificates, ConfigClient, Snapshot, SnapshotHandle, WaypointNode};
use ambit_waypoint::route::BackendTarget;
use ambit_xds_client::ca::{tls_endpoint, CaClient};
use ambit_xds_client::certs::CertificateProvider;
use ambit_xds_client::token::TokenSource;
use http::Request;

const SERVER_NAME: &str = "ambit-controller.ambit-system.svc";
const WAYPOINT_TOKEN: &str = "waypoint-token-7f3a";
const WEB_VIP: &str = "10.96.0.10:80";
const WAIT: Duration = Duration::from_secs(20);

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: mesh}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: mesh}
spec: {clusterIP: 10.96.0.11, selector: {app: web-v2}, ports: [{name: http, port: 80, targetPort: 9090}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: mesh, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 10.1.0.2, phase: Running, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v2-0, namespace: mesh, labels: {app: web-v2}}
spec: {nodeName: node1, serviceAccountName: web-v2, containers: [{name: c}]}
status: {podIP: 10.1.0.3, phase: Running, conditions: [{type: Ready, status: "True"}]}
"#;

/// Sends `prefix` to web-v2 (weight 1) and nowhere else (weight 0 to web).
fn route(prefix: &str) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: split, namespace: mesh}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 80}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    backendRefs: [{{name: web-v2, port: 80, weight: 1}}, {{name: web, port: 80, weight: 0}}]
    timeouts: {{request: 3s}}
"#
    )
}

/// The controller binary in file mode on 127.0.0.1; Drop kills it (this PID only).
struct Controller {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Controller {
    fn start(dir: &Path) -> Controller {
        std::fs::create_dir_all(dir.join("cluster")).unwrap();
        std::fs::write(dir.join("bootstrap-tokens"), "node1-token node1\n").unwrap();
        std::fs::write(dir.join("workload-tokens"), format!("{WAYPOINT_TOKEN} mesh/waypoint\n")).unwrap();
        write_atomic(&dir.join("cluster/cluster.yaml"), CLUSTER).unwrap();
        write_atomic(&dir.join("cluster/route.yaml"), &route("/v2")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let bin = workspace_binary("ambit-controller", "AMBIT_CONTROLLER_BIN").unwrap();
        let log = std::fs::File::create(dir.join("controller.log")).unwrap();
        let path = |p: &str| dir.join(p).display().to_string();
        let child = Command::new(bin)
            .args(["--config-dir", &path("cluster"), "--config-poll-ms", "100", "--ca-dir", &path("ca")])
            .args(["--bootstrap-tokens", &path("bootstrap-tokens"), "--workload-tokens", &path("workload-tokens")])
            .args(["--listen", &addr.to_string(), "--serving-ips", "127.0.0.1", "--serving-dns-names", SERVER_NAME])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut c = Controller { child, dir: dir.to_owned(), addr };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(c.child.try_wait().unwrap().is_none(), "controller exited; log:\n{}", c.log());
            assert!(Instant::now() < deadline, "controller not listening; log:\n{}", c.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }

    fn channel(&self) -> tonic::transport::Channel {
        let root = std::fs::read_to_string(self.dir.join("ca/root-cert.pem")).unwrap();
        tls_endpoint(&format!("https://{}", self.addr), &root, SERVER_NAME).unwrap().connect_lazy()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop();
    }
}

fn token() -> TokenSource {
    TokenSource::fixed(WAYPOINT_TOKEN).unwrap()
}

/// Where a GET of `path` to web:80 goes: the backend service's hostname, or the status of the waypoint's reply.
fn routed(snap: &Snapshot, path: &str) -> Result<String, u16> {
    let served = snap.served(WEB_VIP.parse().unwrap()).ok_or(0u16)?;
    let req = Request::get(path).header("host", "web.mesh.svc.cluster.local").body(()).unwrap().into_parts().0;
    let m = served.port.table.find(&req).map_err(|no| no.reply().status.as_u16())?;
    let chosen = m.rule.backends.iter().find(|b| b.weight > 0).expect("a weighted backend");
    match &chosen.target {
        BackendTarget::Service(t) => Ok(t.hostname.clone()),
        BackendTarget::Invalid(why) => panic!("invalid backend: {why}"),
    }
}

/// Waits until the current snapshot satisfies `ok`.
async fn wait_for(handle: &mut SnapshotHandle, what: &str, ok: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let snap = handle.current();
        if ok(&snap) {
            return snap;
        }
        if tokio::time::timeout_at(deadline, handle.changed()).await.is_err() {
            panic!("no snapshot with {what} within {WAIT:?}; last version {}", snap.version());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_takes_routes_endpoints_and_its_certificate_from_the_controller_and_keeps_them() {
    let dir = std::env::temp_dir().join(format!("ambit-waypoint-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut controller = Controller::start(&dir);
    let node = WaypointNode { pod_name: "waypoint-0".into(), namespace: "mesh".into(), ..Default::default() };
    let client = ConfigClient::new(controller.channel(), token(), &node, "cluster.local")
        .with_backoff(Duration::from_millis(100), Duration::from_millis(300));
    let mut handle = client.snapshots();
    let synced = client.synced();
    let task = tokio::spawn(client.run());

    // The route as written: /v2 → web-v2, anything else 404; web-v2's endpoint with its pod's identity.
    let snap = wait_for(&mut handle, "the HTTPRoute", |s| routed(s, "/v2/x").is_ok()).await;
    let mut synced = synced;
    tokio::time::timeout(WAIT, synced.wait_for(|s| *s)).await.expect("synced once every type arrived").unwrap();
    assert_eq!(routed(&snap, "/v2/x"), Ok("web-v2.mesh.svc.cluster.local".into()));
    assert_eq!(routed(&snap, "/other"), Err(404));
    let served = snap.served(WEB_VIP.parse().unwrap()).unwrap();
    assert_eq!(served.port.target_port, Some(8080));
    let split = &served.port.table.routes()[0];
    assert_eq!((split.namespace.as_str(), split.name.as_str()), ("mesh", "split"));
    assert_eq!(split.rules[0].timeouts.request, Some(Duration::from_secs(3)));
    assert!(snap.report().routes.is_empty(), "{:?}", snap.report());
    let v2 = ambit_waypoint::target::ServiceTarget {
        hostname: "web-v2.mesh.svc.cluster.local".into(),
        namespace: "mesh".into(),
        port: 80,
        policy: None,
    };
    let endpoints: Vec<_> =
        snap.endpoints(&v2).iter().map(|e| (e.target(80).unwrap().to_string(), e.identity().to_string())).collect();
    assert_eq!(endpoints, [("10.1.0.3:9090".to_owned(), "spiffe://cluster.local/ns/mesh/sa/web-v2".to_owned())]);

    // A route change reaches the waypoint.
    write_atomic(&dir.join("cluster/route.yaml"), &route("/v3")).unwrap();
    let changed = wait_for(&mut handle, "the changed HTTPRoute", |s| routed(s, "/v3").is_ok()).await;
    assert_eq!(routed(&changed, "/v2/x"), Err(404));

    // The same token gets the waypoint its own certificate, and only that one.
    let own = Identity::new("cluster.local", "mesh", "waypoint");
    let certs = certificates(controller.channel(), token(), Duration::from_secs(3600));
    let cert = certs.get(&own).await.expect("the waypoint's own certificate");
    assert_eq!(cert.cert.identity(), &own);
    let other = Identity::new("cluster.local", "mesh", "web");
    let ca = CaClient::new(controller.channel(), WAYPOINT_TOKEN, Duration::from_secs(3600)).unwrap();
    let err = ca.fetch(&other).await.expect_err("another identity is refused");
    assert!(err.to_string().contains("PermissionDenied"), "{err}");

    // The controller goes away: the last snapshot and the certificate stay.
    let last = handle.current().version();
    controller.stop();
    let next = tokio::time::timeout(Duration::from_secs(2), handle.changed()).await;
    assert!(next.is_err(), "no new snapshot without a controller: {:?}", next.map(|s| s.map(|s| s.version())));
    let kept = handle.current();
    assert_eq!(kept.version(), last);
    assert_eq!(routed(&kept, "/v3"), Ok("web-v2.mesh.svc.cluster.local".into()));
    assert_eq!(certs.get(&own).await.expect("cached").cert.serial(), cert.cert.serial());
    assert!(!task.is_finished(), "the client keeps reconnecting");
    task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
