//! The programs in the real kernel: two network namespaces joined by a veth
//! pair ("pod" 10.231.0.2 and "peer" 10.231.0.1), the node's hooks on the
//! cgroup v2 root and the pod's inbound program, all pinned under a pin
//! directory of the test's own and removed at the end (also on failure).
//! Needs root; fails (not skips) under CI.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::layout::SpliceKey;
use crate::{
    install_pod, is_node_installed, is_pod_installed, register_inbound_listener, uninstall_node, uninstall_pod,
    PodSettings,
};

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
const ZTUNNEL_MARK: u32 = 0x400;

/// The lab: namespaces and pins, removed on drop.
struct Lab {
    pod: String,
    peer: String,
    root: PathBuf,
    // One lab at a time: a test counts the kernel's links of Ambit's programs.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Lab {
    fn new() -> Option<Lab> {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "the eBPF kernel test needs root under CI");
            eprintln!("skipping: needs root");
            return None;
        }
        // Unique per test: the tests of this process run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 100000);
        let lab = Lab {
            pod: format!("ambit-ebpf-pod-{id}"),
            peer: format!("ambit-ebpf-peer-{id}"),
            root: PathBuf::from(format!("/sys/fs/bpf/ambit-test-{id}")),
            _serial: SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
        };
        ip(&["netns", "add", &lab.pod]);
        ip(&["netns", "add", &lab.peer]);
        let (p, q) = (format!("ae{id}"), format!("aq{id}"));
        ip(&["link", "add", &p, "netns", &lab.pod, "type", "veth", "peer", "name", &q, "netns", &lab.peer]);
        for (ns, dev, addr) in [(&lab.pod, &p, POD_IP), (&lab.peer, &q, PEER_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Some(lab)
    }

    fn pod_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.pod)
    }

    /// Runs `f` on a thread inside namespace `ns`.
    fn within<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = Path::new("/var/run/netns").join(ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = uninstall_node(&self.root) {
            eprintln!("cleanup: {e}");
        }
        // (A test may have deleted the pod's namespace itself.)
        let _ = Command::new("ip").args(["netns", "del", &self.pod]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.peer]).output();
    }
}

fn settings() -> PodSettings {
    PodSettings {
        outbound_port: 15001,
        hbone_port: 15008,
        ztunnel_mark: ZTUNNEL_MARK,
        return_mark: 0x200,
        probe_source: None,
        excluded_ports: vec![9090],
        splice: false,
    }
}

fn spliced() -> PodSettings {
    PodSettings { splice: true, ..settings() }
}

fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let sin = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(SocketAddr::new(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(), u16::from_be(sin.sin_port)))
}

