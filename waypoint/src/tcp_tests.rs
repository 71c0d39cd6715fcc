use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::*;
use crate::route::{Backend, BackendTarget};
use crate::target::{Subset, TargetPolicy};

fn target(host: &str, subset: Option<&str>) -> ServiceTarget {
    let policy = subset
        .map(|s| Arc::new(TargetPolicy { subset: Some(Subset::new(s.into(), Vec::new())), ..TargetPolicy::default() }));
    ServiceTarget { hostname: format!("{host}.apps.svc.cluster.local"), namespace: "apps".into(), port: 9000, policy }
}

fn route(backends: Vec<(BackendTarget, u32)>) -> TcpRoute {
    let backends =
        backends.into_iter().map(|(target, weight)| Backend { target, weight, filters: Vec::new() }).collect();
    TcpRoute { namespace: "apps".into(), name: "echo-tcp".into(), rule: 0, backends }
}

#[test]
fn connections_split_by_weight_across_services_and_subsets() {
    let own = target("echo", None);
    let r = route(vec![
        (BackendTarget::Service(target("echo", Some("v1"))), 80),
        (BackendTarget::Service(target("echo-v2", None)), 20),
        (BackendTarget::Service(target("never", None)), 0),
    ]);
    let mut rng = SmallRng::seed_from_u64(11);
    let draws = 10_000;
    let mut counts = [0usize; 2];
    for _ in 0..draws {
        let t = destination(Some(&r), &own, &mut rng).expect("a backend");
        let subset = t.policy.as_ref().and_then(|p| p.subset.as_ref()).map(|s| s.name.as_str());
        match (t.hostname.as_str(), subset) {
            ("echo.apps.svc.cluster.local", Some("v1")) => counts[0] += 1,
            ("echo-v2.apps.svc.cluster.local", None) => counts[1] += 1,
            other => panic!("not a backend of weight > 0: {other:?}"),
        }
    }
    let share = 100.0 * counts[1] as f64 / draws as f64;
    // 20 % of 10,000 draws: one standard deviation is 0.4 points.
    assert!((share - 20.0).abs() < 2.0, "echo-v2 got {share} %");
}

#[test]
fn without_a_route_the_service_itself_and_an_unresolved_backend_closes_its_share() {
    let own = target("echo", None);
    let mut rng = SmallRng::seed_from_u64(3);
    assert_eq!(destination(None, &own, &mut rng), Ok(&own));
    let r = route(vec![(BackendTarget::Invalid("host gone: no such Service".into()), 1)]);
    assert_eq!(destination(Some(&r), &own, &mut rng), Err(NoBackend::Invalid("host gone: no such Service")));
    let zero = route(vec![(BackendTarget::Service(target("echo-v2", None)), 0)]);
    assert_eq!(destination(Some(&zero), &own, &mut rng), Err(NoBackend::AllZero));
}
