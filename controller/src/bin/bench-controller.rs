//! Controller scale benchmark: loads a synthetic cluster through the file
//! source's path (YAML → objects → model), serves it with the real xDS server
//! on 127.0.0.1, connects one raw delta-xDS client per node in this process,
//! and prints load time, memory, initial sync, and the delta size and push
//! latency of single changes as a markdown table with the targets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_controller::bench::{self, ClusterSpec, Received};
use ambit_controller::ca::BootstrapTokenAuthenticator;
use ambit_controller::model::{self, ClusterObjects, ModelOptions, SnapshotTx};
use ambit_controller::sources::file::Files;
use ambit_controller::xds::{XdsMetrics, XdsServer};
use anyhow::{bail, ensure, Context as _};
use clap::Parser;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpIncoming;

/// How long one change may take to reach its clients before the run fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait after a change's expected receipts, to catch pushes to clients that
/// should not get one (per-node scoping).
const SETTLE: Duration = Duration::from_millis(50);
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Parser, Debug)]
#[command(about = "Ambit controller scale benchmark (prints a markdown table)")]
struct Args {
    /// Pods in all.
    #[arg(long, default_value_t = 10_000)]
    pods: u32,
    /// Nodes (one xDS client each).
    #[arg(long, default_value_t = 100)]
    nodes: u32,
    /// Services.
    #[arg(long, default_value_t = 1_000)]
    services: u32,
    /// AuthorizationPolicies.
    #[arg(long, default_value_t = 500)]
    policies: u32,
    /// Ambient namespaces.
    #[arg(long, default_value_t = 10)]
    namespaces: u32,
    /// Pods (of --pods) in a non-ambient namespace backing no service; they
    /// show per-node scoping at work.
    #[arg(long, default_value_t = 0)]
    uncaptured: u32,
    /// Changes of each kind.
    #[arg(long, default_value_t = 10)]
    reps: u32,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spec = ClusterSpec {
        pods: args.pods,
        nodes: args.nodes,
        services: args.services,
        policies: args.policies,
        namespaces: args.namespaces,
        uncaptured: args.uncaptured,
    };
    ensure!(
        spec.uncaptured < spec.pods && spec.nodes > 0 && spec.services > 0,
        "need captured pods, nodes and services"
    );
    let opts = ModelOptions::default();

    // Load, as the file source does: files → objects → model.
    let rss_start = bench::rss_bytes().unwrap_or(0);
    let yaml = spec.yaml();
    let yaml_len = yaml.len();
    let files = Files(vec![("cluster.yaml".into(), yaml.into_bytes())]);
    let t = Instant::now();
    let (mut objects, rejected) = files.objects();
    let parse_time = t.elapsed();
    drop(files);
    ensure!(rejected.is_empty(), "rejected: {:?}", &rejected[..rejected.len().min(3)]);
    let t = Instant::now();
    let report = model::build_report(&objects, &opts, 1);
    let build_time = t.elapsed();
    ensure!(report.rejections.is_empty(), "rejected: {:?}", report.rejections.first());
    let snapshot = report.snapshot;
    let full_bytes: usize = snapshot.addresses.values().map(Message::encoded_len).sum::<usize>()
        + snapshot.authorizations.values().map(Message::encoded_len).sum::<usize>();
    let full_count = snapshot.addresses.len() + snapshot.authorizations.len();

    let (tx, _) = watch::channel(Arc::new(snapshot));
    let addr = serve(&tx).await?;
    let rss_loaded = bench::rss_bytes().unwrap_or(0);

    // Initial sync of every client.
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for c in 0..spec.nodes as usize {
        let node = ClusterSpec::node_name(c as u32);
        let rtx = report_tx.clone();
        clients.push(tokio::spawn(async move {
            if let Err(e) = bench::run_client(addr, node, c, rtx).await {
                eprintln!("client {c}: {e}");
            }
        }));
    }
    drop(report_tx);
    let mut all = Vec::new();
    let mut synced: BTreeMap<usize, (bool, bool)> = BTreeMap::new();
    while synced.values().filter(|(a, p)| *a && *p).count() < clients.len() {
        let r = next(&mut reports).await?;
        let e = synced.entry(r.client).or_default();
        if r.addresses {
            e.0 = true
        } else {
            e.1 = true
        }
        all.push(r);
    }
    let sync_time = t0.elapsed();
    let per_client = |f: fn(&Received) -> usize| {
        let mut sums = vec![0usize; clients.len()];
        for r in &all {
            sums[r.client] += f(r);
        }
        sums
    };
    let (sync_bytes, sync_res) = (per_client(|r| r.bytes), per_client(|r| r.resources));
    let rss_synced = bench::rss_bytes().unwrap_or(0);
    all.clear();

