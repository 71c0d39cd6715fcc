//! Real TLS 1.3 handshakes over 127.0.0.1 with tokio-rustls.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::{CertificateError, ClientConfig, HandshakeKind, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::ca::CertificateAuthority;

const HOUR: Duration = Duration::from_secs(3600);
const H2: &[&[u8]] = &[b"h2"];

fn root(trust_domain: &str) -> CertificateAuthority {
    CertificateAuthority::generate_root(trust_domain, 24 * HOUR).unwrap()
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa)
}

/// What one side saw of an established connection.
#[derive(Debug)]
struct Side {
    peer: Option<Identity>,
    alpn: Option<Vec<u8>>,
    resumed: bool,
}

impl Side {
    fn of(conn: &CommonState) -> Self {
        Self {
            peer: peer_identity(conn),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
        }
    }
}

/// Handshakes, then echoes five bytes so a rejection by either side surfaces on both.
async fn exchange(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> (io::Result<Side>, io::Result<Side>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.flush().await?;
        Ok::<_, io::Error>(Side::of(tls.get_ref().1))
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
        tls.write_all(b"hello").await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"hello");
        Ok::<_, io::Error>(Side::of(tls.get_ref().1))
    };
    let deadline = Duration::from_secs(10);
    let client_result = tokio::time::timeout(deadline, client_side).await.expect("client hung");
    let server_result = tokio::time::timeout(deadline, server_side).await.expect("server hung").unwrap();
    (server_result, client_result)
}

fn rustls_error(result: &io::Result<Side>) -> &rustls::Error {
    let err = result.as_ref().expect_err("handshake should have failed");
    err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).unwrap_or_else(|| panic!("not a rustls error: {err}"))
}

