//! The L4 benchmark: the same pair of pods on two nodes measured first with
//! direct TCP (not enrolled) and then through two ztunnels (enrolled,
//! HBONE over mutual TLS), in one run, with ratios to direct.
//!
//! Figures: single-stream and 4-stream throughput, 64-byte request/response
//! latency on a persistent connection (p50, p99), new connections per
//! second, the two throughputs again as iperf3 measures them (a load
//! generator that is not ours), and ztunnel CPU seconds and peak RSS per side.
//!
//! The mesh is measured once per capture set-up asked for (`--capture
//! nftables|ebpf|ebpf-nosplice|both|all`), the set-ups alternating over
//! `--rounds` rounds: the pods are released and enrolled again in the next
//! one between phases.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::bench_iperf::{self, IperfFigures, IPERF_PORT};
use ambit_cni::capture::CaptureMode;

use crate::lab::{Lab, NodeId, PodId, PodSpec};
use crate::mesh::Mesh;
use crate::netns::NetNs;

/// A capture set-up the mesh is measured with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    Nftables,
    /// eBPF capture, the pod-local legs spliced with the sockmap or not.
    Ebpf {
        splice: bool,
    },
}

impl Capture {
    /// The set-ups `--capture` names: one, `both` (nftables and eBPF as
    /// installed by default) or `all`.
    pub fn parse_list(arg: &str) -> Option<Vec<Capture>> {
        const EBPF: Capture = Capture::Ebpf { splice: true };
        const EBPF_NO_SPLICE: Capture = Capture::Ebpf { splice: false };
        Some(match arg {
            "nftables" => vec![Capture::Nftables],
            "ebpf" => vec![EBPF],
            "ebpf-nosplice" => vec![EBPF_NO_SPLICE],
            "both" => vec![Capture::Nftables, EBPF],
            "all" => vec![Capture::Nftables, EBPF_NO_SPLICE, EBPF],
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Capture::Nftables => "nftables",
            Capture::Ebpf { splice: true } => "eBPF + splice",
            Capture::Ebpf { splice: false } => "eBPF, no splice",
        }
    }
}

/// How long each measurement runs, and which capture set-ups are compared.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub duration: Duration,
    pub latency_samples: usize,
    /// The capture set-ups measured, in order (default: nftables only).
    pub captures: Vec<Capture>,
    /// How many times the modes are measured, alternating.
    pub rounds: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            duration: Duration::from_secs(5),
            latency_samples: 20_000,
            captures: vec![Capture::Nftables],
            rounds: 1,
        }
    }
}

/// The figures of one path (direct or through ztunnel).
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub single_stream_gbps: f64,
    pub four_stream_gbps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub conns_per_sec: f64,
    /// The same throughput measured by iperf3.
    pub iperf: IperfFigures,
}

/// ztunnel resource use during the mesh measurements.
#[derive(Clone, Debug, Default)]
pub struct ZtunnelUse {
    pub idle_rss_mib: [f64; 2],
    /// CPU seconds per GB carried in the single-stream run (the cost side
    /// of a change; with busy polling on, it includes the polling).
    pub single_stream_cpu_per_gb: [f64; 2],
    pub cpu_seconds: [f64; 2],
    pub peak_rss_mib: [f64; 2],
}

/// One measurement of the mesh.
#[derive(Clone, Debug)]
pub struct MeshRun {
    pub capture: Capture,
    pub figures: Figures,
    pub ztunnel: ZtunnelUse,
}

/// The whole result.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub direct: Figures,
    /// In the order measured.
    pub mesh: Vec<MeshRun>,
}

const THROUGHPUT_PORT: u16 = 9300;
const ECHO_PORT: u16 = 9301;
const CONN_PORT: u16 = 9302;
// Each mesh phase uses server ports of its own: a phase leaves thousands of
// TIME_WAIT sockets in the server pod keyed (server:port, client:port), and
// ztunnel's connections from the client's own address to the same server
// port would collide with them (a SYN that hits one waits a retransmit, 1 s).
const PHASE_PORT_OFFSET: u16 = 10;
const IO_BUF: usize = 128 * 1024;

