//! End-to-end tests of ztunnel's error paths: a hostile or broken HBONE peer
//! (a real TLS + HTTP/2 client on an external host of the lab), certificate
//! rotation under a live connection, and a ztunnel killed mid-stream. Every
//! failure must be refused with a labelled metric, leave other connections
//! alone and leave ztunnel running. The ztunnels run in controller mode (xDS
//! and the controller's CA); the hostile peer mints its certificates from the
//! root they trust ([`ambit_e2e::Mesh::ca`]: the controller's). Needs root;
//! fails (not skips) under CI.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ambit_e2e::apps::connect;
use ambit_e2e::check::{echo_on, eventually, metric, round_trip, TIMEOUT};
use ambit_e2e::fixture::{Cluster, APP_PORT};
use ambit_e2e::ztunnel::ZtunnelArgs;
use ambit_e2e::{NetNs, NodeId, PodId};
use ambit_identity::{CertificateAuthority, Identity, WorkloadCertificate};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{AlertDescription, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const HBONE_PORT: u16 = 15008;
const TRUST_DOMAIN: &str = "cluster.local";

/// A two-node mesh: `client` and `local` on node 1, `remote` on node 2, all
/// enrolled, `local` and `remote` running an echo server on 8080; plus an
/// external host `ext` (outside the mesh) that plays the hostile peer.
/// Error-path helpers on the shared cluster.
trait ClusterExt {
    fn hbone(&self, p: PodId) -> SocketAddr;
    fn inbound_failures(&self, node: NodeId, reason: &str) -> f64;
    fn log(&self, node: NodeId) -> String;
}

impl ClusterExt for Cluster {
    fn hbone(&self, p: PodId) -> SocketAddr {
        SocketAddr::from((self.ip(p), HBONE_PORT))
    }
    /// `ztunnel_connection_failures_total{direction="inbound",reason}` on `node`.
    fn inbound_failures(&self, node: NodeId, reason: &str) -> f64 {
        let m = self.mesh.ztunnel(node).metrics().expect("metrics");
        metric(&m, "ztunnel_connection_failures_total", &[("direction", "inbound"), ("reason", reason)])
    }
    fn log(&self, node: NodeId) -> String {
        std::fs::read_to_string(&self.mesh.ztunnel(node).args().log_file).unwrap_or_default()
    }
}

fn cluster(test: &str) -> Option<Cluster> {
    Cluster::start(test, |_| {})
}

fn cluster_with(test: &str, customize: impl Fn(&mut ZtunnelArgs)) -> Option<Cluster> {
    Cluster::start(test, customize)
}

fn identity(sa: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, "default", sa)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

// ---- the hostile peer: a real TLS 1.3 + HTTP/2 client ----

/// A TCP connection from inside `ns`, handed to tokio (call inside a runtime).
fn tcp_from(ns: &NetNs, addr: SocketAddr) -> tokio::net::TcpStream {
    let s = connect(ns, addr, TIMEOUT).unwrap_or_else(|e| panic!("tcp connect to {addr}: {e}"));
    s.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(s).unwrap()
}

/// HBONE client TLS presenting `cert` and expecting the server identity `server`.
fn hbone_client_config(cert: &WorkloadCertificate, server: Identity) -> Arc<ClientConfig> {
    ambit_identity::client_config(cert, vec![server], &[b"h2"]).expect("client config")
}

/// Server verification that accepts any server (this peer only wants to see
/// how the server treats *it*), and no client certificate.
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn no_client_cert_config() -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

async fn tls_connect(
    tcp: tokio::net::TcpStream,
    config: Arc<ClientConfig>,
    ip: Ipv4Addr,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    TlsConnector::from(config).connect(ServerName::from(IpAddr::V4(ip)), tcp).await
}

/// The TLS alert in an I/O error from rustls, if that is what it is.
fn alert_of(e: &std::io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// Handshakes with `config` from `ns` to the HBONE port of `ip` and returns
/// the alert the server refused us with. In TLS 1.3 the client finishes its
/// side before the server has checked the client certificate, so the refusal
/// usually arrives on the first read. Panics if the server accepts.
async fn refusal(ns: &NetNs, ip: Ipv4Addr, config: Arc<ClientConfig>) -> AlertDescription {
    let tcp = tcp_from(ns, SocketAddr::from((ip, HBONE_PORT)));
    let mut tls = match tls_connect(tcp, config, ip).await {
        Ok(tls) => tls,
        Err(e) => return alert_of(&e).unwrap_or_else(|| panic!("handshake failed without an alert: {e}")),
    };
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(TIMEOUT, tokio::io::AsyncReadExt::read(&mut tls, &mut buf)).await;
    match read.expect("the server neither refused nor closed the connection in time") {
        Err(e) => alert_of(&e).unwrap_or_else(|| panic!("refused without an alert: {e}")),
        Ok(0) => panic!("closed without an alert"),
        Ok(n) => panic!("the server accepted the client and sent {n} bytes"),
    }
}

/// Opens HTTP/2 over `tls`; the connection is driven by a spawned task.
async fn h2_open(tls: TlsStream<tokio::net::TcpStream>) -> h2::client::SendRequest<Bytes> {
    let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("hostile peer: h2 connection ended: {e}");
        }
    });
    send
}

