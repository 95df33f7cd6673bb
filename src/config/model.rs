//! The YAML model: what a user may write in `breakwater.yaml`. Every field's doc comment
//! is user documentation (`docs/config.md` mirrors it). Unknown keys are rejected.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_saphyr::{Location, Spanned};

use super::values::{Dur, Percent, Rate, Size, TimeoutSetting, Toggle};

/// A value that remembers where in the file it was written, for semantic errors.
pub type At<T> = Spanned<T>;

/// The whole config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The admin listener (metrics, health, status, reload).
    #[serde(default)]
    pub admin: AdminConfig,
    /// The listeners that accept traffic, each with its own routes.
    pub listeners: Vec<ListenerConfig>,
    /// Named upstream clusters that routes forward to.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Named sets of resilience blocks that routes can refer to with `policy:`.
    #[serde(default)]
    pub policies: BTreeMap<String, At<PolicyConfig>>,
    /// Graceful shutdown timings.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Tracing export and access logs.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; keep it on loopback unless it is protected otherwise.
    #[serde(default = "default_admin_address")]
    pub address: At<String>,
}

fn default_admin_address() -> At<String> {
    at("127.0.0.1:9901".to_string())
}

/// Wraps a value that was not read from a file (a default) in an [`At`] with no location.
pub fn at<T>(value: T) -> At<T> {
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            address: default_admin_address(),
        }
    }
}

/// A listening socket and its routes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name, used in metrics and logs.
    pub name: At<String>,
    /// `host:port` to bind, e.g. `0.0.0.0:8080`.
    pub address: At<String>,
    /// Protocols accepted on the port: `http1`, `http2` (cleartext prior knowledge). Default both.
    #[serde(default = "default_protocols")]
    pub protocols: Vec<Protocol>,
    /// TLS termination (`cert`, `key` PEM files). Not supported by this build yet.
    #[serde(default)]
    pub tls: Option<At<TlsServerConfig>>,
    /// Longest time a client may take to send a request's headers (slow-loris protection).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Dur,
    /// A connection with no request in flight for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    /// Largest request head (request line plus headers) accepted; larger gets 431 / a reset stream.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: Size,
    /// Routes, tried in order; the first whose `match` holds serves the request.
    pub routes: Vec<RouteConfig>,
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Http1, Protocol::Http2]
}
fn default_header_read_timeout() -> Dur {
    Dur::secs(10)
}
fn default_idle_timeout() -> Dur {
    Dur::secs(60)
}
fn default_max_header_bytes() -> Size {
    Size(65536)
}

/// A wire protocol.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (and 1.0).
    Http1,
    /// HTTP/2; cleartext with prior knowledge (h2c) unless TLS is set.
    Http2,
}

/// Server-side TLS files.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key (redacted in `/config`).
    pub key: String,
}

impl Serialize for TlsServerConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("cert", &self.cert)?;
        m.serialize_entry("key", "<redacted>")?;
        m.end()
    }
}

/// Upstream-side TLS settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsClientConfig {
    /// PEM CA bundle to verify the upstream with.
    #[serde(default)]
    pub ca: Option<String>,
    /// Name to verify the upstream certificate against (SNI).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// One route: which requests it takes, where they go and which resilience blocks wrap them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name (per config), used in metrics, logs and `/circuit/<name>/...`.
    /// Letters, digits, `.`, `_` and `-` only.
    pub name: At<String>,
    /// Conditions that must all hold; an empty match takes every request.
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// Name of the upstream in `upstreams` to forward to.
    pub upstream: At<String>,
    /// Name of a block in `policies` whose settings this route starts from.
    #[serde(default)]
    pub policy: Option<At<String>>,
    /// Remove this prefix from the path before forwarding (`/api/x` -> `/x`).
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Whole-request deadline including retries and backoff (default 15s; `false`: none).
    #[serde(default)]
    pub timeout: Option<TimeoutSetting>,
    /// Retry settings, or `false`.
    #[serde(default)]
    pub retry: Option<Toggle<RetryConfig>>,
    /// Circuit breaker settings, or `false`.
    #[serde(default)]
    pub circuit_breaker: Option<Toggle<CircuitBreakerConfig>>,
    /// Token-bucket rate limit, or `false`.
    #[serde(default)]
    pub rate_limit: Option<Toggle<RateLimitConfig>>,
    /// Cap on in-flight requests, or `false`.
    #[serde(default)]
    pub concurrency_limit: Option<Toggle<ConcurrencyLimitConfig>>,
    /// Response to give instead of a failure, or `false`.
    #[serde(default)]
    pub fallback: Option<Toggle<FallbackConfig>>,
}

