//! Prometheus metrics (SPEC section 6) in an explicit registry. Families are created
//! once; each route resolves its label handles when it is built, so the request path
//! only touches atomics, never a label lookup by string.

use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::sync::lock;

/// `{listener, route, method, status}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Listener name.
    pub listener: String,
    /// Route name.
    pub route: String,
    /// Method, or `other` for non-standard ones.
    pub method: &'static str,
    /// Response status code.
    pub status: u16,
}

/// `{listener, route}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerRouteLabels {
    /// Listener name.
    pub listener: String,
    /// Route name.
    pub route: String,
}

/// `{route}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route name.
    pub route: String,
}

/// `{route, upstream, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// Route name.
    pub route: String,
    /// Upstream name.
    pub upstream: String,
    /// `success|failure|timeout|connect_error`.
    pub outcome: &'static str,
}

/// `{route, reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Route name.
    pub route: String,
    /// Condition or reason.
    pub reason: String,
}

/// `{route, from, to}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// Route name.
    pub route: String,
    /// State before.
    pub from: &'static str,
    /// State after.
    pub to: &'static str,
}

/// `{route, policy, would}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObservedLabels {
    /// Route name.
    pub route: String,
    /// `circuit_breaker|rate_limit|concurrency_limit`.
    pub policy: &'static str,
    /// `reject`.
    pub would: &'static str,
}

/// `{route, kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    /// Route name.
    pub route: String,
    /// `request|per_try`.
    pub kind: &'static str,
}

/// `{result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success|failure`.
    pub result: &'static str,
}

/// `{version}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    /// Crate version.
    pub version: &'static str,
}

/// Upper bounds of the latency histogram: 0.5 ms to 30 s, suited to a proxy hop.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Every metric family breakwater exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// `breakwater_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `breakwater_request_duration_seconds`.
    pub request_duration: Family<ListenerRouteLabels, Histogram, fn() -> Histogram>,
    /// `breakwater_upstream_attempts_total`.
    pub upstream_attempts: Family<AttemptLabels, Counter>,
    /// `breakwater_retries_total`.
    pub retries: Family<ReasonLabels, Counter>,
    /// `breakwater_retry_budget_exhausted_total`.
    pub retry_budget_exhausted: Family<RouteLabels, Counter>,
    /// `breakwater_circuit_state`.
    pub circuit_state: Family<RouteLabels, Gauge>,
    /// `breakwater_circuit_transitions_total`.
    pub circuit_transitions: Family<TransitionLabels, Counter>,
    /// `breakwater_circuit_rejected_total`.
    pub circuit_rejected: Family<RouteLabels, Counter>,
    /// `breakwater_policy_observed_total`.
    pub policy_observed: Family<ObservedLabels, Counter>,
    /// `breakwater_rate_limited_total`.
    pub rate_limited: Family<RouteLabels, Counter>,
    /// `breakwater_overloaded_total`.
    pub overloaded: Family<RouteLabels, Counter>,
    /// `breakwater_timeouts_total`.
    pub timeouts: Family<TimeoutLabels, Counter>,
    /// `breakwater_fallbacks_total`.
    pub fallbacks: Family<ReasonLabels, Counter>,
    /// `breakwater_inflight_requests`.
    pub inflight: Family<RouteLabels, Gauge>,
    /// `breakwater_config_reloads_total`.
    pub config_reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Metrics {
        let mut reg = Registry::default();
        let mut m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            upstream_attempts: Family::default(),
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            circuit_state: Family::default(),
            circuit_transitions: Family::default(),
            circuit_rejected: Family::default(),
            policy_observed: Family::default(),
            rate_limited: Family::default(),
            overloaded: Family::default(),
            timeouts: Family::default(),
            fallbacks: Family::default(),
            inflight: Family::default(),
            config_reloads: Family::default(),
        };
        reg.register(
            "breakwater_requests",
            "Responses sent downstream",
            m.requests.clone(),
        );
        reg.register(
            "breakwater_request_duration_seconds",
            "Time from request to response headers, downstream view",
            m.request_duration.clone(),
        );
        reg.register(
            "breakwater_upstream_attempts",
            "Attempts sent upstream, by outcome",
            m.upstream_attempts.clone(),
        );
        reg.register(
            "breakwater_retries",
            "Retries started, by the condition that matched",
            m.retries.clone(),
        );
        reg.register(
            "breakwater_retry_budget_exhausted",
            "Retries skipped because the retry budget was spent",
            m.retry_budget_exhausted.clone(),
        );
        reg.register(
            "breakwater_circuit_state",
            "Circuit state: 0 closed, 1 open, 2 half-open, 3 forced open, 4 forced closed",
            m.circuit_state.clone(),
        );
        reg.register(
            "breakwater_circuit_transitions",
            "Circuit state transitions",
            m.circuit_transitions.clone(),
        );
        reg.register(
            "breakwater_circuit_rejected",
            "Requests refused by an open circuit",
            m.circuit_rejected.clone(),
        );
        reg.register(
            "breakwater_policy_observed",
            "What an observe-mode policy would have done",
            m.policy_observed.clone(),
        );
        reg.register(
            "breakwater_rate_limited",
            "Requests refused by the rate limiter",
            m.rate_limited.clone(),
        );
        reg.register(
            "breakwater_overloaded",
            "Requests refused by the concurrency limit",
            m.overloaded.clone(),
        );
        reg.register(
            "breakwater_timeouts",
            "Deadlines that fired, by kind",
            m.timeouts.clone(),
        );
        reg.register(
            "breakwater_fallbacks",
            "Fallback responses given, by reason",
            m.fallbacks.clone(),
        );
        reg.register(
            "breakwater_inflight_requests",
            "Requests in flight on a route",
            m.inflight.clone(),
        );
        reg.register(
            "breakwater_config_reloads",
            "Config reloads, by result",
            m.config_reloads.clone(),
        );
        // Present from the start, so a dashboard shows 0 rather than "no data".
        for result in ["success", "failure"] {
            let _ = m.config_reloads.get_or_create(&ResultLabels { result });
        }
        let build_info: Family<VersionLabels, Gauge> = Family::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        reg.register(
            "breakwater_build_info",
            "Build information; always 1",
            build_info,
        );
        reg.register_collector(Box::new(ProcessCollector::new()));
        m.registry = Mutex::new(reg);
        m
    }

    /// The OpenMetrics text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let reg = lock(&self.registry);
        if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }

    /// A counter of `family` for one route.
    pub fn route_counter(family: &Family<RouteLabels, Counter>, route: &str) -> Counter {
        family
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .clone()
    }
}

