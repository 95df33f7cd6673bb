//! The rate limiter through the real proxy (SPEC sections 2, 3, 5, 6): 429s with
//! `Retry-After` and the RateLimit fields, refill, keyed buckets, bounded memory under
//! many keys, observe mode, metrics and `/status`.
mod support;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use support::*;

const RATE_LIMITED: &str = r#"breakwater; error=http_request_denied; details="rate_limited""#;

fn proxy_status(h: &http::HeaderMap) -> &str {
    h.get("proxy-status")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

fn header<'a>(h: &'a http::HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .unwrap_or_else(|| panic!("no {name} in {h:?}"))
        .to_str()
        .unwrap()
}

/// The integer parameter `key` of a structured-field item like `"default";q=3;w=60`.
fn sf_param(v: &str, key: &str) -> u64 {
    v.split(';')
        .skip(1)
        .find_map(|p| p.trim().strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {v:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {v:?}: {e}"))
}

fn limit(extra: &str) -> String {
    format!("        rate_limit:\n{extra}")
}

async fn get_with(url: &str, key: Option<&str>) -> (u16, http::HeaderMap) {
    let mut b = Request::get(url);
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    let (status, headers, _) = send(b.body(full("")).unwrap()).await;
    (status, headers)
}

async fn route_status(p: &Proxy, name: &str) -> Value {
    let (status, _, body) = get(&p.admin_url("/status")).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no route {name} in {v}"))
}

#[tokio::test]
async fn spent_burst_gives_429_with_retry_after_and_ratelimit_fields() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(
        up.addr,
        &limit("          rate: 1/m\n          burst: 3"),
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(get(&p.url("/")).await.0, 200);
    }
    let start = Instant::now();
    let (status, headers, body) = get(&p.url("/")).await;
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "refused at once, never queued"
    );
    assert_eq!(status, 429, "{headers:?}");
    assert!(!body.is_empty());
    assert_eq!(proxy_status(&headers), RATE_LIMITED);

    let retry_after: u64 = header(&headers, "retry-after")
        .parse()
        .expect("Retry-After is whole seconds");
    assert!(retry_after >= 1, "{retry_after}");
    // one token a minute
    assert!((59..=60).contains(&retry_after), "{retry_after}");

    let policy = header(&headers, "ratelimit-policy");
    assert!(policy.starts_with('"'), "{policy}");
    assert_eq!(sf_param(policy, "q"), 3, "{policy}");
    assert!(sf_param(policy, "w") >= 1, "{policy}");
    let rl = header(&headers, "ratelimit");
    assert_eq!(sf_param(rl, "r"), 0, "{rl}");
    assert_eq!(sf_param(rl, "t"), retry_after, "{rl}");

    assert_eq!(up.hits(), 3, "refused requests never reach the upstream");
    let text = scrape(&p).await;
    assert_eq!(
        metric(&text, r#"breakwater_rate_limited_total{route="r"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_requests_total{listener="test",route="r",method="GET",status="429"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn bucket_refills_after_waiting() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(
        up.addr,
        &limit("          rate: 5/s\n          burst: 1"),
    ))
    .await;
    assert_eq!(get(&p.url("/")).await.0, 200);
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 429);
    assert_eq!(
        header(&headers, "retry-after"),
        "1",
        "200 ms rounds up to 1 s"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(get(&p.url("/")).await.0, 200, "one token came back");
    assert_eq!(get(&p.url("/")).await.0, 429);
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn default_burst_is_one_second_of_tokens() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(up.addr, &limit("          rate: 4/s"))).await;
    let mut ok = 0;
    for _ in 0..8 {
        if get(&p.url("/")).await.0 == 200 {
            ok += 1;
        }
    }
    // 4 from the burst, at most one more refilled while the loop ran
    assert!((4..=5).contains(&ok), "{ok}");
    assert_eq!(route_status(&p, "r").await["rate_limit"]["burst"], 4);
}

#[tokio::test]
async fn header_keys_get_independent_buckets_and_absent_header_uses_client_ip() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(
        up.addr,
        &limit("          rate: 1/m\n          burst: 2\n          key: header:x-api-key"),
    ))
    .await;
    let url = p.url("/");
    for _ in 0..2 {
        assert_eq!(get_with(&url, Some("A")).await.0, 200);
    }
    let (status, headers) = get_with(&url, Some("A")).await;
    assert_eq!(status, 429);
    assert_eq!(proxy_status(&headers), RATE_LIMITED);

    // key B has its own bucket
    assert_eq!(get_with(&url, Some("B")).await.0, 200);
    assert_eq!(get_with(&url, Some("B")).await.0, 200);
    assert_eq!(get_with(&url, Some("B")).await.0, 429);

    // no header: this client's IP (127.0.0.1) is the key
    assert_eq!(get_with(&url, None).await.0, 200);
    assert_eq!(get_with(&url, None).await.0, 200);
    assert_eq!(get_with(&url, None).await.0, 429);
    assert_eq!(
        get_with(&url, Some("C")).await.0,
        200,
        "other keys unaffected"
    );

    // another client address without the header has its own bucket
    let mut conn = HttpConnector::new();
    conn.set_local_address(Some("127.0.0.2".parse::<IpAddr>().unwrap()));
    let other: Client<_, UpBody> = Client::builder(TokioExecutor::new()).build(conn);
    let status_from_other = |c: Client<HttpConnector, UpBody>, url: String| async move {
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            c.request(Request::get(url).body(full("")).unwrap()),
        )
        .await
        .expect("timed out")
        .expect("request from 127.0.0.2 failed");
        res.status().as_u16()
    };
    assert_eq!(status_from_other(other.clone(), url.clone()).await, 200);
    assert_eq!(status_from_other(other.clone(), url.clone()).await, 200);
    assert_eq!(status_from_other(other, url.clone()).await, 429);

    let st = route_status(&p, "r").await;
    assert_eq!(
        st["rate_limit"]["tokens"],
        Value::Null,
        "keyed: no single level {st}"
    );
    assert_eq!(st["rate_limit"]["burst"], 2, "{st}");
}

