//! Whole-request deadline: covers every attempt and every backoff wait. It sits outside
//! retry, so a fired deadline ends the retry loop; the deadline is also put in the
//! request's extensions ([`Deadline`]) so retry can skip a backoff that would not fit
//! and each attempt can tell the upstream the time actually left (`grpc-timeout`).
//! An incoming `grpc-timeout` shortens the route's timeout.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::error::{BoxError, Elapsed, TimeoutKind};
use crate::http::{grpc, Body, Deadline};
use crate::telemetry::metrics::{Metrics, TimeoutLabels};

/// Applies the route's whole-request deadline.
#[derive(Debug, Clone)]
pub struct TimeoutLayer {
    timeout: Option<Duration>,
    fired: Counter,
}

impl TimeoutLayer {
    /// `timeout` of `None` still honours a client's `grpc-timeout`.
    pub fn new(route: &str, timeout: Option<Duration>, metrics: &Metrics) -> Self {
        TimeoutLayer {
            timeout,
            fired: metrics
                .timeouts
                .get_or_create(&TimeoutLabels {
                    route: route.to_string(),
                    kind: "request",
                })
                .clone(),
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Timeout {
            inner,
            layer: self.clone(),
        }
    }
}

/// The timeout service.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    layer: TimeoutLayer,
}

impl<S> Service<Request<Body>> for Timeout<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let client = req
            .headers()
            .get(grpc::GRPC_TIMEOUT)
            .and_then(grpc::parse_timeout);
        let budget = match (self.layer.timeout, client) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline = budget.map(|d| Instant::now() + d);
        if let Some(dl) = deadline {
            req.extensions_mut().insert(Deadline(dl));
        }
        let grpc = grpc::is_grpc(req.headers());
        ResponseFuture {
            inner: self.inner.call(req),
            sleep: deadline.map(tokio::time::sleep_until),
            deadline,
            grpc,
            fired: self.layer.fired.clone(),
        }
    }
}

pin_project! {
    /// Response future of [`Timeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        deadline: Option<Instant>,
        grpc: bool,
        fired: Counter,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(r) = this.inner.poll(cx) {
            // The deadline covers the whole response, body included.
            return Poll::Ready(match (r, *this.deadline) {
                (Ok(res), Some(dl)) => {
                    let (grpc, fired) = (*this.grpc, this.fired.clone());
                    Ok(res.map(|b| b.with_deadline(dl, grpc, fired)))
                }
                (r, _) => r,
            });
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            if sleep.poll(cx).is_ready() {
                this.fired.inc();
                return Poll::Ready(Err(Elapsed {
                    kind: TimeoutKind::Request,
                }
                .into()));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use tower_test::mock;

    #[tokio::test(start_paused = true)]
    async fn fires_and_counts() {
        let m = Metrics::new();
        let layer = TimeoutLayer::new("r", Some(Duration::from_secs(2)), &m);
        let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(layer);
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = svc.call(Request::new(Body::Empty));
        let (req, _send) = handle.next_request().await.unwrap();
        assert!(req.extensions().get::<Deadline>().is_some());
        let err = fut.await.unwrap_err();
        assert_eq!(
            ErrorKind::of_box(&err),
            ErrorKind::Timeout(TimeoutKind::Request)
        );
        assert!(m
            .encode()
            .contains(r#"breakwater_timeouts_total{route="r",kind="request"} 1"#));
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_timeout_shortens_the_deadline() {
        let m = Metrics::new();
        let layer = TimeoutLayer::new("r", Some(Duration::from_secs(10)), &m);
        let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(layer);
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let start = Instant::now();
        let req = Request::builder()
            .header("grpc-timeout", "100m")
            .body(Body::Empty)
            .unwrap();
        let fut = svc.call(req);
        let (req, _send) = handle.next_request().await.unwrap();
        let dl = req.extensions().get::<Deadline>().unwrap().0;
        assert_eq!(dl - start, Duration::from_millis(100));
        fut.await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_covers_the_body() {
        use http_body_util::BodyExt;
        let m = Metrics::new();
        let layer = TimeoutLayer::new("r", Some(Duration::from_secs(1)), &m);
        let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(layer);
        handle.allow(2);
        for grpc in [false, true] {
            assert!(svc.poll_ready().is_ready());
            let mut req = Request::new(Body::Empty);
            if grpc {
                req.headers_mut().insert(
                    "content-type",
                    http::HeaderValue::from_static("application/grpc"),
                );
            }
            let fut = svc.call(req);
            let (_, send) = handle.next_request().await.unwrap();
            // headers at once, then a body that never ends
            let never =
                futures_util::stream::pending::<Result<http_body::Frame<bytes::Bytes>, BoxError>>();
            send.send_response(Response::new(Body::boxed(http_body_util::StreamBody::new(
                never,
            ))));
            let res = fut.await.unwrap();
            let collected = res.into_body().collect().await;
            if grpc {
                let trailers = collected.unwrap().trailers().cloned().unwrap();
                assert_eq!(trailers["grpc-status"], "4");
            } else {
                let err = collected.unwrap_err();
                assert_eq!(
                    ErrorKind::of_box(&err),
                    ErrorKind::Timeout(TimeoutKind::Request)
                );
            }
        }
        assert!(m
            .encode()
            .contains(r#"breakwater_timeouts_total{route="r",kind="request"} 2"#));
    }

    #[tokio::test(start_paused = true)]
    async fn off_means_no_deadline() {
        let m = Metrics::new();
        let layer = TimeoutLayer::new("r", None, &m);
        let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(layer);
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = svc.call(Request::new(Body::Empty));
        let (req, send) = handle.next_request().await.unwrap();
        assert!(req.extensions().get::<Deadline>().is_none());
        tokio::time::advance(Duration::from_secs(3600)).await;
        send.send_response(Response::new(Body::Empty));
        assert!(fut.await.is_ok());
    }
}
