//! gRPC through the proxy over real loopback sockets: every call shape with its trailers,
//! large messages, retries of trailers-only and headers-then-trailers errors, the proxy's
//! own gRPC answers (rate limit, breaker, deadline, no route, connect failure, fallback)
//! and the rule that a streamed response is never retried once data was forwarded.
//! Clients speak h2c to the proxy; upstreams are `protocol: http2`.
#[path = "support/grpc.rs"]
mod grpc_support;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use grpc_support::*;
use http::{Request as HttpRequest, Response as HttpResponse};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A proxy with one route to `upstream` over h2c, with extra route YAML.
async fn grpc_proxy(upstream: SocketAddr, route_extra: &str) -> Proxy {
    start_proxy(&one_route_proto(upstream, "http2", route_extra)).await
}

/// Asserts a status came from the proxy itself: its metadata (the trailers-only
/// headers) carries `Proxy-Status` with this reason.
fn assert_proxy_status(err: &tonic::Status, reason: &str) {
    let ps = err
        .metadata()
        .get("proxy-status")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        ps.as_deref().is_some_and(
            |v| v.starts_with("breakwater;") && v.contains(&format!("details=\"{reason}\""))
        ),
        "proxy-status {ps:?}, wanted reason {reason}: {err:?}"
    );
}

/// Parses a `grpc-timeout` value (digits and a unit).
fn parse_grpc_timeout(v: &str) -> Duration {
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("grpc-timeout {v:?}"));
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("grpc-timeout unit in {v:?}"),
    }
}

/// A gRPC response from a hand-made hyper upstream: headers, then these frames.
fn grpc_frames(frames: Vec<Frame<Bytes>>) -> HttpResponse<UpBody> {
    let stream = tokio_stream::iter(frames.into_iter().map(Ok::<_, BoxError>));
    HttpResponse::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

/// How a hand-made h2 upstream sends its gRPC errors.
#[derive(Clone, Copy)]
enum ErrorShape {
    /// One HEADERS frame with `grpc-status`, END_STREAM.
    TrailersOnly,
    /// Response headers, no data, then trailers with `grpc-status`.
    HeadersThenTrailers,
}

/// A hand-made h2 upstream answering `test.Echo/Unary`: the first `fail_first` calls
/// fail with UNAVAILABLE ("h2 upstream says no", plus `extra` fields next to the status)
/// sent as `shape`; later calls get "ok" and grpc-status 0. Returns it with the
/// `grpc-previous-rpc-attempts` each call carried.
async fn scripted_h2_upstream(
    fail_first: usize,
    shape: ErrorShape,
    extra: &'static [(&'static str, &'static str)],
) -> (Upstream, Arc<Mutex<Vec<Option<String>>>>) {
    let previous = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = previous.clone();
    let up = upstream(Proto::H2, move |req: HttpRequest<Incoming>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(
            req.headers()
                .get("grpc-previous-rpc-attempts")
                .map(|v| v.to_str().unwrap().to_string()),
        );
        async move {
            let _ = req.into_body().collect().await;
            if n >= fail_first {
                return grpc_frames(vec![
                    Frame::data(frame(&msg("ok"))),
                    Frame::trailers(status_trailers(0)),
                ]);
            }
            let mut t = status_trailers(14);
            t.insert("grpc-message", "h2 upstream says no".parse().unwrap());
            for (k, v) in extra {
                t.insert(*k, v.parse().unwrap());
            }
            match shape {
                ErrorShape::HeadersThenTrailers => grpc_frames(vec![Frame::trailers(t)]),
                ErrorShape::TrailersOnly => {
                    let mut res = HttpResponse::new(full(""));
                    *res.headers_mut() = t;
                    res.headers_mut()
                        .insert("content-type", "application/grpc".parse().unwrap());
                    res
                }
            }
        }
    })
    .await;
    (up, previous)
}

/// [`scripted_h2_upstream`] sending headers-then-trailers errors.
async fn headers_then_trailers_upstream(
    fail_first: usize,
) -> (Upstream, Arc<Mutex<Vec<Option<String>>>>) {
    scripted_h2_upstream(fail_first, ErrorShape::HeadersThenTrailers, &[]).await
}

// ---- call shapes -------------------------------------------------------------------

