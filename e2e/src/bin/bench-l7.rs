//! L7 benchmark: HTTP load from a client pod to nginx in a server pod,
//! direct, through HAProxy, through two ztunnels, and through the waypoint
//! `ambit-waypoint`, in one lab run: the maximum rate (`wrk`, HTTP/1.1
//! keep-alive) and fixed-rate open-loop latency (`oha`, 1,000 and 5,000
//! requests/s, HTTP/1.1 and HTTP/2); see [`ambit_e2e::bench_l7`]. Usage:
//! `bench-l7 [seconds-per-path]` (root; needs `wrk`, `nginx`, `haproxy` and
//! `oha`, and the release binaries `ztunnel`, `ambit-controller` and
//! `ambit-waypoint`). `BENCH_WRK_THREADS` and `BENCH_WRK_CONNECTIONS` change
//! wrk's `-t` (2) and `-c` (16); `BENCH_RATE_SECONDS` the length of each
//! fixed-rate run (10; 0 skips them).

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
    let report = ambit_e2e::bench_l7::run(opts)?;
    println!("{}", ambit_e2e::bench_l7::render(&report));
    Ok(())
}
