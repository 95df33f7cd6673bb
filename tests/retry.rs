//! Retry against real flaky upstreams on loopback (SPEC sections 2, 3, 4 and 6):
//! attempt headers, method eligibility, connect failures, the retry budget, per-try and
//! whole-request timeouts, body replay and `Retry-After`.
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use support::*;

/// What an upstream saw, one entry per request.
type Seen = Arc<Mutex<Vec<String>>>;

fn seen() -> Seen {
    Arc::new(Mutex::new(Vec::new()))
}

fn attempt_header(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-breakwater-attempt")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_else(|| "<none>".into())
}

/// An upstream answering 503 to its first `fails` requests and 200 afterwards,
/// recording the `x-breakwater-attempt` header of each request.
async fn flaky(fails: usize, attempts: Seen) -> Upstream {
    let n = Arc::new(AtomicUsize::new(0));
    upstream(Proto::H1, move |req: Request<Incoming>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        attempts.lock().unwrap().push(attempt_header(&req));
        async move {
            // read the body so the connection stays reusable
            let _ = req.into_body().collect().await;
            if i < fails {
                resp(503, "down")
            } else {
                resp(200, "ok")
            }
        }
    })
    .await
}

/// An upstream answering 503 to everything.
async fn always_503() -> Upstream {
    upstream(Proto::H1, |_req: Request<Incoming>| async move {
        resp(503, "down")
    })
    .await
}

fn post(url: &str, body: impl Into<Bytes>) -> Request<UpBody> {
    Request::post(url).body(full(body)).unwrap()
}

fn proxy_status(h: &http::HeaderMap) -> &str {
    h.get("proxy-status")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

const FAST_BACKOFF: &str = "          backoff: { base: 5ms, max: 10ms }";

#[tokio::test]
async fn retried_get_succeeds_and_upstream_sees_attempt_numbers() {
    let attempts = seen();
    let up = flaky(2, attempts.clone()).await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 3\n{FAST_BACKOFF}"),
    ))
    .await;
    let (status, headers, body) = get(&p.url("/x")).await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(&body[..], b"ok");
    assert_eq!(up.hits(), 3);
    assert_eq!(*attempts.lock().unwrap(), ["1", "2", "3"]);

    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_retries_total{route="r",reason="gateway-error"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_upstream_attempts_total{route="r",upstream="up",outcome="failure"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_upstream_attempts_total{route="r",upstream="up",outcome="success"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn retries_give_up_after_attempts_and_return_the_upstream_answer() {
    let up = always_503().await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 4\n{FAST_BACKOFF}"),
    ))
    .await;
    let (status, headers, body) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(&body[..], b"down", "the upstream's own answer is passed on");
    assert!(
        headers.get("proxy-status").is_none(),
        "an upstream answer is not the proxy's own: {headers:?}"
    );
    assert_eq!(up.hits(), 4);
}

#[tokio::test]
async fn post_is_not_retried_by_default() {
    let up = always_503().await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 3\n{FAST_BACKOFF}"),
    ))
    .await;
    let (status, _, _) = send(post(&p.url("/orders"), "x")).await;
    assert_eq!(status, 503);
    assert_eq!(up.hits(), 1, "POST is not idempotent");
}

#[tokio::test]
async fn post_is_retried_with_methods_any() {
    let attempts = seen();
    let up = flaky(1, attempts.clone()).await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 3\n          methods: any\n{FAST_BACKOFF}"),
    ))
    .await;
    let (status, _, _) = send(post(&p.url("/orders"), "x")).await;
    assert_eq!(status, 200);
    assert_eq!(up.hits(), 2);
    assert_eq!(*attempts.lock().unwrap(), ["1", "2"]);
}

#[tokio::test]
async fn method_list_limits_retries_to_the_listed_methods() {
    let up = always_503().await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!(
            "        retry:\n          attempts: 2\n          methods: [PATCH]\n{FAST_BACKOFF}"
        ),
    ))
    .await;
    let patch = Request::patch(p.url("/")).body(full("x")).unwrap();
    let (status, _, _) = send(patch).await;
    assert_eq!(status, 503);
    assert_eq!(up.hits(), 2, "PATCH is listed");
    let (status, _, _) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(up.hits(), 3, "GET is not listed: one attempt");
}

