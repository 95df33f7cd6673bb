//! The proxy itself: the server (accept, HTTP/1.1 + h2c, rescue boundary), the router,
//! the per-route stack builder and the upstream client.

pub mod client;
pub mod route;
pub mod router;
pub mod server;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Loaded;
use crate::telemetry::{Metrics, Tracing};
pub use route::{Router, Routers};

/// State shared by the listeners and the admin endpoints.
#[derive(Debug)]
pub struct Shared {
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Trace export (or propagation only); fixed for the life of the process.
    pub tracing: Tracing,
    /// The routers in force; swapped whole on reload.
    pub routers: ArcSwap<Routers>,
    /// The config in force.
    pub loaded: ArcSwap<Loaded>,
    /// Set on SIGTERM: `/readyz` answers 503.
    pub draining: AtomicBool,
    /// When the process started serving.
    pub started: std::time::Instant,
    /// Fired when the drain timeout runs out: remaining connections are dropped.
    pub hard_stop: tokio_util::sync::CancellationToken,
}
