//! The stack builder: turns each validated route into one boxed service, with the
//! layers in SPEC order, and builds the per-listener routers. State that must outlive a
//! config reload (breaker, limiter, retry budget, counters) is carried over from the
//! previous build when the route's block of that kind did not change.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use http::{Request, Response};
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;

use super::client::{Upstream, UpstreamService};
use super::router::Matcher;
use crate::config::{Condition, EffectiveRoute, Loaded};
use crate::error::BoxError;
use crate::http::Body;
use crate::layers::attempt::AttemptLayer;
use crate::layers::circuit_breaker::{Breaker, CircuitBreakerLayer};
use crate::layers::classify::Conditions;
use crate::layers::concurrency_limit::{ConcurrencyLimitLayer, Limit};
use crate::layers::fallback::FallbackLayer;
use crate::layers::metrics::{MetricsLayer, RouteStats};
use crate::layers::rate_limit::{Limiter, RateLimitLayer};
use crate::layers::retry::{RetryLayer, RetryPolicy};
use crate::layers::timeout::TimeoutLayer;
use crate::layers::trace::TraceLayer;
use crate::telemetry::{Metrics, Tracing};

/// Every route's service has this one shape.
pub type RouteService = BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>;

/// State objects of a route that survive reloads.
#[derive(Debug, Clone)]
pub struct RouteState {
    /// Request counters for metrics and `/status`.
    pub stats: Arc<RouteStats>,
    /// The breaker, if configured.
    pub breaker: Option<Arc<Breaker>>,
    /// The rate limiter, if configured.
    pub limiter: Option<Arc<Limiter>>,
    /// The concurrency limit, if configured.
    pub limit: Option<Arc<Limit>>,
    /// The retry policy and its budget, if configured.
    pub retry: Option<Arc<RetryPolicy>>,
}

/// A built route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Its resolved config.
    pub spec: EffectiveRoute,
    /// Its compiled match conditions.
    pub matcher: Matcher,
    /// The layered service.
    pub service: RouteService,
    /// Its long-lived state.
    pub state: RouteState,
}

/// The routes of one listener, in match order.
#[derive(Debug, Clone)]
pub struct Router {
    /// Listener name.
    pub listener: String,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
}

impl Router {
    /// The first route matching the request.
    pub fn find<B>(&self, req: &Request<B>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(req))
    }
}

/// Every listener's router, built from one config.
#[derive(Debug, Clone)]
pub struct Routers {
    /// Routers in listener order.
    pub listeners: Vec<Router>,
}

impl Routers {
    /// Every route, in config order.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.listeners.iter().flat_map(|l| l.routes.iter())
    }

    /// The route of this name.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes().find(|r| r.spec.name == name)
    }

    /// Builds every router; `prev` lends state to routes whose blocks did not change.
    /// Must run inside a tokio runtime (limiters start their eviction task).
    pub fn build(
        loaded: &Loaded,
        prev: Option<&Routers>,
        metrics: &Metrics,
        tracing: &Tracing,
    ) -> Result<Routers, BoxError> {
        let access_log = loaded.config.telemetry.access_log;
        let mut upstreams = HashMap::new();
        for (name, cfg) in &loaded.config.upstreams {
            upstreams.insert(name.as_str(), Upstream::new(name, cfg)?);
        }
        let old: HashMap<&str, &Route> = prev
            .map(|p| p.routes().map(|r| (r.spec.name.as_str(), r)).collect())
            .unwrap_or_default();
        let mut listeners: Vec<Router> = loaded
            .config
            .listeners
            .iter()
            .map(|l| Router {
                listener: l.name.value.clone(),
                routes: Vec::new(),
            })
            .collect();
        for spec in &loaded.routes {
            let upstream = upstreams
                .get(spec.upstream.as_str())
                .ok_or_else(|| format!("route {}: unknown upstream {}", spec.name, spec.upstream))?
                .clone();
            let route = build_route(
                spec,
                upstream,
                old.get(spec.name.as_str()).copied(),
                metrics,
                tracing,
                access_log,
            );
            if let Some(l) = listeners.iter_mut().find(|l| l.listener == spec.listener) {
                l.routes.push(route);
            }
        }
        Ok(Routers { listeners })
    }
}

