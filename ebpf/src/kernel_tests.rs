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
}

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
        let id = std::process::id();
        let lab = Lab {
            pod: format!("ambit-ebpf-pod-{id}"),
            peer: format!("ambit-ebpf-peer-{id}"),
            root: PathBuf::from(format!("/sys/fs/bpf/ambit-test-{id}")),
        };
        ip(&["netns", "add", &lab.pod]);
        ip(&["netns", "add", &lab.peer]);
        let (p, q) = (format!("ae{}", id % 100000), format!("aq{}", id % 100000));
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
        let _ = Command::new("ip").args(["netns", "del", &self.pod]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.peer]).status();
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
    }
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
        before + 5,
        "four node hooks and one sk_lookup, each once: {:?}",
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
    uninstall_pod(&lab.root, &lab.pod_path()).expect("uninstall pod");
    uninstall_pod(&lab.root, &lab.pod_path()).expect("uninstalling again is harmless");
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
