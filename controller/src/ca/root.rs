//! The mesh root: loaded from a store when it exists, generated and saved once
//! otherwise. A root that exists but does not load is an error, never replaced:
//! replacing it would silently cut every workload off from its peers.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_identity::CertificateAuthority;

/// Validity of a generated root.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// File name of the root certificate inside the CA directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// File name of the root's private key inside the CA directory.
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// Why the root cannot be loaded, generated or saved.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing a file of the store failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Only one half of the root exists; generating a new one would lose the other.
    #[error("found {present} but not {missing}: refusing to generate a new root over half of an old one")]
    Incomplete { present: String, missing: String },
    /// The stored root does not load (bad PEM, not a CA, key does not match).
    #[error("stored root in {location} is unusable: {source}")]
    Corrupt {
        location: String,
        #[source]
        source: ambit_identity::CaError,
    },
    /// Generating a new root failed (e.g. an invalid trust domain).
    #[error("cannot generate a root: {0}")]
    Generate(#[source] ambit_identity::CaError),
    /// A store other than files failed (e.g. the Kubernetes API of [`super::SecretRootStore`]).
    #[error("root store {location}: {source}")]
    Store {
        location: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The root as stored: the certificate bundle and its PKCS#8 key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredRoot {
    /// CA certificate, optionally followed by its chain to the root.
    pub cert_pem: String,
    /// PKCS#8 private key of the CA certificate.
    pub key_pem: String,
}

impl std::fmt::Debug for StoredRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredRoot").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// Where the root lives: files ([`FileRootStore`]) or a Kubernetes Secret
/// ([`super::SecretRootStore`]). Calls are blocking; they run once at start
/// (an async store blocks on its runtime from `spawn_blocking`).
pub trait RootStore: Send + Sync {
    /// The stored root, or `None` when nothing is stored yet.
    fn load(&self) -> Result<Option<StoredRoot>, CaError>;
    /// Saves a newly generated root; must not leave a half-written root behind.
    /// Returns the root now stored: `root`, or the one a concurrent writer
    /// (another replica) stored first, which then wins.
    fn save(&self, root: &StoredRoot) -> Result<StoredRoot, CaError>;
    /// Where the root lives, for error messages.
    fn location(&self) -> String;
}

/// A root kept as `root-cert.pem` and `root-key.pem` (mode 0600) in a directory.
#[derive(Debug, Clone)]
pub struct FileRootStore {
    dir: PathBuf,
}

impl FileRootStore {
    /// A store in `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileRootStore { dir: dir.into() }
    }

    fn cert_path(&self) -> PathBuf {
        self.dir.join(ROOT_CERT_FILE)
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join(ROOT_KEY_FILE)
    }
}

fn read_if_exists(path: &Path) -> Result<Option<String>, CaError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CaError::Io { action: "read", path: path.to_owned(), source }),
    }
}

/// Writes `contents` to a temporary file beside `path`, syncs it and renames
/// it over `path`, so a reader sees the old file or the whole new one.
fn write_atomically(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    let io = |action, source| CaError::Io { action, path: path.to_owned(), source };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("create a temporary file for", e))?;
    // The mode given to open is masked by the umask; set it exactly.
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| io("set permissions of", e))?;
    f.write_all(contents.as_bytes()).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io("rename a temporary file to", e)
    })
}

impl RootStore for FileRootStore {
    fn load(&self) -> Result<Option<StoredRoot>, CaError> {
        let (cert_path, key_path) = (self.cert_path(), self.key_path());
        match (read_if_exists(&cert_path)?, read_if_exists(&key_path)?) {
            (Some(cert_pem), Some(key_pem)) => Ok(Some(StoredRoot { cert_pem, key_pem })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(CaError::Incomplete {
                present: cert_path.display().to_string(),
                missing: key_path.display().to_string(),
            }),
            (None, Some(_)) => Err(CaError::Incomplete {
                present: key_path.display().to_string(),
                missing: cert_path.display().to_string(),
            }),
        }
    }

    fn save(&self, root: &StoredRoot) -> Result<StoredRoot, CaError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| CaError::Io {
            action: "create directory",
            path: self.dir.clone(),
            source,
        })?;
        // The key first: a crash between the renames leaves only the key, which
        // the next start reports as incomplete instead of trusting a lone cert.
        write_atomically(&self.key_path(), &root.key_pem, 0o600)?;
        write_atomically(&self.cert_path(), &root.cert_pem, 0o644)?;
        Ok(root.clone())
    }

    fn location(&self) -> String {
        format!("{} and {}", self.cert_path().display(), self.key_path().display())
    }
}

/// Loads the root from `store`, or generates one for `trust_domain` valid for
/// `validity` and saves it (keeping a concurrent writer's root if it won).
pub fn load_or_create(
    store: &dyn RootStore,
    trust_domain: &str,
    validity: Duration,
) -> Result<CertificateAuthority, CaError> {
    let parse = |root: &StoredRoot| {
        CertificateAuthority::from_pem(&root.cert_pem, &root.key_pem)
            .map_err(|source| CaError::Corrupt { location: store.location(), source })
    };
    if let Some(root) = store.load()? {
        tracing::info!(location = %store.location(), "loaded the mesh root");
        return parse(&root);
    }
    let ca = CertificateAuthority::generate_root(trust_domain, validity).map_err(CaError::Generate)?;
    let generated = StoredRoot { cert_pem: ca.cert_pem(), key_pem: ca.key_pem() };
    let stored = store.save(&generated)?;
    if stored != generated {
        tracing::info!(location = %store.location(), "another writer stored the mesh root first: using it");
        return parse(&stored);
    }
    tracing::info!(location = %store.location(), trust_domain, "generated a new mesh root");
    Ok(ca)
}

/// Loads `dir/root-cert.pem` and `dir/root-key.pem`, or generates a ten-year
/// root for `trust_domain` and writes them.
pub fn load_or_create_root(dir: &Path, trust_domain: &str) -> Result<CertificateAuthority, CaError> {
    load_or_create(&FileRootStore::new(dir), trust_domain, ROOT_VALIDITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ambit-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_root_persisted_then_reloaded_is_the_same_root() {
        let dir = temp_dir("reload");
        let first = load_or_create_root(&dir, "cluster.local").unwrap();
        let mode = std::fs::metadata(dir.join(ROOT_KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key file is private");
        let second = load_or_create_root(&dir, "cluster.local").unwrap();
        assert_eq!(first.cert_pem(), second.cert_pem());
        assert_eq!(first.key_pem(), second.key_pem());
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 2, "no temporary files left: {leftovers:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_root_file_is_an_error_naming_it_and_is_not_overwritten() {
        let dir = temp_dir("corrupt");
        load_or_create_root(&dir, "cluster.local").unwrap();
        std::fs::write(dir.join(ROOT_CERT_FILE), "garbage").unwrap();
        let err = load_or_create_root(&dir, "cluster.local").unwrap_err();
        assert!(matches!(err, CaError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(ROOT_CERT_FILE), "{err}");
        assert_eq!(std::fs::read_to_string(dir.join(ROOT_CERT_FILE)).unwrap(), "garbage");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn half_a_root_is_an_error_not_a_reason_to_generate() {
        let dir = temp_dir("half");
        load_or_create_root(&dir, "cluster.local").unwrap();
        std::fs::remove_file(dir.join(ROOT_CERT_FILE)).unwrap();
        let err = load_or_create_root(&dir, "cluster.local").unwrap_err();
        assert!(matches!(err, CaError::Incomplete { .. }), "{err}");
        assert!(!dir.join(ROOT_CERT_FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