#[tokio::test]
async fn unary_call_passes_through_with_trailers() {
    let up = grpc_upstream(Plan::default()).await;
    let p = grpc_proxy(up.addr, "").await;
    let mut c = client(p.addrs[0]).await;

    let res = unary(&mut c, UNARY, Request::new(msg("hello")))
        .await
        .expect("unary call");
    assert_eq!(res.get_ref().data, b"hello");
    assert_eq!(up.seen.calls(), 1);
    let h = &up.seen.headers()[0];
    assert_eq!(h["content-type"], "application/grpc");
    assert_eq!(
        h["te"], "trailers",
        "TE: trailers must reach a gRPC upstream"
    );
    assert_eq!(h["x-breakwater-attempt"], "1");
    assert!(h.get("grpc-previous-rpc-attempts").is_none());
}

#[tokio::test]
async fn client_streaming_call_passes_through() {
    let up = grpc_upstream(Plan::default()).await;
    let p = grpc_proxy(up.addr, "").await;
    let mut c = client(p.addrs[0]).await;

    let parts = ["a", "bb", "ccc"].map(msg);
    let res = client_streaming(&mut c, Request::new(tokio_stream::iter(parts)))
        .await
        .expect("client-streaming call");
    assert_eq!(res.get_ref().data, b"abbccc");
    assert_eq!(up.seen.calls(), 1);
}

#[tokio::test]
async fn server_streaming_call_passes_through_with_trailers() {
    let up = grpc_upstream(Plan::default()).await;
    let p = grpc_proxy(up.addr, "").await;
    let mut c = client(p.addrs[0]).await;

    let res = server_streaming(&mut c, Request::new(msg("s")))
        .await
        .expect("server-streaming call");
    let mut inbound = res.into_inner();
    let mut got = Vec::new();
    for _ in 0..=SERVER_STREAM_MESSAGES {
        match bounded(inbound.message()).await.expect("stream status OK") {
            Some(m) => got.push(String::from_utf8(m.data).unwrap()),
            None => break,
        }
    }
    assert_eq!(got, ["s-0", "s-1", "s-2"]);
    let trailers = bounded(inbound.trailers())
        .await
        .expect("trailers")
        .expect("trailers present");
    assert_eq!(
        trailers.get(COUNT_TRAILER).map(|v| v.to_str().unwrap()),
        Some("3"),
        "custom trailer lost: {trailers:?}"
    );
}

/// Sends `rounds` messages one at a time, each only after the previous echo came back,
/// so the call completes only if both directions stream through the proxy.
async fn bidi_ping_pong(proxy: SocketAddr, rounds: usize) {
    let mut c = client(proxy).await;
    let (tx, rx) = mpsc::channel::<Msg>(1);
    tx.send(msg("m0")).await.unwrap();
    let res = bidi(&mut c, Request::new(ReceiverStream::new(rx)))
        .await
        .expect("bidi call");
    let mut inbound = res.into_inner();
    for i in 0..rounds {
        let got = bounded(inbound.message())
            .await
            .expect("bidi status OK")
            .unwrap_or_else(|| panic!("stream ended before echo {i}"));
        assert_eq!(got.data, format!("m{i}").into_bytes());
        if i + 1 < rounds {
            tx.send(msg(format!("m{}", i + 1))).await.unwrap();
        }
    }
    drop(tx);
    assert!(bounded(inbound.message()).await.expect("end OK").is_none());
    let trailers = bounded(inbound.trailers())
        .await
        .expect("trailers")
        .expect("trailers present");
    assert_eq!(
        trailers.get(COUNT_TRAILER).map(|v| v.to_str().unwrap()),
        Some(rounds.to_string().as_str()),
        "{trailers:?}"
    );
}

#[tokio::test]
async fn bidirectional_call_streams_both_ways() {
    let up = grpc_upstream(Plan::default()).await;
    let p = grpc_proxy(up.addr, "").await;
    bidi_ping_pong(p.addrs[0], 5).await;
    assert_eq!(up.seen.calls(), 1);
}

#[tokio::test]
async fn bidirectional_call_streams_both_ways_on_a_retrying_route() {
    // With retry on, the request body is kept for replay and the response's first frame
    // is read ahead for classification: neither may stop the conversation.
    let up = grpc_upstream(Plan::default()).await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable] }",
    )
    .await;
    bidi_ping_pong(p.addrs[0], 5).await;
    assert_eq!(up.seen.calls(), 1);
}

// ---- large messages ----------------------------------------------------------------

