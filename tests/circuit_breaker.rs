//! The circuit breaker against real upstreams on loopback (SPEC sections 2, 3, 5, 6):
//! tripping on consecutive failures and on the failure rate, recovery through
//! half-open, observe mode, `/status`, the admin overrides, metrics, and the
//! interplay with retries.
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::Incoming;
use serde_json::Value;
use support::*;

const CIRCUIT_OPEN: &str = r#"breakwater; error=destination_unavailable; details="circuit_open""#;

/// An upstream answering `code` while `failing` is set, else 200.
async fn switchable(failing: Arc<AtomicBool>, code: u16) -> Upstream {
    upstream(Proto::H1, move |_req: Request<Incoming>| {
        let fail = failing.load(Ordering::SeqCst);
        async move {
            if fail {
                resp(code, "bad")
            } else {
                resp(200, "ok")
            }
        }
    })
    .await
}

fn proxy_status(h: &http::HeaderMap) -> &str {
    h.get("proxy-status")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

async fn admin_post(p: &Proxy, path: &str) -> (u16, Value) {
    let (status, _, body) = send(Request::post(p.admin_url(path)).body(full("")).unwrap()).await;
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, v)
}

/// The `/status` entry of route `name`.
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

fn breaker(extra: &str) -> String {
    format!("        circuit_breaker:\n{extra}")
}

#[tokio::test]
async fn opens_after_consecutive_failures_then_recovers_through_half_open() {
    let failing = Arc::new(AtomicBool::new(true));
    let up = switchable(failing.clone(), 500).await;
    let p = start_proxy(&one_route(
        up.addr,
        &breaker(
            "          consecutive_failures: 3
          minimum_requests: 1000
          open_for: 300ms
          half_open_requests: 1",
        ),
    ))
    .await;

    for _ in 0..3 {
        let (status, headers, _) = get(&p.url("/")).await;
        assert_eq!(status, 500, "failures pass through while closed");
        assert!(headers.get("proxy-status").is_none());
    }
    assert_eq!(up.hits(), 3);

    for _ in 0..5 {
        let start = Instant::now();
        let (status, headers, _) = get(&p.url("/")).await;
        assert_eq!(status, 503);
        assert_eq!(proxy_status(&headers), CIRCUIT_OPEN);
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(200),
            "refusals are immediate: {took:?}"
        );
    }
    assert_eq!(
        up.hits(),
        3,
        "an open breaker keeps traffic off the upstream"
    );

    let text = scrape(&p).await;
    assert_eq!(
        metric(&text, r#"breakwater_circuit_state{route="r"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"breakwater_circuit_transitions_total{route="r",from="closed",to="open"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"breakwater_circuit_rejected_total{route="r"}"#),
        Some(5.0),
        "{text}"
    );

    // The upstream heals; after open_for one probe is let through and closes the breaker.
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (status, _, body) = get(&p.url("/")).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"ok");
    assert_eq!(up.hits(), 4);
    assert_eq!(route_status(&p, "r").await["circuit"]["state"], "closed");
    for _ in 0..3 {
        assert_eq!(get(&p.url("/")).await.0, 200);
    }
    assert_eq!(up.hits(), 7);

    let text = scrape(&p).await;
    assert_eq!(
        metric(&text, r#"breakwater_circuit_state{route="r"}"#),
        Some(0.0),
        "{text}"
    );
    for (from, to) in [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ] {
        let series =
            format!(r#"breakwater_circuit_transitions_total{{route="r",from="{from}",to="{to}"}}"#);
        assert_eq!(metric(&text, &series), Some(1.0), "{series}\n{text}");
    }
}

#[tokio::test]
async fn a_failed_probe_opens_the_breaker_again() {
    let failing = Arc::new(AtomicBool::new(true));
    let up = switchable(failing.clone(), 502).await;
    let p = start_proxy(&one_route(
        up.addr,
        &breaker(
            "          consecutive_failures: 2
          minimum_requests: 1000
          open_for: 200ms
          half_open_requests: 1",
        ),
    ))
    .await;
    for _ in 0..2 {
        assert_eq!(get(&p.url("/")).await.0, 502);
    }
    assert_eq!(get(&p.url("/")).await.0, 503);
    tokio::time::sleep(Duration::from_millis(250)).await;
    // the probe still fails: back to open, and the next call is refused at once
    assert_eq!(get(&p.url("/")).await.0, 502);
    assert_eq!(up.hits(), 3);
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(proxy_status(&headers), CIRCUIT_OPEN);
    assert_eq!(up.hits(), 3);

    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_circuit_transitions_total{route="r",from="half_open",to="open"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"breakwater_circuit_state{route="r"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn half_open_needs_every_probe_to_succeed() {
    let failing = Arc::new(AtomicBool::new(true));
    let up = switchable(failing.clone(), 500).await;
    let p = start_proxy(&one_route(
        up.addr,
        &breaker(
            "          consecutive_failures: 1
          minimum_requests: 1000
          open_for: 200ms
          half_open_requests: 3",
        ),
    ))
    .await;
    assert_eq!(get(&p.url("/")).await.0, 500);
    assert_eq!(get(&p.url("/")).await.0, 503);
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(250)).await;
    for i in 0..3 {
        assert_eq!(get(&p.url("/")).await.0, 200, "probe {i}");
        let state = route_status(&p, "r").await["circuit"]["state"].clone();
        let want = if i < 2 { "half_open" } else { "closed" };
        assert_eq!(state, want, "after probe {i}");
    }
}

#[tokio::test]
async fn failure_rate_trips_only_once_minimum_requests_were_seen() {
    let failing = Arc::new(AtomicBool::new(true));
    let up = switchable(failing.clone(), 503).await;
    let p = start_proxy(&one_route(
        up.addr,
        &breaker(
            "          failure_rate: 50%
          window: 10s
          minimum_requests: 10
          open_for: 30s",
        ),
    ))
    .await;
    // every call fails, but below minimum_requests the breaker stays closed
    for i in 0..9 {
        let (status, _, _) = get(&p.url("/")).await;
        assert_eq!(status, 503);
        assert_eq!(up.hits(), i + 1);
    }
    let st = route_status(&p, "r").await;
    assert_eq!(st["circuit"]["state"], "closed", "{st}");
    assert_eq!(st["circuit"]["requests_in_window"], 9, "{st}");
    assert_eq!(st["circuit"]["failures_in_window"], 9, "{st}");
    // the tenth failure reaches the minimum at a 100% failure rate
    assert_eq!(get(&p.url("/")).await.0, 503);
    assert_eq!(up.hits(), 10);
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(proxy_status(&headers), CIRCUIT_OPEN);
    assert_eq!(up.hits(), 10);
}

#[tokio::test]
async fn failure_rate_below_the_threshold_does_not_trip() {
    // one call in four fails: 25% < 50%
    let n = Arc::new(AtomicUsize::new(0));
    let up = upstream(Proto::H1, move |_req: Request<Incoming>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            if i % 4 == 0 {
                resp(500, "bad")
            } else {
                resp(200, "ok")
            }
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        &breaker(
            "          failure_rate: 50%
          minimum_requests: 5
          open_for: 30s",
        ),
    ))
    .await;
    for _ in 0..40 {
        let (status, headers, _) = get(&p.url("/")).await;
        assert_ne!(proxy_status(&headers), CIRCUIT_OPEN);
        assert!(status == 200 || status == 500);
    }
    assert_eq!(up.hits(), 40);
    let st = route_status(&p, "r").await;
    assert_eq!(st["circuit"]["state"], "closed", "{st}");
}

