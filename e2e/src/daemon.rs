//! A child process the lab harness owns (ztunnel, waypoint, controller, a benchmark's server) in a network
//! namespace, with its log file. Drop stops it: SIGTERM, [`STOP_GRACE`], then SIGKILL (this PID only); if the test
//! is failing (the thread is panicking) the last lines of its log are printed. Also: its local HTTP ports.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::netns::NetNs;
use crate::proc_stats;

/// How long Drop waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Lines of the log printed when a test fails while the process runs.
const LOG_TAIL_LINES: usize = 200;

/// How long a request to one of its local ports may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an exit is polled for.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// A running child process; see the module docs.
#[derive(Debug)]
pub struct Daemon {
    /// The program's name, in messages.
    name: &'static str,
    child: Child,
    /// Reaped: its PID may belong to another process now, so it is never signalled again.
    exited: bool,
    netns: NetNs,
    log_file: PathBuf,
    log_on_panic: bool,
}

impl Daemon {
    /// Owns `child`, started as `name` in `netns` with its output in `log_file`.
    pub fn new(name: &'static str, child: Child, netns: NetNs, log_file: PathBuf) -> Self {
        Daemon { name, child, exited: false, netns, log_file, log_on_panic: true }
    }

    /// The same, but Drop does not print the log when the test is failing.
    pub fn without_log_on_panic(mut self) -> Self {
        self.log_on_panic = false;
        self
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The namespace it runs in.
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// Its exit status if it exited (reaping it), `None` while it runs.
    pub fn try_exited(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        self.exited |= status.is_some();
        Ok(status)
    }

    /// Whether it is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        if !self.exited && matches!(self.child.try_wait(), Ok(Some(_))) {
            self.exited = true;
        }
        !self.exited
    }

    /// Sends SIGTERM without waiting (nothing once it exited).
    pub fn terminate(&mut self) {
        if !self.is_running() {
            return;
        }
        // SAFETY: signalling our own, not yet reaped child (its PID cannot have been reused).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
    }

    /// Waits up to `timeout` for it to exit: its exit status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exited()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(EXIT_POLL);
        }
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.exited = true;
    }

    /// SIGTERM, up to [`STOP_GRACE`] for it to exit, then SIGKILL.
    fn stop(&mut self) {
        self.terminate();
        match self.wait_exit(STOP_GRACE) {
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => {
                eprintln!("{} {} ignored SIGTERM for {STOP_GRACE:?}; killing it", self.name, self.pid());
                self.kill();
            }
        }
    }

    /// Waits until `GET /healthz/ready` at `addr` answers 200; fails early if the process exits. The error says
    /// why, without the log.
    pub fn wait_ready(&mut self, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exited()? {
                bail!("{} exited with {status} before it was ready", self.name);
            }
            let last = match readiness(&self.netns, addr) {
                Ok(()) => return Ok(()),
                Err(last) => last,
            };
            if Instant::now() >= deadline {
                bail!("{} not ready within {timeout:?} ({last})", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /healthz/ready` at `addr`: whether it answers 200.
    pub fn is_ready(&self, addr: SocketAddr) -> bool {
        readiness(&self.netns, addr).is_ok()
    }

    /// `GET <path>` at `addr` (a wildcard address means loopback): the body of a 200, else an error.
    pub fn get_ok(&self, addr: SocketAddr, path: &str) -> anyhow::Result<String> {
        let addr = local(addr);
        let r = crate::http::get(&self.netns, addr, path, HTTP_TIMEOUT)?;
        if r.status != 200 {
            bail!("GET {addr}{path}: status {}: {}", r.status, r.body.trim());
        }
        Ok(r.body)
    }

    /// Its whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_file, n)
    }

    /// User plus system CPU time so far, in seconds; 0 once it exited.
    pub fn cpu_seconds(&self) -> f64 {
        proc_stats::cpu_seconds(self.pid())
    }

    /// Resident set size now, in bytes; 0 once it exited.
    pub fn rss_bytes(&self) -> u64 {
        proc_stats::rss_bytes(self.pid())
    }

    /// Peak resident set size, in bytes; 0 once it exited.
    pub fn peak_rss_bytes(&self) -> u64 {
        proc_stats::peak_rss_bytes(self.pid())
    }

    /// How many file descriptors it holds now; 0 once it exited.
    pub fn open_fds(&self) -> usize {
        proc_stats::open_fds(self.pid())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if self.log_on_panic && std::thread::panicking() {
            eprintln!(
                "---- last {LOG_TAIL_LINES} lines of {} ----\n{}---- end of {} log ----",
                self.log_file.display(),
                self.log_tail(LOG_TAIL_LINES),
                self.name
            );
        }
    }
}

/// `GET /healthz/ready` at `addr` (a wildcard address means loopback) from `netns`: `Ok` on 200, else what it
/// answered or why it did not.
fn readiness(netns: &NetNs, addr: SocketAddr) -> Result<(), String> {
    match crate::http::get(netns, local(addr), "/healthz/ready", HTTP_TIMEOUT) {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("status {}: {}", r.status, r.body.trim())),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// A wildcard listen address as the loopback address to query it on.
fn local(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

/// The last `n` lines of a file (empty if it cannot be read).
fn log_tail(path: &Path, n: usize) -> String {
    let Ok(file) = File::open(path) else {
        return String::new();
    };
    let mut ring = std::collections::VecDeque::with_capacity(n);
    for line in BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        if ring.len() == n {
            ring.pop_front();
        }
        ring.push_back(line);
    }
    ring.into_iter().fold(String::new(), |mut s, l| {
        s.push_str(&l);
        s.push('\n');
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_addresses_are_queried_on_loopback() {
        assert_eq!(local("0.0.0.0:15021".parse().unwrap()), "127.0.0.1:15021".parse().unwrap());
        assert_eq!(local("10.0.0.1:15000".parse().unwrap()), "10.0.0.1:15000".parse().unwrap());
    }

    #[test]
    fn the_log_tail_keeps_the_last_lines() {
        let path = std::env::temp_dir().join(format!("ambit-e2e-tail-{}.log", std::process::id()));
        std::fs::write(&path, (1..=10).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
        assert_eq!(log_tail(&path, 2), "line 9\nline 10\n");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn drop_stops_the_process_and_reaps_it() {
        let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut d = Daemon::new("sleep", child, NetNs::borrowed("unused"), PathBuf::from("/nonexistent.log"));
        let pid = d.pid();
        assert!(d.is_running());
        drop(d);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{pid} was not reaped");
    }

    #[test]
    fn terminate_then_wait_exit_reports_the_signal() {
        let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let mut d = Daemon::new("sleep", child, NetNs::borrowed("unused"), PathBuf::from("/nonexistent.log"));
        d.terminate();
        let status = d.wait_exit(STOP_GRACE).unwrap().expect("sleep exits on SIGTERM");
        assert!(!status.success() && !d.is_running());
    }
}
