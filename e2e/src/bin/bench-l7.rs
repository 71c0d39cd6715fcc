//! L7 benchmark: HTTP load from a client pod to nginx in a server pod,
//! direct, through HAProxy, through two ztunnels, and through the waypoint
//! `ambit-waypoint`, in one lab run: the maximum rate (`wrk`, HTTP/1.1
//! keep-alive) and fixed-rate open-loop latency (`oha`, 1,000 and 5,000
//! requests/s, HTTP/1.1 and HTTP/2); then the waypoint's variants (Istio's
//! DestinationRule and VirtualService, tracing at 1 % and 100 %), maximum
//! rate only; see [`ambit_e2e::bench_l7`]. Usage:
//! `bench-l7 [seconds-per-path]` (root; needs `wrk`, `nginx`, `haproxy` and
//! `oha`, and the release binaries `ztunnel`, `ambit-controller` and
//! `ambit-waypoint`). `BENCH_WRK_THREADS` and `BENCH_WRK_CONNECTIONS` change
//! wrk's `-t` (2) and `-c` (16); `BENCH_RATE_SECONDS` the length of each
//! fixed-rate run (10; 0 skips them); `BENCH_VARIANTS=0` skips the variants.
//! Exits 1 after printing when a variant could not be measured.

fn main() -> anyhow::Result<()> {
    let mut opts = ambit_e2e::bench_l7::BenchOptions::default();
    if let Some(s) = std::env::args().nth(1) {
        opts.duration = std::time::Duration::from_secs(s.parse()?);
    }
    if let Ok(t) = std::env::var("BENCH_WRK_THREADS") {
        opts.threads = t.parse()?;
    }
    if let Ok(c) = std::env::var("BENCH_WRK_CONNECTIONS") {
        opts.connections = c.parse()?;
    }
    if let Ok(s) = std::env::var("BENCH_RATE_SECONDS") {
        opts.rate_duration = std::time::Duration::from_secs(s.parse()?);
    }
    if let Ok(v) = std::env::var("BENCH_VARIANTS") {
        opts.variants = v != "0";
    }
    let report = ambit_e2e::bench_l7::run(opts)?;
    println!("{}", ambit_e2e::bench_l7::render(&report));
    if !ambit_e2e::bench_l7_variants::all_measured(&report.variants) {
        eprintln!("bench-l7: some waypoint variants could not be measured (see above)");
        std::process::exit(1);
    }
    Ok(())
}