#[tokio::test]
async fn connect_failure_is_retried_even_for_post() {
    let bodies = seen();
    let attempts = seen();
    let (b, a) = (bodies.clone(), attempts.clone());
    let live = upstream(Proto::H1, move |req: Request<Incoming>| {
        a.lock().unwrap().push(attempt_header(&req));
        let b = b.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            b.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            resp(200, "live")
        }
    })
    .await;
    let dead = closed_port().await;
    // Round robin: the first attempt goes to the closed port, the retry to the live one.
    let yaml = one_route(
        live.addr,
        &format!("        retry:\n          attempts: 2\n{FAST_BACKOFF}"),
    )
    .replace(
        &format!("endpoints: [{}]", live.addr),
        &format!("endpoints: [{dead}, {}]", live.addr),
    );
    assert!(yaml.contains(&dead.to_string()), "{yaml}");
    let p = start_proxy(&yaml).await;

    let (status, headers, body) = send(post(&p.url("/orders"), "payload")).await;
    assert_eq!(status, 200, "{headers:?} {body:?}");
    assert_eq!(&body[..], b"live");
    assert_eq!(live.hits(), 1);
    assert_eq!(*attempts.lock().unwrap(), ["2"]);
    assert_eq!(
        *bodies.lock().unwrap(),
        ["payload"],
        "the body is sent whole on the retry"
    );

    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_retries_total{route="r",reason="connect-failure"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_upstream_attempts_total{route="r",upstream="up",outcome="connect_error"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn connect_failure_without_retry_is_502_upstream_unavailable() {
    let dead = closed_port().await;
    let p = start_proxy(&one_route(dead, "        retry: false")).await;
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 502);
    assert_eq!(
        proxy_status(&headers),
        r#"breakwater; error=connection_refused; details="upstream_unavailable""#
    );
}

#[tokio::test]
async fn retry_budget_caps_a_failure_burst() {
    let up = always_503().await;
    let p = start_proxy(&one_route(
        up.addr,
        "        retry:
          attempts: 3
          backoff: { base: 1ms, max: 2ms }
          budget: { ratio: 0.0, min_per_second: 1 }",
    ))
    .await;
    for _ in 0..50 {
        let (status, _, _) = get(&p.url("/")).await;
        assert_eq!(status, 503);
    }
    let hits = up.hits();
    // Without a budget: 150 hits. A floor of 1/s over the 10 s window allows about 10
    // retries in total.
    assert!(hits >= 50, "every request is tried once: {hits}");
    assert!(
        hits <= 50 + 15,
        "the budget did not cap retries: {hits} upstream hits"
    );

    let text = scrape(&p).await;
    let exhausted = metric(
        &text,
        r#"breakwater_retry_budget_exhausted_total{route="r"}"#,
    )
    .expect("retry_budget_exhausted_total missing");
    assert!(exhausted >= 30.0, "exhausted {exhausted}\n{text}");
    let retries = metric(
        &text,
        r#"breakwater_retries_total{route="r",reason="gateway-error"}"#,
    )
    .unwrap_or(0.0);
    assert_eq!(
        retries as usize,
        hits - 50,
        "every retry that was made is counted"
    );
}

#[tokio::test]
async fn per_try_timeout_rescues_a_stalled_first_attempt() {
    let n = Arc::new(AtomicUsize::new(0));
    let up = upstream(Proto::H1, move |_req: Request<Incoming>| {
        let first = n.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            resp(200, if first { "late" } else { "fresh" })
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        "        timeout: 3s
        retry:
          attempts: 3
          per_try_timeout: 200ms
          when: [connect-failure, reset, gateway-error, timeout]
          backoff: { base: 5ms, max: 10ms }",
    ))
    .await;
    let start = Instant::now();
    let (status, _, body) = get(&p.url("/")).await;
    let took = start.elapsed();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"fresh");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(took >= Duration::from_millis(200), "took {took:?}");
    assert_eq!(up.hits(), 2);

    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_timeouts_total{route="r",kind="per_try"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_retries_total{route="r",reason="timeout"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_upstream_attempts_total{route="r",upstream="up",outcome="timeout"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_timeouts_total{route="r",kind="request"}"#
        )
        .unwrap_or(0.0),
        0.0
    );
}

#[tokio::test]
async fn per_try_timeout_without_timeout_condition_is_not_retried() {
    let up = upstream(Proto::H1, |_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        resp(200, "late")
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        "        timeout: 3s
        retry:
          attempts: 3
          per_try_timeout: 150ms
          when: [connect-failure, gateway-error]",
    ))
    .await;
    let start = Instant::now();
    let (status, headers, _) = get(&p.url("/")).await;
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(status, 504, "{headers:?}");
    assert_eq!(
        proxy_status(&headers),
        r#"breakwater; error=http_response_timeout; details="timeout""#
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn whole_request_timeout_is_504_and_covers_retries() {
    let up = upstream(Proto::H1, |_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        resp(200, "never")
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        "        timeout: 300ms
        retry:
          attempts: 3
          per_try_timeout: 200ms
          when: [connect-failure, gateway-error, timeout]
          backoff: { base: 5ms, max: 10ms }",
    ))
    .await;
    let start = Instant::now();
    let (status, headers, _) = get(&p.url("/")).await;
    let took = start.elapsed();
    assert_eq!(status, 504, "{headers:?}");
    assert_eq!(
        proxy_status(&headers),
        r#"breakwater; error=http_response_timeout; details="timeout""#
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(took >= Duration::from_millis(290), "took {took:?}");
    // first attempt cut at 200 ms, the retry cut by the 300 ms deadline, no third
    assert_eq!(up.hits(), 2);

    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_timeouts_total{route="r",kind="request"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_timeouts_total{route="r",kind="per_try"}"#
        ),
        Some(1.0),
        "{text}"
    );
    // both attempts ended as timeouts: one by its own deadline, one by the request's
    assert_eq!(
        metric(
            &text,
            r#"breakwater_upstream_attempts_total{route="r",upstream="up",outcome="timeout"}"#
        ),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn default_timeout_applies_without_a_timeout_block() {
    // No way to wait 15 s here; check the route's effective timeout instead.
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let routers = p.shared.routers.load();
    let r = routers.route("r").unwrap();
    assert_eq!(r.spec.timeout.map(|d| d.0), Some(Duration::from_secs(15)));
}

#[tokio::test]
async fn request_body_within_the_cap_is_replayed_identically() {
    let bodies = seen();
    let b = bodies.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let up = upstream(Proto::H1, move |req: Request<Incoming>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        let b = b.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            b.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            if i == 0 {
                resp(503, "down")
            } else {
                resp(200, "ok")
            }
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 3\n          max_buffered_body: 1KiB\n{FAST_BACKOFF}"),
    ))
    .await;
    let payload: String = (0..900)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let req = Request::put(p.url("/doc"))
        .body(full(payload.clone()))
        .unwrap();
    let (status, _, _) = send(req).await;
    assert_eq!(status, 200);
    assert_eq!(up.hits(), 2);
    assert_eq!(*bodies.lock().unwrap(), [payload.clone(), payload]);
}

#[tokio::test]
async fn request_body_over_the_cap_streams_through_and_is_not_retried() {
    let bodies = seen();
    let b = bodies.clone();
    let up = upstream(Proto::H1, move |req: Request<Incoming>| {
        let b = b.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            b.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            resp(503, "down")
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 3\n          max_buffered_body: 1KiB\n{FAST_BACKOFF}"),
    ))
    .await;
    let payload = "z".repeat(4096);
    let req = Request::put(p.url("/doc"))
        .body(full(payload.clone()))
        .unwrap();
    let (status, _, _) = send(req).await;
    assert_eq!(status, 503);
    assert_eq!(up.hits(), 1, "a body over max_buffered_body is not retried");
    assert_eq!(
        *bodies.lock().unwrap(),
        [payload],
        "the body still reaches the upstream whole"
    );
}

/// An upstream answering 503 with `Retry-After: <secs>` first, then 200.
async fn retry_after_upstream(secs: &'static str) -> Upstream {
    let n = Arc::new(AtomicUsize::new(0));
    upstream(Proto::H1, move |_req: Request<Incoming>| {
        let first = n.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                http::Response::builder()
                    .status(503)
                    .header("retry-after", secs)
                    .body(full("later"))
                    .unwrap()
            } else {
                resp(200, "ok")
            }
        }
    })
    .await
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let up = retry_after_upstream("1").await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 3\n{FAST_BACKOFF}"),
    ))
    .await;
    let start = Instant::now();
    let (status, _, _) = get(&p.url("/")).await;
    let took = start.elapsed();
    assert_eq!(status, 200);
    assert_eq!(up.hits(), 2);
    assert!(took >= Duration::from_secs(1), "took {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn retry_after_beyond_the_deadline_is_not_waited_for() {
    let up = retry_after_upstream("5").await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        timeout: 1s\n        retry:\n          attempts: 3\n{FAST_BACKOFF}"),
    ))
    .await;
    let start = Instant::now();
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 503, "{headers:?}");
    assert_eq!(
        headers["retry-after"], "5",
        "the upstream's answer is passed on"
    );
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn retry_after_ignored_when_respect_retry_after_is_off() {
    let up = retry_after_upstream("2").await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!(
            "        retry:\n          attempts: 3\n          respect_retry_after: false\n{FAST_BACKOFF}"
        ),
    ))
    .await;
    let start = Instant::now();
    let (status, _, _) = get(&p.url("/")).await;
    assert_eq!(status, 200);
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn no_retry_block_means_one_attempt() {
    let up = always_503().await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let (status, _, _) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn status_code_condition_retries_only_that_code() {
    let n = Arc::new(AtomicUsize::new(0));
    let up = upstream(Proto::H1, move |_req: Request<Incoming>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            match i {
                0 => resp(429, "slow"),
                1 => resp(500, "boom"),
                _ => resp(200, "ok"),
            }
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 3\n          when: [429]\n{FAST_BACKOFF}"),
    ))
    .await;
    let (status, _, _) = get(&p.url("/")).await;
    assert_eq!(status, 500, "500 is not listed, so it ends the retries");
    assert_eq!(up.hits(), 2);
    let text = scrape(&p).await;
    assert_eq!(
        metric(&text, r#"breakwater_retries_total{route="r",reason="429"}"#),
        Some(1.0),
        "{text}"
    );
}

/// A request body sent in several chunks with pauses between them.
fn chunked(parts: &'static [&'static str], gap: Duration) -> UpBody {
    use http_body::Frame;
    use http_body_util::StreamBody;
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>,
    >(1);
    tokio::spawn(async move {
        for p in parts {
            tokio::time::sleep(gap).await;
            if tx
                .send(Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
}

#[tokio::test]
async fn streamed_request_body_is_replayed_identically() {
    let bodies = seen();
    let b = bodies.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let up = upstream(Proto::H1, move |req: Request<Incoming>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        let b = b.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            b.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            if i == 0 {
                resp(503, "down")
            } else {
                resp(200, "ok")
            }
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 3\n          max_buffered_body: 1KiB\n{FAST_BACKOFF}"),
    ))
    .await;
    let body = chunked(&["part1-", "part2-", "part3"], Duration::from_millis(20));
    let req = Request::put(p.url("/doc")).body(body).unwrap();
    let (status, _, _) = send(req).await;
    assert_eq!(status, 200);
    assert_eq!(
        *bodies.lock().unwrap(),
        ["part1-part2-part3", "part1-part2-part3"]
    );
}

#[tokio::test]
async fn early_upstream_answer_while_the_body_streams_is_still_retried_whole() {
    let bodies = seen();
    let b = bodies.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let up = upstream(Proto::H1, move |req: Request<Incoming>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        let b = b.clone();
        async move {
            if i == 0 {
                // answer before reading the body
                return resp(503, "down");
            }
            let body = req.into_body().collect().await.unwrap().to_bytes();
            b.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            resp(200, "ok")
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 3\n          max_buffered_body: 1KiB\n{FAST_BACKOFF}"),
    ))
    .await;
    let body = chunked(&["part1-", "part2-", "part3"], Duration::from_millis(50));
    let req = Request::put(p.url("/doc")).body(body).unwrap();
    let (status, _, resp_body) = send(req).await;
    assert_eq!(status, 200, "{resp_body:?}");
    assert_eq!(up.hits(), 2);
    assert_eq!(*bodies.lock().unwrap(), ["part1-part2-part3"]);
}

/// A raw HTTP/1.1 upstream that closes the first `resets` connections after reading the
/// request head, without answering, and answers 200 on later ones.
async fn resetting_upstream(resets: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>, Aborts) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let i = c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if i < resets {
                    drop(s);
                    return;
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, conns, Aborts(task))
}

/// Aborts a task when dropped.
struct Aborts(tokio::task::JoinHandle<()>);

impl Drop for Aborts {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test]
async fn reset_connection_is_retried_for_get() {
    let (addr, conns, _guard) = resetting_upstream(1).await;
    let p = start_proxy(&one_route(
        addr,
        &format!("        retry:\n          attempts: 3\n{FAST_BACKOFF}"),
    ))
    .await;
    let (status, headers, body) = get(&p.url("/")).await;
    assert_eq!(status, 200, "{headers:?} {body:?}");
    assert_eq!(&body[..], b"ok");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_retries_total{route="r",reason="reset"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn reset_connection_is_not_retried_for_post() {
    let (addr, conns, _guard) = resetting_upstream(1).await;
    let p = start_proxy(&one_route(
        addr,
        &format!("        retry:\n          attempts: 3\n{FAST_BACKOFF}"),
    ))
    .await;
    let (status, headers, _) = send(post(&p.url("/"), "x")).await;
    assert_eq!(status, 502, "{headers:?}");
    assert_eq!(
        proxy_status(&headers),
        r#"breakwater; error=connection_terminated; details="upstream_unavailable""#
    );
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "the request may have been processed"
    );
}

#[tokio::test]
async fn client_supplied_attempt_header_is_replaced() {
    let attempts = seen();
    let up = flaky(0, attempts.clone()).await;
    let p = start_proxy(&one_route(up.addr, "        retry:\n          attempts: 2")).await;
    let req = Request::get(p.url("/"))
        .header("x-breakwater-attempt", "7")
        .body(full(""))
        .unwrap();
    assert_eq!(send(req).await.0, 200);
    assert_eq!(*attempts.lock().unwrap(), ["1"]);
}

/// An upstream that sends its headers at once, then ten body chunks 100 ms apart.
async fn trickling_upstream() -> Upstream {
    use http_body::Frame;
    use http_body_util::StreamBody;
    upstream(Proto::H1, |_req: Request<Incoming>| async move {
        let (tx, rx) = tokio::sync::mpsc::channel::<
            Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>,
        >(1);
        tokio::spawn(async move {
            for i in 0..10 {
                let chunk = Frame::data(Bytes::from(format!("chunk{i};")));
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
        http::Response::builder().status(200).body(body).unwrap()
    })
    .await
}

/// Reads a response whose body may fail; returns the body read and whether it ended
/// cleanly.
async fn get_streaming(url: &str) -> (u16, Bytes, bool) {
    let res = h1_client()
        .request(Request::get(url).body(full("")).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let mut body = res.into_body();
    let mut got = Vec::new();
    let clean = loop {
        match tokio::time::timeout(Duration::from_secs(3), body.frame()).await {
            Err(_) => panic!("body stalled"),
            Ok(None) => break true,
            Ok(Some(Err(_))) => break false,
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    got.extend_from_slice(&d);
                }
            }
        }
    };
    (status, Bytes::from(got), clean)
}

#[tokio::test]
async fn route_timeout_covers_the_response_body() {
    // SPEC section 2: `timeout` is the whole request; a body still streaming at the
    // deadline is cut off (`timeout: false` is the way to allow long streams).
    let up = trickling_upstream().await;
    let p = start_proxy(&one_route(up.addr, "        timeout: 300ms")).await;
    let start = Instant::now();
    let (status, body, clean) = get_streaming(&p.url("/")).await;
    assert_eq!(status, 200, "headers came before the deadline");
    assert!(!clean, "the body must be cut at the deadline");
    assert!(start.elapsed() < Duration::from_millis(900));
    let want: String = (0..10).map(|i| format!("chunk{i};")).collect();
    assert!(body.len() < want.len());
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_timeouts_total{route="r",kind="request"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn timeout_off_lets_a_long_stream_finish() {
    let up = trickling_upstream().await;
    let p = start_proxy(&one_route(up.addr, "        timeout: false")).await;
    let start = Instant::now();
    let (status, body, clean) = get_streaming(&p.url("/")).await;
    assert_eq!(status, 200);
    assert!(clean);
    assert!(start.elapsed() >= Duration::from_millis(900));
    let want: String = (0..10).map(|i| format!("chunk{i};")).collect();
    assert_eq!(body, want.as_bytes());
}

#[tokio::test]
async fn attempt_header_without_a_retry_block() {
    let attempts = seen();
    let up = flaky(0, attempts.clone()).await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    assert_eq!(get(&p.url("/")).await.0, 200);
    assert_eq!(
        *attempts.lock().unwrap(),
        ["1"],
        "every attempt carries the header"
    );
}

#[tokio::test]
async fn client_supplied_attempt_header_is_replaced_without_a_retry_block() {
    let attempts = seen();
    let up = flaky(0, attempts.clone()).await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let req = Request::get(p.url("/"))
        .header("x-breakwater-attempt", "7")
        .body(full(""))
        .unwrap();
    assert_eq!(send(req).await.0, 200);
    assert_eq!(
        *attempts.lock().unwrap(),
        ["1"],
        "SPEC section 4: the attempt is 1-based"
    );
}

/// `t` (seconds since the epoch) as an RFC 9110 IMF-fixdate.
fn http_date(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // civil-from-days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {mon} {year} {:02}:{:02}:{:02} GMT",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[test]
fn http_date_formats_imf_fixdate() {
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
}

#[tokio::test]
async fn retry_after_http_date_is_honoured() {
    let n = Arc::new(AtomicUsize::new(0));
    let up = upstream(Proto::H1, move |_req: Request<Incoming>| {
        let first = n.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                http::Response::builder()
                    .status(503)
                    .header("retry-after", http_date(now + 2))
                    .body(full("later"))
                    .unwrap()
            } else {
                resp(200, "ok")
            }
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        &format!("        retry:\n          attempts: 3\n{FAST_BACKOFF}"),
    ))
    .await;
    let start = Instant::now();
    let (status, _, _) = get(&p.url("/")).await;
    let took = start.elapsed();
    assert_eq!(status, 200);
    assert_eq!(up.hits(), 2);
    // the date has one-second resolution: the wait is between 1 and 2 s
    assert!(
        took >= Duration::from_millis(900),
        "took {took:?}: the date was not honoured"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn a_retry_budget_is_on_by_default() {
    let up = always_503().await;
    let p = start_proxy(&one_route(
        up.addr,
        "        retry:\n          attempts: 3\n          backoff: { base: 1ms, max: 1ms, jitter: none }",
    ))
    .await;
    for _ in 0..200 {
        assert_eq!(get(&p.url("/")).await.0, 503);
    }
    // default budget: 0.2 x requests + 10/s over 10 s, so about 140 retries, not 400
    let hits = up.hits();
    assert!(hits < 200 + 200, "{hits} upstream hits: no default budget");
    assert!(
        hits > 200 + 100,
        "{hits} upstream hits: budget tighter than documented"
    );
    let text = scrape(&p).await;
    assert!(
        metric(
            &text,
            r#"breakwater_retry_budget_exhausted_total{route="r"}"#
        )
        .unwrap_or(0.0)
            > 0.0,
        "{text}"
    );
}
