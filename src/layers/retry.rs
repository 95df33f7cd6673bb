//! Retry with exponential backoff and jitter, bounded by a retry budget. Sits inside the
//! whole-request timeout (so backoff waits count against the deadline) and outside the
//! circuit breaker (so every attempt is seen by the breaker, and an open breaker stops
//! further retries at once: `circuit_open` is never retried).
//!
//! A retry happens only when it is safe and useful:
//! - the outcome matches a `when` condition (an expired whole-request deadline, and
//!   the proxy's own refusals, never do);
//! - the method is eligible, except after a connect failure (nothing was sent);
//! - the request body can be replayed (see [`ReplayBody`]);
//! - the retry budget has room (retries <= ratio x requests over 10 s + a floor);
//! - the wait (backoff, or the upstream's `Retry-After` / `grpc-retry-pushback-ms`)
//!   ends before the deadline.
//!
//! Backoff for retry n (n = 1 for the first retry): `d = min(base * 2^(n-1), max)`,
//! then `full` jitter waits uniform in [0, d], `equal` waits d/2 + uniform in [0, d/2],
//! `none` waits d.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response};
use http_body::Body as _;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, Service, ServiceExt};

use super::classify::{Conditions, GrpcPushback, Outcome};
use crate::config::{BackoffConfig, Jitter, RetryConfig, RetryMethods};
use crate::error::BoxError;
use crate::http::replay::ReplayBody;
use crate::http::{grpc, Attempt, Body, ClientAddr, Deadline};
use crate::telemetry::metrics::{Metrics, ReasonLabels};
use crate::telemetry::tracing::TraceCtx;

/// How long the budget remembers requests.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

static ATTEMPT_HEADER: http::HeaderName = http::HeaderName::from_static("x-breakwater-attempt");
static PREVIOUS_ATTEMPTS: http::HeaderName =
    http::HeaderName::from_static("grpc-previous-rpc-attempts");
static PUSHBACK: http::HeaderName = http::HeaderName::from_static("grpc-retry-pushback-ms");

/// The wait before retry `n` (1-based), before jitter: `min(base * 2^(n-1), max)`.
pub fn backoff_ceiling(cfg: &BackoffConfig, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
    cfg.base.0.saturating_mul(factor).min(cfg.max.0)
}

/// The jittered wait before retry `n`, with `r` uniform in [0, 1).
pub fn backoff(cfg: &BackoffConfig, n: u32, r: f64) -> Duration {
    let d = backoff_ceiling(cfg, n);
    let r = r.clamp(0.0, 1.0);
    match cfg.jitter {
        Jitter::Full => d.mul_f64(r),
        Jitter::Equal => d / 2 + (d / 2).mul_f64(r),
        Jitter::None => d,
    }
}

/// Per-route retry state shared by every request: the budget and metric handles.
#[derive(Debug)]
pub struct RetryPolicy {
    cfg: RetryConfig,
    when: Conditions,
    budget: TpsBudget,
    retries: Vec<Counter>,
    exhausted: Counter,
}

impl RetryPolicy {
    /// Builds the policy; the config was validated, so the budget parameters are in range.
    pub fn new(route: &str, cfg: &RetryConfig, metrics: &Metrics) -> Arc<RetryPolicy> {
        // TpsBudget panics outside 0..=1000 "percent" (a ratio, despite the name);
        // config validation keeps ratio in 0..=10, clamp anyway.
        let ratio = cfg.budget.ratio.clamp(0.0, 1000.0) as f32;
        let floor = cfg.budget.min_per_second.min(i32::MAX as u32 - 1);
        Arc::new(RetryPolicy {
            when: Conditions::new(&cfg.when),
            retries: cfg
                .when
                .iter()
                .map(|c| {
                    metrics
                        .retries
                        .get_or_create(&ReasonLabels {
                            route: route.to_string(),
                            reason: c.label(),
                        })
                        .clone()
                })
                .collect(),
            exhausted: Metrics::route_counter(&metrics.retry_budget_exhausted, route),
            budget: TpsBudget::new(BUDGET_WINDOW, floor, ratio),
            cfg: cfg.clone(),
        })
    }

