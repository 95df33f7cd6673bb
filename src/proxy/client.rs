//! The upstream client: one pooled hyper-util client per upstream (HTTP/1.1 keep-alive,
//! or HTTP/2 prior knowledge), round-robin over its endpoints. It rewrites each request
//! for forwarding (hop-by-hop headers out, `X-Forwarded-*` in, `Host` kept) and says in
//! its errors whether anything was sent: a connect failure sent nothing, so any method
//! may be retried.
//!
//! For gRPC routes that classify by gRPC status, a response whose headers carry no
//! `grpc-status` has its first body frame read before the response is handed up: if
//! that frame is the trailers (an error sent as headers-then-trailers), the status is
//! known before anything is forwarded, so retry and the breaker can act on it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response, Version};
use http_body::Body as _;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture as ClientFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use pin_project_lite::pin_project;
use tower::Service;

use crate::config::{Protocol, UpstreamConfig};
use crate::error::{BoxError, UpstreamError, UpstreamErrorKind};
use crate::http::{grpc, Attempt, Body, ClientAddr, EndpointAddr, UpstreamEndpoint};
use crate::layers::classify::{GrpcPushback, GrpcStatus};
use crate::sync::lock;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static ATTEMPT: HeaderName = HeaderName::from_static("x-breakwater-attempt");

#[derive(Debug)]
struct Endpoint {
    authority: Authority,
    label: Arc<EndpointAddr>,
    /// The endpoint's HTTP/2 connection, for `protocol: http2` upstreams.
    h2: Option<Arc<H2Connection>>,
}

/// One upstream cluster: its endpoints and connection pool.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    http2: bool,
    client: Client<HttpConnector, Body>,
}

/// One multiplexed HTTP/2 connection to an endpoint, made on first use and remade when
/// it closes. HTTP/2 upstreams do not go through the hyper-util pool because its pool
/// key is the URI authority, and the authority an HTTP/2 upstream must see is the
/// client's host (`:authority`), not the endpoint address.
#[derive(Debug)]
struct H2Connection {
    addr: String,
    connect_timeout: std::time::Duration,
    sender: std::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Body>>>,
    connecting: tokio::sync::Mutex<()>,
}

fn connect_error(e: impl Into<BoxError>) -> UpstreamError {
    UpstreamError {
        kind: UpstreamErrorKind::Connect,
        source: e.into(),
    }
}

impl H2Connection {
    fn current(&self) -> Option<hyper::client::conn::http2::SendRequest<Body>> {
        let guard = lock(&self.sender);
        guard.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    async fn sender(&self) -> Result<hyper::client::conn::http2::SendRequest<Body>, UpstreamError> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        // One connect at a time; the others wait and share it.
        let _connecting = self.connecting.lock().await;
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(&self.addr),
        )
        .await
        .map_err(|_| connect_error(format!("connect to {} timed out", self.addr)))?
        .map_err(|e| connect_error(format!("connect to {}: {e}", self.addr)))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(connect_error)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        *lock(&self.sender) = Some(sender.clone());
        Ok(sender)
    }

    async fn send(
        self: Arc<Self>,
        req: Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        let mut sender = self.sender().await?;
        // A connection that went away before the request was handed over sent nothing.
        sender.ready().await.map_err(connect_error)?;
        sender.send_request(req).await.map_err(|e| UpstreamError {
            kind: UpstreamErrorKind::Reset,
            source: Box::new(e),
        })
    }
}

impl Upstream {
    /// Builds the pool for a validated upstream config.
    pub fn new(name: &str, cfg: &UpstreamConfig) -> Result<Arc<Upstream>, BoxError> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout.0));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let http2 = cfg.protocol == Protocol::Http2;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool.idle_timeout.0)
            .pool_max_idle_per_host(cfg.pool.max_idle_per_endpoint)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(http2)
            .http2_adaptive_window(http2)
            .build(connector);
        let endpoints = cfg
            .endpoints
            .value
            .iter()
            .map(|e| {
                Ok(Endpoint {
                    authority: e.parse::<Authority>()?,
                    label: Arc::new(EndpointAddr::new(e)),
                    h2: http2.then(|| {
                        Arc::new(H2Connection {
                            addr: e.clone(),
                            connect_timeout: cfg.connect_timeout.0,
                            sender: std::sync::Mutex::new(None),
                            connecting: tokio::sync::Mutex::new(()),
                        })
                    }),
                })
            })
            .collect::<Result<Vec<_>, BoxError>>()?;
        if endpoints.is_empty() {
            return Err(format!("upstream {name} has no endpoints").into());
        }
        Ok(Arc::new(Upstream {
            name: name.to_string(),
            endpoints,
            next: AtomicUsize::new(0),
            http2,
            client,
        }))
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn pick(&self) -> &Endpoint {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        &self.endpoints[i]
    }
}

