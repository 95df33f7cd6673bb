//! Lifecycle (SPEC sections 5 and 7): graceful drain, drain timeout, slow or broken
//! clients, idle connections, the admin endpoints and reloading the config file.
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::Incoming;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An upstream that answers `ok` at once, and after `stall` for paths starting with /slow.
async fn stalling_upstream(stall: Duration) -> Upstream {
    upstream(Proto::H1, move |req: Request<Incoming>| async move {
        if req.uri().path().starts_with("/slow") {
            tokio::time::sleep(stall).await;
        }
        resp(200, "ok")
    })
    .await
}

/// Waits (bounded) until `cond` holds.
async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body from a raw stream.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut tmp))
            .await
            .expect("response timed out")
            .expect("read failed");
        assert!(
            n > 0,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What the proxy did with a raw connection after a bad request.
#[derive(Debug)]
enum Outcome {
    /// It answered; the first bytes.
    Answered(String),
    /// It closed (or reset) the connection without an answer.
    Closed,
}

async fn outcome(stream: &mut TcpStream) -> Outcome {
    let mut buf = vec![0u8; 1024];
    let o = match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
        Err(_) => panic!("the proxy neither answered nor closed within 3s"),
        Ok(Ok(0)) | Ok(Err(_)) => Outcome::Closed,
        Ok(Ok(n)) => Outcome::Answered(String::from_utf8_lossy(&buf[..n]).into_owned()),
    };
    eprintln!("bad request outcome: {o:?}");
    o
}

/// A GET that reports a refused connection instead of panicking.
async fn try_get(url: &str) -> Option<u16> {
    let req = Request::get(url).body(full("")).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(3), h1_client().request(req))
        .await
        .ok()?
        .ok()?;
    Some(res.status().as_u16())
}

