//! Distributed tracing of a route: the outermost layer of every route stack (just
//! outside metrics) reads the client's W3C `traceparent`, starts the request's SERVER
//! span when spans are exported (and the sampler keeps the trace), and puts a
//! [`TraceCtx`] in the request extensions. When the request ends it records the status
//! and what the inner layers did, read from the outcome: a refusal or failure by its
//! [`ErrorKind`] (`rate_limited`, `circuit_open`, `overloaded`, `timeout`,
//! `upstream_unavailable`), a fallback answer by its [`FallbackAnswer`], and the number of
//! attempts from the response's [`Attempt`].
//!
//! [`AttemptTrace`] is used by the attempt layer (the innermost one): each upstream
//! attempt gets a CLIENT span under the server span (`breakwater.attempt` = n, and a
//! `retry` event on the server span from the second attempt on), and the upstream
//! receives a `traceparent` whose parent is that attempt span. With export off (or the
//! trace not sampled) the attempt gets a fresh, unexported span id instead, so the
//! upstream still continues the client's trace. `tracestate` is passed through as the
//! client sent it (dropped with a malformed or missing `traceparent`, as W3C asks).
//!
//! Spans end when the response head is ready; the body streams on afterwards.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::SystemTime;

use http::{Method, Request, Response};
use opentelemetry::trace::{Event, SpanId, SpanKind, Status};
use opentelemetry::{KeyValue, StringValue};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::fallback::FallbackAnswer;
use crate::error::{BoxError, ErrorKind};
use crate::http::{grpc, split_host_port, synthetic, Attempt, Body, UpstreamEndpoint};
use crate::sync::lock;
use crate::telemetry::span::{keys, AttrKey, Attributes, Recorder, SpanRecord};
use crate::telemetry::tracing::{
    client_trace_state, format_traceparent, parse_traceparent, random_span_id, random_trace_id,
    Parent, Recording, TraceCtx, Tracing, TRACEPARENT, TRACESTATE,
};

/// The name of every upstream attempt span.
pub const ATTEMPT_SPAN: &str = "upstream attempt";

/// The attribute bytes a span starts with room for: all of a span's attributes
/// unless its path or host is long.
const ATTR_BYTES: usize = 256;

/// Route-level data of the server spans, resolved when the route is built.
#[derive(Debug)]
struct RouteTrace {
    recorder: Recorder,
    /// `{method} {route}` for each method of [`METHODS`], then `HTTP {route}` for
    /// the others (as the conventions ask: the name stays low-cardinality).
    names: Vec<StringValue>,
    /// `http.request.method` and `http.route` for each method of [`METHODS`], then
    /// for the others.
    fixed: Vec<Attributes>,
}

/// Continues or starts the trace of each request of one route.
#[derive(Debug, Clone)]
pub struct TraceLayer {
    route: Option<Arc<RouteTrace>>,
}

impl TraceLayer {
    /// A layer for one route; records spans only when `tracing` exports them.
    pub fn new(tracing: &Tracing, _listener: &str, route: &str) -> Self {
        TraceLayer {
            route: tracing.recorder().map(|r| {
                Arc::new(RouteTrace {
                    recorder: r.clone(),
                    names: METHODS
                        .iter()
                        .map(|(_, name)| name)
                        .chain(std::iter::once(&"HTTP"))
                        .map(|m| StringValue::from(Arc::<str>::from(format!("{m} {route}"))))
                        .collect(),
                    fixed: per_method((&keys::ROUTE, route)).collect(),
                })
            }),
        }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = TraceService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TraceService {
            inner,
            route: self.route.clone(),
        }
    }
}

/// The trace service.
#[derive(Debug, Clone)]
pub struct TraceService<S> {
    inner: S,
    route: Option<Arc<RouteTrace>>,
}

impl<S> Service<Request<Body>> for TraceService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let parent = parse_traceparent(req.headers());
        if parent.is_none() && req.headers().contains_key(&TRACESTATE) {
            req.headers_mut().remove(&TRACESTATE);
        }
        let (ctx, span) = match &self.route {
            None => (TraceCtx::unrecorded(parent), None),
            Some(rt) => rt.start(&req, parent),
        };
        req.extensions_mut().insert(ctx);
        ResponseFuture {
            inner: self.inner.call(req),
            span: ServerSpan(span),
        }
    }
}