/// Builds the lab, runs both paths, returns the figures.
pub fn run(opts: BenchOptions) -> anyhow::Result<Report> {
    bench_iperf::require()?;
    let mut lab = Lab::new("bench-l4")?;
    let n1 = lab.add_node("node1")?;
    let n2 = lab.add_node("node2")?;
    let client = lab.add_pod(n1, PodSpec::new("client", "bench", "client"))?;
    let server = lab.add_pod(n2, PodSpec::new("server", "bench", "server"))?;
    let mut mesh = Mesh::new(lab)?;
    let phases: Vec<Capture> = (0..opts.rounds).flat_map(|_| opts.captures.iter().copied()).collect();
    let servers = (0..=phases.len())
        .map(|i| Servers::start(&mesh.lab().pod(server).netns, i as u16 * PHASE_PORT_OFFSET))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = mesh.lab().pod(server).ip;

    // BENCH_SKIP_DIRECT=1 measures only the mesh (for quick experiments).
    let direct = if std::env::var_os("BENCH_SKIP_DIRECT").is_some() {
        Figures::default()
    } else {
        eprintln!("measuring direct pod-to-pod TCP ...");
        let pods = (&mesh.lab().pod(client).netns, &mesh.lab().pod(server).netns);
        measure(pods, target.into(), 0, &opts, || [0.0; 2])?.0
    };

    // Extra ztunnel flags for experiments, e.g. BENCH_ZTUNNEL_ARGS="--worker-threads 1".
    let extra: Vec<String> =
        std::env::var("BENCH_ZTUNNEL_ARGS").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
    for n in [n1, n2] {
        mesh.start_ztunnel_with(n, |a| {
            a.extra.extend(extra.iter().cloned());
            if let Ok(level) = std::env::var("BENCH_ZTUNNEL_LOG") {
                a.log_level = level;
            }
        })?;
    }
    let mut runs = Vec::new();
    for (i, &capture) in phases.iter().enumerate() {
        let mut zt = ZtunnelUse::default();
        for (i, n) in [n1, n2].into_iter().enumerate() {
            zt.idle_rss_mib[i] = mib(mesh.ztunnel(n).rss_bytes());
        }
        let config = mesh.capture_config_mut();
        (config.mode, config.bpf_splice) = match capture {
            Capture::Nftables => (CaptureMode::Nftables, false),
            Capture::Ebpf { splice } => (CaptureMode::Ebpf, splice),
        };
        enroll(&mut mesh, &[client, server])?;
        let cpu_before = cpu(&mesh, [n1, n2]);
        eprintln!("measuring through two ztunnels ({} capture) ...", capture.name());
        let pods = (&mesh.lab().pod(client).netns, &mesh.lab().pod(server).netns);
        let offset = (i as u16 + 1) * PHASE_PORT_OFFSET;
        let (figures, cpu_per_gb) = measure(pods, target.into(), offset, &opts, || cpu(&mesh, [n1, n2]))?;
        let cpu_after = cpu(&mesh, [n1, n2]);
        zt.single_stream_cpu_per_gb = cpu_per_gb;
        for (i, n) in [n1, n2].into_iter().enumerate() {
            zt.cpu_seconds[i] = cpu_after[i] - cpu_before[i];
            zt.peak_rss_mib[i] = mib(mesh.ztunnel(n).peak_rss_bytes());
        }
        for p in [client, server] {
            mesh.release(p)?;
        }
        runs.push(MeshRun { capture, figures, ztunnel: zt });
    }
    drop(servers);
    Ok(Report { direct, mesh: runs })
}

fn enroll(mesh: &mut Mesh, pods: &[PodId]) -> anyhow::Result<()> {
    for p in pods {
        mesh.enroll(*p)?;
    }
    // ztunnel polls its state file; give it time to see the enrolled pods.
    thread::sleep(Duration::from_millis(800));
    Ok(())
}