async fn post(url: &str) -> (u16, http::HeaderMap, bytes::Bytes) {
    send(Request::post(url).body(full("")).unwrap()).await
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_finishes_in_flight_requests() {
    let up = stalling_upstream(Duration::from_millis(500)).await;
    let yaml = format!(
        "{}shutdown:\n  drain_delay: 300ms\n  drain_timeout: 5s\n",
        one_route(up.addr, "")
    );
    let mut p = start_proxy(&yaml).await;
    let addr = p.addrs[0];
    let (status, _, _) = get(&p.admin_url("/readyz")).await;
    assert_eq!(status, 200);

    // an idle keep-alive connection that has served one request
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut idle).await.starts_with("HTTP/1.1 200"));

    let url = p.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    wait_until(
        "the request to reach the upstream",
        Duration::from_secs(3),
        || up.hits() >= 2,
    )
    .await;

    let started = Instant::now();
    let run = p.begin_shutdown();
    // within the drain delay: not ready, but still accepting
    // (the run task sees the signal asynchronously, so poll briefly)
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (status, _, body) = get(&p.admin_url("/readyz")).await;
        if status == 503 {
            break;
        }
        assert_eq!(status, 200, "{body:?}");
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fast = try_get(&p.url("/fast")).await;
    // only meaningful if it was answered inside the delay (a loaded machine may be slower)
    if started.elapsed() < Duration::from_millis(280) {
        assert_eq!(
            fast,
            Some(200),
            "new connections are accepted during drain_delay"
        );
    }

    let (status, _, body) = tokio::time::timeout(Duration::from_secs(3), in_flight)
        .await
        .expect("in-flight request never finished")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"ok");

    // the idle connection is closed by the drain
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut b))
        .await
        .expect("idle keep-alive connection left open during the drain")
        .unwrap_or(0);
    assert_eq!(n, 0);

    let result = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("run did not finish")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "stopped before drain_delay"
    );
    // nothing listens any more
    let connect = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await;
    assert!(
        matches!(connect, Ok(Err(_))),
        "a connection was accepted after shutdown: {connect:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_the_wait() {
    let up = stalling_upstream(Duration::from_secs(10)).await;
    let yaml = format!(
        "{}shutdown:\n  drain_delay: 0s\n  drain_timeout: 300ms\n",
        one_route(up.addr, "        timeout: 30s")
    );
    let mut p = start_proxy(&yaml).await;
    let url = p.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    wait_until(
        "the request to reach the upstream",
        Duration::from_secs(3),
        || up.hits() >= 1,
    )
    .await;
    let started = Instant::now();
    let run = p.begin_shutdown();
    let result = tokio::time::timeout(Duration::from_secs(3), run)
        .await
        .expect("run task still waiting after 3s despite drain_timeout 300ms")
        .unwrap();
    let took = started.elapsed();
    assert!(result.is_ok(), "{result:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        took >= Duration::from_millis(250),
        "did not wait for the in-flight request at all: {took:?}"
    );
    in_flight.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_requests_do_not_disturb_others() {
    let up = echo_upstream().await;
    let yaml = one_route(up.addr, "").replace(
        "    address: 127.0.0.1:0\n    routes:",
        "    address: 127.0.0.1:0\n    max_header_bytes: 16KiB\n    routes:",
    );
    assert!(yaml.contains("max_header_bytes"));
    let p = start_proxy(&yaml).await;
    let (status, _, _) = get(&p.url("/before")).await;
    assert_eq!(status, 200);

    // garbage
    let mut s = TcpStream::connect(p.addrs[0]).await.unwrap();
    s.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
    match outcome(&mut s).await {
        Outcome::Answered(text) => {
            assert!(text.starts_with("HTTP/1.1 400"), "{text:?}")
        }
        Outcome::Closed => {}
    }

    // a 100 KiB header with a 16 KiB limit
    let mut s = TcpStream::connect(p.addrs[0]).await.unwrap();
    let mut req = b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 100 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    // the proxy may stop reading (and close) before all of it is written
    let _ = tokio::time::timeout(Duration::from_secs(3), s.write_all(&req)).await;
    match outcome(&mut s).await {
        Outcome::Answered(text) => assert!(
            text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"),
            "{text:?}"
        ),
        Outcome::Closed => {}
    }

    // a header just under the limit is fine
    let mut s = TcpStream::connect(p.addrs[0]).await.unwrap();
    let mut req = b"GET /medium HTTP/1.1\r\nHost: x\r\nX-Medium: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 8 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let text = read_response(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");

    let (status, _, body) = get(&p.url("/after")).await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"path=/after");
    assert_eq!(up.hits(), 3, "bad requests never reach the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let up = stalling_upstream(Duration::from_millis(600)).await;
    let yaml = one_route(up.addr, "").replace(
        "    address: 127.0.0.1:0\n    routes:",
        "    address: 127.0.0.1:0\n    idle_timeout: 300ms\n    routes:",
    );
    assert!(yaml.contains("idle_timeout"));
    let p = start_proxy(&yaml).await;

    let mut s = TcpStream::connect(p.addrs[0]).await.unwrap();
    s.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let text = read_response(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    let idle_since = Instant::now();
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_millis(1500), s.read(&mut b))
        .await
        .expect("idle connection still open after 1.5s with idle_timeout 300ms")
        .unwrap_or(0);
    assert_eq!(n, 0, "unexpected bytes: {:?}", &b[..n]);
    let idle_for = idle_since.elapsed();
    assert!(
        idle_for >= Duration::from_millis(200),
        "closed too early: {idle_for:?}"
    );

    // a request that takes longer than idle_timeout is not cut off
    let mut s = TcpStream::connect(p.addrs[0]).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let text = read_response(&mut s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
}

#[tokio::test]
async fn admin_endpoints() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(up.addr, "")).await;

    let (status, _, _) = get(&p.admin_url("/healthz")).await;
    assert_eq!(status, 200);
    let (status, _, _) = get(&p.admin_url("/readyz")).await;
    assert_eq!(status, 200);

    let (status, headers, body) = get(&p.admin_url("/config")).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let text = String::from_utf8_lossy(&body).into_owned();
    let cfg = json(&body);
    let listener = &cfg["listeners"][0];
    assert_eq!(listener["name"], "test", "{text}");
    assert_eq!(listener["address"], "127.0.0.1:0", "{text}");
    assert_eq!(listener["routes"][0]["name"], "r", "{text}");
    assert!(cfg["upstreams"]["up"].is_object(), "{text}");
    assert!(
        !text.contains("<redacted>"),
        "nothing to redact here: {text}"
    );

    // the one secret the schema has is redacted when serialised
    let tls = breakwater::config::TlsServerConfig {
        cert: "/etc/tls/cert.pem".into(),
        key: "-----BEGIN PRIVATE KEY----- secret".into(),
    };
    let v = serde_json::to_value(&tls).unwrap();
    assert_eq!(v["key"], "<redacted>");
    assert_eq!(v["cert"], "/etc/tls/cert.pem");
    assert!(!v.to_string().contains("secret"));

    let (status, headers, body) = get(&p.admin_url("/metrics")).await;
    assert_eq!(status, 200);
    let ct = headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("breakwater_build_info"), "{text}");
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );

    let (status, _, body) = get(&p.admin_url("/status")).await;
    assert_eq!(status, 200);
    let st = json(&body);
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["routes"][0]["name"], "r");
    assert_eq!(st["routes"][0]["listener"], "test");
    assert_eq!(st["routes"][0]["upstream"], "up");
    assert!(st["routes"][0]["circuit"].is_null());

    let (status, _, _) = get(&p.admin_url("/nope")).await;
    assert_eq!(status, 404);
    let (status, _, _) = post(&p.admin_url("/circuit/nope/auto")).await;
    assert_eq!(status, 404);
    let (status, headers, body) = get(&p.admin_url("/")).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(!body.is_empty());
}

