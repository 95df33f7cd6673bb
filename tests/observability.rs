//! Observability end to end (SPEC sections 5 and 6): a real Prometheus scrapes the
//! admin `/metrics`, headless Chromium renders the admin status page, and the
//! exposition is checked line by line by a strict OpenMetrics parser.
//!
//! The Prometheus and Chromium tests need Debian's `prometheus` and `chromium`
//! packages (`.ci/run` installs them). Without them they print `skipped: ...` and
//! pass, except under `CI=true`, where a missing binary fails the test. Every child
//! process runs in its own process group and is killed (group and all) by a guard,
//! also when an assertion fails.

mod support;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::Request;
use http_body_util::BodyExt;
use serde_json::Value;
use support::*;

// ------------------------------------------------------------------ helpers

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "breakwater-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Finds an external tool in /usr/bin or on `PATH`. When it is missing, `None` after
/// printing that the test is skipped, or a panic under `CI=true`.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let found = std::iter::once(PathBuf::from("/usr/bin"))
        .chain(path_dirs)
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_some() {
        return found;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "`{name}` not found in /usr/bin or on PATH: install the Debian package `{package}` \
             (DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {package}; \
             .ci/run does this)"
        );
    }
    println!("skipped: {name} not installed");
    None
}

/// A child process in its own process group, with stdout and stderr in files.
/// Dropping it kills the whole group and reaps the child.
struct Proc {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Proc {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        }
    }

    /// Waits at most `limit` for the process to exit; kills it and panics on timeout.
    async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "{} did not finish within {limit:?}; killed. stderr:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Panics when the process has already exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited early with {status}; output:\n{}\n{}",
                self.name,
                self.stdout(),
                self.stderr()
            );
        }
    }

    fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The last 4000 characters of stderr.
    fn stderr(&self) -> String {
        let s = fs::read_to_string(&self.stderr).unwrap_or_default();
        let cut = s.len().saturating_sub(4000);
        let cut = (cut..=s.len())
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(s.len());
        s[cut..].to_string()
    }

    fn kill(&mut self) {
        // The whole group first (Chromium forks helpers), then the child itself.
        // The group id stays reserved while any member lives, so this cannot hit
        // anything but what this child started.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -KILL -- -{} 2>/dev/null", self.child.id()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// GET that reports failure instead of panicking (for a server still starting).
async fn try_get(url: &str) -> Option<(u16, String)> {
    let req = Request::get(url).body(full("")).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), h1_client().request(req))
        .await
        .ok()?
        .ok()?;
    let status = res.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(5), res.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A Prometheus HTTP API answer's `data`, when the call succeeded.
async fn prom_api(base: &str, path_and_query: &str) -> Option<Value> {
    let (status, body) = try_get(&format!("{base}{path_and_query}")).await?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    (v["status"] == "success").then(|| v["data"].clone())
}

/// The instant-query result vector for `query` (empty when none or not ready).
async fn prom_query(base: &str, query: &str) -> Vec<Value> {
    prom_api(base, &format!("/api/v1/query?query={query}"))
        .await
        .and_then(|d| d["result"].as_array().cloned())
        .unwrap_or_default()
}

/// Percent-encodes a query-string value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every PromQL expression of the Grafana dashboard, with its template variables
/// filled in (`$route` = all routes, `$__rate_interval` = 1m).
fn dashboard_exprs() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/breakwater.json");
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dash: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("target without expr");
            exprs.push(
                expr.replace("$route", ".*")
                    .replace("$__rate_interval", "1m"),
            );
        }
    }
    assert!(exprs.len() > 10, "too few dashboard queries: {exprs:?}");
    exprs
}

