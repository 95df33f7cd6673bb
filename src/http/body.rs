//! The one body type that flows through every route stack, both ways. An enum rather
//! than a boxed trait object, so the common cases (a streaming hyper body, a fixed
//! synthetic body) cost no allocation.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use pin_project_lite::pin_project;

use super::replay::ReplayBody;
use crate::error::{BoxError, Elapsed, TimeoutKind};
use prometheus_client::metrics::counter::Counter;

pin_project! {
    /// A body with a deadline; one allocation holds both, so [`Body`] stays `Unpin`.
    #[derive(Debug)]
    pub struct Timed {
        body: Body,
        #[pin]
        sleep: tokio::time::Sleep,
        grpc: bool,
        fired: Option<Counter>,
    }
}

impl Timed {
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = Pin::new(&mut *this.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.fired.is_none() {
            // Already fired; the stream was ended.
            return Poll::Ready(None);
        }
        if this.sleep.poll(cx).is_pending() {
            return Poll::Pending;
        }
        if let Some(c) = this.fired.take() {
            c.inc();
        }
        *this.body = Body::Empty;
        Poll::Ready(deadline_end(*this.grpc))
    }
}

/// How a body cut at the deadline ends: `grpc-status: 4` trailers for gRPC (a gRPC
/// client reads the deadline from trailers, as it would from a server), else an error
/// that aborts the stream.
fn deadline_end(grpc: bool) -> Option<Result<Frame<Bytes>, BoxError>> {
    if grpc {
        let mut t = http::HeaderMap::new();
        t.insert(
            super::grpc::GRPC_STATUS,
            http::HeaderValue::from_static("4"),
        );
        t.insert(
            super::grpc::GRPC_MESSAGE,
            http::HeaderValue::from_static("breakwater: deadline exceeded"),
        );
        return Some(Ok(Frame::trailers(t)));
    }
    Some(Err(Box::new(Elapsed {
        kind: TimeoutKind::Request,
    })))
}

pin_project! {
    /// A request or response body.
    #[project = BodyProj]
    pub enum Body {
        /// No body.
        Empty,
        /// A body known in full (synthetic responses, fallbacks).
        Full { data: Option<Bytes> },
        /// A body streaming from a client or upstream connection.
        Incoming { #[pin] inner: hyper::body::Incoming },
        /// A request body that can be sent again on a retry.
        Replay { #[pin] inner: ReplayBody },
        /// A response whose first frame was already read (gRPC classification),
        /// followed by the rest of the stream.
        Prefetched { first: Option<Frame<Bytes>>, #[pin] rest: hyper::body::Incoming },
        /// An upstream body that must end before the request's deadline; the timer is
        /// made only if the body stalls, so the common case allocates nothing.
        TimedIncoming {
            #[pin] inner: hyper::body::Incoming,
            deadline: tokio::time::Instant,
            sleep: Option<Pin<Box<tokio::time::Sleep>>>,
            grpc: bool,
            fired: Option<Counter>,
        },
        /// Any other body with a deadline.
        Timed { inner: Pin<Box<Timed>> },
        /// Anything else.
        Boxed { #[pin] inner: BoxBody<Bytes, BoxError> },
    }
}

impl Body {
    /// A body with these bytes.
    pub fn full(data: impl Into<Bytes>) -> Body {
        let data = data.into();
        if data.is_empty() {
            Body::Empty
        } else {
            Body::Full { data: Some(data) }
        }
    }

    /// A body from any `http_body::Body`.
    pub fn boxed<B>(body: B) -> Body
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        Body::Boxed {
            inner: BoxBody::new(body.map_err(Into::into)),
        }
    }
}

impl Body {
    /// Ends this body at `deadline`: with `grpc-status: 4` trailers for gRPC, else
    /// with an error that aborts the stream. `fired` counts it.
    pub fn with_deadline(self, deadline: tokio::time::Instant, grpc: bool, fired: Counter) -> Body {
        if http_body::Body::is_end_stream(&self) {
            return self;
        }
        if let Body::Incoming { inner } = self {
            return Body::TimedIncoming {
                inner,
                deadline,
                sleep: None,
                grpc,
                fired: Some(fired),
            };
        }
        Body::Timed {
            inner: Box::pin(Timed {
                body: self,
                sleep: tokio::time::sleep_until(deadline),
                grpc,
                fired: Some(fired),
            }),
        }
    }
}

#[allow(clippy::derivable_impls)] // pin_project! enums cannot carry #[default]
impl Default for Body {
    fn default() -> Self {
        Body::Empty
    }
}

impl From<hyper::body::Incoming> for Body {
    fn from(inner: hyper::body::Incoming) -> Self {
        Body::Incoming { inner }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Body::Empty => "Empty",
            Body::Full { .. } => "Full",
            Body::Incoming { .. } => "Incoming",
            Body::Replay { .. } => "Replay",
            Body::Prefetched { .. } => "Prefetched",
            Body::Timed { .. } | Body::TimedIncoming { .. } => "Timed",
            Body::Boxed { .. } => "Boxed",
        };
        f.write_str(name)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            BodyProj::Empty => Poll::Ready(None),
            BodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyProj::Incoming { inner } => inner.poll_frame(cx).map_err(Into::into),
            BodyProj::Replay { inner } => inner.poll_frame(cx),
            BodyProj::Prefetched { first, rest } => {
                if let Some(f) = first.take() {
                    return Poll::Ready(Some(Ok(f)));
                }
                rest.poll_frame(cx).map_err(Into::into)
            }
            BodyProj::Timed { inner } => inner.as_mut().poll_frame(cx),
            BodyProj::TimedIncoming {
                inner,
                deadline,
                sleep,
                grpc,
                fired,
            } => {
                if fired.is_none() {
                    return Poll::Ready(None);
                }
                if let Poll::Ready(frame) = inner.poll_frame(cx) {
                    return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
                }
                let sleep =
                    sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*deadline)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if let Some(c) = fired.take() {
                    c.inc();
                }
                Poll::Ready(deadline_end(*grpc))
            }
            BodyProj::Boxed { inner } => inner.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full { data } => data.is_none(),
            Body::Incoming { inner } => inner.is_end_stream(),
            Body::Replay { inner } => inner.is_end_stream(),
            Body::Prefetched { first, rest } => first.is_none() && rest.is_end_stream(),
            Body::Timed { inner } => inner.body.is_end_stream(),
            Body::TimedIncoming { inner, fired, .. } => fired.is_none() || inner.is_end_stream(),
            Body::Boxed { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full { data } => {
                SizeHint::with_exact(data.as_ref().map(|d| d.len() as u64).unwrap_or(0))
            }
            Body::Incoming { inner } => inner.size_hint(),
            Body::Replay { inner } => inner.size_hint(),
            Body::Prefetched { first, rest } => {
                let extra = first
                    .as_ref()
                    .and_then(|f| f.data_ref())
                    .map(|d| d.len() as u64)
                    .unwrap_or(0);
                let h = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + extra);
                if let Some(u) = h.upper() {
                    out.set_upper(u + extra);
                }
                out
            }
            Body::Timed { inner } => inner.body.size_hint(),
            Body::TimedIncoming { inner, .. } => inner.size_hint(),
            Body::Boxed { inner } => inner.size_hint(),
        }
    }
}
