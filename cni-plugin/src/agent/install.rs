//! Installs the CNI plugin on the node, as Istio's install-cni does: the
//! `ambit-cni` binary into the CNI bin dir, an `{"type": "ambit-cni", …}`
//! entry as the LAST plugin of the primary network's conflist (so it runs
//! after the primary CNI gave the pod its IP), and the kubeconfig the plugin
//! uses to read the pod's labels.
//!
//! The primary CNI (Calico, Cilium, kindnet…) may rewrite its file at any
//! time, dropping our entry; [`Installer::ensure`] is called every few
//! seconds and puts it back. Uninstall restores the primary's bytes exactly:
//! before writing, the primary's original text is kept in the state dir
//! next to what we wrote, and the original goes back only if the file still
//! holds what we wrote (the primary may have rewritten it meanwhile).
//!
//! Every write is a temp file in the same directory plus a rename, so a
//! container runtime reading the directory never sees half a file. Temp
//! files are named `.<name>.ambit-tmp`: runtimes load only `*.conf`,
//! `*.conflist` and `*.json`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// The plugin's `type`, and its binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "ambit-cni";
/// The plugin's kubeconfig, in the CNI conf dir.
pub const KUBECONFIG_FILE: &str = "ambit-cni-kubeconfig";
/// Where the primary's original conflist is kept while ours is installed.
const BACKUP_FILE: &str = "cni-conf-backup.json";

/// What to install, and where.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    /// The CNI bin dir on the host (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The CNI conf dir on the host (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The plugin binary to copy, inside the agent's image.
    pub plugin_binary: PathBuf,
    /// The agent's own state (the conflist backup).
    pub state_dir: PathBuf,
    /// Fields of our conflist entry besides `type` (the agent's socket…).
    pub plugin_fields: Map<String, Value>,
}

/// Why the plugin could not be installed or removed. Nothing is changed
/// on the node when reading or parsing fails.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file or directory could not be read, written or removed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The primary CNI configuration is not JSON or not a valid network config.
    #[error("CNI config {path} is invalid, left unchanged: {reason}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io { what, path: path.to_owned(), source }
}

/// What [`Installer::ensure`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// The entry is in place in this conflist.
    Ready(PathBuf),
    /// The conf dir holds no network config yet (the primary CNI has not
    /// written one); nothing was written.
    NoPrimary,
}

/// The original text of the primary conflist and what we replaced it with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Backup {
    /// The primary's file as it wrote it.
    original_path: PathBuf,
    /// Its bytes (CNI configs are JSON, hence UTF-8).
    original: String,
    /// The file we wrote (the `.conflist` of a converted `.conf`).
    written_path: PathBuf,
    /// What we wrote.
    written: String,
}

/// Installs, repairs and removes the plugin.
#[derive(Debug)]
pub struct Installer {
    config: InstallConfig,
}

impl Installer {
    /// An installer for `config`; nothing is touched until [`Installer::ensure`].
    pub fn new(config: InstallConfig) -> Self {
        Installer { config }
    }