impl RouteTrace {
    fn start(&self, req: &Request<Body>, parent: Option<Parent>) -> (TraceCtx, Option<ServerRec>) {
        let trace_id = parent.map_or_else(random_trace_id, |p| p.trace_id);
        if !self
            .recorder
            .should_sample(parent.map(|p| p.sampled), trace_id)
        {
            let ctx = match parent {
                Some(p) => TraceCtx::unrecorded(Some(p)),
                None => TraceCtx::sampled_out(trace_id),
            };
            return (ctx, None);
        }
        let method = method_index(req.method());
        let mut attrs = Attributes::with_capacity(ATTR_BYTES);
        attrs.extend(&self.fixed[method]);
        attrs.str(&keys::URL_PATH, req.uri().path());
        // Only what the HTTP semantic conventions ask of a server span: each attribute
        // costs bytes in every export.
        let authority = req.uri().authority().map(|a| a.as_str()).or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        if let Some((host, port)) = authority.and_then(split_host_port) {
            attrs.str(&keys::SERVER_ADDRESS, host);
            if let Some(port) = port {
                attrs.int(&keys::SERVER_PORT, i64::from(port));
            }
        }
        let mut span = SpanRecord::start(
            trace_id,
            parent.map_or(SpanId::INVALID, |p| p.span_id),
            parent.is_some(),
            SpanKind::Server,
            self.names[method].clone(),
            attrs,
        );
        if parent.is_some() {
            span.trace_state = client_trace_state(req.headers());
        }
        let rec = Recording {
            span_id: span.span_id,
            events: Arc::new(Mutex::new(Vec::new())),
            recorder: self.recorder.clone(),
            is_grpc: grpc::is_grpc(req.headers()),
        };
        let server = ServerRec {
            span,
            rec: rec.clone(),
        };
        (TraceCtx::recorded(trace_id, rec), Some(server))
    }
}

/// A server span being recorded, with what the layers below it share of it.
struct ServerRec {
    span: SpanRecord,
    rec: Recording,
}

impl ServerRec {
    fn end(mut self) {
        let mut events = lock(&self.rec.events);
        if !events.is_empty() {
            // Retries happened before the outcome's events: keep time order.
            events.append(&mut self.span.events);
            std::mem::swap(&mut self.span.events, &mut *events);
        }
        drop(events);
        self.rec.recorder.finish(self.span);
    }
}

/// The server span of a request in flight; ended as cancelled if the request is
/// dropped before it completes (the client went away).
struct ServerSpan(Option<ServerRec>);

impl Drop for ServerSpan {
    fn drop(&mut self) {
        if let Some(mut rec) = self.0.take() {
            rec.span.status = Status::error("request cancelled");
            rec.span.attributes.str(&keys::ERROR_TYPE, "cancelled");
            rec.end();
        }
    }
}

impl ServerSpan {
    fn finish(&mut self, result: &Result<Response<Body>, BoxError>) {
        let Some(mut rec) = self.0.take() else { return };
        let is_grpc = rec.rec.is_grpc;
        let span = &mut rec.span;
        match result {
            Ok(res) => {
                record_answer(span, res, is_grpc);
                if let Some(a) = res.extensions().get::<Attempt>() {
                    span.attributes.int(&keys::ATTEMPTS, i64::from(a.0));
                }
                if let Some(reason) = fallback_reason(res) {
                    if let Some(r) = refusal(reason) {
                        span.add_event(r, Vec::new());
                    }
                    span.add_event("fallback", vec![KeyValue::new("breakwater.reason", reason)]);
                }
            }
            Err(e) => {
                let kind = ErrorKind::of_box(e);
                let status = synthetic::answered_status(kind, is_grpc);
                span.attributes.int(&keys::STATUS_CODE, i64::from(status));
                if is_grpc {
                    span.attributes.int(
                        &keys::GRPC_STATUS_CODE,
                        i64::from(synthetic::grpc_code(kind)),
                    );
                }
                span.attributes.str(&keys::ERROR_TYPE, kind.reason());
                let attrs = match kind {
                    ErrorKind::RateLimited(rl) => vec![KeyValue::new(
                        "breakwater.retry_after_ms",
                        i64::try_from(rl.retry_after.as_millis()).unwrap_or(i64::MAX),
                    )],
                    _ => Vec::new(),
                };
                span.add_event(kind.reason(), attrs);
                // As the semantic conventions ask of server spans: 4xx is the client's doing.
                if synthetic::http_status(kind).is_server_error() {
                    span.status = Status::error(e.to_string());
                }
            }
        }
        rec.end();
    }
}

