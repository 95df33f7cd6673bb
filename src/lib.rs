//! breakwater: a resilience proxy. It sits beside a service (sidecar) or in front of many
//! (gateway), speaks HTTP/1.1, HTTP/2 and gRPC, and wraps every route in tower layers:
//! timeout, retry, circuit breaker, rate limit, concurrency limit and fallback.
//!
//! [`Server::bind`] then [`Server::run`] is the whole lifecycle; tests bind port 0.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod demo;
pub mod error;
pub mod http;
pub mod layers;
pub mod proxy;
pub mod sync;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigErrors, ListenerConfig, Loaded};
use crate::error::BoxError;
use crate::proxy::server::{serve_listener, ListenerSettings};
use crate::proxy::{Routers, Shared};
use crate::telemetry::metrics::ResultLabels;
use crate::telemetry::{Metrics, Tracing};

/// A proxy with its sockets bound, ready to run.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<(TcpListener, ListenerSettings)>,
    admin: TcpListener,
}

impl Server {
    /// Binds every listener and the admin port and builds the routes. Nothing is
    /// served until [`Server::run`].
    pub async fn bind(loaded: Loaded) -> Result<Server, BoxError> {
        let metrics = Arc::new(Metrics::new());
        let tracing = Tracing::from_config(&loaded.config.telemetry)?;
        let routers = Routers::build(&loaded, None, &metrics, &tracing)?;
        let mut listeners = Vec::new();
        for (i, l) in loaded.config.listeners.iter().enumerate() {
            let sock = TcpListener::bind(&l.address.value).await.map_err(|e| {
                format!(
                    "cannot listen on {} (listener {}): {e}",
                    l.address.value, l.name.value
                )
            })?;
            listeners.push((sock, ListenerSettings::new(i, l)));
        }
        let admin_addr = &loaded.config.admin.address.value;
        let admin = TcpListener::bind(admin_addr)
            .await
            .map_err(|e| format!("cannot listen on admin address {admin_addr}: {e}"))?;
        let shared = Arc::new(Shared {
            metrics,
            tracing,
            routers: ArcSwap::from_pointee(routers),
            loaded: ArcSwap::from_pointee(loaded),
            draining: Default::default(),
            started: std::time::Instant::now(),
            hard_stop: CancellationToken::new(),
        });
        Ok(Server {
            shared,
            listeners,
            admin,
        })
    }

    /// The bound address of each listener, in config order.
    pub fn listener_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    /// The state shared with the admin endpoints.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` completes, then drains: `/readyz` turns 503 at once,
    /// accepting stops after `drain_delay`, idle connections close, and in-flight
    /// requests get up to `drain_timeout` to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), BoxError> {
        let stop_accepting = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut accept_tasks = Vec::new();
        for (sock, settings) in self.listeners {
            accept_tasks.push(tokio::spawn(serve_listener(
                sock,
                settings,
                self.shared.clone(),
                stop_accepting.clone(),
                tracker.clone(),
            )));
        }
        let admin_stop = CancellationToken::new();
        let admin_task = tokio::spawn(admin::serve(
            self.admin,
            self.shared.clone(),
            admin_stop.clone(),
        ));
        let watcher = tokio::spawn(watch_config_file(self.shared.clone()));
        let addrs: Vec<String> = self
            .shared
            .loaded
            .load()
            .config
            .listeners
            .iter()
            .map(|l| format!("{}={}", l.name.value, l.address.value))
            .collect();
        tracing::info!(listeners = %addrs.join(" "), version = env!("CARGO_PKG_VERSION"), "breakwater is serving");

        shutdown.await;
        let shutdown_cfg = self.shared.loaded.load().config.shutdown.clone();
        self.shared.draining.store(true, Ordering::SeqCst);
        tracing::info!(
            drain_delay = %shutdown_cfg.drain_delay,
            drain_timeout = %shutdown_cfg.drain_timeout,
            "shutting down: readyz now answers 503"
        );
        tokio::time::sleep(shutdown_cfg.drain_delay.0).await;
        stop_accepting.cancel();
        for t in accept_tasks {
            let _ = t.await;
        }
        tracker.close();
        if tokio::time::timeout(shutdown_cfg.drain_timeout.0, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = tracker.len(),
                "drain timeout reached; closing the remaining connections"
            );
            self.shared.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
        }
        watcher.abort();
        admin_stop.cancel();
        let _ = admin_task.await;
        // Send the spans still queued; a dead collector cannot hold the exit up.
        self.shared
            .tracing
            .shutdown(telemetry::tracing::SHUTDOWN_TIMEOUT)
            .await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default)]
