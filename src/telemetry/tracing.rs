//! OpenTelemetry tracing: the [`Tracing`] handle (an OTLP exporter behind a batch
//! processor with a bounded queue, or nothing at all), the W3C Trace Context codec
//! (`traceparent`, by hand: no allocation to read it) and [`TraceCtx`], the per-request
//! trace state the trace layer puts in request extensions for the layers below it.
//!
//! Propagation works whether or not export is configured: with tracing off, an upstream
//! still receives a `traceparent` that continues the client's trace (or starts one)
//! with a fresh, unexported span id, and `tracestate` passes through untouched.
//!
//! Export never blocks or slows a request: finished spans go into a bounded channel
//! with `try_send` (a full queue drops the span), and a tokio task batches and sends
//! them (the SDK's async-runtime batch processor, as the OTLP docs require for an async
//! HTTP client). A dead or slow collector costs dropped spans, nothing else.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, TraceFlags, TraceState, TracerProvider as _};
pub use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfig, BatchConfigBuilder, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;

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

/// The server span of a sampled request and the tracer to start its children with.
#[derive(Clone, Debug)]
pub struct Recording {
    /// A context whose active span is the request's server span.
    pub cx: Context,
    /// The tracer that started it.
    pub tracer: SdkTracer,
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

    /// A request whose server span was started; `recording` is `None` when the sampler
    /// dropped it (its trace id and flags still propagate).
    pub fn new(sc: &SpanContext, parent: Option<Parent>, recording: Option<Recording>) -> Self {
        let parent_id = match (&recording, parent) {
            (Some(_), _) => sc.span_id(),
            (None, Some(p)) => p.span_id,
            (None, None) => SpanId::INVALID,
        };
        TraceCtx {
            trace_id: sc.trace_id(),
            parent_id,
            sampled: sc.is_sampled(),
            recording,
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
    inner: Option<Arc<Exporter>>,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("exporting", &self.is_exporting())
            .finish()
    }
}

struct Exporter {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    shut: AtomicBool,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // The SDK's own shutdown-on-drop blocks the dropping thread until the batch
        // task answers: on a runtime thread that can deadlock. Do it on a thread of
        // its own; it ends when the task answers or the runtime is gone.
        if !self.shut.swap(true, Ordering::SeqCst) {
            let provider = self.provider.clone();
            let _ = std::thread::Builder::new()
                .name("otel-shutdown".into())
                .spawn(move || {
                    let _ = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
                });
        }
    }
}

impl Tracing {
    /// Propagation only: no spans are recorded or exported.
    pub fn disabled() -> Tracing {
        Tracing { inner: None }
    }

    /// Builds the OTLP exporter for `telemetry.tracing`, or [`Tracing::disabled`] when
    /// the block is absent or off. Must run inside a tokio runtime (the batch task is
    /// spawned on it); nothing connects until the first batch is sent.
    pub fn from_config(cfg: &TelemetryConfig) -> Result<Tracing, BoxError> {
        match cfg.tracing.as_ref().and_then(|t| t.on()) {
            None => Ok(Tracing::disabled()),
            Some(t) => Tracing::exporting(t),
        }
    }

    fn exporting(t: &TracingConfig) -> Result<Tracing, BoxError> {
        let base = t.otlp_endpoint.trim_end_matches('/');
        let exporter = match t.otlp_protocol.as_str() {
            "grpc" => SpanExporter::builder()
                .with_tonic()
                .with_endpoint(base)
                .build(),
            _ => {
                if base.starts_with("https://") {
                    return Err(format!(
                        "telemetry.tracing.otlp_endpoint {base}: https is not supported for OTLP/HTTP in this build; use http:// (e.g. a local collector)"
                    )
                    .into());
                }
                SpanExporter::builder()
                    .with_http()
                    // Never left to feature priority: another crate enabling http-json
                    // would silently switch the encoding.
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(format!("{base}/v1/traces"))
                    .build()
            }
        }
        .map_err(|e| format!("telemetry.tracing: cannot build the OTLP exporter: {e}"))?;
        // Defaults, overridable with the standard OTEL_BSP_* variables: a queue of
        // 2048 spans (beyond it spans are dropped), batches of 512 every 5 s.
        let batch = BatchConfigBuilder::default().build();
        Ok(Tracing::from_provider(batched_provider(exporter, batch, t)))
    }

