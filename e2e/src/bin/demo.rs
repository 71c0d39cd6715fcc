//! The local demo mesh, run as a cluster runs it: the controller (xDS + CA)
//! reads the demo's Kubernetes objects, two nodes (network namespaces) each
//! run a ztunnel that takes its workloads, policies and certificates from it,
//! and four pods in the ambient namespace `demo` talk through HBONE with
//! mutual TLS. An AuthorizationPolicy lets only `frontend` reach `backend`,
//! so the `intruder` pod's requests are refused. Prints where to look at
//! metrics, the config dump and the logs. Usage: `demo [seconds] [--capture
//! nftables|ebpf]` (root); without a duration it runs until Ctrl-C, then
//! removes everything it made.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ambit_cni::capture::CaptureMode;
use ambit_e2e::apps::connect;
use ambit_e2e::objects::ServiceSpec;
use ambit_e2e::{Lab, Mesh, NetNs, PodSpec};
use anyhow::{bail, Context};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Only `frontend`'s identity may reach the backends.
const POLICY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-from-frontend, namespace: demo}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/demo/sa/frontend]}
";

fn main() -> anyhow::Result<()> {
    let (mut seconds, mut capture) = (None::<f64>, CaptureMode::Nftables);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--capture" => {
                capture = match args.next().as_deref() {
                    Some("nftables") => CaptureMode::Nftables,
                    Some("ebpf") => CaptureMode::Ebpf,
                    other => bail!("--capture takes nftables or ebpf, not {other:?}"),
                }
            }
            s => seconds = Some(s.parse().context("duration in seconds")?),
        }
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if !ambit_e2e::require_root("demo") {
        bail!("the demo builds network namespaces: run it as root");
    }

    let mut lab = Lab::new("demo")?;
    let n1 = lab.add_node("node1")?;
    let n2 = lab.add_node("node2")?;
    let backend = |name: &str| {
        let mut spec = PodSpec::new(name, "demo", "backend");
        spec.labels.insert("app".into(), "backend".into());
        spec
    };
    let frontend = lab.add_pod(n1, PodSpec::new("frontend", "demo", "frontend"))?;
    let intruder = lab.add_pod(n1, PodSpec::new("intruder", "demo", "intruder"))?;
    let v1 = lab.add_pod(n1, backend("backend-v1"))?;
    let v2 = lab.add_pod(n2, backend("backend-v2"))?;
    let ctrl = lab.add_external_host("controller")?;
    let mut mesh = Mesh::with_controller(lab, ctrl, &["demo"])?;
    mesh.start_all()?;
    mesh.capture_config_mut().mode = capture;
    for p in [frontend, intruder, v1, v2] {
        mesh.enroll(p)?;
    }
    let vip = Ipv4Addr::new(10, 96, 0, 20);
    mesh.add_service(ServiceSpec::new("backend", "demo", vip).port(80, 8080).select("app", "backend"))?;
    mesh.apply("policy.yaml", POLICY)?;
    let _servers: Vec<_> = [v1, v2]
        .iter()
        .map(|p| hello_server(&mesh.lab().pod(*p).netns, mesh.lab().pod(*p).name.clone()))
        .collect::<anyhow::Result<_>>()?;

    let node_ns = |n| mesh.lab().node(n).netns.path().display().to_string();
    let controller = mesh.controller().context("bug: controller mode")?;
    println!("Ambit demo mesh is up (lab directory {}):", mesh.lab().dir().display());
    println!("  controller (xDS + CA) reading {}", controller.cluster_dir().display());
    for p in mesh.lab().pods() {
        println!(
            "  pod {:<11} {}  on {}  identity spiffe://cluster.local/ns/{}/sa/{}",
            p.name,
            p.ip,
            mesh.lab().node(p.node).name,
            p.namespace,
            p.service_account
        );
    }
    println!("  service backend.demo.svc.cluster.local {vip}:80 -> backend-v1, backend-v2 :8080");
    println!("  policy: only sa/frontend may reach app=backend ({}/policy.yaml)", controller.cluster_dir().display());
    println!("Look at it while it runs:");
    println!("  metrics:      nsenter --net={} curl -s localhost:15020/metrics | grep istio_tcp", node_ns(n2));
    println!("  config dump:  nsenter --net={} curl -s localhost:15000/config_dump", node_ns(n1));
    println!("  logs:         {}/node1-ztunnel.log, node2-ztunnel.log", mesh.lab().dir().display());
    println!("Traffic to backend.demo:80 through ztunnel (HBONE + mTLS); Ctrl-C stops:");

    let start = Instant::now();
    let service = SocketAddr::from((vip, 80));
    let running = || !STOP.load(Ordering::Relaxed) && seconds.is_none_or(|s| start.elapsed().as_secs_f64() < s);
    while running() {
        // Two calls from frontend per round, so that the service's round robin shows both backends to each caller.
        for (who, pod) in [("frontend", frontend), ("frontend", frontend), ("intruder", intruder)] {
            match request(&mesh.lab().pod(pod).netns, service) {
                Ok(reply) if !reply.is_empty() => println!("  {who:<8} <- {reply}"),
                Ok(_) => println!("  {who:<8} <- refused (connection closed without a reply: denied by policy)"),
                Err(e) => println!("  {who:<8} <- refused ({e}: denied by policy)"),
            }
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    // A Ctrl-C at the terminal also reached the ztunnels and the controller (same process group): nothing
    // left to ask them.
    if !STOP.load(Ordering::Relaxed) {
        let m = mesh.ztunnel(n2).metrics()?;
        println!("node2 ztunnel metrics (istio_tcp_connections_opened_total):");
        for line in m.lines().filter(|l| l.starts_with("istio_tcp_connections_opened_total{")) {
            println!("  {line}");
        }
    }
    println!("stopping: removing the lab's namespaces and processes");
    Ok(())
}

fn request(ns: &NetNs, addr: SocketAddr) -> std::io::Result<String> {
    let mut s = connect(ns, addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"hello\n")?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok(reply.trim().to_owned())
}

/// Answers each connection with its own name and the client's address as
/// it sees it (the client pod's IP: ztunnel keeps the source address).
fn hello_server(ns: &NetNs, name: String) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let listener = ns.run(|| TcpListener::bind(("0.0.0.0", 8080)))?;
    Ok(std::thread::spawn(move || {
        while let Ok((mut s, peer)) = listener.accept() {
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            let _ = writeln!(s, "hello from {name}, you are {}", peer.ip());
        }
    }))
}
