//! Concurrency limit: at most `max` requests in flight on a route; the excess is refused
//! at once with [`Overloaded`] (503), never queued, because a queue in front of a slow
//! upstream only turns overload into latency. Sits inside the rate limiter and outside
//! the timeout, so refused requests never start a deadline or touch the retry budget.
//!
//! tower's `ConcurrencyLimit` waits in `poll_ready`; this one rejects in `call`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service};

use crate::config::{ConcurrencyLimitConfig, Mode};
use crate::error::{BoxError, Overloaded};
use crate::http::Body;
use crate::telemetry::metrics::{Metrics, ObservedLabels};

/// Shared in-flight count of one route.
#[derive(Debug)]
pub struct Limit {
    max: u32,
    observe: bool,
    inflight: AtomicU32,
    overloaded: Counter,
    observed: Counter,
}

impl Limit {
    /// A limit for `route`.
    pub fn new(route: &str, cfg: &ConcurrencyLimitConfig, metrics: &Metrics) -> Arc<Limit> {
        Arc::new(Limit {
            max: cfg.max,
            observe: cfg.mode == Mode::Observe,
            inflight: AtomicU32::new(0),
            overloaded: Metrics::route_counter(&metrics.overloaded, route),
            observed: metrics
                .policy_observed
                .get_or_create(&ObservedLabels {
                    route: route.to_string(),
                    policy: "concurrency_limit",
                    would: "reject",
                })
                .clone(),
        })
    }

    /// Requests in flight now.
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    fn acquire(self: &Arc<Self>) -> Option<Permit> {
        let prev = self.inflight.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max {
            if self.observe {
                self.observed.inc();
            } else {
                self.inflight.fetch_sub(1, Ordering::AcqRel);
                self.overloaded.inc();
                return None;
            }
        }
        Some(Permit(self.clone()))
    }
}

/// One slot, released on drop (also when the client goes away mid-request).
#[derive(Debug)]
pub struct Permit(Arc<Limit>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Applies a [`Limit`].
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitLayer {
    limit: Arc<Limit>,
}

impl ConcurrencyLimitLayer {
    /// A layer over a shared limit.
    pub fn new(limit: Arc<Limit>) -> Self {
        ConcurrencyLimitLayer { limit }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit {
            inner,
            limit: self.limit.clone(),
        }
    }
}

/// The concurrency-limit service.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    limit: Arc<Limit>,
}

impl<S> Service<Request<Body>> for ConcurrencyLimit<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match self.limit.acquire() {
            Some(permit) => ResponseFuture::Admitted {
                inner: self.inner.call(req),
                _permit: permit,
            },
            None => ResponseFuture::Refused,
        }
    }
}

pin_project! {
    /// Response future of [`ConcurrencyLimit`]: holds the slot until the response headers.
    #[project = FutProj]
    pub enum ResponseFuture<F> {
        /// Running, holding a slot.
        Admitted { #[pin] inner: F, _permit: Permit },
        /// Refused.
        Refused,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            FutProj::Admitted { inner, .. } => inner.poll(cx),
            FutProj::Refused => Poll::Ready(Err(Overloaded.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use tower_test::mock;

    fn layer(max: u32, mode: Mode) -> (ConcurrencyLimitLayer, Arc<Limit>, Metrics) {
        let m = Metrics::new();
        let limit = Limit::new("r", &ConcurrencyLimitConfig { max, mode }, &m);
        (ConcurrencyLimitLayer::new(limit.clone()), limit, m)
    }

    #[tokio::test]
    async fn sheds_excess_at_once_and_frees_slots() {
        let (layer, limit, m) = layer(2, Mode::Enforce);
        let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(layer);
        handle.allow(10);
        let mut call = || {
            assert!(svc.poll_ready().is_ready());
            svc.call(Request::new(Body::Empty))
        };
        let f1 = call();
        let f2 = call();
        let f3 = call();
        let err = f3.await.unwrap_err();
        assert_eq!(ErrorKind::of_box(&err), ErrorKind::Overloaded);
        assert_eq!(limit.inflight(), 2);
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(Body::Empty));
        f1.await.unwrap();
        assert_eq!(limit.inflight(), 1);
        drop(f2); // a client that goes away frees its slot
        assert_eq!(limit.inflight(), 0);
        assert!(m
            .encode()
            .contains(r#"breakwater_overloaded_total{route="r"} 1"#));
    }

    #[tokio::test]
    async fn observe_mode_counts_but_admits() {
        let (layer, limit, m) = layer(1, Mode::Observe);
        let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(layer);
        handle.allow(10);
        let mut call = || {
            assert!(svc.poll_ready().is_ready());
            svc.call(Request::new(Body::Empty))
        };
        let _f1 = call();
        let _f2 = call();
        assert_eq!(limit.inflight(), 2);
        let text = m.encode();
        assert!(text.contains(r#"breakwater_policy_observed_total{route="r",policy="concurrency_limit",would="reject"} 1"#), "{text}");
        assert!(!text.contains(r#"breakwater_overloaded_total{route="r"} 1"#));
    }
}