fn cpu(mesh: &Mesh, nodes: [NodeId; 2]) -> [f64; 2] {
    [mesh.ztunnel(nodes[0]).cpu_seconds(), mesh.ztunnel(nodes[1]).cpu_seconds()]
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Measures every figure from `client`; also returns, per side, the CPU
/// seconds that `cpu` (cumulative) counted per GB carried in the
/// single-stream run. With BENCH_SINGLE_STREAM_ONLY=1 only that run is made,
/// with BENCH_CONNECTIONS_ONLY=1 only the connection rate (for quick experiments).
fn measure(
    (client, server_ns): (&NetNs, &NetNs),
    server: std::net::IpAddr,
    offset: u16,
    opts: &BenchOptions,
    cpu: impl Fn() -> [f64; 2],
) -> anyhow::Result<(Figures, [f64; 2])> {
    let tp = SocketAddr::new(server, THROUGHPUT_PORT + offset);
    let echo = SocketAddr::new(server, ECHO_PORT + offset);
    let conn = SocketAddr::new(server, CONN_PORT + offset);
    let d = opts.duration;
    // BENCH_CONNECTIONS_ONLY=1 measures only the connection rate (to profile connection setup).
    if std::env::var_os("BENCH_CONNECTIONS_ONLY").is_some() {
        let conns_per_sec = client.run(move || connection_rate(conn, d)).context("connection rate")?;
        return Ok((Figures { conns_per_sec, ..Figures::default() }, [0.0; 2]));
    }
    let (before, start) = (cpu(), Instant::now());
    let single_stream_gbps = client.run(move || throughput(tp, 1, d)).context("single-stream throughput")?;
    let (after, gb) = (cpu(), single_stream_gbps * start.elapsed().as_secs_f64() / 8.0);
    let cpu_per_gb = [(after[0] - before[0]) / gb, (after[1] - before[1]) / gb];
    if std::env::var_os("BENCH_SINGLE_STREAM_ONLY").is_some() {
        return Ok((Figures { single_stream_gbps, ..Figures::default() }, cpu_per_gb));
    }
    let four_stream_gbps = client.run(move || throughput(tp, 4, d)).context("4-stream throughput")?;
    let n = opts.latency_samples;
    let (p50_us, p99_us) = client.run(move || latency(echo, n)).context("latency")?;
    let conns_per_sec = client.run(move || connection_rate(conn, d)).context("connection rate")?;
    let iperf = bench_iperf::measure(client, server_ns, server, IPERF_PORT + offset, d)?;
    Ok((Figures { single_stream_gbps, four_stream_gbps, p50_us, p99_us, conns_per_sec, iperf }, cpu_per_gb))
}

/// Sends as fast as possible on `streams` connections for `d`; Gbit/s.
/// Runs on a thread inside the client's netns; each stream's thread is
/// spawned from it and so is in the same netns (namespaces are inherited).
fn throughput(addr: SocketAddr, streams: usize, d: Duration) -> std::io::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let stop = stop.clone();
            let s = TcpStream::connect(addr);
            thread::spawn(move || -> std::io::Result<u64> {
                let mut s = s?;
                let buf = vec![0x5au8; IO_BUF];
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&buf)?;
                    sent += buf.len() as u64;
                }
                s.shutdown(std::net::Shutdown::Write)?;
                // Wait for the sink to confirm it read everything.
                let mut ack = [0u8; 8];
                Retrying(&mut s).read_exact(&mut ack)?;
                Ok(u64::from_le_bytes(ack).min(sent))
            })
        })
        .collect();
    thread::sleep(d);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0u64;
    for h in handles {
        total += h.join().map_err(|_| std::io::Error::other("sender panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(total as f64 * 8.0 / secs / 1e9)
}

/// 64-byte ping-pong on one persistent connection; (p50, p99) in µs.
fn latency(addr: SocketAddr, samples: usize) -> std::io::Result<(f64, f64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples + samples / 10 {
        let t = Instant::now();
        s.write_all(&msg)?;
        Retrying(&mut s).read_exact(&mut back)?;
        if i >= samples / 10 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)].as_secs_f64() * 1e6;
    Ok((pct(0.50), pct(0.99)))
}

/// Connect, one byte each way, close; as many as possible in `d`.
fn connection_rate(addr: SocketAddr, d: Duration) -> std::io::Result<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    let mut b = [0u8; 1];
    while start.elapsed() < d {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.write_all(b"x")?;
        Retrying(&mut s).read_exact(&mut b)?;
        drop(s);
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Reads from a blocking socket, again when it says EAGAIN: with eBPF
/// capture's splice, the kernel can wake a reader blocked on a socket in a
/// sockmap with nothing to read.
struct Retrying<'a>(&'a mut TcpStream);

impl Read for Retrying<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::yield_now(),
                other => return other,
            }
        }
    }
}

/// The benchmark's servers in the server pod: a sink that acknowledges the
/// byte count, an echo server, and a one-byte responder handled inline on
/// the accept thread (so the connection rate is not limited by spawning).
struct Servers {
    listeners: Vec<Arc<TcpListener>>,
}

impl Servers {
    fn start(ns: &NetNs, offset: u16) -> anyhow::Result<Self> {
        let bind = |port: u16| -> anyhow::Result<Arc<TcpListener>> {
            Ok(Arc::new(ns.run(move || TcpListener::bind(("0.0.0.0", port)))?))
        };
        let (sink, echo, conn) =
            (bind(THROUGHPUT_PORT + offset)?, bind(ECHO_PORT + offset)?, bind(CONN_PORT + offset)?);
        spawn_acceptor(sink.clone(), true, |mut s| {
            let mut buf = vec![0u8; IO_BUF];
            let mut n = 0u64;
            loop {
                match Retrying(&mut s).read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k as u64,
                }
            }
            let _ = s.write_all(&n.to_le_bytes());
        });
        spawn_acceptor(echo.clone(), true, |mut s| {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 64];
            while Retrying(&mut s).read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        });
        spawn_acceptor(conn.clone(), false, |mut s| {
            let mut b = [0u8; 1];
            if Retrying(&mut s).read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        });
        Ok(Servers { listeners: vec![sink, echo, conn] })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for l in &self.listeners {
            // SAFETY: shutting down a listening socket we own wakes accept().
            unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&**l), libc::SHUT_RDWR) };
        }
    }
}

