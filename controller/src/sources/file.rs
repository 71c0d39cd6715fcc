//! The file source: every `*.yaml`/`*.yml` file of a directory, polled. When
//! the files' contents change, the objects are parsed again, the model is
//! rebuilt, and a new snapshot is published if its resources changed.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::model::{self, parse, ClusterObjects, ModelOptions, Rejection, RejectionSink, SnapshotTx, Warning};

/// Default time between two looks at the directory.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);

/// Why the directory could not be read (the last good snapshot stays).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The directory cannot be listed.
    #[error("cannot list {dir}: {source}")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The YAML files of a directory: names (sorted) and contents.
#[derive(Debug, Default, PartialEq, Eq, Hash)]
pub struct Files(pub Vec<(String, Vec<u8>)>);

impl Files {
    /// Reads every `*.yaml`/`*.yml` regular file of `dir` (not recursive; hidden files skipped,
    /// which also skips the `..data` links of mounted ConfigMaps).
    pub fn read(dir: &Path) -> Result<Self, SourceError> {
        let read_dir_err = |source| SourceError::ReadDir { dir: dir.to_owned(), source };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir_err)? {
            let path = entry.map_err(read_dir_err)?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            if !yaml || name.starts_with('.') || !path.is_file() {
                continue;
            }
            match std::fs::read(&path) {
                Ok(bytes) => files.push((name.to_owned(), bytes)),
                // Deleted between listing and reading: the next poll sees the new state.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(SourceError::ReadFile { path, source }),
            }
        }
        files.sort();
        Ok(Self(files))
    }

    /// A hash of names and contents, to notice changes.
    pub fn digest(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    /// Parses every file; a later duplicate of an object (same kind and key) is rejected.
    pub fn objects(&self) -> (ClusterObjects, Vec<Rejection>) {
        let mut objects = ClusterObjects::default();
        let mut rejections = Vec::new();
        for (name, bytes) in &self.0 {
            let Ok(text) = std::str::from_utf8(bytes) else {
                rejections.push(Rejection {
                    kind: parse::FILE_KIND.into(),
                    namespace: String::new(),
                    name: name.clone(),
                    reason: "not UTF-8 text".into(),
                });
                continue;
            };
            let (parsed, mut rejected) = parse::parse_documents(text, name);
            rejections.append(&mut rejected);
            for obj in parsed {
                let (kind, (namespace, obj_name)) = (obj.kind(), obj.key());
                if !objects.insert(obj) {
                    rejections.push(Rejection {
                        kind: kind.into(),
                        namespace,
                        name: obj_name,
                        reason: format!("{name}: duplicate of an object defined earlier"),
                    });
                }
            }
        }
        (objects, rejections)
    }
}

/// Builds the model from a directory of Kubernetes YAML, and keeps it current.
#[derive(Clone, Debug)]
pub struct FileSource {
    dir: PathBuf,
    opts: ModelOptions,
    interval: Duration,
}

impl FileSource {
    /// A source for `dir`, polled every [`DEFAULT_INTERVAL`].
    pub fn new(dir: PathBuf, opts: ModelOptions) -> Self {
        Self { dir, opts, interval: DEFAULT_INTERVAL }
    }

    /// Changes the polling interval.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Polls the directory until every receiver of `tx` is gone. Each change
    /// of the files rebuilds the model, reports its rejections to `rejections`
    /// (an empty slice when all is well) and publishes the snapshot if its
    /// resources changed, with the version one above the published one.
    pub async fn run(self, tx: SnapshotTx, rejections: RejectionSink) {
        let mut last_digest = None;
        let mut last_error = None::<String>;
        while !tx.is_closed() {
            let dir = self.dir.clone();
            match tokio::task::spawn_blocking(move || Files::read(&dir)).await {
                Ok(Ok(files)) => {
                    last_error = None;
                    let digest = files.digest();
                    if last_digest != Some(digest) {
                        last_digest = Some(digest);
                        self.rebuild(files, &tx, &rejections).await;
                    }
                }
                Ok(Err(e)) => {
                    // Keep serving the last snapshot; say so once per distinct error.
                    let msg = e.to_string();
                    if last_error.as_ref() != Some(&msg) {
                        tracing::error!(error = %msg, "config dir unreadable; keeping the last snapshot");
                        last_error = Some(msg);
                    }
                }
                Err(e) => tracing::error!(error = %e, "bug: config dir reader panicked"),
            }
            tokio::time::sleep(self.interval).await;
        }
    }