/// Methods with their own label value; others are counted as `other` (bounded cardinality).
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

/// Per-route request counters by method and status, resolved lazily into a fixed table
/// so each (method, status) pair is looked up in the family at most once per route.
#[derive(Debug)]
pub struct RequestCounters {
    family: Family<RequestLabels, Counter>,
    listener: String,
    route: String,
    cells: Box<[OnceLock<Counter>]>,
}

/// Status codes common enough to get a cell of their own; others take the family's
/// lookup path (rare by definition).
const COMMON_STATUSES: [u16; 32] = [
    200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409, 410,
    413, 415, 422, 429, 431, 499, 500, 501, 502, 503, 504, 101, 100,
];
const STATUS_SPAN: usize = COMMON_STATUSES.len();

impl RequestCounters {
    /// Counters for one route.
    pub fn new(metrics: &Metrics, listener: &str, route: &str) -> RequestCounters {
        let n = (METHODS.len() + 1) * STATUS_SPAN;
        RequestCounters {
            family: metrics.requests.clone(),
            listener: listener.to_string(),
            route: route.to_string(),
            cells: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Counts one response.
    pub fn inc(&self, method: &http::Method, status: u16) {
        let m = METHODS
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(METHODS.len());
        let labels = || RequestLabels {
            listener: self.listener.clone(),
            route: self.route.clone(),
            method: METHODS.get(m).copied().unwrap_or("other"),
            status,
        };
        let Some(s) = COMMON_STATUSES.iter().position(|c| *c == status) else {
            self.family.get_or_create(&labels()).inc();
            return;
        };
        if let Some(cell) = self.cells.get(m * STATUS_SPAN + s) {
            cell.get_or_init(|| self.family.get_or_create(&labels()).clone())
                .inc();
        }
    }
}

/// `process_*` metrics read from /proc at scrape time (prometheus-client has no
/// process collector).
#[derive(Debug)]
struct ProcessCollector {
    start_time: f64,
}

impl ProcessCollector {
    fn new() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let start_time = process_start_time().unwrap_or(now);
        ProcessCollector { start_time }
    }
}

fn clock_ticks() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux configuration that matters; reading it
    // would need libc and unsafe code.
    100.0
}

fn stat_fields() -> Option<Vec<String>> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; fields start after the closing paren.
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

fn process_start_time() -> Option<f64> {
    let fields = stat_fields()?;
    let start_ticks: f64 = fields.get(19)?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime + start_ticks / clock_ticks())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(f) = stat_fields() {
            let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let cpu = ConstCounter::new((utime + stime) / clock_ticks());
            let e = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                cpu.metric_type(),
            )?;
            cpu.encode(e)?;
            let rss_pages: i64 = f.get(21).and_then(|v| v.parse().ok()).unwrap_or(0);
            let rss = ConstGauge::new(rss_pages * 4096);
            let e = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                None,
                rss.metric_type(),
            )?;
            rss.encode(e)?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let fds = ConstGauge::new(dir.count() as i64);
            let e = encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors",
                None,
                fds.metric_type(),
            )?;
            fds.encode(e)?;
        }
        let start = ConstGauge::new(self.start_time);
        let e = encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            None,
            start.metric_type(),
        )?;
        start.encode(e)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_spec_names() {
        let m = Metrics::new();
        let rc = RequestCounters::new(&m, "inbound", "r1");
        rc.inc(&http::Method::GET, 200);
        rc.inc(&http::Method::from_bytes(b"PURGE").unwrap(), 404);
        let text = m.encode();
        assert!(text.contains(
            r#"breakwater_requests_total{listener="inbound",route="r1",method="GET",status="200"} 1"#
        ), "{text}");
        assert!(text.contains(r#"method="other",status="404"} 1"#));
        assert!(text.contains("breakwater_build_info{version="));
        assert!(text.contains("process_cpu_seconds_total"));
        assert!(text.contains("process_resident_memory_bytes"));
        assert!(text.contains("process_open_fds"));
        assert!(text.contains("process_start_time_seconds"));
        assert!(text.ends_with("# EOF\n"));
    }
}
