//! Circuit breaker: per route, closed / open / half-open. While closed it counts every
//! attempt's outcome in a sliding time window and trips (opens) on the `failure_rate`
//! (once `minimum_requests` were seen in the window), on `consecutive_failures` and on
//! the `slow_call` rate. While open it refuses every attempt at once with
//! [`CircuitOpen`] (503); after `open_for` it turns half-open and lets
//! `half_open_requests` probes through: all must succeed to close it again, any failure
//! re-opens it. Operators can force it open or closed from the admin API.
//!
//! Sits inside retry and outside the per-try timeout, so it sees every attempt (a
//! per-try timeout is a failure it counts) and an open breaker stops further retries
//! at once. Like every layer here it rejects in `call` and never parks in `poll_ready`.
//!
//! The closed path is a few atomic operations and takes no lock: the window is a ring
//! of time buckets whose counters carry the bucket's epoch and are reset lazily, and the
//! state lives in one atomic word (`generation << 8 | state`). A mutex is taken only to
//! change state. The generation, bumped on every transition, keeps the outcome of an
//! attempt that started under an earlier state (or an earlier round of probes) from
//! counting in the current one.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::config::{CircuitBreakerConfig, Mode};
use crate::error::{BoxError, CircuitOpen, TimeoutKind};
use crate::http::{Body, Deadline};
use crate::layers::classify::{Conditions, Outcome};
use crate::sync::lock;
use crate::telemetry::metrics::{Metrics, ObservedLabels, RouteLabels, TransitionLabels};

/// The state of a breaker, spelled the same in `/status`, metric labels and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls flow and are counted.
    Closed = 0,
    /// Calls are refused until `open_for` has passed.
    Open = 1,
    /// A few probes are let through to test the upstream; the rest are refused.
    HalfOpen = 2,
    /// Forced open by an operator: everything is refused.
    ForcedOpen = 3,
    /// Forced closed by an operator: never trips, still counts.
    ForcedClosed = 4,
}

