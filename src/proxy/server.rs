//! Accepting and serving connections: HTTP/1.1 and cleartext HTTP/2 (prior knowledge)
//! on one port, slow-client protection (header read timeout, header size cap, idle
//! timeout), graceful shutdown of every connection, and the rescue boundary: the
//! service handed to hyper never fails, because an error that reaches hyper closes the
//! connection without an answer. Errors and panics become proxy-made responses here.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service as _;

use super::Shared;
use crate::config::{ListenerConfig, Protocol};
use crate::error::{BoxError, ErrorKind};
use crate::http::{grpc, synthetic, Body, ClientAddr};

/// A listener's connection settings.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// Index of the listener in the config, to find its router.
    pub index: usize,
    http1: bool,
    http2: bool,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
}

impl ListenerSettings {
    /// From a validated listener config.
    pub fn new(index: usize, l: &ListenerConfig) -> Self {
        ListenerSettings {
            index,
            http1: l.protocols.contains(&Protocol::Http1),
            http2: l.protocols.contains(&Protocol::Http2),
            header_read_timeout: l.header_read_timeout.0,
            idle_timeout: l.idle_timeout.0,
            max_header_bytes: usize::try_from(l.max_header_bytes.0).unwrap_or(65536),
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            // hyper refuses buffers under 8 KiB; the head limit is enforced on this buffer
            .max_buf_size(self.max_header_bytes.max(8192))
            .keep_alive(true);
        b.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(1024)
            .max_pending_accept_reset_streams(200)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        match (self.http1, self.http2) {
            (true, false) => b.http1_only(),
            (false, true) => b.http2_only(),
            _ => b,
        }
    }
}

/// Accepts connections until `shutdown` fires; each connection is served on `tracker`.
pub async fn serve_listener(
    listener: TcpListener,
    settings: ListenerSettings,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let settings = Arc::new(settings);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(serve_connection(
            stream,
            peer,
            settings.clone(),
            shared.clone(),
            shutdown.clone(),
        ));
    }
}

/// Per-connection activity, for the idle timeout.
#[derive(Debug)]
struct Activity {
    active: AtomicU32,
    /// Milliseconds since `epoch` at the last request end.
    last: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        Some(self.epoch.elapsed().saturating_sub(last))
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    settings: Arc<ListenerSettings>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let activity = Arc::new(Activity {
        active: AtomicU32::new(0),
        last: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let shared_hard_stop = shared.hard_stop.clone();
    let svc = ConnService {
        shared,
        index: settings.index,
        client: ClientAddr(peer),
        activity: activity.clone(),
    };
    let builder = settings.builder();
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let idle = settings.idle_timeout;
    let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(client = %peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = shared_hard_stop.cancelled() => {
                // The drain timeout ran out: drop the connection and what is left on it.
                break;
            }
            _ = tick.tick(), if !closing => {
                if activity.idle_for().is_some_and(|d| d >= idle) {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// The service hyper calls for each request of one connection.
#[derive(Debug, Clone)]
struct ConnService {
    shared: Arc<Shared>,
    index: usize,
    client: ClientAddr,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = RescueFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut req = req.map(Body::from);
        req.extensions_mut().insert(self.client);
        let is_grpc = grpc::is_grpc(req.headers());
        self.activity.active.fetch_add(1, Ordering::Relaxed);
        let guard = ActiveGuard(self.activity.clone());
        let routers = self.shared.routers.load();
        let inner = match routers.listeners.get(self.index).and_then(|r| r.find(&req)) {
            Some(route) => Inner::Route(route.service.clone().call(req)),
            None => Inner::Failed(Some(Box::new(crate::error::NoRoute))),
        };
        RescueFuture {
            inner,
            is_grpc,
            _guard: guard,
        }
    }
}

struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

type RouteFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

enum Inner {
    Route(RouteFuture),
    Failed(Option<BoxError>),
}

/// Renders errors and panics of the route stack as proxy-made responses.
pub struct RescueFuture {
    inner: Inner,
    is_grpc: bool,
    _guard: ActiveGuard,
}

/// The one place an error becomes a response (SPEC section 3).
pub fn rescue(err: &BoxError, is_grpc: bool) -> Response<Body> {
    let kind = ErrorKind::of_box(err);
    if kind == ErrorKind::Internal {
        tracing::error!(error = %err, "request failed inside the proxy");
    }
    synthetic::error_response(kind, is_grpc)
}

impl Future for RescueFuture {
    type Output = Result<Response<Body>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let is_grpc = self.is_grpc;
        let result = match &mut self.inner {
            Inner::Failed(e) => Err(e.take().unwrap_or_else(|| "polled after completion".into())),
            Inner::Route(fut) => match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(r)) => r,
                Err(_) => {
                    tracing::error!("a request handler panicked; answering 500");
                    self.inner = Inner::Failed(None);
                    return Poll::Ready(Ok(synthetic::error_response(
                        ErrorKind::Internal,
                        is_grpc,
                    )));
                }
            },
        };
        Poll::Ready(Ok(match result {
            Ok(res) => res,
            Err(e) => rescue(&e, is_grpc),
        }))
    }
}