    /// Wraps a provider built elsewhere (tests use a synchronous in-memory exporter).
    pub fn from_provider(provider: SdkTracerProvider) -> Tracing {
        let tracer = provider.tracer(SCOPE);
        Tracing {
            inner: Some(Arc::new(Exporter {
                provider,
                tracer,
                shut: AtomicBool::new(false),
            })),
        }
    }

    /// Whether spans are recorded and exported.
    pub fn is_exporting(&self) -> bool {
        self.inner.is_some()
    }

    /// The tracer, when exporting.
    pub fn tracer(&self) -> Option<&SdkTracer> {
        self.inner.as_ref().map(|e| &e.tracer)
    }

    /// Sends the spans batched so far and waits for the answer (at most `timeout`).
    pub async fn force_flush(&self, timeout: Duration) -> Result<(), BoxError> {
        let Some(e) = &self.inner else { return Ok(()) };
        let provider = e.provider.clone();
        // The SDK blocks the calling thread until the batch task answers.
        let flush = tokio::task::spawn_blocking(move || provider.force_flush());
        match tokio::time::timeout(timeout, flush).await {
            Ok(Ok(r)) => r.map_err(Into::into),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("timed out flushing spans".into()),
        }
    }

    /// Sends the spans still queued and stops the exporter, waiting at most `timeout`.
    /// Spans that end later are dropped.
    pub async fn shutdown(&self, timeout: Duration) {
        let Some(e) = &self.inner else { return };
        if e.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        let provider = e.provider.clone();
        let task =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "tracing shutdown: spans may be lost"),
            Ok(Err(_)) | Err(_) => {
                tracing::warn!("tracing shutdown timed out: the last spans may be lost")
            }
        }
    }
}

/// The provider: a bounded batch queue drained by a tokio task (spans are dropped,
/// never waited for, when it is full), a parent-based ratio sampler, the resource.
fn batched_provider<E>(exporter: E, batch: BatchConfig, t: &TracingConfig) -> SdkTracerProvider
where
    E: opentelemetry_sdk::trace::SpanExporter + 'static,
{
    let processor = BatchSpanProcessor::builder(exporter, Tokio)
        .with_batch_config(batch)
        .build();
    let resource = Resource::builder()
        .with_service_name(t.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            t.sample_ratio,
        ))))
        .with_resource(resource)
        .build()
}

/// A parent span context for the SDK from a client's `traceparent` (and `tracestate`).
pub fn remote_parent(parent: &Parent, headers: &HeaderMap) -> Context {
    let state = headers
        .get(&TRACESTATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    use opentelemetry::trace::TraceContextExt as _;
    Context::new().with_remote_span_context(SpanContext::new(
        parent.trace_id,
        parent.span_id,
        if parent.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::NOT_SAMPLED
        },
        true,
        state,
    ))
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

    /// An exporter whose exports never finish: a collector that accepts and stalls.
    #[derive(Debug)]
    struct Stalled;

    impl opentelemetry_sdk::trace::SpanExporter for Stalled {
        async fn export(
            &self,
            _: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            std::future::pending().await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_drops_spans_without_waiting() {
        use opentelemetry::trace::{Span as _, Tracer as _};
        let cfg = TracingConfig {
            otlp_endpoint: "http://unused".into(),
            otlp_protocol: "http".into(),
            sample_ratio: 1.0,
            service_name: "t".into(),
        };
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(8)
            .with_max_export_batch_size(2)
            .build();
        let tracing = Tracing::from_provider(batched_provider(Stalled, batch, &cfg));
        let tracer = tracing.tracer().unwrap();
        let start = std::time::Instant::now();
        // The first batch hangs in export; the queue fills; the rest are dropped.
        for _ in 0..10_000 {
            let mut span = tracer.start("s");
            span.end();
            tokio::task::yield_now().await;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "ending spans waited: {:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn off_unless_configured() {
        let t = Tracing::from_config(&TelemetryConfig::default()).unwrap();
        assert!(!t.is_exporting());
        t.shutdown(Duration::from_secs(1)).await;
    }
}