    async fn rebuild(&self, files: Files, tx: &SnapshotTx, sink: &RejectionSink) {
        let next = tx.borrow().version + 1;
        let opts = self.opts.clone();
        let file_count = files.0.len();
        let built = tokio::task::spawn_blocking(move || {
            let (objects, mut rejections) = files.objects();
            let no_objects = objects.is_empty();
            let mut report = model::build_report(&objects, &opts, next);
            rejections.append(&mut report.rejections);
            (report.snapshot, rejections, report.warnings, no_objects)
        })
        .await;
        let (snapshot, rejected, warnings, no_objects) = match built {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "bug: model build panicked");
                return;
            }
        };
        log_warnings(&warnings);
        sink(&rejected);
        // A directory emptied by accident (a failed sync, a half-mounted volume) or wholly unparsable must not
        // withdraw every workload from every ztunnel: a mesh is emptied on purpose by leaving some object.
        if no_objects && !tx.borrow().is_empty() {
            tracing::error!(
                dir = %self.dir.display(),
                files = file_count,
                rejected = rejected.len(),
                "config dir yields no object; keeping the last snapshot (to empty the mesh on purpose, keep one \
                 object, e.g. a Namespace)"
            );
            return;
        }
        let changed = tx.send_if_modified(|current| {
            if current.same_content(&snapshot) {
                return false;
            }
            *current = Arc::new(snapshot);
            true
        });
        let version = tx.borrow().version;
        tracing::info!(
            dir = %self.dir.display(),
            version,
            changed,
            rejected = rejected.len(),
            "config dir loaded"
        );
    }
}