pub struct ReloadReport {
    /// Listener changes that take effect only after a restart.
    pub needs_restart: Vec<String>,
    /// Routes now in force.
    pub routes: usize,
}

/// Errors of a reload; the old config stays in force.
#[derive(Debug)]
pub enum ReloadError {
    /// The file is invalid.
    Config(ConfigErrors),
    /// The config is valid but could not be built (e.g. a bad endpoint).
    Build(String),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Config(e) => write!(f, "{e}"),
            ReloadError::Build(e) => write!(f, "error: {e}"),
        }
    }
}

static RELOAD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Re-reads the config file and swaps in new routes atomically. Routes whose blocks
/// did not change keep their breaker, limiter and budget state. Listener changes
/// (address, protocols, connection settings, added or removed listeners) need a
/// restart and are reported; the running listeners keep serving.
pub async fn reload(shared: &Shared) -> Result<ReloadReport, ReloadError> {
    let _one_at_a_time = RELOAD_LOCK.lock().await;
    let result = reload_inner(shared);
    let label = if result.is_ok() { "success" } else { "failure" };
    shared
        .metrics
        .config_reloads
        .get_or_create(&ResultLabels { result: label })
        .inc();
    match &result {
        Ok(r) => {
            tracing::info!(routes = r.routes, needs_restart = ?r.needs_restart, "config reloaded")
        }
        Err(e) => {
            tracing::warn!(error = %e, "config reload failed; the previous config stays in force")
        }
    }
    result
}

fn reload_inner(shared: &Shared) -> Result<ReloadReport, ReloadError> {
    let old = shared.loaded.load_full();
    let new = config::load(&old.path).map_err(ReloadError::Config)?;
    let old_routers = shared.routers.load_full();
    let built = Routers::build(&new, Some(&old_routers), &shared.metrics, &shared.tracing)
        .map_err(|e| ReloadError::Build(e.to_string()))?;

    // Running listeners keep their positions; their routes come from the new config.
    let mut needs_restart = Vec::new();
    let mut listeners = Vec::new();
    for (i, running) in old.config.listeners.iter().enumerate() {
        let name = &running.name.value;
        match new
            .config
            .listeners
            .iter()
            .position(|l| &l.name.value == name)
        {
            Some(j) => {
                if listener_settings_differ(running, &new.config.listeners[j]) {
                    needs_restart.push(format!(
                        "listener {name}: address, protocols or connection settings changed (restart to apply)"
                    ));
                }
                listeners.push(built.listeners[j].clone());
            }
            None => {
                needs_restart.push(format!(
                    "listener {name} was removed (it keeps serving its previous routes until a restart)"
                ));
                listeners.push(old_routers.listeners[i].clone());
            }
        }
    }
    for l in &new.config.listeners {
        if !old
            .config
            .listeners
            .iter()
            .any(|o| o.name.value == l.name.value)
        {
            needs_restart.push(format!(
                "listener {} is new (restart to bind {})",
                l.name.value, l.address.value
            ));
        }
    }
    if new.config.admin.address.value != old.config.admin.address.value {
        needs_restart.push("admin.address changed (restart to apply)".into());
    }
    if new.config.telemetry.tracing != old.config.telemetry.tracing {
        needs_restart.push("telemetry.tracing changed (restart to apply)".into());
    }
    let routes = listeners.iter().map(|l| l.routes.len()).sum();
    shared.routers.store(Arc::new(Routers { listeners }));
    shared.loaded.store(Arc::new(new));
    Ok(ReloadReport {
        needs_restart,
        routes,
    })
}

fn listener_settings_differ(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    a.address.value != b.address.value
        || a.protocols != b.protocols
        || a.header_read_timeout != b.header_read_timeout
        || a.idle_timeout != b.idle_timeout
        || a.max_header_bytes != b.max_header_bytes
}

/// Reloads when the config file changes (polled: works through the symlink swaps
/// Kubernetes uses for mounted ConfigMaps, with no inotify dependency).
async fn watch_config_file(shared: Arc<Shared>) {
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .map(|t| (t, std::fs::read(p).map(|b| b.len()).unwrap_or(0)))
    };
    let path = shared.loaded.load().path.clone();
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now.is_some() && now != last {
            last = now;
            let _ = reload(&shared).await;
        }
    }
}
