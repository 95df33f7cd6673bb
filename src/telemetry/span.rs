//! breakwater's span recorder: what a traced request records (a [`SpanRecord`] per
//! span, plain data in the OpenTelemetry model, using the `opentelemetry` API's
//! types), the parent-based ratio sampler, and where finished spans go.
//!
//! Why not the OpenTelemetry SDK's tracer: for each span it builds a `Context`, a
//! boxed span behind a mutex, runs the sampler through trait objects, copies the
//! instrumentation scope into the finished span data and hands that to processors,
//! which for OTLP convert it again into protobuf structs. Measured with every request
//! traced, that was 13k instructions per request (two spans) on top of 82k for the
//! whole request: more than the 10% tracing may cost. Recording plain fields and
//! writing them in wire format when the span ends costs a fraction of it. linkerd2-
//! proxy records its spans the same way. The model (ids, kinds, attribute values,
//! events, status) is the `opentelemetry` crate's, so the semantics are the same.
//!
//! Attributes go further: each is written in wire format the moment it is set
//! ([`Attributes`], keys encoded at compile time in [`keys`], the attributes every
//! span of a route or endpoint shares encoded once), so a traced request builds no
//! `KeyValue` and owns no copy of its path or host. That took tracing from 7.7k to
//! 5.3k instructions per request.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use opentelemetry::trace::{Event, SpanId, SpanKind, Status, TraceId, TraceState};
use opentelemetry::{KeyValue, StringValue};

use super::batch::BatchProcessor;
pub use super::otlp::wire::{AttrKey, Attributes, Scalar};
use crate::sync::lock;

/// The attribute keys breakwater's spans use: the HTTP semantic conventions' and
/// its own (`breakwater.*`).
pub mod keys {
    use super::AttrKey;

    /// `http.request.method`
    pub const METHOD: AttrKey = AttrKey::new("http.request.method");
    /// `http.route`
    pub const ROUTE: AttrKey = AttrKey::new("http.route");
    /// `url.path`
    pub const URL_PATH: AttrKey = AttrKey::new("url.path");
    /// `server.address`
    pub const SERVER_ADDRESS: AttrKey = AttrKey::new("server.address");
    /// `server.port`
    pub const SERVER_PORT: AttrKey = AttrKey::new("server.port");
    /// `http.response.status_code`
    pub const STATUS_CODE: AttrKey = AttrKey::new("http.response.status_code");
    /// `rpc.grpc.status_code`
    pub const GRPC_STATUS_CODE: AttrKey = AttrKey::new("rpc.grpc.status_code");
    /// `error.type`
    pub const ERROR_TYPE: AttrKey = AttrKey::new("error.type");
    /// `breakwater.attempts`: how many upstream attempts the request made.
    pub const ATTEMPTS: AttrKey = AttrKey::new("breakwater.attempts");
    /// `breakwater.attempt`: which attempt an attempt span is (1-based).
    pub const ATTEMPT: AttrKey = AttrKey::new("breakwater.attempt");
    /// `breakwater.upstream`: the upstream cluster of an attempt.
    pub const UPSTREAM: AttrKey = AttrKey::new("breakwater.upstream");
}

/// One span, as recorded and exported.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// The trace it belongs to.
    pub trace_id: TraceId,
    /// Its own id.
    pub span_id: SpanId,
    /// The W3C `tracestate` it carries (the client's, for spans under a remote parent).
    pub trace_state: TraceState,
    /// Its parent, or [`SpanId::INVALID`] for a root span.
    pub parent_span_id: SpanId,
    /// The parent is in another process (the client's span).
    pub parent_span_is_remote: bool,
    /// SERVER for a request, CLIENT for an upstream attempt.
    pub span_kind: SpanKind,
    /// The span name.
    pub name: StringValue,
    /// When it started.
    pub start_time: SystemTime,
    /// When it ended.
    pub end_time: SystemTime,
    /// Attributes, in the order they were set (in wire format).
    pub attributes: Attributes,
    /// Events, in the order they happened.
    pub events: Vec<Event>,
    /// The outcome.
    pub status: Status,
}