    fn method_allowed(&self, m: &Method) -> bool {
        match &self.cfg.methods {
            RetryMethods::Idempotent => matches!(
                *m,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::PUT
                    | Method::DELETE
                    | Method::TRACE
            ),
            RetryMethods::Any => true,
            RetryMethods::List(l) => l.iter().any(|x| x == m.as_str()),
        }
    }
}

/// Applies a [`RetryPolicy`].
#[derive(Debug, Clone)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
}

impl RetryLayer {
    /// A layer over a shared policy.
    pub fn new(policy: Arc<RetryPolicy>) -> Self {
        RetryLayer { policy }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The retry service.
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

impl<S> Service<Request<Body>> for Retry<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The ready clone takes this call; a fresh clone serves later attempts.
        let inner = self.inner.clone();
        let first = std::mem::replace(&mut self.inner, inner);
        Box::pin(run(first, self.policy.clone(), req))
    }
}

/// What the next attempt sends as its body.
enum Replay {
    /// No body at all: every attempt sends none.
    Empty,
    /// A replayable body; the handle is never polled itself.
    Body(ReplayBody),
}

async fn run<S>(
    mut svc: S,
    policy: Arc<RetryPolicy>,
    req: Request<Body>,
) -> Result<Response<Body>, BoxError>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    policy.budget.deposit();
    let (parts, body) = req.into_parts();
    let is_grpc = grpc::is_grpc(&parts.headers);
    // gRPC calls are all POST by protocol; as in gRPC's own retry design, the listed
    // status codes decide whether a call may be repeated.
    let method_ok = is_grpc || policy.method_allowed(&parts.method);
    let deadline = parts.extensions.get::<Deadline>().map(|d| d.0);
    let cap = usize::try_from(policy.cfg.max_buffered_body.0).unwrap_or(usize::MAX);

    let (replay, mut body) = if body.is_end_stream() {
        (Replay::Empty, Body::Empty)
    } else {
        let first = ReplayBody::new(body, cap);
        match first.replay() {
            Some(handle) => (Replay::Body(handle), Body::Replay { inner: first }),
            None => (Replay::Empty, Body::Replay { inner: first }),
        }
    };
    let body_replayable = !matches!(replay, Replay::Empty) || body.is_end_stream();

    // Attempt 1 takes the original request as it is; only a retry pays for rebuilding
    // one (method, URI, the saved headers and the request-scoped extensions we use).
    let saved_headers = parts.headers.clone();
    let client = parts.extensions.get::<ClientAddr>().copied();
    let trace = parts.extensions.get::<TraceCtx>().cloned();
    let (method, uri, version) = (parts.method.clone(), parts.uri.clone(), parts.version);
    let mut first = Some(parts);

    let mut n: u32 = 1;
    loop {
        let mut req = match first.take() {
            Some(p) => Request::from_parts(p, body),
            None => {
                let mut r = Request::new(body);
                *r.method_mut() = method.clone();
                *r.uri_mut() = uri.clone();
                *r.version_mut() = version;
                *r.headers_mut() = saved_headers.clone();
                let ext = r.extensions_mut();
                if let Some(c) = client {
                    ext.insert(c);
                }
                if let Some(d) = deadline {
                    ext.insert(Deadline(d));
                }
                if let Some(t) = &trace {
                    ext.insert(t.clone());
                }
                ext.insert(Attempt(n));
                r
            }
        };
        req.headers_mut()
            .insert(ATTEMPT_HEADER.clone(), HeaderValue::from(n));
        if is_grpc && n > 1 {
            req.headers_mut()
                .insert(PREVIOUS_ATTEMPTS.clone(), HeaderValue::from(n - 1));
        }

        let result = match svc.ready().await {
            Ok(s) => s.call(req).await,
            Err(e) => Err(e),
        }
        .map(|mut res| {
            // Absent means 1: the common case adds nothing to the response.
            if n > 1 {
                res.extensions_mut().insert(Attempt(n));
            }
            res
        });
        if n >= policy.cfg.attempts {
            return result;
        }
        let outcome = Outcome::of(&result);
        let Some(cond) = policy.when.matches(&outcome) else {
            return result;
        };
        let nothing_sent = outcome == Outcome::ConnectFailure;
        if !method_ok && !nothing_sent {
            return result;
        }
        let next_body = match &replay {
            Replay::Empty if body_replayable => Body::Empty,
            Replay::Empty => return result,
            Replay::Body(handle) => match handle.replay() {
                Some(b) => Body::Replay { inner: b },
                None => return result,
            },
        };

        let mut wait = backoff(&policy.cfg.backoff, n, rand::random::<f64>());
        if policy.cfg.respect_retry_after {
            if let Ok(res) = &result {
                match upstream_wait(res) {
                    Some(UpstreamWait::Never) => return result,
                    Some(UpstreamWait::After(d)) => wait = d,
                    None => {}
                }
            }
        }
        if let Some(dl) = deadline {
            if Instant::now() + wait >= dl {
                return result;
            }
        }
        if !policy.budget.withdraw() {
            policy.exhausted.inc();
            return result;
        }
        if let Some(c) = policy.retries.get(cond) {
            c.inc();
        }
        tracing::debug!(attempt = n, reason = %policy.cfg.when[cond].label(), wait_ms = wait.as_millis() as u64, "retrying");
        drop(result);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        body = next_body;
        n += 1;
    }
}

