//! Install, repair and uninstall on temporary directories.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// Calico-like conflist, formatted as its writer formats it (not as
/// serde_json would), so byte-identical restores are really checked.
const CONFLIST: &str = "{\n  \"name\": \"k8s-pod-network\",\n  \"cniVersion\": \"0.3.1\",\n  \"plugins\": [\n    {\"type\": \"calico\", \"ipam\": {\"type\": \"host-local\"}},\n    {\"type\": \"portmap\", \"capabilities\": {\"portMappings\": true}}\n  ]\n}\n";
const CONF: &str = "{ \"cniVersion\": \"0.4.0\", \"name\": \"bridge\", \"type\": \"bridge\", \"bridge\": \"cni0\" }";
const KUBECONFIG: &str = "apiVersion: v1\nkind: Config\n";

/// A temp tree (conf, bin, state dirs and the plugin binary), removed on drop.
struct Tree {
    root: PathBuf,
    installer: Installer,
}

impl Tree {
    fn new() -> Tree {
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "ambit-install-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        for d in ["conf", "bin", "state", "image"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("image/ambit-cni"), b"#!plugin v1").unwrap();
        let mut plugin_fields = Map::new();
        plugin_fields.insert("agent_socket".into(), "/var/run/ambit/cni.sock".into());
        let installer = Installer::new(InstallConfig {
            bin_dir: root.join("bin"),
            conf_dir: root.join("conf"),
            plugin_binary: root.join("image/ambit-cni"),
            state_dir: root.join("state"),
            plugin_fields,
        });
        Tree { root, installer }
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.root.join("conf").join(name)
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.conf(name)).unwrap()
    }

    fn plugins(&self, name: &str) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.read(name)).unwrap();
        v["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap().to_string()).collect()
    }

    fn listing(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(self.root.join(dir)).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

#[test]
fn inserts_last_into_the_first_conflist_with_binary_and_kubeconfig() {
    let t = Tree::new();
    fs::write(t.conf("10-calico.conflist"), CONFLIST).unwrap();
    fs::write(t.conf("20-other.conflist"), CONFLIST).unwrap();
    let got = t.installer.ensure(KUBECONFIG).unwrap();
    assert_eq!(got, Installed::Ready(t.conf("10-calico.conflist")));
    assert_eq!(t.plugins("10-calico.conflist"), ["calico", "portmap", PLUGIN_TYPE]);
    assert_eq!(t.read("20-other.conflist"), CONFLIST, "only the primary changes");
    let v: Value = serde_json::from_str(&t.read("10-calico.conflist")).unwrap();
    assert_eq!(v["plugins"][2]["agent_socket"], "/var/run/ambit/cni.sock");
    assert_eq!(v["name"], "k8s-pod-network");

    let bin = t.root.join("bin").join(PLUGIN_TYPE);
    assert_eq!(fs::read(&bin).unwrap(), b"#!plugin v1");
    assert_eq!(fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
    let kc = t.installer.kubeconfig_path();
    assert_eq!(fs::read_to_string(&kc).unwrap(), KUBECONFIG);
    assert_eq!(fs::metadata(&kc).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(t.listing("conf"), ["10-calico.conflist", "20-other.conflist", KUBECONFIG_FILE], "no temp files left");
}

#[test]
fn ensure_is_idempotent_and_follows_a_rotated_token() {
    let t = Tree::new();
    fs::write(t.conf("10-calico.conflist"), CONFLIST).unwrap();
    t.installer.ensure(KUBECONFIG).unwrap();
    let first = t.read("10-calico.conflist");
    let mtime = fs::metadata(t.conf("10-calico.conflist")).unwrap().modified().unwrap();
    t.installer.ensure(KUBECONFIG).unwrap();
    assert_eq!(t.read("10-calico.conflist"), first);
    assert_eq!(fs::metadata(t.conf("10-calico.conflist")).unwrap().modified().unwrap(), mtime, "not rewritten");
    assert_eq!(t.plugins("10-calico.conflist").iter().filter(|p| *p == PLUGIN_TYPE).count(), 1);

    t.installer.ensure("rotated token\n").unwrap();
    assert_eq!(fs::read_to_string(t.installer.kubeconfig_path()).unwrap(), "rotated token\n");
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist_and_comes_back_on_uninstall() {
    let t = Tree::new();
    fs::write(t.conf("10-bridge.conf"), CONF).unwrap();
    assert_eq!(t.installer.ensure(KUBECONFIG).unwrap(), Installed::Ready(t.conf("10-bridge.conflist")));
    assert_eq!(t.listing("conf"), ["10-bridge.conflist", KUBECONFIG_FILE]);
    assert_eq!(t.plugins("10-bridge.conflist"), ["bridge", PLUGIN_TYPE]);
    let v: Value = serde_json::from_str(&t.read("10-bridge.conflist")).unwrap();
    assert_eq!((v["cniVersion"].as_str(), v["name"].as_str()), (Some("0.4.0"), Some("bridge")));
    // Repeating changes nothing: the conflist is now the primary.
    let written = t.read("10-bridge.conflist");
    t.installer.ensure(KUBECONFIG).unwrap();
    assert_eq!(t.read("10-bridge.conflist"), written);

    t.installer.uninstall().unwrap();
    assert_eq!(t.listing("conf"), ["10-bridge.conf"]);
    assert_eq!(t.read("10-bridge.conf"), CONF);
}

#[test]
fn reinserts_after_the_primary_rewrites_its_file() {
    let t = Tree::new();
    fs::write(t.conf("10-calico.conflist"), CONFLIST).unwrap();
    t.installer.ensure(KUBECONFIG).unwrap();
    let rewritten = CONFLIST.replace("0.3.1", "1.0.0");
    fs::write(t.conf("10-calico.conflist"), &rewritten).unwrap();
    t.installer.ensure(KUBECONFIG).unwrap();
    assert_eq!(t.plugins("10-calico.conflist"), ["calico", "portmap", PLUGIN_TYPE]);
    // Uninstall restores the rewritten text, not the first one.
    t.installer.uninstall().unwrap();
    assert_eq!(t.read("10-calico.conflist"), rewritten);
}

#[test]
fn uninstall_restores_the_bytes_and_removes_binary_and_kubeconfig() {
    let t = Tree::new();
    fs::write(t.conf("10-calico.conflist"), CONFLIST).unwrap();
    t.installer.ensure(KUBECONFIG).unwrap();
    t.installer.uninstall().unwrap();
    assert_eq!(t.read("10-calico.conflist"), CONFLIST);
    assert_eq!(t.listing("conf"), ["10-calico.conflist"]);
    assert!(t.listing("bin").is_empty() && t.listing("state").is_empty());
    t.installer.uninstall().unwrap(); // repeating is harmless
    assert_eq!(t.read("10-calico.conflist"), CONFLIST);
}

#[test]
fn uninstall_without_a_backup_removes_only_our_entry() {
    let t = Tree::new();
    fs::write(t.conf("10-calico.conflist"), CONFLIST).unwrap();
    t.installer.ensure(KUBECONFIG).unwrap();
    fs::remove_file(t.root.join("state").join(BACKUP_FILE)).unwrap(); // e.g. a reboot emptied /var/run
    t.installer.uninstall().unwrap();
    assert_eq!(t.plugins("10-calico.conflist"), ["calico", "portmap"]);
}

#[test]
fn a_changed_entry_is_updated_in_place_and_the_original_kept() {
    let mut t = Tree::new();
    fs::write(t.conf("10-calico.conflist"), CONFLIST).unwrap();
    t.installer.ensure(KUBECONFIG).unwrap();
    t.installer.config.plugin_fields.insert("log_level".into(), "debug".into());
    t.installer.ensure(KUBECONFIG).unwrap();
    assert_eq!(t.plugins("10-calico.conflist"), ["calico", "portmap", PLUGIN_TYPE]);
    let v: Value = serde_json::from_str(&t.read("10-calico.conflist")).unwrap();
    assert_eq!(v["plugins"][2]["log_level"], "debug");
    t.installer.uninstall().unwrap();
    assert_eq!(t.read("10-calico.conflist"), CONFLIST);
}

#[test]
fn malformed_json_is_an_error_naming_the_file_and_changes_nothing() {
    let t = Tree::new();
    fs::write(t.conf("10-broken.conflist"), "{\"plugins\": [").unwrap();
    let err = t.installer.ensure(KUBECONFIG).unwrap_err().to_string();
    assert!(err.contains("10-broken.conflist") && err.contains("invalid"), "{err}");
    assert_eq!(t.read("10-broken.conflist"), "{\"plugins\": [");
    assert_eq!(t.listing("conf"), ["10-broken.conflist"]);
    assert!(t.listing("bin").is_empty(), "nothing installed before the config is known good");

    fs::write(t.conf("10-broken.conflist"), "{\"plugins\": 3}").unwrap();
    let err = t.installer.ensure(KUBECONFIG).unwrap_err().to_string();
    assert!(err.contains("not a list"), "{err}");
}

#[test]
fn no_primary_yet_writes_nothing() {
    let t = Tree::new();
    fs::write(t.conf("README"), "not a config").unwrap();
    assert_eq!(t.installer.ensure(KUBECONFIG).unwrap(), Installed::NoPrimary);
    assert_eq!(t.listing("conf"), ["README"]);
    assert!(t.listing("bin").is_empty());
}
