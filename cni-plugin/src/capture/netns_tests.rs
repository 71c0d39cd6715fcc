//! Capture tested in real network namespaces: a "pod" and a "peer" joined by
//! a veth pair (10.200.0.1/24 and 10.200.0.2/24), with real sockets opened
//! inside them on dedicated threads. These need root; when `CI` is set they
//! fail instead of skipping.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn};
use nix::sys::time::TimeVal;

use super::exec::run_in_netns;
use super::*;
use crate::test_support::root_available;

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const WAIT: Duration = Duration::from_secs(2);
/// How long we watch for a connection that must not arrive.
const QUIET: Duration = Duration::from_millis(300);

/// A named network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    fn new(test: &str, role: &str) -> Netns {
        let name = format!("ambit-{test}-{role}-{}", std::process::id());
        host_cmd("ip", &["netns", "add", &name]);
        let path = PathBuf::from("/var/run/netns").join(&name);
        let ns = Netns { name, path };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        run_in_netns(&self.path, "ip", args, None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn nft(&self, args: &[&str]) -> String {
        run_in_netns(&self.path, "nft", args, None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `f` on a new thread inside this namespace; sockets it creates
    /// stay in this namespace when used from other threads.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(&self.path).expect("open netns");
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            });
            handle.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let status = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("warning: could not delete netns {}: {status:?}", self.name);
        }
    }
}

fn host_cmd(program: &str, args: &[&str]) {
    let out =
        std::process::Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A pod and a peer namespace joined by a veth pair, with capture installed
/// in the pod.
struct Lab {
    pod: Netns,
    peer: Netns,
}

impl Lab {
    fn new(test: &str, cfg: &CaptureConfig) -> Lab {
        let lab = Lab { pod: Netns::new(test, "pod"), peer: Netns::new(test, "peer") };
        // Both ends are created inside their namespaces, so parallel tests
        // never collide on interface names in the host namespace.
        host_cmd(
            "ip",
            &[
                "link",
                "add",
                "name",
                "eth0",
                "netns",
                &lab.pod.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &lab.peer.name,
            ],
        );
        for (ns, ip) in [(&lab.pod, POD_IP), (&lab.peer, PEER_IP)] {
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        install(&lab.pod.path, cfg).expect("install capture");
        lab
    }
}

fn listen(addr: SocketAddrV4) -> TcpListener {
    TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

/// An `IP_TRANSPARENT` listener, as ztunnel's inbound plaintext one is.
fn transparent_listener(addr: SocketAddrV4) -> TcpListener {
    let fd = tcp_socket();
    socket::setsockopt(&fd, sockopt::IpTransparent, &true).expect("IP_TRANSPARENT");
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    socket::bind(raw(&fd), &SockaddrIn::from(addr)).expect("bind");
    socket::listen(&fd, Backlog::new(16).expect("backlog")).expect("listen");
    TcpListener::from(fd)
}

/// A socket as ztunnel opens one in a pod: carrying its mark, optionally
/// transparent and bound to someone else's address.
fn ztunnel_connect(mark: u32, bind: Option<SocketAddrV4>, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let fd = tcp_socket();
    socket::setsockopt(&fd, sockopt::Mark, &mark).expect("SO_MARK");
    // connect() honours the send timeout, so a dropped SYN cannot hang us.
    socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(2, 0)).expect("SO_SNDTIMEO");
    if let Some(local) = bind {
        socket::setsockopt(&fd, sockopt::IpTransparent, &true).expect("IP_TRANSPARENT");
        socket::bind(raw(&fd), &SockaddrIn::from(local)).expect("bind spoofed");
    }
    socket::connect(raw(&fd), &SockaddrIn::from(to)).map_err(std::io::Error::from)?;
    Ok(TcpStream::from(fd))
}

fn tcp_socket() -> OwnedFd {
    socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket")
}

fn raw(fd: &OwnedFd) -> std::os::fd::RawFd {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

fn connect(to: SocketAddrV4) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&to.into(), WAIT)
}

/// The next connection on `listener` within `wait`, or None.
fn accept_within(listener: &TcpListener, wait: Duration) -> Option<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).expect("blocking");
                stream.set_read_timeout(Some(WAIT)).expect("read timeout");
                return Some((stream, peer));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn original_dst(stream: &TcpStream) -> SocketAddrV4 {
    let sin = socket::getsockopt(stream, sockopt::OriginalDst).expect("SO_ORIGINAL_DST");
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)), u16::from_be(sin.sin_port))
}

