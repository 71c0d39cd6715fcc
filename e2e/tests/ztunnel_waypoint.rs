//! End-to-end tests of ztunnel's side of waypoints: a connection to a service
//! (or a workload) whose Address names a waypoint goes to that waypoint, as
//! HBONE with the original destination in `:authority`, unless it comes from
//! the waypoint itself. The real `ztunnel` binaries run on two lab nodes in
//! file mode (the state file names the waypoints), with pods enrolled over
//! ZDS and nftables capture.
//!
//! The waypoint is a STAND-IN written in this file — the only part that is
//! not the product — so that ztunnel's side is checked alone, byte for byte
//! (the real `ambit-waypoint` on this path: `mesh_waypoint.rs`). It runs in
//! an uncaptured pod, as a waypoint does, and terminates HBONE with the real
//! crates: mutual TLS 1.3 with a certificate the lab's CA issued for the
//! waypoint's identity (`ambit-identity`), HTTP/2 CONNECT with HBONE's
//! settings (`ambit_hbone::server_builder`). It records each CONNECT's
//! `:authority` and the client's SPIFFE identity (from its certificate) and
//! answers the bytes itself, after a prefix, so that a reply proves which
//! way the connection went. Needs root; fails (not skips) under CI.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ambit_e2e::apps::connect;
use ambit_e2e::check::{metric, round_trip, TIMEOUT};
use ambit_e2e::dump;
use ambit_e2e::fixture::{Cluster, APP_PORT};
use ambit_e2e::objects::DATAPLANE_MODE_LABEL;
use ambit_e2e::statefile::yaml;
use ambit_e2e::{NetNs, PodId, PodSpec};
use ambit_identity::{Identity, WorkloadCertificate};
use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

/// What the stand-in sends before echoing a stream's bytes.
const WAYPOINT_PREFIX: &[u8] = b"via-waypoint:";
const WAYPOINT_HOST: &str = "waypoint.default.svc.cluster.local";
const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
const ECHO_HOST: &str = "echo.default.svc.cluster.local";
const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PLAIN_HOST: &str = "plain.default.svc.cluster.local";
const PLAIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const SELF_HOST: &str = "self.default.svc.cluster.local";
const SELF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const LOST_HOST: &str = "lost.default.svc.cluster.local";
const LOST_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// One CONNECT the stand-in accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Connect {
    authority: String,
    /// The client's SPIFFE identity, from its certificate.
    peer: String,
}

/// STAND-IN for the waypoint (see the module docs): a TLS + HTTP/2 CONNECT
/// server on the waypoint pod's IP and 15008, on its own thread and runtime.
struct StandInWaypoint {
    connects: Arc<Mutex<Vec<Connect>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StandInWaypoint {
    fn start(netns: &NetNs, addr: SocketAddr, cert: &WorkloadCertificate) -> Self {
        let listener = netns.run(move || std::net::TcpListener::bind(addr)).expect("bind the stand-in waypoint");
        listener.set_nonblocking(true).unwrap();
        let acceptor = TlsAcceptor::from(ambit_identity::server_config(cert, &[b"h2"]).unwrap());
        let connects = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = oneshot::channel();
        let recorded = connects.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else { continue };
                        tokio::spawn(serve_connection(acceptor.clone(), tcp, recorded.clone()));
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    () = accept => {}
                }
            });
        });
        StandInWaypoint { connects, stop: Some(stop), thread: Some(thread) }
    }

    fn connects(&self) -> Vec<Connect> {
        self.connects.lock().unwrap().clone()
    }
}

impl Drop for StandInWaypoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_connection(acceptor: TlsAcceptor, tcp: tokio::net::TcpStream, connects: Arc<Mutex<Vec<Connect>>>) {
    let tls = match acceptor.accept(tcp).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("stand-in waypoint: tls handshake failed: {e}");
            return;
        }
    };
    let peer = ambit_identity::peer_identity(tls.get_ref().1).map(|i| i.to_string()).unwrap_or_default();
    let Ok(mut conn) = ambit_hbone::server_builder(100).handshake::<_, Bytes>(tls).await else { return };
    while let Some(Ok((req, respond))) = conn.accept().await {
        let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
        connects.lock().unwrap().push(Connect { authority, peer: peer.clone() });
        tokio::spawn(answer(req, respond));
    }
}