fn keep<T, C: PartialEq>(
    new_cfg: Option<&C>,
    old_cfg: Option<&C>,
    old_state: Option<&Arc<T>>,
    make: impl FnOnce(&C) -> Arc<T>,
) -> Option<Arc<T>> {
    let cfg = new_cfg?;
    match (old_cfg, old_state) {
        (Some(o), Some(s)) if o == cfg => Some(s.clone()),
        _ => Some(make(cfg)),
    }
}

/// Builds one route's stack, outermost first as SPEC section 2 orders it.
pub fn build_route(
    spec: &EffectiveRoute,
    upstream: Arc<Upstream>,
    prev: Option<&Route>,
    metrics: &Metrics,
    tracing: &Tracing,
    access_log: bool,
) -> Route {
    let name = spec.name.as_str();
    let prev_spec = prev.map(|p| &p.spec);
    let prev_state = prev.map(|p| &p.state);
    let state = RouteState {
        stats: match prev_state {
            Some(s) if prev_spec.is_some_and(|p| p.listener == spec.listener) => s.stats.clone(),
            _ => RouteStats::new(&spec.listener, name, metrics),
        },
        breaker: keep(
            spec.circuit_breaker.as_ref(),
            prev_spec.and_then(|p| p.circuit_breaker.as_ref()),
            prev_state.and_then(|s| s.breaker.as_ref()),
            |c| Breaker::new(name, c, metrics),
        ),
        limiter: keep(
            spec.rate_limit.as_ref(),
            prev_spec.and_then(|p| p.rate_limit.as_ref()),
            prev_state.and_then(|s| s.limiter.as_ref()),
            |c| Limiter::new(name, c, metrics),
        ),
        limit: keep(
            spec.concurrency_limit.as_ref(),
            prev_spec.and_then(|p| p.concurrency_limit.as_ref()),
            prev_state.and_then(|s| s.limit.as_ref()),
            |c| Limit::new(name, c, metrics),
        ),
        retry: keep(
            spec.retry.as_ref(),
            prev_spec.and_then(|p| p.retry.as_ref()),
            prev_state.and_then(|s| s.retry.as_ref()),
            |c| RetryPolicy::new(name, c, metrics),
        ),
    };

    // What counts as a failed attempt: the retry conditions and the breaker's, else 5xx.
    let mut failure: Vec<Condition> = Vec::new();
    if let Some(r) = &spec.retry {
        failure.extend(r.when.iter().copied());
    }
    if let Some(c) = &spec.circuit_breaker {
        failure.extend(c.failure_on.iter().copied());
    }
    if failure.is_empty() {
        failure.push(Condition::Status5xx);
    }
    let classify_grpc = failure.iter().any(|c| matches!(c, Condition::Grpc(_)));
    let per_try = spec
        .retry
        .as_ref()
        .and_then(|r| r.per_try_timeout)
        .map(|d| d.0);

    let stack = ServiceBuilder::new()
        // Outermost: continues the client's trace; the server span covers everything.
        .layer(TraceLayer::new(tracing, &spec.listener, name))
        // Sees every response and every error exactly as the client will.
        .layer(MetricsLayer::new(state.stats.clone(), access_log))
        // Outside the limiters, so their refusals can be replaced too.
        .option_layer(
            spec.fallback
                .as_ref()
                .map(|f| FallbackLayer::new(name, f, metrics)),
        )
        // Refused requests never reach the retry budget or start a deadline.
        .option_layer(state.limiter.clone().map(RateLimitLayer::new))
        .option_layer(state.limit.clone().map(ConcurrencyLimitLayer::new))
        // Covers every attempt and backoff; honours a client's grpc-timeout even when off.
        .layer(TimeoutLayer::new(name, spec.timeout.map(|d| d.0), metrics))
        .option_layer(state.retry.clone().map(RetryLayer::new))
        // Inside retry: every attempt is seen, and an open breaker stops retries at once.
        .option_layer(state.breaker.clone().map(CircuitBreakerLayer::new))
        .layer(AttemptLayer::new(
            name,
            upstream.name(),
            per_try,
            Conditions::new(&failure),
            metrics,
        ))
        .service(UpstreamService::new(
            upstream,
            classify_grpc,
            spec.strip_prefix.as_deref(),
        ));

    Route {
        spec: spec.clone(),
        matcher: Matcher::new(&spec.matcher),
        service: BoxCloneSyncService::new(stack),
        state,
    }
}

