//! Rate limit: a token bucket per route (`key: global`) or per client (`client_ip`,
//! `header:<name>`), refilled at `rate` and holding at most `burst` tokens. A request that
//! finds the bucket empty is refused at once with [`RateLimited`] (429 with `Retry-After`
//! and the `RateLimit` fields, rendered by `http::synthetic`), never queued. Sits inside
//! the fallback and outside the concurrency limit, so refused requests never take a slot,
//! start a deadline or touch the retry budget.
//!
//! The buckets are governor's GCRA limiters, keyed by a `u64` hash of the client's key
//! (seeded per limiter, so collisions cannot be aimed at). Memory stays bounded whatever
//! keys clients send: a background task evicts idle keys every few seconds, and once the
//! table holds [`MAX_KEYS`] keys, clients not yet in it share one overflow bucket until
//! idle keys have been evicted.
//!
//! tower's `RateLimit` waits in `poll_ready` and is not `Clone`; this one rejects in `call`.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::{Clock, QuantaClock, QuantaInstant, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::{HeaderName, Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service};

use crate::config::values::Rate;
use crate::config::{Mode, RateLimitConfig, RateLimitKey};
use crate::error::{BoxError, RateLimited};
use crate::http::{Body, ClientAddr};
use crate::telemetry::metrics::{Metrics, ObservedLabels};

/// Most client keys a keyed limiter tracks; past this, new clients share one bucket.
pub const MAX_KEYS: usize = 100_000;

/// How often idle keys are evicted.
const EVICT_INTERVAL: Duration = Duration::from_secs(5);

/// Least time between two "key table full" warnings.
const OVERFLOW_WARN_EVERY: Duration = Duration::from_secs(60);

/// Upper bound on `burst x refill period`, in nanoseconds (about 146 years): governor
/// keeps times as `u64` nanoseconds and would overflow past it.
const MAX_SPAN_NANOS: u64 = 1 << 62;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Tags mixed into key hashes so the key spaces never meet.
const TAG_NO_ADDR: u8 = 0;
const TAG_IPV4: u8 = 1;
const TAG_IPV6: u8 = 2;
const TAG_HEADER: u8 = 3;
const TAG_OVERFLOW: u8 = 4;

/// The clock the buckets run on: governor's quanta clock in production (cheap, monotonic),
/// a fake one in unit tests (governor's clock ignores tokio's paused time). Readings are
/// nanoseconds since the clock was made.
#[derive(Debug, Clone)]
pub(crate) enum RouteClock {
    /// Real time.
    Real {
        clock: QuantaClock,
        origin: QuantaInstant,
    },
    /// Time that moves only when a test advances it.
    #[cfg(test)]
    Fake(governor::clock::FakeRelativeClock),
}

impl RouteClock {
    fn real() -> RouteClock {
        let clock = QuantaClock::default();
        let origin = clock.now();
        RouteClock::Real { clock, origin }
    }
}

impl Clock for RouteClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match self {
            RouteClock::Real { clock, origin } => clock.now().duration_since(*origin),
            #[cfg(test)]
            RouteClock::Fake(clock) => clock.now(),
        }
    }
}

/// Hashes of client keys are already seeded and uniform, so the key table uses them as
/// they are instead of hashing them a second time.
#[derive(Debug, Default, Clone, Copy)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if the key type ever stops being a `u64`.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// governor's DashMap state store, keyed by pre-hashed client keys.
type KeyMap = DashMapStateStore<u64, BuildHasherDefault<PreHashed>>;

/// The key table: one GCRA state per key hash, with a cap on the number of keys.
struct KeyTable {
    map: KeyMap,
    cap: usize,
    /// Keys in the map (reserved before insert, so concurrent inserts cannot overshoot
    /// the cap); recounted after each eviction.
    count: AtomicUsize,
    /// The bucket shared by clients that arrive while the table is full.
    overflow_key: u64,
    /// Requests sent to the overflow bucket since the last warning.
    overflow_hits: AtomicU64,
}