impl SpanRecord {
    /// A span starting now.
    pub fn start(
        trace_id: TraceId,
        parent_span_id: SpanId,
        parent_span_is_remote: bool,
        span_kind: SpanKind,
        name: StringValue,
        attributes: Attributes,
    ) -> SpanRecord {
        let now = SystemTime::now();
        SpanRecord {
            trace_id,
            span_id: super::tracing::random_span_id(),
            trace_state: TraceState::NONE,
            parent_span_id,
            parent_span_is_remote,
            span_kind,
            name,
            start_time: now,
            end_time: now,
            attributes,
            events: Vec::new(),
            status: Status::Unset,
        }
    }

    /// Adds an event happening now.
    pub fn add_event(&mut self, name: &'static str, attributes: Vec<KeyValue>) {
        self.events
            .push(Event::new(name, SystemTime::now(), attributes, 0));
    }
}

/// Where finished spans go.
#[derive(Debug, Clone)]
pub(crate) enum Sink {
    /// Encoded and batched for the collector.
    Batch(Arc<BatchProcessor>),
    /// Kept in memory, for tests.
    Memory(Arc<Mutex<Vec<SpanRecord>>>),
}

/// Decides which new traces are recorded and takes finished spans: cheap to clone,
/// one per route.
#[derive(Debug, Clone)]
pub struct Recorder {
    sink: Sink,
    /// New traces are sampled when their trace id's random part is below this.
    bound: u64,
}

impl Recorder {
    pub(crate) fn new(sink: Sink, sample_ratio: f64) -> Recorder {
        Recorder {
            sink,
            bound: ratio_bound(sample_ratio),
        }
    }

    /// Whether a trace is recorded: as the client's span says when there is one
    /// (parent-based), else by the trace id and `sample_ratio` (the same rule as
    /// OpenTelemetry's `TraceIdRatioBased`, so every service sharing the ratio keeps
    /// the same traces).
    pub fn should_sample(&self, parent_sampled: Option<bool>, trace_id: TraceId) -> bool {
        match parent_sampled {
            Some(s) => s,
            None => {
                let b = trace_id.to_bytes();
                let low =
                    u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
                (low >> 1) < self.bound
            }
        }
    }

    /// The batcher spans go to, when they are exported.
    pub(crate) fn batch(&self) -> Option<&BatchProcessor> {
        match &self.sink {
            Sink::Batch(b) => Some(b),
            Sink::Memory(_) => None,
        }
    }

    /// Ends a span now and hands it over for export.
    pub fn finish(&self, mut span: SpanRecord) {
        span.end_time = SystemTime::now();
        match &self.sink {
            Sink::Batch(b) => b.record(&span),
            Sink::Memory(m) => lock(m).push(span),
        }
    }
}

/// The sampling bound of a ratio, over the 63 random bits used.
fn ratio_bound(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio > 0.0 {
        (ratio * (1u64 << 63) as f64) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder(ratio: f64) -> Recorder {
        Recorder::new(Sink::Memory(Arc::default()), ratio)
    }

    #[test]
    fn parents_decide_then_the_ratio() {
        let none = recorder(0.0);
        let all = recorder(1.0);
        let id = TraceId::from(0x1234_5678_9abc_def0_1234_5678_9abc_def0u128);
        assert!(none.should_sample(Some(true), id));
        assert!(!all.should_sample(Some(false), id));
        assert!(!none.should_sample(None, id));
        assert!(all.should_sample(None, id));
        // A ratio keeps about that share of new traces.
        let half = recorder(0.5);
        let kept = (0..10_000u128)
            .filter(|i| {
                half.should_sample(
                    None,
                    TraceId::from(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)),
                )
            })
            .count();
        assert!((4_500..5_500).contains(&kept), "{kept}");
    }

    #[test]
    fn finished_spans_get_their_end_time() {
        let store: Arc<Mutex<Vec<SpanRecord>>> = Arc::default();
        let r = Recorder::new(Sink::Memory(store.clone()), 1.0);
        let mut s = SpanRecord::start(
            TraceId::from(1),
            SpanId::INVALID,
            false,
            SpanKind::Server,
            "GET r".into(),
            Attributes::default(),
        );
        s.add_event("retry", Vec::new());
        r.finish(s);
        let spans = store.lock().unwrap();
        assert_eq!(spans.len(), 1);
        assert!(spans[0].end_time >= spans[0].start_time);
        assert_ne!(spans[0].span_id, SpanId::INVALID);
        assert_eq!(spans[0].events[0].name, "retry");
    }
}
