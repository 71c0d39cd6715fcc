use super::*;

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 8080))
}

/// The manifest: 3 consecutive 5xx, 30 s interval and base ejection, at most half ejected.
fn cfg() -> OutlierConfig {
    OutlierConfig {
        consecutive_5xx: 3,
        interval: Duration::from_secs(30),
        base_ejection: Duration::from_secs(30),
        max_ejection_percent: 50,
        ..OutlierConfig::default()
    }
}

#[test]
fn consecutive_5xx_eject_and_a_success_resets_the_count() {
    let (c, t0) = (cfg(), Instant::now());
    let mut o = Outliers::default();
    assert!(!o.record(&c, addr(1), Attempt::Status(500), 4, t0));
    assert!(!o.record(&c, addr(1), Attempt::Status(503), 4, t0));
    assert!(!o.record(&c, addr(1), Attempt::Status(200), 4, t0), "a success resets");
    assert!(!o.record(&c, addr(1), Attempt::Status(500), 4, t0));
    assert!(!o.record(&c, addr(1), Attempt::LocalFailure, 4, t0), "a connect failure counts as a 503");
    assert!(!o.is_ejected(addr(1), t0));
    assert!(o.record(&c, addr(1), Attempt::Status(502), 4, t0), "the third in a row ejects");
    assert!(o.is_ejected(addr(1), t0 + Duration::from_secs(29)));
    assert!(!o.is_ejected(addr(1), t0 + Duration::from_secs(30)), "back after the base ejection time");
    assert_eq!(o.ejections_total, 1);
    assert!(!o.record(&c, addr(2), Attempt::Status(404), 4, t0) && !o.is_ejected(addr(2), t0), "4xx is not an error");
}

#[test]
fn each_ejection_lasts_longer_and_clean_intervals_earn_it_back() {
    let (c, t0) = (cfg(), Instant::now());
    let mut o = Outliers::default();
    let fail3 = |o: &mut Outliers, at: Instant| {
        (0..3).fold(false, |ejected, _| o.record(&c, addr(1), Attempt::Status(500), 4, at) || ejected)
    };
    assert!(fail3(&mut o, t0));
    let t1 = t0 + Duration::from_secs(31);
    assert!(fail3(&mut o, t1), "ejected again once back");
    assert_eq!(o.ejected(t1)[0].until, t1 + Duration::from_secs(60), "twice the base the second time");
    assert_eq!(o.ejected(t1)[0].times, 2);
    // Back at t1+60; then two clean intervals take the multiplier back to 0.
    let t2 = t1 + Duration::from_secs(60);
    o.sweep(&c, t2);
    o.sweep(&c, t2 + Duration::from_secs(30));
    o.sweep(&c, t2 + Duration::from_secs(60));
    let t3 = t2 + Duration::from_secs(61);
    assert!(fail3(&mut o, t3));
    assert_eq!(o.ejected(t3)[0].until, t3 + Duration::from_secs(30), "the multiplier was earned back");
}

#[test]
fn never_more_than_max_ejection_percent_are_ejected() {
    let (c, t0) = (cfg(), Instant::now());
    let mut o = Outliers::default();
    for i in 1..=4 {
        for _ in 0..3 {
            o.record(&c, addr(i), Attempt::Status(503), 4, t0);
        }
    }
    assert_eq!(o.ejected(t0).len(), 2, "half of four: {:?}", o.ejected(t0));
    let mut none = Outliers::default();
    let ten = OutlierConfig { max_ejection_percent: 10, ..c };
    for i in 1..=2 {
        for _ in 0..3 {
            none.record(&ten, addr(i), Attempt::Status(503), 2, t0);
        }
    }
    assert_eq!(none.ejected(t0).len(), 0, "one of two is 50 %, over 10 %: Envoy ejects none");
}

#[test]
fn gateway_errors_have_their_own_count_and_min_health_suspends_ejection() {
    let t0 = Instant::now();
    let gw = OutlierConfig { consecutive_5xx: 0, consecutive_gateway: 2, ..cfg() };
    let mut o = Outliers::default();
    assert!(!o.record(&gw, addr(1), Attempt::Status(500), 4, t0));
    assert!(!o.record(&gw, addr(1), Attempt::Status(500), 4, t0), "500 is not a gateway error");
    assert!(!o.record(&gw, addr(1), Attempt::Status(504), 4, t0));
    assert!(o.record(&gw, addr(1), Attempt::LocalFailure, 4, t0));
    let strict = OutlierConfig { min_health_percent: 100, max_ejection_percent: 100, ..cfg() };
    let mut o = Outliers::default();
    for _ in 0..3 {
        o.record(&strict, addr(1), Attempt::Status(500), 4, t0);
    }
    assert!(o.is_ejected(addr(1), t0));
    for _ in 0..3 {
        o.record(&strict, addr(2), Attempt::Status(500), 4, t0);
    }
    assert!(!o.is_ejected(addr(2), t0), "75 % healthy is below minHealthPercent 100: no more ejection");
}
