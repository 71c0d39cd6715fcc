use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderName, Request};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::filters::{HeaderModifier, RequestRedirect};
use crate::plan::{prepare, Decision};
use crate::retry::Timeouts;
use crate::route::{Backend, BackendTarget, Route, RouteKind, RouteTable, Rule};
use crate::target::ServiceTarget;

fn backend() -> Backend {
    let target =
        ServiceTarget { hostname: "b.ns.svc.cluster.local".into(), namespace: "ns".into(), port: 8080, policy: None };
    Backend { target: BackendTarget::Service(target), weight: 1, filters: Vec::new() }
}

/// A VirtualService port with one rule: these filters, one backend.
fn table(filters: Vec<Filter>) -> RouteTable {
    table_with(Rule { filters, backends: vec![backend()], ..Rule::default() })
}

fn table_with(rule: Rule) -> RouteTable {
    let route = Route {
        kind: RouteKind::VirtualService,
        namespace: "ns".into(),
        name: "vs".into(),
        created: 0,
        hostnames: Vec::new(),
        rules: vec![rule],
    };
    RouteTable::build(vec![route]).0
}

fn req() -> Parts {
    Request::get("/x").header("host", "b").body(()).unwrap().into_parts().0
}

fn decide<'a>(t: &'a RouteTable, rng: &mut StdRng) -> Decision<'a> {
    let mut parts = req();
    prepare(t.find(&parts).expect("routed"), &mut parts, 80, rng)
}

fn abort(status: u16, percent: f64) -> Filter {
    Filter::Fault(FaultInjection {
        abort: Some(Abort::Http(StatusCode::from_u16(status).unwrap())),
        abort_percent: percent,
        ..FaultInjection::default()
    })
}

fn delay(secs: u64, percent: f64) -> Filter {
    Filter::Fault(FaultInjection {
        delay: Some(Duration::from_secs(secs)),
        delay_percent: percent,
        ..FaultInjection::default()
    })
}

#[test]
fn abort_at_100_percent_answers_with_the_status_and_calls_no_backend() {
    let t = table(vec![abort(503, 100.0)]);
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..100 {
        let Decision::Reply { reply, delay, .. } = decide(&t, &mut rng) else { panic!("forwarded to a backend") };
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.body, ABORT_BODY.as_bytes());
        assert_eq!(reply.headers[CONTENT_TYPE], "text/plain");
        assert_eq!(reply.reason, ReplyReason::FaultInjected);
        assert_eq!(reply.reason.response_flag(), response_flags::FAULT_INJECTED);
        assert_eq!(delay, None);
    }
}

#[test]
fn abort_at_0_percent_never_answers() {
    let t = table(vec![abort(503, 0.0), delay(1, 0.0)]);
    let mut rng = StdRng::seed_from_u64(2);
    for _ in 0..1_000 {
        let Decision::Forward(f) = decide(&t, &mut rng) else { panic!("aborted") };
        assert_eq!(f.delay, None);
    }
}

#[test]
fn grpc_abort_answers_with_a_grpc_status() {
    let fault = FaultInjection { abort: Some(Abort::Grpc(14)), abort_percent: 100.0, ..FaultInjection::default() };
    let t = table(vec![Filter::Fault(fault)]);
    let Decision::Reply { reply, .. } = decide(&t, &mut StdRng::seed_from_u64(3)) else { panic!("forwarded") };
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["grpc-status"], "14");
    assert_eq!(reply.headers[CONTENT_TYPE], "application/grpc");
    assert_eq!(reply.headers["grpc-message"], ABORT_BODY);
    assert_eq!(reply.reason.response_flag(), "FI");
}