/// The links of programs named `ambit_*`, as the kernel lists them.
fn links_of_ours() -> Vec<String> {
    let bpftool = |what| {
        let out = Command::new("bpftool").args([what, "show"]).output().expect("run bpftool");
        assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // "<id>: <type>  name <name>  tag ..." and "<id>: <type>  prog <prog id>".
    let ours: Vec<String> = bpftool("prog")
        .lines()
        .filter(|l| l.contains(" name ambit_"))
        .filter_map(|l| l.split(':').next().map(str::to_string))
        .collect();
    bpftool("link")
        .lines()
        .filter(|l| {
            l.split_whitespace().skip_while(|w| *w != "prog").nth(1).is_some_and(|id| ours.iter().any(|o| o == id))
        })
        .map(str::to_string)
        .collect()
}

fn accept_one(l: &TcpListener) -> TcpStream {
    l.set_nonblocking(false).unwrap();
    let (s, _) = l.accept().expect("accept");
    s
}

#[test]
fn capture_redirects_outbound_steers_inbound_and_detaches_leaving_nothing() {
    let Some(lab) = Lab::new() else { return };
    let before = links_of_ours().len();
    install_pod(&lab.root, &lab.pod_path(), &settings()).expect("install");
    install_pod(&lab.root, &lab.pod_path(), &settings()).expect("install again (idempotent)");
    assert!(is_node_installed(&lab.root));
    assert!(is_pod_installed(&lab.root, &lab.pod_path()).unwrap());
    assert_eq!(
        links_of_ours().len(),
        before + 6,
        "five node hooks and one sk_lookup, each once: {:?}",
        links_of_ours()
    );

    // ztunnel's listeners in the pod, and a server on the peer.
    let (outbound, plaintext, hbone) = lab.within(&lab.pod, || {
        let b = |port| TcpListener::bind(("0.0.0.0", port)).expect("bind");
        (b(15001), b(15006), b(15008))
    });
    let peer_server = lab.within(&lab.peer, || TcpListener::bind((PEER_IP, 9000)).expect("bind peer"));

    // Outbound: the application's connect() reaches 15001 from the pod's IP; SO_ORIGINAL_DST says where it was going.
    let client =
        lab.within(&lab.pod, || TcpStream::connect((Ipv4Addr::new(10, 99, 0, 7), 80)).expect("redirected connect"));
    let accepted = accept_one(&outbound);
    assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
    assert_eq!(accepted.peer_addr().unwrap().ip(), POD_IP, "ztunnel sees the pod's IP");
    assert_eq!(original_dst(&accepted).unwrap(), "10.99.0.7:80".parse().unwrap());

    // ztunnel's own (marked) socket is not redirected: it reaches the peer.
    lab.within(&lab.pod, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_mark(ZTUNNEL_MARK).unwrap();
        s.connect(&SocketAddr::from((PEER_IP, 9000)).into()).expect("marked connect");
    });
    accept_one(&peer_server);

    // Inbound: refused while ztunnel has not registered its listener (nothing reaches the app around it).
    let connect_from_peer = |port| {
        lab.within(&lab.peer, || TcpStream::connect_timeout(&SocketAddr::from((POD_IP, port)), Duration::from_secs(2)))
    };
    let app = lab.within(&lab.pod, || TcpListener::bind((POD_IP, 8080)).expect("bind app"));
    assert!(connect_from_peer(8080).is_err(), "refused before ztunnel registers");
    assert!(register_inbound_listener(&lab.root, &plaintext).unwrap());
    let mut from_peer = connect_from_peer(8080).expect("steered connect");
    let mut steered = accept_one(&plaintext);
    assert_eq!(
        steered.local_addr().unwrap(),
        SocketAddr::from((POD_IP, 8080)),
        "the original destination is the local address"
    );
    from_peer.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    steered.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    // ztunnel reaching the application as the client (a transparent socket bound to the client's address,
    // carrying its mark) gets to the application, and the application's replies come back to it: the
    // return mark routes them locally (the routing the capture library installs, set up by hand here).
    ip(&["-n", &lab.pod, "rule", "add", "fwmark", "0x200/0x200", "lookup", "133"]);
    ip(&["-n", &lab.pod, "route", "add", "local", "default", "dev", "lo", "table", "133"]);
    lab.within(&lab.pod, || std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1").expect("sysctl"));
    let spoofed = lab.within(&lab.pod, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_mark(ZTUNNEL_MARK).unwrap();
        s.set_ip_transparent(true).unwrap();
        s.bind(&SocketAddr::from((Ipv4Addr::new(10, 77, 0, 9), 0)).into()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect_timeout(&SocketAddr::from((POD_IP, 8080)).into(), Duration::from_secs(2)).map(|()| TcpStream::from(s))
    });
    let mut spoofed = spoofed.expect("ztunnel's connection to the app as the client");
    let mut at_app = accept_one(&app);
    assert_eq!(at_app.peer_addr().unwrap().ip(), Ipv4Addr::new(10, 77, 0, 9), "the app sees the client's address");
    at_app.write_all(b"pong").unwrap();
    spoofed.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    // The application reaching its own address is not captured either.
    lab.within(&lab.pod, || TcpStream::connect((POD_IP, 8080)).expect("app to itself"));
    accept_one(&app);
    // HBONE and excluded ports take the kernel's own lookup.
    connect_from_peer(15008).expect("hbone");
    accept_one(&hbone);
    let excluded = lab.within(&lab.pod, || TcpListener::bind((POD_IP, 9090)).expect("bind excluded"));
    connect_from_peer(9090).expect("excluded port");
    accept_one(&excluded);
    drop(app);

    // Removal detaches everything; a pod not captured registers nothing.
    assert!(uninstall_pod(&lab.root, &lab.pod_path()).expect("uninstall pod"), "it was installed");
    assert!(!uninstall_pod(&lab.root, &lab.pod_path()).expect("uninstalling again is harmless"));
    assert!(!is_pod_installed(&lab.root, &lab.pod_path()).unwrap());
    assert!(!register_inbound_listener(&lab.root, &plaintext).unwrap());
    let client = lab.within(&lab.pod, || {
        TcpStream::connect_timeout(&SocketAddr::from((PEER_IP, 9000)), Duration::from_secs(2)).expect("plain connect")
    });
    assert_eq!(client.peer_addr().unwrap(), SocketAddr::from((PEER_IP, 9000)));
    uninstall_node(&lab.root).expect("uninstall node");
    assert!(!lab.root.exists(), "pins removed");
    assert_eq!(links_of_ours().len(), before, "no link left: {:?}", links_of_ours());
}

/// Bytes received on the loopback interface of the calling thread's namespace.
fn loopback_rx_bytes() -> u64 {
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").expect("read net/dev");
    let line = dev.lines().find(|l| l.trim_start().starts_with("lo:")).expect("lo in net/dev");
    line.split_once(':').unwrap().1.split_whitespace().next().unwrap().parse().unwrap()
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// `read`, again when a blocking socket says EAGAIN: a socket in a sockmap
/// can (the kernel's tcp_bpf wakes a blocked reader with nothing to read,
/// e.g. on a state change), which is why the splice is off by default.
fn read_retrying(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
            other => return other,
        }
    }
}

