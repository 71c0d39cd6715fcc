//! The lab with the control plane: `ambit-controller` in file mode on a host
//! of the fabric, ztunnels taking their state over delta xDS and their
//! certificates from the controller's CA (TLS, bootstrap token).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit_e2e::apps::EchoServer;
use ambit_e2e::check::{eventually, metric, round_trip, TIMEOUT};
use ambit_e2e::controller::{cluster_yaml, ControllerProcess};
use ambit_e2e::{require_root, Lab, Mesh, PodSpec};

const APP_PORT: u16 = 8080;

#[test]
fn ztunnels_take_state_and_certificates_from_the_controller() {
    if !require_root("ztunnels_take_state_and_certificates_from_the_controller") {
        return;
    }
    let mut lab = Lab::new("ctrl-mesh").unwrap();
    let n1 = lab.add_node("node1").unwrap();
    let n2 = lab.add_node("node2").unwrap();
    let client = lab.add_pod(n1, PodSpec::new("client", "default", "client")).unwrap();
    let remote = lab.add_pod(n2, PodSpec::new("remote", "default", "remote")).unwrap();
    let host = lab.add_external_host("controller").unwrap();
    let controller = ControllerProcess::start(&lab, lab.host(host)).unwrap();
    controller.write("pods.yaml", &cluster_yaml(&lab, &["default"])).unwrap();

    let mut mesh = Mesh::new(lab).unwrap();
    mesh.use_controller(controller.flags());
    mesh.start_all().unwrap();
    for p in [client, remote] {
        mesh.enroll(p).unwrap();
    }
    let _echo = EchoServer::start(&mesh.lab().pod(remote).netns, SocketAddr::from(([0, 0, 0, 0], APP_PORT))).unwrap();
    let target = SocketAddr::from((mesh.lab().pod(remote).ip, APP_PORT));
    let client_ns = &mesh.lab().pod(client).netns;
    round_trip(client_ns, target, b"via the controller").expect("pod to pod with xDS state and CA certificates");

    // The certificates come from the controller's CA, not the lab's development CA.
    let dump = mesh.ztunnel(n1).admin_get("/config_dump").unwrap();
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let cert = v["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/default/sa/client")
        .expect("client certificate held")
        .clone();
    let controller_root = std::fs::read_to_string(controller.flags().mesh_root).unwrap();
    let roots: Vec<&str> = cert["roots_pem"].as_array().unwrap().iter().filter_map(|r| r.as_str()).collect();
    assert_eq!(roots.len(), 1, "{cert}");
    assert_eq!(roots[0].trim(), controller_root.trim(), "certificate not rooted in the controller's CA");
    let dev_root = std::fs::read_to_string(mesh.lab().dir().join("ca-cert.pem")).unwrap();
    assert_ne!(roots[0].trim(), dev_root.trim());
    assert_eq!(v["state"]["workloads"].as_array().unwrap().len(), 2, "{dump}");

    // A policy written to the watched directory reaches the ztunnels: measure how fast.
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  namespace: default\n\
                spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/default/sa/client]\n";
    let start = Instant::now();
    controller.write("policy.yaml", deny).unwrap();
    assert!(
        eventually(TIMEOUT, || round_trip(client_ns, target, b"x").is_err()),
        "the DENY policy did not reach the destination ztunnel; controller log:\n{}",
        controller.log_text()
    );
    let applied = start.elapsed();
    controller.remove("policy.yaml").unwrap();
    assert!(eventually(TIMEOUT, || round_trip(client_ns, target, b"x").is_ok()), "removing the policy did not apply");
    println!("policy change to enforcement (controller poll 100 ms + xDS push + first denied connection): {applied:?}");
    assert!(applied < Duration::from_secs(3), "policy took {applied:?}");

    let m2 = mesh.ztunnel(n2).metrics().unwrap();
    assert!(
        metric(&m2, "ztunnel_connection_failures_total", &[("direction", "inbound"), ("reason", "policy_denied")])
            >= 1.0,
        "{m2}"
    );
}
