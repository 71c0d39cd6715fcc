//! A request body of unknown length (chunked, gRPC, HTTP/2 without
//! `content-length`) that can be sent again: each attempt streams it as it
//! arrives, and the frames read so far are kept, up to
//! [`REPLAY_LIMIT`](crate::retry::REPLAY_LIMIT) bytes, as `Bytes` handles (no
//! copy), so a retry sends them again and then reads on from the client.
//! Past the limit they are dropped and no further attempt is possible; the
//! attempt under way streams to the end.
//!
//! Attempts run one after the other: a new copy makes the previous ones
//! stale (they end with an error), so the client's body is read by one copy
//! at a time and no wake-up goes to an abandoned attempt.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use ambit_hbone::pool::BoxError;
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use crate::retry::REPLAY_LIMIT;
use crate::upstream::ProxyBody;

/// One attempt's copy of the request body; [`ReplayBody::replay`] makes the
/// next. The copy [`ReplayBody::new`] returns is best kept as the handle that
/// makes them, unread.
pub struct ReplayBody {
    state: Arc<Mutex<State>>,
    /// The attempt this copy belongs to; a copy of an earlier one is stale.
    attempt: u64,
    /// The next recorded frame this copy sends.
    position: usize,
    trailers_sent: bool,
    size_hint: SizeHint,
}

struct State {
    source: ProxyBody,
    /// The data frames read from the client so far, while within the limit.
    frames: Vec<Bytes>,
    recorded: usize,
    trailers: Option<HeaderMap>,
    /// The client's body ended (after its trailers, if any).
    finished: bool,
    /// Past the limit, or the client's body broke: no further attempt.
    unrepeatable: bool,
    attempt: u64,
}

impl ReplayBody {
    /// The first attempt's copy of `source`.
    pub fn new(source: ProxyBody) -> ReplayBody {
        let size_hint = source.size_hint();
        let state = State {
            source,
            frames: Vec::new(),
            recorded: 0,
            trailers: None,
            finished: false,
            unrepeatable: false,
            attempt: 0,
        };
        ReplayBody { state: Arc::new(Mutex::new(state)), attempt: 0, position: 0, trailers_sent: false, size_hint }
    }

    /// Whether another attempt could send the body again.
    pub fn is_replayable(&self) -> bool {
        !self.lock().unrepeatable
    }

    /// The next attempt's copy, from the start; `None` once the body cannot
    /// be sent again. Every earlier copy becomes stale.
    pub fn replay(&self) -> Option<ReplayBody> {
        let mut state = self.lock();
        if state.unrepeatable {
            return None;
        }
        state.attempt += 1;
        let attempt = state.attempt;
        drop(state);
        let size_hint = self.size_hint;
        Some(ReplayBody { state: self.state.clone(), attempt, position: 0, trailers_sent: false, size_hint })
    }

    /// The next attempt's copy as a [`ProxyBody`]; when the body cannot be
    /// sent again (an abandoned attempt may have read on past the limit since
    /// the retry was decided), a body that fails at once.
    pub fn next_attempt(&self) -> ProxyBody {
        match self.replay() {
            Some(copy) => BodyExt::boxed(copy),
            None => BodyExt::boxed(Unrepeatable),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut state = this.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.attempt != this.attempt {
            return Poll::Ready(Some(Err("a later attempt took over the request body".into())));
        }
        if let Some(data) = state.frames.get(this.position) {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        if let (false, Some(trailers)) = (this.trailers_sent, &state.trailers) {
            this.trailers_sent = true;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
        }
        if state.finished {
            return Poll::Ready(None);
        }
        let state = &mut *state;
        match Pin::new(&mut state.source).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        state.record(&data);
                        this.position = state.frames.len();
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            state.trailers = Some(trailers.clone());
                            this.trailers_sent = true;
                            Frame::trailers(trailers)
                        }
                        Err(other) => other,
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                state.finished = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                state.unrepeatable = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}

/// The body of an attempt that cannot have the request's body.
struct Unrepeatable;

impl Body for Unrepeatable {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(Some(Err("the request body can no longer be sent again".into())))
    }
}

impl State {
    /// Keeps `data` for the next attempts while the total stays within the limit.
    fn record(&mut self, data: &Bytes) {
        if self.unrepeatable {
            return;
        }
        self.recorded += data.len();
        if self.recorded > REPLAY_LIMIT {
            self.unrepeatable = true;
            self.frames = Vec::new();
        } else {
            self.frames.push(data.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A client body that yields `frames` one per poll, then ends.
    struct Frames(VecDeque<Result<Frame<Bytes>, BoxError>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.get_mut().0.pop_front())
        }
    }

    fn body(chunks: &[&'static [u8]], trailers: Option<HeaderMap>) -> ReplayBody {
        let mut frames: VecDeque<_> = chunks.iter().map(|c| Ok(Frame::data(Bytes::from_static(c)))).collect();
        frames.extend(trailers.map(|t| Ok(Frame::trailers(t))));
        ReplayBody::new(Frames(frames).boxed())
    }

    async fn next_data(b: &mut ReplayBody) -> Bytes {
        b.frame().await.expect("a frame").expect("no error").into_data().expect("a data frame")
    }

    async fn collect(b: ReplayBody) -> (Bytes, Option<HeaderMap>) {
        let c = b.collect().await.expect("the whole body");
        let trailers = c.trailers().cloned();
        (c.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_retry_sends_what_was_read_then_reads_on_and_the_earlier_copy_is_stale() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-timeout", "1S".parse().unwrap());
        let mut first = body(&[b"one ", b"two ", b"three"], Some(trailers.clone()));
        assert_eq!(next_data(&mut first).await, "one ");
        assert_eq!(next_data(&mut first).await, "two ");
        let second = first.replay().expect("replayable");
        assert!(first.frame().await.expect("a frame").is_err(), "the first attempt's copy is stale");
        assert_eq!(collect(second).await, (Bytes::from_static(b"one two three"), Some(trailers.clone())));
        // A third attempt after the whole body was read: all from the record.
        let third = first.replay().expect("still replayable");
        assert_eq!(collect(third).await, (Bytes::from_static(b"one two three"), Some(trailers)));
    }

    #[tokio::test]
    async fn past_the_replay_limit_the_attempt_streams_on_but_none_follows() {
        static BIG: [u8; REPLAY_LIMIT] = [b'x'; REPLAY_LIMIT];
        let b = body(&[&BIG, b"one more byte"], None);
        let retry = b.replay().expect("nothing read yet");
        let (data, _) = collect(retry).await;
        assert_eq!(data.len(), REPLAY_LIMIT + 13, "the attempt under way gets the whole body");
        assert!(!b.is_replayable());
        assert!(b.replay().is_none());

        let within = body(&[&BIG], None);
        assert_eq!(collect(within.replay().unwrap()).await.0.len(), REPLAY_LIMIT);
        assert!(within.is_replayable(), "exactly the limit can be sent again");
    }

    #[tokio::test]
    async fn a_client_body_that_breaks_cannot_be_sent_again() {
        let frames = VecDeque::from([Ok(Frame::data(Bytes::from_static(b"part"))), Err("client reset".into())]);
        let mut b = ReplayBody::new(Frames(frames).boxed());
        assert_eq!(next_data(&mut b).await, "part");
        assert!(b.frame().await.expect("a frame").is_err());
        assert!(b.replay().is_none());
        let mut next = b.next_attempt();
        assert!(next.frame().await.expect("a frame").is_err(), "an attempt without the body fails at once");
    }
}
