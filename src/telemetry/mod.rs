//! What operators see: Prometheus metrics, logs and OpenTelemetry traces.

pub mod batch;
pub mod metrics;
pub mod otlp;
pub mod span;
pub mod tracing;

pub use self::tracing::{TraceCtx, Tracing};
pub use metrics::Metrics;