/// Request conditions; all given ones must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Exact path (query string excluded).
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix (plain string prefix, like Envoy's `prefix`).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Allowed methods, e.g. `[GET, HEAD]`.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Host (from `Host` or the HTTP/2 authority), port ignored, case-insensitive.
    #[serde(default)]
    pub host: Option<String>,
    /// Headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// gRPC service, e.g. `inventory.v1.Inventory`, matching `/inventory.v1.Inventory/*`.
    #[serde(default)]
    pub grpc_service: Option<String>,
}

/// A named upstream cluster.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` endpoints; several are used round-robin.
    pub endpoints: At<Vec<String>>,
    /// `http1` or `http2` (prior knowledge; gRPC upstreams need it).
    #[serde(default = "default_upstream_protocol")]
    pub protocol: Protocol,
    /// Longest time to establish a TCP connection; a failure here is a connect failure.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// TLS to the upstream. Not supported by this build yet.
    #[serde(default)]
    pub tls: Option<At<TlsClientConfig>>,
    /// Connection pool settings.
    #[serde(default)]
    pub pool: PoolConfig,
}

fn default_upstream_protocol() -> Protocol {
    Protocol::Http1
}
fn default_connect_timeout() -> Dur {
    Dur::secs(1)
}

/// Upstream connection pool.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Idle pooled connections are closed after this long.
    #[serde(default = "default_pool_idle")]
    pub idle_timeout: Dur,
    /// Idle connections kept per endpoint.
    #[serde(default = "default_pool_max_idle")]
    pub max_idle_per_endpoint: usize,
}

fn default_pool_idle() -> Dur {
    Dur::secs(90)
}
fn default_pool_max_idle() -> usize {
    64
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            idle_timeout: default_pool_idle(),
            max_idle_per_endpoint: default_pool_max_idle(),
        }
    }
}

/// A named set of resilience blocks.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Whole-request deadline (default 15s; `false`: none).
    #[serde(default)]
    pub timeout: Option<TimeoutSetting>,
    /// Retry settings.
    #[serde(default)]
    pub retry: Option<Toggle<RetryConfig>>,
    /// Circuit breaker settings.
    #[serde(default)]
    pub circuit_breaker: Option<Toggle<CircuitBreakerConfig>>,
    /// Rate limit settings.
    #[serde(default)]
    pub rate_limit: Option<Toggle<RateLimitConfig>>,
    /// Concurrency limit settings.
    #[serde(default)]
    pub concurrency_limit: Option<Toggle<ConcurrencyLimitConfig>>,
    /// Fallback response settings.
    #[serde(default)]
    pub fallback: Option<Toggle<FallbackConfig>>,
}

/// Retries with exponential backoff, bounded by a budget.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts, the first one included (1 to 10).
    #[serde(default = "default_attempts", deserialize_with = "attempts")]
    pub attempts: u32,
    /// Deadline of each attempt; default none (bounded by `timeout`).
    #[serde(default)]
    pub per_try_timeout: Option<Dur>,
    /// Wait between attempts.
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// Which outcomes are retried.
    #[serde(default = "default_retry_when")]
    pub when: Vec<Condition>,
    /// Which methods may be retried (a connect failure is retried for any method).
    #[serde(default)]
    pub methods: RetryMethods,
    /// Caps retries to a share of requests; on by default.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// Request bodies up to this size are kept for replay; larger ones are not retried.
    #[serde(default = "default_max_buffered_body")]
    pub max_buffered_body: Size,
    /// Wait as long as the upstream's `Retry-After` / `grpc-retry-pushback-ms` says, if it fits the deadline.
    #[serde(default = "yes")]
    pub respect_retry_after: bool,
}

fn attempts<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if !(1..=10).contains(&n) {
        return Err(de::Error::custom(format!(
            "attempts {n} is out of range; use 1 to 10 (attempts counts the first try)"
        )));
    }
    Ok(n)
}

fn default_attempts() -> u32 {
    3
}
fn default_retry_when() -> Vec<Condition> {
    vec![
        Condition::ConnectFailure,
        Condition::Reset,
        Condition::GatewayError,
    ]
}
fn default_max_buffered_body() -> Size {
    Size(64 * 1024)
}
fn yes() -> bool {
    true
}

