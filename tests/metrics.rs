//! The Prometheus exposition after real traffic (SPEC section 6): every family is there
//! with its type, help and labels after a retry, a trip, a 429, a shed, a fallback, a
//! timeout and reloads; and the whole text parses as OpenMetrics.
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use support::*;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The proxy started from a config file, so that `POST /reload` can re-read it.
struct FileProxy {
    addr: SocketAddr,
    admin: SocketAddr,
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl FileProxy {
    async fn start(path: PathBuf) -> FileProxy {
        let loaded = breakwater::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let server = breakwater::Server::bind(loaded).await.unwrap();
        let addr = server.listener_addrs()[0];
        let admin = server.admin_addr().unwrap();
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
            path,
            stop: Some(tx),
            task,
        }
    }
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
    async fn scrape(&self) -> String {
        let (status, headers, body) = get(&self.admin_url("/metrics")).await;
        assert_eq!(status, 200);
        let ct = headers["content-type"].to_str().unwrap();
        assert!(
            ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
            "{ct}"
        );
        String::from_utf8(body.to_vec()).unwrap()
    }
}

impl Drop for FileProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One upstream that behaves by path.
async fn behaving_upstream() -> Upstream {
    let retry_calls = Arc::new(AtomicUsize::new(0));
    upstream(Proto::H1, move |req: Request<Incoming>| {
        let path = req.uri().path().to_string();
        let first_retry_call =
            path.starts_with("/retry") && retry_calls.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first_retry_call {
                return resp(503, "once");
            }
            if path.starts_with("/cb") {
                return resp(500, "broken");
            }
            if path.starts_with("/budget") {
                return resp(503, "down");
            }
            if path.starts_with("/shed") {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            if path.starts_with("/to") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            resp(200, "ok")
        }
    })
    .await
}

fn config(up: SocketAddr, dead: SocketAddr) -> String {
    format!(
        r#"admin:
  address: 127.0.0.1:0
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - name: retry
        match: {{ path_prefix: /retry }}
        upstream: up
        retry: {{ attempts: 3, backoff: {{ base: 1ms, max: 2ms }} }}
      - name: budget
        match: {{ path_prefix: /budget }}
        upstream: up
        retry:
          attempts: 3
          backoff: {{ base: 1ms, max: 2ms }}
          budget: {{ ratio: 0.0, min_per_second: 1 }}
      - name: cb
        match: {{ path_prefix: /cb }}
        upstream: up
        circuit_breaker: {{ consecutive_failures: 1, minimum_requests: 1000, open_for: 30s }}
      - name: rl
        match: {{ path_prefix: /rl }}
        upstream: up
        rate_limit: {{ rate: 1/m, burst: 1 }}
      - name: obs
        match: {{ path_prefix: /obs }}
        upstream: up
        rate_limit: {{ rate: 1/m, burst: 1, mode: observe }}
      - name: shed
        match: {{ path_prefix: /shed }}
        upstream: up
        concurrency_limit: {{ max: 1 }}
      - name: fb
        match: {{ path_prefix: /fb }}
        upstream: dead
        fallback:
          when: [upstream_unavailable]
          status: 200
          body: degraded
      - name: to
        match: {{ path_prefix: /to }}
        upstream: up
        timeout: 200ms
      - name: other
        match: {{ path_prefix: / }}
        upstream: up
upstreams:
  up:
    endpoints: [{up}]
    connect_timeout: 200ms
  dead:
    endpoints: [{dead}]
    connect_timeout: 200ms
telemetry:
  access_log: false
"#
    )
}

fn temp_config(text: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "breakwater-metrics-test-{}-{}.yaml",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&path, text).unwrap();
    path
}

async fn admin_post(url: &str) -> u16 {
    send(Request::post(url).body(full("")).unwrap()).await.0
}