fn count_lines(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn installing_twice_leaves_one_table_and_one_rule_and_uninstall_removes_them() {
    const T: &str = "twice";
    if !root_available(T) {
        return;
    }
    let pod = Netns::new(T, "pod");
    let cfg = CaptureConfig::default();
    install(&pod.path, &cfg).expect("first install");
    install(&pod.path, &cfg).expect("second install");

    assert!(is_installed(&pod.path, &CaptureConfig::default()).expect("is_installed"));
    assert_eq!(count_lines(&pod.nft(&["list", "tables"]), "table inet ambit"), 1);
    let table = pod.nft(&["list", "table", "inet", "ambit"]);
    assert_eq!(count_lines(&table, "redirect to :15001"), 1, "{table}");
    for family in ["-4", "-6"] {
        let rules = pod.ip(&[family, "rule", "list"]);
        assert_eq!(count_lines(&rules, "fwmark 0x200/0x200 lookup 133"), 1, "{rules}");
        let routes = pod.ip(&[family, "route", "show", "table", "133"]);
        assert_eq!(count_lines(&routes, "local default dev lo"), 1, "{routes}");
    }

    uninstall(&pod.path, &cfg).expect("uninstall");
    assert!(!is_installed(&pod.path, &CaptureConfig::default()).expect("is_installed"));
    assert_eq!(count_lines(&pod.nft(&["list", "tables"]), "ambit"), 0);
    for family in ["-4", "-6"] {
        assert_eq!(count_lines(&pod.ip(&[family, "rule", "list"]), "lookup 133"), 0);
        assert_eq!(pod.ip(&[family, "route", "show", "table", "133"]).trim(), "");
    }
    uninstall(&pod.path, &cfg).expect("uninstalling again is harmless");
}

#[test]
fn ztunnels_sockets_route_by_a_quickack_copy_of_the_pods_routes() {
    const T: &str = "quickack";
    if !root_available(T) {
        return;
    }
    let pod = Netns::new(T, "pod");
    // A pod's usual routes: its gateway on the link, and the default through
    // it. The peer end stays down, so `ip` prints them with `linkdown`,
    // which must not be copied as an argument.
    pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "peer0"]);
    pod.ip(&["addr", "add", "10.77.0.2/32", "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "10.77.0.1", "dev", "eth0", "scope", "link"]);
    pod.ip(&["route", "add", "default", "via", "10.77.0.1", "dev", "eth0"]);
    let cfg = CaptureConfig::default();
    install(&pod.path, &cfg).expect("first install");
    install(&pod.path, &cfg).expect("second install");

    let rules = pod.ip(&["-4", "rule", "list"]);
    assert_eq!(count_lines(&rules, "fwmark 0x400/0x400 lookup 134"), 1, "{rules}");
    let copy = pod.ip(&["-4", "route", "show", "table", "134"]);
    assert_eq!(count_lines(&copy, "quickack 1"), 2, "{copy}");
    assert_eq!(count_lines(&copy, "default via 10.77.0.1 dev eth0"), 1, "{copy}");
    // A socket with ztunnel's mark gets the quickack route; others the main one.
    let marked = pod.ip(&["-4", "route", "get", "10.9.9.9", "mark", "0x400"]);
    assert!(marked.contains("quickack 1") && marked.contains("table 134"), "{marked}");
    let unmarked = pod.ip(&["-4", "route", "get", "10.9.9.9"]);
    assert!(!unmarked.contains("quickack"), "{unmarked}");

    uninstall(&pod.path, &cfg).expect("uninstall");
    assert_eq!(count_lines(&pod.ip(&["-4", "rule", "list"]), "lookup 134"), 0);
    assert_eq!(pod.ip(&["-4", "route", "show", "table", "134"]).trim(), "");
    assert_eq!(count_lines(&pod.ip(&["-4", "route", "show"]), "default via 10.77.0.1"), 1, "the pod's own routes stay");
}

#[test]
fn install_works_in_a_namespace_with_ipv6_disabled() {
    const T: &str = "nov6";
    if !root_available(T) {
        return;
    }
    let pod = Netns::new(T, "pod");
    pod.run(|| {
        for key in ["all", "default", "lo"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6"), "1").expect("disable ipv6");
        }
    });
    let cfg = CaptureConfig::default();
    install(&pod.path, &cfg).expect("install without IPv6");
    assert!(is_installed(&pod.path, &CaptureConfig::default()).expect("is_installed"));
    uninstall(&pod.path, &cfg).expect("uninstall without IPv6");
}

#[test]
fn outbound_tcp_lands_on_the_outbound_port_with_its_original_destination() {
    const T: &str = "outbound";
    if !root_available(T) {
        return;
    }
    let lab = Lab::new(T, &CaptureConfig::default());
    assert_outbound_lands_on_15001(&lab);
}

/// The pod's connection to the peer's port 80 reaches 15001 in the pod from
/// the app's address, with its original destination; the peer never sees it.
/// Returns the peer's listener.
fn assert_outbound_lands_on_15001(lab: &Lab) -> TcpListener {
    let peer_addr = SocketAddrV4::new(PEER_IP, 80);
    let peer_app = lab.peer.run(|| listen(peer_addr));
    let (outbound, app) = lab.pod.run(|| {
        let outbound = listen(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15001));
        (outbound, connect(peer_addr).expect("connect to the peer"))
    });
    let (accepted, from) = accept_within(&outbound, WAIT).expect("redirected to 15001");
    assert_eq!(original_dst(&accepted), peer_addr);
    assert_eq!(from, app.local_addr().expect("local addr"));
    assert!(accept_within(&peer_app, QUIET).is_none(), "the peer must not see the captured connection");
    peer_app
}

