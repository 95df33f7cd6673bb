//! Distributed tracing end to end (SPEC sections 2 `telemetry.tracing` and 4 last
//! bullet): W3C trace context reaches the upstream with or without export; spans arrive
//! at a real OTLP receiver on loopback (gRPC: tonic with opentelemetry-proto's service;
//! HTTP: hyper decoding protobuf from POST /v1/traces) with the HTTP semantic
//! conventions, one attempt span per upstream attempt and events for retries and
//! refusals; a dead or stalled collector costs no request latency.
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::*;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn client_traceparent() -> String {
    format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
}

/// A one-route proxy config with a `telemetry` block of our own.
fn config(upstream: SocketAddr, route_extra: &str, tracing: &str) -> String {
    format!(
        "listeners:
  - name: test
    address: 127.0.0.1:0
    routes:
      - name: r
        match: {{ path_prefix: / }}
        upstream: up
{route_extra}
upstreams:
  up:
    endpoints: [{upstream}]
    protocol: http1
    connect_timeout: 200ms
telemetry:
  access_log: false
{tracing}"
    )
}

fn tracing_block(endpoint: &str, protocol: &str, ratio: f64) -> String {
    format!(
        "  tracing:
    otlp_endpoint: {endpoint}
    otlp_protocol: {protocol}
    sample_ratio: {ratio}
    service_name: bw-test
"
    )
}

/// `traceparent` and `tracestate` of each request an upstream saw.
type Seen = Arc<Mutex<Vec<(Option<String>, Option<String>)>>>;

/// An upstream recording trace headers; it answers 503 to its first `fails` requests.
async fn recording_upstream(fails: usize) -> (Upstream, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let up = upstream(Proto::H1, move |req: Request<Incoming>| {
        let h = |name: &str| {
            req.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let mut all = s.lock().unwrap();
        all.push((h("traceparent"), h("tracestate")));
        let status = if all.len() <= fails { 503 } else { 200 };
        async move { resp(status, "ok") }
    })
    .await;
    (up, seen)
}

/// `(trace id, parent id, flags)` of a traceparent.
fn split(tp: &str) -> (String, String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    assert_eq!(parts[1].len(), 32, "{tp}");
    assert_eq!(parts[2].len(), 16, "{tp}");
    assert!(tp
        .bytes()
        .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_ne!(parts[1], "0".repeat(32));
    assert_ne!(parts[2], "0".repeat(16));
    (parts[1].into(), parts[2].into(), parts[3].into())
}

async fn traced_get(url: &str, traceparent: Option<&str>, tracestate: Option<&str>) -> u16 {
    let mut b = Request::get(url);
    if let Some(tp) = traceparent {
        b = b.header("traceparent", tp);
    }
    if let Some(ts) = tracestate {
        b = b.header("tracestate", ts);
    }
    send(b.body(full("")).unwrap()).await.0
}

#[tokio::test]
async fn without_tracing_the_trace_still_continues() {
    let (up, seen) = recording_upstream(0).await;
    let p = start_proxy(&config(up.addr, "", "")).await;
    assert!(!p.shared.tracing.is_exporting());

    let tp = client_traceparent();
    assert_eq!(
        traced_get(&p.url("/a"), Some(&tp), Some("vendor=x,other=y")).await,
        200
    );
    assert_eq!(traced_get(&p.url("/b"), None, None).await, 200);
    let unsampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
    assert_eq!(traced_get(&p.url("/c"), Some(&unsampled), None).await, 200);
    let malformed = format!("00-{}-{CLIENT_SPAN}-01", CLIENT_TRACE.to_uppercase());
    assert_eq!(
        traced_get(&p.url("/d"), Some(&malformed), Some("v=1")).await,
        200
    );

    let seen = seen.lock().unwrap().clone();
    // continued: same trace, a fresh span id, the sampled flag, tracestate as sent
    let (trace, parent, flags) = split(seen[0].0.as_deref().unwrap());
    assert_eq!(trace, CLIENT_TRACE);
    assert_ne!(parent, CLIENT_SPAN);
    assert_eq!(flags, "01");
    assert_eq!(seen[0].1.as_deref(), Some("vendor=x,other=y"));
    // started: a valid traceparent all the same
    let (trace_b, _, _) = split(seen[1].0.as_deref().unwrap());
    assert_ne!(trace_b, CLIENT_TRACE);
    assert_eq!(seen[1].1, None);
    // the client's sampling decision is kept
    let (trace, parent, flags) = split(seen[2].0.as_deref().unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (CLIENT_TRACE, "00"));
    assert_ne!(parent, CLIENT_SPAN);
    // a malformed traceparent starts a new trace and drops tracestate
    let (trace, _, _) = split(seen[3].0.as_deref().unwrap());
    assert_ne!(trace, CLIENT_TRACE.to_uppercase());
    assert_ne!(trace, CLIENT_TRACE);
    assert_eq!(seen[3].1, None);
}

/// Spans received by a test collector, with their resource's `service.name`.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut all = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| str_value(&kv.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    all.push((service.clone(), s));
                }
            }
        }
    }

    fn of_trace(&self, trace: &str) -> Vec<(String, Span)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace)
            .cloned()
            .collect()
    }
}

