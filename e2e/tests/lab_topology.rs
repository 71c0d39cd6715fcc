//! The lab itself: pods, nodes and external hosts reach each other, the sniffer sees the wire, bulk data arrives
//! intact, and every namespace is gone once the lab is dropped (also after a panic).
//!
//! Needs root; fails (does not skip) when `CI` is set and we are not root.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use ambit_e2e::apps::{connect, send_pattern, EchoServer, SinkServer};
use ambit_e2e::sniff::Sniffer;
use ambit_e2e::{netns, require_root, HostId, Lab, NodeId, PodId, PodSpec};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Two nodes with two pods each, and one external host.
struct Cluster {
    lab: Lab,
    nodes: [NodeId; 2],
    pods: [PodId; 4],
    host: HostId,
}

fn cluster(test: &str) -> Cluster {
    let mut lab = Lab::new(test).unwrap();
    let n1 = lab.add_node("node1").unwrap();
    let n2 = lab.add_node("node2").unwrap();
    let a = lab.add_pod(n1, PodSpec::new("a", "default", "a")).unwrap();
    let b = lab.add_pod(n1, PodSpec::new("b", "default", "b")).unwrap();
    let c = lab.add_pod(n2, PodSpec::new("c", "default", "c")).unwrap();
    let d = lab.add_pod(n2, PodSpec::new("d", "other", "d")).unwrap();
    let host = lab.add_external_host("ext").unwrap();
    Cluster { lab, nodes: [n1, n2], pods: [a, b, c, d], host }
}

