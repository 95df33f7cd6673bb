//! Forwarding through the proxy end to end (SPEC sections 3 and 4): protocols on both
//! sides, streaming bodies, trailers, hop-by-hop and forwarding headers, routing, and the
//! proxy's own answers when there is no route or no upstream.
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use support::*;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// FNV-1a, a checksum good enough to catch reordered or corrupted chunks.
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Chunk `i` of a deterministic byte stream (different content in every chunk).
fn chunk(i: usize, len: usize) -> Bytes {
    (0..len)
        .map(|j| ((i * 31 + j * 7 + j / 251) % 256) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// An upstream that answers with a JSON description of what it received.
async fn describe_upstream(proto: Proto) -> Upstream {
    upstream(proto, |req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut headers = serde_json::Map::new();
        for name in parts.headers.keys() {
            let values: Vec<Value> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| json!(v.to_str().unwrap_or("<binary>")))
                .collect();
            headers.insert(name.as_str().to_string(), Value::Array(values));
        }
        let doc = json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
            "authority": parts.uri.authority().map(|a| a.as_str()),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        });
        Response::builder()
            .status(201)
            .header("x-upstream", "yes")
            .header("content-type", "application/json")
            .body(full(doc.to_string()))
            .unwrap()
    })
    .await
}

/// The single value of header `name` as the upstream saw it, if any.
fn seen<'a>(doc: &'a Value, name: &str) -> Option<&'a str> {
    let vals = doc["headers"][name].as_array()?;
    assert_eq!(vals.len(), 1, "{name} seen more than once: {vals:?}");
    vals[0].as_str()
}

/// Sends with a given client and reads the whole response, trailers included.
async fn send_on(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        UpBody,
    >,
    req: Request<UpBody>,
) -> (u16, HeaderMap, Bytes, Option<HeaderMap>) {
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let collected = tokio::time::timeout(Duration::from_secs(10), res.into_body().collect())
        .await
        .expect("body timed out")
        .expect("body failed");
    let trailers = collected.trailers().cloned();
    (status, headers, collected.to_bytes(), trailers)
}