    /// The plugin's kubeconfig path on the host.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.config.conf_dir.join(KUBECONFIG_FILE)
    }

    /// Puts everything in place, writing only what differs: the binary, the
    /// kubeconfig (`kubeconfig` is its text; the token it holds rotates, so
    /// it is passed on every call), and the entry in the primary conflist.
    pub fn ensure(&self, kubeconfig: &str) -> Result<Installed, InstallError> {
        // Read and check the config before touching anything, so a broken
        // file in the conf dir changes nothing.
        let Some(primary) = find_primary(&self.config.conf_dir)? else {
            return Ok(Installed::NoPrimary);
        };
        let original = fs::read_to_string(&primary).map_err(io_err("read", &primary))?;
        let entry = self.entry();
        let updated = insert_entry(&primary, &original, &entry)?;
        let target = conflist_path(&primary);

        let binary = self.config.bin_dir.join(PLUGIN_TYPE);
        let plugin =
            fs::read(&self.config.plugin_binary).map_err(io_err("read plugin binary", &self.config.plugin_binary))?;
        if fs::read(&binary).ok().as_deref() != Some(&plugin[..]) {
            write_atomic(&binary, &plugin, 0o755)?;
            tracing::info!(path = %binary.display(), "CNI plugin binary installed");
        }
        let kc_path = self.kubeconfig_path();
        if fs::read(&kc_path).ok().as_deref() != Some(kubeconfig.as_bytes()) {
            write_atomic(&kc_path, kubeconfig.as_bytes(), 0o600)?;
            tracing::info!(path = %kc_path.display(), "CNI plugin kubeconfig written");
        }

        let Some(updated) = updated else {
            return Ok(Installed::Ready(target)); // already ours, already last
        };
        // The backup keeps the primary's own text: if the file already holds
        // an older entry of ours, the previous backup is still the original.
        let previous = self.read_backup();
        let original_backup = match previous {
            Some(b) if b.written_path == primary && b.written == original => (b.original_path, b.original),
            // Our entry without a backup (state lost): the best original left
            // is the file without it.
            _ => (primary.clone(), remove_entry(&primary, &original)?.unwrap_or(original)),
        };
        let backup = Backup {
            original_path: original_backup.0,
            original: original_backup.1,
            written_path: target.clone(),
            written: updated,
        };
        self.write_backup(&backup)?;
        write_atomic(&target, backup.written.as_bytes(), 0o644)?;
        if target != primary {
            // A converted `.conf`: the runtime must see only the conflist.
            fs::remove_file(&primary).map_err(io_err("remove", &primary))?;
        }
        tracing::info!(path = %target.display(), "CNI plugin entry inserted");
        Ok(Installed::Ready(target))
    }

    /// Removes the entry (restoring the primary's bytes when the file is
    /// still what we wrote), the binary and the kubeconfig. Absent pieces are
    /// not an error, so this is safe to repeat.
    pub fn uninstall(&self) -> Result<(), InstallError> {
        let backup = self.read_backup();
        let restored = match &backup {
            Some(b) if fs::read_to_string(&b.written_path).ok().as_deref() == Some(b.written.as_str()) => {
                write_atomic(&b.original_path, b.original.as_bytes(), 0o644)?;
                if b.written_path != b.original_path {
                    fs::remove_file(&b.written_path).map_err(io_err("remove", &b.written_path))?;
                }
                tracing::info!(path = %b.original_path.display(), "CNI config restored");
                true
            }
            _ => false,
        };
        if !restored {
            // Someone rewrote the file since (or the backup is lost): take our
            // entry out and keep the rest as it is now.
            if let Some(primary) = find_primary(&self.config.conf_dir)? {
                let text = fs::read_to_string(&primary).map_err(io_err("read", &primary))?;
                if let Some(without) = remove_entry(&primary, &text)? {
                    write_atomic(&primary, without.as_bytes(), 0o644)?;
                    tracing::info!(path = %primary.display(), "CNI plugin entry removed");
                }
            }
        }
        for path in
            [self.config.bin_dir.join(PLUGIN_TYPE), self.kubeconfig_path(), self.config.state_dir.join(BACKUP_FILE)]
        {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err("remove", &path)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    fn entry(&self) -> Value {
        let mut entry = self.config.plugin_fields.clone();
        entry.insert("type".into(), PLUGIN_TYPE.into());
        Value::Object(entry)
    }

    fn read_backup(&self) -> Option<Backup> {
        let path = self.config.state_dir.join(BACKUP_FILE);
        let text = fs::read(&path).ok()?;
        serde_json::from_slice(&text)
            .inspect_err(|e| tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable CNI backup"))
            .ok()
    }

    fn write_backup(&self, backup: &Backup) -> Result<(), InstallError> {
        let dir = &self.config.state_dir;
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let text = serde_json::to_vec(backup).expect("bug: a backup always serializes");
        write_atomic(&dir.join(BACKUP_FILE), &text, 0o600)
    }
}

/// The network config the runtime uses: the lexically first `*.conflist` or
/// `*.conf` in `dir` (containerd's and CRI-O's rule; `*.json` is left out as
/// Istio does). `None` while there is none.
pub fn find_primary(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read dir", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("read dir", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && (name.ends_with(".conflist") || name.ends_with(".conf")) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.first().map(|n| dir.join(n)))
}

/// Where a config is written once it holds our entry: a single-plugin
/// `.conf` becomes a `.conflist` (a list is needed to chain a plugin).
fn conflist_path(primary: &Path) -> PathBuf {
    if primary.extension().is_some_and(|e| e == "conf") {
        primary.with_extension("conflist")
    } else {
        primary.to_owned()
    }
}

/// `text` (the file at `path`) with `entry` as its last plugin, a `.conf`
/// turned into a conflist; `None` if it already ends with exactly `entry`.
/// Older entries of ours are dropped, so changing flags updates in place.
pub fn insert_entry(path: &Path, text: &str, entry: &Value) -> Result<Option<String>, InstallError> {
    let bad = |reason: String| InstallError::BadConfig { path: path.to_owned(), reason };
    let mut conf: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let obj = conf.as_object_mut().ok_or_else(|| bad("not a JSON object".into()))?;
    if !obj.contains_key("plugins") {
        // A single-plugin `.conf`: wrap it, keeping its name and version at
        // the top as a conflist must have them.
        if !obj.get("type").is_some_and(Value::is_string) {
            return Err(bad("neither a conflist (\"plugins\") nor a plugin (\"type\")".into()));
        }
        let plugin = Value::Object(std::mem::take(obj));
        conf = json!({
            "cniVersion": plugin.get("cniVersion").cloned().unwrap_or(Value::Null),
            "name": plugin.get("name").cloned().unwrap_or(Value::Null),
            "plugins": [plugin],
        });
    }
    let plugins =
        conf.get_mut("plugins").and_then(Value::as_array_mut).ok_or_else(|| bad("\"plugins\" is not a list".into()))?;
    if plugins.last() == Some(entry) && plugins.iter().filter(|p| is_ours(p)).count() == 1 {
        return Ok(None);
    }
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        return Err(bad("no plugin to chain after".into()));
    }
    plugins.push(entry.clone());
    Ok(Some(render(&conf)))
}

/// `text` without our entries; `None` if it holds none.
pub fn remove_entry(path: &Path, text: &str) -> Result<Option<String>, InstallError> {
    let bad = |reason: String| InstallError::BadConfig { path: path.to_owned(), reason };
    let mut conf: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Ok(None);
    };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    Ok((plugins.len() != before).then(|| render(&conf)))
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn render(conf: &Value) -> String {
    let mut text = serde_json::to_string_pretty(conf).expect("bug: a JSON value always serializes");
    text.push('\n');
    text
}

/// Writes `bytes` to `path` through a temp file in the same directory and a
/// rename, so readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.ambit-tmp"));
    let write = || -> std::io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        // The umask may have narrowed the mode.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err("write", path)(e)
    })
}

#[cfg(test)]
#[path = "install_tests.rs"]
mod tests;