/// Sends a request (CONNECT keeps its stream open) and waits for the response head.
async fn request(
    send: &h2::client::SendRequest<Bytes>,
    method: Method,
    uri: &str,
) -> (StatusCode, h2::SendStream<Bytes>, h2::RecvStream) {
    let mut send = send.clone().ready().await.expect("h2 connection usable");
    let end = method != Method::CONNECT;
    let req = Request::builder().method(method).uri(uri).body(()).expect("request");
    let (resp, stream) = send.send_request(req, end).expect("send request");
    let resp = tokio::time::timeout(TIMEOUT, resp).await.expect("response in time").expect("response");
    (resp.status(), stream, resp.into_body())
}

/// Sends `msg` up a CONNECT stream and reads the echo back.
async fn echo_stream(tx: &mut h2::SendStream<Bytes>, rx: &mut h2::RecvStream, msg: &'static [u8]) -> Vec<u8> {
    tx.send_data(Bytes::from_static(msg), false).expect("send data");
    let mut got = Vec::new();
    while got.len() < msg.len() {
        let chunk = tokio::time::timeout(TIMEOUT, rx.data())
            .await
            .expect("echo in time")
            .expect("stream ended before the echo")
            .expect("stream data");
        rx.flow_control().release_capacity(chunk.len()).expect("release capacity");
        got.extend_from_slice(&chunk);
    }
    got
}

// ---- refused handshakes ----

/// Runs `config` against `remote`'s HBONE port from the external host and
/// checks the refusal: the alert, one more `tls_handshake` failure on node 2,
/// the log line, and that mesh traffic still flows.
fn assert_refused(c: &Cluster, config: Arc<ClientConfig>, expected: &[AlertDescription]) {
    let n2 = c.nodes[1];
    let before = c.inbound_failures(n2, "tls_handshake");
    let alert = runtime().block_on(refusal(c.ext_ns(), c.ip(c.remote), config));
    assert!(expected.contains(&alert), "refused with {alert:?}, expected one of {expected:?}");
    assert!(
        eventually(TIMEOUT, || c.inbound_failures(n2, "tls_handshake") == before + 1.0),
        "tls_handshake failures on node2 did not go from {before} to {}",
        before + 1.0
    );
    assert!(c.log(n2).contains("hbone tls handshake failed"), "no log line for the refused handshake");
    round_trip(c.pod_ns(c.client), c.app(c.remote), b"mesh still works").expect("pod to pod after a refusal");
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let Some(c) = cluster("err-other-ca") else {
        return;
    };
    let rogue = CertificateAuthority::generate_root(TRUST_DOMAIN, Duration::from_secs(3600)).unwrap();
    let cert = rogue.issue(&identity("client"), Duration::from_secs(3600)).unwrap();
    // Trust the mesh's root for the server, present the rogue leaf as the client.
    let cert = WorkloadCertificate::from_pem(&cert.chain_pem(), &cert.key_pem(), &c.mesh.ca().roots_pem()).unwrap();
    assert_refused(&c, hbone_client_config(&cert, identity("remote")), &[AlertDescription::UnknownCA]);
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let Some(c) = cluster("err-no-cert") else {
        return;
    };
    assert_refused(&c, no_client_cert_config(), &[AlertDescription::CertificateRequired]);
}

#[test]
fn an_expired_client_certificate_is_refused() {
    let Some(c) = cluster("err-expired") else {
        return;
    };
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cert = c.mesh.ca().issue_with_validity(&identity("client"), now - 2 * hour, now - hour).unwrap();
    assert!(cert.is_expired(now));
    assert_refused(&c, hbone_client_config(&cert, identity("remote")), &[AlertDescription::CertificateExpired]);
}

