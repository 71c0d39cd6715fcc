//! Load through the mesh while something changes under it (a ztunnel restart): a steady rate of new short
//! connections, each a request echoed back, counting the ones that fail; and long-lived streams that exchange a
//! message every 100 ms for a set time, each reporting whether it was cut.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::NetNs;

/// Generous: a connection that waits this long is counted failed, not slow.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Threads that open the new connections: one slow connection must not lower the rate.
const LOAD_THREADS: u32 = 8;

/// Failures whose text is kept (the count covers all).
const KEPT_ERRORS: usize = 20;

/// How often a long-lived stream exchanges a message.
const STREAM_PERIOD: Duration = Duration::from_millis(100);

/// What a [`Load`] saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub attempted: u64,
    pub failed: u64,
    /// The first failures: seconds since the load started, and what went wrong.
    pub errors: Vec<(f64, String)>,
    pub elapsed: Duration,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.attempted as f64 / self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "{} new connections in {:.1} s ({rate:.0}/s), {} failed",
            self.attempted,
            self.elapsed.as_secs_f64(),
            self.failed
        )?;
        for (at, e) in &self.errors {
            write!(f, "\n  at {at:.2} s: {e}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Counts {
    attempted: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<(f64, String)>>,
}

/// New connections from a namespace to an echo server at a steady rate, until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    threads: Vec<JoinHandle<()>>,
    start: Instant,
}

impl Load {
    /// Starts opening `per_second` connections a second from `src` to the echo server at `dst`; each sends a short
    /// request, reads the echo and closes.
    pub fn start(src: &NetNs, dst: SocketAddr, per_second: u32) -> Self {
        let (stop, counts, start) = (Arc::new(AtomicBool::new(false)), Arc::new(Counts::default()), Instant::now());
        let interval = Duration::from_secs_f64(f64::from(LOAD_THREADS) / f64::from(per_second.max(1)));
        let threads = (0..LOAD_THREADS)
            .map(|i| {
                let (ns, stop, counts) = (NetNs::borrowed(src.name()), stop.clone(), counts.clone());
                // Staggered so the threads' connections spread over each interval.
                let first = start + interval.mul_f64(f64::from(i) / f64::from(LOAD_THREADS));
                std::thread::spawn(move || ns.run(move || open_at_rate(dst, first, interval, &stop, &counts, start)))
            })
            .collect();
        Load { stop, counts, threads, start }
    }

    /// The counts so far.
    pub fn report(&self) -> LoadReport {
        LoadReport {
            attempted: self.counts.attempted.load(Ordering::Relaxed),
            failed: self.counts.failed.load(Ordering::Relaxed),
            errors: self.counts.errors.lock().expect("load errors lock").clone(),
            elapsed: self.start.elapsed(),
        }
    }

    /// Stops (letting connections in progress finish) and reports.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.report()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One load thread (inside the source namespace): a connection every `interval` from `first`, catching up
/// without sleeping when it falls behind.
fn open_at_rate(dst: SocketAddr, first: Instant, interval: Duration, stop: &AtomicBool, counts: &Counts, t0: Instant) {
    let mut next = first;
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += interval;
        n += 1;
        counts.attempted.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = request(dst, n) {
            counts.failed.fetch_add(1, Ordering::Relaxed);
            let mut errors = counts.errors.lock().expect("load errors lock");
            if errors.len() < KEPT_ERRORS {
                errors.push((t0.elapsed().as_secs_f64(), e.to_string()));
            }
        }
    }
}

/// One short connection: a request, its echo, a clean close.
fn request(dst: SocketAddr, n: u64) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let msg = format!("request {n:016}");
    s.write_all(msg.as_bytes())?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).map_err(|e| std::io::Error::new(e.kind(), format!("reading the echo: {e}")))?;
    if back != msg.as_bytes() {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// A connection that exchanges a message with an echo server every 100 ms for a set time, then closes.
pub struct LongStream {
    thread: JoinHandle<Result<u64, String>>,
}

impl LongStream {
    /// Connects from `src` to the echo server at `dst` and keeps the stream busy for `lifetime`.
    pub fn start(src: &NetNs, dst: SocketAddr, lifetime: Duration) -> std::io::Result<Self> {
        let mut s = crate::apps::connect(src, dst, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + lifetime;
            let mut exchanged = 0u64;
            while Instant::now() < end {
                let msg = format!("tick {exchanged:08}");
                s.write_all(msg.as_bytes()).map_err(|e| format!("cut after {exchanged} messages (write): {e}"))?;
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).map_err(|e| format!("cut after {exchanged} messages (read): {e}"))?;
                if back != msg.as_bytes() {
                    return Err(format!("echo mismatch after {exchanged} messages"));
                }
                exchanged += 1;
                std::thread::sleep(STREAM_PERIOD);
            }
            Ok(exchanged)
        });
        Ok(LongStream { thread })
    }

    /// Waits for it to end: the number of messages exchanged, or how it was cut.
    pub fn join(self) -> Result<u64, String> {
        self.thread.join().unwrap_or_else(|_| Err("the stream's thread panicked".into()))
    }
}
