//! `breakwater demo`: a newcomer's first minute. Starts, on loopback, an upstream that
//! misbehaves (a share of 503s, stalls, and a few seconds of being down every half
//! minute), the proxy in front of it with `config/demo.yaml` (retries, breaker, rate
//! limit, fallback), and a little traffic through both a protected and an unprotected
//! route, printing every few seconds what each one made of the same upstream.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::BoxError;
use crate::Server;

/// The demo config, built in so `breakwater demo` works from any folder.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");

/// Share of requests answered 503.
const FAIL_SHARE: f64 = 0.25;
/// Share of requests stalled.
const STALL_SHARE: f64 = 0.10;
const STALL: Duration = Duration::from_secs(3);
/// Every CYCLE, the upstream is down for the last DOWN of it.
const CYCLE: Duration = Duration::from_secs(30);
const DOWN: Duration = Duration::from_secs(5);

/// Runs the demo until `shutdown` completes.
pub async fn run(
    shutdown: impl std::future::Future<Output = ()>,
    traffic: bool,
) -> Result<(), BoxError> {
    let loaded =
        crate::config::from_yaml(DEMO_CONFIG, "config/demo.yaml (built in)", Path::new("."))
            .map_err(|e| e.to_string())?;
    let upstream_addr: SocketAddr = loaded
        .config
        .upstreams
        .get("flaky")
        .and_then(|u| u.endpoints.value.first())
        .and_then(|e| e.parse().ok())
        .ok_or("the demo config has no `flaky` upstream with an ip:port endpoint")?;
    let proxy_addr = loaded.config.listeners[0].address.value.clone();
    let admin_addr = loaded.config.admin.address.value.clone();

    let flaky = tokio::spawn(flaky_upstream(upstream_addr));
    let server = Server::bind(loaded).await?;
    let shared = server.shared();

    println!(
        "\nbreakwater demo\n\
         \n  proxy     http://{proxy_addr}\
         \n  admin     http://{admin_addr}/   (status page; also /status, /metrics, /config)\
         \n  upstream  {upstream_addr}, a flaky service: {}% answered 503, {}% stall {}s, down {}s every {}s\n\
         \nRoutes (config/demo.yaml):\
         \n  /api/...      timeout 2s, retry x3 with a 500ms per-try timeout, circuit breaker, fallback\
         \n  /limited/...  rate limit 5/s per client (burst 5)\
         \n  /...          no protection, for comparison\n\
         \nTry:\
         \n  curl -i http://{proxy_addr}/api/hello\
         \n  curl -i http://{proxy_addr}/raw/hello\
         \n  for i in $(seq 8); do curl -s -o /dev/null -w '%{{http_code}} ' http://{proxy_addr}/limited/x; done; echo\
         \n  curl -s http://{admin_addr}/status\
         \n  curl -s -X POST http://{admin_addr}/circuit/api/force-open\n\
         \nCtrl-C stops it.\n",
        (FAIL_SHARE * 100.0) as u32,
        (STALL_SHARE * 100.0) as u32,
        STALL.as_secs(),
        DOWN.as_secs(),
        CYCLE.as_secs(),
    );

    let traffic_task = traffic.then(|| {
        let target = proxy_addr.clone();
        tokio::spawn(async move {
            traffic_loop(&target, shared).await;
        })
    });
    let result = server.run(shutdown).await;
    if let Some(t) = traffic_task {
        t.abort();
    }
    flaky.abort();
    result
}

/// The misbehaving upstream.
async fn flaky_upstream(addr: SocketAddr) {
    let start = Instant::now();
    let (down_tx, down_rx) = watch::channel(false);
    let phase = move || {
        let t = Duration::from_millis((start.elapsed().as_millis() % CYCLE.as_millis()) as u64);
        t >= CYCLE - DOWN
    };
    loop {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("demo upstream cannot listen on {addr}: {e}");
                return;
            }
        };
        let _ = down_tx.send(false);
        // Serve until the down phase starts, then drop the socket: connections are refused.
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if phase() { break; }
                    continue;
                }
            };
            let Ok((stream, _)) = accepted else { continue };
            let mut down = down_rx.clone();
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(flaky_answer(req).await)
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = down.wait_for(|d| *d) => {} // going down: connections break
                }
            });
        }
        let _ = down_tx.send(true);
        drop(listener);
        while phase() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn flaky_answer(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let roll: f64 = rand::random();
    let attempt = req
        .headers()
        .get("x-breakwater-attempt")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("1")
        .to_string();
    let mk = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if roll < FAIL_SHARE {
        return mk(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("flaky upstream: 503 (attempt {attempt})\n"),
        );
    }
    if roll < FAIL_SHARE + STALL_SHARE {
        tokio::time::sleep(STALL).await;
    }
    mk(
        StatusCode::OK,
        format!(
            "hello from the flaky upstream: {} (attempt {attempt})\n",
            req.uri().path()
        ),
    )
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    degraded: AtomicU64,
    failed: AtomicU64,
}

impl Tally {
    fn take(&self) -> (u64, u64, u64) {
        (
            self.ok.swap(0, Ordering::Relaxed),
            self.degraded.swap(0, Ordering::Relaxed),
            self.failed.swap(0, Ordering::Relaxed),
        )
    }
}

/// Ten requests a second to `/api/demo` and `/raw/demo`, summarised every five seconds.
async fn traffic_loop(proxy: &str, shared: Arc<crate::proxy::Shared>) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let api = Arc::new(Tally::default());
    let raw = Arc::new(Tally::default());
    let mut send = tokio::time::interval(Duration::from_millis(100));
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    let started = Instant::now();
    loop {
        tokio::select! {
            _ = send.tick() => {
                for (path, tally) in [("/api/demo", api.clone()), ("/raw/demo", raw.clone())] {
                    let Ok(uri) = format!("http://{proxy}{path}").parse::<http::Uri>() else { continue };
                    let client = client.clone();
                    tokio::spawn(async move {
                        let res = tokio::time::timeout(Duration::from_secs(6), client.get(uri)).await;
                        match res {
                            Ok(Ok(r)) => {
                                let degraded = r.headers().contains_key("proxy-status");
                                let ok = r.status().is_success();
                                let _ = r.into_body().collect().await;
                                let c = if ok { &tally.ok } else if degraded { &tally.degraded } else { &tally.failed };
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => { tally.failed.fetch_add(1, Ordering::Relaxed); }
                        }
                    });
                }
            }
            _ = report.tick() => {
                let (a_ok, a_deg, a_fail) = api.take();
                let (r_ok, r_deg, r_fail) = raw.take();
                let breaker = shared
                    .routers
                    .load()
                    .route("api")
                    .and_then(|r| r.state.breaker.as_ref().map(|b| b.state().as_str()))
                    .unwrap_or("-");
                println!(
                    "[{:>4}s] /api: {a_ok:>3} ok {a_deg:>3} degraded (fallback) {a_fail:>3} failed | /raw: {r_ok:>3} ok {:>3} failed | api breaker: {breaker}",
                    started.elapsed().as_secs(),
                    r_fail + r_deg,
                );
            }
        }
    }
}
