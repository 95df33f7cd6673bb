//! OpenTelemetry tracing: the [`Tracing`] handle (a span recorder feeding an OTLP
//! exporter through a bounded batch queue, or nothing at all), the W3C Trace Context
//! codec (`traceparent`, by hand: no allocation to read it) and [`TraceCtx`], the
//! per-request trace state the trace layer puts in request extensions for the layers
//! below it. Spans are recorded by [`super::span`], encoded by [`super::otlp::wire`],
//! batched by [`super::batch`] and sent by [`super::otlp`].
//!
//! Propagation works whether or not export is configured: with tracing off, an upstream
//! still receives a `traceparent` that continues the client's trace (or starts one)
//! with a fresh, unexported span id, and `tracestate` passes through untouched.
//!
//! Export never blocks or slows a request: finished spans are batched in a bounded
//! queue (a full queue drops them) and a tokio task sends them. A dead or slow
//! collector costs dropped spans, nothing else.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{Event, TraceState};
pub use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::KeyValue;

use super::batch::{BatchConfig, BatchProcessor};
use super::otlp::{wire, OtlpExporter, Protocol};
use super::span::{Recorder, Sink, SpanRecord};

use crate::config::{TelemetryConfig, TracingConfig};
use crate::error::BoxError;

/// The W3C `traceparent` header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The W3C `tracestate` header.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The instrumentation scope name of breakwater's spans.
const SCOPE: &str = "breakwater";

/// How long [`Tracing::shutdown`] waits for the last spans to be sent.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// A valid `traceparent` received from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// The trace id (never all zeros).
    pub trace_id: TraceId,
    /// The caller's span id (never all zeros).
    pub span_id: SpanId,
    /// The caller sampled this trace.
    pub sampled: bool,
}

/// Reads the request's `traceparent`. `None` when it is absent, repeated or malformed
/// (then the proxy starts a new trace, as W3C Trace Context asks).
pub fn parse_traceparent(headers: &HeaderMap) -> Option<Parent> {
    let mut all = headers.get_all(&TRACEPARENT).iter();
    let value = all.next()?;
    if all.next().is_some() {
        return None;
    }
    parse_traceparent_value(value.as_bytes())
}

/// Parses one `traceparent` value: `version-traceid-parentid-flags`, lowercase hex.
/// Version `00` must be exactly 55 bytes; a later version may append `-` and more,
/// which is ignored; version `ff` is invalid.
pub fn parse_traceparent_value(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex_u8(&v[0..2])?;
    match version {
        0xff => return None,
        0x00 if v.len() != 55 => return None,
        _ if v.len() > 55 && v[55] != b'-' => return None,
        _ => {}
    }
    let trace_id = hex_u128(&v[3..35])?;
    let span_id = hex_u64(&v[36..52])?;
    let flags = hex_u8(&v[53..55])?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Parent {
        trace_id: TraceId::from_bytes(trace_id.to_be_bytes()),
        span_id: SpanId::from_bytes(span_id.to_be_bytes()),
        sampled: flags & 1 == 1,
    })
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_u128(s: &[u8]) -> Option<u128> {
    s.iter()
        .try_fold(0u128, |acc, &c| Some(acc << 4 | u128::from(hex_digit(c)?)))
}

fn hex_u64(s: &[u8]) -> Option<u64> {
    s.iter()
        .try_fold(0u64, |acc, &c| Some(acc << 4 | u64::from(hex_digit(c)?)))
}

fn hex_u8(s: &[u8]) -> Option<u8> {
    s.iter()
        .try_fold(0u8, |acc, &c| Some(acc << 4 | hex_digit(c)?))
}

/// Formats a version-00 `traceparent`.
pub fn format_traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
    for (i, b) in trace_id.to_bytes().iter().enumerate() {
        buf[3 + 2 * i] = HEX[usize::from(b >> 4)];
        buf[4 + 2 * i] = HEX[usize::from(b & 0xf)];
    }
    for (i, b) in span_id.to_bytes().iter().enumerate() {
        buf[36 + 2 * i] = HEX[usize::from(b >> 4)];
        buf[37 + 2 * i] = HEX[usize::from(b & 0xf)];
    }
    if sampled {
        buf[54] = b'1';
    }
    // Only hex digits and dashes: always a valid header value.
    HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(&buf))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A random non-zero trace id.
pub fn random_trace_id() -> TraceId {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return TraceId::from_bytes(id.to_be_bytes());
        }
    }
}

/// A random non-zero span id.
pub fn random_span_id() -> SpanId {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return SpanId::from_bytes(id.to_be_bytes());
        }
    }
}