impl KeyTable {
    /// Takes a slot for a new key, if the table has room.
    fn reserve(&self) -> bool {
        if self.count.load(Ordering::Relaxed) >= self.cap {
            return false;
        }
        if self.count.fetch_add(1, Ordering::Relaxed) >= self.cap {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// governor's state store for the keyed limiter: a `DashMapStateStore` (shared with the
/// [`Limiter`], which reads its size) that maps a key not yet present onto the overflow
/// key when the table is full, with one map lookup for a known key.
struct KeyStore(Arc<KeyTable>);

impl StateStore for KeyStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let table = &*self.0;
        if let Some(state) = table.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let reserved = table.reserve();
        let key = if reserved {
            *key
        } else {
            table.overflow_hits.fetch_add(1, Ordering::Relaxed);
            table.overflow_key
        };
        let mut inserted = false;
        let state = table.map.entry(key).or_insert_with(|| {
            inserted = true;
            InMemoryState::default()
        });
        if reserved && !inserted {
            // Another request inserted the same key meanwhile.
            table.count.fetch_sub(1, Ordering::Relaxed);
        }
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl ShrinkableKeyedStateStore<u64> for KeyStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let table = &*self.0;
        <KeyMap as ShrinkableKeyedStateStore<u64>>::retain_recent(&table.map, drop_below);
        // Inserts racing with this recount may be missed until the next eviction; the
        // cap is then off by at most the number of requests in flight.
        table.count.store(table.map.len(), Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.0.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.map.len()
    }

    fn is_empty(&self) -> bool {
        self.0.map.is_empty()
    }
}

/// governor's state store for the global bucket: the one GCRA state, shared with the
/// [`Limiter`] so that [`Limiter::tokens`] can read it without taking a token.
struct GlobalStore(Arc<InMemoryState>);

impl StateStore for GlobalStore {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

type DirectLimiter = RateLimiter<NotKeyed, GlobalStore, RouteClock, NoOpMiddleware<Nanos>>;
type KeyedLimiter = RateLimiter<u64, KeyStore, RouteClock, NoOpMiddleware<Nanos>>;

/// The route's one bucket.
struct Global {
    limiter: DirectLimiter,
    state: Arc<InMemoryState>,
    /// The clock reading the limiter's state is relative to.
    start: Nanos,
}

/// What a keyed bucket is per.
enum KeySource {
    ClientIp,
    Header(HeaderName),
}

/// A bucket per client.
struct Keyed {
    limiter: KeyedLimiter,
    table: Arc<KeyTable>,
    source: KeySource,
    hasher: RandomState,
    /// The key of requests that carry no client address.
    no_addr: u64,
    /// Clock reading (nanoseconds) before which no new overflow warning is logged.
    next_warn: AtomicU64,
}

impl Keyed {
    /// The key hash of a request: the header value, else the client IP. No allocation.
    fn key_of(&self, req: &Request<Body>) -> u64 {
        if let KeySource::Header(name) = &self.source {
            if let Some(value) = req.headers().get(name) {
                if !value.is_empty() {
                    return self.hash(TAG_HEADER, value.as_bytes());
                }
            }
        }
        match req.extensions().get::<ClientAddr>() {
            Some(ClientAddr(addr)) => match addr.ip().to_canonical() {
                IpAddr::V4(ip) => self.hash(TAG_IPV4, &ip.octets()),
                IpAddr::V6(ip) => self.hash(TAG_IPV6, &ip.octets()),
            },
            None => self.no_addr,
        }
    }

    fn hash(&self, tag: u8, bytes: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_u8(tag);
        h.write(bytes);
        h.finish()
    }
}

enum Buckets {
    Global(Global),
    Keyed(Keyed),
}

/// The rate-limit state of one route: its bucket(s), settings and metric handles. Created
/// once per route and shared by every clone of the route's stack; a reload keeps it when
/// the route's `rate_limit` block is unchanged (compare [`Limiter::config`]).
pub struct Limiter {
    route: Box<str>,
    cfg: RateLimitConfig,
    burst: u32,
    window_secs: u64,
    /// Refill period of one token in nanoseconds, as governor uses it (at least 1).
    period_nanos: u64,
    observe: bool,
    buckets: Buckets,
    rate_limited: Counter,
    observed: Counter,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("route", &self.route)
            .field("rate", &self.cfg.rate)
            .field("burst", &self.burst)
            .field("key", &self.cfg.key)
            .field("mode", &self.cfg.mode)
            .field("tokens", &self.tokens())
            .field("keys", &self.key_count())
            .finish()
    }
}

impl Limiter {
    /// The limiter of `route`, on the real clock. A keyed limiter also starts the task
    /// that evicts idle keys (it holds only a weak reference and ends with the limiter);
    /// that needs a tokio runtime, and without one the key count is still capped.
    pub fn new(route: &str, cfg: &RateLimitConfig, metrics: &Metrics) -> Arc<Limiter> {
        Limiter::with_max_keys(route, cfg, metrics, MAX_KEYS)
    }

    /// [`Limiter::new`] with another cap on the number of keys.
    pub(crate) fn with_max_keys(
        route: &str,
        cfg: &RateLimitConfig,
        metrics: &Metrics,
        max_keys: usize,
    ) -> Arc<Limiter> {
        let limiter = Limiter::build(route, cfg, metrics, RouteClock::real(), max_keys);
        if matches!(limiter.buckets, Buckets::Keyed(_)) {
            spawn_evictor(&limiter);
        }
        limiter
    }

    /// The limiter itself, on `clock`, without the eviction task.
    pub(crate) fn build(
        route: &str,
        cfg: &RateLimitConfig,
        metrics: &Metrics,
        clock: RouteClock,
        max_keys: usize,
    ) -> Arc<Limiter> {
        let period_nanos = period_nanos(&cfg.rate);
        let wanted = cfg.burst.unwrap_or_else(|| default_burst(&cfg.rate)).max(1);
        let burst = clamp_burst(wanted, period_nanos);
        if burst < wanted {
            tracing::warn!(
                route,
                burst = wanted,
                used = burst,
                "rate limit burst too large for its refill rate; using the largest that fits"
            );
        }
        let quota = quota(period_nanos, burst);
        let window_secs = u128::from(burst) * u128::from(period_nanos);
        let window_secs = u64::try_from(window_secs.div_ceil(NANOS_PER_SEC)).unwrap_or(u64::MAX);

        let source = match &cfg.key {
            RateLimitKey::Global => None,
            RateLimitKey::ClientIp => Some(KeySource::ClientIp),
            RateLimitKey::Header(name) => match HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) => Some(KeySource::Header(name)),
                Err(_) => {
                    // Config validation rejects such names; never fail open or panic.
                    tracing::warn!(route, header = %name, "invalid rate limit header; keying by client IP");
                    Some(KeySource::ClientIp)
                }
            },
        };
        let buckets = match source {
            None => {
                let state = Arc::new(InMemoryState::default());
                let start = clock.now();
                let limiter = RateLimiter::new(quota, GlobalStore(state.clone()), clock);
                Buckets::Global(Global {
                    limiter,
                    state,
                    start,
                })
            }
            Some(source) => {
                let hasher = RandomState::new();
                let tagged = |tag: u8| {
                    let mut h = hasher.build_hasher();
                    h.write_u8(tag);
                    h.finish()
                };
                let table = Arc::new(KeyTable {
                    map: KeyMap::with_hasher(BuildHasherDefault::default()),
                    cap: max_keys.max(1),
                    count: AtomicUsize::new(0),
                    overflow_key: tagged(TAG_OVERFLOW),
                    overflow_hits: AtomicU64::new(0),
                });
                let no_addr = tagged(TAG_NO_ADDR);
                Buckets::Keyed(Keyed {
                    limiter: RateLimiter::new(quota, KeyStore(table.clone()), clock),
                    table,
                    source,
                    hasher,
                    no_addr,
                    next_warn: AtomicU64::new(0),
                })
            }
        };

        Arc::new(Limiter {
            route: route.into(),
            cfg: cfg.clone(),
            burst,
            window_secs,
            period_nanos,
            observe: cfg.mode == Mode::Observe,
            buckets,
            rate_limited: Metrics::route_counter(&metrics.rate_limited, route),
            observed: metrics
                .policy_observed
                .get_or_create(&ObservedLabels {
                    route: route.to_string(),
                    policy: "rate_limit",
                    would: "reject",
                })
                .clone(),
        })
    }