/// What server and attempt spans both record of a response: its status, its gRPC
/// status, and a 5xx as an error.
fn record_answer(span: &mut SpanRecord, res: &Response<Body>, is_grpc: bool) {
    let status = res.status();
    span.attributes
        .int(&keys::STATUS_CODE, i64::from(status.as_u16()));
    if let Some(code) = is_grpc.then(|| grpc::status(res.headers())).flatten() {
        span.attributes
            .int(&keys::GRPC_STATUS_CODE, i64::from(code));
    }
    if status.is_server_error() {
        span.attributes.str(&keys::ERROR_TYPE, status.as_str());
        span.status = Status::error("");
    }
}

/// The reason of a fallback answer, if the fallback layer made this response.
fn fallback_reason(res: &Response<Body>) -> Option<&'static str> {
    res.extensions().get::<FallbackAnswer>().map(|f| f.0)
}

/// The event name of a refusal the fallback layer replaced.
fn refusal(reason: &str) -> Option<&'static str> {
    Some(match reason {
        "rate_limited" => "rate_limited",
        "circuit_open" => "circuit_open",
        "overloaded" => "overloaded",
        "timeout" => "timeout",
        "upstream_unavailable" => "upstream_unavailable",
        _ => return None,
    })
}

pin_project! {
    /// Response future of [`TraceService`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: ServerSpan,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        this.span.finish(&result);
        Poll::Ready(result)
    }
}

/// Per-route attempt tracing, held by the attempt layer.
#[derive(Debug, Clone)]
pub struct AttemptTrace {
    /// `breakwater.upstream` and `http.request.method` for each method of
    /// [`METHODS`], then for the others.
    fixed: Arc<[Attributes]>,
}

impl AttemptTrace {
    /// For attempts sent to the upstream cluster `upstream`.
    pub fn new(upstream: &str) -> Self {
        AttemptTrace {
            fixed: per_method((&keys::UPSTREAM, upstream)).collect(),
        }
    }

    /// Starts one attempt: writes the upstream's `traceparent` (parent: the attempt
    /// span, or a fresh unexported span id) and returns the span to finish when the
    /// attempt ends, if it is recorded. Does nothing for a request the trace layer
    /// did not see.
    pub fn start<B>(&self, req: &mut Request<B>) -> Option<AttemptSpan> {
        let ctx = req.extensions().get::<TraceCtx>()?;
        let trace_id = ctx.trace_id();
        let (span_id, sampled, span) = match ctx.recording() {
            None => (random_span_id(), ctx.is_sampled(), None),
            Some(rec) => {
                let n = req.extensions().get::<Attempt>().map_or(1, |a| a.0);
                let span = self.start_span(trace_id, rec, req.method(), n);
                (
                    span.span_id,
                    true,
                    Some((span, rec.recorder.clone(), rec.is_grpc)),
                )
            }
        };
        req.headers_mut().insert(
            TRACEPARENT.clone(),
            format_traceparent(trace_id, span_id, sampled),
        );
        span.map(|s| AttemptSpan(Some(s)))
    }

    fn start_span(
        &self,
        trace_id: opentelemetry::trace::TraceId,
        rec: &Recording,
        method: &Method,
        n: u32,
    ) -> SpanRecord {
        if n > 1 {
            lock(&rec.events).push(Event::new(
                "retry",
                SystemTime::now(),
                vec![KeyValue::new("breakwater.attempt", i64::from(n))],
                0,
            ));
        }
        let mut attrs = Attributes::with_capacity(ATTR_BYTES);
        attrs.int(&keys::ATTEMPT, i64::from(n));
        attrs.extend(&self.fixed[method_index(method)]);
        SpanRecord::start(
            trace_id,
            rec.span_id,
            false,
            SpanKind::Client,
            ATTEMPT_SPAN.into(),
            attrs,
        )
    }
}

