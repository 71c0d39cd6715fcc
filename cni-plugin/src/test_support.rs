//! Helpers shared by the crate's tests.

/// True when the test may run; without root it returns false after a note,
/// unless `CI` is set, where a skipped test would hide a regression.
pub(crate) fn root_available(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root (network namespaces, nftables) and CI is set");
    }
    eprintln!("note: {test} skipped: needs root");
    false
}
