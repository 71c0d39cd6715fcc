//! A TCP server that reads HTTP/1.1 requests and never answers: the backend that hangs, to show that a proxy does
//! not wait for it (a mirror's copies). It records the request line and `Host` of the first request on each
//! connection and holds every connection open until dropped.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::NetNs;

/// One request as the sink saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SunkRequest {
    /// `GET /path HTTP/1.1`.
    pub line: String,
    pub host: String,
}

pub struct Sink {
    seen: Arc<Mutex<Vec<SunkRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Listens on `addr` inside `netns`.
    pub fn start(netns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = netns.run(move || TcpListener::bind(addr))?;
        listener.set_nonblocking(true)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || serve(&listener, &seen, &stop))
        };
        Ok(Sink { seen, stop, thread: Some(thread) })
    }

    /// The requests read so far, in arrival order.
    pub fn requests(&self) -> Vec<SunkRequest> {
        self.seen.lock().expect("sink poisoned").clone()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls the listener and every connection (non-blocking) until told to stop.
fn serve(listener: &TcpListener, seen: &Mutex<Vec<SunkRequest>>, stop: &AtomicBool) {
    // Each connection with what it sent until its first request's head was complete.
    let mut conns: Vec<(TcpStream, Vec<u8>, bool)> = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        while let Ok((s, _)) = listener.accept() {
            if s.set_nonblocking(true).is_ok() {
                conns.push((s, Vec::new(), false));
            }
        }
        for (s, buf, recorded) in &mut conns {
            match s.read(&mut chunk) {
                Ok(n) if n > 0 && !*recorded => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() != ErrorKind::WouldBlock => *recorded = true,
                _ => {}
            }
            if !*recorded {
                if let Some(req) = head(buf) {
                    seen.lock().expect("sink poisoned").push(req);
                    *recorded = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The request line and `Host` of a complete head at the start of `buf`.
fn head(buf: &[u8]) -> Option<SunkRequest> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let line = lines.next()?.to_owned();
    let host = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("host"))
        .map_or_else(String::new, |(_, v)| v.trim().to_owned());
    Some(SunkRequest { line, host })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_gives_its_line_and_host() {
        let req = head(b"GET /a HTTP/1.1\r\nhost: echo-shadow\r\nx: y\r\n\r\nbody").unwrap();
        assert_eq!(req, SunkRequest { line: "GET /a HTTP/1.1".into(), host: "echo-shadow".into() });
        assert_eq!(head(b"GET /a HTTP/1.1\r\nhost: x\r\n"), None, "incomplete");
    }
}