/// The service at the bottom of every route stack.
#[derive(Debug, Clone)]
pub struct UpstreamService {
    upstream: Arc<Upstream>,
    /// Removed from the path before forwarding (`strip_prefix`).
    strip_prefix: Option<Arc<str>>,
    /// Read gRPC trailers ahead, for routes whose retry or breaker conditions name gRPC codes.
    classify_grpc: bool,
}

impl UpstreamService {
    /// A service sending to `upstream`.
    pub fn new(upstream: Arc<Upstream>, classify_grpc: bool, strip_prefix: Option<&str>) -> Self {
        UpstreamService {
            upstream,
            strip_prefix: strip_prefix.map(Arc::from),
            classify_grpc,
        }
    }
}

/// Headers never forwarded (RFC 9110 section 7.6.1), besides those `Connection` lists.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in listed {
            if n != header::TE {
                h.remove(n);
            }
        }
        h.remove(header::CONNECTION);
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::UPGRADE);
    if let Some(te) = h.get(header::TE) {
        let trailers_only = te
            .to_str()
            .map(|v| {
                v.split(',')
                    .any(|p| p.trim().eq_ignore_ascii_case("trailers"))
            })
            .unwrap_or(false);
        if trailers_only {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            h.remove(header::TE);
        }
    }
}

fn headers_host_authority(h: &HeaderMap) -> Option<Authority> {
    h.get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Authority>().ok())
}

fn prepare(
    req: &mut Request<Body>,
    endpoint: &Endpoint,
    http2: bool,
    strip_prefix: Option<&str>,
) -> Result<(), BoxError> {
    let client = req.extensions().get::<ClientAddr>().copied();
    let attempt = req.extensions().get::<Attempt>().map(|a| a.0).unwrap_or(1);
    let authority = req.uri().authority().cloned();
    let mut path_and_query = req.uri().path_and_query().cloned();
    if let (Some(prefix), Some(pq)) = (strip_prefix, &path_and_query) {
        if let Some(stripped) = super::router::strip_path(pq, prefix) {
            path_and_query = Some(stripped);
        }
    }
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);

    let host = match headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => authority
            .as_ref()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    if let Some(host) = host {
        if !http2 && !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, host.clone());
        }
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    if let Some(ClientAddr(addr)) = client {
        let ip = addr.ip().to_string();
        let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
            _ => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    // Always ours: a client must not choose the attempt number the upstream sees.
    headers.insert(ATTEMPT.clone(), HeaderValue::from(attempt));

    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(if http2 {
        // HTTP/2 carries the host as :authority; a differing Host header would make the
        // request malformed (RFC 9113 section 8.3.1), so the host moves there.
        let host = headers_host_authority(req.headers()).or(authority);
        req.headers_mut().remove(header::HOST);
        host.unwrap_or_else(|| endpoint.authority.clone())
    } else {
        endpoint.authority.clone()
    });
    parts.path_and_query =
        Some(path_and_query.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
    *req.uri_mut() = Uri::from_parts(parts)?;
    *req.version_mut() = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    Ok(())
}

impl Service<Request<Body>> for UpstreamService {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = UpstreamFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let endpoint = self.upstream.pick();
        let prefetch = self.classify_grpc && grpc::is_grpc(req.headers());
        if let Err(e) = prepare(
            &mut req,
            endpoint,
            self.upstream.http2,
            self.strip_prefix.as_deref(),
        ) {
            return UpstreamFuture::Failed {
                err: Some(Box::new(UpstreamError {
                    kind: UpstreamErrorKind::Connect,
                    source: e,
                })),
            };
        }
        let fut = match &endpoint.h2 {
            Some(conn) => SendFut::H2 {
                fut: Box::pin(conn.clone().send(req)),
            },
            None => SendFut::H1 {
                fut: self.upstream.client.request(req),
            },
        };
        UpstreamFuture::Sending {
            fut,
            endpoint: endpoint.label.clone(),
            prefetch,
            held: None,
        }
    }
}

type H2Future =
    Pin<Box<dyn Future<Output = Result<Response<hyper::body::Incoming>, UpstreamError>> + Send>>;

pin_project! {
    /// Sending through the HTTP/1.1 pool or an HTTP/2 connection.
    #[project = SendProj]
    pub enum SendFut {
        /// hyper-util's pooled HTTP/1.1 client.
        H1 { #[pin] fut: ClientFuture },
        /// An endpoint's HTTP/2 connection.
        H2 { fut: H2Future },
    }
}

impl Future for SendFut {
    type Output = Result<Response<hyper::body::Incoming>, UpstreamError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            SendProj::H1 { fut } => fut.poll(cx).map_err(|e| UpstreamError {
                kind: if e.is_connect() {
                    UpstreamErrorKind::Connect
                } else {
                    UpstreamErrorKind::Reset
                },
                source: Box::new(e),
            }),
            SendProj::H2 { fut } => fut.as_mut().poll(cx),
        }
    }
}

