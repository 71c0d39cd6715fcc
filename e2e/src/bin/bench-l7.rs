//! L7 benchmark: HTTP/1.1 keep-alive load (`wrk`) from a client pod to nginx
//! in a server pod, direct, through HAProxy, through two ztunnels, and through
//! the waypoint `ambit-waypoint`, in one lab run; see
//! [`ambit_e2e::bench_l7`]. Usage: `bench-l7 [seconds-per-path]` (root;
//! needs `wrk`, `nginx` and `haproxy`, and the release binaries `ztunnel`,
//! `ambit-controller` and `ambit-waypoint`). `BENCH_WRK_THREADS` and
//! `BENCH_WRK_CONNECTIONS` change wrk's `-t` (2) and `-c` (16).

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
    let report = ambit_e2e::bench_l7::run(opts)?;
    println!("{}", ambit_e2e::bench_l7::render(&report));
    Ok(())
}
