use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;

fn service(name: &str) -> BackendTarget {
    BackendTarget::Service(ServiceTarget {
        hostname: format!("{name}.ns.svc.cluster.local"),
        namespace: "ns".into(),
        port: 80,
        policy: None,
    })
}

fn backend(target: BackendTarget, weight: u32) -> Backend {
    Backend { target, weight, filters: Vec::new() }
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(42)
}

/// How many of `draws` picks land on each backend.
fn split(backends: &[Backend], draws: usize) -> Vec<usize> {
    let mut rng = rng();
    let mut counts = vec![0; backends.len()];
    for _ in 0..draws {
        counts[pick_backend(backends, &mut rng).unwrap().index] += 1;
    }
    counts
}

#[test]
fn weighted_split_over_10000_draws_within_2_percent() {
    // 1:3 → 2,500 / 7,500; one standard deviation is 43 draws, the bound is 200.
    let counts = split(&[backend(service("a"), 1), backend(service("b"), 3)], 10_000);
    assert!(counts[0].abs_diff(2_500) <= 200, "{counts:?}");
    assert_eq!(counts[0] + counts[1], 10_000);
}

#[test]
fn weight_zero_is_never_chosen() {
    let counts = split(&[backend(service("a"), 0), backend(service("b"), 1), backend(service("c"), 0)], 10_000);
    assert_eq!(counts, [0, 10_000, 0]);
}

#[test]
fn all_zero_or_no_backends_is_500() {
    let zero = [backend(service("a"), 0)];
    assert_eq!(pick_backend(&zero, &mut rng()), Err(NoBackend::AllZero));
    assert_eq!(pick_backend(&[], &mut rng()), Err(NoBackend::Empty));
    assert_eq!(NoBackend::AllZero.reply().status, http::StatusCode::INTERNAL_SERVER_ERROR);
}

#[test]
fn an_invalid_backend_fails_only_its_share() {
    let backends = [backend(BackendTarget::Invalid("Service ns/gone not found".into()), 1), backend(service("b"), 1)];
    let mut rng = rng();
    let results: Vec<_> = (0..1000).map(|_| pick_backend(&backends, &mut rng)).collect();
    let invalid = results.iter().filter(|r| *r == &Err(NoBackend::Invalid("Service ns/gone not found"))).count();
    assert!(invalid.abs_diff(500) <= 80, "{invalid} of 1000");
    assert!(results.iter().all(|r| r.is_err() || r.unwrap().index == 1));
}

#[test]
fn chosen_backend_carries_its_filters() {
    let filters = vec![Filter::ResponseHeaderModifier(Default::default())];
    let backends = [Backend { target: service("a"), weight: 1, filters: filters.clone() }];
    assert_eq!(pick_backend(&backends, &mut rng()).unwrap().filters, filters.as_slice());
}

#[derive(Default)]
struct Ep {
    load: u64,
    down: bool,
}

impl Load for Ep {
    fn in_flight(&self) -> u64 {
        self.load
    }
    fn healthy(&self) -> bool {
        !self.down
    }
}

fn ep(load: u64) -> Ep {
    Ep { load, down: false }
}

#[test]
fn p2c_prefers_the_less_loaded_of_two() {
    let endpoints = [ep(10), ep(0)];
    let picker = EndpointPicker::default();
    let mut rng = rng();
    assert!((0..100).all(|_| picker.pick(&endpoints, &[], &mut rng) == Some(1)));
}

#[test]
fn p2c_never_picks_the_most_loaded_of_many() {
    let endpoints = [ep(1), ep(2), ep(3), ep(100)];
    let picker = EndpointPicker::new(LbPolicy::LeastRequest);
    let mut rng = rng();
    let picks: Vec<_> = (0..1000).map(|_| picker.pick(&endpoints, &[], &mut rng).unwrap()).collect();
    assert!(!picks.contains(&3));
    assert!(picks.iter().filter(|i| **i == 0).count() > picks.iter().filter(|i| **i == 2).count());
}

#[test]
fn round_robin_cycles() {
    let endpoints = [ep(0), ep(0), ep(0)];
    let picker = EndpointPicker::new(LbPolicy::RoundRobin);
    let picks: Vec<_> = (0..6).map(|_| picker.pick(&endpoints, &[], &mut rng()).unwrap()).collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
}

#[test]
fn unhealthy_endpoints_are_skipped_and_none_healthy_is_none() {
    let endpoints = [Ep { load: 0, down: true }, ep(5), Ep { load: 0, down: true }];
    for policy in [LbPolicy::LeastRequest, LbPolicy::RoundRobin] {
        let picker = EndpointPicker::new(policy);
        assert!((0..50).all(|_| picker.pick(&endpoints, &[], &mut rng()) == Some(1)), "{policy:?}");
    }
    let down = [Ep { load: 0, down: true }];
    assert_eq!(EndpointPicker::default().pick(&down, &[], &mut rng()), None);
    assert_eq!(EndpointPicker::default().pick::<Ep>(&[], &[], &mut rng()), None);
}

#[test]
fn retry_goes_to_an_endpoint_not_tried() {
    let endpoints = [ep(0), ep(9), ep(0)];
    for policy in [LbPolicy::LeastRequest, LbPolicy::RoundRobin] {
        let picker = EndpointPicker::new(policy);
        let mut rng = rng();
        assert!((0..50).all(|_| picker.pick(&endpoints, &[0, 2], &mut rng) == Some(1)), "{policy:?}");
    }
}

#[test]
fn retry_reuses_a_tried_endpoint_when_it_is_the_only_one() {
    let endpoints = [ep(0)];
    assert_eq!(EndpointPicker::default().pick(&endpoints, &[0], &mut rng()), Some(0));
}

#[test]
fn in_flight_guard_counts_until_dropped() {
    let counter = Arc::new(InFlight::default());
    let a = counter.start();
    let b = counter.start();
    assert_eq!(counter.get(), 2);
    drop(a);
    drop(b);
    assert_eq!(counter.get(), 0);
}