#[tokio::test]
async fn mutual_tls_succeeds_and_each_side_sees_the_other_identity() {
    let ca = root("cluster.local");
    let server_cert = ca.issue(&id("reviews"), HOUR).unwrap();
    let client_cert = ca.issue(&id("productpage"), HOUR).unwrap();
    let server = server_config(&server_cert, H2).unwrap();
    let client = client_config(&client_cert, vec![id("reviews")], H2).unwrap();

    let (server_side, client_side) = exchange(server, client).await;
    let (server_side, client_side) = (server_side.unwrap(), client_side.unwrap());
    assert_eq!(server_side.peer, Some(id("productpage")));
    assert_eq!(client_side.peer, Some(id("reviews")));
    assert_eq!(server_side.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(client_side.alpn.as_deref(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn client_accepts_any_one_of_several_expected_identities() {
    let ca = root("cluster.local");
    let server = server_config(&ca.issue(&id("reviews-v2"), HOUR).unwrap(), H2).unwrap();
    let expected = vec![id("reviews-v1"), id("reviews-v2")];
    let client = client_config(&ca.issue(&id("productpage"), HOUR).unwrap(), expected, H2).unwrap();
    let (server_side, client_side) = exchange(server, client).await;
    assert_eq!(client_side.unwrap().peer, Some(id("reviews-v2")));
    server_side.unwrap();
}

#[tokio::test]
async fn resumed_connections_still_know_the_peer_identity() {
    let ca = root("cluster.local");
    let server = server_config(&ca.issue(&id("reviews"), HOUR).unwrap(), H2).unwrap();
    let client_cert = ca.issue(&id("productpage"), HOUR).unwrap();
    let client = client_config(&client_cert, vec![id("reviews")], H2).unwrap();

    let (first_server, first_client) = exchange(server.clone(), client.clone()).await;
    assert!(!first_client.unwrap().resumed);
    first_server.unwrap();
    let (server_side, client_side) = exchange(server, client).await;
    let (server_side, client_side) = (server_side.unwrap(), client_side.unwrap());
    assert!(client_side.resumed && server_side.resumed);
    assert_eq!(server_side.peer, Some(id("productpage")));
    assert_eq!(client_side.peer, Some(id("reviews")));
}

#[tokio::test]
async fn client_rejects_a_server_with_the_wrong_identity() {
    let ca = root("cluster.local");
    let server = server_config(&ca.issue(&id("ratings"), HOUR).unwrap(), H2).unwrap();
    let client = client_config(&ca.issue(&id("productpage"), HOUR).unwrap(), vec![id("reviews")], H2).unwrap();
    let (server_side, client_side) = exchange(server, client).await;
    let err = rustls_error(&client_side);
    assert!(matches!(err, rustls::Error::InvalidCertificate(CertificateError::Other(_))), "{err:?}");
    assert!(err.to_string().contains("spiffe://cluster.local/ns/default/sa/ratings"), "{err}");
    assert!(is_unexpected_identity(err), "a good chain with another identity is an identity mismatch");
    assert!(server_side.is_err(), "the server must see the alert");
}

#[tokio::test]
async fn client_rejects_a_server_from_another_ca() {
    let ours = root("cluster.local");
    let theirs = root("cluster.local");
    let server = server_config(&theirs.issue(&id("reviews"), HOUR).unwrap(), H2).unwrap();
    let client = client_config(&ours.issue(&id("productpage"), HOUR).unwrap(), vec![id("reviews")], H2).unwrap();
    let (_, client_side) = exchange(server, client).await;
    let err = rustls_error(&client_side);
    assert_eq!(err, &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
    assert!(!is_unexpected_identity(err), "an unknown issuer is a certificate failure, not a mismatch");
}

#[tokio::test]
async fn server_rejects_a_client_from_another_ca() {
    let ours = root("cluster.local");
    let theirs = root("cluster.local");
    let server = server_config(&ours.issue(&id("reviews"), HOUR).unwrap(), H2).unwrap();
    // The client trusts our root (so it accepts the server) but its leaf is from another CA.
    let foreign = theirs.issue(&id("productpage"), HOUR).unwrap();
    let client_cert = WorkloadCertificate::from_der(
        foreign.chain().to_vec(),
        foreign.private_key().clone_key(),
        ours.issue(&id("x"), HOUR).unwrap().roots().to_vec(),
    )
    .unwrap();
    let client = client_config(&client_cert, vec![id("reviews")], H2).unwrap();
    let (server_side, client_side) = exchange(server, client).await;
    let err = rustls_error(&server_side);
    assert_eq!(err, &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
    assert!(client_side.is_err(), "the client must see the alert");
}

#[tokio::test]
async fn server_rejects_a_client_from_another_trust_domain() {
    let ca = root("cluster.local");
    let server = server_config(&ca.issue(&id("reviews"), HOUR).unwrap(), H2).unwrap();
    let stranger = Identity::new("other.mesh", "default", "productpage");
    let client = client_config(&ca.issue(&stranger, HOUR).unwrap(), vec![id("reviews")], H2).unwrap();
    let (server_side, _) = exchange(server, client).await;
    let err = rustls_error(&server_side);
    assert!(matches!(err, rustls::Error::InvalidCertificate(CertificateError::Other(_))), "{err:?}");
    assert!(err.to_string().contains("trust domain cluster.local"), "{err}");
}

#[tokio::test]
async fn server_rejects_a_client_with_no_certificate() {
    let ca = root("cluster.local");
    let server_cert = ca.issue(&id("reviews"), HOUR).unwrap();
    let server = server_config(&server_cert, H2).unwrap();
    let verifier = SpiffeServerVerifier::new(server_cert.roots(), vec![id("reviews")]).unwrap();
    let client = ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let (server_side, client_side) = exchange(server, Arc::new(client)).await;
    assert_eq!(rustls_error(&server_side), &rustls::Error::NoCertificatesPresented);
    assert!(client_side.is_err());
}

#[tokio::test]
async fn server_rejects_an_expired_client_certificate() {
    let ca = root("cluster.local");
    let server = server_config(&ca.issue(&id("reviews"), HOUR).unwrap(), H2).unwrap();
    let now = SystemTime::now();
    let expired = ca.issue_with_validity(&id("productpage"), now - 2 * HOUR, now - HOUR).unwrap();
    assert!(expired.is_expired(now));
    let client = client_config(&expired, vec![id("reviews")], H2).unwrap();
    let (server_side, _) = exchange(server, client).await;
    let err = rustls_error(&server_side);
    assert!(matches!(err, rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })), "{err:?}");
    assert!(!is_unexpected_identity(err));
}

#[tokio::test]
async fn client_rejects_an_expired_server_certificate() {
    let ca = root("cluster.local");
    let now = SystemTime::now();
    let expired = ca.issue_with_validity(&id("reviews"), now - 2 * HOUR, now - HOUR).unwrap();
    let server = server_config(&expired, H2).unwrap();
    let client = client_config(&ca.issue(&id("productpage"), HOUR).unwrap(), vec![id("reviews")], H2).unwrap();
    let (_, client_side) = exchange(server, client).await;
    let err = rustls_error(&client_side);
    assert!(matches!(err, rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })), "{err:?}");
}

/// A leaf signed by `ca` with the given EKUs only, built with rcgen from the CA's PEM files.
fn leaf_with_ekus(
    ca: &CertificateAuthority,
    identity: &Identity,
    ekus: Vec<ExtendedKeyUsagePurpose>,
) -> WorkloadCertificate {
    let ca_key = KeyPair::from_pem(&ca.key_pem()).unwrap();
    let issuer = CertificateParams::from_ca_cert_pem(&ca.cert_pem()).unwrap().self_signed(&ca_key).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().unwrap())];
    params.extended_key_usages = ekus;
    params.not_before = (SystemTime::now() - HOUR).into();
    params.not_after = (SystemTime::now() + HOUR).into();
    let leaf = params.signed_by(&key, &issuer, &ca_key).unwrap();
    WorkloadCertificate::from_pem(&leaf.pem(), &key.serialize_pem(), &ca.roots_pem()).unwrap()
}

