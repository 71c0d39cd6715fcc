//! Writing a sysctl of another network namespace.

use std::path::Path;

/// Failure to set a namespaced sysctl.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The namespace file could not be opened or entered.
    #[error("cannot enter network namespace {netns}: {source}")]
    Enter {
        /// The namespace path.
        netns: String,
        /// Why.
        source: std::io::Error,
    },
    /// The sysctl could not be written (`NotFound`: the kernel lacks it).
    #[error("cannot write {key}={value} in {netns}: {source}")]
    Write {
        /// e.g. `net/ipv4/tcp_migrate_req`.
        key: String,
        /// The value.
        value: String,
        /// The namespace path.
        netns: String,
        /// Why.
        source: std::io::Error,
    },
}

impl SysctlError {
    /// Whether the kernel does not have this sysctl (older kernels).
    pub fn is_missing(&self) -> bool {
        matches!(self, SysctlError::Write { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Writes `/proc/sys/<key>` as seen from the network namespace at `netns`.
///
/// `/proc/sys/net` resolves against the network namespace of the thread that
/// opens the file, so this enters the namespace on a dedicated short-lived OS
/// thread (never a pooled one, which would stay in the pod's namespace).
/// Blocking.
pub fn set_sysctl(netns: &Path, key: &str, value: &str) -> Result<(), SysctlError> {
    let ns = netns.display().to_string();
    let file = std::fs::File::open(netns).map_err(|source| SysctlError::Enter { netns: ns.clone(), source })?;
    let (key, value) = (key.to_string(), value.to_string());
    let thread = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| SysctlError::Enter { netns: ns.clone(), source: e.into() })?;
        std::fs::write(format!("/proc/sys/{key}"), &value).map_err(|source| SysctlError::Write {
            key,
            value,
            netns: ns,
            source,
        })
    });
    thread.join().unwrap_or_else(|_| panic!("bug: sysctl thread panicked"))
}