/// The trace state of one request, put in its extensions by the trace layer (the
/// outermost layer of every route) and read by the attempt layer (to start the
/// attempt span and write the upstream's `traceparent`) and the access log.
#[derive(Clone, Debug)]
pub struct TraceCtx {
    trace_id: TraceId,
    parent_id: SpanId,
    sampled: bool,
    recording: Option<Recording>,
}

/// The server span of a recorded request, for the layers below it.
#[derive(Clone, Debug)]
pub struct Recording {
    /// The server span's id: the attempt spans' parent.
    pub span_id: SpanId,
    /// Events the inner layers add to the server span (retries).
    pub events: Arc<Mutex<Vec<Event>>>,
    /// Where the attempt spans go.
    pub recorder: Recorder,
    /// The request is gRPC (its spans get the gRPC status).
    pub is_grpc: bool,
}

impl TraceCtx {
    /// A request that is not recorded: it continues the client's trace, or starts one
    /// (sampled, so that services behind the proxy keep their own sampling choice).
    pub fn unrecorded(parent: Option<Parent>) -> TraceCtx {
        match parent {
            Some(p) => TraceCtx {
                trace_id: p.trace_id,
                parent_id: p.span_id,
                sampled: p.sampled,
                recording: None,
            },
            None => TraceCtx {
                trace_id: random_trace_id(),
                parent_id: SpanId::INVALID,
                sampled: true,
                recording: None,
            },
        }
    }

    /// A request whose server span is recorded.
    pub fn recorded(trace_id: TraceId, recording: Recording) -> TraceCtx {
        TraceCtx {
            trace_id,
            parent_id: recording.span_id,
            sampled: true,
            recording: Some(recording),
        }
    }

    /// A request of a new trace the sampler left out: its id and "not sampled"
    /// propagate.
    pub fn sampled_out(trace_id: TraceId) -> TraceCtx {
        TraceCtx {
            trace_id,
            parent_id: SpanId::INVALID,
            sampled: false,
            recording: None,
        }
    }

    /// The request's trace id.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The span the proxy's own spans hang under: the server span when recorded,
    /// else the client's span (invalid when the proxy started the trace).
    pub fn parent_id(&self) -> SpanId {
        self.parent_id
    }

    /// Whether the trace is sampled (the flag the upstream receives).
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }

    /// The server span, when this request is recorded and exported.
    pub fn recording(&self) -> Option<&Recording> {
        self.recording.as_ref()
    }
}

/// The tracing handle: cheap to clone; does nothing but propagation when off.
#[derive(Clone, Default)]
pub struct Tracing {
    recorder: Option<Recorder>,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("exporting", &self.is_exporting())
            .finish()
    }
}

impl Tracing {
    /// Propagation only: no spans are recorded or exported.
    pub fn disabled() -> Tracing {
        Tracing { recorder: None }
    }

    /// Builds the OTLP exporter for `telemetry.tracing`, or [`Tracing::disabled`] when
    /// the block is absent or off. Must run inside a tokio runtime (the export task is
    /// spawned on it); nothing connects until the first batch is sent.
    pub fn from_config(cfg: &TelemetryConfig) -> Result<Tracing, BoxError> {
        match cfg.tracing.as_ref().and_then(|t| t.on()) {
            None => Ok(Tracing::disabled()),
            Some(t) => Tracing::exporting(t),
        }
    }