impl State {
    const ALL: [State; 5] = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::ForcedOpen,
        State::ForcedClosed,
    ];

    /// `closed`, `open`, `half_open`, `forced_open` or `forced_closed`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::ForcedClosed => "forced_closed",
        }
    }

    /// The value of `breakwater_circuit_state`: 0 closed, 1 open, 2 half-open,
    /// 3 forced open, 4 forced closed.
    pub fn gauge_value(self) -> i64 {
        self as i64
    }

    fn index(self) -> usize {
        self as usize
    }

    fn from_code(code: u64) -> State {
        match code {
            0 => State::Closed,
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::ForcedOpen,
            _ => State::ForcedClosed,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operator asks of a breaker (`POST /circuit/<route>/<action>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForceAction {
    /// `force-open`: refuse everything until told otherwise.
    ForceOpen,
    /// `force-closed`: never trip, but keep counting.
    ForceClosed,
    /// `auto`: back to closed with a fresh window, and to normal operation.
    Auto,
}

impl ForceAction {
    /// Parses `force-open`, `force-closed` or `auto`.
    pub fn parse(s: &str) -> Option<ForceAction> {
        match s {
            "force-open" => Some(ForceAction::ForceOpen),
            "force-closed" => Some(ForceAction::ForceClosed),
            "auto" => Some(ForceAction::Auto),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The state word and the probe word.

/// `generation << 8 | state`.
fn pack(generation: u64, state: State) -> u64 {
    (generation << 8) | state as u64
}

fn state_of(word: u64) -> State {
    State::from_code(word & 0xff)
}

fn generation_of(word: u64) -> u64 {
    word >> 8
}

/// The probe round of a half-open breaker in one word, so that taking, returning and
/// crediting a slot is one compare-and-swap that also checks the round:
/// `generation (low 32 bits) << 32 | admitted << 16 | succeeded`.
fn pack_probes(generation: u64, admitted: u64, succeeded: u64) -> u64 {
    ((generation & 0xffff_ffff) << 32) | ((admitted & 0xffff) << 16) | (succeeded & 0xffff)
}

fn probes_generation(p: u64) -> u64 {
    p >> 32
}

fn probes_admitted(p: u64) -> u64 {
    (p >> 16) & 0xffff
}

fn probes_succeeded(p: u64) -> u64 {
    p & 0xffff
}

const ONE_ADMITTED: u64 = 1 << 16;

// ---------------------------------------------------------------------------------------
// The sliding window.

/// Buckets across the window: the window slides in steps of a tenth of its length.
const BUCKETS: usize = 10;

/// A counter tagged with the epoch (bucket number since the breaker's creation) it
/// counts for: `epoch << 32 | count`. A write for a newer epoch resets it; a read for an
/// epoch outside the window sees 0. So no sweeper and no lock is needed.
#[derive(Debug, Default)]
struct Tagged(AtomicU64);

/// Whether epoch tag `a` is later than `b` (wrapping).
fn later(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < (1 << 31)
}

impl Tagged {
    fn add(&self, tag: u32) {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let cur_tag = (cur >> 32) as u32;
            if cur_tag == tag {
                // 2^32 calls in one bucket would be needed to carry into the tag.
                self.0.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if later(cur_tag, tag) {
                // This writer was delayed by a whole window; its bucket was reused.
                return;
            }
            match self.0.compare_exchange_weak(
                cur,
                (u64::from(tag) << 32) | 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    fn get(&self, tag_now: u32) -> u64 {
        let v = self.0.load(Ordering::Relaxed);
        let tag = (v >> 32) as u32;
        if tag_now.wrapping_sub(tag) < BUCKETS as u32 {
            v & 0xffff_ffff
        } else {
            0
        }
    }

    fn clear(&self) {
        self.0.fetch_and(!0xffff_ffff, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Bucket {
    requests: Tagged,
    failures: Tagged,
    slow: Tagged,
}

/// Calls, failures and slow calls in the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    requests: u64,
    failures: u64,
    slow: u64,
}

#[derive(Debug)]
struct Window {
    buckets: [Bucket; BUCKETS],
    bucket_nanos: u64,
}

impl Window {
    fn new(window: Duration) -> Window {
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Window {
            buckets: Default::default(),
            bucket_nanos: (nanos / BUCKETS as u64).max(1),
        }
    }

    fn epoch(&self, at: u64) -> u64 {
        at / self.bucket_nanos
    }

    fn record(&self, at: u64, failure: bool, slow: bool) {
        let epoch = self.epoch(at);
        let tag = epoch as u32; // wraps; compared with wrapping arithmetic
        let Some(b) = self.buckets.get((epoch % BUCKETS as u64) as usize) else {
            return;
        };
        b.requests.add(tag);
        if failure {
            b.failures.add(tag);
        }
        if slow {
            b.slow.add(tag);
        }
    }

    fn counts(&self, at: u64) -> Counts {
        let tag = self.epoch(at) as u32;
        self.buckets.iter().fold(Counts::default(), |c, b| Counts {
            requests: c.requests + b.requests.get(tag),
            failures: c.failures + b.failures.get(tag),
            slow: c.slow + b.slow.get(tag),
        })
    }

    fn reset(&self) {
        for b in &self.buckets {
            b.requests.clear();
            b.failures.clear();
            b.slow.clear();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The breaker.

/// The shared state of one route's breaker. Created once per route and kept across
/// config reloads while the route's breaker config is unchanged.
#[derive(Debug)]
pub struct Breaker {
    name: String,
    cfg: CircuitBreakerConfig,
    failure_on: Conditions,
    observe: bool,
    /// Times are stored as nanoseconds since this instant.
    base: Instant,
    open_for: u64,
    slow_after: Option<Duration>,
    failure_rate: f64,
    slow_rate: Option<f64>,
    minimum_requests: u64,
    consecutive_limit: Option<u32>,
    max_probes: u64,
    /// `generation << 8 | state`; written only under `transition`.
    word: AtomicU64,
    /// When the current state was entered (for open: when it opened).
    since: AtomicU64,
    /// Half-open: the probe round (see [`pack_probes`]).
    probes: AtomicU64,
    /// Half-open: when the last free probe slot was taken (`u64::MAX`: not full yet).
    probes_full_since: AtomicU64,
    consecutive: AtomicU32,
    window: Window,
    transition: Mutex<()>,
    gauge: Gauge,
    transitions: [[Option<Counter>; 5]; 5],
    rejected: Counter,
    observed: Counter,
}

/// Whether the breaker can go from `from` to `to` (for pre-resolving metric handles).
fn reachable(from: State, to: State) -> bool {
    from != to
        && match to {
            State::Open => matches!(from, State::Closed | State::HalfOpen),
            State::HalfOpen => from == State::Open,
            State::Closed | State::ForcedOpen | State::ForcedClosed => true,
        }
}

/// How an admitted call is accounted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A closed (or forced-closed) breaker's call: counted in the window.
    Counted,
    /// A half-open probe: its verdict closes or re-opens the breaker.
    Probe,
    /// Let through in observe mode where it would have been refused: not counted.
    Untracked,
}

enum Admission {
    Pass { word: u64, kind: Kind },
    Reject,
}

/// What one finished call means for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Success,
    Failure,
    /// A call, but neither a success nor a failure of the upstream.
    Neutral,
    /// Not a call at all (refused by the proxy, or abandoned).
    Nothing,
}

impl Breaker {
    /// A closed breaker for `route`; sets its state gauge to 0.
    pub fn new(route: &str, cfg: &CircuitBreakerConfig, metrics: &Metrics) -> Arc<Breaker> {
        let labels = RouteLabels {
            route: route.to_string(),
        };
        let gauge = metrics.circuit_state.get_or_create(&labels).clone();
        gauge.set(State::Closed.gauge_value());
        let transitions = State::ALL.map(|from| {
            State::ALL.map(|to| {
                reachable(from, to).then(|| {
                    metrics
                        .circuit_transitions
                        .get_or_create(&TransitionLabels {
                            route: route.to_string(),
                            from: from.as_str(),
                            to: to.as_str(),
                        })
                        .clone()
                })
            })
        });
        let max_probes = u64::from(cfg.half_open_requests).clamp(1, 0xffff);
        Arc::new(Breaker {
            name: route.to_string(),
            failure_on: Conditions::new(&cfg.failure_on),
            observe: cfg.mode == Mode::Observe,
            base: Instant::now(),
            open_for: u64::try_from(cfg.open_for.0.as_nanos()).unwrap_or(u64::MAX),
            slow_after: cfg.slow_call.as_ref().map(|s| s.duration.0),
            failure_rate: cfg.failure_rate.fraction(),
            slow_rate: cfg.slow_call.as_ref().map(|s| s.rate.fraction()),
            minimum_requests: u64::from(cfg.minimum_requests.max(1)),
            consecutive_limit: cfg.consecutive_failures.filter(|n| *n > 0),
            max_probes,
            word: AtomicU64::new(pack(0, State::Closed)),
            since: AtomicU64::new(0),
            probes: AtomicU64::new(pack_probes(0, 0, 0)),
            probes_full_since: AtomicU64::new(u64::MAX),
            consecutive: AtomicU32::new(0),
            window: Window::new(cfg.window.0),
            transition: Mutex::new(()),
            gauge,
            transitions,
            rejected: Metrics::route_counter(&metrics.circuit_rejected, route),
            observed: metrics
                .policy_observed
                .get_or_create(&ObservedLabels {
                    route: route.to_string(),
                    policy: "circuit_breaker",
                    would: "reject",
                })
                .clone(),
            cfg: cfg.clone(),
        })
    }

    /// The config this breaker was built from (a reload keeps the breaker when equal).
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.cfg
    }

    /// The current state. An open breaker whose `open_for` has passed reports `open`
    /// until the next call turns it half-open.
    pub fn state(&self) -> State {
        state_of(self.word.load(Ordering::Acquire))
    }

    /// Applies an operator's action. `Auto` returns to closed with a fresh window.
    pub fn force(&self, action: ForceAction) {
        let to = match action {
            ForceAction::ForceOpen => State::ForcedOpen,
            ForceAction::ForceClosed => State::ForcedClosed,
            ForceAction::Auto => State::Closed,
        };
        self.transition(None, to, self.nanos(Instant::now()));
    }

    /// `(failures_in_window, requests_in_window)`.
    pub fn window_counts(&self) -> (u64, u64) {
        let c = self.window.counts(self.nanos(Instant::now()));
        (c.failures, c.requests)
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Decides whether a call may go through. Closed: one atomic load.
    fn admit(&self) -> Admission {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            match state_of(word) {
                State::Closed | State::ForcedClosed => {
                    return Admission::Pass {
                        word,
                        kind: Kind::Counted,
                    }
                }
                State::ForcedOpen => return self.refuse(word),
                State::Open => {
                    let now = self.nanos(Instant::now());
                    if now.saturating_sub(self.since.load(Ordering::Acquire)) < self.open_for {
                        return self.refuse(word);
                    }
                    self.transition(Some(word), State::HalfOpen, now);
                }
                State::HalfOpen => {
                    let p = self.probes.load(Ordering::Acquire);
                    if probes_generation(p) == generation_of(word) & 0xffff_ffff {
                        let admitted = probes_admitted(p);
                        if admitted < self.max_probes {
                            if self
                                .probes
                                .compare_exchange(
                                    p,
                                    p + ONE_ADMITTED,
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                )
                                .is_ok()
                            {
                                if admitted + 1 == self.max_probes {
                                    self.probes_full_since
                                        .store(self.nanos(Instant::now()), Ordering::Release);
                                }
                                return Admission::Pass {
                                    word,
                                    kind: Kind::Probe,
                                };
                            }
                        } else {
                            // Every slot is taken. Probes that never answer must not
                            // wedge the breaker: after `open_for`, start a new round.
                            let now = self.nanos(Instant::now());
                            let full = self.probes_full_since.load(Ordering::Acquire);
                            if now.saturating_sub(full) < self.open_for {
                                return self.refuse(word);
                            }
                            self.transition(Some(word), State::HalfOpen, now);
                        }
                    }
                }
            }
            // The state moved on (or a probe slot was contended): look again.
            word = self.word.load(Ordering::Acquire);
        }
    }

    /// Where the breaker refuses: refuse, or in observe mode count and let through.
    fn refuse(&self, word: u64) -> Admission {
        if self.observe {
            self.observed.inc();
            Admission::Pass {
                word,
                kind: Kind::Untracked,
            }
        } else {
            self.rejected.inc();
            Admission::Reject
        }
    }

    /// Accounts for a finished (or deadline-cut) call.
    fn record(&self, ticket: &Ticket, outcome: Outcome, now: Instant) {
        let verdict = match outcome {
            Outcome::Refused => Verdict::Nothing,
            Outcome::Other => Verdict::Neutral,
            o if self.failure_on.any(&o) => Verdict::Failure,
            _ => Verdict::Success,
        };
        let slow = verdict != Verdict::Nothing
            && match (self.slow_after, ticket.started) {
                (Some(limit), Some(started)) => now.saturating_duration_since(started) >= limit,
                _ => false,
            };
        let at = self.nanos(now);
        match ticket.kind {
            Kind::Untracked => {}
            Kind::Counted => self.record_counted(ticket.word, verdict, slow, at),
            Kind::Probe => match verdict {
                Verdict::Failure => {
                    self.transition(Some(ticket.word), State::Open, at);
                }
                // A probe that was slow did not show a healthy upstream either.
                Verdict::Success if slow => {
                    self.transition(Some(ticket.word), State::Open, at);
                }
                Verdict::Success => self.probe_succeeded(ticket.word, at),
                Verdict::Neutral | Verdict::Nothing => self.release_probe(ticket.word),
            },
        }
    }

    /// The closed path: a few atomic operations; the trip rules are evaluated only
    /// after a failure or a slow call.
    fn record_counted(&self, word: u64, verdict: Verdict, slow: bool, at: u64) {
        if verdict == Verdict::Nothing || self.word.load(Ordering::Acquire) != word {
            // Not a call, or it started under an earlier state.
            return;
        }
        let failure = verdict == Verdict::Failure;
        self.window.record(at, failure, slow);
        let consecutive = match verdict {
            Verdict::Failure => self
                .consecutive
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1),
            Verdict::Success => {
                if self.consecutive.load(Ordering::Relaxed) != 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
                0
            }
            Verdict::Neutral | Verdict::Nothing => 0,
        };
        if (failure || slow) && state_of(word) == State::Closed && self.should_trip(at, consecutive)
        {
            self.transition(Some(word), State::Open, at);
        }
    }

    fn should_trip(&self, at: u64, consecutive: u32) -> bool {
        if self.consecutive_limit.is_some_and(|n| consecutive >= n) {
            return true;
        }
        let c = self.window.counts(at);
        if c.requests < self.minimum_requests {
            return false;
        }
        let requests = c.requests as f64;
        if c.failures > 0 && c.failures as f64 >= self.failure_rate * requests {
            return true;
        }
        matches!(self.slow_rate, Some(rate) if c.slow > 0 && c.slow as f64 >= rate * requests)
    }

    /// Credits a successful probe of the round `word` names; the last one closes.
    fn probe_succeeded(&self, word: u64, at: u64) {
        let round = generation_of(word) & 0xffff_ffff;
        let mut p = self.probes.load(Ordering::Acquire);
        loop {
            if probes_generation(p) != round || probes_succeeded(p) >= self.max_probes {
                return; // a probe of an earlier round
            }
            match self
                .probes
                .compare_exchange(p, p + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if probes_succeeded(p) + 1 >= self.max_probes {
                        self.transition(Some(word), State::Closed, at);
                    }
                    return;
                }
                Err(actual) => p = actual,
            }
        }
    }

    /// Gives a probe slot back (the probe was abandoned or gave no verdict).
    fn release_probe(&self, word: u64) {
        let round = generation_of(word) & 0xffff_ffff;
        let mut p = self.probes.load(Ordering::Acquire);
        loop {
            if probes_generation(p) != round || probes_admitted(p) == 0 {
                return;
            }
            match self.probes.compare_exchange(
                p,
                p - ONE_ADMITTED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => p = actual,
            }
        }
    }

    /// Moves to `to` if the state word is still `expected` (any state when `None`),
    /// bumping the generation. The only place that takes the lock. `to` may equal the
    /// current state: half-open to half-open starts a new round of probes, closed to
    /// closed (`auto`) starts a fresh window.
    fn transition(&self, expected: Option<u64>, to: State, at: u64) -> bool {
        let _guard = lock(&self.transition);
        let cur = self.word.load(Ordering::Acquire);
        if expected.is_some_and(|e| e != cur) {
            return false; // someone else moved it first
        }
        let from = state_of(cur);
        let generation = generation_of(cur).wrapping_add(1) & (u64::MAX >> 8);
        // Everything a reader of the new word needs is in place before it is published.
        self.since.store(at, Ordering::Release);
        match to {
            State::HalfOpen => {
                self.probes_full_since.store(u64::MAX, Ordering::Release);
                self.probes
                    .store(pack_probes(generation, 0, 0), Ordering::Release);
            }
            State::Closed => {
                self.window.reset();
                self.consecutive.store(0, Ordering::Relaxed);
            }
            State::Open | State::ForcedOpen | State::ForcedClosed => {}
        }
        self.word.store(pack(generation, to), Ordering::Release);
        self.gauge.set(to.gauge_value());
        let mode = if self.observe { "observe" } else { "enforce" };
        if from != to {
            if let Some(c) = self
                .transitions
                .get(from.index())
                .and_then(|row| row.get(to.index()))
                .and_then(Option::as_ref)
            {
                c.inc();
            }
            if to == State::Closed {
                tracing::info!(route = %self.name, from = from.as_str(), to = to.as_str(), mode, "circuit breaker state changed");
            } else {
                tracing::warn!(route = %self.name, from = from.as_str(), to = to.as_str(), mode, "circuit breaker state changed");
            }
        } else if to == State::HalfOpen {
            tracing::warn!(route = %self.name, mode, "circuit breaker probes went unanswered; admitting a new round");
        } else {
            tracing::info!(route = %self.name, state = to.as_str(), mode, "circuit breaker reset");
        }
        true
    }
}

/// One admitted call: records its outcome when the response arrives, or when it is
/// dropped (a dropped probe gives its slot back; a call cut short by the request
/// deadline counts as a timeout).
#[derive(Debug)]
pub struct Ticket {
    breaker: Arc<Breaker>,
    word: u64,
    kind: Kind,
    /// Only taken when slow calls are counted.
    started: Option<Instant>,
    deadline: Option<Instant>,
    done: bool,
}

impl Ticket {
    fn complete(&mut self, outcome: Outcome) {
        if !self.done {
            self.done = true;
            self.breaker.record(self, outcome, Instant::now());
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            // The total deadline cut the attempt short: the upstream was too slow.
            self.breaker
                .record(self, Outcome::Timeout(TimeoutKind::PerTry), now);
        } else if self.kind == Kind::Probe {
            // The client went away: no verdict, free the slot for another probe.
            self.breaker.release_probe(self.word);
        }
    }
}

/// Applies a [`Breaker`].
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    breaker: Arc<Breaker>,
}

impl CircuitBreakerLayer {
    /// A layer over a shared breaker.
    pub fn new(breaker: Arc<Breaker>) -> Self {
        CircuitBreakerLayer { breaker }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

/// The circuit-breaker service.
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S> Service<Request<Body>> for CircuitBreaker<S>
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
        match self.breaker.admit() {
            Admission::Pass { word, kind } => {
                let ticket = Ticket {
                    breaker: self.breaker.clone(),
                    word,
                    kind,
                    started: self.breaker.slow_after.map(|_| Instant::now()),
                    deadline: req.extensions().get::<Deadline>().map(|d| d.0),
                    done: false,
                };
                ResponseFuture::Admitted {
                    inner: self.inner.call(req),
                    ticket,
                }
            }
            Admission::Reject => ResponseFuture::Rejected,
        }
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`]: reports the outcome to the breaker.
    #[project = FutProj]
    pub enum ResponseFuture<F> {
        /// Running.
        Admitted { #[pin] inner: F, ticket: Ticket },
        /// Refused: resolves at once to [`CircuitOpen`].
        Rejected,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            FutProj::Admitted { inner, ticket } => {
                let res = ready!(inner.poll(cx));
                ticket.complete(Outcome::of(&res));
                Poll::Ready(res)
            }
            FutProj::Rejected => Poll::Ready(Err(CircuitOpen.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::{Dur, Percent};
    use crate::config::{Condition, SlowCallConfig};
    use crate::error::{ErrorKind, UpstreamError, UpstreamErrorKind};
    use tokio::time::advance;
    use tower_test::mock;

    type Inner = mock::Mock<Request<Body>, Response<Body>>;
    type Fut = ResponseFuture<mock::future::ResponseFuture<Response<Body>>>;

    fn config() -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            failure_rate: Percent(50.0),
            window: Dur::secs(10),
            minimum_requests: 4,
            consecutive_failures: None,
            open_for: Dur::secs(30),
            half_open_requests: 2,
            slow_call: None,
            failure_on: vec![
                Condition::ConnectFailure,
                Condition::Timeout,
                Condition::Status5xx,
            ],
            mode: Mode::Enforce,
        }
    }

    struct Harness {
        svc: mock::Spawn<CircuitBreaker<Inner>>,
        handle: mock::Handle<Request<Body>, Response<Body>>,
        breaker: Arc<Breaker>,
        metrics: Metrics,
    }

    fn harness(cfg: CircuitBreakerConfig) -> Harness {
        let metrics = Metrics::new();
        let breaker = Breaker::new("r", &cfg, &metrics);
        let (svc, handle) = mock::spawn_layer(CircuitBreakerLayer::new(breaker.clone()));
        Harness {
            svc,
            handle,
            breaker,
            metrics,
        }
    }

    fn status(code: u16) -> Response<Body> {
        Response::builder().status(code).body(Body::Empty).unwrap()
    }

    impl Harness {
        fn call_with(&mut self, req: Request<Body>) -> Fut {
            assert!(self.svc.poll_ready().is_ready());
            self.svc.call(req)
        }

        fn call(&mut self) -> Fut {
            self.call_with(Request::new(Body::Empty))
        }

        /// Starts a call that must be admitted and returns it with its upstream side.
        async fn start(&mut self) -> (Fut, mock::SendResponse<Response<Body>>) {
            let fut = self.call();
            assert!(matches!(fut, ResponseFuture::Admitted { .. }), "refused");
            let (_, send) = self.handle.next_request().await.unwrap();
            (fut, send)
        }

        /// One whole call answered with `code` (or refused).
        async fn exchange(&mut self, code: u16) -> Result<Response<Body>, BoxError> {
            let fut = self.call();
            if matches!(fut, ResponseFuture::Rejected) {
                return fut.await;
            }
            let (_, send) = self.handle.next_request().await.unwrap();
            send.send_response(status(code));
            fut.await
        }

        async fn fail(&mut self) {
            let res = self.exchange(503).await.unwrap();
            assert_eq!(res.status(), 503);
        }

        async fn succeed(&mut self) {
            let res = self.exchange(200).await.unwrap();
            assert_eq!(res.status(), 200);
        }

        async fn assert_refused(&mut self) {
            let err = self.exchange(200).await.unwrap_err();
            assert_eq!(ErrorKind::of_box(&err), ErrorKind::CircuitOpen);
            assert!(self.handle.poll_request().is_pending(), "inner was called");
        }

        /// Trips a breaker built from [`config`] with four failures.
        async fn trip(&mut self) {
            for _ in 0..4 {
                self.fail().await;
            }
            assert_eq!(self.breaker.state(), State::Open);
        }
    }

    fn connect_error() -> UpstreamError {
        UpstreamError {
            kind: UpstreamErrorKind::Connect,
            source: "x".into(),
        }
    }

    #[test]
    fn names_and_actions() {
        let names: Vec<_> = State::ALL
            .iter()
            .map(|s| (s.as_str(), s.gauge_value()))
            .collect();
        assert_eq!(
            names,
            [
                ("closed", 0),
                ("open", 1),
                ("half_open", 2),
                ("forced_open", 3),
                ("forced_closed", 4)
            ]
        );
        assert_eq!(
            ForceAction::parse("force-open"),
            Some(ForceAction::ForceOpen)
        );
        assert_eq!(
            ForceAction::parse("force-closed"),
            Some(ForceAction::ForceClosed)
        );
        assert_eq!(ForceAction::parse("auto"), Some(ForceAction::Auto));
        assert_eq!(ForceAction::parse("open"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_trips_only_after_minimum_requests() {
        let mut h = harness(config());
        h.succeed().await;
        h.fail().await;
        h.fail().await;
        // 2 of 3 failed, but 4 calls are needed before the rate counts
        assert_eq!(h.breaker.state(), State::Closed);
        assert_eq!(h.breaker.window_counts(), (2, 3));
        h.fail().await;
        assert_eq!(h.breaker.state(), State::Open);
        assert_eq!(h.breaker.window_counts(), (3, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_below_threshold_and_old_failures_age_out() {
        let mut h = harness(config());
        for _ in 0..3 {
            h.succeed().await;
        }
        h.exchange(503).await.unwrap();
        assert_eq!(h.breaker.state(), State::Closed, "1 of 4 is below 50%");
        advance(Duration::from_secs(11)).await;
        assert_eq!(
            h.breaker.window_counts(),
            (0, 0),
            "the window slid past them"
        );
        for _ in 0..3 {
            h.fail().await;
        }
        assert_eq!(
            h.breaker.state(),
            State::Closed,
            "only 3 calls in the window"
        );
        // errors count as well as 5xx responses
        let fut = h.call();
        let (_, send) = h.handle.next_request().await.unwrap();
        send.send_error(connect_error());
        let err = fut.await.unwrap_err();
        assert_eq!(
            ErrorKind::of_box(&err),
            ErrorKind::UpstreamUnavailable { connect: true }
        );
        assert_eq!(h.breaker.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_trip() {
        let mut h = harness(CircuitBreakerConfig {
            minimum_requests: 100,
            consecutive_failures: Some(3),
            ..config()
        });
        h.fail().await;
        h.fail().await;
        h.succeed().await; // resets the run
        h.fail().await;
        h.fail().await;
        assert_eq!(h.breaker.state(), State::Closed);
        h.fail().await;
        assert_eq!(h.breaker.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_trip() {
        let mut h = harness(CircuitBreakerConfig {
            minimum_requests: 3,
            slow_call: Some(SlowCallConfig {
                duration: Dur::secs(1),
                rate: Percent(60.0),
            }),
            ..config()
        });
        h.succeed().await; // fast
        for i in 0..2 {
            let (fut, send) = h.start().await;
            advance(Duration::from_secs(1)).await;
            send.send_response(status(200));
            assert_eq!(fut.await.unwrap().status(), 200);
            let expect = if i == 0 { State::Closed } else { State::Open };
            assert_eq!(h.breaker.state(), expect, "after slow call {i}");
        }
        assert_eq!(
            h.breaker.window_counts(),
            (0, 3),
            "slow calls are not failures"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn open_rejects_without_calling_inner() {
        let mut h = harness(config());
        h.trip().await;
        h.assert_refused().await;
        h.assert_refused().await;
        let text = h.metrics.encode();
        assert!(
            text.contains(r#"breakwater_circuit_rejected_total{route="r"} 2"#),
            "{text}"
        );
        assert!(!text.contains(r#"would="reject"} 1"#), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_after_open_for_and_all_probes_must_succeed() {
        let mut h = harness(config());
        h.trip().await;
        advance(Duration::from_secs(29)).await;
        h.assert_refused().await;
        advance(Duration::from_secs(1)).await;
        assert_eq!(h.breaker.state(), State::Open, "reported lazily");
        h.succeed().await;
        assert_eq!(
            h.breaker.state(),
            State::HalfOpen,
            "one of two probes is not enough"
        );
        h.succeed().await;
        assert_eq!(h.breaker.state(), State::Closed);
        assert_eq!(
            h.breaker.window_counts(),
            (0, 0),
            "closing starts a fresh window"
        );
        h.fail().await;
        assert_eq!(h.breaker.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_failure_reopens() {
        let mut h = harness(config());
        h.trip().await;
        advance(Duration::from_secs(30)).await;
        h.succeed().await;
        h.fail().await;
        assert_eq!(h.breaker.state(), State::Open);
        h.assert_refused().await;
        advance(Duration::from_secs(29)).await;
        h.assert_refused().await; // a new open_for from the re-opening
        advance(Duration::from_secs(1)).await;
        h.succeed().await;
        assert_eq!(h.breaker.state(), State::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_the_probes_are_refused() {
        let mut h = harness(config());
        h.trip().await;
        advance(Duration::from_secs(30)).await;
        let (p1, s1) = h.start().await;
        let (p2, s2) = h.start().await;
        assert_eq!(h.breaker.state(), State::HalfOpen);
        h.assert_refused().await;
        s1.send_response(status(200));
        p1.await.unwrap();
        h.assert_refused().await; // a finished probe does not free its slot in this round
        s2.send_response(status(200));
        p2.await.unwrap();
        assert_eq!(h.breaker.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn stuck_probes_do_not_wedge_the_breaker() {
        let mut h = harness(config());
        h.trip().await;
        advance(Duration::from_secs(30)).await;
        let (old1, s1) = h.start().await;
        let (old2, s2) = h.start().await;
        advance(Duration::from_secs(29)).await;
        h.assert_refused().await;
        advance(Duration::from_secs(1)).await;
        // the probes never answered within open_for: a new round is admitted
        let (new1, n1) = h.start().await;
        assert_eq!(h.breaker.state(), State::HalfOpen);
        // the old round's late answers count for nothing
        s1.send_response(status(200));
        s2.send_response(status(200));
        old1.await.unwrap();
        old2.await.unwrap();
        assert_eq!(h.breaker.state(), State::HalfOpen);
        n1.send_response(status(200));
        new1.await.unwrap();
        assert_eq!(h.breaker.state(), State::HalfOpen);
        h.succeed().await;
        assert_eq!(h.breaker.state(), State::Closed);
        let text = h.metrics.encode();
        assert!(
            text.contains(
                r#"breakwater_circuit_transitions_total{route="r",from="open",to="half_open"} 1"#
            ),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_probe_round_waits_open_for_after_the_last_slot_was_taken() {
        let mut h = harness(config());
        h.trip().await;
        advance(Duration::from_secs(30)).await;
        let (_p1, _s1) = h.start().await;
        advance(Duration::from_secs(20)).await;
        let (_p2, _s2) = h.start().await; // all slots taken from here on
        advance(Duration::from_secs(29)).await;
        h.assert_refused().await;
        advance(Duration::from_secs(1)).await;
        let (_p3, _s3) = h.start().await;
        assert_eq!(h.breaker.state(), State::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_probe_frees_its_slot() {
        let mut h = harness(config());
        h.trip().await;
        advance(Duration::from_secs(30)).await;
        let (p1, _s1) = h.start().await;
        let (p2, s2) = h.start().await;
        h.assert_refused().await;
        drop(p1); // the client went away
        let (p3, s3) = h.start().await;
        s2.send_response(status(200));
        s3.send_response(status(200));
        p2.await.unwrap();
        p3.await.unwrap();
        assert_eq!(h.breaker.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_cut_short_by_the_deadline_is_a_timeout() {
        let mut h = harness(CircuitBreakerConfig {
            consecutive_failures: Some(2),
            ..config()
        });
        let mut req = Request::new(Body::Empty);
        req.extensions_mut()
            .insert(Deadline(Instant::now() + Duration::from_secs(1)));
        let fut = h.call_with(req);
        let _send = h.handle.next_request().await.unwrap();
        advance(Duration::from_secs(1)).await;
        drop(fut); // the timeout layer outside gave up on it
        assert_eq!(h.breaker.window_counts(), (1, 1));
        // without a passed deadline a dropped call records nothing
        let (fut, _send) = h.start().await;
        drop(fut);
        assert_eq!(h.breaker.window_counts(), (1, 1));
        let mut req = Request::new(Body::Empty);
        req.extensions_mut()
            .insert(Deadline(Instant::now() + Duration::from_secs(1)));
        let fut = h.call_with(req);
        let _send2 = h.handle.next_request().await.unwrap();
        advance(Duration::from_secs(2)).await;
        drop(fut);
        assert_eq!(h.breaker.state(), State::Open, "two timeouts in a row");
    }

    #[tokio::test(start_paused = true)]
    async fn refused_and_other_outcomes() {
        let mut h = harness(config());
        // refused further in: not a call
        let (fut, send) = h.start().await;
        send.send_error(CircuitOpen);
        fut.await.unwrap_err();
        assert_eq!(h.breaker.window_counts(), (0, 0));
        // anything else: a call, not a failure
        let (fut, send) = h.start().await;
        send.send_error("odd");
        fut.await.unwrap_err();
        assert_eq!(h.breaker.window_counts(), (0, 1));
        // a 4xx is the upstream answering: a success
        h.exchange(404).await.unwrap();
        assert_eq!(h.breaker.window_counts(), (0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn observe_mode_lets_everything_through() {
        let mut h = harness(CircuitBreakerConfig {
            mode: Mode::Observe,
            ..config()
        });
        for _ in 0..4 {
            h.fail().await;
        }
        assert_eq!(
            h.breaker.state(),
            State::Open,
            "the state machine still runs"
        );
        h.succeed().await;
        h.fail().await;
        assert_eq!(h.breaker.state(), State::Open);
        advance(Duration::from_secs(30)).await;
        // two probes, then more calls where half-open would refuse
        let (p1, s1) = h.start().await;
        let (p2, s2) = h.start().await;
        h.fail().await; // not a probe: does not re-open
        assert_eq!(h.breaker.state(), State::HalfOpen);
        s1.send_response(status(200));
        s2.send_response(status(200));
        p1.await.unwrap();
        p2.await.unwrap();
        assert_eq!(h.breaker.state(), State::Closed);
        let text = h.metrics.encode();
        assert!(text.contains(r#"breakwater_policy_observed_total{route="r",policy="circuit_breaker",would="reject"} 3"#), "{text}");
        assert!(
            text.contains(r#"breakwater_circuit_rejected_total{route="r"} 0"#),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forced_states() {
        let mut h = harness(config());
        h.breaker.force(ForceAction::ForceOpen);
        assert_eq!(h.breaker.state(), State::ForcedOpen);
        h.assert_refused().await;
        advance(Duration::from_secs(60)).await;
        h.assert_refused().await; // forced open never turns half-open

        h.breaker.force(ForceAction::ForceClosed);
        assert_eq!(h.breaker.state(), State::ForcedClosed);
        for _ in 0..6 {
            h.fail().await;
        }
        assert_eq!(h.breaker.state(), State::ForcedClosed, "never trips");
        assert_eq!(h.breaker.window_counts(), (6, 6), "still counts");

        h.breaker.force(ForceAction::Auto);
        assert_eq!(h.breaker.state(), State::Closed);
        assert_eq!(h.breaker.window_counts(), (0, 0), "a fresh window");
        h.trip().await;
        let text = h.metrics.encode();
        for (from, to) in [
            ("closed", "forced_open"),
            ("forced_open", "forced_closed"),
            ("forced_closed", "closed"),
            ("closed", "open"),
        ] {
            let line = format!(
                r#"breakwater_circuit_transitions_total{{route="r",from="{from}",to="{to}"}} 1"#
            );
            assert!(text.contains(&line), "{line}\n{text}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_of_an_earlier_generation_are_ignored() {
        let mut h = harness(CircuitBreakerConfig {
            minimum_requests: 1,
            ..config()
        });
        // two calls start while closed ...
        let (a, sa) = h.start().await;
        let (b, sb) = h.start().await;
        h.fail().await;
        assert_eq!(h.breaker.state(), State::Open);
        advance(Duration::from_secs(30)).await;
        let (p1, s1) = h.start().await;
        let (p2, s2) = h.start().await;
        // ... and finish during the half-open round: neither decides it
        sa.send_response(status(503));
        a.await.unwrap();
        assert_eq!(h.breaker.state(), State::HalfOpen);
        sb.send_response(status(200));
        b.await.unwrap();
        s1.send_response(status(200));
        p1.await.unwrap();
        assert_eq!(h.breaker.state(), State::HalfOpen);
        s2.send_response(status(200));
        p2.await.unwrap();
        assert_eq!(h.breaker.state(), State::Closed);
        assert_eq!(h.breaker.window_counts(), (0, 0));
        // a call started before a trip does not count in the next closed window
        let (c, sc) = h.start().await;
        h.fail().await; // trips again (minimum 1)
        assert_eq!(h.breaker.state(), State::Open);
        h.breaker.force(ForceAction::Auto);
        sc.send_response(status(503));
        c.await.unwrap();
        assert_eq!(h.breaker.window_counts(), (0, 0));
        assert_eq!(h.breaker.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_show_state_and_transitions() {
        let mut h = harness(config());
        let text = h.metrics.encode();
        assert!(
            text.contains(r#"breakwater_circuit_state{route="r"} 0"#),
            "{text}"
        );
        h.trip().await;
        let text = h.metrics.encode();
        assert!(
            text.contains(r#"breakwater_circuit_state{route="r"} 1"#),
            "{text}"
        );
        advance(Duration::from_secs(30)).await;
        let (p, s) = h.start().await;
        assert!(h
            .metrics
            .encode()
            .contains(r#"breakwater_circuit_state{route="r"} 2"#));
        s.send_response(status(200));
        p.await.unwrap();
        h.succeed().await;
        let text = h.metrics.encode();
        assert!(
            text.contains(r#"breakwater_circuit_state{route="r"} 0"#),
            "{text}"
        );
        for (from, to) in [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
        ] {
            let line = format!(
                r#"breakwater_circuit_transitions_total{{route="r",from="{from}",to="{to}"}} 1"#
            );
            assert!(text.contains(&line), "{line}\n{text}");
        }
        assert!(text.contains(
            r#"breakwater_circuit_transitions_total{route="r",from="half_open",to="open"} 0"#
        ));
        assert!(
            !text.contains(r#"from="closed",to="half_open""#),
            "unreachable pairs are not exported"
        );
        h.breaker.force(ForceAction::ForceOpen);
        assert!(h
            .metrics
            .encode()
            .contains(r#"breakwater_circuit_state{route="r"} 3"#));
        h.breaker.force(ForceAction::ForceClosed);
        assert!(h
            .metrics
            .encode()
            .contains(r#"breakwater_circuit_state{route="r"} 4"#));
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_is_shared_by_clones() {
        let metrics = Metrics::new();
        let breaker = Breaker::new("r", &config(), &metrics);
        assert_eq!(breaker.config(), &config());
        let (svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(
            CircuitBreakerLayer::new(breaker.clone()),
        );
        let mut a = svc.into_inner();
        let mut b = a.clone();
        for i in 0..4 {
            let svc = if i % 2 == 0 { &mut a } else { &mut b };
            std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
            let fut = svc.call(Request::new(Body::Empty));
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(status(502));
            fut.await.unwrap();
        }
        assert_eq!(breaker.state(), State::Open);
    }
}