// ------------------------------------------------------------------ Prometheus

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_metrics() {
    let Some(prometheus) = tool("prometheus", "prometheus") else {
        return;
    };
    let up = echo_upstream().await;
    let p = start_proxy(&one_route(up.addr, "")).await;
    for i in 0..3 {
        let (status, _, _) = get(&p.url(&format!("/item/{i}"))).await;
        assert_eq!(status, 200);
    }

    let dir = TempDir::new("prometheus");
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: breakwater
    metrics_path: /metrics
    static_configs:
      - targets: ['{}']
",
            p.admin
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut prom = Proc::spawn(
        "prometheus",
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path()),
        dir.path(),
    );
    let base = format!("http://127.0.0.1:{port}");

    // The first scrape lands: the counter is queryable.
    let deadline = started + Duration::from_secs(20);
    let result = loop {
        prom.assert_running();
        let result = prom_query(&base, "breakwater_requests_total").await;
        if !result.is_empty() {
            break result;
        }
        if Instant::now() >= deadline {
            let targets = try_get(&format!("{base}/api/v1/targets")).await;
            panic!(
                "no breakwater_requests_total in Prometheus after 20 s\ntargets: {targets:?}\n\
                 prometheus log:\n{}",
                prom.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let first_sample = started.elapsed();
    assert_eq!(result.len(), 1, "{result:?}");
    let m = &result[0]["metric"];
    assert_eq!(m["route"], "r", "{result:?}");
    assert_eq!(m["listener"], "test", "{result:?}");
    assert_eq!(m["method"], "GET", "{result:?}");
    assert_eq!(m["status"], "200", "{result:?}");
    assert_eq!(m["job"], "breakwater", "{result:?}");
    assert_eq!(result[0]["value"][1], "3", "{result:?}");

    // The target is healthy and the scrape raised no error.
    let target = loop {
        let targets = prom_api(&base, "/api/v1/targets").await;
        let found = targets
            .as_ref()
            .and_then(|d| d["activeTargets"].as_array())
            .and_then(|ts| {
                ts.iter()
                    .find(|t| t["scrapeUrl"] == format!("http://{}/metrics", p.admin))
                    .cloned()
            });
        if let Some(t) = found.filter(|t| t["health"] == "up") {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "target not up after 20 s: {targets:?}\nprometheus log:\n{}",
            prom.stderr()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(target["lastError"], "", "{target}");

    // The other families the dashboard queries were ingested under their SPEC names.
    for name in [
        "breakwater_request_duration_seconds_bucket",
        "breakwater_request_duration_seconds_count",
        "breakwater_upstream_attempts_total",
        "breakwater_inflight_requests",
        "breakwater_build_info",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        let r = prom_query(&base, name).await;
        assert!(!r.is_empty(), "Prometheus has no {name}");
    }
    let attempts = prom_query(&base, "breakwater_upstream_attempts_total").await;
    let success = attempts
        .iter()
        .find(|a| a["metric"]["outcome"] == "success")
        .unwrap_or_else(|| panic!("no success attempts: {attempts:?}"));
    assert_eq!(success["metric"]["upstream"], "up", "{attempts:?}");
    assert_eq!(success["value"][1], "3", "{attempts:?}");
    let buckets = prom_query(&base, "breakwater_request_duration_seconds_count").await;
    assert_eq!(buckets[0]["value"][1], "3", "{buckets:?}");

    // Every dashboard query is valid PromQL for this Prometheus, and the traffic
    // panels have data.
    for expr in dashboard_exprs() {
        let url = format!("{base}/api/v1/query?query={}", url_encode(&expr));
        let (status, body) = try_get(&url)
            .await
            .unwrap_or_else(|| panic!("no answer for {expr}"));
        assert_eq!(status, 200, "dashboard query {expr}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "dashboard query {expr}: {body}");
    }
    let rate = prom_query(&base, "breakwater_requests_total%5B1m%5D").await;
    assert!(!rate.is_empty(), "range selector returned nothing");

    eprintln!(
        "prometheus: first sample after {first_sample:?}, test body {:?}",
        started.elapsed()
    );
    drop(prom);
}

// ------------------------------------------------------------------ Chromium

const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// Runs headless Chromium once (fresh profile, at most 30 s) and returns its stdout.
async fn chromium(bin: &Path, dir: &Path, tag: &str, args: &[String]) -> String {
    let mut cmd = Command::new(bin);
    cmd.args(CHROMIUM_FLAGS)
        .arg(format!(
            "--user-data-dir={}",
            dir.join(format!("profile-{tag}")).display()
        ))
        .args(args)
        .current_dir(dir);
    let mut proc = Proc::spawn(&format!("chromium-{tag}"), &mut cmd, dir);
    let status = proc.wait(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "chromium ({tag}) exited with {status}; stderr:\n{}",
        proc.stderr()
    );
    proc.stdout()
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "not a PNG ({} bytes)",
        png.len()
    );
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium() {
    let Some(bin) = tool("chromium", "chromium") else {
        return;
    };
    let up = echo_upstream().await;
    let p = start_proxy(&format!(
        "listeners:
  - name: web
    address: 127.0.0.1:0
    routes:
      - name: guarded
        match: {{ path_prefix: /guarded }}
        upstream: up
        circuit_breaker: {{ minimum_requests: 5, open_for: 30s }}
      - name: plain
        match: {{ path_prefix: / }}
        upstream: up
upstreams:
  up:
    endpoints: [{}]
    protocol: http1
telemetry:
  access_log: false
",
        up.addr
    ))
    .await;
    for path in ["/guarded/a", "/plain/b", "/plain/c"] {
        let (status, _, _) = get(&p.url(path)).await;
        assert_eq!(status, 200, "{path}");
    }
    let (status, _, body) = send(
        Request::post(p.admin_url("/circuit/guarded/force-open"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["state"], "forced_open", "{v}");
    let (status, headers, _) = get(&p.url("/guarded/refused")).await;
    assert_eq!(status, 503, "{headers:?}");

    let dir = TempDir::new("chromium");
    let started = Instant::now();
    let page = p.admin_url("/");
    let dom = chromium(
        &bin,
        dir.path(),
        "dom",
        &["--dump-dom".into(), page.clone()],
    )
    .await;
    let dom_time = started.elapsed();
    assert!(dom.contains("<title>breakwater status</title>"), "{dom}");
    assert!(dom.contains(r#"<tr data-route="guarded">"#), "{dom}");
    assert!(dom.contains(r#"<tr data-route="plain">"#), "{dom}");
    let row = |name: &str| -> String {
        let start = dom
            .find(&format!(r#"<tr data-route="{name}">"#))
            .unwrap_or_else(|| panic!("no row {name}:\n{dom}"));
        let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
        dom[start..end].to_string()
    };
    let guarded = row("guarded");
    assert!(
        guarded.contains(r#"<span class="state forced_open">forced_open</span>"#),
        "{guarded}"
    );
    assert!(guarded.contains(r#"<td class="err">1</td>"#), "{guarded}");
    let plain = row("plain");
    assert!(
        plain.contains(r#"<span class="state none">none</span>"#),
        "{plain}"
    );

    let shot = dir.path().join("status.png");
    let blank = dir.path().join("blank.png");
    for (tag, file, url) in [
        ("status", &shot, page.as_str()),
        ("blank", &blank, "about:blank"),
    ] {
        chromium(
            &bin,
            dir.path(),
            tag,
            &[
                format!("--screenshot={}", file.display()),
                "--window-size=1200,600".into(),
                "--hide-scrollbars".into(),
                url.into(),
            ],
        )
        .await;
    }
    let total = started.elapsed();
    // To look at it: BREAKWATER_SCREENSHOT_OUT=/tmp/status.png cargo test --test observability
    if let Some(out) = std::env::var_os("BREAKWATER_SCREENSHOT_OUT") {
        fs::copy(&shot, out).expect("copy the screenshot");
    }
    let shot_png = fs::read(&shot).expect("no status screenshot");
    let blank_png = fs::read(&blank).expect("no blank screenshot");
    assert_eq!(png_size(&shot_png), (1200, 600));
    assert_eq!(png_size(&blank_png), (1200, 600));
    assert!(
        shot_png.len() > 5 * 1024 && shot_png.len() > 2 * blank_png.len(),
        "status page screenshot looks empty: {} bytes, about:blank {} bytes",
        shot_png.len(),
        blank_png.len()
    );
    eprintln!(
        "chromium: dump-dom {dom_time:?}, all three runs {total:?}; screenshot {} bytes, blank {} bytes",
        shot_png.len(),
        blank_png.len()
    );
}

// ------------------------------------------------------------------ exposition

/// Label pairs in exposition order.
type Labels = Vec<(String, String)>;

/// One sample line.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Labels,
    value: f64,
}

impl Sample {
    fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed exposition: family name -> type, and the samples in order.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .map(|s| s.value)
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// Sample-name suffixes each OpenMetrics type allows.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram" => &["_bucket", "_gcount", "_gsum"],
        "summary" => &["", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')) =>
        {
            s.parse().map_err(|e| format!("bad value {s:?}: {e}"))
        }
        _ => Err(format!("bad value {s:?}")),
    }
}

/// `k="v",...}` after the opening brace; returns the labels and the rest after `}`.
fn parse_labels(mut s: &str) -> Result<(Labels, &str), String> {
    let mut labels = Labels::new();
    if let Some(rest) = s.strip_prefix('}') {
        return Ok((labels, rest));
    }
    loop {
        let eq = s.find('=').ok_or("label without '='")?;
        let name = &s[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        if labels.iter().any(|(n, _)| n == name) {
            return Err(format!("duplicate label {name:?}"));
        }
        s = s[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name} value not quoted"))?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name} value not closed")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape in label {name}: {other:?}")),
                },
                Some((_, '\n')) => return Err(format!("raw newline in label {name}")),
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        s = &s[end + 1..];
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        s = s
            .strip_prefix(',')
            .ok_or_else(|| format!("expected ',' or '}}' after label {name}"))?;
        if s.starts_with('}') {
            return Err("trailing comma in labels".into());
        }
    }
}

/// A strict reading of the OpenMetrics text format, as far as this proxy uses it.
fn parse_exposition(text: &str) -> Result<Exposition, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("exposition does not end with \"# EOF\\n\"")?;
    if text.contains('\r') {
        return Err("carriage return in exposition".into());
    }
    let mut exp = Exposition::default();
    let mut helps: HashSet<String> = HashSet::new();
    let mut units: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None; // the family whose block we are in
    let mut closed: HashSet<String> = HashSet::new(); // families whose block has ended
    let mut with_samples: HashSet<String> = HashSet::new();
    let mut seen: HashSet<String> = HashSet::new(); // sample name + labels
    for (no, line) in body.split_terminator('\n').enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", no + 1);
        // Starting or continuing a family's block.
        let mut enter = |family: &str| -> Result<(), String> {
            if current.as_deref() != Some(family) {
                if closed.contains(family) {
                    return Err(format!("family {family} is interleaved with another"));
                }
                if let Some(prev) = current.replace(family.to_string()) {
                    closed.insert(prev);
                }
            }
            Ok(())
        };
        if let Some(meta) = line.strip_prefix('#') {
            let mut parts = meta.strip_prefix(' ').unwrap_or("").splitn(3, ' ');
            let (kw, name, rest) = (
                parts.next().unwrap_or(""),
                parts.next().unwrap_or(""),
                parts.next(),
            );
            if !is_metric_name(name) {
                return Err(at(format!("bad or missing metric name {name:?}")));
            }
            enter(name).map_err(at)?;
            if with_samples.contains(name) {
                return Err(at(format!("metadata for {name} after its samples")));
            }
            match kw {
                "HELP" => {
                    if !helps.insert(name.to_string()) {
                        return Err(at(format!("second HELP for {name}")));
                    }
                }
                "TYPE" => {
                    let kind = rest.unwrap_or("");
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "gaugehistogram",
                        "summary",
                        "info",
                        "stateset",
                        "unknown",
                    ]
                    .contains(&kind)
                    {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if exp
                        .types
                        .insert(name.to_string(), kind.to_string())
                        .is_some()
                    {
                        return Err(at(format!("second TYPE for {name}")));
                    }
                }
                "UNIT" => {
                    let unit = rest.unwrap_or("");
                    if unit.is_empty() || !name.ends_with(&format!("_{unit}")) {
                        return Err(at(format!(
                            "family {name} does not end in its unit {unit:?}"
                        )));
                    }
                    if !units.insert(name.to_string()) {
                        return Err(at(format!("second UNIT for {name}")));
                    }
                }
                _ => return Err(at(format!("unknown comment keyword {kw:?}"))),
            }
            continue;
        }
        // A sample: name{labels} value
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(l) => parse_labels(l).map_err(at)?,
            None => (Vec::new(), &line[name_end..]),
        };
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("expected one space before the value".into()))?;
        if value.contains(' ') {
            return Err(at("extra fields after the value".into()));
        }
        let value = parse_value(value).map_err(at)?;
        let family = exp
            .types
            .iter()
            .find(|(fam, kind)| {
                suffixes(kind)
                    .iter()
                    .any(|suf| name.strip_suffix(suf) == Some(fam.as_str()))
            })
            .map(|(fam, _)| fam.clone())
            .ok_or_else(|| at(format!("sample {name} has no TYPE line before it")))?;
        if current.as_deref() != Some(family.as_str()) {
            return Err(at(format!(
                "sample of {family} outside its block (after {current:?})"
            )));
        }
        let kind = exp.types[&family].as_str();
        if kind == "counter" && (value.is_nan() || value < 0.0) {
            return Err(at("negative or NaN counter".into()));
        }
        if kind == "histogram" && name.ends_with("_bucket") && labels.iter().all(|(k, _)| k != "le")
        {
            return Err(at("bucket without le".into()));
        }
        let mut key_labels = labels.clone();
        key_labels.sort();
        if !seen.insert(format!("{name}{key_labels:?}")) {
            return Err(at("duplicate sample".into()));
        }
        with_samples.insert(family);
        exp.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    check_histograms(&exp)?;
    Ok(exp)
}

/// Buckets rise with `le`, are cumulative, end in `+Inf`, and `+Inf` equals `_count`.
fn check_histograms(exp: &Exposition) -> Result<(), String> {
    for (family, _) in exp.types.iter().filter(|(_, k)| *k == "histogram") {
        let mut series: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
        let without_le = |s: &Sample| -> String {
            let mut l: Vec<_> = s.labels.iter().filter(|(k, _)| k != "le").collect();
            l.sort();
            format!("{l:?}")
        };
        for s in exp
            .samples
            .iter()
            .filter(|s| s.name == format!("{family}_bucket"))
        {
            let le = parse_value(s.label("le").unwrap_or(""))
                .map_err(|e| format!("{family}: bad le: {e}"))?;
            series.entry(without_le(s)).or_default().push((le, s.value));
        }
        for (key, buckets) in series {
            for w in buckets.windows(2) {
                if w[0].0 >= w[1].0 || w[0].1 > w[1].1 || w[1].1.is_nan() {
                    return Err(format!("{family}{key}: buckets not rising: {buckets:?}"));
                }
            }
            let last = buckets.last().copied().unwrap_or((0.0, 0.0));
            if last.0 != f64::INFINITY {
                return Err(format!("{family}{key}: no +Inf bucket"));
            }
            let count = exp
                .samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && without_le(s) == key)
                .ok_or_else(|| format!("{family}{key}: no _count"))?;
            if count.value != last.1 {
                return Err(format!("{family}{key}: _count != +Inf bucket"));
            }
            exp.samples
                .iter()
                .find(|s| s.name == format!("{family}_sum") && without_le(s) == key)
                .ok_or_else(|| format!("{family}{key}: no _sum"))?;
        }
    }
    Ok(())
}

#[test]
fn exposition_parser_rejects_malformed_text() {
    let good = "# HELP a_total x\n# TYPE a counter\na_total{k=\"v\"} 1\n# EOF\n";
    parse_exposition(good).unwrap();
    for bad in [
        "# TYPE a counter\na_total 1\n",                      // no EOF
        "a_total 1\n# EOF\n",                                 // no TYPE
        "# TYPE a counter\na 1\n# EOF\n",                     // counter without _total
        "# TYPE a gauge\na{k=\"v\",} 1\n# EOF\n",             // trailing comma
        "# TYPE a gauge\na{k=v} 1\n# EOF\n",                  // unquoted
        "# TYPE a gauge\na one\n# EOF\n",                     // value
        "# TYPE a gauge\na 1 2 3\n# EOF\n",                   // extra fields
        "# TYPE a gauge\n# TYPE b gauge\na 1\n# EOF\n",       // out of block
        "# TYPE a gauge\na 1\n# HELP a x\n# EOF\n",           // metadata after samples
        "# TYPE a gauge\na 1\na 2\n# EOF\n",                  // duplicate
        "# TYPE a gauge\n\na 1\n# EOF\n",                     // empty line
        "# TYPE a gauge\n# FOO a\na 1\n# EOF\n",              // unknown keyword
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 1\n# EOF\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\nh_sum 1\n# EOF\n", // no +Inf
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted: {bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_parses() {
    let up = echo_upstream().await;
    let dead = closed_port().await;
    let p = start_proxy(&format!(
        "listeners:
  - name: obs
    address: 127.0.0.1:0
    routes:
      - name: down
        match: {{ path_prefix: /down }}
        upstream: dead
        retry: {{ attempts: 2, backoff: {{ base: 1ms, max: 2ms }}, when: [connect-failure] }}
        circuit_breaker: {{ minimum_requests: 50 }}
        rate_limit: {{ rate: 1000/s }}
        fallback: {{ when: [upstream_unavailable], status: 503, body: degraded }}
      - name: ok
        match: {{ path_prefix: / }}
        upstream: up
        concurrency_limit: {{ max: 10 }}
upstreams:
  up:
    endpoints: [{}]
    protocol: http1
  dead:
    endpoints: [{dead}]
    protocol: http1
    connect_timeout: 200ms
telemetry:
  access_log: false
",
        up.addr
    ))
    .await;
    for i in 0..3 {
        let (status, _, _) = get(&p.url(&format!("/x/{i}"))).await;
        assert_eq!(status, 200);
    }
    let (status, _, _) = send(Request::post(p.url("/x/post")).body(full("b")).unwrap()).await;
    assert_eq!(status, 200);
    for _ in 0..2 {
        let (status, headers, body) = get(&p.url("/down/y")).await;
        assert_eq!(status, 503, "{headers:?}");
        assert_eq!(&body[..], b"degraded");
    }
    // The harness config has no file behind it, so a reload fails (and is counted).
    let (status, _, body) = send(
        Request::post(p.admin_url("/reload"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{body:?}");

    let (status, headers, body) = get(&p.admin_url("/metrics")).await;
    assert_eq!(status, 200);
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ct}"
    );
    let text = String::from_utf8(body.to_vec()).expect("exposition is not UTF-8");
    let exp = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n---\n{text}"));

    // Every SPEC family is declared with its type.
    for (family, kind) in [
        ("breakwater_requests", "counter"),
        ("breakwater_request_duration_seconds", "histogram"),
        ("breakwater_upstream_attempts", "counter"),
        ("breakwater_retries", "counter"),
        ("breakwater_retry_budget_exhausted", "counter"),
        ("breakwater_circuit_state", "gauge"),
        ("breakwater_circuit_transitions", "counter"),
        ("breakwater_circuit_rejected", "counter"),
        ("breakwater_policy_observed", "counter"),
        ("breakwater_rate_limited", "counter"),
        ("breakwater_overloaded", "counter"),
        ("breakwater_timeouts", "counter"),
        ("breakwater_fallbacks", "counter"),
        ("breakwater_inflight_requests", "gauge"),
        ("breakwater_config_reloads", "counter"),
        ("breakwater_build_info", "gauge"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert_eq!(
            exp.types.get(family).map(String::as_str),
            Some(kind),
            "family {family}\n---\n{text}"
        );
    }

    // And the traffic shows up in it.
    let ok = [("listener", "obs"), ("route", "ok")];
    let get_ok = [ok[0], ok[1], ("method", "GET"), ("status", "200")];
    assert_eq!(
        exp.find("breakwater_requests_total", &get_ok),
        Some(3.0),
        "{text}"
    );
    let post_ok = [ok[0], ok[1], ("method", "POST"), ("status", "200")];
    assert_eq!(
        exp.find("breakwater_requests_total", &post_ok),
        Some(1.0),
        "{text}"
    );
    let down = [
        ("listener", "obs"),
        ("route", "down"),
        ("method", "GET"),
        ("status", "503"),
    ];
    assert_eq!(
        exp.find("breakwater_requests_total", &down),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        exp.find(
            "breakwater_request_duration_seconds_count",
            &[("route", "ok")]
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        exp.find(
            "breakwater_upstream_attempts_total",
            &[("route", "down"), ("outcome", "connect_error")]
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        exp.find(
            "breakwater_retries_total",
            &[("route", "down"), ("reason", "connect-failure")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        exp.find(
            "breakwater_fallbacks_total",
            &[("route", "down"), ("reason", "upstream_unavailable")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        exp.find("breakwater_config_reloads_total", &[("result", "failure")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        exp.find("breakwater_circuit_state", &[("route", "down")]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        exp.find(
            "breakwater_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(exp.find("process_start_time_seconds", &[]).unwrap() > 1.0e9);

    // The dashboard queries only metric names this exposition declares.
    for expr in dashboard_exprs() {
        let mut rest = expr.as_str();
        while let Some(i) = rest.find(|c: char| c.is_ascii_lowercase()) {
            rest = &rest[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let word = &rest[..end];
            rest = &rest[end..];
            if word.starts_with("breakwater_") || word.starts_with("process_") {
                let known = exp.types.iter().any(|(fam, kind)| {
                    suffixes(kind)
                        .iter()
                        .any(|suf| word.strip_suffix(suf) == Some(fam.as_str()))
                });
                assert!(known, "dashboard uses unknown metric {word} in {expr}");
            }
        }
    }
}
