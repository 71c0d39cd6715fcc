//! Workload certificates held in memory: fetched on first use (or when a pod
//! is enrolled), shared by every connection of that identity, and rotated at
//! half-life in the background. Rotation only affects new TLS handshakes, so
//! open connections are never dropped.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use ambit_identity::{tls, CertificateAuthority, CertificateSummary, Identity, WorkloadCertificate};
use rustls::{ClientConfig, ServerConfig};
use tracing::{info, warn};

/// ALPN of HBONE: HTTP/2.
pub const HBONE_ALPN: &[&[u8]] = &[b"h2"];

/// Errors obtaining certificates or TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate provider failed for {identity}: {message}")]
    Provider { identity: Identity, message: String },
    #[error("cannot read the development CA file {path}: {source}")]
    ReadCa { path: std::path::PathBuf, source: std::io::Error },
    #[error("invalid development CA: {0}")]
    Ca(#[from] ambit_identity::CaError),
    #[error("cannot build TLS configuration: {0}")]
    Tls(#[from] ambit_identity::TlsError),
}

/// Something that issues workload certificates: the development CA
/// ([`LocalCa`]) or the controller's CA service ([`crate::ca::CaClient`]).
pub trait CertificateProvider: Send + Sync + 'static {
    fn fetch<'a>(
        &'a self,
        id: &'a Identity,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CertError>> + Send + 'a>>;
}

/// Development mode: signs certificates in-process with a root key read from
/// files. Never use it where the node must not hold the mesh's root key.
pub struct LocalCa {
    ca: CertificateAuthority,
    ttl: Duration,
}

impl LocalCa {
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path, ttl: Duration) -> Result<Self, CertError> {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|source| CertError::ReadCa { path: path.to_owned(), source })
        };
        let ca = CertificateAuthority::from_pem(&read(cert)?, &read(key)?)?;
        Ok(LocalCa { ca, ttl })
    }
}

impl CertificateProvider for LocalCa {
    fn fetch<'a>(
        &'a self,
        id: &'a Identity,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CertError>> + Send + 'a>> {
        Box::pin(async move {
            self.ca
                .issue(id, self.ttl)
                .map_err(|e| CertError::Provider { identity: id.clone(), message: e.to_string() })
        })
    }
}

/// One identity's certificate with the TLS configurations built from it.
pub struct Certs {
    pub cert: WorkloadCertificate,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<Identity, Arc<ClientConfig>>>,
}

impl Certs {
    fn new(cert: WorkloadCertificate) -> Result<Self, CertError> {
        let server = tls::server_config(&cert, HBONE_ALPN)?;
        Ok(Certs { cert, server, clients: Mutex::new(HashMap::new()) })
    }

    /// TLS server configuration presenting this certificate.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// TLS client configuration presenting this certificate and accepting
    /// only a server with identity `peer`. Cached per peer identity, which
    /// also keeps TLS session resumption working.
    pub fn client_config(&self, peer: &Identity) -> Result<Arc<ClientConfig>, CertError> {
        let mut clients = self.clients.lock().expect("bug: poisoned client config cache");
        if let Some(c) = clients.get(peer) {
            return Ok(c.clone());
        }
        let c = tls::client_config(&self.cert, vec![peer.clone()], HBONE_ALPN)?;
        clients.insert(peer.clone(), c.clone());
        Ok(c)
    }
}

impl ambit_hbone::pool::ClientCerts for Certs {
    fn serial(&self) -> &str {
        self.cert.serial()
    }

    fn client_config(&self, peer: &Identity) -> Result<Arc<ClientConfig>, ambit_hbone::pool::BoxError> {
        Certs::client_config(self, peer).map_err(Into::into)
    }
}

struct Slot {
    current: RwLock<Option<Arc<Certs>>>,
    init: tokio::sync::Mutex<()>,
    users: Mutex<usize>,
}

/// When to renew `cert`. Leaves are backdated for clock skew (5 min), so with
/// a short TTL their half-life can already be past on arrival, which made the
/// rotation task re-issue in a tight loop: renew at half of what is left,
/// and never sooner than a second from now.
fn next_refresh(cert: &WorkloadCertificate) -> SystemTime {
    let now = SystemTime::now();
    let left = cert.not_after().duration_since(now).unwrap_or_default();
    cert.refresh_at().max(now + left / 2).max(now + Duration::from_secs(1))
}

/// Told the outcome of every certificate request (`true`: issued), for the
/// proxy's metrics.
pub type FetchObserver = Box<dyn Fn(bool) + Send + Sync>;

/// Caches and rotates certificates per identity.
pub struct CertManager {
    provider: Arc<dyn CertificateProvider>,
    slots: Mutex<HashMap<Identity, Arc<Slot>>>,
    observer: FetchObserver,
}

impl CertManager {
    /// Certificates from `provider`; `observer` is told every request's outcome.
    pub fn new(provider: Arc<dyn CertificateProvider>, observer: FetchObserver) -> Arc<Self> {
        Arc::new(CertManager { provider, slots: Mutex::new(HashMap::new()), observer })
    }