enum UpstreamWait {
    Never,
    After(Duration),
}

/// The wait an upstream asked for: `grpc-retry-pushback-ms` (negative: do not retry)
/// or `Retry-After` in seconds.
fn upstream_wait(res: &Response<Body>) -> Option<UpstreamWait> {
    let pushback = match res.headers().get(&PUSHBACK) {
        Some(v) => v.to_str().ok().and_then(|v| v.trim().parse::<i64>().ok()),
        // Real gRPC servers send pushback in the trailers, read ahead by the client.
        None => res.extensions().get::<GrpcPushback>().map(|p| p.0),
    };
    if let Some(ms) = pushback {
        return Some(if ms < 0 {
            UpstreamWait::Never
        } else {
            UpstreamWait::After(Duration::from_millis(ms as u64))
        });
    }
    let v = res
        .headers()
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(UpstreamWait::After(Duration::from_secs(secs)));
    }
    // The HTTP-date form (RFC 9110 section 10.2.3); a date in the past means now.
    let at = httpdate::parse_http_date(v).ok()?;
    let wait = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Some(UpstreamWait::After(wait))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::{Dur, Size};
    use crate::config::{BudgetConfig, Condition};
    use crate::error::{ErrorKind, UpstreamError, UpstreamErrorKind};
    use http_body_util::BodyExt;
    use tower_test::mock;

    fn cfg(attempts: u32) -> RetryConfig {
        RetryConfig {
            attempts,
            per_try_timeout: None,
            backoff: BackoffConfig {
                base: Dur::millis(10),
                max: Dur::millis(100),
                jitter: Jitter::None,
            },
            when: vec![Condition::ConnectFailure, Condition::GatewayError],
            methods: RetryMethods::Idempotent,
            budget: BudgetConfig {
                ratio: 0.2,
                min_per_second: 100,
            },
            max_buffered_body: Size(1024),
            respect_retry_after: true,
        }
    }

    fn status(code: u16) -> Response<Body> {
        Response::builder().status(code).body(Body::Empty).unwrap()
    }

    type Handle = mock::Handle<Request<Body>, Response<Body>>;
    type Spawned = mock::Spawn<Retry<mock::Mock<Request<Body>, Response<Body>>>>;

    fn spawn(cfg: &RetryConfig, m: &Metrics) -> (Spawned, Handle) {
        let policy = RetryPolicy::new("r", cfg, m);
        mock::spawn_layer(RetryLayer::new(policy))
    }

    #[test]
    fn backoff_bounds_per_jitter_kind() {
        let mut b = BackoffConfig {
            base: Dur::millis(25),
            max: Dur::millis(250),
            jitter: Jitter::None,
        };
        assert_eq!(backoff_ceiling(&b, 1), Duration::from_millis(25));
        assert_eq!(backoff_ceiling(&b, 2), Duration::from_millis(50));
        assert_eq!(backoff_ceiling(&b, 4), Duration::from_millis(200));
        assert_eq!(backoff_ceiling(&b, 5), Duration::from_millis(250));
        assert_eq!(backoff_ceiling(&b, 40), Duration::from_millis(250));
        assert_eq!(backoff(&b, 3, 0.7), Duration::from_millis(100));

        b.jitter = Jitter::Full;
        assert_eq!(backoff(&b, 3, 0.0), Duration::ZERO);
        assert_eq!(backoff(&b, 3, 0.5), Duration::from_millis(50));
        b.jitter = Jitter::Equal;
        assert_eq!(backoff(&b, 3, 0.0), Duration::from_millis(50));
        assert!(backoff(&b, 3, 0.999_999) > Duration::from_micros(99_990));

        // spread: full jitter covers its whole range, equal only the upper half
        for (jitter, lo, hi) in [(Jitter::Full, 0.0, 100.0), (Jitter::Equal, 50.0, 100.0)] {
            b.jitter = jitter;
            let samples: Vec<f64> = (0..2000)
                .map(|_| backoff(&b, 3, rand::random::<f64>()).as_secs_f64() * 1000.0)
                .collect();
            let min = samples.iter().cloned().fold(f64::MAX, f64::min);
            let max = samples.iter().cloned().fold(0.0, f64::max);
            let mean = samples.iter().sum::<f64>() / samples.len() as f64;
            assert!(min >= lo && max <= hi, "{jitter:?}: {min}..{max}");
            assert!(
                min < lo + 5.0 && max > hi - 5.0,
                "{jitter:?} spread {min}..{max}"
            );
            let mid = (lo + hi) / 2.0;
            assert!((mean - mid).abs() < 5.0, "{jitter:?} mean {mean}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_gateway_errors_until_success_with_attempt_headers() {
        let m = Metrics::new();
        let (mut svc, mut handle) = spawn(&cfg(3), &m);
        handle.allow(10);
        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(svc.call(Request::new(Body::Empty)));
        for (n, code) in [(1, 503), (2, 502), (3, 200)] {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(
                req.headers()["x-breakwater-attempt"],
                n.to_string().as_str()
            );
            send.send_response(status(code));
        }
        assert_eq!(fut.await.unwrap().unwrap().status(), 200);
        let text = m.encode();
        assert!(
            text.contains(r#"breakwater_retries_total{route="r",reason="gateway-error"} 2"#),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_attempts() {
        let m = Metrics::new();
        let (mut svc, mut handle) = spawn(&cfg(2), &m);
        handle.allow(10);
        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(svc.call(Request::new(Body::Empty)));
        for _ in 0..2 {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(status(503));
        }
        assert_eq!(fut.await.unwrap().unwrap().status(), 503);
    }

    #[tokio::test(start_paused = true)]
    async fn post_is_not_retried_but_connect_failure_is() {
        let m = Metrics::new();
        let (mut svc, mut handle) = spawn(&cfg(3), &m);
        handle.allow(10);
        let post = || {
            Request::builder()
                .method("POST")
                .body(Body::full("x"))
                .unwrap()
        };
        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(svc.call(post()));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(status(503));
        assert_eq!(fut.await.unwrap().unwrap().status(), 503);

        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(svc.call(post()));
        let (req, send) = handle.next_request().await.unwrap();
        drop(req); // the client drops the request when it cannot connect
        send.send_error(UpstreamError {
            kind: UpstreamErrorKind::Connect,
            source: "refused".into(),
        });
        let (req, send) = handle.next_request().await.unwrap();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"x", "the body is replayed");
        send.send_response(status(200));
        assert_eq!(fut.await.unwrap().unwrap().status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn body_over_the_cap_is_not_retried() {
        let m = Metrics::new();
        let (mut svc, mut handle) = spawn(&cfg(3), &m);
        handle.allow(10);
        assert!(svc.poll_ready().is_ready());
        let big = Request::builder()
            .method("PUT")
            .body(Body::full(vec![b'a'; 4096]))
            .unwrap();
        let fut = tokio::spawn(svc.call(big));
        let (req, send) = handle.next_request().await.unwrap();
        drop(req);
        send.send_response(status(503));
        assert_eq!(fut.await.unwrap().unwrap().status(), 503);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_a_failure_burst() {
        let m = Metrics::new();
        let mut c = cfg(2);
        c.budget = BudgetConfig {
            ratio: 0.0,
            min_per_second: 1,
        };
        let (mut svc, mut handle) = spawn(&c, &m);
        handle.allow(1000);
        let mut upstream_calls = 0;
        for _ in 0..20 {
            assert!(svc.poll_ready().is_ready());
            let mut fut = tokio::spawn(svc.call(Request::new(Body::Empty)));
            loop {
                tokio::select! {
                    r = handle.next_request() => {
                        let (_, send) = r.unwrap();
                        upstream_calls += 1;
                        send.send_response(status(503));
                    }
                    res = &mut fut => { res.unwrap().unwrap(); break; }
                }
            }
        }
        // a floor of 1/s over a 10 s window allows about 10 retries, not 20
        assert!(upstream_calls <= 20 + 11, "{upstream_calls} calls");
        assert!(m
            .encode()
            .contains("breakwater_retry_budget_exhausted_total{route=\"r\"}"));
        let text = m.encode();
        let exhausted: u64 = text
            .lines()
            .find(|l| l.starts_with("breakwater_retry_budget_exhausted_total{route=\"r\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(exhausted >= 5, "exhausted {exhausted}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_that_cannot_finish_before_the_deadline() {
        let m = Metrics::new();
        let (mut svc, mut handle) = spawn(&cfg(3), &m);
        handle.allow(10);
        assert!(svc.poll_ready().is_ready());
        let mut req = Request::new(Body::Empty);
        req.extensions_mut()
            .insert(Deadline(Instant::now() + Duration::from_millis(5)));
        let fut = tokio::spawn(svc.call(req));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(status(503));
        assert_eq!(fut.await.unwrap().unwrap().status(), 503);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_sets_the_wait_and_negative_pushback_stops() {
        let m = Metrics::new();
        let (mut svc, mut handle) = spawn(&cfg(3), &m);
        handle.allow(10);
        assert!(svc.poll_ready().is_ready());
        let start = Instant::now();
        let fut = tokio::spawn(svc.call(Request::new(Body::Empty)));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(
            Response::builder()
                .status(503)
                .header("retry-after", "2")
                .body(Body::Empty)
                .unwrap(),
        );
        let (_, send) = handle.next_request().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        send.send_response(status(200));
        fut.await.unwrap().unwrap();

        assert!(svc.poll_ready().is_ready());
        let req = Request::builder()
            .header("content-type", "application/grpc")
            .body(Body::Empty)
            .unwrap();
        let fut = tokio::spawn(svc.call(req));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(
            Response::builder()
                .status(503)
                .header("grpc-retry-pushback-ms", "-1")
                .body(Body::Empty)
                .unwrap(),
        );
        assert_eq!(fut.await.unwrap().unwrap().status(), 503);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_and_request_timeouts_are_never_retried() {
        let m = Metrics::new();
        let mut c = cfg(3);
        c.when = vec![
            Condition::Timeout,
            Condition::Status5xx,
            Condition::ConnectFailure,
        ];
        let (mut svc, mut handle) = spawn(&c, &m);
        handle.allow(10);
        assert!(svc.poll_ready().is_ready());
        let fut = tokio::spawn(svc.call(Request::new(Body::Empty)));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(crate::error::CircuitOpen);
        let err = fut.await.unwrap().unwrap_err();
        assert_eq!(ErrorKind::of_box(&err), ErrorKind::CircuitOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_retries_carry_previous_attempts() {
        let m = Metrics::new();
        let mut c = cfg(2);
        c.when = vec![Condition::Grpc(14)];
        let (mut svc, mut handle) = spawn(&c, &m);
        handle.allow(10);
        assert!(svc.poll_ready().is_ready());
        let req = Request::builder()
            .method("POST")
            .header("content-type", "application/grpc")
            .body(Body::Empty)
            .unwrap();
        let fut = tokio::spawn(svc.call(req));
        let (req, send) = handle.next_request().await.unwrap();
        assert!(req.headers().get("grpc-previous-rpc-attempts").is_none());
        send.send_response(
            Response::builder()
                .header("grpc-status", "14")
                .body(Body::Empty)
                .unwrap(),
        );
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.headers()["grpc-previous-rpc-attempts"], "1");
        send.send_response(
            Response::builder()
                .header("grpc-status", "0")
                .body(Body::Empty)
                .unwrap(),
        );
        assert_eq!(fut.await.unwrap().unwrap().headers()["grpc-status"], "0");
    }
}