    /// The settings this limiter was built from.
    pub fn config(&self) -> &RateLimitConfig {
        &self.cfg
    }

    /// Bucket size in effect.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Seconds for an empty bucket to refill (the `RateLimit-Policy` window).
    pub fn window_secs(&self) -> u64 {
        self.window_secs
    }

    /// Tokens in the global bucket now, without taking one; `None` when keyed. Read from
    /// the bucket's own state, so it is exact but for the refill during the few
    /// nanoseconds between reading the clock and building the limiter, and, like any
    /// reading of a shared bucket, may be stale by the time it is shown.
    pub fn tokens(&self) -> Option<u32> {
        let Buckets::Global(g) = &self.buckets else {
            return None;
        };
        // A closure that refuses leaves the state untouched and hands back what it saw.
        let tat = match g
            .state
            .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
        {
            Ok(()) | Err(None) => return Some(self.burst),
            Err(Some(tat)) => tat.as_u64(),
        };
        let now = g.limiter.clock().now().duration_since(g.start).as_u64();
        let full = self.period_nanos.saturating_mul(u64::from(self.burst));
        let level = now.saturating_add(full).saturating_sub(tat).min(full) / self.period_nanos;
        Some(u32::try_from(level).unwrap_or(self.burst).min(self.burst))
    }

