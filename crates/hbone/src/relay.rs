//! Copies bytes between a TCP socket and an HTTP/2 stream, in both
//! directions, with h2 flow control as backpressure: a slow reader slows
//! the writer instead of growing a buffer.

use std::future::{poll_fn, Future};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

// Read sizes from TCP. A connection starts small and doubles its reads
// while they come back full (bulk transfers), up to the maximum. A read
// leaves room for the DATA frame's header, so a full read and its header
// fill whole 16 KiB TLS records, with no small record left over.
const FIRST_CHUNK: usize = 16 * 1024;
const MAX_CHUNK: usize = 256 * 1024;

/// Why a relay ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("tcp side: {0}")]
    Tcp(#[from] std::io::Error),
    #[error("tunnel stream: {0}")]
    Stream(#[from] h2::Error),
    #[error("tunnel stream closed by the peer before the data was sent")]
    StreamClosed,
    /// The proxy ended it (e.g. a policy change now denies the connection).
    #[error("closed by the proxy")]
    Aborted,
}

/// Bytes moved by a relay.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// From the TCP socket into the tunnel.
    pub to_tunnel: u64,
    /// From the tunnel to the TCP socket.
    pub from_tunnel: u64,
}

/// Relays until both directions have finished. A half-close on one side is
/// passed on (TCP FIN ↔ END_STREAM). On an error in either direction the
/// stream is reset and the socket dropped, so the far side sees it too.
pub async fn relay(tcp: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> (Transferred, Result<(), RelayError>) {
    relay_until(tcp, send, recv, std::future::pending()).await
}

/// [`relay`], ended early when `abort` completes: both sides are then reset
/// as on an error ([`RelayError::Aborted`]), keeping the byte counts so far.
pub async fn relay_until(
    tcp: TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    abort: impl Future<Output = ()>,
) -> (Transferred, Result<(), RelayError>) {
    let (mut r, mut w) = tcp.into_split();
    let mut t = Transferred::default();
    let result = {
        let up = tcp_to_stream(&mut r, &mut send, &mut t.to_tunnel);
        let down = stream_to_tcp(&mut recv, &mut w, &mut t.from_tunnel);
        tokio::select! {
            biased;
            done = async { tokio::try_join!(up, down) } => done.map(|_| ()),
            () = abort => Err(RelayError::Aborted),
        }
    };
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
        // Abortive close: the application sees a reset, not a clean EOF,
        // so it does not mistake a broken tunnel for a complete response.
        if let Ok(tcp) = r.reunite(w) {
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
        }
    }
    (t, result)
}

async fn tcp_to_stream(r: &mut OwnedReadHalf, send: &mut SendStream<Bytes>, n: &mut u64) -> Result<(), RelayError> {
    let mut chunk_size = FIRST_CHUNK;
    let mut buf = BytesMut::new();
    loop {
        // Wait before allocating: an idle connection holds no read buffer.
        r.readable().await?;
        if buf.capacity() < chunk_size / 4 {
            buf = BytesMut::with_capacity(chunk_size - super::FRAME_HEADER_LEN);
        }
        let room = buf.capacity();
        let read = match read_ready(r.as_ref(), &mut buf) {
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        if read == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        *n += read as u64;
        crate::workers::note_activity();
        if read == room {
            chunk_size = (chunk_size * 2).min(MAX_CHUNK);
        } else if read < room / 8 {
            chunk_size = (chunk_size / 2).max(FIRST_CHUNK);
        }
        let mut chunk = buf.split().freeze();
        if read < room {
            // The socket is drained: let the buffer go with the data.
            buf = BytesMut::new();
        }
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(cap)) => cap,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(RelayError::StreamClosed),
            };
            if cap == 0 {
                continue;
            }
            let part = chunk.split_to(cap.min(chunk.len()));
            send.send_data(part, false)?;
        }
    }
}