/// The span of one upstream attempt; ended as cancelled if the attempt is dropped
/// unfinished (the whole-request deadline cut it short, or the client went away).
#[derive(Debug)]
pub struct AttemptSpan(Option<(SpanRecord, Recorder, bool)>);

impl AttemptSpan {
    /// Records the attempt's outcome and ends the span.
    pub fn finish(mut self, result: &Result<Response<Body>, BoxError>) {
        let Some((mut span, recorder, is_grpc)) = self.0.take() else {
            return;
        };
        match result {
            Ok(res) => {
                record_answer(&mut span, res, is_grpc);
                if let Some(UpstreamEndpoint(ep)) = res.extensions().get() {
                    span.attributes.extend(&ep.span_attributes);
                }
            }
            Err(e) => {
                span.attributes
                    .str(&keys::ERROR_TYPE, ErrorKind::of_box(e).reason());
                span.status = Status::error(e.to_string());
            }
        }
        recorder.finish(span);
    }
}

impl Drop for AttemptSpan {
    fn drop(&mut self) {
        if let Some((mut span, recorder, _)) = self.0.take() {
            span.attributes.str(&keys::ERROR_TYPE, "cancelled");
            span.status = Status::error("attempt cancelled");
            recorder.finish(span);
        }
    }
}

/// The methods the HTTP semantic conventions name; any other is `_OTHER`.
const METHODS: [(Method, &str); 9] = [
    (Method::GET, "GET"),
    (Method::POST, "POST"),
    (Method::PUT, "PUT"),
    (Method::DELETE, "DELETE"),
    (Method::HEAD, "HEAD"),
    (Method::OPTIONS, "OPTIONS"),
    (Method::PATCH, "PATCH"),
    (Method::CONNECT, "CONNECT"),
    (Method::TRACE, "TRACE"),
];

/// The index of a method in [`METHODS`], or `METHODS.len()` for any other.
fn method_index(m: &Method) -> usize {
    METHODS
        .iter()
        .position(|(k, _)| k == m)
        .unwrap_or(METHODS.len())
}