    /// Client keys tracked now (0 for the global bucket).
    pub fn key_count(&self) -> usize {
        match &self.buckets {
            Buckets::Global(_) => 0,
            Buckets::Keyed(k) => k.limiter.len(),
        }
    }

    /// Drops keys whose bucket has been full for at least one refill period (they are
    /// indistinguishable from new ones) and gives back the memory; warns, at most once a
    /// minute, when clients were sent to the overflow bucket. Run by the eviction task.
    pub(crate) fn evict_idle(&self) {
        let Buckets::Keyed(k) = &self.buckets else {
            return;
        };
        k.limiter.retain_recent();
        k.limiter.shrink_to_fit();
        if k.table.overflow_hits.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = k.limiter.clock().now().as_u64();
        if now < k.next_warn.load(Ordering::Relaxed) {
            return;
        }
        let every = u64::try_from(OVERFLOW_WARN_EVERY.as_nanos()).unwrap_or(u64::MAX);
        k.next_warn
            .store(now.saturating_add(every), Ordering::Relaxed);
        let requests = k.table.overflow_hits.swap(0, Ordering::Relaxed);
        tracing::warn!(
            route = %self.route,
            max_keys = k.table.cap,
            requests,
            "rate limit key table full: new clients share one overflow bucket until idle keys are evicted"
        );
    }

    fn now(&self) -> Nanos {
        match &self.buckets {
            Buckets::Global(g) => g.limiter.clock().now(),
            Buckets::Keyed(k) => k.limiter.clock().now(),
        }
    }

    /// Takes a token for `req`, or says why not. In observe mode always admits.
    fn admit(&self, req: &Request<Body>) -> Result<(), RateLimited> {
        let verdict = match &self.buckets {
            Buckets::Global(g) => g.limiter.check(),
            Buckets::Keyed(k) => k.limiter.check_key(&k.key_of(req)),
        };
        let Err(not_until) = verdict else {
            return Ok(());
        };
        if self.observe {
            self.observed.inc();
            return Ok(());
        }
        self.rate_limited.inc();
        Err(RateLimited {
            retry_after: not_until.wait_time_from(self.now()),
            burst: self.burst,
            window_secs: self.window_secs,
        })
    }
}

/// Refill period of one token in nanoseconds, within what governor can represent.
fn period_nanos(rate: &Rate) -> u64 {
    let per = rate.per.as_nanos() / u128::from(rate.tokens.max(1));
    u64::try_from(per)
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_SPAN_NANOS)
}

