//! Benchmark: direct pod-to-pod TCP vs. the same through two ztunnels, in
//! one lab run. Usage: `bench-l4 [seconds-per-measurement]` (root).

fn main() -> anyhow::Result<()> {
    let mut opts = ambit_e2e::bench::BenchOptions::default();
    if let Some(s) = std::env::args().nth(1) {
        opts.duration = std::time::Duration::from_secs_f64(s.parse()?);
    }
    let report = ambit_e2e::bench::run(opts)?;
    println!("{}", ambit_e2e::bench::render(&report));
    Ok(())
}
