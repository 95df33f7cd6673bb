//! The one body type that flows through every route stack, both ways. An enum rather
//! than a boxed trait object, so the common cases (a streaming hyper body, a fixed
//! synthetic body) cost no allocation.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use pin_project_lite::pin_project;

use super::replay::ReplayBody;
use crate::error::BoxError;

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
            Body::Boxed { inner } => inner.size_hint(),
        }
    }
}
