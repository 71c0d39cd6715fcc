//! Data-plane worker threads, each running its own single-threaded tokio
//! runtime. A connection stays on the worker that accepted it: its relay,
//! the HTTP/2 connection it opens and the tasks of the streams it carries
//! all run on one thread, so moving a chunk of bytes never wakes another
//! thread and no work stealing bounces a busy connection between cores.
//! (With one multi-threaded runtime, on two cores, that bouncing cost about
//! a fifth of single-stream throughput and ~15 µs per request round trip.)
//! Connections are spread over the workers round robin.
//!
//! Busy polling: after the data path moves bytes ([`note_activity`]), a
//! worker keeps polling its sockets for a short window before it sleeps.
//! The answer to a request it has just forwarded then finds it awake: on a
//! virtual machine waking a sleeping core costs tens of microseconds, and a
//! request crosses four proxy wake-ups. It yields the core to any other
//! runnable thread while it polls, and spins only while there is traffic.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
    /// Bumped by the data path on every read or write.
    static ACTIVITY: Cell<u64> = const { Cell::new(0) };
    /// The busy poller, while it sleeps waiting for activity.
    static POLLER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// The worker threads of one proxy. They run until the process exits.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    /// Per worker: rounds of busy polling so far.
    polls: Vec<Arc<AtomicU64>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `n` (at least one) worker threads named `<name>-worker-<i>`,
    /// busy polling for `busy_poll` after activity (zero: never).
    pub fn start(name: &str, n: usize, busy_poll: Duration) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(n.max(1));
        let mut polls = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let rounds = Arc::new(AtomicU64::new(0));
            polls.push(rounds.clone());
            std::thread::Builder::new().name(format!("{name}-worker-{i}")).spawn(move || {
                CURRENT.with(|c| c.set(Some(i)));
                if busy_poll.is_zero() {
                    rt.block_on(std::future::pending::<()>());
                } else {
                    rt.block_on(busy_poll_after_activity(busy_poll, &rounds));
                }
            })?;
        }
        Ok(Workers { handles, polls, next: AtomicUsize::new(0) })
    }

    /// The index of the worker running the calling thread, if it is one.
    pub fn current() -> Option<usize> {
        CURRENT.with(Cell::get)
    }

    /// The worker that takes the next connection (round robin).
    pub fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }

    /// Runs `task` on worker `i`.
    pub fn spawn_on<F>(&self, i: usize, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[i].spawn(task)
    }

    /// Rounds of busy polling worker `i` has done (each a yield to its
    /// sockets while there was recent activity).
    pub fn busy_polls(&self, i: usize) -> u64 {
        self.polls[i].load(Ordering::Relaxed)
    }

    /// The runtime of worker `i`.
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i]
    }
}

/// Tells the calling worker that the data path just moved bytes. Cheap: a
/// thread-local counter, and a wake-up only when the poller sleeps.
pub fn note_activity() {
    ACTIVITY.with(|a| a.set(a.get().wrapping_add(1)));
    POLLER.with(|p| {
        if let Some(w) = p.borrow_mut().take() {
            w.wake();
        }
    });
}

/// How many times the calling thread noted activity (tests of the relays
/// built on it check that they note it).
pub fn activity_count() -> u64 {
    ACTIVITY.with(Cell::get)
}

/// Runs for ever on a worker: sleeps until there is activity, then keeps
/// the runtime polling (yielding to the scheduler, which polls the sockets
/// without blocking) until `window` passes without activity.
async fn busy_poll_after_activity(window: Duration, rounds: &AtomicU64) {
    let mut seen = ACTIVITY.with(Cell::get);
    loop {
        std::future::poll_fn(|cx| {
            let now = ACTIVITY.with(Cell::get);
            if now != seen {
                seen = now;
                return Poll::Ready(());
            }
            POLLER.with(|p| *p.borrow_mut() = Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        let mut deadline = Instant::now() + window;
        while Instant::now() < deadline {
            rounds.fetch_add(1, Ordering::Relaxed);
            tokio::task::yield_now().await;
            // Let any other runnable thread on this core go first.
            std::thread::yield_now();
            let now = ACTIVITY.with(Cell::get);
            if now != seen {
                seen = now;
                deadline = Instant::now() + window;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_worker_they_were_given_and_picks_go_round_robin() {
        let workers = Workers::start("test", 2, Duration::ZERO).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let on_1 = rt.block_on(workers.spawn_on(1, async { Workers::current() })).unwrap();
        let on_0 = rt.block_on(workers.spawn_on(0, async { Workers::current() })).unwrap();
        assert_eq!((on_1, on_0), (Some(1), Some(0)));
        assert_eq!(Workers::current(), None, "the caller is not a worker");
        let picks: Vec<usize> = (0..4).map(|_| workers.pick()).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
    }

    #[test]
    fn a_connection_handed_to_a_worker_is_served_there() {
        let workers = Workers::start("test", 2, Duration::ZERO).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let client = tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.unwrap();
                b[0]
            });
            let (s, _) = l.accept().await.unwrap();
            let std = s.into_std().unwrap();
            workers
                .spawn_on(1, async move {
                    use tokio::io::AsyncWriteExt;
                    let mut s = tokio::net::TcpStream::from_std(std).unwrap();
                    s.write_all(&[Workers::current().unwrap() as u8]).await.unwrap();
                })
                .await
                .unwrap();
            assert_eq!(client.await.unwrap(), 1);
        });
    }

    /// Counts rounds of busy polling, not CPU time: a loaded machine gives the worker less CPU, never fewer rounds
    /// while there is traffic, and no rounds once it stopped.
    #[test]
    fn a_worker_polls_only_while_there_is_activity() {
        let workers = Workers::start("test", 1, Duration::from_millis(1)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let idle_start = workers.busy_polls(0);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(workers.busy_polls(0), idle_start, "an idle worker polled");

        // Activity every 0.5 ms for 100 ms: the worker keeps polling in between.
        for _ in 0..200 {
            rt.block_on(workers.spawn_on(0, async { note_activity() })).unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
        let busy = workers.busy_polls(0) - idle_start;
        assert!(busy >= 20, "the worker did not poll after activity: {busy} rounds for 200 bursts");

        // And it stops once the traffic does (its 1 ms window long past).
        std::thread::sleep(Duration::from_millis(50));
        let after_start = workers.busy_polls(0);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(workers.busy_polls(0), after_start, "the worker kept polling without traffic");
    }
}