fn four_mib() -> Vec<u8> {
    (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn four_mib_message_both_ways() {
    let up = grpc_upstream(Plan::default()).await;
    let p = grpc_proxy(up.addr, "").await;
    let mut c = client(p.addrs[0]).await;
    let data = four_mib();
    let res = unary(&mut c, UNARY, Request::new(msg(data.clone())))
        .await
        .expect("4 MiB unary call");
    assert_eq!(res.get_ref().data.len(), data.len());
    assert!(res.get_ref().data == data, "4 MiB echo differs");
}

#[tokio::test]
async fn four_mib_message_on_a_retrying_route_streams_past_the_buffer_cap() {
    let up = grpc_upstream(Plan::default()).await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable] }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;
    let data = four_mib();
    let res = unary(&mut c, UNARY, Request::new(msg(data.clone())))
        .await
        .expect("4 MiB unary call");
    assert!(res.get_ref().data == data, "4 MiB echo differs");
    assert_eq!(up.seen.calls(), 1);
}

// ---- retries -------------------------------------------------------------------------

#[tokio::test]
async fn trailers_only_unavailable_is_retried_with_previous_attempts() {
    let up = grpc_upstream(Plan {
        fail_first: 2,
        ..Plan::default()
    })
    .await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable] }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;

    let res = unary(&mut c, UNARY, Request::new(msg("again")))
        .await
        .expect("retried to OK");
    assert_eq!(res.get_ref().data, b"again");
    assert_eq!(up.seen.calls(), 3);
    assert_eq!(
        up.seen.header("grpc-previous-rpc-attempts"),
        [None, Some("1".into()), Some("2".into())]
    );
    assert_eq!(
        up.seen.header("x-breakwater-attempt"),
        [Some("1".into()), Some("2".into()), Some("3".into())]
    );
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_retries_total{route="r",reason="grpc-unavailable"}"#
        ),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn headers_then_trailers_unavailable_is_retried() {
    let (up, previous) = headers_then_trailers_upstream(2).await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable] }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;

    let res = unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect("retried to OK");
    assert_eq!(res.get_ref().data, b"ok");
    assert_eq!(up.hits(), 3);
    assert_eq!(
        *previous.lock().unwrap(),
        [None, Some("1".into()), Some("2".into())]
    );
}

#[tokio::test]
async fn headers_then_trailers_unavailable_reaches_the_client_when_retries_run_out() {
    // The status read ahead from the trailers must still be forwarded intact.
    let (up, _) = headers_then_trailers_upstream(usize::MAX).await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 2, when: [grpc-unavailable] }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;

    let err = unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect_err("upstream always fails");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "h2 upstream says no");
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn headers_then_trailers_unavailable_is_counted_by_the_breaker() {
    let (up, _) = headers_then_trailers_upstream(usize::MAX).await;
    let p = grpc_proxy(
        up.addr,
        "        circuit_breaker: { consecutive_failures: 2, open_for: 10s }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;
    for _ in 0..2 {
        let err = unary(&mut c, UNARY, Request::new(msg("x")))
            .await
            .expect_err("upstream fails");
        assert_eq!(err.message(), "h2 upstream says no");
    }
    let err = unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect_err("breaker open");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("circuit open"), "{err:?}");
    assert_proxy_status(&err, "circuit_open");
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn streamed_response_is_never_retried_after_its_first_message() {
    let up = grpc_upstream(Plan {
        stream_then_fail: true,
        ..Plan::default()
    })
    .await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable] }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;

    let res = server_streaming(&mut c, Request::new(msg("first")))
        .await
        .expect("stream starts");
    let mut inbound = res.into_inner();
    let first = bounded(inbound.message())
        .await
        .expect("first message")
        .expect("a first message");
    assert_eq!(first.data, b"first");
    let err = bounded(inbound.message())
        .await
        .expect_err("then UNAVAILABLE");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "upstream says no");
    assert_eq!(up.seen.calls(), 1, "a committed stream was retried");
}

// ---- the proxy's own answers ---------------------------------------------------------

#[tokio::test]
async fn rate_limited_call_gets_resource_exhausted() {
    let up = grpc_upstream(Plan::default()).await;
    let p = grpc_proxy(up.addr, "        rate_limit: { rate: 1/m, burst: 1 }").await;
    let mut c = client(p.addrs[0]).await;

    unary(&mut c, UNARY, Request::new(msg("1")))
        .await
        .expect("first call passes");
    let err = unary(&mut c, UNARY, Request::new(msg("2")))
        .await
        .expect_err("second call limited");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_proxy_status(&err, "rate_limited");
    assert_eq!(up.seen.calls(), 1);
}

