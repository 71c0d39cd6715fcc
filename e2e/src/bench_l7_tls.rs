//! The certificates of the L7 benchmark's HAProxy path, which does the waypoint's TLS work: mutual TLS 1.3 from the
//! client (`oha`) to HAProxy and from HAProxy to nginx. One CA and certificates of the mesh's kind (Ambit's CA: ECDSA
//! P-256, SPIFFE identities, server and client use), written as PEM files for HAProxy, nginx and `oha`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_identity::ca::CertificateAuthority;
use ambit_identity::Identity;
use anyhow::Context;

use crate::bench_l7_rate::ClientCert;

const TRUST_DOMAIN: &str = "cluster.local";
const VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// The PEM files, in one directory.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA's certificate: what every side trusts.
    pub ca: PathBuf,
    /// HAProxy's certificate and key in one file, for its listeners and towards nginx.
    pub haproxy: PathBuf,
    pub nginx_cert: PathBuf,
    pub nginx_key: PathBuf,
    /// The load generator's.
    pub client: ClientCert,
}

/// Makes a CA and the three certificates (service accounts `haproxy`, `nginx`, `client` in `namespace`) in `dir`.
pub fn write(dir: &Path, namespace: &str) -> anyhow::Result<TlsFiles> {
    fs::create_dir_all(dir)?;
    let ca = CertificateAuthority::generate_root(TRUST_DOMAIN, VALIDITY).context("bench CA")?;
    let file = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        fs::write(&path, pem).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    };
    let issue = |sa: &str| ca.issue(&Identity::new(TRUST_DOMAIN, namespace, sa), VALIDITY).context("bench certificate");
    let (haproxy, nginx, client) = (issue("haproxy")?, issue("nginx")?, issue("client")?);
    Ok(TlsFiles {
        ca: file("ca.pem", ca.roots_pem())?,
        haproxy: file("haproxy.pem", haproxy.chain_pem() + &haproxy.key_pem())?,
        nginx_cert: file("nginx.pem", nginx.chain_pem())?,
        nginx_key: file("nginx.key", nginx.key_pem())?,
        client: ClientCert {
            cert: file("client.pem", client.chain_pem())?,
            key: file("client.key", client.key_pem())?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_ca_and_three_certificates_with_their_keys() {
        let dir = std::env::temp_dir().join(format!("ambit-bench-tls-{}", std::process::id()));
        let files = write(&dir, "default").unwrap();
        let read = |p: &PathBuf| fs::read_to_string(p).unwrap();
        assert!(read(&files.ca).starts_with("-----BEGIN CERTIFICATE-----"));
        let haproxy = read(&files.haproxy);
        assert!(haproxy.contains("BEGIN CERTIFICATE") && haproxy.contains("PRIVATE KEY"), "{haproxy}");
        assert!(read(&files.nginx_key).contains("PRIVATE KEY"));
        assert!(read(&files.client.cert).contains("BEGIN CERTIFICATE"));
        assert!(read(&files.client.key).contains("PRIVATE KEY"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