/// `breakwater routes`: each route with its effective stack, outermost first.
pub fn describe(loaded: &Loaded) -> String {
    let mut out = String::new();
    for l in &loaded.config.listeners {
        let _ = writeln!(out, "listener {} ({})", l.name.value, l.address.value);
        for r in loaded.routes.iter().filter(|r| r.listener == l.name.value) {
            let _ = writeln!(out, "  route {} -> upstream {}", r.name, r.upstream);
            let _ = writeln!(out, "    match: {}", describe_match(r));
            if let Some(p) = &r.strip_prefix {
                let _ = writeln!(out, "    strip_prefix: {p}");
            }
            let _ = writeln!(out, "    stack (outermost first):");
            let _ = writeln!(out, "      metrics + trace");
            if let Some(f) = &r.fallback {
                let when: Vec<_> = f
                    .when
                    .iter()
                    .map(|w| {
                        serde_json::to_value(w)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default()
                    })
                    .collect();
                let grpc = f
                    .grpc_status
                    .map(|c| format!(", grpc_status {c}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "      fallback: when [{}] -> {}{grpc}",
                    when.join(", "),
                    f.status
                );
            }
            if let Some(rl) = &r.rate_limit {
                let burst = rl
                    .burst
                    .unwrap_or_else(|| (rl.rate.per_second().ceil() as u32).max(1));
                let _ = writeln!(
                    out,
                    "      rate_limit: {} burst {} key {} ({})",
                    rl.rate,
                    burst,
                    key_str(&rl.key),
                    mode(rl.mode)
                );
            }
            if let Some(c) = &r.concurrency_limit {
                let _ = writeln!(
                    out,
                    "      concurrency_limit: max {} ({})",
                    c.max,
                    mode(c.mode)
                );
            }
            match &r.timeout {
                Some(t) => {
                    let _ = writeln!(out, "      timeout: {t}");
                }
                None => {
                    let _ = writeln!(
                        out,
                        "      timeout: off (a client grpc-timeout still applies)"
                    );
                }
            }
            if let Some(rt) = &r.retry {
                let when: Vec<String> = rt.when.iter().map(|c| c.label()).collect();
                let _ = writeln!(
                    out,
                    "      retry: attempts {}, backoff {}..{} jitter {}, when [{}], budget {} + {}/s, max_buffered_body {}B",
                    rt.attempts,
                    rt.backoff.base,
                    rt.backoff.max,
                    format!("{:?}", rt.backoff.jitter).to_lowercase(),
                    when.join(", "),
                    rt.budget.ratio,
                    rt.budget.min_per_second,
                    rt.max_buffered_body.0
                );
            }
            if let Some(cb) = &r.circuit_breaker {
                let consec = cb
                    .consecutive_failures
                    .map(|n| format!(", or {n} in a row"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "      circuit_breaker: trip at {} of >= {} calls in {}{consec}; open {}, {} probes ({})",
                    cb.failure_rate, cb.minimum_requests, cb.window, cb.open_for, cb.half_open_requests, mode(cb.mode)
                );
            }
            let per_try = r
                .retry
                .as_ref()
                .and_then(|rt| rt.per_try_timeout)
                .map(|d| format!("per_try_timeout {d}"))
                .unwrap_or_else(|| "no per-try timeout".into());
            let _ = writeln!(out, "      attempt: {per_try}");
            let _ = writeln!(out, "      upstream {}", r.upstream);
        }
    }
    out
}

fn describe_match(r: &EffectiveRoute) -> String {
    let m = &r.matcher;
    let mut parts = Vec::new();
    if let Some(p) = &m.path {
        parts.push(format!("path {p}"));
    }
    if let Some(p) = &m.path_prefix {
        parts.push(format!("path_prefix {p}"));
    }
    if let Some(s) = &m.grpc_service {
        parts.push(format!("grpc_service {s}"));
    }
    if let Some(ms) = &m.methods {
        parts.push(format!("methods [{}]", ms.join(", ")));
    }
    if let Some(h) = &m.host {
        parts.push(format!("host {h}"));
    }
    for (k, v) in m.headers.iter().flatten() {
        parts.push(format!("header {k}={v}"));
    }
    if parts.is_empty() {
        "everything".into()
    } else {
        parts.join(", ")
    }
}

fn key_str(k: &crate::config::RateLimitKey) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn mode(m: crate::config::Mode) -> &'static str {
    match m {
        crate::config::Mode::Enforce => "enforce",
        crate::config::Mode::Observe => "observe",
    }
}