    // Changes: each is rebuilt through the model and published.
    let mut version = 1;
    let mut changes: Vec<Change> = Vec::new();
    let captured = spec.pods - spec.uncaptured;
    for rep in 0..args.reps {
        let pod = (rep * 997 + 13) % captured;
        changes.push(
            publish(
                &tx,
                &mut objects,
                &opts,
                &mut version,
                &spec.pod_yaml(pod, false),
                Kind::Pod,
                None,
                &mut reports,
                spec.nodes,
            )
            .await?,
        );
        let k = (rep * 37 + 5) % spec.policies.max(1);
        if spec.policies > 0 {
            changes.push(
                publish(
                    &tx,
                    &mut objects,
                    &opts,
                    &mut version,
                    &spec.policy_yaml(k, rep + 1),
                    Kind::Policy,
                    None,
                    &mut reports,
                    spec.nodes,
                )
                .await?,
            );
        }
        if spec.uncaptured > 0 {
            let pod = captured + (rep * 31) % spec.uncaptured;
            let node = spec.node_of(pod);
            changes.push(
                publish(
                    &tx,
                    &mut objects,
                    &opts,
                    &mut version,
                    &spec.pod_yaml(pod, false),
                    Kind::Uncaptured,
                    Some(node),
                    &mut reports,
                    spec.nodes,
                )
                .await?,
            );
        }
    }
    // Late receipts (a push that scoping should have avoided) still count.
    tokio::time::sleep(SETTLE).await;
    while let Ok(r) = reports.try_recv() {
        if let Some(c) = changes.iter_mut().find(|c| c.version == r.version) {
            c.received.push(r);
        }
    }
    let rss_end = bench::rss_bytes().unwrap_or(0);
    for c in &clients {
        c.abort();
    }

    print_table(&Figures {
        spec: &spec,
        yaml_len,
        parse_time,
        build_time,
        full_bytes,
        full_count,
        rss_start,
        rss_loaded,
        rss_synced,
        rss_end,
        sync_time,
        sync_bytes,
        sync_res,
        changes,
    });
    Ok(())
}

/// Starts the real xDS server (plaintext) on 127.0.0.1:0.
async fn serve(tx: &SnapshotTx) -> anyhow::Result<SocketAddr> {
    let auth = Arc::new(BootstrapTokenAuthenticator::new(bench::BENCH_TOKEN)?);
    let svc = XdsServer::new(tx.subscribe(), XdsMetrics::new(&mut Registry::default()), auth).into_service();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(TcpIncoming::from(listener)));
    Ok(addr)
}

async fn next(reports: &mut mpsc::UnboundedReceiver<Received>) -> anyhow::Result<Received> {
    match tokio::time::timeout(CHANGE_TIMEOUT, reports.recv()).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => bail!("every client ended"),
        Err(_) => bail!("no xds response within {CHANGE_TIMEOUT:?}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A captured pod's readiness flips.
    Pod,
    /// A policy's rule changes.
    Policy,
    /// A pod outside the mesh, backing no service, flips readiness.
    Uncaptured,
}

/// One published change and what the clients got.
struct Change {
    kind: Kind,
    version: u64,
    rebuild: Duration,
    published: Instant,
    expected: usize,
    received: Vec<Received>,
}

/// Applies `yaml`, rebuilds the model, publishes it, and waits until the
/// expected clients (all, or only `only_node`'s) received it.
#[allow(clippy::too_many_arguments)]
async fn publish(
    tx: &SnapshotTx,
    objects: &mut ClusterObjects,
    opts: &ModelOptions,
    version: &mut u64,
    yaml: &str,
    kind: Kind,
    only_node: Option<u32>,
    reports: &mut mpsc::UnboundedReceiver<Received>,
    clients: u32,
) -> anyhow::Result<Change> {
    bench::apply_yaml(objects, yaml)?;
    *version += 1;
    let t = Instant::now();
    let report = model::build_report(objects, opts, *version);
    let rebuild = t.elapsed();
    ensure!(report.rejections.is_empty(), "rejected: {:?}", report.rejections.first());
    let expected = if only_node.is_some() { 1 } else { clients as usize };
    let published = Instant::now();
    tx.send_replace(Arc::new(report.snapshot));
    let mut change = Change { kind, version: *version, rebuild, published, expected, received: Vec::new() };
    let mut who = BTreeSet::new();
    while who.len() < expected {
        let r = next(reports).await.with_context(|| format!("{kind:?} change v{version}"))?;
        if r.version == *version {
            who.insert(r.client);
            change.received.push(r);
        }
    }
    if only_node.is_some() {
        tokio::time::sleep(SETTLE).await;
        while let Ok(r) = reports.try_recv() {
            if r.version == *version {
                change.received.push(r);
            }
        }
    }
    Ok(change)
}

struct Figures<'a> {
    spec: &'a ClusterSpec,
    yaml_len: usize,
    parse_time: Duration,
    build_time: Duration,
    full_bytes: usize,
    full_count: usize,
    rss_start: u64,
    rss_loaded: u64,
    rss_synced: u64,
    rss_end: u64,
    sync_time: Duration,
    sync_bytes: Vec<usize>,
    sync_res: Vec<usize>,
    changes: Vec<Change>,
}

