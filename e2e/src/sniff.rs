//! A packet capture on one interface of a namespace, with an `AF_PACKET` raw socket (no tcpdump), for asserting
//! what crosses the wire: plaintext markers, TLS records, ports.
//!
//! Only IPv4/TCP frames are kept: their ports, and their payload up to [`MAX_PAYLOAD`] bytes in total (the segment
//! count keeps going after that).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;

use crate::netns::NetNs;

/// The most TCP payload a capture keeps (64 MiB).
pub const MAX_PAYLOAD: usize = 64 << 20;

/// Large enough for a GSO/GRO super-frame (64 KiB of IP plus headers).
const FRAME_BUF: usize = 128 * 1024;

/// A running capture; [`Sniffer::stop`] ends it and returns what it saw.
#[derive(Debug)]
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<Capture>>>,
}

impl Sniffer {
    /// Starts capturing every frame on `iface` in `netns` (both directions). When this returns, the socket is
    /// bound: no later frame is missed.
    pub fn start(netns: &NetNs, iface: &str) -> anyhow::Result<Self> {
        let name = iface.to_string();
        let fd = netns
            .run(move || open_packet_socket(&name))
            .with_context(|| format!("packet socket on {iface} in netns {}", netns.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new().name(format!("sniff-{iface}")).spawn(move || capture_loop(&fd, &s))?;
        Ok(Sniffer { stop, thread: Some(thread) })
    }

    /// Stops capturing (after draining frames already queued) and returns the capture.
    pub fn stop(mut self) -> Capture {
        self.finish().unwrap_or_else(|e| panic!("sniffer failed: {e}"))
    }

    fn finish(&mut self) -> io::Result<Capture> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            None => Ok(Capture::default()),
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.finish();
        }
    }
}

/// One TCP segment seen on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Payload length on the wire.
    pub len: usize,
    /// Offset of the kept payload in the capture's buffer.
    offset: usize,
    /// How many payload bytes were kept (less than `len` once the buffer is full).
    kept: usize,
}

/// What a [`Sniffer`] saw.
#[derive(Clone, Debug, Default)]
pub struct Capture {
    segments: Vec<Segment>,
    payload: Vec<u8>,
    frames: usize,
}

impl Capture {
    /// Whether `needle` occurs in the captured TCP payload (within a segment, or across consecutive segments).
    pub fn contains(&self, needle: &[u8]) -> bool {
        find(&self.payload, needle)
    }

    /// Number of TCP segments seen (with or without payload).
    pub fn tcp_segments(&self) -> usize {
        self.segments.len()
    }

    /// Number of frames seen on the interface (any protocol).
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Segments whose payload starts with a TLS 1.2/1.3 application-data record header (`17 03 03`).
    pub fn tls_application_data_records(&self) -> usize {
        self.segments.iter().filter(|s| self.kept(s).starts_with(&[0x17, 0x03, 0x03])).count()
    }

    /// The distinct `(source port, destination port)` pairs of the TCP segments.
    pub fn tcp_ports_seen(&self) -> BTreeSet<(u16, u16)> {
        self.segments.iter().map(|s| (s.src_port, s.dst_port)).collect()
    }

    /// Total TCP payload bytes seen (including those not kept).
    pub fn payload_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len as u64).sum()
    }

    /// All segments, in capture order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The kept payload of one segment.
    pub fn kept(&self, s: &Segment) -> &[u8] {
        &self.payload[s.offset..s.offset + s.kept]
    }

    /// Records one Ethernet frame.
    fn push_frame(&mut self, frame: &[u8]) {
        self.frames += 1;
        let Some((src_port, dst_port, payload)) = parse_ipv4_tcp(frame) else {
            return;
        };
        let kept = payload.len().min(MAX_PAYLOAD - self.payload.len());
        let offset = self.payload.len();
        self.payload.extend_from_slice(&payload[..kept]);
        self.segments.push(Segment { src_port, dst_port, len: payload.len(), offset, kept });
    }
}

/// Ports and payload of an Ethernet/IPv4/TCP frame; `None` for anything else.
fn parse_ipv4_tcp(frame: &[u8]) -> Option<(u16, u16, &[u8])> {
    if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != libc::IPPROTO_TCP as u8 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    // A GSO super-frame may carry a total length of 0; then the frame's length is the truth.
    let total = match usize::from(u16::from_be_bytes([ip[2], ip[3]])) {
        0 => ip.len(),
        n => n.min(ip.len()),
    };
    let tcp = ip.get(ihl..total)?;
    if tcp.len() < 20 {
        return None;
    }
    let src = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dst = u16::from_be_bytes([tcp[2], tcp[3]]);
    let data_off = usize::from(tcp[12] >> 4) * 4;
    Some((src, dst, tcp.get(data_off..)?))
}

/// Naive substring search (captures are small and this runs once per assertion).
fn find(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    let first = needle[0];
    hay.iter().enumerate().filter(|(_, &b)| b == first).any(|(i, _)| hay.get(i..i + needle.len()) == Some(needle))
}

/// Opens a packet socket bound to `iface` of the current thread's namespace.
fn open_packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let c_iface = CString::new(iface).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul in name"))?;
    // SAFETY: plain syscalls on values we own; the fd is wrapped in OwnedFd at once.
    unsafe {
        let ifindex = libc::if_nametoindex(c_iface.as_ptr());
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // Protocol 0 receives nothing until bind() picks the interface, so no frame of another one slips in.
        let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let bufsize: libc::c_int = 32 << 20;
        // Best effort: a bigger queue loses fewer frames in bursts (FORCE works as root).
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bufsize as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
        if libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        if libc::bind(
            raw,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Reads frames until `stop` is set, then drains what is queued.
fn capture_loop(fd: &OwnedFd, stop: &AtomicBool) -> io::Result<Capture> {
    let mut cap = Capture::default();
    let mut buf = vec![0u8; FRAME_BUF];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let flags = if stopping { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: buf is valid for FRAME_BUF bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut if stopping => return Ok(cap),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => continue,
                _ => return Err(err),
            }
        }
        cap.push_frame(&buf[..n as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src: u16, dst: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 20 + payload.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&src.to_be_bytes());
        tcp[2..4].copy_from_slice(&dst.to_be_bytes());
        tcp[12] = 5 << 4;
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_capture_finds_markers_tls_records_and_ports() {
        let mut cap = Capture::default();
        cap.push_frame(&frame(40000, 15008, &[0x17, 0x03, 0x03, 0x00, 0x10]));
        cap.push_frame(&frame(40001, 80, b"hello MAR"));
        cap.push_frame(&frame(40001, 80, b"KER world"));
        cap.push_frame(&[0u8; 60]); // not IPv4
        assert_eq!(cap.frames(), 4);
        assert_eq!(cap.tcp_segments(), 3);
        assert_eq!(cap.tls_application_data_records(), 1);
        assert!(cap.contains(b"MARKER"), "a marker split across segments is found");
        assert!(!cap.contains(b"absent"));
        assert_eq!(cap.tcp_ports_seen(), BTreeSet::from([(40000, 15008), (40001, 80)]));
        assert_eq!(cap.payload_bytes(), 5 + 9 + 9);
    }

    #[test]
    fn truncated_frames_are_ignored() {
        let f = frame(1, 2, b"x");
        assert!(parse_ipv4_tcp(&f[..30]).is_none());
        assert_eq!(parse_ipv4_tcp(&f).map(|(s, d, p)| (s, d, p.to_vec())), Some((1, 2, b"x".to_vec())));
    }
}