#[test]
fn ztunnel_marked_outbound_tcp_is_not_redirected() {
    const T: &str = "outmark";
    if !root_available(T) {
        return;
    }
    let cfg = CaptureConfig::default();
    let lab = Lab::new(T, &cfg);
    let peer_addr = SocketAddrV4::new(PEER_IP, 80);
    let peer_app = lab.peer.run(|| listen(peer_addr));
    let (outbound, mut ztunnel) = lab.pod.run(|| {
        let outbound = listen(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15001));
        let conn = ztunnel_connect(cfg.ztunnel_mark, None, peer_addr).expect("marked connect");
        (outbound, conn)
    });

    let (mut accepted, from) = accept_within(&peer_app, WAIT).expect("the peer accepts directly");
    assert_eq!(from.ip(), POD_IP);
    assert!(accept_within(&outbound, QUIET).is_none(), "marked traffic must bypass 15001");
    // Replies come back through the pod's prerouting chain, which must let
    // an established connection through rather than tproxy it.
    accepted.write_all(b"hello").expect("peer writes");
    let mut buf = [0u8; 5];
    ztunnel.set_read_timeout(Some(WAIT)).expect("timeout");
    ztunnel.read_exact(&mut buf).expect("ztunnel reads the reply");
    assert_eq!(&buf, b"hello");
}

#[test]
fn inbound_tcp_is_tproxied_to_the_inbound_port_keeping_both_addresses() {
    const T: &str = "inbound";
    if !root_available(T) {
        return;
    }
    let lab = Lab::new(T, &CaptureConfig::default());
    let app_addr = SocketAddrV4::new(POD_IP, 8080);
    let (inbound, app) =
        lab.pod.run(|| (transparent_listener(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15006)), listen(app_addr)));
    let mut client = lab.peer.run(|| connect(app_addr).expect("connect to the pod"));

    let (mut accepted, from) = accept_within(&inbound, WAIT).expect("tproxied to 15006");
    assert_eq!(accepted.local_addr().expect("local addr"), SocketAddr::from(app_addr));
    assert_eq!(from.ip(), PEER_IP);
    assert!(accept_within(&app, QUIET).is_none(), "the app must not see it directly");
    client.write_all(b"ping").expect("client writes");
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).expect("ztunnel reads");
    assert_eq!(&buf, b"ping");
}

#[test]
fn inbound_tcp_is_dropped_when_nothing_listens_on_the_inbound_port() {
    const T: &str = "closed";
    if !root_available(T) {
        return;
    }
    let lab = Lab::new(T, &CaptureConfig::default());
    let app_addr = SocketAddrV4::new(POD_IP, 8080);
    let app = lab.pod.run(|| listen(app_addr));
    let attempt = lab.peer.run(|| TcpStream::connect_timeout(&app_addr.into(), Duration::from_millis(500)));
    assert!(attempt.is_err(), "connected around ztunnel: {attempt:?}");
    assert!(accept_within(&app, QUIET).is_none(), "the app must not be reachable around ztunnel");
}