/// Exponential backoff: `base * 2^(n-1)` capped at `max`, then jittered.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// Wait before the first retry (before jitter).
    #[serde(default = "default_backoff_base")]
    pub base: Dur,
    /// Largest wait (before jitter).
    #[serde(default = "default_backoff_max")]
    pub max: Dur,
    /// `full`: uniform in [0, d]; `equal`: d/2 + uniform in [0, d/2]; `none`: d.
    #[serde(default)]
    pub jitter: Jitter,
}

fn default_backoff_base() -> Dur {
    Dur::millis(25)
}
fn default_backoff_max() -> Dur {
    Dur::millis(250)
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: default_backoff_base(),
            max: default_backoff_max(),
            jitter: Jitter::Full,
        }
    }
}

/// Jitter kind.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Uniform in [0, d].
    #[default]
    Full,
    /// d/2 + uniform in [0, d/2].
    Equal,
    /// Exactly d.
    None,
}

/// Methods eligible for retry.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum RetryMethods {
    /// GET HEAD OPTIONS PUT DELETE TRACE.
    #[default]
    Idempotent,
    /// Every method (only if the upstream makes them safe to repeat).
    Any,
    /// These methods.
    List(Vec<String>),
}

impl Serialize for RetryMethods {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RetryMethods::Idempotent => s.serialize_str("idempotent"),
            RetryMethods::Any => s.serialize_str("any"),
            RetryMethods::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RetryMethods {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RetryMethods;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("idempotent, any, or a list of methods")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RetryMethods, E> {
                match v {
                    "idempotent" => Ok(RetryMethods::Idempotent),
                    "any" => Ok(RetryMethods::Any),
                    other => Err(E::custom(format!(
                        "unknown methods setting {other:?}; use idempotent, any, or a list like [GET, PUT]"
                    ))),
                }
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RetryMethods, A::Error> {
                let mut out = Vec::new();
                while let Some(m) = seq.next_element::<String>()? {
                    if http::Method::from_bytes(m.as_bytes()).is_err() {
                        return Err(de::Error::custom(format!("{m:?} is not an HTTP method")));
                    }
                    out.push(m.to_ascii_uppercase());
                }
                Ok(RetryMethods::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Retry budget: retries allowed = `ratio` x requests in the last 10 s + `min_per_second`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Retries allowed per request seen (0 to 10; 0.2 = one retry per five requests).
    #[serde(default = "default_budget_ratio", deserialize_with = "budget_ratio")]
    pub ratio: f64,
    /// Retries always allowed per second, whatever the traffic.
    #[serde(default = "default_budget_floor")]
    pub min_per_second: u32,
}

fn budget_ratio<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let r = f64::deserialize(d)?;
    if !(0.0..=10.0).contains(&r) || r.is_nan() {
        return Err(de::Error::custom(format!(
            "budget ratio {r} is out of range; use 0 to 10 (0.2 allows one retry per five requests)"
        )));
    }
    Ok(r)
}

fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_floor() -> u32 {
    10
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: default_budget_ratio(),
            min_per_second: default_budget_floor(),
        }
    }
}

/// An outcome of an upstream attempt that a retry or breaker condition can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// The connection could not be established (nothing was sent).
    ConnectFailure,
    /// The connection broke before a response arrived.
    Reset,
    /// The attempt timed out (per-try timeout).
    Timeout,
    /// Any 5xx response.
    Status5xx,
    /// 502, 503 or 504.
    GatewayError,
    /// 409 Conflict.
    Retriable4xx,
    /// This exact status.
    Status(u16),
    /// This gRPC status code.
    Grpc(u8),
}

/// gRPC status code names, indexed by code.
pub const GRPC_CODE_NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

impl Condition {
    /// The spelling used in config and in the `reason` metric label.
    pub fn label(&self) -> String {
        match self {
            Condition::ConnectFailure => "connect-failure".into(),
            Condition::Reset => "reset".into(),
            Condition::Timeout => "timeout".into(),
            Condition::Status5xx => "5xx".into(),
            Condition::GatewayError => "gateway-error".into(),
            Condition::Retriable4xx => "retriable-4xx".into(),
            Condition::Status(c) => c.to_string(),
            Condition::Grpc(c) => format!("grpc-{}", GRPC_CODE_NAMES[*c as usize]),
        }
    }