#[tokio::test]
async fn server_rejects_a_client_certificate_without_client_auth_usage() {
    let ca = root("cluster.local");
    let server = server_config(&ca.issue(&id("reviews"), HOUR).unwrap(), H2).unwrap();
    for ekus in [vec![ExtendedKeyUsagePurpose::ServerAuth], vec![]] {
        let cert = leaf_with_ekus(&ca, &id("productpage"), ekus.clone());
        let client = client_config(&cert, vec![id("reviews")], H2).unwrap();
        let (server_side, _) = exchange(server.clone(), client).await;
        let err = rustls_error(&server_side);
        assert_eq!(err, &rustls::Error::InvalidCertificate(CertificateError::InvalidPurpose), "ekus {ekus:?}");
    }
}

#[tokio::test]
async fn leaves_of_an_intermediate_ca_are_trusted_through_the_root() {
    let root_ca = root("cluster.local");
    let root_key = KeyPair::from_pem(&root_ca.key_pem()).unwrap();
    let root_issuer = CertificateParams::from_ca_cert_pem(&root_ca.cert_pem()).unwrap().self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::OrganizationName, "cluster.local");
    params.distinguished_name.push(DnType::CommonName, "intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (SystemTime::now() - HOUR).into();
    params.not_after = (SystemTime::now() + 10 * HOUR).into();
    let intermediate = params.signed_by(&int_key, &root_issuer, &root_key).unwrap();
    let int_ca =
        CertificateAuthority::from_pem(&(intermediate.pem() + &root_ca.cert_pem()), &int_key.serialize_pem()).unwrap();
    assert_eq!(int_ca.roots_pem(), root_ca.roots_pem());

    let server_cert = int_ca.issue(&id("reviews"), HOUR).unwrap();
    assert_eq!(server_cert.chain().len(), 2, "leaf and intermediate");
    let server = server_config(&server_cert, H2).unwrap();
    let client = client_config(&root_ca.issue(&id("productpage"), HOUR).unwrap(), vec![id("reviews")], H2).unwrap();
    let (server_side, client_side) = exchange(server, client).await;
    assert_eq!(client_side.unwrap().peer, Some(id("reviews")));
    assert_eq!(server_side.unwrap().peer, Some(id("productpage")));

    // sign_csr returns the whole chain, root last.
    let (csr, _) = crate::generate_csr(&id("ratings")).unwrap();
    let chain = int_ca.sign_csr(&csr, &id("ratings"), HOUR).unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[2], root_ca.roots_pem());
}

#[tokio::test]
async fn a_ca_made_by_openssl_issues_certificates_peers_accept() {
    let dir = std::env::temp_dir().join(format!("ambit-identity-openssl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "1", "-subj", "/O=cluster.local/CN=Test Root CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&key_path)
        .arg("-out")
        .arg(&cert_path)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl must be installed for this test");
    assert!(status.success());
    let cert_pem = std::fs::read_to_string(&cert_path).unwrap();
    let key_pem = std::fs::read_to_string(&key_path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let ca = CertificateAuthority::from_pem(&cert_pem, &key_pem).unwrap();
    let server = server_config(&ca.issue(&id("reviews"), HOUR).unwrap(), H2).unwrap();
    let client = client_config(&ca.issue(&id("productpage"), HOUR).unwrap(), vec![id("reviews")], H2).unwrap();
    let (server_side, client_side) = exchange(server, client).await;
    assert_eq!(client_side.unwrap().peer, Some(id("reviews")));
    assert_eq!(server_side.unwrap().peer, Some(id("productpage")));
}

#[tokio::test]
async fn server_refuses_tls12_clients() {
    let ca = root("cluster.local");
    let cert = ca.issue(&id("productpage"), HOUR).unwrap();
    let server = server_config(&ca.issue(&id("reviews"), HOUR).unwrap(), H2).unwrap();
    let verifier = SpiffeServerVerifier::new(cert.roots(), vec![id("reviews")]).unwrap();
    let client = ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.private_key().clone_key())
        .unwrap();
    let (server_side, _) = exchange(server, Arc::new(client)).await;
    assert!(
        matches!(rustls_error(&server_side), rustls::Error::PeerIncompatible(_)),
        "{:?}",
        rustls_error(&server_side)
    );
}

#[test]
fn a_client_config_must_expect_some_identity() {
    let ca = root("cluster.local");
    let cert = ca.issue(&id("reviews"), HOUR).unwrap();
    let err = client_config(&cert, vec![], H2).unwrap_err();
    assert!(matches!(err, TlsError::NoExpectedIdentity), "{err}");
}