/// Sends the traffic that moves every family.
async fn exercise(p: &FileProxy) {
    // a retry that succeeds
    assert_eq!(get(&p.url("/retry")).await.0, 200);
    // a spent retry budget
    for _ in 0..12 {
        assert_eq!(get(&p.url("/budget")).await.0, 503);
    }
    // a trip, then a refusal
    assert_eq!(get(&p.url("/cb")).await.0, 500);
    assert_eq!(get(&p.url("/cb")).await.0, 503);
    // a 429, and an observed one
    assert_eq!(get(&p.url("/rl")).await.0, 200);
    assert_eq!(get(&p.url("/rl")).await.0, 429);
    assert_eq!(get(&p.url("/obs")).await.0, 200);
    assert_eq!(get(&p.url("/obs")).await.0, 200);
    // a shed
    let shed_url = p.url("/shed");
    let slow = tokio::spawn(async move { get(&shed_url).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(&p.url("/shed")).await.0, 503);
    assert_eq!(slow.await.unwrap().0, 200);
    // a fallback
    let (status, _, body) = get(&p.url("/fb")).await;
    assert_eq!((status, &body[..]), (200, &b"degraded"[..]));
    // a timeout
    assert_eq!(get(&p.url("/to")).await.0, 504);
    // a method outside the fixed set
    let req = Request::builder()
        .method("PROPFIND")
        .uri(p.url("/x"))
        .body(full(""))
        .unwrap();
    assert_eq!(send(req).await.0, 200);
    // a reload that applies, and one that is refused
    assert_eq!(admin_post(&p.admin_url("/reload")).await, 200);
    std::fs::write(&p.path, "listeners: [ this is not valid").unwrap();
    assert_eq!(admin_post(&p.admin_url("/reload")).await, 400);
}

/// One parsed sample line.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: families (name -> type, help) and samples.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    helps: HashMap<String, String>,
    samples: Vec<Sample>,
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

/// Parses `name{k="v",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let mut chars = line.char_indices().peekable();
    let name_end = loop {
        match chars.peek() {
            Some(&(i, c)) if is_name_char(c) && (i > 0 || is_name_start(c)) => {
                chars.next();
            }
            Some(&(i, _)) => break i,
            None => return Err("no value".into()),
        }
    };
    if name_end == 0 {
        return Err("no metric name".into());
    }
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut s = after;
        loop {
            if let Some(r) = s.strip_prefix('}') {
                s = r;
                break;
            }
            let eq = s.find('=').ok_or("label without =")?;
            let key = &s[..eq];
            if key.is_empty()
                || !key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(format!("bad label name {key:?}"));
            }
            s = s[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut it = s.char_indices();
            let end = loop {
                match it.next() {
                    Some((_, '\\')) => match it.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('"' | '\\'))) => value.push(c),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            };
            if labels.insert(key.to_string(), value).is_some() {
                return Err(format!("duplicate label {key}"));
            }
            s = &s[end + 1..];
            if let Some(r) = s.strip_prefix(',') {
                s = r;
            } else if !s.starts_with('}') {
                return Err("expected , or } after a label".into());
            }
        }
        rest = s;
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut parts = rest.split(' ');
    let value = parts.next().ok_or("no value")?;
    let value = parse_value(value).ok_or_else(|| format!("unparseable value {value:?}"))?;
    if let Some(ts) = parts.next() {
        ts.parse::<f64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

const SUFFIXES: [&str; 6] = ["_total", "_bucket", "_count", "_sum", "_created", "_info"];

/// The family a sample belongs to.
fn family_of<'a>(e: &'a Exposition, sample: &str) -> Option<&'a str> {
    if let Some((k, _)) = e.types.get_key_value(sample) {
        return Some(k);
    }
    SUFFIXES.iter().find_map(|s| {
        let base = sample.strip_suffix(s)?;
        e.types.get_key_value(base).map(|(k, _)| k.as_str())
    })
}