#[tokio::test]
async fn observe_mode_lets_everything_through_and_counts() {
    let failing = Arc::new(AtomicBool::new(true));
    let up = switchable(failing.clone(), 500).await;
    let p = start_proxy(&one_route(
        up.addr,
        &breaker(
            "          consecutive_failures: 2
          minimum_requests: 1000
          open_for: 30s
          mode: observe",
        ),
    ))
    .await;
    for _ in 0..6 {
        let (status, headers, _) = get(&p.url("/")).await;
        assert_eq!(status, 500, "{headers:?}");
        assert!(headers.get("proxy-status").is_none());
    }
    assert_eq!(up.hits(), 6);
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_policy_observed_total{route="r",policy="circuit_breaker",would="reject"}"#
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"breakwater_circuit_rejected_total{route="r"}"#).unwrap_or(0.0),
        0.0,
        "observed refusals are not rejections\n{text}"
    );
}

#[tokio::test]
async fn status_shows_the_open_circuit_and_its_counts() {
    let failing = Arc::new(AtomicBool::new(true));
    let up = switchable(failing.clone(), 500).await;
    let p = start_proxy(&one_route(
        up.addr,
        &breaker(
            "          consecutive_failures: 3
          minimum_requests: 1000
          open_for: 30s",
        ),
    ))
    .await;
    let st = route_status(&p, "r").await;
    assert_eq!(st["circuit"]["state"], "closed", "{st}");
    assert_eq!(st["rate_limit"], Value::Null, "{st}");
    for _ in 0..5 {
        get(&p.url("/")).await;
    }
    let st = route_status(&p, "r").await;
    assert_eq!(st["listener"], "test", "{st}");
    assert_eq!(st["upstream"], "up", "{st}");
    assert_eq!(st["circuit"]["state"], "open", "{st}");
    assert_eq!(st["circuit"]["failures_in_window"], 3, "{st}");
    assert_eq!(st["circuit"]["requests_in_window"], 3, "{st}");
    assert_eq!(st["requests"], 5, "{st}");
    assert_eq!(st["errors"], 5, "{st}");
    assert_eq!(st["inflight"], 0, "{st}");

    // a route without a breaker shows null
    let up2 = echo_upstream().await;
    let p2 = start_proxy(&one_route(up2.addr, "")).await;
    assert_eq!(route_status(&p2, "r").await["circuit"], Value::Null);
}