/// A running test collector; stops when dropped.
struct Collector {
    endpoint: String,
    received: Received,
    task: JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct GrpcReceiver(Received);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on loopback.
async fn grpc_collector() -> Collector {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let svc = TraceServiceServer::new(GrpcReceiver(received.clone()));
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Collector {
        endpoint: format!("http://{addr}"),
        received,
        task,
    }
}

/// An OTLP/HTTP receiver on loopback: protobuf on POST /v1/traces.
async fn http_collector() -> Collector {
    let received = Received::default();
    let r = received.clone();
    let up = upstream(Proto::H1, move |req: Request<Incoming>| {
        let r = r.clone();
        async move {
            let ok = req.method() == http::Method::POST
                && req.uri().path() == "/v1/traces"
                && req.headers()["content-type"] == "application/x-protobuf";
            let body = req.into_body().collect().await.unwrap().to_bytes();
            if !ok {
                return resp(400, "want protobuf on POST /v1/traces");
            }
            match ExportTraceServiceRequest::decode(body) {
                Ok(m) => r.add(m),
                Err(_) => return resp(400, "not an ExportTraceServiceRequest"),
            }
            let out = ExportTraceServiceResponse::default().encode_to_vec();
            let mut res = resp(200, Bytes::from(out));
            res.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/x-protobuf"),
            );
            res
        }
    })
    .await;
    // Keep the upstream alive in the collector's task.
    let endpoint = format!("http://{}", up.addr);
    let task = tokio::spawn(async move {
        let _up = up;
        std::future::pending::<()>().await
    });
    Collector {
        endpoint,
        received,
        task,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn str_value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> Option<String> {
    match v.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn attr(s: &Span, key: &str) -> Option<AnyValue> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn s(v: &str) -> Option<AnyValue> {
    Some(AnyValue::StringValue(v.into()))
}

fn i(v: i64) -> Option<AnyValue> {
    Some(AnyValue::IntValue(v))
}

/// Flushes the proxy's spans and waits (bounded) until `want` spans of `trace` arrived.
async fn wait_for(p: &Proxy, c: &Collector, trace: &str, want: usize) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let _ = p.shared.tracing.force_flush(Duration::from_secs(2)).await;
        let got = c.received.of_trace(trace);
        if got.len() >= want || Instant::now() > deadline {
            assert_eq!(got.len(), want, "spans of trace {trace}");
            assert!(got.iter().all(|(svc, _)| svc == "bw-test"), "service.name");
            return got.into_iter().map(|(_, s)| s).collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kind(s: &Span) -> SpanKind {
    SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified)
}

#[tokio::test]
async fn grpc_export_server_and_attempt_spans() {
    let c = grpc_collector().await;
    let (up, seen) = recording_upstream(0).await;
    let p = start_proxy(&config(
        up.addr,
        "",
        &tracing_block(&c.endpoint, "grpc", 1.0),
    ))
    .await;
    assert!(p.shared.tracing.is_exporting());

    let req = Request::get(p.url("/orders/7?x=1"))
        .header("traceparent", client_traceparent())
        .header("tracestate", "vendor=x")
        .body(full(""))
        .unwrap();
    assert_eq!(send(req).await.0, 200);

    let spans = wait_for(&p, &c, CLIENT_TRACE, 2).await;
    let server = spans.iter().find(|s| kind(s) == SpanKind::Server).unwrap();
    let attempt = spans.iter().find(|s| kind(s) == SpanKind::Client).unwrap();
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(server.name, "GET r");
    assert_eq!(attr(server, "http.request.method"), s("GET"));
    assert_eq!(attr(server, "http.route"), s("r"));
    assert_eq!(attr(server, "url.path"), s("/orders/7"));
    assert_eq!(attr(server, "server.address"), s("127.0.0.1"));
    assert_eq!(attr(server, "server.port"), i(i64::from(p.addrs[0].port())));
    assert_eq!(attr(server, "http.response.status_code"), i(200));
    assert_eq!(server.trace_state, "vendor=x");

    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(attempt.name, "upstream attempt");
    assert_eq!(attr(attempt, "breakwater.attempt"), i(1));
    assert_eq!(attr(attempt, "http.response.status_code"), i(200));

    // The upstream's parent is the attempt span; tracestate passes through.
    let seen = seen.lock().unwrap().clone();
    let (trace, parent, flags) = split(seen[0].0.as_deref().unwrap());
    assert_eq!(trace, CLIENT_TRACE);
    assert_eq!(parent, hex(&attempt.span_id));
    assert_eq!(flags, "01");
    assert_eq!(seen[0].1.as_deref(), Some("vendor=x"));
}

#[tokio::test]
async fn http_export_retries_and_refusals() {
    let c = http_collector().await;
    let (up, seen) = recording_upstream(1).await;
    let route = "        retry:\n          attempts: 2\n          backoff: { base: 1ms, max: 2ms }\n        rate_limit: { rate: 1/m, burst: 1 }";
    let p = start_proxy(&config(
        up.addr,
        route,
        &tracing_block(&c.endpoint, "http", 1.0),
    ))
    .await;

    // Retried: 503, then 200.
    assert_eq!(
        traced_get(&p.url("/x"), Some(&client_traceparent()), None).await,
        200
    );
    let spans = wait_for(&p, &c, CLIENT_TRACE, 3).await;
    let server = spans.iter().find(|s| kind(s) == SpanKind::Server).unwrap();
    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| kind(s) == SpanKind::Client)
        .collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2);
    let retries: Vec<_> = server.events.iter().filter(|e| e.name == "retry").collect();
    assert_eq!(retries.len(), 1, "one retry event: {:?}", server.events);
    assert_eq!(attr(server, "breakwater.attempts"), i(2));
    let seen = seen.lock().unwrap().clone();
    for (n, a) in attempts.iter().enumerate() {
        assert_eq!(a.parent_span_id, server.span_id);
        assert_eq!(attr(a, "breakwater.attempt"), i(n as i64 + 1));
        let (trace, parent, _) = split(seen[n].0.as_deref().unwrap());
        assert_eq!(trace, CLIENT_TRACE);
        assert_eq!(parent, hex(&a.span_id), "attempt {}", n + 1);
    }
    assert_eq!(attr(attempts[0], "http.response.status_code"), i(503));

    // Rate limited (the bucket of 1 is spent): an event on the server span, no attempt.
    let other = "0af7651916cd43dd8448eb211c80319c";
    let tp = format!("00-{other}-b7ad6b7169203331-01");
    assert_eq!(traced_get(&p.url("/y"), Some(&tp), None).await, 429);
    let spans = wait_for(&p, &c, other, 1).await;
    assert_eq!(kind(&spans[0]), SpanKind::Server);
    assert_eq!(attr(&spans[0], "http.response.status_code"), i(429));
    assert!(
        spans[0].events.iter().any(|e| e.name == "rate_limited"),
        "{:?}",
        spans[0].events
    );
}

#[tokio::test]
async fn sample_ratio_zero_records_only_sampled_parents() {
    let c = http_collector().await;
    let (up, seen) = recording_upstream(0).await;
    let p = start_proxy(&config(
        up.addr,
        "",
        &tracing_block(&c.endpoint, "http", 0.0),
    ))
    .await;

    assert_eq!(traced_get(&p.url("/new"), None, None).await, 200);
    let (new_trace, _, flags) = split(seen.lock().unwrap()[0].0.as_deref().unwrap());
    assert_eq!(flags, "00", "not sampled: the upstream is told so");

    // A sampled parent is always followed.
    assert_eq!(
        traced_get(&p.url("/continued"), Some(&client_traceparent()), None).await,
        200
    );
    wait_for(&p, &c, CLIENT_TRACE, 2).await;
    assert!(c.received.of_trace(&new_trace).is_empty());
}

/// A collector that accepts connections and never answers; counts connections.
async fn stalled_collector() -> (String, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (format!("http://{addr}"), accepted, task)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_or_stalled_collectors_cost_no_latency() {
    let (up, _) = recording_upstream(0).await;
    let dead = closed_port().await;
    let (stalled, accepted, stalled_task) = stalled_collector().await;
    let off = start_proxy(&config(up.addr, "", "")).await;
    let dead_grpc = start_proxy(&config(
        up.addr,
        "",
        &tracing_block(&format!("http://{dead}"), "grpc", 1.0),
    ))
    .await;
    let stalled_http =
        start_proxy(&config(up.addr, "", &tracing_block(&stalled, "http", 1.0))).await;

    // Interleaved, so noise from the machine hits all three alike. 400 requests per
    // proxy make 800 spans each: a full batch (512) is exported mid-run and fails
    // (refused) or hangs (stalled) while requests go on.
    let proxies = [&off, &dead_grpc, &stalled_http];
    let mut times: [Vec<Duration>; 3] = Default::default();
    let client = h1_client();
    for _ in 0..400 {
        for (k, p) in proxies.iter().enumerate() {
            let req = Request::get(p.url("/"))
                .header("traceparent", client_traceparent())
                .body(full(""))
                .unwrap();
            let t = Instant::now();
            let res = tokio::time::timeout(Duration::from_secs(5), client.request(req))
                .await
                .expect("request timed out")
                .expect("request failed");
            let status = res.status();
            let _ = res.into_body().collect().await;
            times[k].push(t.elapsed());
            assert_eq!(status, 200);
        }
    }
    let [off_t, dead_t, stalled_t] = times.map(median);
    let bound = off_t * 2 + Duration::from_millis(2);
    assert!(
        dead_t <= bound,
        "dead collector: median {dead_t:?} vs {off_t:?} without tracing"
    );
    assert!(
        stalled_t <= bound,
        "stalled collector: median {stalled_t:?} vs {off_t:?} without tracing"
    );
    eprintln!("median latency: off {off_t:?}, dead gRPC {dead_t:?}, stalled HTTP {stalled_t:?}");
    // The stalled collector was really sent a batch (which never got an answer).
    let deadline = Instant::now() + Duration::from_secs(2);
    while accepted.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        accepted.load(Ordering::SeqCst) > 0,
        "no export was attempted"
    );
    stalled_task.abort();
}
