//! The enroller against fake ztunnels (the real ZDS client) and real network
//! namespaces. Needs root; fails instead of skipping when `CI` is set.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambit_zds::{ZdsClient, ZdsRequest};
use tokio::sync::mpsc;

use super::*;
use crate::capture;
use crate::test_support::root_available;

/// A named network namespace and a temporary directory, removed on drop.
struct Fixture {
    netns: String,
    dir: PathBuf,
}

impl Fixture {
    fn new(test: &str) -> Fixture {
        let netns = format!("ambit-enroll-{test}-{}", std::process::id());
        let ok = std::process::Command::new("ip").args(["netns", "add", &netns]).status().unwrap().success();
        assert!(ok, "ip netns add {netns}");
        let lo = std::process::Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]).status().unwrap();
        assert!(lo.success(), "lo up in {netns}");
        let dir = std::env::temp_dir().join(&netns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Fixture { netns, dir }
    }

    fn pod(&self, uid: &str) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "demo".into(),
            service_account: "sa".into(),
            netns: PathBuf::from("/var/run/netns").join(&self.netns),
            ips: vec![],
        }
    }

    fn config(&self) -> EnrollConfig {
        EnrollConfig { state_dir: Some(self.dir.join("state")), ..EnrollConfig::new(self.dir.join("zds.sock")) }
    }

    /// A sysctl as the pod's namespace sees it (`None`: the kernel lacks it).
    fn sysctl(&self, key: &str) -> Option<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns, "cat", &format!("/proc/sys/{key}")])
            .output()
            .unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn captured(&self) -> bool {
        capture::is_installed(&PathBuf::from("/var/run/netns").join(&self.netns), &capture::CaptureConfig::default())
            .unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.netns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fake ztunnel: reports each request as `"add uid"`, `"del uid"`,
/// `"keep uid"` or `"snapshot"`, and acks with `refuse`'s answer.
struct FakeZtunnel {
    seen: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeZtunnel {
    async fn connect(enroller: &Enroller, refuse: Option<&'static str>) -> FakeZtunnel {
        let mut client = ZdsClient::connect(&enroller.config().zds_socket).await.expect("connect");
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(Some(req)) = client.recv().await {
                let line = match &req {
                    ZdsRequest::Add { uid, .. } => format!("add {uid}"),
                    ZdsRequest::Keep { uid } => format!("keep {uid}"),
                    ZdsRequest::Del { uid } => format!("del {uid}"),
                    ZdsRequest::SnapshotSent => "snapshot".into(),
                };
                let error = if line.starts_with("add") { refuse } else { None };
                let _ = tx.send(line);
                if client.ack(error).await.is_err() {
                    break;
                }
            }
        });
        FakeZtunnel { seen, task }
    }

    async fn next(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(5), self.seen.recv()).await.expect("request in time").expect("open")
    }

    fn disconnect(self) {
        self.task.abort();
    }
}