#[tokio::test]
async fn open_breaker_answers_unavailable_without_calling_upstream() {
    let up = grpc_upstream(Plan::always_unavailable()).await;
    let p = grpc_proxy(
        up.addr,
        "        circuit_breaker: { consecutive_failures: 2, open_for: 10s }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;
    for _ in 0..2 {
        let err = unary(&mut c, UNARY, Request::new(msg("x")))
            .await
            .expect_err("upstream fails");
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(err.message(), "upstream says no");
    }
    let err = unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect_err("breaker open");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("circuit open"), "{err:?}");
    assert_proxy_status(&err, "circuit_open");
    assert_eq!(up.seen.calls(), 2);
}

#[tokio::test]
async fn force_opened_breaker_answers_unavailable() {
    let up = grpc_upstream(Plan::default()).await;
    let p = grpc_proxy(
        up.addr,
        "        circuit_breaker: { consecutive_failures: 5, open_for: 10s }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;
    unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect("closed breaker passes");

    let post = |path: &str| HttpRequest::post(p.admin_url(path)).body(full("")).unwrap();
    let (status, _, body) = send(post("/circuit/r/force-open")).await;
    assert_eq!(status, 200, "{body:?}");
    let err = unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect_err("forced open");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("circuit open"), "{err:?}");
    assert_proxy_status(&err, "circuit_open");
    assert_eq!(up.seen.calls(), 1);

    let (status, _, body) = send(post("/circuit/r/auto")).await;
    assert_eq!(status, 200, "{body:?}");
    unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect("back to auto: passes");
    assert_eq!(up.seen.calls(), 2);
}

#[tokio::test]
async fn client_deadline_shorter_than_route_timeout_ends_the_call() {
    let up = grpc_upstream(Plan {
        delay: Some(Duration::from_secs(2)),
        ..Plan::default()
    })
    .await;
    let p = grpc_proxy(up.addr, "        timeout: 10s").await;
    let mut c = client(p.addrs[0]).await;

    let mut req = Request::new(msg("slow"));
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = unary(&mut c, UNARY, req)
        .await
        .expect_err("deadline exceeded");
    let took = start.elapsed();
    // A tonic Channel enforces grpc-timeout itself and its timer starts first, so it
    // usually reports Cancelled ("Timeout expired") just before the proxy's
    // DEADLINE_EXCEEDED arrives; the next test pins the proxy's answer down.
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");

    let seen = up.seen.header("grpc-timeout");
    assert_eq!(seen.len(), 1);
    let left = parse_grpc_timeout(seen[0].as_deref().expect("upstream got grpc-timeout"));
    assert!(
        left <= Duration::from_millis(300) && left > Duration::ZERO,
        "upstream grpc-timeout {left:?}"
    );
}

#[tokio::test]
async fn proxy_answers_deadline_exceeded_when_the_grpc_timeout_expires() {
    // A raw h2 client and upstream, neither enforcing grpc-timeout itself: the answer
    // can only come from the proxy.
    let seen_timeouts = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = seen_timeouts.clone();
    let up = upstream(Proto::H2, move |req: HttpRequest<Incoming>| {
        if let Some(v) = req.headers().get("grpc-timeout") {
            seen.lock().unwrap().push(v.to_str().unwrap().to_string());
        }
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            grpc_frames(vec![
                Frame::data(frame(&msg("late"))),
                Frame::trailers(status_trailers(0)),
            ])
        }
    })
    .await;
    let p = grpc_proxy(up.addr, "        timeout: 10s").await;

    // 1. raw: the trailers-only answer itself
    let req = HttpRequest::post(p.url(UNARY))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(full(frame(&msg("slow"))))
        .unwrap();
    let start = Instant::now();
    let res = bounded(h2_client().request(req))
        .await
        .expect("proxy answers");
    let took = start.elapsed();
    let status = res.status();
    let headers = res.headers().clone();
    let body = bounded(res.into_body().collect())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(
        headers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("4"),
        "trailers-only DEADLINE_EXCEEDED expected: {headers:?}"
    );
    assert!(body.is_empty(), "{body:?}");
    assert!(
        headers["proxy-status"]
            .to_str()
            .unwrap()
            .contains("details=\"timeout\""),
        "{headers:?}"
    );
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(1),
        "took {took:?}"
    );

    // 2. a tonic client (on a transport that leaves the deadline to the proxy) decodes it
    let mut c = plain_client(p.addrs[0]);
    let mut req = Request::new(msg("slow"));
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = unary(&mut c, UNARY, req)
        .await
        .expect_err("deadline exceeded");
    let took = start.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_proxy_status(&err, "timeout");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    let seen = seen_timeouts.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for v in &seen {
        let left = parse_grpc_timeout(v);
        assert!(
            left <= Duration::from_millis(300) && left > Duration::ZERO,
            "upstream grpc-timeout {left:?}"
        );
    }
}