#[tokio::test]
async fn admin_can_force_open_force_closed_and_return_to_auto() {
    let failing = Arc::new(AtomicBool::new(false));
    let up = switchable(failing.clone(), 500).await;
    let p = start_proxy(&one_route(
        up.addr,
        &breaker(
            "          consecutive_failures: 1
          minimum_requests: 1000
          open_for: 30s",
        ),
    ))
    .await;
    assert_eq!(get(&p.url("/")).await.0, 200);

    let (status, v) = admin_post(&p, "/circuit/r/force-open").await;
    assert_eq!(status, 200);
    assert_eq!(v["state"], "forced_open", "{v}");
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(proxy_status(&headers), CIRCUIT_OPEN);
    assert_eq!(up.hits(), 1);
    assert_eq!(
        route_status(&p, "r").await["circuit"]["state"],
        "forced_open"
    );
    let text = scrape(&p).await;
    assert_eq!(
        metric(&text, r#"breakwater_circuit_state{route="r"}"#),
        Some(3.0),
        "{text}"
    );

    // forced closed: failures never trip it
    let (status, v) = admin_post(&p, "/circuit/r/force-closed").await;
    assert_eq!(status, 200);
    assert_eq!(v["state"], "forced_closed", "{v}");
    failing.store(true, Ordering::SeqCst);
    for _ in 0..4 {
        assert_eq!(get(&p.url("/")).await.0, 500);
    }
    assert_eq!(up.hits(), 5);
    let st = route_status(&p, "r").await;
    assert_eq!(st["circuit"]["state"], "forced_closed", "{st}");
    let text = scrape(&p).await;
    assert_eq!(
        metric(&text, r#"breakwater_circuit_state{route="r"}"#),
        Some(4.0),
        "{text}"
    );

    // auto: closed again, and back to normal tripping
    failing.store(false, Ordering::SeqCst);
    let (status, v) = admin_post(&p, "/circuit/r/auto").await;
    assert_eq!(status, 200);
    assert_eq!(v["state"], "closed", "{v}");
    assert_eq!(get(&p.url("/")).await.0, 200);
    failing.store(true, Ordering::SeqCst);
    assert_eq!(get(&p.url("/")).await.0, 500);
    assert_eq!(get(&p.url("/")).await.0, 503);
    let text = scrape(&p).await;
    assert_eq!(
        metric(&text, r#"breakwater_circuit_state{route="r"}"#),
        Some(1.0),
        "{text}"
    );
    for (from, to) in [
        ("closed", "forced_open"),
        ("forced_open", "forced_closed"),
        ("forced_closed", "closed"),
        ("closed", "open"),
    ] {
        let series =
            format!(r#"breakwater_circuit_transitions_total{{route="r",from="{from}",to="{to}"}}"#);
        assert_eq!(metric(&text, &series), Some(1.0), "{series}\n{text}");
    }
}

#[tokio::test]
async fn admin_circuit_errors() {
    let up = echo_upstream().await;
    let yaml = one_route(up.addr, &breaker("          consecutive_failures: 1"));
    let p = start_proxy(&yaml).await;
    assert_eq!(admin_post(&p, "/circuit/nope/force-open").await.0, 404);
    assert_eq!(admin_post(&p, "/circuit/r/explode").await.0, 400);
    let (status, _, _) = get(&p.admin_url("/circuit/r/force-open")).await;
    assert_eq!(status, 405, "GET does not change state");
    assert_eq!(get(&p.url("/")).await.0, 200);

    let p2 = start_proxy(&one_route(up.addr, "")).await;
    assert_eq!(
        admin_post(&p2, "/circuit/r/force-open").await.0,
        404,
        "a route without a breaker"
    );
}

#[tokio::test]
async fn an_open_breaker_stops_retries_at_once() {
    let failing = Arc::new(AtomicBool::new(true));
    let up = switchable(failing.clone(), 503).await;
    let p = start_proxy(&one_route(
        up.addr,
        "        retry:
          attempts: 5
          backoff: { base: 5ms, max: 10ms }
        circuit_breaker:
          consecutive_failures: 2
          minimum_requests: 1000
          open_for: 30s",
    ))
    .await;
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(
        up.hits(),
        2,
        "the breaker opened after two attempts and stopped the rest"
    );
    assert_eq!(proxy_status(&headers), CIRCUIT_OPEN);

    // the next request does not reach the upstream at all
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(proxy_status(&headers), CIRCUIT_OPEN);
    assert_eq!(up.hits(), 2);

    let text = scrape(&p).await;
    // The third attempt of the first request and the second request were refused by the
    // breaker; the refusal itself ended the retries.
    assert_eq!(
        metric(&text, r#"breakwater_circuit_rejected_total{route="r"}"#),
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
}

#[tokio::test]
async fn connect_failures_trip_the_breaker() {
    let dead = closed_port().await;
    let p = start_proxy(&one_route(
        dead,
        "        circuit_breaker:
          consecutive_failures: 2
          minimum_requests: 1000
          open_for: 30s",
    ))
    .await;
    for _ in 0..2 {
        let (status, headers, _) = get(&p.url("/")).await;
        assert_eq!(status, 502);
        assert!(
            proxy_status(&headers).contains("upstream_unavailable"),
            "{headers:?}"
        );
    }
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(proxy_status(&headers), CIRCUIT_OPEN);
}

#[tokio::test]
async fn slow_calls_trip_the_breaker() {
    let up = upstream(Proto::H1, |_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_millis(120)).await;
        resp(200, "slow")
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        "        circuit_breaker:
          minimum_requests: 3
          slow_call: { duration: 100ms, rate: 80% }
          open_for: 30s",
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(get(&p.url("/")).await.0, 200);
    }
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 503);
    assert_eq!(proxy_status(&headers), CIRCUIT_OPEN);
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn failures_not_listed_in_failure_on_do_not_count() {
    let failing = Arc::new(AtomicBool::new(true));
    let up = switchable(failing.clone(), 500).await;
    let p = start_proxy(&one_route(
        up.addr,
        "        circuit_breaker:
          consecutive_failures: 2
          minimum_requests: 1000
          failure_on: [connect-failure, 503]
          open_for: 30s",
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(get(&p.url("/")).await.0, 500);
    }
    assert_eq!(up.hits(), 5);
    assert_eq!(route_status(&p, "r").await["circuit"]["state"], "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_probe_does_not_wedge_the_breaker() {
    let stall = Arc::new(AtomicBool::new(false));
    let failing = Arc::new(AtomicBool::new(true));
    let (s, f) = (stall.clone(), failing.clone());
    let up = upstream(Proto::H1, move |_req: Request<Incoming>| {
        let (stall, fail) = (s.load(Ordering::SeqCst), f.load(Ordering::SeqCst));
        async move {
            if stall {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            if fail {
                resp(500, "bad")
            } else {
                resp(200, "ok")
            }
        }
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        &breaker(
            "          consecutive_failures: 1
          minimum_requests: 1000
          open_for: 200ms
          half_open_requests: 1",
        ),
    ))
    .await;
    assert_eq!(get(&p.url("/")).await.0, 500);
    assert_eq!(get(&p.url("/")).await.0, 503);
    tokio::time::sleep(Duration::from_millis(250)).await;
    // the probe stalls and its client gives up
    stall.store(true, Ordering::SeqCst);
    failing.store(false, Ordering::SeqCst);
    let gone = tokio::time::timeout(Duration::from_millis(150), get(&p.url("/"))).await;
    assert!(gone.is_err());
    stall.store(false, Ordering::SeqCst);
    // within a bounded time a new probe is admitted and closes the breaker
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut closed = false;
    while Instant::now() < deadline {
        if get(&p.url("/")).await.0 == 200 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed, "the breaker stayed wedged after an abandoned probe");
    assert_eq!(route_status(&p, "r").await["circuit"]["state"], "closed");
}

#[tokio::test]
async fn a_call_cut_by_the_request_deadline_counts_as_a_timeout_failure() {
    let up = upstream(Proto::H1, |_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        resp(200, "late")
    })
    .await;
    let p = start_proxy(&one_route(
        up.addr,
        "        timeout: 150ms
        circuit_breaker:
          consecutive_failures: 2
          minimum_requests: 1000
          open_for: 30s",
    ))
    .await;
    for _ in 0..2 {
        let (status, headers, _) = get(&p.url("/")).await;
        assert_eq!(status, 504);
        assert!(proxy_status(&headers).contains(r#"details="timeout""#));
    }
    let (status, headers, _) = get(&p.url("/")).await;
    assert_eq!(status, 503, "{headers:?}");
    assert_eq!(proxy_status(&headers), CIRCUIT_OPEN);
    assert_eq!(up.hits(), 2);
}
