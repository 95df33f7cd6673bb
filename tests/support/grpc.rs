//! gRPC test support for tests/grpc.rs: a hand-written tonic upstream (`test.Echo`, one
//! method per call shape, no protoc) whose failures are scripted by a [`Plan`], a generic
//! tonic client, and raw gRPC framing for hand-made hyper h2 upstreams. Every server binds
//! 127.0.0.1:0 and stops when its handle is dropped.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::HeaderMap;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;
use tonic::body::Body as TonicBody;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// The one message type: opaque bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
}

/// A message with these bytes.
pub fn msg(data: impl Into<Vec<u8>>) -> Msg {
    Msg { data: data.into() }
}

/// Message size limit on both sides (the defaults are 4 MiB decode).
pub const MAX_MESSAGE: usize = 8 << 20;

pub const UNARY: &str = "/test.Echo/Unary";
pub const CLIENT_STREAM: &str = "/test.Echo/ClientStream";
pub const SERVER_STREAM: &str = "/test.Echo/ServerStream";
pub const BIDI: &str = "/test.Echo/Bidi";

/// Trailer the streaming handlers add to their final (OK) status: how many messages
/// they sent.
pub const COUNT_TRAILER: &str = "x-echo-count";

/// Messages the server-streaming handler sends on success.
pub const SERVER_STREAM_MESSAGES: usize = 3;

/// What the upstream does.
#[derive(Clone, Default)]
pub struct Plan {
    /// The first N calls (any method) fail with UNAVAILABLE, trailers-only.
    pub fail_first: usize,
    /// Unary: sleep this long before answering.
    pub delay: Option<Duration>,
    /// ServerStream: send one message, then fail with UNAVAILABLE in the trailers.
    pub stream_then_fail: bool,
}

impl Plan {
    /// Every call fails with UNAVAILABLE.
    pub fn always_unavailable() -> Plan {
        Plan {
            fail_first: usize::MAX,
            ..Plan::default()
        }
    }
}

/// What the upstream saw.
#[derive(Default)]
pub struct Seen {
    calls: AtomicUsize,
    headers: Mutex<Vec<HeaderMap>>,
}

impl Seen {
    /// Calls seen (every method).
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    /// Request headers of every call, in arrival order.
    pub fn headers(&self) -> Vec<HeaderMap> {
        self.headers.lock().unwrap().clone()
    }
    /// One request header of every call (None where absent), in arrival order.
    pub fn header(&self, name: &str) -> Vec<Option<String>> {
        self.headers()
            .iter()
            .map(|h| h.get(name).map(|v| v.to_str().unwrap().to_string()))
            .collect()
    }
}

#[derive(Clone)]
struct EchoService {
    plan: Arc<Plan>,
    seen: Arc<Seen>,
}

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "test.Echo";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

fn server_codec() -> tonic::server::Grpc<ProstCodec<Msg, Msg>> {
    tonic::server::Grpc::new(ProstCodec::default())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// The final OK status of a stream, carrying a custom trailer.
fn ok_with_count(n: usize) -> Status {
    let mut md = MetadataMap::new();
    md.insert(COUNT_TRAILER, n.to_string().parse().unwrap());
    Status::with_metadata(Code::Ok, "", md)
}

fn unavailable() -> Status {
    Status::unavailable("upstream says no")
}

impl tower::Service<http::Request<TonicBody>> for EchoService {
    type Response = http::Response<TonicBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<TonicBody>) -> Self::Future {
        let n = self.seen.calls.fetch_add(1, Ordering::SeqCst);
        self.seen
            .headers
            .lock()
            .unwrap()
            .push(req.headers().clone());
        let plan = self.plan.clone();
        let fail = n < plan.fail_first;
        let path = req.uri().path().to_string();
        Box::pin(async move {
            let mut grpc = server_codec();
            let res = match path.as_str() {
                UNARY => {
                    let svc = tower::service_fn(move |r: Request<Msg>| {
                        let plan = plan.clone();
                        async move {
                            if let Some(d) = plan.delay {
                                tokio::time::sleep(d).await;
                            }
                            if fail {
                                return Err(unavailable());
                            }
                            Ok(Response::new(r.into_inner()))
                        }
                    });
                    grpc.unary(svc, req).await
                }
                CLIENT_STREAM => {
                    let svc = tower::service_fn(move |r: Request<Streaming<Msg>>| async move {
                        if fail {
                            return Err(unavailable());
                        }
                        let mut inbound = r.into_inner();
                        let mut data = Vec::new();
                        while let Some(m) = inbound.message().await? {
                            data.extend_from_slice(&m.data);
                        }
                        Ok(Response::new(Msg { data }))
                    });
                    grpc.client_streaming(svc, req).await
                }
                SERVER_STREAM => {
                    let svc = tower::service_fn(move |r: Request<Msg>| {
                        let plan = plan.clone();
                        async move {
                            if fail {
                                return Err(unavailable());
                            }
                            let data = r.into_inner().data;
                            let (tx, rx) = mpsc::channel(4);
                            tokio::spawn(async move {
                                if plan.stream_then_fail {
                                    let _ = tx.send(Ok(msg(data))).await;
                                    // let the first message travel on its own
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    let _ = tx.send(Err(unavailable())).await;
                                    return;
                                }
                                for i in 0..SERVER_STREAM_MESSAGES {
                                    let mut d = data.clone();
                                    d.extend_from_slice(format!("-{i}").as_bytes());
                                    let _ = tx.send(Ok(msg(d))).await;
                                }
                                let _ = tx.send(Err(ok_with_count(SERVER_STREAM_MESSAGES))).await;
                            });
                            let out: MsgStream = Box::pin(ReceiverStream::new(rx));
                            Ok(Response::new(out))
                        }
                    });
                    grpc.server_streaming(svc, req).await
                }
                BIDI => {
                    let svc = tower::service_fn(move |r: Request<Streaming<Msg>>| async move {
                        if fail {
                            return Err(unavailable());
                        }
                        let mut inbound = r.into_inner();
                        let (tx, rx) = mpsc::channel(4);
                        tokio::spawn(async move {
                            let mut n = 0;
                            loop {
                                match inbound.message().await {
                                    Ok(Some(m)) => {
                                        n += 1;
                                        if tx.send(Ok(m)).await.is_err() {
                                            return;
                                        }
                                    }
                                    Ok(None) => break,
                                    Err(e) => {
                                        let _ = tx.send(Err(e)).await;
                                        return;
                                    }
                                }
                            }
                            let _ = tx.send(Err(ok_with_count(n))).await;
                        });
                        let out: MsgStream = Box::pin(ReceiverStream::new(rx));
                        Ok(Response::new(out))
                    });
                    grpc.streaming(svc, req).await
                }
                _ => Status::unimplemented(path).into_http(),
            };
            Ok(res)
        })
    }
}