fn log_warnings(warnings: &[Warning]) {
    for w in warnings {
        tracing::warn!(kind = %w.kind, namespace = %w.namespace, name = %w.name, reason = %w.reason, "partly applied");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A directory removed on drop, named after the test and the process.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let p = std::env::temp_dir().join(format!("ambit-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const NS: &str =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n";

    fn pod(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec: {{nodeName: node1, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
        )
    }

    type Seen = Arc<Mutex<Vec<Vec<Rejection>>>>;

    fn sink() -> (RejectionSink, Seen) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        (Arc::new(move |r: &[Rejection]| s.lock().unwrap().push(r.to_vec())), seen)
    }

    async fn wait_for(rx: &mut model::SnapshotRx, what: &str, f: impl Fn(&model::Snapshot) -> bool) {
        let deadline = Duration::from_secs(1);
        tokio::time::timeout(deadline, rx.wait_for(|s| f(s)))
            .await
            .unwrap_or_else(|_| panic!("no snapshot where {what} within {deadline:?}"))
            .unwrap();
    }

    #[tokio::test]
    async fn a_changed_file_is_picked_up_within_a_second() {
        let dir = TempDir::new("file-source-change");
        std::fs::write(dir.0.join("ns.yaml"), NS).unwrap();
        std::fs::write(dir.0.join("pods.yml"), pod("a", "10.1.0.2")).unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(model::Snapshot::default()));
        let (sink, _) = sink();
        let source = FileSource::new(dir.0.clone(), ModelOptions::default()).with_interval(Duration::from_millis(100));
        let task = tokio::spawn(source.run(tx, sink));
        wait_for(&mut rx, "pod a exists", |s| s.addresses.contains_key("Kubernetes//Pod/default/a")).await;
        assert_eq!(rx.borrow().version, 1);

        let both = format!("{}---\n{}", pod("a", "10.1.0.2"), pod("b", "10.1.0.3"));
        std::fs::write(dir.0.join("pods.yml"), both).unwrap();
        wait_for(&mut rx, "pod b exists", |s| s.addresses.contains_key("Kubernetes//Pod/default/b")).await;
        assert_eq!(rx.borrow().version, 2);

        // Same resources, different text (a comment): no new version.
        let mut text = std::fs::read_to_string(dir.0.join("pods.yml")).unwrap();
        text.push_str("# comment\n");
        std::fs::write(dir.0.join("pods.yml"), text).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(rx.borrow().version, 2);
        task.abort();
    }

    #[tokio::test]
    async fn a_broken_file_yields_rejections_and_keeps_the_other_objects() {
        let dir = TempDir::new("file-source-broken");
        std::fs::write(dir.0.join("ns.yaml"), NS).unwrap();
        std::fs::write(dir.0.join("pods.yaml"), pod("a", "10.1.0.2")).unwrap();
        std::fs::write(dir.0.join("broken.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n").unwrap();
        std::fs::write(dir.0.join("notes.txt"), "not yaml, not read").unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(model::Snapshot::default()));
        let (sink, seen) = sink();
        let source = FileSource::new(dir.0.clone(), ModelOptions::default()).with_interval(Duration::from_millis(100));
        let task = tokio::spawn(source.run(tx, sink));
        wait_for(&mut rx, "pod a exists", |s| s.addresses.contains_key("Kubernetes//Pod/default/a")).await;
        let reported = seen.lock().unwrap()[0].clone();
        assert_eq!(reported.len(), 1, "{reported:?}");
        assert_eq!((reported[0].kind.as_str(), reported[0].name.as_str()), ("File", "broken.yaml"));

        // Fixing the file clears the rejections.
        std::fs::write(dir.0.join("broken.yaml"), pod("b", "10.1.0.3")).unwrap();
        wait_for(&mut rx, "pod b exists", |s| s.addresses.contains_key("Kubernetes//Pod/default/b")).await;
        assert!(seen.lock().unwrap().last().unwrap().is_empty());
        task.abort();
    }

    #[tokio::test]
    async fn an_emptied_or_wholly_broken_directory_keeps_the_last_snapshot() {
        let dir = TempDir::new("file-source-empty");
        std::fs::write(dir.0.join("ns.yaml"), NS).unwrap();
        std::fs::write(dir.0.join("pods.yaml"), pod("a", "10.1.0.2")).unwrap();
        let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(model::Snapshot::default()));
        let (sink, seen) = sink();
        let source = FileSource::new(dir.0.clone(), ModelOptions::default()).with_interval(Duration::from_millis(50));
        let task = tokio::spawn(source.run(tx, sink));
        wait_for(&mut rx, "pod a exists", |s| s.addresses.contains_key("Kubernetes//Pod/default/a")).await;
        let version = rx.borrow().version;

        // Every file broken, then no file at all: each is read (rejections reported), nothing is withdrawn.
        std::fs::write(dir.0.join("ns.yaml"), "{{{ not yaml").unwrap();
        std::fs::write(dir.0.join("pods.yaml"), "kind: [").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while seen.lock().unwrap().last().is_none_or(|r| r.len() != 2) {
            assert!(std::time::Instant::now() < deadline, "broken files not reported");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::remove_file(dir.0.join("ns.yaml")).unwrap();
        std::fs::remove_file(dir.0.join("pods.yaml")).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rx.borrow().version, version, "the mesh was withdrawn");
        assert!(rx.borrow().addresses.contains_key("Kubernetes//Pod/default/a"));

        // Emptying on purpose: one object left, the pod goes.
        std::fs::write(dir.0.join("ns.yaml"), NS).unwrap();
        wait_for(&mut rx, "pod a is gone", |s| !s.addresses.contains_key("Kubernetes//Pod/default/a")).await;
        task.abort();
    }

    #[test]
    fn a_duplicate_object_in_a_later_file_is_rejected() {
        let files = Files(vec![
            ("a.yaml".into(), pod("p", "10.1.0.2").into_bytes()),
            ("b.yaml".into(), pod("p", "10.1.0.9").into_bytes()),
        ]);
        let (objects, rejections) = files.objects();
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(rejections.len(), 1);
        assert!(rejections[0].reason.starts_with("b.yaml: duplicate"), "{rejections:?}");
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let err = Files::read(Path::new("/nonexistent/ambit-config")).unwrap_err();
        assert!(matches!(err, SourceError::ReadDir { .. }));
    }
}