fn read_exact_retrying(s: &mut TcpStream, buf: &mut [u8]) {
    let mut n = 0;
    while n < buf.len() {
        let got = read_retrying(s, &mut buf[n..]).expect("read");
        assert!(got > 0, "closed after {n} of {} bytes", buf.len());
        n += got;
    }
}

/// Sends `len` bytes of a pattern from `from` to `to` in 1 MiB blocks, each
/// acknowledged before the next (so the reader keeps up and the splice's
/// bound is never reached), and checks every byte.
fn transfer(mut from: TcpStream, mut to: TcpStream, len: usize) {
    const BLOCK: usize = 1 << 20;
    let writer = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < len {
            let chunk: Vec<u8> = (sent..(sent + BLOCK).min(len)).map(pattern).collect();
            from.write_all(&chunk).expect("send");
            sent += chunk.len();
            assert_eq!(read_retrying(&mut from, &mut [0u8; 1]).expect("ack"), 1, "no ack");
        }
        from
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < len {
        let n = read_retrying(&mut to, &mut buf[..(BLOCK - got % BLOCK).min(64 * 1024)]).expect("receive");
        assert!(n > 0, "closed after {got} of {len} bytes");
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pattern(got + i), "byte {} differs", got + i);
        }
        got += n;
        if got % BLOCK == 0 || got == len {
            to.write_all(b"k").expect("ack");
        }
    }
    writer.join().expect("writer");
}

