//! Concurrency limit (load shedding) and fallback responses through the real proxy
//! (SPEC sections 2, 3, 6).
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::Incoming;
use support::*;

const OVERLOADED: &str = r#"breakwater; error=connection_limit_reached; details="overloaded""#;

fn proxy_status(h: &http::HeaderMap) -> &str {
    h.get("proxy-status")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

async fn slow_upstream(delay: Duration) -> Upstream {
    upstream(Proto::H1, move |_req: Request<Incoming>| async move {
        tokio::time::sleep(delay).await;
        resp(200, "slow ok")
    })
    .await
}

/// Fires `n` GETs at once; returns (status, headers, time to answer) of each.
async fn parallel_gets(url: &str, n: usize) -> Vec<(u16, http::HeaderMap, Duration)> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let (status, headers, _) = get(&url).await;
            (status, headers, start.elapsed())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_parallel_requests_are_shed_at_once() {
    let up = slow_upstream(Duration::from_millis(500)).await;
    let p = start_proxy(&one_route(
        up.addr,
        "        concurrency_limit:\n          max: 2",
    ))
    .await;
    let results = parallel_gets(&p.url("/"), 6).await;

    let ok: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let shed: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert_eq!(ok.len(), 2, "{results:?}");
    assert_eq!(shed.len(), 4, "{results:?}");
    for (_, headers, took) in &shed {
        assert_eq!(proxy_status(headers), OVERLOADED);
        assert!(
            *took < Duration::from_millis(200),
            "shed after {took:?}: not queued"
        );
    }
    for (_, _, took) in &ok {
        assert!(*took >= Duration::from_millis(500), "{took:?}");
    }
    assert_eq!(up.hits(), 2);

    let text = scrape(&p).await;
    assert_eq!(
        metric(&text, r#"breakwater_overloaded_total{route="r"}"#),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"breakwater_inflight_requests{route="r"}"#),
        Some(0.0),
        "{text}"
    );
    // slots are given back: the next request goes through
    assert_eq!(get(&p.url("/")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_is_visible_while_requests_run() {
    let up = slow_upstream(Duration::from_millis(400)).await;
    let p = start_proxy(&one_route(
        up.addr,
        "        concurrency_limit:\n          max: 5",
    ))
    .await;
    let url = p.url("/");
    let running = tokio::spawn(async move { parallel_gets(&url, 3).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = scrape(&p).await;
    assert_eq!(
        metric(&text, r#"breakwater_inflight_requests{route="r"}"#),
        Some(3.0),
        "{text}"
    );
    let (_, _, body) = get(&p.admin_url("/status")).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["routes"][0]["inflight"], 3, "{v}");
    let results = running.await.unwrap();
    assert!(results.iter().all(|r| r.0 == 200), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_concurrency_limit_lets_all_through_and_counts() {
    let up = slow_upstream(Duration::from_millis(300)).await;
    let p = start_proxy(&one_route(
        up.addr,
        "        concurrency_limit:\n          max: 2\n          mode: observe",
    ))
    .await;
    let results = parallel_gets(&p.url("/"), 6).await;
    assert!(results.iter().all(|r| r.0 == 200), "{results:?}");
    assert!(results.iter().all(|r| r.1.get("proxy-status").is_none()));
    assert_eq!(up.hits(), 6);
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_policy_observed_total{route="r",policy="concurrency_limit",would="reject"}"#
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"breakwater_overloaded_total{route="r"}"#).unwrap_or(0.0),
        0.0,
        "{text}"
    );
}

const DEGRADED_FALLBACK: &str = r#"        fallback:
          when: [upstream_unavailable]
          status: 200
          headers: { content-type: application/json, x-fallback: "yes" }
          body: '{"degraded":true}'"#;

#[tokio::test]
async fn fallback_body_replaces_upstream_unavailable() {
    let dead = closed_port().await;
    let p = start_proxy(&one_route(dead, DEGRADED_FALLBACK)).await;
    let (status, headers, body) = get(&p.url("/")).await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(&body[..], br#"{"degraded":true}"#);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-fallback"], "yes");
    assert_eq!(
        proxy_status(&headers),
        r#"breakwater; error=connection_refused; details="upstream_unavailable""#
    );
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_fallbacks_total{route="r",reason="upstream_unavailable"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_requests_total{listener="test",route="r",method="GET",status="200"}"#
        ),
        Some(1.0),
        "the client saw the fallback's status\n{text}"
    );
}

#[tokio::test]
async fn fallback_does_not_touch_healthy_answers_or_unlisted_reasons() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(up.addr, DEGRADED_FALLBACK)).await;
    let (status, headers, body) = get(&p.url("/x")).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"path=/x");
    assert!(headers.get("proxy-status").is_none());

    // upstream_5xx is not listed: an upstream 503 passes through
    let bad = upstream(Proto::H1, |_req: Request<Incoming>| async move {
        resp(503, "down")
    })
    .await;
    let p = start_proxy(&one_route(bad.addr, DEGRADED_FALLBACK)).await;
    let (status, _, body) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(&body[..], b"down");
}

#[tokio::test]
async fn fallback_body_file() {
    let path = std::env::temp_dir().join(format!(
        "breakwater-fallback-{}-{:?}.html",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, "<h1>we'll be right back</h1>\n").unwrap();
    let dead = closed_port().await;
    let p = start_proxy(&one_route(
        dead,
        &format!(
            "        fallback:
          when: [upstream_unavailable]
          status: 503
          headers: {{ content-type: text/html }}
          body_file: {}",
            path.display()
        ),
    ))
    .await;
    let (status, headers, body) = get(&p.url("/")).await;
    let _ = std::fs::remove_file(&path);
    assert_eq!(status, 503);
    assert_eq!(&body[..], b"<h1>we'll be right back</h1>\n");
    assert_eq!(headers["content-type"], "text/html");
    assert!(proxy_status(&headers).contains(r#"details="upstream_unavailable""#));
}

#[tokio::test]
async fn upstream_5xx_fallback_applies_only_after_retries_are_exhausted() {
    let up = upstream(Proto::H1, |_req: Request<Incoming>| async move {
        resp(503, "down")
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        r#"        retry:
          attempts: 3
          backoff: { base: 1ms, max: 2ms }
        fallback:
          when: [upstream_5xx]
          status: 200
          body: cached"#,
    ))
    .await;
    let (status, headers, body) = get(&p.url("/")).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"cached");
    assert_eq!(up.hits(), 3, "every attempt was made first");
    assert_eq!(
        proxy_status(&headers),
        r#"breakwater; received-status=503; details="upstream_5xx""#
    );
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_fallbacks_total{route="r",reason="upstream_5xx"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn upstream_5xx_fallback_is_not_used_when_a_retry_succeeds() {
    let n = Arc::new(AtomicUsize::new(0));
    let up = upstream(Proto::H1, move |_req: Request<Incoming>| {
        let first = n.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                resp(502, "bad gateway")
            } else {
                resp(200, "real")
            }
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        r#"        retry:
          attempts: 3
          backoff: { base: 1ms, max: 2ms }
        fallback:
          when: [upstream_5xx]
          status: 200
          body: cached"#,
    ))
    .await;
    let (status, headers, body) = get(&p.url("/")).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"real");
    assert!(headers.get("proxy-status").is_none());
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn circuit_open_fallback() {
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let up = upstream(Proto::H1, move |_req: Request<Incoming>| {
        let fail = f.load(Ordering::SeqCst);
        async move {
            if fail {
                resp(500, "boom")
            } else {
                resp(200, "ok")
            }
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        r#"        circuit_breaker:
          consecutive_failures: 1
          minimum_requests: 1000
          open_for: 30s
        fallback:
          when: [circuit_open]
          status: 200
          headers: { content-type: application/json }
          body: '{"from":"fallback"}'"#,
    ))
    .await;
    let (status, _, body) = get(&p.url("/")).await;
    assert_eq!(status, 500, "upstream 5xx is not a listed reason");
    assert_eq!(&body[..], b"boom");
    let (status, headers, body) = get(&p.url("/")).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], br#"{"from":"fallback"}"#);
    assert_eq!(
        proxy_status(&headers),
        r#"breakwater; error=destination_unavailable; details="circuit_open""#
    );
    assert_eq!(up.hits(), 1);
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_fallbacks_total{route="r",reason="circuit_open"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"breakwater_circuit_rejected_total{route="r"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn rate_limited_fallback() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(
        up.addr,
        r#"        rate_limit:
          rate: 1/m
          burst: 1
        fallback:
          when: [rate_limited]
          status: 503
          body: busy"#,
    ))
    .await;
    assert_eq!(get(&p.url("/")).await.0, 200);
    let (status, headers, body) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(&body[..], b"busy");
    assert_eq!(
        proxy_status(&headers),
        r#"breakwater; error=http_request_denied; details="rate_limited""#
    );
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_fallbacks_total{route="r",reason="rate_limited"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"breakwater_rate_limited_total{route="r"}"#),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_fallback() {
    let up = slow_upstream(Duration::from_millis(300)).await;
    let p = start_proxy(&one_route(
        up.addr,
        r#"        concurrency_limit:
          max: 1
        fallback:
          when: [overloaded]
          status: 200
          body: later"#,
    ))
    .await;
    let results = parallel_gets(&p.url("/"), 3).await;
    let shed: Vec<_> = results
        .iter()
        .filter(|r| proxy_status(&r.1).contains(r#"details="overloaded""#))
        .collect();
    assert_eq!(shed.len(), 2, "{results:?}");
    assert!(results.iter().all(|r| r.0 == 200), "{results:?}");
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_fallbacks_total{route="r",reason="overloaded"}"#
        ),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn timeout_fallback() {
    let up = slow_upstream(Duration::from_secs(3)).await;
    let p = start_proxy(&one_route(
        up.addr,
        r#"        timeout: 200ms
        fallback:
          when: [timeout]
          status: 200
          body: stale"#,
    ))
    .await;
    let start = Instant::now();
    let (status, headers, body) = get(&p.url("/")).await;
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"stale");
    assert_eq!(
        proxy_status(&headers),
        r#"breakwater; error=http_response_timeout; details="timeout""#
    );
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_fallbacks_total{route="r",reason="timeout"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_gives_its_slot_back() {
    let up = slow_upstream(Duration::from_millis(1500)).await;
    let p = start_proxy(&one_route(
        up.addr,
        "        concurrency_limit:\n          max: 1",
    ))
    .await;
    let gone = tokio::time::timeout(Duration::from_millis(150), get(&p.url("/"))).await;
    assert!(gone.is_err(), "the client gave up");
    // the proxy notices the closed connection and releases the slot
    let mut freed = false;
    for _ in 0..20 {
        let text = scrape(&p).await;
        if metric(&text, r#"breakwater_inflight_requests{route="r"}"#) == Some(0.0) {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(freed, "inflight never went back to 0");
    let routers = p.shared.routers.load();
    let limit = routers.route("r").unwrap().state.limit.clone().unwrap();
    assert_eq!(limit.inflight(), 0);
    let (_, _, body) = get(&p.admin_url("/status")).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["routes"][0]["inflight"], 0, "{v}");
}