#[test]
fn an_abort_comes_before_a_redirect_or_a_missing_backend_and_keeps_response_header_changes() {
    let modifier = HeaderModifier {
        set: vec![(HeaderName::from_static("x-resp"), http::HeaderValue::from_static("1"))],
        ..HeaderModifier::default()
    };
    let filters = vec![
        Filter::ResponseHeaderModifier(modifier),
        Filter::RequestRedirect(RequestRedirect::default()),
        abort(418, 100.0),
    ];
    let t = table(filters);
    let Decision::Reply { mut reply, effects, .. } = decide(&t, &mut StdRng::seed_from_u64(4)) else {
        panic!("forwarded")
    };
    assert_eq!(reply.status, StatusCode::IM_A_TEAPOT);
    effects.apply_response(&mut reply.headers);
    assert_eq!(reply.headers["x-resp"], "1");
    let no_backend = table_with(Rule { filters: vec![abort(503, 100.0)], ..Rule::default() });
    let Decision::Reply { reply, .. } = decide(&no_backend, &mut StdRng::seed_from_u64(4)) else { panic!() };
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn a_backends_fault_applies_to_requests_sent_to_it() {
    let b = Backend { filters: vec![abort(500, 100.0)], ..backend() };
    let t = table_with(Rule { backends: vec![b], ..Rule::default() });
    let Decision::Reply { reply, .. } = decide(&t, &mut StdRng::seed_from_u64(5)) else { panic!("forwarded") };
    assert_eq!((reply.status, reply.reason), (StatusCode::INTERNAL_SERVER_ERROR, ReplyReason::FaultInjected));
}

#[test]
fn delay_and_abort_both_apply_delay_first() {
    let fault = FaultInjection {
        delay: Some(Duration::from_millis(250)),
        delay_percent: 100.0,
        abort: Some(Abort::Http(StatusCode::BAD_GATEWAY)),
        abort_percent: 100.0,
    };
    let t = table(vec![Filter::Fault(fault)]);
    let decision = decide(&t, &mut StdRng::seed_from_u64(6));
    assert_eq!(decision.delay(), Some(Duration::from_millis(250)));
    let Decision::Reply { reply, .. } = decision else { panic!("forwarded") };
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
}

#[test]
fn a_zero_delay_is_none() {
    let fault = FaultInjection { delay: Some(Duration::ZERO), delay_percent: 100.0, ..FaultInjection::default() };
    assert_eq!(fault.draw(&mut StdRng::seed_from_u64(7)), Injected::default());
}

#[tokio::test(start_paused = true)]
async fn delay_at_100_percent_delays_and_the_timeouts_start_after_it() {
    let t = table(vec![delay(5, 100.0)]);
    let decision = decide(&t, &mut StdRng::seed_from_u64(8));
    let Decision::Forward(f) = &decision else { panic!("aborted") };
    let d = f.delay.expect("delayed");
    assert_eq!(d, Duration::from_secs(5));
    // Not over before its time (paused clock: no wall-clock wait)…
    let start = Instant::now();
    assert!(tokio::time::timeout(Duration::from_millis(4_999), super::delay(d, start)).await.is_err());
    // …and then over, with the timeouts' start moved by the time waited.
    let before = tokio::time::Instant::now();
    let timer_start = super::delay(d, start).await;
    let waited = before.elapsed();
    assert!(waited >= d && waited < d + Duration::from_millis(50), "{waited:?}");
    assert_eq!(timer_start.duration_since(start), waited);
    let deadlines = Timeouts { request: Some(Duration::from_secs(1)), backend_request: None }.deadlines(timer_start);
    assert!(deadlines.overall().unwrap() >= start + Duration::from_secs(6), "the delay is not in the timeout");
}

#[test]
fn percentages_are_roughly_honoured_and_drawn_independently() {
    let fault = FaultInjection {
        delay: Some(Duration::from_millis(10)),
        delay_percent: 10.0,
        abort: Some(Abort::Http(StatusCode::SERVICE_UNAVAILABLE)),
        abort_percent: 10.0,
    };
    let mut rng = StdRng::seed_from_u64(9);
    let (mut delays, mut aborts, mut both) = (0, 0, 0);
    for _ in 0..10_000 {
        let injected = fault.draw(&mut rng);
        delays += usize::from(injected.delay.is_some());
        aborts += usize::from(injected.abort.is_some());
        both += usize::from(injected.delay.is_some() && injected.abort.is_some());
    }
    // 10 % ± 2 % of 10,000 each; together about 1 % (independent draws), not 0 % nor 10 %.
    assert!((800..=1_200).contains(&delays), "{delays} delays");
    assert!((800..=1_200).contains(&aborts), "{aborts} aborts");
    assert!((50..=150).contains(&both), "{both} both");
    // The same through the plan, at 25 %.
    let t = table(vec![abort(503, 25.0)]);
    let replies = (0..10_000).filter(|_| matches!(decide(&t, &mut rng), Decision::Reply { .. })).count();
    assert!((2_300..=2_700).contains(&replies), "{replies} aborts at 25 %");
}

#[test]
fn several_faults_add_delays_and_the_first_abort_stands() {
    let filters = [delay(1, 100.0), abort(503, 100.0), delay(2, 100.0), abort(500, 100.0)];
    let mut injected = Injected::default();
    injected.draw(&filters, &mut StdRng::seed_from_u64(10));
    assert_eq!(injected.delay, Some(Duration::from_secs(3)));
    assert_eq!(injected.abort, Some(Abort::Http(StatusCode::SERVICE_UNAVAILABLE)));
}

#[test]
fn a_delay_adds_di_to_the_response_flags_in_envoys_order() {
    assert_eq!(with_delay_flag("-"), "DI");
    assert_eq!(with_delay_flag(ReplyReason::FaultInjected.response_flag()), "DI,FI");
    assert_eq!(with_delay_flag("UT"), "UT,DI");
    assert_eq!(with_delay_flag("UH"), "UH,DI");
    assert_eq!(with_delay_flag("NC"), "DI,NC");
}