/// A running tonic upstream; stops when dropped.
pub struct GrpcUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    task: JoinHandle<()>,
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the `test.Echo` upstream (h2c) following `plan`.
pub async fn grpc_upstream(plan: Plan) -> GrpcUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let svc = EchoService {
        plan: Arc::new(plan),
        seen: seen.clone(),
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    GrpcUpstream { addr, seen, task }
}

/// A generic gRPC client (h2c) for `addr`, allowing 8 MiB messages both ways.
pub async fn client(addr: SocketAddr) -> tonic::client::Grpc<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect to the proxy");
    tonic::client::Grpc::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Bounds a call: every call in these tests should finish within 5 s.
pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("gRPC call did not finish within 5 s")
}

/// A generic gRPC client over a plain hyper-util h2c client. Unlike a tonic `Channel` it
/// does not enforce `grpc-timeout` itself, so an answer to an expired deadline can only
/// come from the proxy (or the upstream).
pub fn plain_client(addr: SocketAddr) -> tonic::client::Grpc<PlainTransport> {
    let transport =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    tonic::client::Grpc::with_origin(transport, format!("http://{addr}").parse().unwrap())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// The transport of [`plain_client`].
pub type PlainTransport = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    TonicBody,
>;

/// A unary call to `path`, over a `Channel` or any other gRPC transport.
pub async fn unary<T>(
    c: &mut tonic::client::Grpc<T>,
    path: &'static str,
    req: Request<Msg>,
) -> Result<Response<Msg>, Status>
where
    T: tonic::client::GrpcService<TonicBody>,
    T::Error: std::fmt::Debug,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    bounded(async {
        c.ready().await.expect("transport ready");
        c.unary(req, PathAndQuery::from_static(path), ProstCodec::default())
            .await
    })
    .await
}

/// A client-streaming call to [`CLIENT_STREAM`].
pub async fn client_streaming<S>(
    c: &mut tonic::client::Grpc<Channel>,
    req: Request<S>,
) -> Result<Response<Msg>, Status>
where
    S: Stream<Item = Msg> + Send + 'static,
{
    bounded(async {
        c.ready().await.expect("channel ready");
        c.client_streaming(
            req,
            PathAndQuery::from_static(CLIENT_STREAM),
            ProstCodec::default(),
        )
        .await
    })
    .await
}

/// A server-streaming call to [`SERVER_STREAM`]; returns the response stream.
pub async fn server_streaming(
    c: &mut tonic::client::Grpc<Channel>,
    req: Request<Msg>,
) -> Result<Response<Streaming<Msg>>, Status> {
    bounded(async {
        c.ready().await.expect("channel ready");
        c.server_streaming(
            req,
            PathAndQuery::from_static(SERVER_STREAM),
            ProstCodec::default(),
        )
        .await
    })
    .await
}

/// A bidirectional call to [`BIDI`]; returns the response stream.
pub async fn bidi<S>(
    c: &mut tonic::client::Grpc<Channel>,
    req: Request<S>,
) -> Result<Response<Streaming<Msg>>, Status>
where
    S: Stream<Item = Msg> + Send + 'static,
{
    bounded(async {
        c.ready().await.expect("channel ready");
        c.streaming(req, PathAndQuery::from_static(BIDI), ProstCodec::default())
            .await
    })
    .await
}

/// One length-prefixed, uncompressed gRPC message.
pub fn frame(m: &Msg) -> Bytes {
    let payload = prost::Message::encode_to_vec(m);
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(&payload);
    b.freeze()
}

/// Decodes one length-prefixed gRPC message from a whole body.
pub fn unframe(body: &[u8]) -> Msg {
    assert!(body.len() >= 5, "short gRPC body: {body:?}");
    assert_eq!(body[0], 0, "compressed message");
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    prost::Message::decode(&body[5..5 + len]).unwrap()
}

/// gRPC trailers with this status.
pub fn status_trailers(code: u8) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", u16::from(code).into());
    h
}