#[test]
fn ztunnel_spoofing_the_client_gets_the_apps_replies() {
    const T: &str = "spoof";
    if !root_available(T) {
        return;
    }
    let cfg = CaptureConfig::default();
    let lab = Lab::new(T, &cfg);
    let app_addr = SocketAddrV4::new(POD_IP, 9090);
    let (app, mut ztunnel) = lab.pod.run(|| {
        let app = listen(app_addr);
        let spoofed = SocketAddrV4::new(PEER_IP, 0);
        let conn = ztunnel_connect(cfg.ztunnel_mark, Some(spoofed), app_addr).expect("spoofed connect");
        (app, conn)
    });

    let (mut served, from) = accept_within(&app, WAIT).expect("the app accepts");
    assert_eq!(from.ip(), PEER_IP, "the app sees the original client");
    ztunnel.set_read_timeout(Some(WAIT)).expect("timeout");
    ztunnel.write_all(b"ping").expect("ztunnel writes");
    let mut buf = [0u8; 4];
    served.read_exact(&mut buf).expect("app reads");
    assert_eq!(&buf, b"ping");
    served.write_all(b"pong").expect("app echoes");
    ztunnel.read_exact(&mut buf).expect("ztunnel reads the reply");
    assert_eq!(&buf, b"pong");
}

#[test]
fn hbone_port_is_reached_directly_not_tproxied() {
    const T: &str = "hbone";
    if !root_available(T) {
        return;
    }
    let lab = Lab::new(T, &CaptureConfig::default());
    let hbone_addr = SocketAddrV4::new(POD_IP, 15008);
    let (inbound, hbone) = lab.pod.run(|| {
        (
            transparent_listener(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15006)),
            listen(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15008)),
        )
    });
    let _client = lab.peer.run(|| connect(hbone_addr).expect("connect to HBONE"));

    let (accepted, from) = accept_within(&hbone, WAIT).expect("the HBONE listener accepts");
    assert_eq!(from.ip(), PEER_IP);
    assert_eq!(accepted.local_addr().expect("local addr"), SocketAddr::from(hbone_addr));
    assert!(accept_within(&inbound, QUIET).is_none(), "HBONE must not be tproxied");
}

#[test]
fn excluded_inbound_port_reaches_the_app_directly() {
    const T: &str = "exclude";
    if !root_available(T) {
        return;
    }
    let cfg = CaptureConfig { exclude_inbound_ports: vec![8081], ..Default::default() };
    let lab = Lab::new(T, &cfg);
    let probe_addr = SocketAddrV4::new(POD_IP, 8081);
    let (inbound, app) =
        lab.pod.run(|| (transparent_listener(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 15006)), listen(probe_addr)));
    let _client = lab.peer.run(|| connect(probe_addr).expect("connect to the probe port"));

    assert!(accept_within(&app, WAIT).is_some(), "the app accepts on its excluded port");
    assert!(accept_within(&inbound, QUIET).is_none(), "excluded ports must not be tproxied");
}

#[test]
fn capture_can_be_installed_through_a_proc_pid_namespace_path() {
    const T: &str = "procpath";
    if !root_available(T) {
        return;
    }
    let pod = Netns::new(T, "pod");
    // A thread that sits in the namespace gives it a /proc/<pid>/task path,
    // as a CNI runtime hands over /proc/<pid>/ns/net.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let file = File::open(&pod.path).expect("open netns");
    let holder = std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        tid_tx.send(nix::unistd::gettid()).expect("send tid");
        let _ = done_rx.recv();
    });
    let tid = tid_rx.recv().expect("tid");
    let proc_path = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
    let result = install(Path::new(&proc_path), &CaptureConfig::default());
    drop(done_tx);
    holder.join().expect("holder thread");
    result.expect("install via /proc path");
    assert!(is_installed(&pod.path, &CaptureConfig::default()).expect("is_installed"));
}

#[test]
fn node_probes_are_snatted_to_the_probe_source_and_bypass_capture() {
    if !root_available("node_probes_are_snatted") {
        return;
    }
    // The peer plays the node: its address is local there, and the pod
    // routes replies to the probe source back through it.
    let lab = Lab::new("probe", &CaptureConfig::default());
    lab.pod.ip(&["route", "add", "default", "via", &PEER_IP.to_string()]);
    let app = SocketAddrV4::new(POD_IP, 8080);
    let listener = lab.pod.run(|| listen(app));

    // Without the node's SNAT the probe is captured, and with no ztunnel
    // listening it is dropped.
    let refused = lab.peer.run(|| TcpStream::connect_timeout(&app.into(), QUIET));
    assert!(refused.is_err(), "uncaptured probe reached the app");

    let snat = NodeProbeSnat::new(vec!["10.200.0.0/24".parse().unwrap()]);
    install_node_probe_snat(&lab.peer.path, &snat).expect("install node SNAT");
    install_node_probe_snat(&lab.peer.path, &snat).expect("install node SNAT twice");
    assert_eq!(count_lines(&lab.peer.nft(&["list", "ruleset"]), "snat ip to 169.254.7.127"), 1);
    let probe = lab.peer.run(|| TcpStream::connect_timeout(&app.into(), WAIT));
    probe.expect("probe from the node reaches the app");
    let (_conn, from) = accept_within(&listener, WAIT).expect("app accepts the probe");
    assert_eq!(from.ip(), std::net::IpAddr::from(Ipv4Addr::new(169, 254, 7, 127)));

    uninstall_node_probe_snat(&lab.peer.path).expect("uninstall");
    uninstall_node_probe_snat(&lab.peer.path).expect("uninstall twice");
    assert!(!lab.peer.nft(&["list", "tables"]).contains("ambit-node"));
}