    /// Parses one condition name.
    pub fn parse(s: &str) -> Result<Condition, String> {
        Ok(match s {
            "connect-failure" => Condition::ConnectFailure,
            "reset" => Condition::Reset,
            "timeout" => Condition::Timeout,
            "5xx" => Condition::Status5xx,
            "gateway-error" => Condition::GatewayError,
            "retriable-4xx" => Condition::Retriable4xx,
            other => {
                if let Some(name) = other.strip_prefix("grpc-") {
                    let code = GRPC_CODE_NAMES
                        .iter()
                        .position(|n| *n == name)
                        .filter(|&c| c != 0)
                        .ok_or_else(|| {
                            format!(
                                "unknown gRPC condition {other:?}; use grpc- and a status name, like grpc-unavailable or grpc-deadline-exceeded"
                            )
                        })?;
                    Condition::Grpc(code as u8)
                } else if let Ok(code) = other.parse::<u16>() {
                    if !(100..=599).contains(&code) {
                        return Err(format!("status {code} is not an HTTP status (100-599)"));
                    }
                    Condition::Status(code)
                } else {
                    return Err(format!(
                        "unknown condition {other:?}; use connect-failure, reset, timeout, 5xx, gateway-error, retriable-4xx, a status like 503, or a gRPC code like grpc-unavailable"
                    ));
                }
            }
        })
    }
}

impl Serialize for Condition {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.label())
    }
}

impl<'de> Deserialize<'de> for Condition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Condition;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a condition like connect-failure, 5xx, 503 or grpc-unavailable")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Condition, E> {
                Condition::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Condition, E> {
                Condition::parse(&v.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Closed / open / half-open breaker.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Trip when this share of calls in `window` failed (with at least `minimum_requests`).
    #[serde(default = "default_failure_rate")]
    pub failure_rate: Percent,
    /// Sliding window the rates are computed over.
    #[serde(default = "default_window")]
    pub window: Dur,
    /// Calls needed in the window before a rate can trip the breaker.
    #[serde(default = "default_minimum_requests")]
    pub minimum_requests: u32,
    /// Also trip after this many failures in a row.
    #[serde(default)]
    pub consecutive_failures: Option<u32>,
    /// How long the breaker stays open before letting probes through.
    #[serde(default = "default_open_for")]
    pub open_for: Dur,
    /// Probes let through when half-open; all must succeed to close.
    #[serde(default = "default_half_open_requests")]
    pub half_open_requests: u32,
    /// A second trip rate on slow calls.
    #[serde(default)]
    pub slow_call: Option<SlowCallConfig>,
    /// Which outcomes count as failures.
    #[serde(default = "default_failure_on")]
    pub failure_on: Vec<Condition>,
    /// `enforce` or `observe` (count and log, but let traffic through).
    #[serde(default)]
    pub mode: Mode,
}

fn default_failure_rate() -> Percent {
    Percent(50.0)
}
fn default_window() -> Dur {
    Dur::secs(10)
}
fn default_minimum_requests() -> u32 {
    20
}
fn default_open_for() -> Dur {
    Dur::secs(30)
}
fn default_half_open_requests() -> u32 {
    3
}
fn default_failure_on() -> Vec<Condition> {
    vec![
        Condition::ConnectFailure,
        Condition::Timeout,
        Condition::Status5xx,
        Condition::Grpc(14),
        Condition::Grpc(4),
        Condition::Grpc(13),
        Condition::Grpc(2),
    ]
}

/// Slow-call trip rule.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlowCallConfig {
    /// A call that takes at least this long (to response headers) is slow.
    pub duration: Dur,
    /// Trip when this share of calls in the window was slow.
    pub rate: Percent,
}

/// Whether a policy acts or only reports.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Reject as configured.
    #[default]
    Enforce,
    /// Count, log and export what would be rejected, and let it through.
    Observe,
}

/// Token-bucket rate limit.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Token refill rate, like `100/s`.
    pub rate: Rate,
    /// Bucket size; default: the tokens added per second (at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// `global`, `client_ip`, or `header:<name>` (a missing header falls back to the client IP).
    #[serde(default)]
    pub key: RateLimitKey,
    /// `enforce` or `observe`.
    #[serde(default)]
    pub mode: Mode,
}

/// What a rate limit bucket is per.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RateLimitKey {
    /// One bucket for the route.
    #[default]
    Global,
    /// A bucket per client address.
    ClientIp,
    /// A bucket per value of this request header (lower-cased name).
    Header(String),
}

impl Serialize for RateLimitKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RateLimitKey::Global => s.serialize_str("global"),
            RateLimitKey::ClientIp => s.serialize_str("client_ip"),
            RateLimitKey::Header(h) => s.collect_str(&format_args!("header:{h}")),
        }
    }
}