fn spawn_acceptor(l: Arc<TcpListener>, per_conn_thread: bool, serve: fn(TcpStream)) {
    thread::spawn(move || {
        while let Ok((s, _)) = l.accept() {
            if per_conn_thread {
                thread::spawn(move || serve(s));
            } else {
                serve(s);
            }
        }
    });
}

/// Renders the report as the table printed by the benchmark (and pasted in
/// the README).
pub fn render(r: &Report) -> String {
    let ratio = |m: f64, d: f64| if d > 0.0 { format!("{:.0} %", 100.0 * m / d) } else { "-".into() };
    let figures = |f: &Figures| {
        [
            ("single-stream throughput (Gbit/s)", f.single_stream_gbps, true),
            ("4-stream throughput (Gbit/s)", f.four_stream_gbps, true),
            ("64 B request/response p50 (µs)", f.p50_us, false),
            ("64 B request/response p99 (µs)", f.p99_us, false),
            ("new connections per second", f.conns_per_sec, true),
            ("iperf3 single-stream (Gbit/s)", f.iperf.single_stream_gbps, true),
            ("iperf3 4-stream (Gbit/s)", f.iperf.four_stream_gbps, true),
        ]
    };
    let mut out = String::new();
    for run in &r.mesh {
        out.push_str(&format!(
            "\n{} capture\n| figure | direct TCP | through 2 ztunnels | ratio |\n|---|---:|---:|---:|\n",
            run.capture.name()
        ));
        for ((name, d, show_ratio), (_, m, _)) in figures(&r.direct).into_iter().zip(figures(&run.figures)) {
            let rat = if show_ratio { ratio(m, d) } else { format!("{:+.1} µs", m - d) };
            out.push_str(&format!("| {name} | {d:.2} | {m:.2} | {rat} |\n"));
        }
        let z = &run.ztunnel;
        out.push_str(&format!(
            "\nztunnel (client node / server node): idle RSS {:.1} / {:.1} MiB; CPU during the mesh run {:.2} / {:.2} s; peak RSS {:.1} / {:.1} MiB\n",
            z.idle_rss_mib[0], z.idle_rss_mib[1], z.cpu_seconds[0], z.cpu_seconds[1], z.peak_rss_mib[0], z.peak_rss_mib[1]
        ));
        out.push_str(&format!(
            "ztunnel CPU per GB in the single-stream run (client node / server node): {:.2} / {:.2} s\n",
            z.single_stream_cpu_per_gb[0], z.single_stream_cpu_per_gb[1]
        ));
    }
    // Medians over the rounds of each set-up, side by side, each compared with the first one measured.
    let mut setups: Vec<Capture> = Vec::new();
    for run in &r.mesh {
        if !setups.contains(&run.capture) {
            setups.push(run.capture);
        }
    }
    if setups.len() > 1 {
        let runs: Vec<Vec<&MeshRun>> =
            setups.iter().map(|c| r.mesh.iter().filter(|m| m.capture == *c).collect()).collect();
        let median = |runs: &[&MeshRun], pick: &dyn Fn(&MeshRun) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(|m| pick(m)).collect();
            v.sort_by(f64::total_cmp);
            let mid = v.len() / 2;
            if v.len().is_multiple_of(2) {
                (v[mid - 1] + v[mid]) / 2.0
            } else {
                v[mid]
            }
        };
        let base = setups[0].name();
        let names: Vec<&str> = setups.iter().map(|c| c.name()).collect();
        let counts: Vec<String> = runs.iter().map(|r| r.len().to_string()).collect();
        let ratios: Vec<String> = names[1..].iter().map(|n| format!("{n} / {base}")).collect();
        out.push_str(&format!(
            "\ncapture set-ups compared (medians of {} runs)\n| figure | {} | {} |\n|---|{}\n",
            counts.join(" / "),
            names.join(" | "),
            ratios.join(" | "),
            "---:|".repeat(names.len() + ratios.len())
        ));
        let mut row = |name: &str, pick: &dyn Fn(&MeshRun) -> f64| {
            let values: Vec<f64> = runs.iter().map(|r| median(r, pick)).collect();
            let shown: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
            let rel: Vec<String> = values[1..].iter().map(|v| ratio(*v, values[0])).collect();
            out.push_str(&format!("| {name} | {} | {} |\n", shown.join(" | "), rel.join(" | ")));
        };
        for (i, (name, _, _)) in figures(&Figures::default()).into_iter().enumerate() {
            row(name, &|m: &MeshRun| figures(&m.figures)[i].1);
        }
        for (side, name) in ["client", "server"].into_iter().enumerate() {
            row(&format!("ztunnel CPU s per GB ({name} node)"), &|m: &MeshRun| {
                m.ztunnel.single_stream_cpu_per_gb[side]
            });
        }
    }
    out
}
