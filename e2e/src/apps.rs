//! Test applications that run inside lab namespaces: a TCP echo server, a byte sink that hashes what it receives,
//! a connect helper, and a deterministic payload generator with the same hash.
//!
//! The servers use one std thread per connection; their sockets are created inside the namespace and then served
//! from ordinary threads (a socket keeps its namespace for life).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::netns::NetNs;

/// Size of the read/write buffers of the sink and the pattern sender (bounded; no per-byte allocation).
const IO_BUF: usize = 256 * 1024;

/// A streaming 64-bit hash whose result does not depend on how the stream is split into chunks.
///
/// It mixes 8-byte little-endian words (so it runs at several GB/s — the sink must not be the bottleneck of a
/// throughput test), carrying up to 7 bytes between calls. Not cryptographic; it only has to catch corruption,
/// reordering and loss.
#[derive(Clone, Debug)]
pub struct StreamHash {
    state: u64,
    len: u64,
    tail: [u8; 8],
    tail_len: usize,
}

impl Default for StreamHash {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamHash {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;

    /// A hash of the empty stream so far.
    pub fn new() -> Self {
        StreamHash { state: 0x243F_6A88_85A3_08D3, len: 0, tail: [0; 8], tail_len: 0 }
    }

    /// Feeds the next bytes of the stream.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.tail));
            self.tail_len = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.mix(u64::from_le_bytes(w.try_into().expect("bug: chunks_exact(8) yields 8 bytes")));
        }
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    /// The number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash of everything fed so far (the length is mixed in, so a stream and its zero-padded copy differ).
    pub fn finish(&self) -> u64 {
        let mut h = self.clone();
        if h.tail_len > 0 {
            let mut last = [0u8; 8];
            last[..h.tail_len].copy_from_slice(&h.tail[..h.tail_len]);
            h.mix(u64::from_le_bytes(last));
        }
        h.mix(h.len);
        let mut x = h.state;
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^= x >> 33;
        x
    }

    #[inline]
    fn mix(&mut self, word: u64) {
        self.state = (self.state ^ word).wrapping_mul(Self::K).rotate_left(29);
    }
}

/// The hash of a whole buffer (same function as the streaming one).
pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h = StreamHash::new();
    h.update(data);
    h.finish()
}

/// A deterministic pseudo-random byte stream (xorshift64*), produced 8 bytes at a time.
#[derive(Clone, Debug)]
pub struct Pattern {
    state: u64,
}

impl Pattern {
    /// The stream for `seed` (any value; every seed gives a different stream).
    pub fn new(seed: u64) -> Self {
        // splitmix64 spreads neighbouring seeds apart; xorshift needs a non-zero state.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Pattern { state: if z == 0 { 0x5DEE_CE66_D1CE_4E5B } else { z } }
    }

    /// Fills `buf` with the next bytes; `buf.len()` must be a multiple of 8 except for the last call.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.state = x;
            let word = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Writes `n` bytes of the pattern for `seed` to `stream` and returns their [`StreamHash`]; does not close the
/// stream (call `shutdown(Write)` to end it).
pub fn send_pattern(stream: &mut TcpStream, n: u64, seed: u64) -> io::Result<u64> {
    let mut pattern = Pattern::new(seed);
    let mut hash = StreamHash::new();
    let mut buf = vec![0u8; IO_BUF];
    let mut left = n;
    while left > 0 {
        let len = left.min(IO_BUF as u64) as usize;
        pattern.fill(&mut buf[..len]);
        hash.update(&buf[..len]);
        stream.write_all(&buf[..len])?;
        left -= len as u64;
    }
    stream.flush()?;
    Ok(hash.finish())
}

/// The hash [`send_pattern`] returns for `(n, seed)`, computed without a socket.
pub fn pattern_hash(n: u64, seed: u64) -> u64 {
    let mut pattern = Pattern::new(seed);
    let mut hash = StreamHash::new();
    let mut buf = vec![0u8; IO_BUF];
    let mut left = n;
    while left > 0 {
        let len = left.min(IO_BUF as u64) as usize;
        pattern.fill(&mut buf[..len]);
        hash.update(&buf[..len]);
        left -= len as u64;
    }
    hash.finish()
}

/// Connects to `addr` from inside `netns` with a connect timeout; the stream can then be used from any thread.
pub fn connect(netns: &NetNs, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    netns.run(move || TcpStream::connect_timeout(&addr, timeout))
}

/// Binds a listener on `addr` inside `netns`.
fn listen(netns: &NetNs, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    netns.run(move || TcpListener::bind(addr)).with_context(|| format!("listen on {addr} in netns {}", netns.name()))
}

/// A listener's accept loop on its own thread; stops (and joins) on drop.
#[derive(Debug)]
struct Acceptor {
    listener: Arc<TcpListener>,
    local: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Calls `serve(stream, peer)` on a new thread for each accepted connection.
    fn start(
        listener: TcpListener,
        name: &str,
        serve: impl Fn(TcpStream, SocketAddr) + Send + Sync + Clone + 'static,
    ) -> anyhow::Result<Self> {
        let local = listener.local_addr()?;
        let listener = Arc::new(listener);
        let l = listener.clone();
        let conn_name = format!("{name}-conn");
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            // accept fails once Drop shuts the listener down.
            while let Ok((stream, peer)) = l.accept() {
                let serve = serve.clone();
                let spawned = std::thread::Builder::new().name(conn_name.clone()).spawn(move || serve(stream, peer));
                if let Err(e) = spawned {
                    eprintln!("{conn_name}: spawn: {e}");
                }
            }
        })?;
        Ok(Acceptor { listener, local, thread: Some(thread) })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        // shutdown() on a listening socket wakes a blocked accept() with an error on Linux.
        // SAFETY: the fd is owned by the listener, which outlives this call.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP echo server inside a namespace; records the peer address of every connection it accepted.
#[derive(Debug)]
pub struct EchoServer {
    acceptor: Acceptor,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl EchoServer {
    /// Listens on `addr` (port 0 picks one; see [`EchoServer::local_addr`]) inside `netns`.
    pub fn start(netns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = listen(netns, addr)?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let p = peers.clone();
        let acceptor = Acceptor::start(listener, "echo", move |mut stream, peer| {
            p.lock().expect("echo peers lock").push(peer);
            let mut buf = [0u8; 16 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        })?;
        Ok(EchoServer { acceptor, peers })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local
    }

    /// Peer addresses of the connections accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("echo peers lock").clone()
    }
}

/// What a [`SinkServer`] received on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The client's address as the sink saw it.
    pub peer: SocketAddr,
    /// Bytes read until end of stream.
    pub bytes: u64,
    /// [`StreamHash`] of those bytes.
    pub hash: u64,
    /// Time from accept to end of stream.
    pub elapsed: Duration,
}

/// A server that reads each connection to its end, hashing as it goes (nothing is buffered), and records
/// `(bytes, hash)` per finished connection.
#[derive(Debug)]
pub struct SinkServer {
    acceptor: Acceptor,
    done: Arc<(Mutex<Vec<Received>>, Condvar)>,
}

impl SinkServer {
    /// Listens on `addr` (port 0 picks one) inside `netns`.
    pub fn start(netns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = listen(netns, addr)?;
        let done = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let d = done.clone();
        let acceptor = Acceptor::start(listener, "sink", move |mut stream, peer| {
            let start = Instant::now();
            let mut hash = StreamHash::new();
            let mut buf = vec![0u8; IO_BUF];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => hash.update(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // A reset still counts as the end of this connection: the byte count shows the loss.
                    Err(_) => break,
                }
            }
            let rec = Received { peer, bytes: hash.len(), hash: hash.finish(), elapsed: start.elapsed() };
            let (lock, cv) = &*d;
            lock.lock().expect("sink lock").push(rec);
            cv.notify_all();
        })?;
        Ok(SinkServer { acceptor, done })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.acceptor.local
    }