async fn wait_ready(enroller: &Enroller) {
    for _ in 0..100 {
        if enroller.ztunnel_ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no ztunnel became ready");
}

#[tokio::test]
async fn without_ztunnel_enroll_is_retryable_and_leaves_no_rules() {
    if !root_available("without_ztunnel_enroll_is_retryable") {
        return;
    }
    let fx = Fixture::new("noztunnel");
    let enroller = Enroller::start(fx.config()).await.unwrap();
    assert!(!enroller.ztunnel_ready());
    let err = enroller.enroll(fx.pod("u1")).await.unwrap_err();
    assert!(matches!(err, EnrollError::NoZtunnel) && err.is_retryable(), "{err}");
    assert!(!fx.captured());
    assert!(enroller.enrolled().is_empty());
}

#[tokio::test]
async fn two_ztunnels_both_ack_snapshot_then_live_adds_and_dels() {
    if !root_available("two_ztunnels_both_ack") {
        return;
    }
    let fx = Fixture::new("two");
    let enroller = Enroller::start(fx.config()).await.unwrap();
    let mut old = FakeZtunnel::connect(&enroller, None).await;
    assert_eq!(old.next().await, "snapshot");
    wait_ready(&enroller).await;

    enroller.enroll_attachment(fx.pod("u1"), Some("c1".into())).await.unwrap();
    assert_eq!(old.next().await, "add u1");
    assert!(fx.captured());
    enroller.check("u1").await.unwrap();
    assert_eq!(fx.sysctl("net/ipv4/tcp_migrate_req").as_deref().unwrap_or("1"), "1");

    // The upgrade: a second ztunnel gets the pod in its snapshot, then both
    // get the next add; enroll returned only after both acked.
    let mut new = FakeZtunnel::connect(&enroller, None).await;
    assert_eq!(new.next().await, "add u1");
    assert_eq!(new.next().await, "snapshot");
    enroller.enroll(fx.pod("u1")).await.unwrap();
    assert_eq!(old.next().await, "add u1");
    assert_eq!(new.next().await, "add u1");

    // The old one goes away: enrolls go on with the new one alone.
    old.disconnect();
    enroller.release("u1").await.unwrap();
    assert_eq!(new.next().await, "del u1");
    assert!(!fx.captured());
    assert!(matches!(enroller.check("u1").await, Err(EnrollError::NotEnrolled(_))));
    enroller.release("u1").await.unwrap();
}

#[tokio::test]
async fn a_refused_pod_names_pod_and_reason_and_is_undone() {
    if !root_available("a_refused_pod_names_pod_and_reason") {
        return;
    }
    let fx = Fixture::new("refused");
    let enroller = Enroller::start(fx.config()).await.unwrap();
    let mut zt = FakeZtunnel::connect(&enroller, Some("no certificate")).await;
    assert_eq!(zt.next().await, "snapshot");
    let err = enroller.enroll(fx.pod("u1")).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("demo/pod-u1 (u1)") && text.contains("no certificate"), "{text}");
    assert_eq!(zt.next().await, "add u1");
    assert_eq!(zt.next().await, "del u1");
    assert!(!fx.captured());
    assert!(enroller.enrolled().is_empty());
}

#[tokio::test]
async fn gc_releases_only_attachments_missing_from_the_valid_list() {
    if !root_available("gc_releases_only_attachments") {
        return;
    }
    let fx = Fixture::new("gc");
    let enroller = Enroller::start(fx.config()).await.unwrap();
    let _zt = FakeZtunnel::connect(&enroller, None).await;
    wait_ready(&enroller).await;
    enroller.enroll_attachment(fx.pod("u1"), Some("c1".into())).await.unwrap();
    enroller.enroll_attachment(fx.pod("u2"), Some("c2".into())).await.unwrap();
    enroller.enroll(fx.pod("u3")).await.unwrap();
    let released = enroller.gc(&HashSet::from(["c2".to_string()])).await.unwrap();
    assert_eq!(released, ["u1"]);
    let mut left: Vec<String> = enroller.enrolled().into_iter().map(|p| p.uid).collect();
    left.sort();
    assert_eq!(left, ["u2", "u3"]);
    // The DEL of an old sandbox leaves the pod enrolled for its new one.
    enroller.release_cni(Some("u2"), "c-old").await.unwrap();
    assert_eq!(enroller.enrolled().len(), 2);
    enroller.release_cni(Some("u2"), "c2").await.unwrap();
    enroller.release_cni(None, "c-unknown").await.unwrap();
    assert_eq!(enroller.enrolled().len(), 1);
}

#[tokio::test]
async fn a_restarted_agent_replays_the_state_file_to_the_next_ztunnel() {
    if !root_available("a_restarted_agent_replays_the_state_file") {
        return;
    }
    let fx = Fixture::new("restart");
    let first = Enroller::start(fx.config()).await.unwrap();
    let _zt = FakeZtunnel::connect(&first, None).await;
    wait_ready(&first).await;
    first.enroll_attachment(fx.pod("u1"), Some("c1".into())).await.unwrap();
    let mut gone = fx.pod("u2");
    gone.netns = "/var/run/netns/ambit-no-such-netns".into();
    assert!(first.enroll(gone).await.is_err());
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let second: Arc<Enroller> = Enroller::start(fx.config()).await.unwrap();
    assert_eq!(second.enrolled(), [fx.pod("u1")]);
    let mut zt = FakeZtunnel::connect(&second, None).await;
    assert_eq!(zt.next().await, "add u1");
    assert_eq!(zt.next().await, "snapshot");
    wait_ready(&second).await;
    second.check("u1").await.unwrap();
    second.release_container("c1").await.unwrap();
    assert!(!fx.captured());
}
