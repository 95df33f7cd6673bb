//! A request body that can be sent more than once, for retries. The first attempt
//! streams the client's body to the upstream while keeping a copy of what it sent, up to
//! a cap; a later attempt replays the copy and then carries on reading the client's
//! body where the earlier attempt stopped. Nothing waits for the whole body before the
//! first attempt starts, so streaming calls (gRPC client streams) are not delayed.
//! Once more than the cap was read, the copy is dropped and the request is no longer
//! replayable.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};

use super::body::Body;
use crate::error::BoxError;
use crate::sync::lock;

#[derive(Debug)]
struct Shared {
    /// The client's body while no attempt is reading it.
    source: Option<Box<Body>>,
    chunks: Vec<Bytes>,
    len: usize,
    cap: usize,
    /// More than `cap` was read, or the body failed: replay is impossible.
    overflow: bool,
    /// The client's body has ended; `chunks` and `trailers` hold all of it.
    done: bool,
    trailers: Option<HeaderMap>,
}

/// One attempt's view of a replayable request body.
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    /// The client's body, taken from `shared` while this attempt reads it.
    held: Option<Box<Body>>,
    /// Next chunk of `shared.chunks` to replay.
    pos: usize,
    trailers_sent: bool,
    hint: SizeHint,
}

impl ReplayBody {
    /// Wraps a body, keeping up to `cap` bytes of it for replay.
    pub fn new(body: Body, cap: usize) -> ReplayBody {
        let hint = body.size_hint();
        let overflow = hint.lower() > cap as u64;
        ReplayBody {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(Box::new(body)),
                chunks: Vec::new(),
                len: 0,
                cap,
                overflow,
                done: false,
                trailers: None,
            })),
            held: None,
            pos: 0,
            trailers_sent: false,
            hint,
        }
    }

    /// A fresh reader for another attempt, or `None` when the body cannot be replayed
    /// (it exceeded the cap, failed, or an earlier attempt still holds the stream).
    pub fn replay(&self) -> Option<ReplayBody> {
        let sh = lock(&self.shared);
        if sh.overflow || !(sh.done || sh.source.is_some()) {
            return None;
        }
        Some(ReplayBody {
            shared: self.shared.clone(),
            held: None,
            pos: 0,
            trailers_sent: false,
            hint: self.hint,
        })
    }

    /// Whether [`ReplayBody::replay`] would succeed now.
    pub fn is_replayable(&self) -> bool {
        let sh = lock(&self.shared);
        !sh.overflow && (sh.done || sh.source.is_some())
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(src) = self.held.take() {
            let mut sh = lock(&self.shared);
            if sh.source.is_none() {
                sh.source = Some(src);
            }
        }
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.held.is_none() {
            let mut sh = lock(&this.shared);
            if !sh.overflow && this.pos < sh.chunks.len() {
                let chunk = sh.chunks[this.pos].clone();
                this.pos += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if sh.done {
                if !this.trailers_sent {
                    this.trailers_sent = true;
                    if let Some(t) = sh.trailers.clone() {
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                }
                return Poll::Ready(None);
            }
            match sh.source.take() {
                Some(src) => this.held = Some(src),
                None => {
                    return Poll::Ready(Some(Err(
                        "request body is still held by an earlier attempt".into(),
                    )))
                }
            }
        }
        let Some(src) = this.held.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut **src).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                let mut sh = lock(&this.shared);
                sh.done = true;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                lock(&this.shared).overflow = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let mut sh = lock(&this.shared);
                if let Some(data) = frame.data_ref() {
                    if !sh.overflow {
                        if sh.len + data.len() <= sh.cap {
                            sh.len += data.len();
                            sh.chunks.push(data.clone());
                            this.pos = sh.chunks.len();
                        } else {
                            sh.overflow = true;
                            sh.chunks = Vec::new();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    sh.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn chunked(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        Body::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn replays_what_the_first_attempt_sent() {
        let first = ReplayBody::new(chunked(&["ab", "cd"]), 100);
        let again = first.replay().unwrap();
        drop(again);
        let got = first.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"abcd");
    }

    #[tokio::test]
    async fn second_attempt_replays_and_continues() {
        let mut first = ReplayBody::new(chunked(&["ab", "cd", "ef"]), 100);
        // the first attempt reads one chunk, then fails and is dropped
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        let second = first.replay();
        assert!(second.is_none(), "first attempt still holds the stream");
        let keep = ReplayBody {
            shared: first.shared.clone(),
            held: None,
            pos: 0,
            trailers_sent: false,
            hint: SizeHint::new(),
        };
        drop(first);
        let second = keep.replay().unwrap();
        let got = second.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"abcdef");
        let third = keep.replay().unwrap();
        assert_eq!(&third.collect().await.unwrap().to_bytes()[..], b"abcdef");
    }

    #[tokio::test]
    async fn over_the_cap_is_not_replayable() {
        let first = ReplayBody::new(chunked(&["abc", "def"]), 4);
        let handle = first.replay().unwrap();
        let got = first.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"abcdef", "the body itself still streams through");
        assert!(!handle.is_replayable());
    }

    #[tokio::test]
    async fn known_length_over_cap_is_refused_up_front() {
        let b = ReplayBody::new(Body::full("0123456789"), 4);
        assert!(!b.is_replayable());
    }
}