    /// Waits until at least `n_conns` connections have ended and returns what each received (in the order they
    /// ended); fails after `timeout`, saying how many ended.
    pub fn wait_for(&self, n_conns: usize, timeout: Duration) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.done;
        let mut done = lock.lock().expect("sink lock");
        while done.len() < n_conns {
            let now = Instant::now();
            if now >= deadline {
                bail!("sink: {} of {n_conns} connections ended within {timeout:?}", done.len());
            }
            done = cv.wait_timeout(done, deadline - now).expect("sink lock").0;
        }
        Ok(done.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_hash_does_not_depend_on_chunking() {
        let mut data = vec![0u8; 1000];
        Pattern::new(7).fill(&mut data);
        let whole = hash_bytes(&data);
        for split in [1usize, 3, 7, 8, 9, 500, 999] {
            let mut h = StreamHash::new();
            for chunk in data.chunks(split) {
                h.update(chunk);
            }
            assert_eq!(h.finish(), whole, "split {split}");
        }
    }

    #[test]
    fn stream_hash_sees_a_flipped_byte_a_swap_and_a_trailing_zero() {
        let mut data = vec![0u8; 64];
        Pattern::new(1).fill(&mut data);
        let h = hash_bytes(&data);
        let mut flipped = data.clone();
        flipped[33] ^= 1;
        assert_ne!(hash_bytes(&flipped), h);
        let mut swapped = data.clone();
        swapped.swap(0, 8);
        assert_ne!(hash_bytes(&swapped), h);
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(hash_bytes(&longer), h);
    }

    #[test]
    fn pattern_is_deterministic_per_seed() {
        let (mut a, mut b, mut c) = ([0u8; 64], [0u8; 64], [0u8; 64]);
        Pattern::new(1).fill(&mut a);
        Pattern::new(1).fill(&mut b);
        Pattern::new(0).fill(&mut c);
        assert_eq!(a, b);
        assert_ne!(a, c, "neighbouring seeds give different streams");
        assert_eq!(pattern_hash(64, 1), hash_bytes(&a));
    }

    #[test]
    fn sink_receives_the_pattern_over_loopback() {
        if !crate::require_root("sink_receives_the_pattern_over_loopback") {
            return;
        }
        let ns = NetNs::create(&format!("apps-unit-sink-{}", std::process::id())).unwrap();
        let sink = SinkServer::start(&ns, "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut s = connect(&ns, sink.local_addr(), Duration::from_secs(2)).unwrap();
        let sent = send_pattern(&mut s, 1_000_003, 9).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let got = sink.wait_for(1, Duration::from_secs(10)).unwrap();
        assert_eq!((got[0].bytes, got[0].hash), (1_000_003, sent));
        assert_eq!(sent, pattern_hash(1_000_003, 9));
    }

    #[test]
    fn echo_server_echoes_and_records_the_peer() {
        if !crate::require_root("echo_server_echoes_and_records_the_peer") {
            return;
        }
        let ns = NetNs::create(&format!("apps-unit-echo-{}", std::process::id())).unwrap();
        let echo = EchoServer::start(&ns, "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut s = connect(&ns, echo.local_addr(), Duration::from_secs(2)).unwrap();
        s.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(echo.peers(), vec![s.local_addr().unwrap()]);
    }
}
