use std::time::Duration;

use super::*;

fn limits(max_connections: u32, max_pending: u32, max_requests: u32, max_retries: u32) -> Limits {
    Limits { max_connections, max_pending, max_requests, max_retries }
}

#[tokio::test]
async fn http1_requests_over_the_connections_wait_and_one_more_than_the_pending_overflows() {
    let b = Breaker::new(limits(2, 1, 0, 0));
    let first = b.admit(false).await.unwrap();
    let _second = b.admit(false).await.unwrap();
    // The third waits for a connection slot.
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.admit(false).await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(b.counts(), (3, 1), "three requests, one of them pending");
    assert_eq!(b.admit(false).await.err(), Some(Overflow::Pending), "the pending queue is full");
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap();
    assert_eq!(b.counts(), (1, 0), "the waiter got the slot and finished; the second still runs");
}

#[tokio::test]
async fn http2_requests_take_no_connection_slot_but_count_against_max_requests() {
    let b = Breaker::new(limits(1, 1, 3, 0));
    let held: Vec<_> =
        [b.admit(true).await, b.admit(true).await, b.admit(true).await].into_iter().map(Result::unwrap).collect();
    assert_eq!(b.admit(true).await.err(), Some(Overflow::Requests));
    drop(held);
    assert_eq!(b.counts(), (0, 0));
    assert!(b.admit(true).await.is_ok());
}

#[tokio::test]
async fn a_pending_request_given_up_leaves_no_count_behind() {
    let b = Breaker::new(limits(1, 5, 0, 0));
    let _running = b.admit(false).await.unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(20), b.admit(false)).await;
    assert!(gave_up.is_err(), "still waiting when its timeout came");
    assert_eq!(b.counts(), (1, 0));
}

#[tokio::test]
async fn zero_is_no_limit_and_retries_have_their_own() {
    let b = Breaker::new(Limits::default());
    let many: Vec<_> = futures_join(&b, 1_000).await;
    assert_eq!(many.len(), 1_000);
    let b = Breaker::new(limits(0, 0, 0, 2));
    let (r1, r2) = (b.retry().unwrap(), b.retry().unwrap());
    assert!(b.retry().is_none(), "two retries in flight at most");
    drop(r1);
    assert!(b.retry().is_some());
    drop(r2);
}

async fn futures_join(b: &Arc<Breaker>, n: usize) -> Vec<Admission> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(b.admit(false).await.unwrap());
    }
    out
}

#[test]
fn tcp_connections_hold_a_slot_and_one_over_is_refused_without_waiting() {
    let b = Breaker::new(limits(2, 10, 0, 0));
    let (c1, _c2) = (b.connection().unwrap(), b.connection().unwrap());
    assert!(c1.is_some());
    assert_eq!(b.connection().err(), Some(Overflow::Connections), "no pending queue for TCP");
    drop(c1);
    assert!(b.connection().unwrap().is_some());
    assert!(Breaker::new(Limits::default()).connection().unwrap().is_none(), "no limit: no slot to hold");
}
