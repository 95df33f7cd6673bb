//! Test support: real upstream servers (HTTP/1.1 and h2c) on ephemeral loopback ports,
//! the proxy started in-process from YAML, and small client helpers. Every server binds
//! 127.0.0.1:0 and stops when its handle is dropped.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Body type upstream handlers answer with.
pub type UpBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A full body.
pub fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A response with this status and body.
pub fn resp(status: u16, body: impl Into<Bytes>) -> Response<UpBody> {
    Response::builder().status(status).body(full(body)).unwrap()
}

/// A running upstream; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests seen.
    pub hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Protocol an upstream speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

/// Starts an upstream whose handler answers every request.
pub async fn upstream<F, Fut>(proto: Proto, handler: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<UpBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(handler);
    let h = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let hits = h.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let io = TokioIo::new(stream);
                match proto {
                    Proto::H1 => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                    Proto::H2 => {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    }
                }
            });
        }
    });
    Upstream { addr, hits, task }
}

/// An HTTP/1.1 upstream answering 200 with the request path.
pub async fn echo_upstream() -> Upstream {
    upstream(Proto::H1, |req: Request<Incoming>| async move {
        resp(200, format!("path={}", req.uri()))
    })
    .await
}

/// A loopback port with nothing listening on it.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// The proxy running in-process.
pub struct Proxy {
    /// Listener addresses, in config order.
    pub addrs: Vec<SocketAddr>,
    /// Admin address.
    pub admin: SocketAddr,
    pub shared: Arc<breakwater::proxy::Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), String>>>,
}

impl Proxy {
    /// The first listener's base URL.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addrs[0], path)
    }
    /// An admin URL.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }
    /// Starts the drain (like SIGTERM) and returns the run task to await.
    pub fn begin_shutdown(&mut self) -> JoinHandle<Result<(), String>> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().expect("already shut down")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Starts the proxy from YAML. Every listener and the admin should use port 0;
/// `admin:` is added (on 127.0.0.1:0) when the YAML has none.
pub async fn start_proxy(yaml: &str) -> Proxy {
    let yaml = if yaml.contains("admin:") {
        yaml.to_string()
    } else {
        format!("admin:\n  address: 127.0.0.1:0\n{yaml}")
    };
    let loaded = breakwater::config::from_yaml(&yaml, "test.yaml", Path::new("."))
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{yaml}"));
    let server = breakwater::Server::bind(loaded).await.unwrap();
    let addrs = server.listener_addrs();
    let admin = server.admin_addr().unwrap();
    let shared = server.shared();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async move {
                let _ = rx.await;
            })
            .await
            .map_err(|e| e.to_string())
    });
    Proxy {
        addrs,
        admin,
        shared,
        stop: Some(tx),
        task: Some(task),
    }
}

/// A one-route proxy config in front of `upstream` with extra route YAML (indented 8 spaces).
pub fn one_route(upstream: SocketAddr, route_extra: &str) -> String {
    one_route_proto(upstream, "http1", route_extra)
}

/// Like [`one_route`] with an upstream protocol.
pub fn one_route_proto(upstream: SocketAddr, protocol: &str, route_extra: &str) -> String {
    format!(
        "listeners:
  - name: test
    address: 127.0.0.1:0
    routes:
      - name: r
        match: {{ path_prefix: / }}
        upstream: up
{route_extra}
upstreams:
  up:
    endpoints: [{upstream}]
    protocol: {protocol}
    connect_timeout: 200ms
telemetry:
  access_log: false
"
    )
}

/// An HTTP/1.1 client.
pub fn h1_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, UpBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c (prior knowledge) client.
pub fn h2_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, UpBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// GET over HTTP/1.1; returns status, headers and body.
pub async fn get(url: &str) -> (u16, http::HeaderMap, Bytes) {
    send(Request::get(url).body(full("")).unwrap()).await
}

/// Sends a request over HTTP/1.1 and reads the whole response.
pub async fn send(req: Request<UpBody>) -> (u16, http::HeaderMap, Bytes) {
    let res = tokio::time::timeout(Duration::from_secs(10), h1_client().request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

/// The value of one sample in the Prometheus exposition, if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Scrapes the proxy's /metrics.
pub async fn scrape(p: &Proxy) -> String {
    let (status, _, body) = get(&p.admin_url("/metrics")).await;
    assert_eq!(status, 200);
    String::from_utf8(body.to_vec()).unwrap()
}