/// For each index [`method_index`] returns, the attributes every span of a route
/// with that method starts with: `http.request.method` (the conventions' `_OTHER`
/// for a method outside the known set, so cardinality stays bounded) and `also`.
fn per_method<'a>(also: (&'a AttrKey, &'a str)) -> impl Iterator<Item = Attributes> + 'a {
    METHODS
        .iter()
        .map(|(_, n)| *n)
        .chain(std::iter::once("_OTHER"))
        .map(move |m| {
            let mut a = Attributes::default();
            a.str(&keys::METHOD, m);
            a.str(also.0, also.1);
            a
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CircuitOpen;
    use crate::telemetry::span::Scalar;
    use crate::telemetry::tracing::parse_traceparent_value;
    use opentelemetry::Value;
    use tower_test::mock;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    type Collect = Arc<Mutex<Vec<SpanRecord>>>;

    fn exporting(sample_ratio: f64) -> (Tracing, Collect) {
        Tracing::in_memory(sample_ratio)
    }

    fn spans(c: &Collect) -> Vec<SpanRecord> {
        c.lock().unwrap().clone()
    }

    fn attr(s: &SpanRecord, key: &str) -> Option<Value> {
        s.attributes.get(key).map(|v| match v {
            Scalar::Str(s) => Value::from(s.to_string()),
            Scalar::I64(i) => Value::from(i),
            Scalar::Bool(b) => Value::from(b),
            Scalar::F64(f) => Value::from(f),
        })
    }

    /// Runs one request through the trace layer; the "stack" below it stamps each of
    /// `attempts` attempts like the attempt layer does and answers with `answer`.
    async fn run(
        tracing: &Tracing,
        req: Request<Body>,
        attempts: u32,
        answer: Result<Response<Body>, BoxError>,
    ) -> (Vec<Request<()>>, Result<Response<Body>, BoxError>) {
        let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(
            TraceLayer::new(tracing, "test", "r"),
        );
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = svc.call(req);
        let (seen, send) = handle.next_request().await.unwrap();
        let at = AttemptTrace::new("up");
        let mut upstream = Vec::new();
        for n in 1..=attempts {
            let mut r = Request::builder()
                .method(seen.method().clone())
                .body(())
                .unwrap();
            *r.headers_mut() = seen.headers().clone();
            *r.extensions_mut() = seen.extensions().clone();
            r.extensions_mut().insert(Attempt(n));
            let span = at.start(&mut r);
            let res: Result<Response<Body>, BoxError> = if n < attempts {
                Ok(Response::builder().status(503).body(Body::Empty).unwrap())
            } else {
                Ok(Response::new(Body::Empty))
            };
            if let Some(s) = span {
                s.finish(&res);
            }
            upstream.push(r);
        }
        match answer {
            Ok(mut res) => {
                res.extensions_mut().insert(Attempt(attempts.max(1)));
                send.send_response(res)
            }
            Err(e) => send.send_error(e),
        }
        (upstream, fut.await)
    }

    fn get(tp: Option<&str>, ts: Option<&str>) -> Request<Body> {
        let mut b = Request::get("/orders/1").header("host", "api.example.com:8080");
        if let Some(tp) = tp {
            b = b.header("traceparent", tp);
        }
        if let Some(ts) = ts {
            b = b.header("tracestate", ts);
        }
        b.body(Body::Empty).unwrap()
    }

    #[tokio::test]
    async fn off_continues_the_client_trace_with_a_fresh_span() {
        let ok = Ok(Response::new(Body::Empty));
        let (up, res) = run(&Tracing::disabled(), get(Some(TP), Some("a=1,b=2")), 1, ok).await;
        res.unwrap();
        let tp = up[0].headers()["traceparent"].as_bytes();
        let p = parse_traceparent_value(tp).unwrap();
        let client = parse_traceparent_value(TP.as_bytes()).unwrap();
        assert_eq!(p.trace_id, client.trace_id);
        assert_ne!(p.span_id, client.span_id);
        assert!(p.sampled);
        assert_eq!(up[0].headers()["tracestate"], "a=1,b=2");
        let ctx = up[0].extensions().get::<TraceCtx>().unwrap();
        assert_eq!(ctx.trace_id(), client.trace_id);
        assert!(ctx.recording().is_none());
    }

    #[tokio::test]
    async fn malformed_traceparent_starts_a_new_trace_and_drops_tracestate() {
        let bad = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        let ok = Ok(Response::new(Body::Empty));
        let (up, _) = run(&Tracing::disabled(), get(Some(bad), Some("a=1")), 2, ok).await;
        let a = parse_traceparent_value(up[0].headers()["traceparent"].as_bytes()).unwrap();
        let b = parse_traceparent_value(up[1].headers()["traceparent"].as_bytes()).unwrap();
        assert_eq!(a.trace_id, b.trace_id, "one trace across attempts");
        assert_ne!(a.span_id, b.span_id, "a span id per attempt");
        assert!(up[0].headers().get("tracestate").is_none());
    }

    #[tokio::test]
    async fn exported_spans_nest_and_carry_the_conventions() {
        let (t, c) = exporting(1.0);
        let ok = Ok(Response::new(Body::Empty));
        let (up, res) = run(&t, get(Some(TP), Some("a=1")), 2, ok).await;
        res.unwrap();
        let spans = spans(&c);
        assert_eq!(spans.len(), 3);
        let server = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Server)
            .unwrap();
        let client = parse_traceparent_value(TP.as_bytes()).unwrap();
        assert_eq!(server.trace_id, client.trace_id);
        assert_eq!(server.parent_span_id, client.span_id);
        assert!(server.parent_span_is_remote);
        assert_eq!(server.name.as_str(), "GET r");
        assert_eq!(
            attr(server, "http.request.method"),
            Some(Value::from("GET"))
        );
        assert_eq!(attr(server, "http.route"), Some(Value::from("r")));
        assert_eq!(attr(server, "url.path"), Some(Value::from("/orders/1")));
        assert_eq!(
            attr(server, "server.address"),
            Some(Value::from("api.example.com"))
        );
        assert_eq!(attr(server, "server.port"), Some(Value::from(8080i64)));
        assert_eq!(
            attr(server, "http.response.status_code"),
            Some(Value::from(200i64))
        );
        assert_eq!(attr(server, "breakwater.attempts"), Some(Value::from(2i64)));
        assert_eq!(server.trace_state.get("a"), Some("1"));
        let retry: Vec<_> = server.events.iter().filter(|e| e.name == "retry").collect();
        assert_eq!(retry.len(), 1);

        let attempts: Vec<_> = spans
            .iter()
            .filter(|s| s.span_kind == SpanKind::Client)
            .collect();
        assert_eq!(attempts.len(), 2);
        for (i, a) in attempts.iter().enumerate() {
            assert_eq!(a.name.as_str(), ATTEMPT_SPAN);
            assert_eq!(a.parent_span_id, server.span_id);
            assert!(!a.parent_span_is_remote);
            assert_eq!(
                attr(a, "breakwater.attempt"),
                Some(Value::from(i as i64 + 1))
            );
            let seen = parse_traceparent_value(up[i].headers()["traceparent"].as_bytes()).unwrap();
            assert_eq!(seen.span_id, a.span_id);
            assert_eq!(seen.trace_id, client.trace_id);
        }
        assert_eq!(
            attr(attempts[0], "http.response.status_code"),
            Some(Value::from(503i64))
        );
        assert!(matches!(attempts[0].status, Status::Error { .. }));
    }

    #[tokio::test]
    async fn refusals_and_fallbacks_become_events() {
        let (t, c) = exporting(1.0);
        let (_, res) = run(&t, get(None, None), 0, Err(Box::new(CircuitOpen))).await;
        assert!(res.is_err());
        let fallback = Response::builder()
            .status(503)
            .header(
                "proxy-status",
                "breakwater; error=connection_limit_reached; details=\"overloaded\"",
            )
            .extension(FallbackAnswer("overloaded"))
            .body(Body::Empty)
            .unwrap();
        let _ = run(&t, get(None, None), 0, Ok(fallback)).await;
        let spans = spans(&c);
        assert_eq!(spans.len(), 2);
        let names = |s: &SpanRecord| {
            s.events
                .iter()
                .map(|e| e.name.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&spans[0]), ["circuit_open"]);
        assert_eq!(
            attr(&spans[0], "http.response.status_code"),
            Some(Value::from(503i64))
        );
        assert_eq!(
            attr(&spans[0], "error.type"),
            Some(Value::from("circuit_open"))
        );
        assert!(matches!(spans[0].status, Status::Error { .. }));
        assert_eq!(names(&spans[1]), ["overloaded", "fallback"]);
        // a new trace: no parent
        assert_eq!(spans[0].parent_span_id, SpanId::INVALID);
    }

    #[tokio::test]
    async fn unsampled_traces_propagate_without_recording() {
        let (t, c) = exporting(0.0);
        let ok = || Ok(Response::new(Body::Empty));
        let (up, _) = run(&t, get(None, None), 1, ok()).await;
        let p = parse_traceparent_value(up[0].headers()["traceparent"].as_bytes()).unwrap();
        assert!(!p.sampled);
        assert!(spans(&c).is_empty());
        // A sampled parent is always followed.
        let (up, _) = run(&t, get(Some(TP), None), 1, ok()).await;
        let p = parse_traceparent_value(up[0].headers()["traceparent"].as_bytes()).unwrap();
        assert!(p.sampled);
        assert_eq!(spans(&c).len(), 2);
    }

    #[tokio::test]
    async fn cancelled_requests_still_end_their_span() {
        let (t, c) = exporting(1.0);
        let (mut svc, mut handle) =
            mock::spawn_layer::<Request<Body>, Response<Body>, _>(TraceLayer::new(&t, "l", "r"));
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = svc.call(get(None, None));
        drop(fut);
        let spans = spans(&c);
        assert_eq!(spans.len(), 1);
        assert_eq!(
            attr(&spans[0], "error.type"),
            Some(Value::from("cancelled"))
        );
    }
}
