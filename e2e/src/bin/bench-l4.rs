//! Benchmark: direct pod-to-pod TCP vs. the same through two ztunnels, in
//! one lab run. Usage: `bench-l4 [seconds-per-measurement] [--capture
//! nftables|ebpf|ebpf-nosplice|both|all] [--rounds N]` (root); `ebpf` is
//! eBPF capture with the pod-local legs spliced (its default), `both` is
//! nftables and that, `all` adds eBPF without the splice; several set-ups
//! are measured alternating, N rounds, and compared.

use ambit_e2e::bench::Capture;
use anyhow::{bail, Context};

fn main() -> anyhow::Result<()> {
    let mut opts = ambit_e2e::bench::BenchOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--capture" => {
                let arg = args.next().unwrap_or_default();
                opts.captures = match Capture::parse_list(&arg) {
                    Some(list) => list,
                    None => bail!("--capture takes nftables, ebpf, ebpf-nosplice, both or all, not {arg:?}"),
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
