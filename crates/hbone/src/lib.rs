//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` streams over mutual TLS 1.3 on
//! port 15008, shared by ztunnel and the waypoint. This crate holds the
//! HTTP/2 settings both sides use, the byte relay between a TCP socket and a
//! stream, the pooled client, the request headers Istio's ztunnel sends, and
//! the single-threaded workers that run a proxy's connections.
//!
//! Module layering: `pool` → `headers`; `relay`, `stream` (a tunnel as an
//! `AsyncRead`/`AsyncWrite` byte stream) → `workers`; the settings live here.

pub mod headers;
pub mod pool;
mod relay;
pub mod stream;
pub mod workers;

pub use relay::{read_early, relay, relay_until, RelayError, Transferred};

/// The HBONE port, inside every enrolled pod.
pub const HBONE_PORT: u16 = 15008;

// Flow-control windows large enough for a fast cross-node stream without
// unbounded buffering: 4 MiB per stream, 16 MiB per connection.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
// Large DATA frames cut per-frame overhead on bulk transfers.
const MAX_FRAME: u32 = 256 * 1024;
// Bytes h2 may buffer per stream before `poll_capacity` pushes back.
const SEND_BUFFER: usize = 1024 * 1024;

// rustls holds 64 KiB of encrypted records by default, so a 256 KiB DATA
// frame left a small tail record that cost a system call and a TCP segment of
// its own. This takes a whole frame (and a few small ones) in one write, and
// still bounds what a connection to a slow peer holds.
const TLS_SEND_BUFFER: usize = 384 * 1024;

/// The length of an HTTP/2 frame header, which precedes each DATA payload
/// inside the TLS stream.
pub const FRAME_HEADER_LEN: usize = 9;

// rustls reads the socket at most 4 KiB at a time; a read buffer under TLS
// turns that into one system call per 64 KiB.
const TLS_READ_BUFFER: usize = 64 * 1024;

/// The socket under an HBONE TLS session.
pub type TlsSocket = tokio::io::BufReader<tokio::net::TcpStream>;

/// Wraps an HBONE connection's socket for TLS (see [`TlsSocket`]).
pub fn tls_socket(tcp: tokio::net::TcpStream) -> TlsSocket {
    tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp)
}

/// Sets the TLS send buffer of an HBONE connection (see [`TLS_SEND_BUFFER`]).
pub fn tune_tls<D>(conn: &mut rustls::ConnectionCommon<D>) {
    conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
}

/// Sets the congestion control of an HBONE socket. `None` keeps the
/// kernel's default.
pub fn set_congestion_control(sock: socket2::SockRef<'_>, name: Option<&str>) -> std::io::Result<()> {
    match name {
        Some(name) => sock.set_tcp_congestion(name.as_bytes()),
        None => Ok(()),
    }
}

/// HTTP/2 client settings for HBONE connections.
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .enable_push(false);
    b
}

/// HTTP/2 server settings for HBONE listeners; `max_streams` bounds the
/// concurrent tunnels one client connection may carry.
pub fn server_builder(max_streams: u32) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(max_streams);
    b
}