#[tokio::test]
async fn no_route_is_unimplemented() {
    let nowhere = closed_port().await;
    let yaml = format!(
        "listeners:
  - name: test
    address: 127.0.0.1:0
    routes:
      - name: other
        match: {{ grpc_service: other.v1.Other }}
        upstream: up
upstreams:
  up:
    endpoints: [{nowhere}]
    protocol: http2
    connect_timeout: 200ms
telemetry:
  access_log: false
"
    );
    let p = start_proxy(&yaml).await;
    let mut c = client(p.addrs[0]).await;
    let err = unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect_err("no route");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    // the proxy's own trailers-only answer, not tonic's mapping of an HTTP 404
    assert_eq!(err.message(), "breakwater: no route");
    assert_proxy_status(&err, "no_route");
}

#[tokio::test]
async fn connect_failure_is_unavailable() {
    let nowhere = closed_port().await;
    let p = grpc_proxy(nowhere, "").await;
    let mut c = client(p.addrs[0]).await;
    let err = unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect_err("nothing listens upstream");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // the proxy's own trailers-only answer, not tonic's mapping of an HTTP 502
    assert_eq!(err.message(), "breakwater: upstream unavailable");
    assert_proxy_status(&err, "upstream_unavailable");
}

#[tokio::test]
async fn fallback_grpc_status_replaces_a_connect_failure() {
    let nowhere = closed_port().await;
    let p = grpc_proxy(
        nowhere,
        r#"        fallback: { when: [upstream_unavailable], grpc_status: 14, grpc_message: "degraded" }"#,
    )
    .await;
    let mut c = client(p.addrs[0]).await;
    let err = unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect_err("fallback status");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "degraded");
    assert_proxy_status(&err, "upstream_unavailable");
}

// ---- more edges ------------------------------------------------------------------------

#[tokio::test]
async fn client_streaming_call_is_retried_with_its_whole_body() {
    let up = grpc_upstream(Plan {
        fail_first: 1,
        ..Plan::default()
    })
    .await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable] }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;
    let parts = ["a", "bb", "ccc"].map(msg);
    let res = client_streaming(&mut c, Request::new(tokio_stream::iter(parts)))
        .await
        .expect("retried to OK");
    assert_eq!(res.get_ref().data, b"abbccc", "replayed body differs");
    assert_eq!(up.seen.calls(), 2);
}

#[tokio::test]
async fn bidirectional_call_failed_before_any_response_is_retried_and_keeps_streaming() {
    // The first attempt is refused (trailers-only UNAVAILABLE) while the client's request
    // stream is still open: the retry replays what was sent so far and keeps streaming.
    let up = grpc_upstream(Plan {
        fail_first: 1,
        ..Plan::default()
    })
    .await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable] }",
    )
    .await;
    bidi_ping_pong(p.addrs[0], 3).await;
    assert_eq!(up.seen.calls(), 2);
}

#[tokio::test]
async fn empty_stream_with_ok_trailers_passes_through_read_ahead() {
    // headers, no data, trailers with grpc-status 0: the read-ahead trailers are the
    // whole answer and must reach the client intact
    let up = upstream(Proto::H2, |req: HttpRequest<Incoming>| async move {
        let _ = req.into_body().collect().await;
        let mut t = status_trailers(0);
        t.insert(COUNT_TRAILER, "0".parse().unwrap());
        grpc_frames(vec![Frame::trailers(t)])
    })
    .await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable] }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;
    let res = server_streaming(&mut c, Request::new(msg("none")))
        .await
        .expect("stream starts");
    let mut inbound = res.into_inner();
    assert!(bounded(inbound.message())
        .await
        .expect("status OK")
        .is_none());
    let trailers = bounded(inbound.trailers())
        .await
        .expect("trailers")
        .expect("trailers present");
    assert_eq!(
        trailers.get(COUNT_TRAILER).map(|v| v.to_str().unwrap()),
        Some("0"),
        "{trailers:?}"
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn negative_pushback_in_trailers_only_stops_retries() {
    let (up, _) = scripted_h2_upstream(
        usize::MAX,
        ErrorShape::TrailersOnly,
        &[("grpc-retry-pushback-ms", "-1")],
    )
    .await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable] }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;
    let err = unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect_err("upstream refuses");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "h2 upstream says no");
    assert_eq!(
        up.hits(),
        1,
        "a negative grpc-retry-pushback-ms was retried"
    );
}