/// One request on a fresh h2c connection, with whatever authority the URI names.
async fn h2_raw(addr: SocketAddr, req: Request<UpBody>) -> (u16, HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let res = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("h2 request timed out")
        .expect("h2 request failed");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn parse(body: &Bytes) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn http1_forwards_method_path_query_body_status_and_headers() {
    let up = describe_upstream(Proto::H1).await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let req = Request::post(p.url("/a/b?x=1&y=two"))
        .header("x-client", "abc")
        .body(full("hello upstream"))
        .unwrap();
    let (status, headers, body) = send(req).await;
    assert_eq!(status, 201, "{headers:?}");
    assert_eq!(headers["x-upstream"], "yes");
    assert_eq!(headers["content-type"], "application/json");
    assert!(
        !headers.contains_key("proxy-status"),
        "an upstream answer is not proxy-made"
    );
    let doc = parse(&body);
    assert_eq!(doc["method"], "POST");
    assert_eq!(doc["path"], "/a/b?x=1&y=two");
    assert_eq!(doc["version"], "HTTP/1.1");
    assert_eq!(doc["body"], "hello upstream");
    assert_eq!(seen(&doc, "x-client"), Some("abc"));

    // other methods too
    for m in ["PUT", "DELETE", "PATCH", "OPTIONS"] {
        let req = Request::builder()
            .method(m)
            .uri(p.url("/m"))
            .body(full(""))
            .unwrap();
        let (status, _, body) = send(req).await;
        assert_eq!(status, 201);
        assert_eq!(parse(&body)["method"], m);
    }
    assert_eq!(up.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_downstream_to_http1_upstream() {
    let up = describe_upstream(Proto::H1).await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let req = Request::post(p.url("/h2/x?q=1"))
        .header("x-client", "h2")
        .body(full("over h2"))
        .unwrap();
    let (status, headers, body, _) = send_on(&h2_client(), req).await;
    assert_eq!(status, 201, "{headers:?}");
    assert_eq!(headers["x-upstream"], "yes");
    let doc = parse(&body);
    assert_eq!(doc["version"], "HTTP/1.1", "{doc}");
    assert_eq!(doc["path"], "/h2/x?q=1");
    assert_eq!(doc["body"], "over h2");
    assert_eq!(seen(&doc, "x-client"), Some("h2"));
    // the HTTP/2 authority becomes the HTTP/1.1 Host
    let proxy_authority = p.addrs[0].to_string();
    assert_eq!(seen(&doc, "host"), Some(proxy_authority.as_str()), "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_on_both_sides() {
    let up = describe_upstream(Proto::H2).await;
    let p = start_proxy(&one_route_proto(up.addr, "http2", "")).await;
    // several concurrent streams on one client connection
    let client = h2_client();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = client.clone();
        let url = p.url(&format!("/both/{i}?n={i}"));
        tasks.push(tokio::spawn(async move {
            let req = Request::put(url).body(full(format!("body {i}"))).unwrap();
            send_on(&client, req).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, headers, body, _) = t.await.unwrap();
        assert_eq!(status, 201, "{headers:?}");
        let doc = parse(&body);
        assert_eq!(doc["version"], "HTTP/2.0", "{doc}");
        assert_eq!(doc["method"], "PUT");
        assert_eq!(doc["path"], format!("/both/{i}?n={i}"));
        assert_eq!(doc["body"], format!("body {i}"));
    }
    assert_eq!(up.hits(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_sees_the_original_authority() {
    let up = describe_upstream(Proto::H2).await;
    let p = start_proxy(&one_route_proto(up.addr, "http2", "")).await;
    // h1 client with a Host header
    let req = Request::get(p.url("/x"))
        .header("host", "shop.example:8080")
        .body(full(""))
        .unwrap();
    let (status, _, body) = send(req).await;
    assert_eq!(status, 201);
    let doc = parse(&body);
    let host = doc["authority"]
        .as_str()
        .or_else(|| seen(&doc, "host"))
        .unwrap_or_default()
        .to_string();
    assert_eq!(host, "shop.example:8080", "h1 -> h2: {doc}");
    if let Some(h) = seen(&doc, "host") {
        assert_eq!(
            h, "shop.example:8080",
            "a Host header that differs from :authority: {doc}"
        );
    }
    // h2 client: the authority of its URI
    let req = Request::get(format!("http://localhost:{}/y", p.addrs[0].port()))
        .body(full(""))
        .unwrap();
    let (status, _, body, _) = send_on(&h2_client(), req).await;
    assert_eq!(status, 201);
    let doc = parse(&body);
    let want = format!("localhost:{}", p.addrs[0].port());
    assert_eq!(doc["authority"], want, "h2 -> h2: {doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_streamed_upload_arrives_intact() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 16;
    let up = upstream(Proto::H1, |req: Request<Incoming>| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        resp(200, format!("len={} sum={:016x}", body.len(), fnv1a(&body)))
    })
    .await;
    // no retry on the route, so nothing buffers the body
    let p = start_proxy(&one_route(up.addr, "")).await;

    let mut expected = Vec::with_capacity(CHUNK * CHUNKS);
    for i in 0..CHUNKS {
        expected.extend_from_slice(&chunk(i, CHUNK));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(2);
    let producer = tokio::spawn(async move {
        for i in 0..CHUNKS {
            if tx.send(Ok(Frame::data(chunk(i, CHUNK)))).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
    let req = Request::post(p.url("/upload")).body(body).unwrap();
    let (status, headers, body) = send(req).await;
    producer.await.unwrap();
    assert_eq!(status, 200, "{headers:?} {body:?}");
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("len={} sum={:016x}", CHUNK * CHUNKS, fnv1a(&expected))
    );

    // and over h2c
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(2);
    let producer = tokio::spawn(async move {
        for i in 0..CHUNKS {
            if tx.send(Ok(Frame::data(chunk(i, CHUNK)))).await.is_err() {
                return;
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
    let req = Request::post(p.url("/upload")).body(body).unwrap();
    let (status, _, body, _) = send_on(&h2_client(), req).await;
    producer.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("len={} sum={:016x}", CHUNK * CHUNKS, fnv1a(&expected))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mib_download_streams_intact() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 320; // 20 MiB
    let up = upstream(Proto::H1, |_req: Request<Incoming>| async move {
        let stream = tokio_stream::iter(
            (0..CHUNKS).map(|i| Ok::<_, BoxError>(Frame::data(chunk(i % 7, CHUNK)))),
        );
        Response::builder()
            .status(200)
            .body(StreamBody::new(stream).boxed())
            .unwrap()
    })
    .await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        h1_client().request(Request::get(p.url("/big")).body(full("")).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(res.status(), 200);
    // read frame by frame, checking as we go, so nothing is held whole
    let mut body = res.into_body();
    let mut got = Vec::with_capacity(CHUNK);
    let mut total = 0usize;
    let mut index = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Some(frame) = tokio::time::timeout_at(deadline, body.frame())
        .await
        .expect("download too slow")
    {
        let frame = frame.expect("body error");
        if let Ok(data) = frame.into_data() {
            total += data.len();
            got.extend_from_slice(&data);
            while got.len() >= CHUNK {
                let expect = chunk(index % 7, CHUNK);
                assert!(got[..CHUNK] == expect[..], "chunk {index} differs");
                got.drain(..CHUNK);
                index += 1;
            }
        }
    }
    assert!(got.is_empty(), "{} trailing bytes", got.len());
    assert_eq!(total, CHUNK * CHUNKS);
    assert_eq!(index, CHUNKS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_trailers_pass_through() {
    let up = upstream(Proto::H2, |_req: Request<Incoming>| async move {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("x-checksum", "abc123".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"part one, "))),
            Ok(Frame::data(Bytes::from_static(b"part two"))),
            Ok(Frame::trailers(trailers)),
        ];
        Response::builder()
            .status(200)
            .header("content-type", "application/octet-stream")
            .body(StreamBody::new(tokio_stream::iter(frames)).boxed())
            .unwrap()
    })
    .await;
    let p = start_proxy(&one_route_proto(up.addr, "http2", "")).await;
    let req = Request::post(p.url("/t")).body(full("x")).unwrap();
    let (status, headers, body, trailers) = send_on(&h2_client(), req).await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(&body[..], b"part one, part two");
    let trailers = trailers.expect("trailers were dropped");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-checksum"], "abc123");

    // a gRPC-shaped call on the same path: trailers still come through
    let req = Request::post(p.url("/pkg.Svc/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let (status, _, _, trailers) = send_on(&h2_client(), req).await;
    assert_eq!(status, 200);
    assert_eq!(trailers.expect("grpc trailers dropped")["grpc-status"], "0");
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let up = describe_upstream(Proto::H1).await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let req = Request::get(p.url("/hop"))
        .header("connection", "x-custom, keep-alive")
        .header("x-custom", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("upgrade", "websocket")
        .header("te", "gzip")
        .header("x-keep", "yes")
        .body(full(""))
        .unwrap();
    let (status, headers, body) = send(req).await;
    assert_eq!(status, 201, "{headers:?}");
    let doc = parse(&body);
    for gone in [
        "connection",
        "x-custom",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
        "transfer-encoding",
    ] {
        assert!(
            doc["headers"].get(gone).is_none(),
            "{gone} reached the upstream: {doc}"
        );
    }
    assert_eq!(seen(&doc, "x-keep"), Some("yes"));

    // TE: trailers is the one TE value that goes through
    let req = Request::get(p.url("/hop"))
        .header("te", "trailers")
        .body(full(""))
        .unwrap();
    let (status, _, body) = send(req).await;
    assert_eq!(status, 201);
    let doc = parse(&body);
    assert_eq!(seen(&doc, "te"), Some("trailers"), "{doc}");
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_not_returned() {
    let up = upstream(Proto::H1, |_req: Request<Incoming>| async move {
        Response::builder()
            .status(200)
            .header("connection", "x-private")
            .header("x-private", "internal")
            .header("keep-alive", "timeout=9")
            .header("x-public", "ok")
            .body(full("fine"))
            .unwrap()
    })
    .await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let (status, headers, body) = get(&p.url("/r")).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"fine");
    assert_eq!(headers["x-public"], "ok");
    assert!(!headers.contains_key("x-private"), "{headers:?}");
    assert!(!headers.contains_key("keep-alive"), "{headers:?}");
}

#[tokio::test]
async fn forwarding_headers_are_set() {
    let up = describe_upstream(Proto::H1).await;
    let p = start_proxy(&one_route(up.addr, "")).await;

    // no previous X-Forwarded-For
    let req = Request::get(p.url("/fw"))
        .header("host", "api.example.com:8443")
        .body(full(""))
        .unwrap();
    let (status, _, body) = send(req).await;
    assert_eq!(status, 201);
    let doc = parse(&body);
    assert_eq!(seen(&doc, "host"), Some("api.example.com:8443"), "{doc}");
    assert_eq!(seen(&doc, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen(&doc, "x-forwarded-proto"), Some("http"));
    assert_eq!(seen(&doc, "x-forwarded-host"), Some("api.example.com:8443"));
    assert_eq!(seen(&doc, "x-breakwater-attempt"), Some("1"));

    // a previous hop: appended, not replaced
    let req = Request::get(p.url("/fw"))
        .header("host", "api.example.com")
        .header("x-forwarded-for", "203.0.113.9, 10.0.0.1")
        .header("x-forwarded-proto", "https")
        .body(full(""))
        .unwrap();
    let (status, _, body) = send(req).await;
    assert_eq!(status, 201);
    let doc = parse(&body);
    assert_eq!(seen(&doc, "host"), Some("api.example.com"));
    assert_eq!(
        seen(&doc, "x-forwarded-for"),
        Some("203.0.113.9, 10.0.0.1, 127.0.0.1")
    );
    assert_eq!(seen(&doc, "x-forwarded-proto"), Some("http"));
    assert_eq!(seen(&doc, "x-forwarded-host"), Some("api.example.com"));
    assert_eq!(seen(&doc, "x-breakwater-attempt"), Some("1"));
}

#[tokio::test]
async fn no_route_is_404_with_proxy_status() {
    let up = echo_upstream().await;
    let yaml = format!(
        "listeners:
  - name: test
    address: 127.0.0.1:0
    routes:
      - name: only
        match: {{ path_prefix: /only }}
        upstream: up
upstreams:
  up:
    endpoints: [{}]
telemetry:
  access_log: false
",
        up.addr
    );
    let p = start_proxy(&yaml).await;
    let (status, _, body) = get(&p.url("/only/x")).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"path=/only/x");

    let (status, headers, _) = get(&p.url("/elsewhere")).await;
    assert_eq!(status, 404);
    assert_eq!(
        headers["proxy-status"],
        r#"breakwater; error=destination_not_found; details="no_route""#
    );
    assert_eq!(
        up.hits(),
        1,
        "a request with no route never reaches an upstream"
    );

    // gRPC-shaped request to no route: trailers-only answer, HTTP 200, grpc-status 12
    for client in [h1_client(), h2_client()] {
        let req = Request::post(p.url("/pkg.Missing/Call"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let (status, headers, body, trailers) = send_on(&client, req).await;
        assert_eq!(status, 200, "{headers:?}");
        let grpc_status = headers
            .get("grpc-status")
            .or_else(|| trailers.as_ref().and_then(|t| t.get("grpc-status")));
        assert_eq!(
            grpc_status.map(|v| v.to_str().unwrap()),
            Some("12"),
            "{headers:?}"
        );
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc"));
        assert_eq!(
            headers["proxy-status"],
            r#"breakwater; error=destination_not_found; details="no_route""#
        );
        assert!(body.is_empty(), "trailers-only has no body: {body:?}");
    }
    // application/grpc+proto counts as gRPC too
    let req = Request::post(p.url("/pkg.Missing/Call"))
        .header("content-type", "application/grpc+proto")
        .body(full(""))
        .unwrap();
    let (status, headers, _) = send(req).await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "12");
}

#[tokio::test]
async fn closed_upstream_port_is_502_connection_refused() {
    let closed = closed_port().await;
    let p = start_proxy(&one_route(closed, "")).await;
    let (status, headers, _) = get(&p.url("/down")).await;
    assert_eq!(status, 502);
    assert_eq!(
        headers["proxy-status"],
        r#"breakwater; error=connection_refused; details="upstream_unavailable""#
    );
    // gRPC: 200 + grpc-status 14
    let req = Request::post(p.url("/pkg.Svc/Call"))
        .header("content-type", "application/grpc")
        .body(full(""))
        .unwrap();
    let (status, headers, _) = send(req).await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "14");
    assert!(headers.contains_key("proxy-status"));
}

/// An upstream that answers `<tag> <path?query>`.
async fn tagged(tag: &'static str) -> Upstream {
    upstream(Proto::H1, move |req: Request<Incoming>| async move {
        resp(200, format!("{tag} {}", req.uri()))
    })
    .await
}

/// A routing case: method, path, headers, expected `<tag> <path>`.
type Case = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
    &'static str,
);

async fn get_with(url: &str, method: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (status, _, body) = send(b.body(full("")).unwrap()).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_precedence_and_strip_prefix() {
    let names = [
        "exact", "posts", "host", "canary", "api", "first", "second", "rest",
    ];
    let mut ups: Vec<(&str, Upstream)> = Vec::new();
    for n in names {
        ups.push((n, tagged(n).await));
    }
    let addr = |n: &str| -> SocketAddr { ups.iter().find(|(t, _)| *t == n).unwrap().1.addr };
    let mut yaml = String::from(
        "listeners:
  - name: test
    address: 127.0.0.1:0
    routes:
      - name: exact
        match: { path: /exact }
        upstream: exact
      - name: posts
        match: { path_prefix: /m, methods: [POST, PUT] }
        upstream: posts
      - name: host
        match: { host: shop.example }
        upstream: host
      - name: canary
        match: { headers: { x-canary: \"true\" } }
        upstream: canary
      - name: api
        match: { path_prefix: /api }
        strip_prefix: /api
        upstream: api
      - name: first
        match: { path_prefix: /p }
        upstream: first
      - name: second
        match: { path_prefix: /p/q }
        upstream: second
      - name: rest
        match: { path_prefix: / }
        upstream: rest
upstreams:
",
    );
    for n in names {
        yaml.push_str(&format!("  {n}:\n    endpoints: [{}]\n", addr(n)));
    }
    yaml.push_str("telemetry:\n  access_log: false\n");
    let p = start_proxy(&yaml).await;
    let u = |path: &str| p.url(path);

    let cases: Vec<Case> = vec![
        // exact path: the query string is not part of the path
        ("GET", "/exact", vec![], "exact /exact"),
        ("GET", "/exact?a=1", vec![], "exact /exact?a=1"),
        ("GET", "/exact/more", vec![], "rest /exact/more"),
        ("GET", "/exactly", vec![], "rest /exactly"),
        // methods
        ("POST", "/m/1", vec![], "posts /m/1"),
        ("PUT", "/m/1", vec![], "posts /m/1"),
        ("GET", "/m/1", vec![], "rest /m/1"),
        // host, port ignored, case-insensitive
        ("GET", "/h", vec![("host", "shop.example")], "host /h"),
        ("GET", "/h", vec![("host", "SHOP.example:8080")], "host /h"),
        ("GET", "/h", vec![("host", "other.example")], "rest /h"),
        // header match is exact
        ("GET", "/c", vec![("x-canary", "true")], "canary /c"),
        ("GET", "/c", vec![("x-canary", "false")], "rest /c"),
        // first match wins: an earlier route takes precedence over a later one
        (
            "GET",
            "/exact",
            vec![("host", "shop.example"), ("x-canary", "true")],
            "exact /exact",
        ),
        ("GET", "/m/x", vec![("x-canary", "true")], "canary /m/x"),
        ("POST", "/m/x", vec![("x-canary", "true")], "posts /m/x"),
        ("GET", "/p/q/r", vec![], "first /p/q/r"),
        ("GET", "/p", vec![], "first /p"),
        // strip_prefix
        ("GET", "/api/users", vec![], "api /users"),
        ("GET", "/api/users?id=3", vec![], "api /users?id=3"),
        ("GET", "/api", vec![], "api /"),
        ("GET", "/api/", vec![], "api /"),
        ("GET", "/api?x=1", vec![], "api /?x=1"),
        ("GET", "/anything", vec![], "rest /anything"),
    ];
    for (method, path, headers, want) in cases {
        let (status, body) = get_with(&u(path), method, &headers).await;
        assert_eq!(
            (status, body.as_str()),
            (200, want),
            "{method} {path} {headers:?}"
        );
    }
    let second = &ups.iter().find(|(n, _)| *n == "second").unwrap().1;
    assert_eq!(
        second.hits(),
        0,
        "a route shadowed by an earlier one is never used"
    );

    // h2: the authority stands in for Host
    let req = Request::get("http://shop.example:8080/h2")
        .version(Version::HTTP_2)
        .body(full(""))
        .unwrap();
    let (status, _, body) = h2_raw(p.addrs[0], req).await;
    assert_eq!((status, &body[..]), (200, &b"host /h2"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_content_type_to_no_route_over_h2_has_no_http_error_status() {
    // the same rule seen from a raw h2 connection, with a gRPC client's headers
    let up = upstream(
        Proto::H2,
        |_req: Request<Incoming>| async move { resp(200, "") },
    )
    .await;
    let yaml = format!(
        "listeners:
  - name: test
    address: 127.0.0.1:0
    routes:
      - name: only
        match: {{ grpc_service: pkg.Known }}
        upstream: up
upstreams:
  up:
    endpoints: [{}]
    protocol: http2
telemetry:
  access_log: false
",
        up.addr
    );
    let p = start_proxy(&yaml).await;
    let req = Request::post(format!("http://{}/pkg.Unknown/Call", p.addrs[0]))
        .version(Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let (status, headers, _) = h2_raw(p.addrs[0], req).await;
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "12");
    assert_eq!(up.hits(), 0);
    assert_eq!(
        headers["proxy-status"],
        r#"breakwater; error=destination_not_found; details="no_route""#
    );
}

/// The request body reaches the upstream while the client is still sending it, and the
/// response reaches the client while the upstream is still sending it: nothing waits for
/// a whole body. Each step waits (bounded) for the other side, so a proxy that buffered
/// either body would time out here.
async fn bodies_stream_both_ways(route_extra: &str) {
    use std::sync::{Arc, Mutex};
    type Signal = Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>;
    let (saw_first_tx, saw_first_rx) = tokio::sync::oneshot::channel::<()>();
    let saw_first: Signal = Arc::new(Mutex::new(Some(saw_first_tx)));
    let (client_got_tx, client_got_rx) = tokio::sync::oneshot::channel::<()>();
    let client_got = Arc::new(Mutex::new(Some(client_got_rx)));
    let up = upstream(Proto::H1, move |req: Request<Incoming>| {
        let saw_first = saw_first.clone();
        let client_got = client_got.clone();
        async move {
            let mut body = req.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            if let Some(tx) = saw_first.lock().unwrap().take() {
                let _ = tx.send(());
            }
            let rest = body.collect().await.unwrap().to_bytes();
            let wait = client_got.lock().unwrap().take();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from(format!(
                        "first={} rest={};",
                        first.len(),
                        rest.len()
                    )))))
                    .await;
                if let Some(rx) = wait {
                    let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
                }
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"end")))).await;
            });
            Response::builder()
                .status(200)
                .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed())
                .unwrap()
        }
    })
    .await;
    let p = start_proxy(&one_route(up.addr, route_extra)).await;

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
    let req = Request::post(p.url("/stream")).body(body).unwrap();
    let res = tokio::spawn(h1_client().request(req));
    tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(3), saw_first_rx)
        .await
        .expect(
            "the upstream did not see the first chunk before the body ended: request body buffered",
        )
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b" world"))))
        .await
        .unwrap();
    drop(tx);
    let res = tokio::time::timeout(Duration::from_secs(3), res)
        .await
        .expect("no response")
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let first = tokio::time::timeout(Duration::from_secs(3), body.frame())
        .await
        .expect("the first response chunk did not arrive before the body ended: response buffered")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"first=5 rest=6;");
    let _ = client_got_tx.send(());
    let rest = tokio::time::timeout(Duration::from_secs(3), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(&rest[..], b"end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_in_both_directions() {
    bodies_stream_both_ways("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_in_both_directions_on_a_retrying_route() {
    bodies_stream_both_ways(
        "        retry: { attempts: 3, methods: any, when: [connect-failure, 5xx] }",
    )
    .await;
}
