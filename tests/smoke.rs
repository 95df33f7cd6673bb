//! The harness itself: an upstream, the proxy in front, one request through.
mod support;
use support::*;

#[tokio::test]
async fn a_request_goes_through() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let (status, headers, body) = get(&p.url("/hello?x=1")).await;
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(&body[..], b"path=/hello?x=1");
    assert_eq!(up.hits(), 1);
}