/// Sends a line through an echo connection and checks it comes back.
fn echo_round_trip(stream: &mut TcpStream, msg: &[u8]) {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

fn addr(ip: std::net::Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Names of this process's lab namespaces that still exist.
fn leftover(prefix: &str) -> Vec<String> {
    netns::list().unwrap().into_iter().filter(|n| n.starts_with(prefix)).collect()
}

#[test]
fn pods_reach_each_other_on_the_same_node_and_across_nodes() {
    if !require_root("pods_reach_each_other_on_the_same_node_and_across_nodes") {
        return;
    }
    let c = cluster("lab-pod-to-pod");
    let lab = &c.lab;
    let [a, b, cc, _] = c.pods;
    let echo_b = EchoServer::start(&lab.pod(b).netns, addr(lab.pod(b).ip, 8080)).unwrap();
    let echo_c = EchoServer::start(&lab.pod(cc).netns, addr(lab.pod(cc).ip, 8080)).unwrap();

    // Same node: a → b.
    let mut s = connect(&lab.pod(a).netns, echo_b.local_addr(), TIMEOUT).unwrap();
    echo_round_trip(&mut s, b"same node");
    // Across nodes: a → c.
    let mut s = connect(&lab.pod(a).netns, echo_c.local_addr(), TIMEOUT).unwrap();
    echo_round_trip(&mut s, b"cross node");

    // Routing is plain: each server saw the client pod's own address.
    assert_eq!(echo_b.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(), vec![lab.pod(a).ip]);
    assert_eq!(echo_c.peers().iter().map(|p| p.ip()).collect::<Vec<_>>(), vec![lab.pod(a).ip]);
    assert_eq!(
        lab.node(c.nodes[1]).netns.ip(&["route", "get", "10.1.0.2"]).unwrap().split_whitespace().nth(2),
        Some("10.0.0.1")
    );
}

#[test]
fn the_external_host_and_pods_reach_each_other() {
    if !require_root("the_external_host_and_pods_reach_each_other") {
        return;
    }
    let c = cluster("lab-external");
    let lab = &c.lab;
    let [_, _, _, d] = c.pods;
    let host = lab.host(c.host);
    assert_eq!(host.ip, std::net::Ipv4Addr::new(10, 0, 0, 200));

    // Client outside the mesh → pod.
    let echo_d = EchoServer::start(&lab.pod(d).netns, addr(lab.pod(d).ip, 9000)).unwrap();
    let mut s = connect(&host.netns, echo_d.local_addr(), TIMEOUT).unwrap();
    echo_round_trip(&mut s, b"from outside");
    assert_eq!(echo_d.peers()[0].ip(), host.ip);

    // Pod → destination outside the mesh.
    let echo_ext = EchoServer::start(&host.netns, addr(host.ip, 9001)).unwrap();
    let mut s = connect(&lab.pod(d).netns, echo_ext.local_addr(), TIMEOUT).unwrap();
    echo_round_trip(&mut s, b"to outside");
    assert_eq!(echo_ext.peers()[0].ip(), lab.pod(d).ip);
}

#[test]
fn the_sniffer_sees_a_cross_node_plaintext_marker_on_the_fabric() {
    if !require_root("the_sniffer_sees_a_cross_node_plaintext_marker_on_the_fabric") {
        return;
    }
    let c = cluster("lab-sniff");
    let lab = &c.lab;
    let [a, _, cc, _] = c.pods;
    let echo_c = EchoServer::start(&lab.pod(cc).netns, addr(lab.pod(cc).ip, 7000)).unwrap();
    let sniffer = Sniffer::start(lab.fabric(), &lab.node(c.nodes[0]).fabric_iface).unwrap();

    let marker = b"AMBIT-PLAINTEXT-MARKER-7f3a";
    let mut s = connect(&lab.pod(a).netns, echo_c.local_addr(), TIMEOUT).unwrap();
    echo_round_trip(&mut s, marker);
    let local_port = s.local_addr().unwrap().port();
    drop(s);
    let cap = sniffer.stop();

    assert!(cap.contains(marker), "marker not seen in {} segments", cap.tcp_segments());
    assert!(!cap.contains(b"never-sent-bytes"));
    assert!(cap.tcp_ports_seen().contains(&(local_port, 7000)), "{:?}", cap.tcp_ports_seen());
    assert!(cap.tcp_ports_seen().contains(&(7000, local_port)), "the echo's reply direction is captured too");
    assert_eq!(cap.tls_application_data_records(), 0);
}

#[test]
fn dropping_the_lab_removes_every_namespace() {
    if !require_root("dropping_the_lab_removes_every_namespace") {
        return;
    }
    let c = cluster("lab-drop");
    let prefix = format!("{}-", c.lab.prefix());
    // fabric + 2 nodes + 4 pods + 1 host.
    assert_eq!(leftover(&prefix).len(), 8, "{:?}", leftover(&prefix));
    let dir = c.lab.dir().to_path_buf();
    assert!(dir.is_dir());
    drop(c);
    assert_eq!(leftover(&prefix), Vec::<String>::new());
    assert!(!dir.exists(), "lab directory left behind");
}

#[test]
fn dropping_the_lab_removes_every_namespace_when_the_test_panics() {
    if !require_root("dropping_the_lab_removes_every_namespace_when_the_test_panics") {
        return;
    }
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let mut lab = Lab::new("lab-panic").unwrap();
        *prefix.lock().unwrap() = format!("{}-", lab.prefix());
        let n = lab.add_node("node1").unwrap();
        lab.add_pod(n, PodSpec::new("p", "default", "p")).unwrap();
        // A child process the lab started is killed too.
        let pid = lab.spawn(lab.node(n).netns.command("sleep").arg("600")).unwrap();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        *prefix.lock().unwrap() = format!("{}-|{pid}", lab.prefix());
        panic!("the test body fails");
    });
    assert!(result.is_err());
    let recorded = prefix.lock().unwrap().clone();
    let (prefix, pid) = recorded.split_once('|').expect("the closure ran to its panic");
    let prefix = format!("{prefix}-");
    assert_eq!(leftover(&prefix), Vec::<String>::new());
    // Reaped, so its /proc entry is gone.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "child {pid} survived the lab");
}

#[test]
fn a_256_mib_pattern_arrives_intact_across_nodes() {
    if !require_root("a_256_mib_pattern_arrives_intact_across_nodes") {
        return;
    }
    let c = cluster("lab-bulk");
    let lab = &c.lab;
    let [a, _, cc, _] = c.pods;
    let sink = SinkServer::start(&lab.pod(cc).netns, addr(lab.pod(cc).ip, 5001)).unwrap();
    let mut s = connect(&lab.pod(a).netns, sink.local_addr(), TIMEOUT).unwrap();
    const N: u64 = 256 << 20;
    let sent = send_pattern(&mut s, N, 42).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let got = sink.wait_for(1, Duration::from_secs(60)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].bytes, N);
    assert_eq!(got[0].hash, sent);
    assert_eq!(got[0].peer.ip(), lab.pod(a).ip);
    // A different seed would not have matched: the comparison can fail.
    assert_ne!(ambit_e2e::apps::pattern_hash(N, 43), sent);
    eprintln!("256 MiB across nodes in {:?}", got[0].elapsed);
}