    fn exporting(t: &TracingConfig) -> Result<Tracing, BoxError> {
        let protocol = match t.otlp_protocol.as_str() {
            "grpc" => Protocol::Grpc,
            _ => Protocol::Http,
        };
        let exporter = OtlpExporter::new(&t.otlp_endpoint, protocol)
            .map_err(|e| format!("telemetry.tracing.{e}"))?;
        let resource = wire::encode_resource(&[
            KeyValue::new("service.name", t.service_name.clone()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("telemetry.sdk.name", SCOPE),
            KeyValue::new("telemetry.sdk.language", "rust"),
            KeyValue::new("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
        ]);
        let scope = wire::encode_scope(SCOPE, env!("CARGO_PKG_VERSION"));
        // Defaults, overridable with the standard OTEL_BSP_* variables: a queue of
        // 2048 spans (beyond it spans are dropped), batches of 512 every 5 s.
        let batch = Arc::new(BatchProcessor::spawn(
            exporter,
            BatchConfig::from_env(),
            resource,
            scope,
        ));
        Ok(Tracing {
            recorder: Some(Recorder::new(Sink::Batch(batch), t.sample_ratio)),
        })
    }

    /// Records spans in memory instead of exporting them (for tests).
    pub fn in_memory(sample_ratio: f64) -> (Tracing, Arc<Mutex<Vec<SpanRecord>>>) {
        let store = Arc::new(Mutex::new(Vec::new()));
        let tracing = Tracing {
            recorder: Some(Recorder::new(Sink::Memory(store.clone()), sample_ratio)),
        };
        (tracing, store)
    }

    /// Whether spans are recorded and exported.
    pub fn is_exporting(&self) -> bool {
        self.recorder.is_some()
    }

    /// The recorder, when spans are recorded.
    pub fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    /// Sends the spans batched so far and waits for the answer (at most `timeout`).
    pub async fn force_flush(&self, timeout: Duration) -> Result<(), BoxError> {
        match self.recorder.as_ref().and_then(Recorder::batch) {
            Some(b) => b.flush(timeout).await.map_err(Into::into),
            None => Ok(()),
        }
    }

    /// Sends the spans still queued and stops the exporter, waiting at most `timeout`.
    /// Spans that end later are dropped.
    pub async fn shutdown(&self, timeout: Duration) {
        if let Some(b) = self.recorder.as_ref().and_then(Recorder::batch) {
            if let Err(err) = b.shutdown(timeout).await {
                tracing::warn!(error = %err, "tracing shutdown: the last spans may be lost");
            }
        }
    }
}

/// The client's `tracestate`, kept on the spans of its trace (empty when absent or
/// malformed).
pub fn client_trace_state(headers: &HeaderMap) -> TraceState {
    headers
        .get(&TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or(TraceState::NONE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_a_valid_traceparent() {
        let p = parse_traceparent_value(TP.as_bytes()).unwrap();
        assert_eq!(p.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id.to_string(), "00f067aa0ba902b7");
        assert!(p.sampled);
        let p = parse_traceparent_value(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
            .unwrap();
        assert!(!p.sampled);
    }

    #[test]
    fn rejects_malformed_traceparents() {
        for bad in [
            "",
            "00",
            // uppercase hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // zero ids
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // version ff, and version 00 with trailing data
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            // wrong separators and lengths
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent_value(bad.as_bytes()).is_none(), "{bad}");
        }
    }

    #[test]
    fn later_versions_may_carry_more_fields() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(parse_traceparent_value(v.as_bytes()).is_some());
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert!(parse_traceparent_value(v.as_bytes()).is_none());
    }

    #[test]
    fn repeated_header_starts_a_new_trace() {
        let mut h = HeaderMap::new();
        h.append(&TRACEPARENT, HeaderValue::from_static(TP));
        assert!(parse_traceparent(&h).is_some());
        h.append(&TRACEPARENT, HeaderValue::from_static(TP));
        assert!(parse_traceparent(&h).is_none());
    }

    #[test]
    fn formats_round_trip() {
        let p = parse_traceparent_value(TP.as_bytes()).unwrap();
        let v = format_traceparent(p.trace_id, p.span_id, p.sampled);
        assert_eq!(v.to_str().unwrap(), TP);
        let v = format_traceparent(p.trace_id, p.span_id, false);
        assert!(v.to_str().unwrap().ends_with("-00"));
        let id = random_span_id();
        assert_ne!(id, SpanId::INVALID);
        let again = format_traceparent(random_trace_id(), id, true);
        assert!(parse_traceparent_value(again.as_bytes()).is_some());
    }

    #[test]
    fn unrecorded_context_continues_or_starts() {
        let p = parse_traceparent_value(TP.as_bytes()).unwrap();
        let c = TraceCtx::unrecorded(Some(p));
        assert_eq!(c.trace_id(), p.trace_id);
        assert_eq!(c.parent_id(), p.span_id);
        assert!(c.recording().is_none());
        let c = TraceCtx::unrecorded(None);
        assert_ne!(c.trace_id(), TraceId::INVALID);
        assert!(c.is_sampled());
    }

    #[tokio::test]
    async fn https_otlp_http_is_refused_with_a_reason() {
        let cfg = TelemetryConfig {
            tracing: Some(crate::config::values::Toggle::On(TracingConfig {
                otlp_endpoint: "https://collector:4318".into(),
                otlp_protocol: "http".into(),
                sample_ratio: 1.0,
                service_name: "x".into(),
            })),
            access_log: false,
        };
        let err = Tracing::from_config(&cfg).unwrap_err().to_string();
        assert!(err.contains("https is not supported"), "{err}");
    }

    #[tokio::test]
    async fn off_unless_configured() {
        let t = Tracing::from_config(&TelemetryConfig::default()).unwrap();
        assert!(!t.is_exporting());
        t.shutdown(Duration::from_secs(1)).await;
    }
}