#[test]
fn splice_moves_pod_local_bytes_off_loopback_byte_exact_and_can_be_turned_off() {
    let Some(lab) = Lab::new() else { return };
    const LEN: usize = 64 << 20;
    install_pod(&lab.root, &lab.pod_path(), &spliced()).expect("install");
    let outbound = lab.within(&lab.pod, || TcpListener::bind(("0.0.0.0", 15001)).expect("bind"));
    let app = lab.within(&lab.pod, || TcpListener::bind((POD_IP, 8080)).expect("bind app"));
    ip(&["-n", &lab.pod, "rule", "add", "fwmark", "0x200/0x200", "lookup", "133"]);
    ip(&["-n", &lab.pod, "route", "add", "local", "default", "dev", "lo", "table", "133"]);
    lab.within(&lab.pod, || std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1").expect("sysctl"));

    // Both pod-local legs, both ways: the application's redirected connection to ztunnel's outbound listener,
    // and ztunnel reaching the application as a client. Returns what crossed loopback.
    let both_legs = || {
        let before = lab.within(&lab.pod, loopback_rx_bytes);
        let client = lab.within(&lab.pod, || TcpStream::connect((Ipv4Addr::new(10, 99, 0, 7), 80)).expect("connect"));
        let accepted = accept_one(&outbound);
        transfer(client.try_clone().unwrap(), accepted.try_clone().unwrap(), LEN);
        transfer(accepted, client, LEN);
        let spoofed = lab.within(&lab.pod, || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_mark(ZTUNNEL_MARK).unwrap();
            s.set_ip_transparent(true).unwrap();
            s.bind(&SocketAddr::from((Ipv4Addr::new(10, 77, 0, 9), 0)).into()).unwrap();
            s.connect(&SocketAddr::from((POD_IP, 8080)).into()).expect("ztunnel to the app");
            TcpStream::from(s)
        });
        let at_app = accept_one(&app);
        transfer(spoofed.try_clone().unwrap(), at_app.try_clone().unwrap(), LEN);
        transfer(at_app, spoofed, LEN);
        lab.within(&lab.pod, loopback_rx_bytes) - before
    };

    let spliced = both_legs();
    assert!(spliced < (LEN as u64) / 16, "4 × {LEN} bytes spliced, yet {spliced} bytes crossed loopback");
    // The four spliced sockets are closed: their psocks are forgotten.
    let psocks = || {
        let map: aya::maps::HashMap<aya::maps::MapData, SpliceKey, u64> =
            crate::pod::open_pinned(&lab.root.join("maps/ambit_splice_psock"), "ambit_splice_psock").unwrap();
        map.keys().count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while psocks() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(psocks(), 0, "closed sockets left in the psock map");
    install_pod(&lab.root, &lab.pod_path(), &settings()).expect("reinstall without the splice");
    let not_spliced = both_legs();
    assert!(not_spliced > 4 * LEN as u64, "without the splice, loopback carries the bytes: {not_spliced}");
}

/// The pod captured with the splice, and an application's redirected
/// connection to ztunnel's outbound listener: (application, ztunnel) ends.
fn spliced_outbound_leg(lab: &Lab) -> (TcpStream, TcpStream) {
    install_pod(&lab.root, &lab.pod_path(), &spliced()).expect("install");
    let outbound = lab.within(&lab.pod, || TcpListener::bind(("0.0.0.0", 15001)).expect("bind"));
    let client = lab.within(&lab.pod, || TcpStream::connect((Ipv4Addr::new(10, 99, 0, 7), 80)).expect("connect"));
    (client, accept_one(&outbound))
}

#[test]
fn a_spliced_receiver_that_does_not_read_holds_the_sender_back_loses_nothing_and_splices_again_once_caught_up() {
    let Some(lab) = Lab::new() else { return };
    let (mut client, mut accepted) = spliced_outbound_leg(&lab);
    let before = lab.within(&lab.pod, loopback_rx_bytes);
    client.set_nonblocking(true).unwrap();
    let chunk: Vec<u8> = (0..128 * 1024).map(pattern).collect();
    let mut sent = 0usize;
    while sent < 1 << 30 {
        let off = sent % 251;
        match client.write(&chunk[off..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("send: {e}"),
        }
    }
    assert!(sent < 64 << 20, "the sender was not held back: {sent} bytes queued for a receiver that does not read");
    assert!(lab.within(&lab.pod, loopback_rx_bytes) - before < (sent as u64) / 4, "not spliced");
    client.set_nonblocking(false).unwrap();
    let mut got = vec![0u8; sent];
    read_exact_retrying(&mut accepted, &mut got);
    assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)), "bytes out of order or corrupted");
    // Caught up: sends are spliced again.
    let before = lab.within(&lab.pod, loopback_rx_bytes);
    transfer(client, accepted, 64 << 20);
    let carried = lab.within(&lab.pod, loopback_rx_bytes) - before;
    assert!(carried < 4 << 20, "not spliced again once the reader caught up: {carried} bytes on loopback");
}

