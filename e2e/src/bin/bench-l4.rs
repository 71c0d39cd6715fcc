//! Benchmark: direct pod-to-pod TCP vs. the same through two ztunnels, in
//! one lab run. Usage: `bench-l4 [seconds-per-measurement] [--capture
//! nftables|ebpf|both] [--rounds N]` (root); with `both`, the two capture
//! modes are measured alternating, N rounds, and compared.

use ambit_cni::capture::CaptureMode;
use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let mut opts = ambit_e2e::bench::BenchOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--capture" => {
                opts.captures = match args.next().as_deref() {
                    Some("nftables") => vec![CaptureMode::Nftables],
                    Some("ebpf") => vec![CaptureMode::Ebpf],
                    Some("both") => vec![CaptureMode::Nftables, CaptureMode::Ebpf],
                    other => bail!("--capture takes nftables, ebpf or both, not {other:?}"),
                }
            }
            "--rounds" => opts.rounds = args.next().context("--rounds needs a number")?.parse()?,
            seconds => {
                opts.duration = std::time::Duration::from_secs_f64(seconds.parse().context("seconds per measurement")?)
            }
        }
    }
    let report = ambit_e2e::bench::run(opts)?;
    println!("{}", ambit_e2e::bench::render(&report));
    Ok(())
}