pin_project! {
    /// Response future of [`UpstreamService`].
    #[project = UpProj]
    pub enum UpstreamFuture {
        /// The request is on its way.
        Sending {
            #[pin]
            fut: SendFut,
            endpoint: Arc<EndpointAddr>,
            prefetch: bool,
            held: Option<(http::response::Parts, hyper::body::Incoming)>,
        },
        /// The request could not be built.
        Failed { err: Option<BoxError> },
    }
}

fn finish(
    mut parts: http::response::Parts,
    body: Body,
    endpoint: &Arc<EndpointAddr>,
    early: TrailerInfo,
) -> Response<Body> {
    strip_hop_by_hop(&mut parts.headers);
    parts.extensions.insert(UpstreamEndpoint(endpoint.clone()));
    if let Some(code) = early.status {
        parts.extensions.insert(GrpcStatus(code));
    }
    if let Some(ms) = early.pushback_ms {
        parts.extensions.insert(GrpcPushback(ms));
    }
    Response::from_parts(parts, body)
}

/// What trailers read ahead of forwarding tell retry and the breaker.
#[derive(Debug, Default, Clone, Copy)]
struct TrailerInfo {
    status: Option<u8>,
    pushback_ms: Option<i64>,
}

impl TrailerInfo {
    fn of(t: &HeaderMap) -> TrailerInfo {
        TrailerInfo {
            status: grpc::status(t),
            pushback_ms: t
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<i64>().ok()),
        }
    }
}

impl Future for UpstreamFuture {
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (mut fut, endpoint, prefetch, held) = match self.project() {
            UpProj::Failed { err } => {
                return Poll::Ready(Err(err
                    .take()
                    .unwrap_or_else(|| "polled after completion".into())))
            }
            UpProj::Sending {
                fut,
                endpoint,
                prefetch,
                held,
            } => (fut, endpoint, prefetch, held),
        };
        if held.is_none() {
            let res = match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(res)) => res,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Box::new(e))),
            };
            let (parts, body) = res.into_parts();
            if !*prefetch || grpc::status(&parts.headers).is_some() || body.is_end_stream() {
                return Poll::Ready(Ok(finish(
                    parts,
                    Body::from(body),
                    endpoint,
                    TrailerInfo::default(),
                )));
            }
            *held = Some((parts, body));
        }
        let Some((_, body)) = held.as_mut() else {
            return Poll::Pending;
        };
        let frame = match Pin::new(body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(f) => f,
        };
        let Some((parts, rest)) = held.take() else {
            return Poll::Pending;
        };
        match frame {
            None => Poll::Ready(Ok(finish(
                parts,
                Body::Empty,
                endpoint,
                TrailerInfo::default(),
            ))),
            Some(Err(e)) => Poll::Ready(Err(Box::new(UpstreamError {
                kind: UpstreamErrorKind::Reset,
                source: Box::new(e),
            }))),
            Some(Ok(frame)) => {
                let early = frame
                    .trailers_ref()
                    .map(TrailerInfo::of)
                    .unwrap_or_default();
                let body = Body::Prefetched {
                    first: Some(frame),
                    rest,
                };
                Poll::Ready(Ok(finish(parts, body, endpoint, early)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip, trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn forwarding_headers_and_uri() {
        let ep = Endpoint {
            authority: "127.0.0.1:9000".parse().unwrap(),
            label: Arc::new(EndpointAddr::new("127.0.0.1:9000")),
            h2: None,
        };
        let mut req = Request::builder()
            .uri("/a?b=1")
            .header("host", "api.example.com")
            .header("x-breakwater-attempt", "7")
            .header("x-forwarded-for", "10.0.0.1")
            .body(Body::Empty)
            .unwrap();
        req.extensions_mut()
            .insert(ClientAddr("192.0.2.7:5555".parse().unwrap()));
        prepare(&mut req, &ep, false, None).unwrap();
        assert_eq!(req.uri(), "http://127.0.0.1:9000/a?b=1");
        let h = req.headers();
        assert_eq!(h["host"], "api.example.com");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["x-breakwater-attempt"], "1");

        // an HTTP/2 request carries its host in the URI authority
        let mut req = Request::builder()
            .uri("http://shop.example:8080/x")
            .version(Version::HTTP_2)
            .body(Body::Empty)
            .unwrap();
        prepare(&mut req, &ep, false, None).unwrap();
        assert_eq!(req.headers()["host"], "shop.example:8080");
        assert_eq!(req.version(), Version::HTTP_11);
    }
}