// ---- bad requests on a good connection ----

#[test]
fn malformed_requests_get_400_without_breaking_the_connection() {
    let Some(c) = cluster("err-bad-request") else {
        return;
    };
    let n2 = c.nodes[1];
    let before = c.inbound_failures(n2, "bad_request");
    let cert = c.mesh.ca().issue(&identity("client"), Duration::from_secs(3600)).unwrap();
    let config = hbone_client_config(&cert, identity("remote"));
    let (remote_ip, local_ip) = (c.ip(c.remote), c.ip(c.local));
    runtime().block_on(async {
        let tls = tls_connect(tcp_from(c.ext_ns(), c.hbone(c.remote)), config, remote_ip).await.expect("mtls");
        let h2 = h2_open(tls).await;

        let (status, ..) = request(&h2, Method::GET, &format!("http://{remote_ip}:{APP_PORT}/")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "GET instead of CONNECT");
        let (status, ..) = request(&h2, Method::CONNECT, "example.com:80").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "authority is not ip:port");
        let (status, ..) = request(&h2, Method::CONNECT, &format!("{local_ip}:{APP_PORT}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "another pod's IP on this pod's listener");

        // The same HTTP/2 connection still carries a good tunnel.
        let (status, mut tx, mut rx) = request(&h2, Method::CONNECT, &format!("{remote_ip}:{APP_PORT}")).await;
        assert_eq!(status, StatusCode::OK, "correct CONNECT after three bad ones");
        assert_eq!(echo_stream(&mut tx, &mut rx, b"one bad stream is not fatal").await, b"one bad stream is not fatal");
    });
    let after = c.inbound_failures(n2, "bad_request");
    assert!(after - before >= 3.0, "bad_request went from {before} to {after}");
}

#[test]
fn a_connect_to_a_closed_port_gets_503_unreachable() {
    let Some(c) = cluster("err-unreachable") else {
        return;
    };
    let n2 = c.nodes[1];
    let before = c.inbound_failures(n2, "unreachable");
    let cert = c.mesh.ca().issue(&identity("client"), Duration::from_secs(3600)).unwrap();
    let config = hbone_client_config(&cert, identity("remote"));
    let remote_ip = c.ip(c.remote);
    runtime().block_on(async {
        let tls = tls_connect(tcp_from(c.ext_ns(), c.hbone(c.remote)), config, remote_ip).await.expect("mtls");
        let h2 = h2_open(tls).await;
        let (status, ..) = request(&h2, Method::CONNECT, &format!("{remote_ip}:9999")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "nothing listens on 9999");
        let (status, mut tx, mut rx) = request(&h2, Method::CONNECT, &format!("{remote_ip}:{APP_PORT}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(echo_stream(&mut tx, &mut rx, b"open port").await, b"open port");
    });
    assert_eq!(c.inbound_failures(n2, "unreachable"), before + 1.0);
}

#[test]
fn garbage_on_the_hbone_port_is_dropped_and_ztunnel_carries_on() {
    let Some(mut c) = cluster("err-garbage") else {
        return;
    };
    let n2 = c.nodes[1];
    let before = c.inbound_failures(n2, "tls_handshake");
    let mut s = connect(c.ext_ns(), c.hbone(c.remote), TIMEOUT).expect("tcp connect to 15008");
    s.write_all(b"GET / HTTP/1.1\r\nHost: not-tls\r\n\r\n\x00\xff\x13\x37").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {} // a TLS alert record, then the close
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("ztunnel kept a garbage connection open for {:?}", start.elapsed())
            }
            Err(_) => break, // reset: closed too
        }
    }
    assert!(c.mesh.ztunnel_mut(n2).is_running(), "ztunnel died on garbage");
    assert!(eventually(TIMEOUT, || c.inbound_failures(n2, "tls_handshake") == before + 1.0));
    round_trip(c.pod_ns(c.client), c.app(c.remote), b"still serving").expect("pod to pod after garbage");
}

// ---- rotation and crashes ----

/// The current certificate of `id` in the config dump of `node`'s ztunnel:
/// (serial, leaf PEM).
fn dumped_cert(c: &Cluster, node: NodeId, id: &Identity) -> (String, String) {
    let dump = c.mesh.ztunnel(node).admin_get("/config_dump").expect("config dump");
    let v: serde_json::Value = serde_json::from_str(&dump).expect("config dump is JSON");
    let cert = v["certificates"]
        .as_array()
        .and_then(|certs| certs.iter().find(|x| x["identity"] == id.to_string()))
        .unwrap_or_else(|| panic!("no certificate for {id:?} in {dump}"));
    let serial = cert["serial"].as_str().expect("serial").to_string();
    (serial, cert["chain_pem"][0].as_str().expect("leaf pem").to_string())
}

