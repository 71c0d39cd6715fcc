//! The enrolled pods on disk, so that a restarted agent knows them again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::pod::PodInfo;

/// The file name inside `EnrollConfig::state_dir`.
const FILE_NAME: &str = "enrolled.json";

/// One stored attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Stored {
    pub(super) pod: PodInfo,
    #[serde(default)]
    pub(super) container_id: Option<String>,
}

pub(super) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Writes the attachments atomically (temporary file, then rename), so a
/// crash leaves the old or the new list, never half of one.
pub(super) fn save(dir: &Path, pods: &[Stored]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(pods)?)?;
    std::fs::rename(&tmp, path(dir))
}

/// Reads the attachments; a missing file is an empty list.
pub(super) fn load(dir: &Path) -> std::io::Result<Vec<Stored>> {
    match std::fs::read(path(dir)) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_attachments_load_back_and_a_missing_file_is_empty() {
        let dir = std::env::temp_dir().join(format!("ambit-state-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(load(&dir).unwrap().is_empty());
        let stored = vec![Stored {
            pod: PodInfo {
                uid: "u1".into(),
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
                netns: "/var/run/netns/x".into(),
                ips: vec!["10.1.0.2".parse().unwrap()],
            },
            container_id: Some("c1".into()),
        }];
        save(&dir, &stored).unwrap();
        assert_eq!(load(&dir).unwrap(), stored);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
