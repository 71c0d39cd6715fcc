use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;

const SERVICE_UNAVAILABLE: Outcome = Outcome::Status(StatusCode::SERVICE_UNAVAILABLE);

#[test]
fn default_is_istios_two_retries_on_connect_refused_and_503() {
    let p = RetryPolicy::default();
    assert!(p.should_retry(1, Outcome::ConnectFailure, false, true));
    assert!(p.should_retry(1, Outcome::RefusedStream, false, true));
    assert!(p.should_retry(1, SERVICE_UNAVAILABLE, false, true));
    assert!(p.should_retry(2, SERVICE_UNAVAILABLE, false, true));
    assert!(!p.should_retry(3, SERVICE_UNAVAILABLE, false, true), "a third retry");
}

#[test]
fn default_retries_grpc_unavailable_and_cancelled_only() {
    let p = RetryPolicy::default();
    assert!(p.should_retry(1, Outcome::GrpcStatus(GRPC_UNAVAILABLE), false, true));
    assert!(p.should_retry(1, Outcome::GrpcStatus(GRPC_CANCELLED), false, true));
    assert!(!p.should_retry(1, Outcome::GrpcStatus(2), false, true), "UNKNOWN");
    assert!(!p.should_retry(1, Outcome::GrpcStatus(0), false, true), "OK");
}

#[test]
fn default_does_not_retry_other_failures() {
    let p = RetryPolicy::default();
    assert!(!p.should_retry(1, Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR), false, true));
    assert!(!p.should_retry(1, Outcome::Status(StatusCode::OK), false, true));
    assert!(!p.should_retry(1, Outcome::Reset, false, true));
    assert!(!p.should_retry(1, Outcome::Timeout, false, true));
}

#[test]
fn no_retry_after_response_started() {
    assert!(!RetryPolicy::default().should_retry(1, SERVICE_UNAVAILABLE, true, true));
}

#[test]
fn no_retry_for_a_body_not_kept_for_replay() {
    assert!(!RetryPolicy::default().should_retry(1, Outcome::ConnectFailure, false, false));
}

#[test]
fn replayable_up_to_64_kib() {
    assert!(replayable(0));
    assert!(replayable(64 * 1024));
    assert!(!replayable(64 * 1024 + 1));
}

#[test]
fn gateway_retry_uses_its_codes_and_attempts() {
    let p = RetryPolicy::gateway(Some(1), vec![500, 502], None);
    assert!(p.should_retry(1, Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR), false, true));
    assert!(p.should_retry(1, Outcome::Status(StatusCode::BAD_GATEWAY), false, true));
    assert!(!p.should_retry(1, SERVICE_UNAVAILABLE, false, true));
    assert!(p.should_retry(1, Outcome::ConnectFailure, false, true), "connection failures always");
    assert!(!p.should_retry(2, Outcome::Status(StatusCode::INTERNAL_SERVER_ERROR), false, true));
}

#[test]
fn gateway_retry_defaults_and_zero_attempts() {
    let p = RetryPolicy::gateway(None, vec![], Some(Duration::from_millis(100)));
    assert_eq!((p.attempts, p.codes.as_slice(), p.backoff), (2, &[503][..], Duration::from_millis(100)));
    let off = RetryPolicy::gateway(Some(0), vec![503], None);
    assert!(!off.should_retry(1, Outcome::ConnectFailure, false, true));
    assert_eq!(off, RetryPolicy { codes: vec![503], ..RetryPolicy::none() });
}

#[test]
fn backoff_grows_with_jitter_never_below_base_nor_above_ten_times() {
    let p = RetryPolicy { backoff: Duration::from_millis(10), ..RetryPolicy::default() };
    let mut rng = StdRng::seed_from_u64(1);
    for retry in 1..=8 {
        let ceiling = Duration::from_millis(10 * (1u64 << retry).min(10));
        let draws: Vec<_> = (0..200).map(|_| p.backoff(retry, &mut rng)).collect();
        assert!(draws.iter().all(|d| *d >= p.backoff && *d <= ceiling), "retry {retry}: {draws:?}");
        assert!(draws.iter().any(|d| *d != draws[0]), "retry {retry}: no jitter");
    }
    let mut mean = |retry| (0..1000).map(|_| p.backoff(retry, &mut rng)).sum::<Duration>() / 1000;
    assert!(mean(1) < mean(3), "backoff does not grow");
}