/// The leaf certificate the HBONE listener of `pod` (identity `sa`) presents to a new handshake.
fn presented_leaf(c: &Cluster, pod: PodId, sa: &str) -> CertificateDer<'static> {
    let cert = c.mesh.ca().issue(&identity("prober"), Duration::from_secs(3600)).unwrap();
    let config = hbone_client_config(&cert, identity(sa));
    let ip = c.ip(pod);
    runtime().block_on(async {
        let tls = tls_connect(tcp_from(c.ext_ns(), c.hbone(pod)), config, ip).await.expect("mtls");
        tls.get_ref().1.peer_certificates().expect("server certificate")[0].clone().into_owned()
    })
}

#[test]
fn certificates_rotate_at_half_life_without_dropping_connections() {
    let Some(c) = cluster_with("err-rotation", |a| a.cert_ttl_secs = Some(60)) else {
        return;
    };
    let started = Instant::now();
    let (n1, client_id) = (c.nodes[0], identity("client"));
    let mut long = connect(c.pod_ns(c.client), c.app(c.remote), TIMEOUT).expect("long-lived connection");
    echo_on(&mut long, b"before rotation").expect("echo before rotation");
    let (first_serial, first_leaf) = dumped_cert(&c, n1, &client_id);

    // A 60 s certificate is renewed at half-life: not much earlier, not much later.
    let mut rotated = None;
    while started.elapsed() < Duration::from_secs(45) {
        let (serial, leaf) = dumped_cert(&c, n1, &client_id);
        if serial != first_serial {
            rotated = Some((started.elapsed(), leaf));
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (when, new_leaf) = rotated.expect("the client certificate did not rotate within 45 s");
    assert!(when >= Duration::from_secs(20), "rotated after {when:?}, long before half-life");
    let issued =
        metric(&c.mesh.ztunnel(n1).metrics().unwrap(), "ztunnel_certificates_total", &[("outcome", "success")]);
    // Two identities on node 1, each issued once and rotated at most once or twice by now.
    assert!(issued <= 6.0, "{issued} certificates issued on node1 in {when:?}: rotation is spinning");

    echo_on(&mut long, b"after rotation").expect("the long-lived connection survived rotation");
    round_trip(c.pod_ns(c.client), c.app(c.remote), b"new connection").expect("new connection after rotation");
    round_trip(c.pod_ns(c.client), c.app(c.local), b"new dial").expect("new connection to a new destination");
    // New handshakes with the client pod present the rotated certificate.
    let presented = presented_leaf(&c, c.client, "client");
    let pem_der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).expect("leaf pem");
    assert_ne!(pem_der(&first_leaf), pem_der(&new_leaf));
    let (_, current_leaf) = dumped_cert(&c, n1, &client_id);
    assert_eq!(presented, pem_der(&current_leaf), "a new handshake did not present the current certificate");
}

#[test]
fn a_destination_ztunnel_killed_mid_stream_closes_the_client_and_recovers_on_restart() {
    let Some(mut c) = cluster("err-kill-ztunnel") else {
        return;
    };
    let [n1, n2] = c.nodes;
    let mut s = connect(c.pod_ns(c.client), c.app(c.remote), TIMEOUT).expect("connect");
    echo_on(&mut s, b"before the crash").expect("echo before the crash");

    c.mesh.ztunnel_mut(n2).kill();
    assert!(!c.mesh.ztunnel_mut(n2).is_running());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => {
            panic!("client connection not closed after the destination ztunnel died: {other:?}")
        }
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(c.mesh.ztunnel_mut(n1).is_running(), "the source ztunnel died with its peer");
    // Same-node traffic on node 1 does not depend on node 2.
    round_trip(c.pod_ns(c.client), c.app(c.local), b"node1 unaffected").expect("same-node traffic");

    c.mesh.start_ztunnel(n2).expect("restart ztunnel on node2");
    assert!(
        eventually(TIMEOUT, || round_trip(c.pod_ns(c.client), c.app(c.remote), b"after restart").is_ok()),
        "no new connection through the restarted ztunnel"
    );
}