/// Tokens added per second, rounded up, at least 1.
fn default_burst(rate: &Rate) -> u32 {
    let per = rate.per.as_nanos().max(1);
    let per_sec = (u128::from(rate.tokens) * NANOS_PER_SEC).div_ceil(per);
    u32::try_from(per_sec).unwrap_or(u32::MAX).max(1)
}

/// The largest burst not above `burst` whose full bucket governor can represent.
fn clamp_burst(burst: u32, period_nanos: u64) -> u32 {
    let most = MAX_SPAN_NANOS / period_nanos.max(1);
    u32::try_from(most).unwrap_or(u32::MAX).min(burst).max(1)
}

/// One token per `period_nanos`, `burst` at most.
fn quota(period_nanos: u64, burst: u32) -> Quota {
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    // `period_nanos` is at least 1, so `with_period` always succeeds; the fallback is the
    // closest valid quota (the shortest period) rather than a panic.
    Quota::with_period(Duration::from_nanos(period_nanos))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

/// Evicts idle keys of `limiter` every [`EVICT_INTERVAL`] until the limiter is dropped.
fn spawn_evictor(limiter: &Arc<Limiter>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(
            route = %limiter.route,
            "no tokio runtime: idle rate limit keys are not evicted (the key count stays capped)"
        );
        return;
    };
    let weak: Weak<Limiter> = Arc::downgrade(limiter);
    runtime.spawn(async move {
        let start = tokio::time::Instant::now() + EVICT_INTERVAL;
        let mut tick = tokio::time::interval_at(start, EVICT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(limiter) = weak.upgrade() else {
                break;
            };
            limiter.evict_idle();
        }
    });
}

/// Applies a [`Limiter`].
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<Limiter>,
}

impl RateLimitLayer {
    /// A layer over a shared limiter.
    pub fn new(limiter: Arc<Limiter>) -> Self {
        RateLimitLayer { limiter }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// The rate-limit service.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> Service<Request<Body>> for RateLimit<S>
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
        match self.limiter.admit(&req) {
            Ok(()) => ResponseFuture::Admitted {
                inner: self.inner.call(req),
            },
            Err(refused) => ResponseFuture::Refused { refused },
        }
    }
}

