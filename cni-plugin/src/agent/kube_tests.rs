//! The membership diff and pod reading, without an API server.

use super::*;
use crate::membership::{AMBIENT, DATAPLANE_MODE_LABEL, NONE};

fn view(uid: &str, membership: Membership, phase: &str) -> PodView {
    PodView {
        uid: uid.into(),
        name: format!("pod-{uid}"),
        namespace: "ns".into(),
        service_account: "default".into(),
        ips: vec!["10.1.0.2".parse().unwrap()],
        running: phase == "Running",
        finished: phase == "Succeeded" || phase == "Failed",
        membership,
    }
}

fn pods(list: &[PodView]) -> BTreeMap<String, PodView> {
    list.iter().map(|p| (p.uid.clone(), p.clone())).collect()
}

fn set(uids: &[&str]) -> BTreeSet<String> {
    uids.iter().map(|u| u.to_string()).collect()
}

#[test]
fn members_that_run_are_enrolled_once() {
    let now = Instant::now();
    let p = pods(&[
        view("a", Membership::Ambient, "Running"),
        view("b", Membership::Ambient, "Pending"),
        view("c", Membership::NotAmbient, "Running"),
        view("d", Membership::Ambient, "Running"),
    ]);
    let t = Tracking::default();
    assert_eq!(plan(&p, &set(&["d"]), &t, false, now), Plan { enroll: vec!["a".into()], release: vec![] });
    let mut no_ip = p.clone();
    no_ip.get_mut("a").unwrap().ips.clear();
    assert!(plan(&no_ip, &set(&["d"]), &t, false, now).enroll.is_empty(), "no IP, no namespace to find");
}

#[test]
fn reconcile_enrolls_every_member_again_and_releases_strangers() {
    let now = Instant::now();
    let p = pods(&[view("a", Membership::Ambient, "Running"), view("d", Membership::Ambient, "Running")]);
    let got = plan(&p, &set(&["d", "gone"]), &Tracking::default(), true, now);
    assert_eq!(got, Plan { enroll: vec!["a".into(), "d".into()], release: vec!["gone".into()] });
}

#[test]
fn non_members_finished_and_deleted_pods_are_released() {
    let now = Instant::now();
    let p = pods(&[
        view("out", Membership::OptedOut, "Running"),
        view("unlabelled", Membership::NotAmbient, "Running"),
        view("done", Membership::Ambient, "Succeeded"),
        view("ok", Membership::Ambient, "Running"),
    ]);
    let t = Tracking { seen: set(&["deleted"]), ..Default::default() };
    let enrolled = set(&["out", "unlabelled", "done", "ok", "deleted", "lagging"]);
    let got = plan(&p, &enrolled, &t, false, now);
    assert_eq!(got.release, ["deleted", "done", "out", "unlabelled"]);
    assert!(got.enroll.is_empty());
}

#[test]
fn a_pod_the_plugin_just_enrolled_is_left_alone() {
    // Not Running yet in the API, or not in the watch at all yet.
    let now = Instant::now();
    let p = pods(&[view("new", Membership::Ambient, "Pending")]);
    let got = plan(&p, &set(&["new", "not-seen-yet"]), &Tracking::default(), false, now);
    assert_eq!(got, Plan::default());
}

#[test]
fn busy_pods_and_pending_retries_wait() {
    let now = Instant::now();
    let p = pods(&[
        view("busy", Membership::Ambient, "Running"),
        view("later", Membership::Ambient, "Running"),
        view("due", Membership::Ambient, "Running"),
        view("repair", Membership::Ambient, "Running"),
    ]);
    let t = Tracking {
        in_flight: set(&["busy"]),
        retry: [
            ("later".to_string(), Retry { attempts: 1, due: now + Duration::from_secs(1) }),
            ("due".to_string(), Retry { attempts: 3, due: now }),
            ("repair".to_string(), Retry { attempts: 1, due: now }),
        ]
        .into(),
        ..Default::default()
    };
    // "repair" is enrolled but its last enroll failed: it is tried again.
    assert_eq!(plan(&p, &set(&["repair"]), &t, false, now).enroll, ["due", "repair"]);
}

#[test]
fn backoff_doubles_up_to_a_cap() {
    let secs: Vec<u64> = (1..=7).map(|a| backoff(a).as_secs()).collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 16, 16]);
    assert_eq!(backoff(u32::MAX), RETRY_MAX);
}

#[test]
fn a_pod_is_read_with_its_namespace_labels() {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "labels": {DATAPLANE_MODE_LABEL: NONE}},
        "spec": {"containers": [], "serviceAccountName": "web-sa"},
        "status": {"phase": "Running", "podIP": "10.1.0.9", "podIPs": [{"ip": "10.1.0.9"}, {"ip": "fd00::9"}]},
    }))
    .unwrap();
    let ambient: BTreeMap<String, String> = [(DATAPLANE_MODE_LABEL.to_string(), AMBIENT.to_string())].into();
    let v = PodView::new(&pod, &ambient).unwrap();
    assert_eq!((v.name.as_str(), v.namespace.as_str(), v.service_account.as_str()), ("web", "shop", "web-sa"));
    assert_eq!(v.ips, ["10.1.0.9".parse::<IpAddr>().unwrap(), "fd00::9".parse().unwrap()]);
    assert!(v.running && !v.finished);
    assert_eq!(v.membership, Membership::OptedOut);

    let mut plain = pod.clone();
    plain.metadata.labels = None;
    plain.spec.as_mut().unwrap().service_account_name = None;
    plain.status.as_mut().unwrap().pod_ips = None;
    let v = PodView::new(&plain, &ambient).unwrap();
    assert_eq!((v.membership, v.service_account.as_str()), (Membership::Ambient, "default"));
    assert_eq!(v.ips, ["10.1.0.9".parse::<IpAddr>().unwrap()], "podIP when podIPs is absent");
    assert!(PodView::new(&plain, &BTreeMap::new()).unwrap().membership == Membership::NotAmbient);
}