#[test]
fn zero_backoff_waits_nothing() {
    let p = RetryPolicy { backoff: Duration::ZERO, ..RetryPolicy::default() };
    assert_eq!(p.backoff(3, &mut StdRng::seed_from_u64(1)), Duration::ZERO);
}

#[test]
fn budget_allows_the_floor_then_refuses() {
    let budget = Arc::new(RetryBudget::new(20, 2));
    let _request = budget.request();
    let first = budget.try_retry().expect("first retry");
    let _second = budget.try_retry().expect("second retry");
    assert!(budget.try_retry().is_none(), "budget exhausted");
    drop(first);
    assert!(budget.try_retry().is_some(), "a finished retry frees its place");
}

#[test]
fn a_requests_own_finished_retry_does_not_count_against_its_next() {
    let budget = Arc::new(RetryBudget::new(20, 2));
    let _requests = (budget.request(), budget.request());
    let (mut a, mut b) = (None, None);
    assert!(budget.next_retry(&mut a) && budget.next_retry(&mut b), "two retries within the floor");
    assert_eq!(budget.retrying(), 2);
    // The budget is full, but only with a's and b's retries: a's second retry takes the place of its first.
    assert!(budget.next_retry(&mut a), "a's own retry held its second back");
    assert_eq!(budget.retrying(), 2);
    // A third request's retry has no place.
    let mut c = None;
    assert!(!budget.next_retry(&mut c) && c.is_none(), "over the budget");
    drop(b);
    assert!(budget.next_retry(&mut c), "b's retry ended: its place is free");
    drop(a);
    drop(c);
    assert_eq!(budget.retrying(), 0);
}

#[test]
fn budget_grows_with_active_requests() {
    let budget = Arc::new(RetryBudget::new(20, 2));
    let requests: Vec<_> = (0..50).map(|_| budget.request()).collect();
    assert_eq!(budget.limit(), 10);
    let permits: Vec<_> = (0..10).map(|_| budget.try_retry().expect("within 20 %")).collect();
    assert!(budget.try_retry().is_none());
    drop(requests);
    drop(permits);
    assert_eq!((budget.limit(), budget.retrying()), (2, 0));
}

#[test]
fn budget_holds_across_threads() {
    let budget = Arc::new(RetryBudget::new(20, 10));
    let granted: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                s.spawn(move || (0..100).filter_map(|_| budget.try_retry()).collect::<Vec<_>>())
            })
            .collect();
        let permits: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        permits.iter().map(Vec::len).sum()
    });
    assert_eq!(granted, 10);
}

#[test]
fn attempt_deadline_is_the_earlier_of_its_own_and_the_requests() {
    let start = Instant::now();
    let t = Timeouts { request: Some(Duration::from_secs(10)), backend_request: Some(Duration::from_secs(3)) };
    let d = t.deadlines(start);
    assert_eq!(d.overall(), Some(start + Duration::from_secs(10)));
    assert_eq!(d.attempt(start), Some(start + Duration::from_secs(3)));
    assert_eq!(d.attempt(start + Duration::from_secs(8)), Some(start + Duration::from_secs(10)));
}

#[test]
fn unset_or_zero_timeouts_mean_no_deadline() {
    let start = Instant::now();
    assert_eq!(Timeouts::default().deadlines(start).attempt(start), None);
    let zero = Timeouts { request: Some(Duration::ZERO), backend_request: Some(Duration::ZERO) };
    assert_eq!(zero.deadlines(start).overall(), None);
    let per_try = Timeouts { request: None, backend_request: Some(Duration::from_secs(1)) };
    assert_eq!(per_try.deadlines(start).attempt(start), Some(start + Duration::from_secs(1)));
}

#[test]
fn a_retry_must_start_before_the_request_deadline() {
    let start = Instant::now();
    let d = Timeouts { request: Some(Duration::from_secs(1)), backend_request: None }.deadlines(start);
    assert!(d.retry_fits(start, Duration::from_millis(500)));
    assert!(!d.retry_fits(start + Duration::from_millis(600), Duration::from_millis(500)));
    assert!(Timeouts::default().deadlines(start).retry_fits(start, Duration::from_secs(3600)));
}