/// What the socket already holds, up to one first chunk, without waiting:
/// a client that speaks first (HTTP, TLS) has usually sent its request by
/// the time its tunnel is opened, and [`crate::pool::HbonePool::open`]
/// sends it with the CONNECT. Empty when nothing has arrived yet or at the
/// end of the stream (which the relay then meets); an error (a reset) is
/// returned, since the socket reports it only once. Asks the socket itself,
/// not the runtime, which may not yet know it is readable.
pub fn read_early(tcp: &TcpStream) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(FIRST_CHUNK - super::FRAME_HEADER_LEN);
    match recv_into(tcp, &mut buf) {
        Ok(n) if n > 0 => {
            crate::workers::note_activity();
            Ok(buf.freeze())
        }
        Ok(_) => Ok(Bytes::new()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Bytes::new()),
        Err(e) => Err(e),
    }
}

/// Reads what the socket has into `buf`'s spare capacity. A short read
/// means the socket is drained: it tells the runtime so (as tokio's own
/// `poll_read` does), sparing a read that would only say "would block".
fn read_ready(tcp: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    let mut read = None;
    let result = tcp.try_io(Interest::READABLE, || {
        let room = buf.capacity() - buf.len();
        let n = recv_into(tcp, buf)?;
        read = Some(n);
        if n > 0 && n < room {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (result, read) {
        (Ok(n), _) | (Err(_), Some(n)) => Ok(n),
        (Err(e), None) => Err(e),
    }
}

/// One `recv` from the socket itself into `buf`'s spare capacity, which it extends by what arrived.
fn recv_into(tcp: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    let n = socket2::SockRef::from(tcp).recv(buf.spare_capacity_mut())?;
    // SAFETY: recv initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

async fn stream_to_tcp(recv: &mut RecvStream, w: &mut OwnedWriteHalf, n: &mut u64) -> Result<(), RelayError> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let len = chunk.len();
        w.write_all(&chunk).await?;
        crate::workers::note_activity();
        *n += len as u64;
        // Only now may the peer send more: the socket took the bytes.
        let _ = recv.flow_control().release_capacity(len);
    }
    w.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn early_data_is_what_the_socket_holds_without_waiting_and_a_reset_is_reported() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, server) = pair(&l).await;
        assert!(read_early(&server).unwrap().is_empty(), "nothing sent yet: empty, without waiting");
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let early = loop {
            let b = read_early(&server).unwrap();
            if !b.is_empty() || std::time::Instant::now() > deadline {
                break b;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert_eq!(&early[..], b"GET / HTTP/1.1\r\n\r\n");

        let (client, server) = pair(&l).await;
        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
        drop(client);
        let err = loop {
            match read_early(&server) {
                Err(e) => break e,
                Ok(_) if std::time::Instant::now() > deadline => panic!("the reset was not reported"),
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_aborted_relay_resets_the_stream_and_the_socket_and_keeps_the_counts() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ((tunnel_c, tunnel_s), (upstream, mut app)) = (pair(&l).await, pair(&l).await);
        let server = tokio::spawn(async move {
            let mut conn = super::super::server_builder(10).handshake::<_, Bytes>(tunnel_s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            let (abort_tx, abort_rx) = tokio::sync::oneshot::channel::<()>();
            let relay = tokio::spawn(relay_until(upstream, send, req.into_body(), async {
                let _ = abort_rx.await;
            }));
            (abort_tx, relay)
        });
        let (mut client, conn) = super::super::client_builder().handshake::<_, Bytes>(tunnel_c).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::connect("127.0.0.1:8080").body(()).unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        let (abort, relay) = server.await.unwrap();
        let mut recv = resp.await.unwrap().into_body();
        send.send_data(Bytes::from_static(b"hello"), false).unwrap();
        let mut five = [0u8; 5];
        app.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"hello");

        abort.send(()).unwrap();
        let (t, result) = tokio::time::timeout(Duration::from_secs(5), relay).await.unwrap().unwrap();
        assert!(matches!(result, Err(RelayError::Aborted)), "{result:?}");
        assert_eq!(t, Transferred { to_tunnel: 0, from_tunnel: 5 });
        let err = recv.data().await.expect("the stream ends with a reset").unwrap_err();
        assert_eq!(err.reason(), Some(h2::Reason::CANCEL), "{err}");
        let err = app.read(&mut five).await.expect_err("the application sees a reset, not an end of stream");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }
}
