//! Test helpers: a per-test temporary directory and descriptor comparisons.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;

/// A directory named after the test and the process, removed on drop (also
/// when the test panics).
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ambit-zds-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// This process's network namespace, opened.
pub fn netns_fd() -> OwnedFd {
    std::fs::File::open("/proc/self/ns/net").unwrap().into()
}

/// True when both descriptors refer to the same file (same device and inode).
pub fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let (a, b) = (nix::sys::stat::fstat(a).unwrap(), nix::sys::stat::fstat(b).unwrap());
    (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
}