fn min_avg_max(v: &[usize]) -> String {
    let (min, max) = (v.iter().min().unwrap_or(&0), v.iter().max().unwrap_or(&0));
    let avg = v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    format!("{min} / {avg:.0} / {max}")
}

fn print_table(f: &Figures<'_>) {
    let s = f.spec;
    println!(
        "\n## Controller scale: {} pods ({} outside the mesh) on {} nodes, {} services, {} policies, {} clients\n",
        s.pods, s.uncaptured, s.nodes, s.services, s.policies, s.nodes
    );
    println!("| measure | figure | target |\n|---|---|---|");
    let first = f.parse_time + f.build_time;
    println!(
        "| first full snapshot (parse {:.1} MiB YAML + build) | {} (parse {}, build {}) | ≤ 2 s |",
        f.yaml_len as f64 / MIB,
        ms(first),
        ms(f.parse_time),
        ms(f.build_time)
    );
    println!(
        "| controller RSS after load, before clients (objects + snapshot + server) | {} (process start {}) | ≤ 200 MiB |",
        mib(f.rss_loaded),
        mib(f.rss_start)
    );
    println!(
        "| RSS growth once {} clients synced (server stream state + in-process clients) | +{} (end of run {}) | — |",
        s.nodes,
        mib(f.rss_synced.saturating_sub(f.rss_loaded)),
        mib(f.rss_end)
    );
    println!(
        "| initial sync of {} clients (connect → every client has both types) | {} | — |",
        s.nodes,
        ms(f.sync_time)
    );
    println!(
        "| initial sync per client: resources min/avg/max | {} (full snapshot {}) | — |",
        min_avg_max(&f.sync_res),
        f.full_count
    );
    println!(
        "| initial sync per client: bytes min/avg/max | {} (full snapshot {} resource bytes) | — |",
        min_avg_max(&f.sync_bytes),
        f.full_bytes
    );
    for (kind, label) in [
        (Kind::Pod, "pod readiness flip"),
        (Kind::Policy, "policy change"),
        (Kind::Uncaptured, "readiness flip of a pod outside the mesh"),
    ] {
        let cs: Vec<&Change> = f.changes.iter().filter(|c| c.kind == kind).collect();
        if cs.is_empty() {
            continue;
        }
        let mut rebuild: Vec<Duration> = cs.iter().map(|c| c.rebuild).collect();
        rebuild.sort();
        let mut lat = Vec::new();
        let (mut bytes, mut res, mut n) = (0usize, 0usize, 0usize);
        let mut reached = Vec::new();
        for c in &cs {
            let clients: BTreeSet<_> = c.received.iter().map(|r| r.client).collect();
            reached.push(clients.len());
            for r in &c.received {
                lat.push(r.at.duration_since(c.published));
                bytes += r.bytes;
                res += r.resources + r.removed;
                n += 1;
            }
            debug_assert!(clients.len() >= c.expected);
        }
        lat.sort();
        let n = n.max(1);
        println!(
            "| {label}: model rebuild p50 / max ({} changes) | {} / {} | — |",
            cs.len(),
            ms(bench::percentile(&rebuild, 50.0)),
            ms(*rebuild.last().unwrap_or(&Duration::ZERO))
        );
        println!(
            "| {label}: clients reached per change (of {}) | {} | {} |",
            s.nodes,
            min_avg_max(&reached),
            if kind == Kind::Uncaptured { "1 (its node)" } else { "all" }
        );
        println!(
            "| {label}: delta per client | {:.1} resources, {:.0} bytes | — |",
            res as f64 / n as f64,
            bytes as f64 / n as f64
        );
        println!(
            "| {label}: push latency publish → receipt p50 / p99 / max ({} samples) | {} / {} / {} | p99 ≤ 100 ms |",
            lat.len(),
            ms(bench::percentile(&lat, 50.0)),
            ms(bench::percentile(&lat, 99.0)),
            ms(*lat.last().unwrap_or(&Duration::ZERO))
        );
    }
}