/// 200, then the prefix and every byte of the stream back.
async fn answer(req: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    if req.method() != Method::CONNECT {
        let mut bad = Response::new(());
        *bad.status_mut() = StatusCode::BAD_REQUEST;
        let _ = respond.send_response(bad, true);
        return;
    }
    let Ok(mut send) = respond.send_response(Response::new(()), false) else { return };
    if send.send_data(Bytes::from_static(WAYPOINT_PREFIX), false).is_err() {
        return;
    }
    let mut body = req.into_body();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        if send.send_data(chunk, false).is_err() {
            return;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// Sends `msg` from `ns` to `addr` and expects the stand-in's answer.
fn through_waypoint(ns: &NetNs, addr: SocketAddr, msg: &[u8]) {
    let mut s = connect(ns, addr, TIMEOUT).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; WAYPOINT_PREFIX.len() + msg.len()];
    s.read_exact(&mut back).unwrap_or_else(|e| panic!("reply from {addr}: {e}"));
    assert_eq!(back, [WAYPOINT_PREFIX, msg].concat(), "{addr}: not the waypoint's answer");
}

/// The cluster (client and local on node 1, remote on node 2, echo servers
/// in local and remote) plus the waypoint's pod on node 2, not captured, and
/// its service `waypoint.default.svc.cluster.local`.
fn cluster_with_waypoint_pod(test: &str) -> Option<(Cluster, PodId)> {
    let mut c = Cluster::start_file_mode(test, |_| {})?;
    let mut spec = PodSpec::new("waypoint", "default", "waypoint");
    spec.labels.insert(DATAPLANE_MODE_LABEL.into(), "none".into());
    let wp = c.add_pod(c.nodes[1], spec);
    let uid = c.mesh.lab().pod(wp).uid.clone();
    let (lab, state) = c.mesh.lab_and_state_mut();
    state.add_service_for(lab, "waypoint", "default", WAYPOINT_VIP, &[(15008, 15008)], &[wp]);
    state.set_workload_field(&uid, "workloadName", "waypoint".into());
    Some((c, wp))
}

/// Writes the state and waits until every ztunnel has each service in `hosts` with the waypoint it names (or none).
fn write_and_wait(c: &Cluster, hosts: &[(&str, Option<&str>)]) {
    c.mesh.write_state().unwrap();
    c.mesh
        .wait_for_config("services and their waypoints", |d| {
            hosts.iter().all(|(h, wp)| {
                dump::service(d, h)
                    .is_some_and(|s| s["waypoint"].as_str() == *wp && dump::endpoints(d, "default", h) > 0)
            })
        })
        .unwrap();
}

fn start_stand_in(c: &Cluster, wp: PodId) -> StandInWaypoint {
    let pod = c.mesh.lab().pod(wp);
    let cert =
        c.mesh.ca().issue(&Identity::new("cluster.local", "default", "waypoint"), Duration::from_secs(3600)).unwrap();
    StandInWaypoint::start(&pod.netns, SocketAddr::from((pod.ip, 15008)), &cert)
}

fn vip(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((ip, 80))
}

#[test]
fn a_service_with_a_waypoint_is_reached_through_it_unless_the_source_is_the_waypoint() {
    let Some((mut c, wp)) = cluster_with_waypoint_pod("zw-service") else { return };
    let (client, local, remote) = (c.client, c.local, c.remote);
    let local_ip = c.ip(local);
    let (lab, state) = c.mesh.lab_and_state_mut();
    // echo: through the waypoint, named by hostname as the controller names it.
    state.add_service_for(lab, "echo", "default", ECHO_VIP, &[(80, APP_PORT)], &[remote]);
    assert!(state.set_service_field(ECHO_HOST, "waypoint", yaml(&format!("{{hostname: {WAYPOINT_HOST}}}")).unwrap()));
    // plain: no waypoint.
    state.add_service_for(lab, "plain", "default", PLAIN_VIP, &[(80, APP_PORT)], &[remote]);
    // self: its waypoint is `local`'s IP, so `local` is that waypoint and its own traffic to it goes direct.
    state.add_service_for(lab, "self", "default", SELF_VIP, &[(80, APP_PORT)], &[remote]);
    assert!(state.set_service_field(SELF_HOST, "waypoint", yaml(&format!("{{address: {local_ip}}}")).unwrap()));
    let by_host = format!("default/{WAYPOINT_HOST}:15008");
    let by_ip = format!("{local_ip}:15008");
    write_and_wait(&c, &[(ECHO_HOST, Some(&by_host)), (PLAIN_HOST, None), (SELF_HOST, Some(&by_ip))]);
    let standin = start_stand_in(&c, wp);

    // Across nodes (client on node 1) and on the waypoint's node (remote on node 2).
    through_waypoint(c.pod_ns(client), vip(ECHO_VIP), b"hello waypoint");
    through_waypoint(c.pod_ns(remote), vip(ECHO_VIP), b"from the same node");
    let authority = vip(ECHO_VIP).to_string();
    assert_eq!(
        standin.connects(),
        vec![
            Connect { authority: authority.clone(), peer: spiffe("client") },
            Connect { authority, peer: spiffe("remote") },
        ],
        "the waypoint gets the VIP as authority and the client's own identity"
    );
    assert!(c.echoes[1].peers().is_empty(), "the backend was not reached behind the waypoint's back");

    // Istio's labels: the destination is the waypoint's workload, the service the one the client addressed.
    let m1 = c.mesh.ztunnel(c.nodes[0]).metrics().unwrap();
    let labels = [
        ("reporter", "source"),
        ("source_principal", &spiffe("client")),
        ("destination_workload", "waypoint"),
        ("destination_principal", &spiffe("waypoint")),
        ("destination_service", ECHO_HOST),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(metric(&m1, "istio_tcp_connections_opened_total", &labels), 1.0, "{m1}");

    // A service without a waypoint is reached directly.
    round_trip(c.pod_ns(client), vip(PLAIN_VIP), b"direct").expect("plain service, direct");
    assert_eq!(c.echoes[1].peers().last().map(SocketAddr::ip), Some(IpAddr::V4(c.ip(client))));

    // The waypoint's own traffic to the service goes direct: `local` is the waypoint of `self`.
    round_trip(c.pod_ns(local), vip(SELF_VIP), b"from the waypoint").expect("the waypoint's own traffic, direct");
    assert_eq!(c.echoes[1].peers().last().map(SocketAddr::ip), Some(IpAddr::V4(local_ip)));
    // Anyone else's goes to `local`'s 15008, whose ztunnel refuses a target that is not its pod.
    assert!(round_trip(c.pod_ns(client), vip(SELF_VIP), b"x").is_err(), "client bypassed the waypoint of self");
    assert_eq!(standin.connects().len(), 2, "no other connection reached the stand-in");
    assert_eq!(c.echoes[1].peers().len(), 2, "the backend saw only the direct connections");
}

#[test]
fn a_workload_waypoint_takes_traffic_to_its_ip_and_an_unknown_waypoint_fails_the_connection() {
    let Some((mut c, wp)) = cluster_with_waypoint_pod("zw-workload") else { return };
    let (client, local, remote) = (c.client, c.local, c.remote);
    let (remote_uid, wp_ip) = (c.mesh.lab().pod(remote).uid.clone(), c.ip(wp));
    let (lab, state) = c.mesh.lab_and_state_mut();
    // remote's own IP goes through the waypoint, named by address.
    state.set_workload_field(&remote_uid, "waypoint", yaml(&format!("{{address: {wp_ip}}}")).unwrap());
    state.add_service_for(lab, "plain", "default", PLAIN_VIP, &[(80, APP_PORT)], &[remote]);
    // lost: a waypoint that is no workload.
    state.add_service_for(lab, "lost", "default", LOST_VIP, &[(80, APP_PORT)], &[local]);
    assert!(state.set_service_field(LOST_HOST, "waypoint", yaml("{address: 10.9.9.9}").unwrap()));
    write_and_wait(&c, &[(PLAIN_HOST, None), (LOST_HOST, Some("10.9.9.9:15008"))]);
    let want = format!("{wp_ip}:15008");
    let remote_ip = c.ip(remote);
    c.mesh
        .wait_for_config("remote's waypoint", |d| {
            dump::workload(d, remote_ip).is_some_and(|w| w["waypoint"].as_str() == Some(want.as_str()))
        })
        .unwrap();
    let standin = start_stand_in(&c, wp);

    through_waypoint(c.pod_ns(client), c.app(remote), b"to the pod");
    assert_eq!(standin.connects(), vec![Connect { authority: c.app(remote).to_string(), peer: spiffe("client") }]);
    assert!(c.echoes[1].peers().is_empty(), "the pod was not reached behind the waypoint's back");

    // Through a service (without a waypoint) the same pod is reached directly; so is a pod without one.
    round_trip(c.pod_ns(client), vip(PLAIN_VIP), b"via the service").expect("service without waypoint");
    assert_eq!(c.echoes[1].peers().last().map(SocketAddr::ip), Some(IpAddr::V4(c.ip(client))));
    round_trip(c.pod_ns(client), c.app(local), b"other pod").expect("pod without waypoint");
    assert_eq!(standin.connects().len(), 1);

    // A waypoint that is no known workload fails the connection as unreachable; nothing is guessed.
    assert!(round_trip(c.pod_ns(client), vip(LOST_VIP), b"x").is_err(), "connection through an unknown waypoint");
    let m1 = c.mesh.ztunnel(c.nodes[0]).metrics().unwrap();
    let failures = [("direction", "outbound"), ("reason", "unreachable")];
    assert_eq!(metric(&m1, "ztunnel_connection_failures_total", &failures), 1.0, "{m1}");
    assert_eq!(c.echoes[0].peers().len(), 1, "local saw only the direct connection");
}
