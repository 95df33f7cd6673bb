//! What operators see: Prometheus metrics and logs.

pub mod metrics;

pub use metrics::{Metrics, SharedMetrics};