pin_project! {
    /// Response future of [`RateLimit`].
    #[project = FutProj]
    pub enum ResponseFuture<F> {
        /// Running.
        Admitted { #[pin] inner: F },
        /// Refused; resolves at once.
        Refused { refused: RateLimited },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            FutProj::Admitted { inner } => inner.poll(cx),
            FutProj::Refused { refused } => Poll::Ready(Err((*refused).into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::parse_rate;
    use crate::error::ErrorKind;
    use futures_util::FutureExt;
    use governor::clock::FakeRelativeClock;
    use std::net::SocketAddr;
    use tower_test::mock;

    type Svc = mock::Spawn<RateLimit<mock::Mock<Request<Body>, Response<Body>>>>;

    struct Harness {
        svc: Svc,
        handle: mock::Handle<Request<Body>, Response<Body>>,
        limiter: Arc<Limiter>,
        clock: FakeRelativeClock,
        metrics: Metrics,
    }

    fn cfg(rate: &str, burst: Option<u32>, key: RateLimitKey, mode: Mode) -> RateLimitConfig {
        RateLimitConfig {
            rate: parse_rate(rate).unwrap(),
            burst,
            key,
            mode,
        }
    }

    fn harness_capped(cfg: RateLimitConfig, max_keys: usize) -> Harness {
        let metrics = Metrics::new();
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::build(
            "r",
            &cfg,
            &metrics,
            RouteClock::Fake(clock.clone()),
            max_keys,
        );
        let (svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(
            RateLimitLayer::new(limiter.clone()),
        );
        handle.allow(u64::MAX);
        Harness {
            svc,
            handle,
            limiter,
            clock,
            metrics,
        }
    }

    fn harness(cfg: RateLimitConfig) -> Harness {
        harness_capped(cfg, MAX_KEYS)
    }

    impl Harness {
        /// Sends one request: `Ok` when it reached the inner service (which answers it),
        /// the refusal otherwise.
        fn send(&mut self, req: Request<Body>) -> Result<(), RateLimited> {
            assert!(self.svc.poll_ready().is_ready());
            let fut = self.svc.call(req);
            if let Poll::Ready(Some((_, reply))) = self.handle.poll_request() {
                reply.send_response(Response::new(Body::Empty));
                fut.now_or_never().expect("answered").expect("admitted");
                return Ok(());
            }
            let err = fut
                .now_or_never()
                .expect("a refusal resolves at once")
                .unwrap_err();
            match ErrorKind::of_box(&err) {
                ErrorKind::RateLimited(rl) => Err(rl),
                other => panic!("unexpected {other:?}"),
            }
        }

        fn advance(&self, by: Duration) {
            self.clock.advance(by);
        }
    }

    fn plain() -> Request<Body> {
        Request::new(Body::Empty)
    }

    fn from(ip: [u8; 4], port: u16) -> Request<Body> {
        let mut req = plain();
        req.extensions_mut()
            .insert(ClientAddr(SocketAddr::from((ip, port))));
        req
    }

    fn with_header(value: &str, ip: [u8; 4]) -> Request<Body> {
        let mut req = from(ip, 1000);
        req.headers_mut()
            .insert("x-api-key", value.parse().unwrap());
        req
    }

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let mut h = harness(cfg("10/s", Some(3), RateLimitKey::Global, Mode::Enforce));
        for _ in 0..3 {
            h.send(plain()).unwrap();
        }
        let refused = h.send(plain()).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        assert_eq!(refused.burst, 3);
        assert_eq!(refused.window_secs, 1);
        // part of the period elapsed: only the rest is left to wait
        h.advance(Duration::from_millis(40));
        let refused = h.send(plain()).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(60));
        let text = h.metrics.encode();
        assert!(
            text.contains(r#"breakwater_rate_limited_total{route="r"} 2"#),
            "{text}"
        );
        assert!(!text.contains(r#"policy="rate_limit",would="reject"} 1"#));
    }

    #[test]
    fn refused_error_classifies_as_rate_limited() {
        let mut h = harness(cfg("30/m", None, RateLimitKey::Global, Mode::Enforce));
        assert_eq!(h.limiter.burst(), 1);
        h.send(plain()).unwrap();
        assert!(h.svc.poll_ready().is_ready());
        let err = h.svc.call(plain()).now_or_never().unwrap().unwrap_err();
        assert_eq!(
            ErrorKind::of_box(&err),
            ErrorKind::RateLimited(RateLimited {
                retry_after: Duration::from_secs(2),
                burst: 1,
                window_secs: 2,
            })
        );
    }

    #[test]
    fn refills_after_the_clock_moves() {
        let mut h = harness(cfg("10/s", Some(3), RateLimitKey::Global, Mode::Enforce));
        for _ in 0..3 {
            h.send(plain()).unwrap();
        }
        assert!(h.send(plain()).is_err());
        h.advance(Duration::from_millis(100));
        h.send(plain()).unwrap();
        assert!(h.send(plain()).is_err());
        // a long pause refills to the burst and no further
        h.advance(Duration::from_secs(60));
        for _ in 0..3 {
            h.send(plain()).unwrap();
        }
        assert!(h.send(plain()).is_err());
    }

    #[test]
    fn client_ip_keys_are_independent() {
        let mut h = harness(cfg("1/s", Some(1), RateLimitKey::ClientIp, Mode::Enforce));
        h.send(from([10, 0, 0, 1], 1000)).unwrap();
        // same address, other port: same client
        assert!(h.send(from([10, 0, 0, 1], 2000)).is_err());
        h.send(from([10, 0, 0, 2], 1000)).unwrap();
        assert!(h.send(from([10, 0, 0, 2], 1000)).is_err());
        // an IPv4-mapped IPv6 address is the same client
        let mut mapped = plain();
        let v6 = std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped();
        mapped
            .extensions_mut()
            .insert(ClientAddr(SocketAddr::from((v6, 1000))));
        assert!(h.send(mapped).is_err());
        // no client address: one fixed bucket
        h.send(plain()).unwrap();
        assert!(h.send(plain()).is_err());
        assert_eq!(h.limiter.key_count(), 3);
        assert_eq!(h.limiter.tokens(), None);
    }

    #[test]
    fn header_keys_are_independent_and_fall_back_to_client_ip() {
        let key = RateLimitKey::Header("x-api-key".into());
        let mut h = harness(cfg("1/s", Some(1), key, Mode::Enforce));
        let ip = [192, 0, 2, 7];
        h.send(with_header("alpha", ip)).unwrap();
        assert!(h.send(with_header("alpha", [192, 0, 2, 8])).is_err());
        h.send(with_header("beta", ip)).unwrap();
        // no header: the client IP's own bucket (not shared with any header value)
        h.send(from(ip, 1000)).unwrap();
        assert!(h.send(from(ip, 1000)).is_err());
        // an empty header counts as absent
        assert!(h.send(with_header("", ip)).is_err());
        h.send(from([192, 0, 2, 9], 1000)).unwrap();
        assert_eq!(h.limiter.key_count(), 4);
    }

    #[test]
    fn key_count_is_capped_and_new_keys_share_the_overflow_bucket() {
        let key = RateLimitKey::Header("x-api-key".into());
        let mut h = harness_capped(cfg("1/s", Some(1), key, Mode::Enforce), 100);
        let ip = [198, 51, 100, 1];
        let mut admitted = 0;
        for i in 0..10_000 {
            if h.send(with_header(&format!("k{i}"), ip)).is_ok() {
                admitted += 1;
            }
        }
        // 100 keys with their own bucket, then one shared bucket for everyone else
        assert_eq!(admitted, 101);
        assert!(h.limiter.key_count() <= 101, "{}", h.limiter.key_count());
        h.advance(Duration::from_secs(1));
        // a known key keeps its own bucket
        h.send(with_header("k0", ip)).unwrap();
        // new keys share one
        h.send(with_header("newcomer-1", ip)).unwrap();
        assert!(h.send(with_header("newcomer-2", ip)).is_err());
        let Buckets::Keyed(k) = &h.limiter.buckets else {
            unreachable!()
        };
        assert!(k.table.overflow_hits.load(Ordering::Relaxed) > 9_000);
        // the warning takes the count; idle keys go, and new clients get their own again
        h.advance(Duration::from_secs(5));
        h.limiter.evict_idle();
        assert_eq!(k.table.overflow_hits.load(Ordering::Relaxed), 0);
        assert_eq!(h.limiter.key_count(), 0);
        h.send(with_header("fresh-1", ip)).unwrap();
        h.send(with_header("fresh-2", ip)).unwrap();
        assert_eq!(h.limiter.key_count(), 2);
    }

    #[test]
    fn idle_keys_are_evicted_after_refill() {
        let mut h = harness(cfg("10/s", Some(2), RateLimitKey::ClientIp, Mode::Enforce));
        for i in 0..50 {
            h.send(from([10, 1, 0, i], 1000)).unwrap();
        }
        assert_eq!(h.limiter.key_count(), 50);
        h.limiter.evict_idle();
        assert_eq!(
            h.limiter.key_count(),
            50,
            "buckets still refilling are kept"
        );
        h.advance(Duration::from_secs(1));
        h.send(from([10, 1, 0, 7], 1000)).unwrap();
        h.limiter.evict_idle();
        assert_eq!(
            h.limiter.key_count(),
            1,
            "only the recently used key is kept"
        );
        // the kept key still has its state: one token left of two
        h.send(from([10, 1, 0, 7], 1000)).unwrap();
        assert!(h.send(from([10, 1, 0, 7], 1000)).is_err());
    }

    #[test]
    fn observe_mode_admits_and_counts() {
        let mut h = harness(cfg("1/s", Some(1), RateLimitKey::Global, Mode::Observe));
        for _ in 0..3 {
            h.send(plain()).unwrap();
        }
        let text = h.metrics.encode();
        assert!(
            text.contains(
                r#"breakwater_policy_observed_total{route="r",policy="rate_limit",would="reject"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"breakwater_rate_limited_total{route="r"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn tokens_report_the_global_bucket_level() {
        let mut h = harness(cfg("10/s", Some(5), RateLimitKey::Global, Mode::Enforce));
        assert_eq!(h.limiter.tokens(), Some(5));
        for _ in 0..3 {
            h.send(plain()).unwrap();
        }
        assert_eq!(h.limiter.tokens(), Some(2));
        assert_eq!(h.limiter.tokens(), Some(2), "reading takes no token");
        h.advance(Duration::from_millis(150));
        assert_eq!(h.limiter.tokens(), Some(3));
        h.send(plain()).unwrap();
        h.send(plain()).unwrap();
        h.send(plain()).unwrap();
        assert_eq!(h.limiter.tokens(), Some(0));
        assert!(h.send(plain()).is_err());
        h.advance(Duration::from_secs(10));
        assert_eq!(h.limiter.tokens(), Some(5));
        assert_eq!(h.limiter.key_count(), 0);
    }

    #[test]
    fn settings_defaults_and_extremes() {
        let m = Metrics::new();
        let build = |rate: &str, burst: Option<u32>| {
            Limiter::build(
                "r",
                &cfg(rate, burst, RateLimitKey::Global, Mode::Enforce),
                &m,
                RouteClock::Fake(FakeRelativeClock::default()),
                MAX_KEYS,
            )
        };
        let l = build("100/s", None);
        assert_eq!((l.burst(), l.window_secs()), (100, 1));
        let l = build("90/m", None);
        assert_eq!((l.burst(), l.window_secs()), (2, 2));
        let l = build("1/h", None);
        assert_eq!((l.burst(), l.window_secs()), (1, 3600));
        assert_eq!(l.config().rate.tokens, 1);
        // more tokens per second than nanoseconds: the shortest period governor has
        let l = build("4294967295/s", None);
        assert_eq!(l.burst(), u32::MAX);
        assert_eq!(l.tokens(), Some(u32::MAX));
        // a bucket too large to represent is clamped, not a panic
        let l = build("1/h", Some(u32::MAX));
        assert!(
            l.burst() < u32::MAX && l.burst() > 1_000_000,
            "{}",
            l.burst()
        );
        assert_eq!(l.tokens(), Some(l.burst()));
    }

    #[test]
    fn new_without_a_runtime_still_works() {
        let m = Metrics::new();
        let l = Limiter::new(
            "r",
            &cfg("5/s", None, RateLimitKey::ClientIp, Mode::Enforce),
            &m,
        );
        assert_eq!(l.burst(), 5);
        assert_eq!(l.key_count(), 0);
        assert!(format!("{l:?}").contains("Limiter"));
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_task_holds_no_strong_reference_and_ends_with_the_limiter() {
        let m = Metrics::new();
        let metrics = tokio::runtime::Handle::current().metrics();
        let global = Limiter::new(
            "g",
            &cfg("5/s", None, RateLimitKey::Global, Mode::Enforce),
            &m,
        );
        assert_eq!(metrics.num_alive_tasks(), 0, "no task for a global bucket");
        let l = Limiter::new(
            "r",
            &cfg("5/s", None, RateLimitKey::ClientIp, Mode::Enforce),
            &m,
        );
        assert_eq!(metrics.num_alive_tasks(), 1);
        // the task runs and leaves the limiter alone
        tokio::time::advance(EVICT_INTERVAL * 2).await;
        tokio::task::yield_now().await;
        assert_eq!(metrics.num_alive_tasks(), 1);
        let weak = Arc::downgrade(&l);
        drop(l);
        assert!(weak.upgrade().is_none());
        tokio::time::advance(EVICT_INTERVAL).await;
        for _ in 0..10 {
            if metrics.num_alive_tasks() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(metrics.num_alive_tasks(), 0);
        drop(global);
    }
}