fn parse_exposition(text: &str) -> Exposition {
    let mut e = Exposition::default();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.iter().rev().find(|l| !l.is_empty()).copied(),
        Some("# EOF"),
        "the exposition ends with # EOF"
    );
    assert!(
        text.ends_with("# EOF\n") || text.ends_with("# EOF"),
        "nothing after # EOF"
    );
    for (n, line) in lines.iter().enumerate() {
        if line.is_empty() {
            panic!("empty line {n} in the exposition");
        }
        if *line == "# EOF" {
            assert_eq!(n, lines.len() - 1, "# EOF must be last");
            continue;
        }
        if let Some(c) = line.strip_prefix("# ") {
            let mut parts = c.splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            let name = name
                .unwrap_or_else(|| panic!("line {n}: {line}"))
                .to_string();
            match kind {
                Some("TYPE") => {
                    let t = rest.unwrap_or_else(|| panic!("line {n}: {line}"));
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown",
                            "gaugehistogram"
                        ]
                        .contains(&t),
                        "line {n}: unknown type {t}"
                    );
                    assert!(
                        e.types.insert(name, t.to_string()).is_none(),
                        "line {n}: TYPE twice"
                    );
                }
                Some("HELP") => {
                    assert!(e
                        .helps
                        .insert(name, rest.unwrap_or("").to_string())
                        .is_none());
                }
                Some("UNIT") => {}
                _ => panic!("line {n}: unknown comment {line}"),
            }
            continue;
        }
        let s = parse_sample(line).unwrap_or_else(|err| panic!("line {n}: {err}: {line}"));
        e.samples.push(s);
    }
    for s in &e.samples {
        let fam = family_of(&e, &s.name).unwrap_or_else(|| panic!("no # TYPE for {}", s.name));
        assert!(e.helps.contains_key(fam), "no # HELP for {fam}");
    }
    for fam in e.types.keys() {
        assert!(e.helps.contains_key(fam), "no # HELP for {fam}");
    }
    e
}