#[tokio::test]

async fn negative_pushback_in_trailers_stops_retries() {
    // gRPC servers send grpc-retry-pushback-ms in the trailers; with headers-then-trailers
    // the proxy reads those trailers before deciding, so it must honour them too.
    let (up, _) = scripted_h2_upstream(
        usize::MAX,
        ErrorShape::HeadersThenTrailers,
        &[("grpc-retry-pushback-ms", "-1")],
    )
    .await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable] }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;
    let err = unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect_err("upstream refuses");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "h2 upstream says no");
    assert_eq!(
        up.hits(),
        1,
        "a negative grpc-retry-pushback-ms was retried"
    );
}

#[tokio::test]

async fn pushback_in_trailers_sets_the_wait() {
    let (up, _) = scripted_h2_upstream(
        1,
        ErrorShape::HeadersThenTrailers,
        &[("grpc-retry-pushback-ms", "400")],
    )
    .await;
    let p = grpc_proxy(
        up.addr,
        "        retry: { attempts: 3, when: [grpc-unavailable], backoff: { base: 1ms, max: 1ms } }",
    )
    .await;
    let mut c = client(p.addrs[0]).await;
    let start = Instant::now();
    unary(&mut c, UNARY, Request::new(msg("x")))
        .await
        .expect("retried to OK");
    let took = start.elapsed();
    assert_eq!(up.hits(), 2);
    assert!(
        took >= Duration::from_millis(400),
        "retried after {took:?}, before the 400 ms pushback"
    );
}

#[tokio::test]
async fn concurrency_limit_answers_unavailable_overloaded() {
    let up = grpc_upstream(Plan {
        delay: Some(Duration::from_millis(400)),
        ..Plan::default()
    })
    .await;
    let p = grpc_proxy(up.addr, "        concurrency_limit: { max: 1 }").await;
    let c = client(p.addrs[0]).await;
    let mut first_client = c.clone();
    let first =
        tokio::spawn(
            async move { unary(&mut first_client, UNARY, Request::new(msg("first"))).await },
        );
    for _ in 0..200 {
        if up.seen.calls() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(up.seen.calls(), 1, "first call never reached the upstream");
    let mut second_client = c.clone();
    let err = unary(&mut second_client, UNARY, Request::new(msg("second")))
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_proxy_status(&err, "overloaded");
    first.await.unwrap().expect("first call completes");
    assert_eq!(up.seen.calls(), 1);
}

#[tokio::test]
async fn upstream_grpc_timeout_is_the_tightest_budget_left() {
    let up = grpc_upstream(Plan::default()).await;
    // route timeout 1s beats the client's 10s
    let p = grpc_proxy(up.addr, "        timeout: 1s").await;
    let mut c = client(p.addrs[0]).await;
    let mut req = Request::new(msg("x"));
    req.set_timeout(Duration::from_secs(10));
    unary(&mut c, UNARY, req).await.expect("call");
    // per-try 200ms beats both
    let p2 = grpc_proxy(
        up.addr,
        "        timeout: 1s
        retry: { attempts: 2, per_try_timeout: 200ms, when: [grpc-unavailable] }",
    )
    .await;
    let mut c2 = client(p2.addrs[0]).await;
    unary(&mut c2, UNARY, Request::new(msg("y")))
        .await
        .expect("call");

    let seen: Vec<Duration> = up
        .seen
        .header("grpc-timeout")
        .into_iter()
        .map(|v| parse_grpc_timeout(&v.expect("grpc-timeout forwarded")))
        .collect();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[0] <= Duration::from_secs(1) && seen[0] > Duration::from_millis(800),
        "{seen:?}"
    );
    assert!(
        seen[1] <= Duration::from_millis(200) && seen[1] > Duration::from_millis(100),
        "{seen:?}"
    );
}