#[tokio::test]
async fn client_ip_key() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(
        up.addr,
        &limit("          rate: 1/m\n          burst: 1\n          key: client_ip"),
    ))
    .await;
    // a header does not change the key
    assert_eq!(get_with(&p.url("/"), Some("A")).await.0, 200);
    assert_eq!(get_with(&p.url("/"), Some("B")).await.0, 429);
    let routers = p.shared.routers.load();
    let limiter = routers.route("r").unwrap().state.limiter.clone().unwrap();
    assert_eq!(limiter.key_count(), 1);
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_leave_memory_bounded() {
    const KEYS: usize = 10_000;
    const WORKERS: usize = 32;
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(
        up.addr,
        &limit("          rate: 1000/s\n          burst: 10\n          key: header:x-api-key"),
    ))
    .await;
    let limiter = p
        .shared
        .routers
        .load()
        .route("r")
        .unwrap()
        .state
        .limiter
        .clone()
        .unwrap();
    // warm up the connection machinery before measuring
    assert_eq!(get_with(&p.url("/"), Some("warm")).await.0, 200);
    let before = rss_bytes();

    let client = h1_client();
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let url = p.url("/");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (client, next, ok, url) = (client.clone(), next.clone(), ok.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= KEYS {
                    break;
                }
                let req = Request::get(&url)
                    .header("x-api-key", format!("key-{i:05}-{}", "x".repeat(32)))
                    .body(full(""))
                    .unwrap();
                let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                    .await
                    .expect("timed out")
                    .expect("request failed");
                if res.status() == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = start.elapsed();
    let after = rss_bytes();

    assert_eq!(
        ok.load(Ordering::Relaxed),
        KEYS,
        "each new key has a full bucket"
    );
    let keys = limiter.key_count();
    assert!(keys <= 100_001, "{keys} keys tracked");
    assert!(
        keys <= KEYS + 1,
        "{keys} keys tracked for {KEYS} distinct keys"
    );
    let grew = after.saturating_sub(before);
    assert!(
        grew < 64 * 1024 * 1024,
        "RSS grew by {} MiB ({before} -> {after}) over {KEYS} keys in {took:?}",
        grew / (1024 * 1024)
    );
}

#[tokio::test]
async fn observe_mode_lets_traffic_through_and_counts() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(
        up.addr,
        &limit("          rate: 1/m\n          burst: 1\n          mode: observe"),
    ))
    .await;
    for _ in 0..5 {
        let (status, headers, _) = get(&p.url("/")).await;
        assert_eq!(status, 200);
        assert!(headers.get("proxy-status").is_none());
        assert!(headers.get("retry-after").is_none());
    }
    assert_eq!(up.hits(), 5);
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_policy_observed_total{route="r",policy="rate_limit",would="reject"}"#
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"breakwater_rate_limited_total{route="r"}"#).unwrap_or(0.0),
        0.0,
        "observed refusals are not counted as rate limited\n{text}"
    );
}

#[tokio::test]
async fn status_shows_the_global_bucket() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(
        up.addr,
        &limit("          rate: 1/m\n          burst: 5"),
    ))
    .await;
    let st = route_status(&p, "r").await;
    assert_eq!(st["rate_limit"]["tokens"], 5, "{st}");
    assert_eq!(st["rate_limit"]["burst"], 5, "{st}");
    assert_eq!(st["circuit"], Value::Null, "{st}");
    get(&p.url("/")).await;
    get(&p.url("/")).await;
    let st = route_status(&p, "r").await;
    assert_eq!(st["rate_limit"]["tokens"], 3, "{st}");
    for _ in 0..5 {
        get(&p.url("/")).await;
    }
    let st = route_status(&p, "r").await;
    assert_eq!(st["rate_limit"]["tokens"], 0, "{st}");
}

#[tokio::test]
async fn rate_limited_requests_never_touch_the_retry_budget_or_the_upstream() {
    let up = upstream(
        Proto::H1,
        |_req: Request<hyper::body::Incoming>| async move { resp(503, "down") },
    )
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        "        retry:
          attempts: 2
          backoff: { base: 1ms, max: 2ms }
        rate_limit:
          rate: 1/m
          burst: 1",
    ))
    .await;
    assert_eq!(get(&p.url("/")).await.0, 503);
    assert_eq!(up.hits(), 2);
    for _ in 0..5 {
        assert_eq!(get(&p.url("/")).await.0, 429);
    }
    assert_eq!(up.hits(), 2);
    let text = scrape(&p).await;
    assert_eq!(
        metric(&text, r#"breakwater_rate_limited_total{route="r"}"#),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_retries_total{route="r",reason="gateway-error"}"#
        ),
        Some(1.0),
        "{text}"
    );
}