    fn slot(&self, id: &Identity) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("bug: poisoned cert slots");
        slots
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(Slot { current: RwLock::new(None), init: tokio::sync::Mutex::new(()), users: Mutex::new(0) })
            })
            .clone()
    }

    /// The current certificate for `id`, fetching it if needed. Concurrent
    /// callers share one fetch.
    pub async fn get(self: &Arc<Self>, id: &Identity) -> Result<Arc<Certs>, CertError> {
        let slot = self.slot(id);
        if let Some(c) = usable(&slot) {
            return Ok(c);
        }
        let _g = slot.init.lock().await;
        if let Some(c) = usable(&slot) {
            return Ok(c);
        }
        let first = slot.current.read().expect("bug: poisoned cert").is_none();
        let certs = self.fetch(id).await?;
        *slot.current.write().expect("bug: poisoned cert") = Some(certs.clone());
        if first {
            self.spawn_rotation(id.clone(), Arc::downgrade(&slot), next_refresh(&certs.cert));
        }
        Ok(certs)
    }

    async fn fetch(&self, id: &Identity) -> Result<Arc<Certs>, CertError> {
        let r = match self.provider.fetch(id).await {
            Ok(cert) => Certs::new(cert).map(Arc::new),
            Err(e) => Err(e),
        };
        (self.observer)(r.is_ok());
        r
    }

    fn spawn_rotation(self: &Arc<Self>, id: Identity, slot: Weak<Slot>, first_refresh: SystemTime) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut refresh_at = first_refresh;
            let mut backoff = Duration::from_secs(1);
            loop {
                let wait = refresh_at.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait).await;
                let (Some(mgr), Some(slot)) = (me.upgrade(), slot.upgrade()) else { return };
                match mgr.fetch(&id).await {
                    Ok(certs) => {
                        info!(identity = %id, not_after = ?certs.cert.not_after(), "rotated workload certificate");
                        refresh_at = next_refresh(&certs.cert);
                        *slot.current.write().expect("bug: poisoned cert") = Some(certs);
                        backoff = Duration::from_secs(1);
                    }
                    Err(e) => {
                        warn!(identity = %id, error = %e, retry_in = ?backoff, "certificate rotation failed");
                        refresh_at = SystemTime::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
    }

    /// Declares a user (an enrolled pod) of `id` and fetches its certificate
    /// ahead of the first connection.
    pub async fn acquire(self: &Arc<Self>, id: &Identity) -> Result<Arc<Certs>, CertError> {
        *self.slot(id).users.lock().expect("bug: poisoned users") += 1;
        self.get(id).await
    }

    /// Releases a user of `id`; the certificate is forgotten (and its
    /// rotation stops) when no pod uses it any more.
    pub fn release(&self, id: &Identity) {
        let mut slots = self.slots.lock().expect("bug: poisoned cert slots");
        if let Some(slot) = slots.get(id) {
            let mut users = slot.users.lock().expect("bug: poisoned users");
            *users = users.saturating_sub(1);
            if *users == 0 {
                drop(users);
                slots.remove(id);
            }
        }
    }

    /// Summaries of the certificates held (no keys), for the config dump.
    pub fn summaries(&self) -> Vec<CertificateSummary> {
        let slots = self.slots.lock().expect("bug: poisoned cert slots");
        let mut out: Vec<_> = slots
            .values()
            .filter_map(|s| s.current.read().expect("bug: poisoned cert").as_ref().map(|c| c.cert.summary()))
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

fn usable(slot: &Slot) -> Option<Arc<Certs>> {
    let cur = slot.current.read().expect("bug: poisoned cert");
    cur.as_ref().filter(|c| !c.cert.is_expired(SystemTime::now())).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_before_refresh(cert: &WorkloadCertificate) -> Duration {
        next_refresh(cert).duration_since(SystemTime::now()).unwrap_or_default()
    }

    #[test]
    fn a_short_lived_certificate_is_renewed_at_half_of_its_remaining_life() {
        let ca = CertificateAuthority::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let cert = ca.issue(&Identity::new("cluster.local", "default", "a"), Duration::from_secs(60)).unwrap();
        let wait = wait_before_refresh(&cert);
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "{wait:?}");
    }

    #[test]
    fn an_expired_certificate_is_renewed_after_a_pause_not_in_a_loop() {
        let ca = CertificateAuthority::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let now = SystemTime::now();
        let id = Identity::new("cluster.local", "default", "a");
        let cert = ca.issue_with_validity(&id, now - Duration::from_secs(120), now - Duration::from_secs(60)).unwrap();
        assert!(wait_before_refresh(&cert) >= Duration::from_millis(900));
    }

    /// Issues from an in-memory CA and counts its calls.
    struct Counting {
        ca: CertificateAuthority,
        calls: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl CertificateProvider for Counting {
        fn fetch<'a>(
            &'a self,
            id: &'a Identity,
        ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CertError>> + Send + 'a>> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move { Ok(self.ca.issue(id, Duration::from_secs(3600)).unwrap()) })
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_and_the_observer_hears_each_request() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ca = CertificateAuthority::generate_root("cluster.local", Duration::from_secs(7200)).unwrap();
        let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = heard.clone();
        let observer: FetchObserver = Box::new(move |ok| {
            assert!(ok);
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let mgr = CertManager::new(Arc::new(Counting { ca, calls: calls.clone() }), observer);
        let id = Identity::new("cluster.local", "mesh", "waypoint");
        let (a, b) = tokio::join!(mgr.get(&id), mgr.get(&id));
        assert_eq!(a.unwrap().cert.serial(), b.unwrap().cert.serial());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(mgr.summaries().len(), 1);
    }
}