#[test]
fn the_capture_of_a_vanished_namespace_is_released_at_the_next_install() {
    let Some(lab) = Lab::new() else { return };
    install_pod(&lab.root, &lab.pod_path(), &settings()).expect("install");
    let cookie = crate::netns::inspect_netns(&lab.pod_path()).unwrap().cookie;
    let dir = crate::pins::pod_dir(&lab.root, cookie);
    let link = dir.join("sk_lookup");
    assert!(crate::link::netns_link_attached(&link).unwrap());
    // The pod is deleted without its capture being removed; the kernel detaches its link once the namespace is
    // cleaned up (asynchronously).
    ip(&["netns", "del", &lab.pod]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while crate::link::netns_link_attached(&link).unwrap() {
        assert!(std::time::Instant::now() < deadline, "the link of a deleted namespace stays attached");
        std::thread::sleep(Duration::from_millis(50));
    }
    install_pod(&lab.root, &Path::new("/var/run/netns").join(&lab.peer), &settings()).expect("install another pod");
    assert!(!dir.exists(), "the vanished pod's pins are left");
    let enrolled: aya::maps::HashMap<aya::maps::MapData, u64, crate::layout::NetnsConfig> =
        crate::pod::open_pinned(&lab.root.join("maps/ambit_enrolled"), "ambit_enrolled").unwrap();
    assert!(enrolled.get(&cookie, 0).is_err(), "the vanished pod is still enrolled");
    assert_eq!(crate::prune_vanished_pods(&lab.root).unwrap(), 0, "nothing more to prune");
}

#[test]
fn a_gigabyte_from_a_writer_faster_than_its_reader_moves_between_splice_and_tcp_byte_exact_and_half_closes() {
    let Some(lab) = Lab::new() else { return };
    let (mut client, mut accepted) = spliced_outbound_leg(&lab);
    let before = lab.within(&lab.pod, loopback_rx_bytes);
    const LEN: usize = 1 << 30;
    // The reader, slower than the writer: it pauses every few MiB, so the writer goes past the splice's bound.
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 128 * 1024];
        let mut got = 0usize;
        loop {
            let n = read_retrying(&mut accepted, &mut buf).expect("read");
            if n == 0 {
                break;
            }
            assert!(buf[..n].iter().enumerate().all(|(i, b)| *b == pattern(got + i)), "bytes out of order near {got}");
            got += n;
            if got % (8 << 20) < n {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        accepted.write_all(&(got as u64).to_le_bytes()).expect("ack");
        got
    });
    let mut sent = 0;
    while sent < LEN {
        let chunk: Vec<u8> = (sent..sent + 128 * 1024).map(pattern).collect();
        client.write_all(&chunk).unwrap_or_else(|e| panic!("write after {sent} bytes: {e}"));
        sent += chunk.len();
    }
    client.shutdown(std::net::Shutdown::Write).expect("half close");
    let mut ack = [0u8; 8];
    read_exact_retrying(&mut client, &mut ack);
    assert_eq!(reader.join().expect("reader"), LEN);
    assert_eq!(u64::from_le_bytes(ack), LEN as u64);
    let carried = lab.within(&lab.pod, loopback_rx_bytes) - before;
    assert!(carried < LEN as u64, "nothing spliced: {carried} bytes on loopback");
    assert!(carried > 4 << 20, "never went back to TCP: {carried} bytes on loopback");
}