impl<'de> Deserialize<'de> for RateLimitKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "global" => Ok(RateLimitKey::Global),
            "client_ip" => Ok(RateLimitKey::ClientIp),
            other => match other.strip_prefix("header:") {
                Some(name) if http::HeaderName::from_bytes(name.trim().as_bytes()).is_ok() => {
                    Ok(RateLimitKey::Header(name.trim().to_ascii_lowercase()))
                }
                _ => Err(de::Error::custom(format!(
                    "unknown rate limit key {other:?}; use global, client_ip or header:<name> (like header:x-api-key)"
                ))),
            },
        }
    }
}

/// Concurrency limit.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyLimitConfig {
    /// In-flight requests allowed on the route; the excess is refused at once with 503.
    #[serde(deserialize_with = "at_least_one")]
    pub max: u32,
    /// `enforce` or `observe`.
    #[serde(default)]
    pub mode: Mode,
}

fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 {
        return Err(de::Error::custom(
            "0 would refuse every request; use at least 1",
        ));
    }
    Ok(n)
}

/// A reason the proxy answers by itself, as named in `fallback.when` and `Proxy-Status`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum FallbackReason {
    /// The circuit breaker refused the call.
    CircuitOpen,
    /// The rate limiter refused the call.
    RateLimited,
    /// The concurrency limit refused the call.
    Overloaded,
    /// A deadline expired.
    Timeout,
    /// The upstream could not be reached or broke the connection.
    UpstreamUnavailable,
    /// The upstream answered 5xx (after retries).
    #[serde(rename = "upstream_5xx")]
    Upstream5xx,
}

/// A configured response given instead of a failure.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// The failures this response replaces.
    pub when: Vec<FallbackReason>,
    /// HTTP status of the response (default 503).
    #[serde(default = "default_fallback_status", deserialize_with = "http_status")]
    pub status: u16,
    /// Response headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Response body.
    #[serde(default)]
    pub body: Option<String>,
    /// The body as sent: `body`, or the content of `body_file` read at load time.
    #[serde(skip)]
    pub body_bytes: bytes::Bytes,
    /// File whose content is the response body, read when the config is loaded.
    #[serde(default)]
    pub body_file: Option<At<String>>,
    /// For gRPC requests: answer with this gRPC status (trailers-only) instead.
    #[serde(default, deserialize_with = "grpc_status_opt")]
    pub grpc_status: Option<u8>,
    /// gRPC status message for `grpc_status`.
    #[serde(default)]
    pub grpc_message: Option<String>,
}

fn default_fallback_status() -> u16 {
    503
}

fn http_status<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = u16::deserialize(d)?;
    if !(200..=599).contains(&n) {
        return Err(de::Error::custom(format!(
            "status {n} is not a final HTTP status; use 200 to 599"
        )));
    }
    Ok(n)
}

fn grpc_status_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let n = u8::deserialize(d)?;
    if n > 16 {
        return Err(de::Error::custom(format!(
            "grpc_status {n} is not a gRPC status code; use 0 to 16 (14 is UNAVAILABLE)"
        )));
    }
    Ok(Some(n))
}

/// Shutdown timings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Keep accepting this long after SIGTERM, while `/readyz` says 503 (about 5s in Kubernetes).
    #[serde(default = "zero")]
    pub drain_delay: Dur,
    /// Then wait at most this long for in-flight requests.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
}

fn zero() -> Dur {
    Dur::secs(0)
}
fn default_drain_timeout() -> Dur {
    Dur::secs(30)
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay: zero(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

/// Telemetry settings.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OpenTelemetry trace export; off unless given.
    #[serde(default)]
    pub tracing: Option<Toggle<TracingConfig>>,
    /// One log line per request.
    #[serde(default = "yes")]
    pub access_log: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            tracing: None,
            access_log: true,
        }
    }
}

/// OTLP trace export.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP base URL; spans go to `<endpoint>/v1/traces` over HTTP.
    pub otlp_endpoint: String,
    /// `http` (protobuf) or `grpc`.
    #[serde(default = "default_otlp_protocol")]
    pub otlp_protocol: String,
    /// Share of new traces sampled (0 to 1); a sampled parent is always followed.
    #[serde(default = "one")]
    pub sample_ratio: f64,
    /// `service.name` resource attribute.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_otlp_protocol() -> String {
    "http".into()
}
fn one() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "breakwater".into()
}
