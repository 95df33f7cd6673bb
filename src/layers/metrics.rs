//! The outermost layer of every route: counts responses by method and status, times
//! them, tracks in-flight requests and writes the access log line. An error reaching
//! it is labelled with the status the rescue boundary will render for it (both read
//! [`ErrorKind`]), so what the client sees and what Prometheus counts agree.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response, Uri};
use pin_project_lite::pin_project;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::error::{BoxError, ErrorKind};
use crate::http::{grpc, synthetic, Attempt, Body, ClientAddr, UpstreamEndpoint};
use crate::telemetry::metrics::{ListenerRouteLabels, Metrics, RequestCounters, RouteLabels};
use crate::telemetry::tracing::{TraceCtx, TraceId};

/// Per-route counters, shared by every clone of the route and kept across reloads.
#[derive(Debug)]
pub struct RouteStats {
    listener: String,
    route: String,
    requests: RequestCounters,
    duration: Histogram,
    inflight: Gauge,
    total: AtomicU64,
    errors: AtomicU64,
}

impl RouteStats {
    /// Resolves the route's metric handles.
    pub fn new(listener: &str, route: &str, metrics: &Metrics) -> Arc<RouteStats> {
        Arc::new(RouteStats {
            listener: listener.to_string(),
            route: route.to_string(),
            requests: RequestCounters::new(metrics, listener, route),
            duration: metrics
                .request_duration
                .get_or_create(&ListenerRouteLabels {
                    listener: listener.to_string(),
                    route: route.to_string(),
                })
                .clone(),
            inflight: metrics
                .inflight
                .get_or_create(&RouteLabels {
                    route: route.to_string(),
                })
                .clone(),
            total: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        })
    }

    /// Requests in flight.
    pub fn inflight(&self) -> i64 {
        self.inflight.get()
    }
    /// Responses sent.
    pub fn requests(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    /// Responses that were 5xx or proxy-made errors (gRPC: a non-OK proxy answer).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// Applies [`RouteStats`] and the access log.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    stats: Arc<RouteStats>,
    access_log: bool,
}

impl MetricsLayer {
    /// A layer over shared stats.
    pub fn new(stats: Arc<RouteStats>, access_log: bool) -> Self {
        MetricsLayer { stats, access_log }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = RouteMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RouteMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

/// The metrics service.
#[derive(Debug, Clone)]
pub struct RouteMetrics<S> {
    inner: S,
    layer: MetricsLayer,
}

/// What the access log needs that the response does not carry.
#[derive(Debug)]
struct LogInfo {
    uri: Uri,
    client: Option<ClientAddr>,
    trace_id: Option<TraceId>,
}

impl<S> Service<Request<Body>> for RouteMetrics<S>
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
        let stats = &self.layer.stats;
        stats.inflight.inc();
        let log = self.layer.access_log.then(|| LogInfo {
            uri: req.uri().clone(),
            client: req.extensions().get::<ClientAddr>().copied(),
            trace_id: req.extensions().get::<TraceCtx>().map(|t| t.trace_id()),
        });
        ResponseFuture {
            method: req.method().clone(),
            is_grpc: grpc::is_grpc(req.headers()),
            inner: self.inner.call(req),
            guard: Inflight(stats.clone()),
            start: Instant::now(),
            log,
        }
    }
}

/// Decrements the in-flight count however the request ends (also when the client leaves).
#[derive(Debug)]
struct Inflight(Arc<RouteStats>);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.inflight.dec();
    }
}

pin_project! {
    /// Response future of [`RouteMetrics`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        method: Method,
        is_grpc: bool,
        guard: Inflight,
        start: Instant,
        log: Option<LogInfo>,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        let stats = &this.guard.0;
        let elapsed = this.start.elapsed();
        let (status, error, reason) = match &result {
            Ok(r) => (r.status().as_u16(), r.status().is_server_error(), None),
            Err(e) => {
                let kind = ErrorKind::of_box(e);
                let status = synthetic::answered_status(kind, *this.is_grpc);
                (status, true, Some(kind.reason()))
            }
        };
        stats.requests.inc(this.method, status);
        stats.duration.observe(elapsed.as_secs_f64());
        stats.total.fetch_add(1, Ordering::Relaxed);
        if error {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(info) = this.log.take() {
            let (attempts, endpoint, proxy_status) = match &result {
                Ok(r) => (
                    r.extensions().get::<Attempt>().map(|a| a.0).unwrap_or(1),
                    r.extensions().get::<UpstreamEndpoint>().map(|e| &*e.0.addr),
                    r.headers()
                        .get(&synthetic::PROXY_STATUS)
                        .and_then(|v| v.to_str().ok()),
                ),
                Err(_) => (0, None, None),
            };
            tracing::info!(
                target: "breakwater::access",
                listener = %stats.listener,
                route = %stats.route,
                client = %info.client.map(|c| c.0.to_string()).unwrap_or_default(),
                method = %this.method,
                path = %info.uri.path(),
                status,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                attempts,
                upstream = %endpoint.unwrap_or("-"),
                reason = reason.unwrap_or("-"),
                proxy_status = %proxy_status.unwrap_or("-"),
                trace_id = %info.trace_id.unwrap_or(TraceId::INVALID),
                "request"
            );
        }
        Poll::Ready(result)
    }
}
