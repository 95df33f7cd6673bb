//! One upstream attempt: the per-try timeout, the attempt metrics
//! (`breakwater_upstream_attempts_total` by outcome) and the `grpc-timeout` the upstream
//! is given (the time actually left of the whole-request or per-try deadline). The
//! innermost layer, right above the upstream client, so every attempt (first or retry)
//! passes through it and the breaker above sees a per-try timeout as an error. Each
//! attempt also gets its trace span and the upstream's `traceparent` (see [`super::trace`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use super::classify::{Conditions, Outcome};
use super::trace::{AttemptSpan, AttemptTrace};
use crate::error::{BoxError, Elapsed, TimeoutKind};
use crate::http::{grpc, Body, Deadline};
use crate::telemetry::metrics::{AttemptLabels, Metrics, TimeoutLabels};

#[derive(Debug)]
struct Shared {
    per_try: Option<Duration>,
    failure: Conditions,
    success: Counter,
    failed: Counter,
    timeout: Counter,
    connect_error: Counter,
    per_try_fired: Counter,
    trace: AttemptTrace,
}

/// Per-try timeout and attempt accounting.
#[derive(Debug, Clone)]
pub struct AttemptLayer {
    shared: Arc<Shared>,
}

impl AttemptLayer {
    /// `failure` decides which answers count as `failure` (retry `when` plus breaker
    /// `failure_on`; 5xx when neither is configured).
    pub fn new(
        route: &str,
        upstream: &str,
        per_try: Option<Duration>,
        failure: Conditions,
        metrics: &Metrics,
    ) -> Self {
        let c = |outcome| {
            metrics
                .upstream_attempts
                .get_or_create(&AttemptLabels {
                    route: route.to_string(),
                    upstream: upstream.to_string(),
                    outcome,
                })
                .clone()
        };
        AttemptLayer {
            shared: Arc::new(Shared {
                per_try,
                failure,
                success: c("success"),
                failed: c("failure"),
                timeout: c("timeout"),
                connect_error: c("connect_error"),
                per_try_fired: metrics
                    .timeouts
                    .get_or_create(&TimeoutLabels {
                        route: route.to_string(),
                        kind: "per_try",
                    })
                    .clone(),
                trace: AttemptTrace::new(upstream),
            }),
        }
    }
}

impl<S> Layer<S> for AttemptLayer {
    type Service = AttemptService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AttemptService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The attempt service.
#[derive(Debug, Clone)]
pub struct AttemptService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request<Body>> for AttemptService<S>
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
        let now = Instant::now();
        let request_deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        let per_try_deadline = self.shared.per_try.map(|d| now + d);
        let deadline = match (request_deadline, per_try_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(dl) = deadline {
            if grpc::is_grpc(req.headers()) {
                let left = dl.saturating_duration_since(now);
                req.headers_mut()
                    .insert(grpc::GRPC_TIMEOUT, grpc::encode_timeout(left));
            }
        }
        let span = self.shared.trace.start(&mut req);
        ResponseFuture {
            span,
            inner: self.inner.call(req),
            sleep: per_try_deadline.map(tokio::time::sleep_until),
            guard: Guard {
                shared: self.shared.clone(),
                request_deadline,
                done: false,
            },
        }
    }
}

/// Counts an attempt cut short by the whole-request deadline (its future is dropped).
#[derive(Debug)]
struct Guard {
    shared: Arc<Shared>,
    request_deadline: Option<Instant>,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done && self.request_deadline.is_some_and(|d| Instant::now() >= d) {
            self.shared.timeout.inc();
        }
    }
}

impl Guard {
    fn record(&mut self, outcome: Outcome) {
        self.done = true;
        let s = &self.shared;
        match outcome {
            Outcome::ConnectFailure => s.connect_error.inc(),
            Outcome::Timeout(_) => s.timeout.inc(),
            Outcome::Reset | Outcome::Other => s.failed.inc(),
            Outcome::Refused => 0,
            o @ Outcome::Response { .. } => {
                if s.failure.any(&o) {
                    s.failed.inc()
                } else {
                    s.success.inc()
                }
            }
        };
    }
}

pin_project! {
    /// Response future of [`AttemptService`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<Sleep>,
        guard: Guard,
        span: Option<AttemptSpan>,
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
            this.guard.record(Outcome::of(&r));
            if let Some(span) = this.span.take() {
                span.finish(&r);
            }
            return Poll::Ready(r);
        }
        if let Some(sleep) = this.sleep.as_pin_mut() {
            if sleep.poll(cx).is_ready() {
                this.guard.shared.per_try_fired.inc();
                this.guard.record(Outcome::Timeout(TimeoutKind::PerTry));
                let r = Err(Elapsed {
                    kind: TimeoutKind::PerTry,
                }
                .into());
                if let Some(span) = this.span.take() {
                    span.finish(&r);
                }
                return Poll::Ready(r);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Condition;
    use crate::error::ErrorKind;
    use tower_test::mock;

    fn layer(m: &Metrics, per_try: Option<Duration>) -> AttemptLayer {
        AttemptLayer::new(
            "r",
            "up",
            per_try,
            Conditions::new(&[Condition::Status5xx]),
            m,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_timeout_fires_and_counts() {
        let m = Metrics::new();
        let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(layer(
            &m,
            Some(Duration::from_millis(50)),
        ));
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let err = svc.call(Request::new(Body::Empty)).await.unwrap_err();
        assert_eq!(
            ErrorKind::of_box(&err),
            ErrorKind::Timeout(TimeoutKind::PerTry)
        );
        let text = m.encode();
        assert!(text.contains(r#"breakwater_timeouts_total{route="r",kind="per_try"} 1"#));
        assert!(text.contains(
            r#"breakwater_upstream_attempts_total{route="r",upstream="up",outcome="timeout"} 1"#
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_upstream_gets_time_left() {
        let m = Metrics::new();
        let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(layer(
            &m,
            Some(Duration::from_secs(5)),
        ));
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let mut req = Request::builder()
            .header("content-type", "application/grpc")
            .body(Body::Empty)
            .unwrap();
        req.extensions_mut()
            .insert(Deadline(Instant::now() + Duration::from_millis(300)));
        let fut = svc.call(req);
        let (seen, send) = handle.next_request().await.unwrap();
        let left = grpc::parse_timeout(&seen.headers()["grpc-timeout"]).unwrap();
        assert_eq!(left, Duration::from_millis(300));
        send.send_response(Response::builder().status(503).body(Body::Empty).unwrap());
        fut.await.unwrap();
        assert!(m.encode().contains(r#"outcome="failure"} 1"#));
    }
}