impl Exposition {
    /// The type of the family exposing `name` (a sample name like `x_total`).
    fn type_of(&self, name: &str) -> Option<&str> {
        family_of(self, name)
            .and_then(|f| self.types.get(f))
            .map(String::as_str)
    }
    fn samples(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }
    /// Asserts the family of `name` has `ty` and every sample carries exactly `labels`.
    fn check(&self, name: &str, ty: &str, labels: &[&str]) {
        assert_eq!(self.type_of(name), Some(ty), "TYPE of {name}");
        let samples = self.samples(name);
        assert!(!samples.is_empty(), "no samples of {name}");
        let want: BTreeSet<&str> = labels.iter().copied().collect();
        for s in samples {
            let got: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
            assert_eq!(got, want, "labels of {s:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_is_exposed_with_type_help_and_labels() {
    let up = behaving_upstream().await;
    let dead = closed_port().await;
    let p = FileProxy::start(temp_config(&config(up.addr, dead))).await;
    exercise(&p).await;
    let text = p.scrape().await;
    let e = parse_exposition(&text);

    let route = |r: &'static str| [("route", r)];
    let counters: [(&str, &[&str]); 12] = [
        (
            "breakwater_requests_total",
            &["listener", "route", "method", "status"],
        ),
        (
            "breakwater_upstream_attempts_total",
            &["route", "upstream", "outcome"],
        ),
        ("breakwater_retries_total", &["route", "reason"]),
        ("breakwater_retry_budget_exhausted_total", &["route"]),
        (
            "breakwater_circuit_transitions_total",
            &["route", "from", "to"],
        ),
        ("breakwater_circuit_rejected_total", &["route"]),
        (
            "breakwater_policy_observed_total",
            &["route", "policy", "would"],
        ),
        ("breakwater_rate_limited_total", &["route"]),
        ("breakwater_overloaded_total", &["route"]),
        ("breakwater_timeouts_total", &["route", "kind"]),
        ("breakwater_fallbacks_total", &["route", "reason"]),
        ("breakwater_config_reloads_total", &["result"]),
    ];
    for (name, labels) in counters {
        e.check(name, "counter", labels);
    }
    e.check("breakwater_circuit_state", "gauge", &["route"]);
    e.check("breakwater_inflight_requests", "gauge", &["route"]);
    e.check("breakwater_build_info", "gauge", &["version"]);
    e.check("process_cpu_seconds_total", "counter", &[]);
    for g in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        e.check(g, "gauge", &[]);
    }
    assert_eq!(
        e.type_of("breakwater_request_duration_seconds_bucket"),
        Some("histogram")
    );
    e.check(
        "breakwater_request_duration_seconds_bucket",
        "histogram",
        &["listener", "route", "le"],
    );
    e.check(
        "breakwater_request_duration_seconds_count",
        "histogram",
        &["listener", "route"],
    );
    e.check(
        "breakwater_request_duration_seconds_sum",
        "histogram",
        &["listener", "route"],
    );

    // the values the traffic implies
    let v = |name: &str, labels: &[(&str, &str)]| {
        e.value(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?}\n{text}"))
    };
    assert_eq!(
        v(
            "breakwater_requests_total",
            &[
                ("listener", "main"),
                ("route", "retry"),
                ("method", "GET"),
                ("status", "200")
            ]
        ),
        1.0
    );
    assert_eq!(
        v(
            "breakwater_requests_total",
            &[
                ("listener", "main"),
                ("route", "other"),
                ("method", "other"),
                ("status", "200")
            ]
        ),
        1.0,
        "unknown methods share one label value"
    );
    assert_eq!(
        v(
            "breakwater_upstream_attempts_total",
            &[
                ("route", "retry"),
                ("upstream", "up"),
                ("outcome", "failure")
            ]
        ),
        1.0
    );
    assert_eq!(
        v(
            "breakwater_upstream_attempts_total",
            &[
                ("route", "retry"),
                ("upstream", "up"),
                ("outcome", "success")
            ]
        ),
        1.0
    );
    assert_eq!(
        v(
            "breakwater_upstream_attempts_total",
            &[
                ("route", "fb"),
                ("upstream", "dead"),
                ("outcome", "connect_error")
            ]
        ),
        1.0
    );
    assert_eq!(
        v(
            "breakwater_retries_total",
            &[("route", "retry"), ("reason", "gateway-error")]
        ),
        1.0
    );
    assert!(v("breakwater_retry_budget_exhausted_total", &route("budget")) > 0.0);
    assert_eq!(v("breakwater_circuit_state", &route("cb")), 1.0);
    assert_eq!(
        v(
            "breakwater_circuit_transitions_total",
            &[("route", "cb"), ("from", "closed"), ("to", "open")]
        ),
        1.0
    );
    assert_eq!(v("breakwater_circuit_rejected_total", &route("cb")), 1.0);
    assert_eq!(
        v(
            "breakwater_policy_observed_total",
            &[
                ("route", "obs"),
                ("policy", "rate_limit"),
                ("would", "reject")
            ]
        ),
        1.0
    );
    assert_eq!(v("breakwater_rate_limited_total", &route("rl")), 1.0);
    assert_eq!(v("breakwater_overloaded_total", &route("shed")), 1.0);
    assert_eq!(
        v(
            "breakwater_timeouts_total",
            &[("route", "to"), ("kind", "request")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "breakwater_fallbacks_total",
            &[("route", "fb"), ("reason", "upstream_unavailable")]
        ),
        1.0
    );
    for r in ["retry", "cb", "rl", "shed", "to"] {
        assert_eq!(v("breakwater_inflight_requests", &route(r)), 0.0, "{r}");
    }
    assert!(v("breakwater_config_reloads_total", &[("result", "success")]) >= 1.0);
    assert!(v("breakwater_config_reloads_total", &[("result", "failure")]) >= 1.0);
    assert_eq!(
        v(
            "breakwater_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // the histogram: cumulative buckets ending in +Inf == _count, for every series
    let series: BTreeSet<(String, String)> = e
        .samples("breakwater_request_duration_seconds_count")
        .iter()
        .map(|s| (s.labels["listener"].clone(), s.labels["route"].clone()))
        .collect();
    assert!(series.contains(&("main".into(), "shed".into())));
    for (listener, route) in &series {
        let mut buckets: Vec<(f64, f64)> = e
            .samples("breakwater_request_duration_seconds_bucket")
            .iter()
            .filter(|s| &s.labels["listener"] == listener && &s.labels["route"] == route)
            .map(|s| {
                (
                    parse_value(&s.labels["le"]).expect("le is a float"),
                    s.value,
                )
            })
            .collect();
        buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        assert!(buckets.len() >= 2, "{route}: {buckets:?}");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{route}: {buckets:?}"
        );
        let (le, inf) = *buckets.last().unwrap();
        assert!(le.is_infinite(), "{route}: last bucket {le}");
        let count = e
            .value(
                "breakwater_request_duration_seconds_count",
                &[("listener", listener), ("route", route)],
            )
            .unwrap();
        assert_eq!(inf, count, "{route}");
    }
    let timeout_sum = e
        .value(
            "breakwater_request_duration_seconds_sum",
            &[("listener", "main"), ("route", "to")],
        )
        .unwrap();
    assert!((0.19..1.0).contains(&timeout_sum), "{timeout_sum}");
    // the slow request that was let through shows in a bucket above 0.25 s only
    let shed_count = e
        .value(
            "breakwater_request_duration_seconds_count",
            &[("listener", "main"), ("route", "shed")],
        )
        .unwrap();
    assert_eq!(shed_count, 2.0);

    // the process families describe this process
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = v("process_start_time_seconds", &[]);
    assert!(
        start <= now + 1.0 && start > now - 3600.0,
        "start {start} now {now}"
    );
    assert!(v("process_resident_memory_bytes", &[]) > 1024.0 * 1024.0);
    assert!(v("process_open_fds", &[]) >= 3.0);
    assert!(v("process_cpu_seconds_total", &[]) >= 0.0);
}

#[tokio::test]
async fn exposition_of_a_fresh_proxy_parses() {
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let e = parse_exposition(&scrape(&p).await);
    assert!(e.type_of("breakwater_build_info").is_some());
    assert!(e.type_of("process_open_fds").is_some());
    get(&p.url("/")).await;
    let e = parse_exposition(&scrape(&p).await);
    assert_eq!(
        e.value(
            "breakwater_requests_total",
            &[
                ("listener", "test"),
                ("route", "r"),
                ("method", "GET"),
                ("status", "200")
            ]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn failed_reload_keeps_the_old_config_and_is_counted() {
    // the in-memory harness config names a file that does not exist: a reload must fail
    // cleanly and leave the routes in force
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    let (status, _, body) = send(
        Request::post(p.admin_url("/reload"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{body:?}");
    assert_eq!(get(&p.url("/")).await.0, 200);
    let text = scrape(&p).await;
    assert_eq!(
        metric(
            &text,
            r#"breakwater_config_reloads_total{result="failure"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn the_sample_parser_rejects_malformed_lines() {
    assert!(parse_sample(r#"a_b{x="1",y="a\"b"} 1.5"#).is_ok());
    assert!(parse_sample("a 1 1700000000").is_ok());
    assert!(parse_sample(r#"a{le="+Inf"} 3"#).is_ok());
    assert!(parse_sample("a").is_err());
    assert!(parse_sample("a x").is_err());
    assert!(parse_sample(r#"a{x=1} 1"#).is_err());
    assert!(parse_sample(r#"a{x="1" 1"#).is_err());
    assert!(parse_sample("1a 1").is_err());
    assert!(parse_sample(r#"a{x="1",x="2"} 1"#).is_err());
}