#[test]
fn set_sysctl_writes_the_pods_namespace_only() {
    if !root_available("set_sysctl_writes_the_pods_namespace_only") {
        return;
    }
    let ns = Netns::new("sysctl", "pod");
    set_sysctl(&ns.path, "net/ipv4/ip_forward", "1").expect("sysctl");
    let inside = ns.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap());
    assert_eq!(inside.trim(), "1");
    let missing = set_sysctl(&ns.path, "net/ipv4/no_such_sysctl", "1").expect_err("missing sysctl");
    assert!(missing.is_missing(), "{missing}");
}

/// A bpffs pin directory of the test's own, with everything in it detached and removed on drop.
struct BpfPins(PathBuf);

impl Drop for BpfPins {
    fn drop(&mut self) {
        if let Err(e) = ambit_ebpf::uninstall_node(&self.0) {
            eprintln!("warning: could not remove eBPF capture under {}: {e}", self.0.display());
        }
    }
}

#[test]
fn switching_a_pod_between_nftables_and_ebpf_capture_replaces_one_with_the_other_and_uninstall_removes_both() {
    const T: &str = "ebpf";
    if !root_available(T) {
        return;
    }
    let lab = Lab::new(T, &CaptureConfig::default());
    let pins = BpfPins(PathBuf::from(format!("/sys/fs/bpf/ambit-cni-test-{}", std::process::id())));
    let ebpf = CaptureConfig { mode: CaptureMode::Ebpf, bpf_pin_root: pins.0.clone(), ..CaptureConfig::default() };
    install(&lab.pod.path, &ebpf).expect("install eBPF capture");
    assert!(is_installed(&lab.pod.path, &ebpf).expect("is_installed"));
    assert!(
        !is_installed(&lab.pod.path, &CaptureConfig::default()).expect("is_installed"),
        "the nftables table is gone"
    );
    let marks = || {
        lab.pod.run(|| {
            ["tcp_fwmark_accept", "fwmark_reflect"]
                .map(|k| std::fs::read_to_string(format!("/proc/sys/net/ipv4/{k}")).expect("sysctl").trim().to_owned())
        })
    };
    assert_eq!(
        marks(),
        ["1", "1"],
        "the app's and the kernel's replies to ztunnel's spoofed connections take its mark"
    );

    // Outbound lands on 15001 with its original destination, as with nftables.
    let peer_app = assert_outbound_lands_on_15001(&lab);
    let peer_addr = SocketAddrV4::new(PEER_IP, 80);

    // Back to nftables: the eBPF capture and its sysctl go (left on, the app's sockets would take ztunnel's mark).
    install(&lab.pod.path, &CaptureConfig { mode: CaptureMode::Nftables, ..ebpf.clone() }).expect("back to nftables");
    assert!(!is_installed(&lab.pod.path, &ebpf).expect("is_installed"));
    assert!(is_installed(&lab.pod.path, &CaptureConfig::default()).expect("is_installed"));
    assert_eq!(marks(), ["0", "0"]);
    install(&lab.pod.path, &ebpf).expect("eBPF again");
    uninstall(&lab.pod.path, &ebpf).expect("uninstall");
    assert!(!is_installed(&lab.pod.path, &ebpf).expect("is_installed"));
    assert!(!is_installed(&lab.pod.path, &CaptureConfig::default()).expect("is_installed"));
    assert_eq!(marks(), ["0", "0"]);
    let direct = lab.pod.run(|| connect(peer_addr).expect("connect uncaptured"));
    assert_eq!(direct.peer_addr().expect("peer"), SocketAddr::V4(peer_addr));
    assert!(accept_within(&peer_app, WAIT).is_some(), "uncaptured, the peer is reached directly");
    for family in ["-4", "-6"] {
        assert_eq!(count_lines(&lab.pod.ip(&[family, "rule", "list"]), "lookup 133"), 0);
    }
}