// ---------------------------------------------------------------------------------
// Reload, from a real config file.

/// A config file in its own temporary folder, removed on drop.
struct TempConfig {
    dir: PathBuf,
    path: PathBuf,
}

impl TempConfig {
    fn new(name: &str, text: &str) -> TempConfig {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "breakwater-lifecycle-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("breakwater.yaml");
        let c = TempConfig { dir, path };
        c.write(text);
        c
    }

    /// Replaces the file atomically, so the file watcher never reads half of it.
    fn write(&self, text: &str) {
        let tmp = self.dir.join("breakwater.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The proxy started from a file, like `breakwater run -c FILE`.
struct FileProxy {
    addr: SocketAddr,
    admin: SocketAddr,
    _shared: Arc<breakwater::proxy::Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FileProxy {
    async fn start(path: &Path) -> FileProxy {
        let loaded = breakwater::config::load(path).unwrap_or_else(|e| panic!("{e}"));
        let server = breakwater::Server::bind(loaded).await.unwrap();
        let addr = server.listener_addrs()[0];
        let admin = server.admin_addr().unwrap();
        let shared = server.shared();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = server
                .run(async move {
                    let _ = rx.await;
                })
                .await;
        });
        FileProxy {
            addr,
            admin,
            _shared: shared,
            stop: Some(tx),
            task: Some(task),
        }
    }
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }
}

impl Drop for FileProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn tagged(tag: &'static str) -> Upstream {
    upstream(Proto::H1, move |req: Request<Incoming>| async move {
        resp(200, format!("{tag} {}", req.uri()))
    })
    .await
}

async fn body_of(url: &str) -> String {
    let (status, _, body) = get(url).await;
    assert_eq!(status, 200, "{url}: {body:?}");
    String::from_utf8_lossy(&body).into_owned()
}

fn reload_config(a: SocketAddr, b: SocketAddr, routes: &str) -> String {
    format!(
        "admin:
  address: 127.0.0.1:0
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
{routes}
upstreams:
  a:
    endpoints: [{a}]
    connect_timeout: 200ms
  b:
    endpoints: [{b}]
    connect_timeout: 200ms
telemetry:
  access_log: false
"
    )
}

async fn reload_metric(p: &FileProxy, result: &str) -> f64 {
    let (_, _, body) = get(&p.admin_url("/metrics")).await;
    let text = String::from_utf8_lossy(&body);
    metric(
        &text,
        &format!("breakwater_config_reloads_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_routes_and_rejects_bad_files() {
    let a = tagged("a").await;
    let b = tagged("b").await;
    let main_to = |up: &str| {
        format!(
            "      - name: main
        match: {{ path_prefix: / }}
        upstream: {up}"
        )
    };
    let cfg = TempConfig::new("routes", &reload_config(a.addr, b.addr, &main_to("a")));
    let p = FileProxy::start(&cfg.path).await;
    assert_eq!(body_of(&p.url("/x")).await, "a /x");
    assert_eq!(body_of(&p.url("/new/x")).await, "a /new/x");
    let success0 = reload_metric(&p, "success").await;
    let failure0 = reload_metric(&p, "failure").await;

    // add a route in front
    let routes = format!(
        "      - name: new
        match: {{ path_prefix: /new }}
        upstream: b
{}",
        main_to("a")
    );
    cfg.write(&reload_config(a.addr, b.addr, &routes));
    let (status, _, body) = post(&p.admin_url("/reload")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let doc = json(&body);
    assert_eq!(doc["result"], "applied", "{doc}");
    assert_eq!(doc["routes"], 2, "{doc}");
    assert_eq!(
        doc["needs_restart"].as_array().map(Vec::len),
        Some(0),
        "{doc}"
    );
    assert_eq!(body_of(&p.url("/new/x")).await, "b /new/x");
    assert_eq!(body_of(&p.url("/x")).await, "a /x");

    // move a route to another upstream
    let routes = format!(
        "      - name: new
        match: {{ path_prefix: /new }}
        upstream: b
{}",
        main_to("b")
    );
    cfg.write(&reload_config(a.addr, b.addr, &routes));
    let (status, _, body) = post(&p.admin_url("/reload")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body_of(&p.url("/x")).await, "b /x");

    // an invalid file is rejected whole; the old routes stay
    let bad = reload_config(a.addr, b.addr, &main_to("nowhere"));
    cfg.write(&bad);
    let (status, _, body) = post(&p.admin_url("/reload")).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 400, "{text}");
    let doc = json(&body);
    assert_eq!(doc["result"], "rejected", "{doc}");
    let errors = doc["errors"].as_str().unwrap_or_default();
    assert!(
        errors.contains("listeners[0].routes[0].upstream"),
        "{errors}"
    );
    assert!(
        errors.contains("\\\"nowhere\\\"") || errors.contains("nowhere"),
        "{errors}"
    );
    assert!(
        errors.contains("breakwater.yaml"),
        "names the file: {errors}"
    );
    assert_eq!(body_of(&p.url("/x")).await, "b /x");
    assert_eq!(body_of(&p.url("/new/x")).await, "b /new/x");

    // YAML that does not parse is rejected too
    cfg.write("listeners: [\n  { name: x\n");
    let (status, _, body) = post(&p.admin_url("/reload")).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body_of(&p.url("/x")).await, "b /x");

    // the file watcher may have reloaded too, so at least
    let success = reload_metric(&p, "success").await;
    let failure = reload_metric(&p, "failure").await;
    assert!(success - success0 >= 2.0, "success {success0} -> {success}");
    assert!(failure - failure0 >= 2.0, "failure {failure0} -> {failure}");
}

fn route_state(status: &Value, route: &str) -> String {
    status["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == route)
        .unwrap_or_else(|| panic!("no route {route} in {status}"))["circuit"]["state"]
        .as_str()
        .unwrap_or("<none>")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_breaker_keeps_its_state_across_reload() {
    let a = tagged("a").await;
    let b = tagged("b").await;
    let routes = |other_extra: &str| {
        format!(
            "      - name: guarded
        match: {{ path_prefix: /guarded }}
        upstream: a
        circuit_breaker:
          failure_rate: 50%
          window: 10s
          minimum_requests: 5
          open_for: 30s
      - name: other
        match: {{ path_prefix: / }}
        upstream: a
{other_extra}"
        )
    };
    let cfg = TempConfig::new("breaker", &reload_config(a.addr, b.addr, &routes("")));
    let p = FileProxy::start(&cfg.path).await;
    assert_eq!(body_of(&p.url("/guarded/1")).await, "a /guarded/1");

    let (status, _, body) = post(&p.admin_url("/circuit/guarded/force-open")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["state"], "forced_open");
    let (status, headers, _) = get(&p.url("/guarded/2")).await;
    assert_eq!(status, 503);
    assert_eq!(
        headers["proxy-status"],
        r#"breakwater; error=destination_unavailable; details="circuit_open""#
    );

    // change only the other route
    cfg.write(&reload_config(
        a.addr,
        b.addr,
        &routes("        timeout: 5s\n        strip_prefix: /o"),
    ));
    let (status, _, body) = post(&p.admin_url("/reload")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        body_of(&p.url("/o/x")).await,
        "a /x",
        "the change is in force"
    );

    let (_, _, body) = get(&p.admin_url("/status")).await;
    let st = json(&body);
    assert_eq!(route_state(&st, "guarded"), "forced_open", "{st}");
    let (status, _, _) = get(&p.url("/guarded/3")).await;
    assert_eq!(status, 503, "the breaker is still forced open");

    // and back to auto through the admin endpoint
    let (status, _, body) = post(&p.admin_url("/circuit/guarded/auto")).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["state"], "closed");
    assert_eq!(body_of(&p.url("/guarded/4")).await, "a /guarded/4");
}
