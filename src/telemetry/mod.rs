//! What operators see: Prometheus metrics, logs and OpenTelemetry traces.

pub mod metrics;
pub mod tracing;

pub use self::tracing::{TraceCtx, Tracing};
pub use metrics::Metrics;
