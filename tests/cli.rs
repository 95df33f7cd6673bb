//! The `breakwater` binary (SPEC section 1): exit codes, `validate` messages for each
//! class of config error, `routes` output, and `run` binding, serving and stopping on
//! SIGTERM. Every child process is waited for with a deadline and killed if it overstays.
mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;

const BIN: &str = env!("CARGO_BIN_EXE_breakwater");

/// A temporary folder for config files and child output, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "breakwater-cli-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary, run from the crate root with a clean environment for its own variables.
fn bin() -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("BREAKWATER_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Output files for a child, so that a chatty child never blocks on a full pipe.
struct Captured {
    out: PathBuf,
    err: PathBuf,
}

impl Captured {
    fn attach(dir: &TempDir, tag: &str, cmd: &mut Command) -> Captured {
        let out = dir.0.join(format!("{tag}.stdout"));
        let err = dir.0.join(format!("{tag}.stderr"));
        cmd.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        Captured { out, err }
    }
    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

/// Waits for a child with a deadline; kills it (by its handle) when the deadline passes.
fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a short command to the end (at most 10 s).
fn run(args: &[&str]) -> Output {
    let dir = TempDir::new("run");
    let mut cmd = bin();
    cmd.args(args);
    run_cmd(&dir, cmd)
}

fn run_cmd(dir: &TempDir, mut cmd: Command) -> Output {
    let cap = Captured::attach(dir, "cmd", &mut cmd);
    let mut child = cmd.spawn().expect("cannot start breakwater");
    let status = wait_for(&mut child, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{cmd:?} did not finish in 10s: {}", cap.stderr()));
    Output {
        status,
        stdout: cap.stdout(),
        stderr: cap.stderr(),
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn version_and_usage_errors() {
    let o = run(&["--version"]);
    assert_eq!(o.status.code(), Some(0), "{}", o.stderr);
    assert!(
        o.stdout.contains(env!("CARGO_PKG_VERSION")) && o.stdout.contains("breakwater"),
        "{}",
        o.stdout
    );

    let o = run(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2), "unknown subcommand: {}", o.stderr);
    assert!(o.stderr.contains("frobnicate"), "{}", o.stderr);

    let o = run(&["validate", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "unknown flag: {}", o.stderr);

    let o = run(&["--log-format", "xml", "validate"]);
    assert_eq!(o.status.code(), Some(2), "bad flag value: {}", o.stderr);
}

#[test]
fn shipped_configs_validate() {
    for f in [
        "config/breakwater.yaml",
        "config/gateway.yaml",
        "config/demo.yaml",
    ] {
        let o = run(&["validate", "-c", f]);
        assert_eq!(o.status.code(), Some(0), "{f}: {}{}", o.stdout, o.stderr);
        assert!(o.stdout.starts_with("OK"), "{f}: {:?}", o.stdout);
        assert_eq!(o.stdout.lines().count(), 1, "one line: {:?}", o.stdout);
    }
    // the default file, and the file named by BREAKWATER_CONFIG
    let o = run(&["validate"]);
    assert_eq!(o.status.code(), Some(0), "{}", o.stderr);
    assert!(o.stdout.starts_with("OK") && o.stdout.contains("config/breakwater.yaml"));
    let dir = TempDir::new("env");
    let mut cmd = bin();
    cmd.arg("validate")
        .env("BREAKWATER_CONFIG", "config/demo.yaml");
    let o = run_cmd(&dir, cmd);
    assert_eq!(o.status.code(), Some(0), "{}", o.stderr);
    assert!(
        o.stdout.starts_with("OK") && o.stdout.contains("demo.yaml"),
        "{}",
        o.stdout
    );
    // -c wins over the environment
    let mut cmd = bin();
    cmd.args(["validate", "-c", "config/gateway.yaml"])
        .env("BREAKWATER_CONFIG", "config/demo.yaml");
    let o = run_cmd(&dir, cmd);
    assert!(o.stdout.contains("gateway.yaml"), "{}", o.stdout);
    // a file that does not exist
    let o = run(&["validate", "-c", "config/does-not-exist.yaml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stderr.contains("does-not-exist.yaml"), "{}", o.stderr);
}

const BASE: &str = "\
listeners:
  - name: inbound
    address: 127.0.0.1:8080
    routes:
      - name: all
        match: { path_prefix: / }
        upstream: app
upstreams:
  app:
    endpoints: [127.0.0.1:9000]
  billing:
    endpoints: [127.0.0.1:9001]
";

/// One located error: `error: FILE:LINE:COL: KEY.PATH: message`, then maybe `  hint: ...`.
struct Located {
    line: u64,
    column: u64,
    rest: String,
    hint: Option<String>,
}

fn located(file: &Path, stderr: &str) -> Located {
    let prefix = format!("error: {}:", file.display());
    let mut lines = stderr.lines();
    let first = lines
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}LINE:COL` error in:\n{stderr}"));
    let after = &first[prefix.len()..];
    let mut parts = after.splitn(3, ':');
    let line = parts.next().unwrap().parse().unwrap_or_else(|_| {
        panic!("no line number in {first:?}");
    });
    let column = parts.next().unwrap().parse().unwrap_or_else(|_| {
        panic!("no column number in {first:?}");
    });
    let rest = parts.next().unwrap_or("").trim().to_string();
    let hint = lines
        .next()
        .and_then(|l| l.trim_start().strip_prefix("hint:"))
        .map(|h| h.trim().to_string());
    Located {
        line,
        column,
        rest,
        hint,
    }
}

struct Case {
    name: &'static str,
    text: String,
    line: u64,
    key: &'static str,
    message: &'static str,
    /// Words of the fix, in the hint line or the message.
    hint: &'static str,
}

#[test]
fn each_config_error_class_is_located_and_explained() {
    let dir = TempDir::new("errors");
    let cases = vec![
        Case {
            name: "unknown-key",
            text: BASE.replace(
                "upstream: app\n",
                "upstream: app\n        retry: { attempts: 2, bogus: 1 }\n",
            ),
            line: 8,
            key: "listeners[0].routes[0].retry.bogus",
            message: "bogus",
            hint: "remove the key or fix its spelling",
        },
        Case {
            name: "bad-duration",
            text: BASE.replace(
                "upstream: app\n",
                "upstream: app\n        retry:\n          backoff: { base: 25, max: 1s }\n",
            ),
            line: 9,
            key: "listeners[0].routes[0].retry.backoff.base",
            message: "no unit",
            hint: "25ms",
        },
        Case {
            name: "bad-rate",
            text: BASE.replace(
                "upstream: app\n",
                "upstream: app\n        rate_limit: { rate: 10/fortnight }\n",
            ),
            line: 8,
            key: "listeners[0].routes[0].rate_limit.rate",
            message: "rate",
            hint: "100/s",
        },
        Case {
            name: "undefined-upstream",
            text: BASE.replace("upstream: app\n", "upstream: orders\n"),
            line: 7,
            key: "listeners[0].routes[0].upstream",
            message: "\"orders\" is not defined",
            hint: "app, billing",
        },
        Case {
            name: "duplicate-route",
            text: BASE.replace(
                "        upstream: app\n",
                "        upstream: app\n      - name: all\n        upstream: billing\n",
            ),
            line: 8,
            key: "listeners[0].routes[1].name",
            message: "used twice",
            hint: "unique",
        },
        Case {
            name: "tls",
            text: BASE.replace(
                "    routes:\n",
                "    tls: { cert: cert.pem, key: key.pem }\n    routes:\n",
            ),
            line: 4,
            key: "listeners[0].tls",
            message: "not supported",
            hint: "terminate TLS in front",
        },
        Case {
            name: "missing-key",
            text: BASE.replace("    endpoints: [127.0.0.1:9000]\n", "    protocol: http1\n"),
            line: 10,
            key: "upstreams.app.endpoints",
            message: "endpoints",
            hint: "add the key",
        },
        Case {
            name: "bad-percentage",
            text: BASE.replace(
                "upstream: app\n",
                "upstream: app\n        circuit_breaker: { failure_rate: 150% }\n",
            ),
            line: 8,
            key: "listeners[0].routes[0].circuit_breaker.failure_rate",
            message: "150",
            hint: "100%",
        },
    ];
    for c in cases {
        assert_ne!(
            c.text, BASE,
            "{}: the case did not change the config",
            c.name
        );
        let file = dir.file(&format!("{}.yaml", c.name), &c.text);
        let o = run(&["validate", "-c", file.to_str().unwrap()]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}: {}{}",
            c.name,
            o.stdout,
            o.stderr
        );
        assert!(!o.stdout.contains("OK"), "{}: {}", c.name, o.stdout);
        let e = located(&file, &o.stderr);
        assert_eq!(e.line, c.line, "{}: {}", c.name, o.stderr);
        assert!(e.column > 0, "{}: {}", c.name, o.stderr);
        assert!(
            e.rest.starts_with(&format!("{}: ", c.key)),
            "{}: expected key path {} in {:?}",
            c.name,
            c.key,
            e.rest
        );
        assert!(e.rest.contains(c.message), "{}: {}", c.name, o.stderr);
        let fix = format!("{} {}", e.rest, e.hint.clone().unwrap_or_default());
        assert!(
            fix.contains(c.hint),
            "{}: no hint {:?} in {}",
            c.name,
            c.hint,
            o.stderr
        );
    }

    // a syntax error names the line
    let file = dir.file("syntax.yaml", "listeners: [\n  { name: x\n");
    let o = run(&["validate", "-c", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", o.stderr);
    let e = located(&file, &o.stderr);
    assert!(
        (1..=3).contains(&e.line),
        "line {} for a 2-line file: {}",
        e.line,
        o.stderr
    );

    // several problems are all reported in one run
    let text = BASE
        .replace(
            "upstream: app\n",
            "upstream: nope\n        policy: missing\n",
        )
        .replace("address: 127.0.0.1:8080", "address: localhost");
    let file = dir.file("several.yaml", &text);
    let o = run(&["validate", "-c", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    for key in [
        "listeners[0].address",
        "listeners[0].routes[0].upstream",
        "listeners[0].routes[0].policy",
    ] {
        assert!(o.stderr.contains(key), "{key} missing from:\n{}", o.stderr);
    }
}

#[test]
fn missing_required_key_names_the_full_key_path() {
    let dir = TempDir::new("missing");
    let text = BASE.replace("upstream: app\n", "upstream: x\n").replace(
        "  app:\n    endpoints: [127.0.0.1:9000]\n",
        "  x:\n    protocol: http1\n",
    );
    let file = dir.file("missing.yaml", &text);
    let o = run(&["validate", "-c", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", o.stderr);
    let e = located(&file, &o.stderr);
    assert!(
        e.rest.starts_with("upstreams.x.endpoints: "),
        "expected the key path upstreams.x.endpoints: {}",
        o.stderr
    );
}

/// The stack lines of one route in `routes` output, trimmed.
fn stack_of(out: &str, route: &str) -> Vec<String> {
    let header = format!("  route {route} ");
    let mut lines = out.lines().skip_while(|l| !l.starts_with(&header));
    assert!(lines.next().is_some(), "no route {route} in:\n{out}");
    lines
        .take_while(|l| !l.starts_with("  route ") && !l.starts_with("listener "))
        .map(|l| l.trim().to_string())
        .collect()
}

fn assert_order(stack: &[String], want: &[&str]) {
    let mut last = None;
    for w in want {
        let pos = stack
            .iter()
            .position(|l| {
                l == w || l.starts_with(&format!("{w}:")) || l.starts_with(&format!("{w} "))
            })
            .unwrap_or_else(|| panic!("no {w} line in {stack:#?}"));
        if let Some((prev, p)) = last {
            assert!(pos > p, "{w} comes before {prev}: {stack:#?}");
        }
        last = Some((*w, pos));
    }
}

#[test]
fn routes_prints_stacks_in_spec_order() {
    let o = run(&["routes", "-c", "config/demo.yaml"]);
    assert_eq!(o.status.code(), Some(0), "{}", o.stderr);
    let api = stack_of(&o.stdout, "api");
    assert_order(
        &api,
        &["metrics", "fallback", "timeout", "retry", "circuit_breaker"],
    );
    assert!(api.iter().any(|l| l == "timeout: 2s"), "{api:#?}");
    assert!(
        api.iter().any(|l| l.contains("per_try_timeout 500ms")),
        "{api:#?}"
    );
    let limited = stack_of(&o.stdout, "limited");
    assert_order(&limited, &["metrics", "rate_limit", "timeout"]);
    assert!(
        !limited.iter().any(|l| l.starts_with("retry")),
        "{limited:#?}"
    );
    let names: Vec<&str> = o
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  route "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["api", "limited", "raw"]);

    // every block at once, in the order of SPEC section 2
    let dir = TempDir::new("routes");
    let text = BASE.replace(
        "upstream: app\n",
        "upstream: app
        timeout: 3s
        retry: { attempts: 2, per_try_timeout: 1s }
        circuit_breaker: { failure_rate: 50% }
        rate_limit: { rate: 10/s }
        concurrency_limit: { max: 8 }
        fallback: { when: [circuit_open], status: 503 }
",
    );
    let file = dir.file("all.yaml", &text);
    let o = run(&["routes", "-c", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", o.stderr);
    let all = stack_of(&o.stdout, "all");
    assert_order(
        &all,
        &[
            "metrics",
            "fallback",
            "rate_limit",
            "concurrency_limit",
            "timeout",
            "retry",
            "circuit_breaker",
            "attempt",
            "upstream",
        ],
    );

    // an invalid file: exit 1, like validate
    let bad = dir.file(
        "bad.yaml",
        &BASE.replace("upstream: app\n", "upstream: nope\n"),
    );
    let o = run(&["routes", "-c", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", o.stdout);
}

fn run_config(listen: &str, admin: &str, upstream: SocketAddr) -> String {
    format!(
        "admin:
  address: {admin}
listeners:
  - name: inbound
    address: {listen}
    routes:
      - name: all
        match: {{ path_prefix: / }}
        upstream: app
upstreams:
  app:
    endpoints: [{upstream}]
    connect_timeout: 200ms
shutdown:
  drain_delay: 0s
  drain_timeout: 2s
telemetry:
  access_log: false
"
    )
}

#[test]
fn run_with_a_taken_port_fails_clearly() {
    let dir = TempDir::new("taken");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let file = dir.file(
        "taken.yaml",
        &run_config(&addr.to_string(), &admin, "127.0.0.1:9".parse().unwrap()),
    );
    let mut cmd = bin();
    cmd.args(["run", "-c", file.to_str().unwrap()]);
    let o = run_cmd(&dir, cmd);
    assert_eq!(o.status.code(), Some(1), "{}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains("cannot listen on") && o.stderr.contains(&addr.to_string()),
        "{}",
        o.stderr
    );

    // the admin port taken
    let listen = format!("127.0.0.1:{}", free_port());
    let file = dir.file(
        "admin-taken.yaml",
        &run_config(&listen, &addr.to_string(), "127.0.0.1:9".parse().unwrap()),
    );
    let mut cmd = bin();
    cmd.args(["run", "-c", file.to_str().unwrap()]);
    let o = run_cmd(&dir, cmd);
    assert_eq!(o.status.code(), Some(1), "{}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains("admin") && o.stderr.contains(&addr.to_string()),
        "{}",
        o.stderr
    );
    drop(taken);

    // an invalid config never starts
    let file = dir.file(
        "invalid.yaml",
        &BASE.replace("upstream: app\n", "upstream: nope\n"),
    );
    let mut cmd = bin();
    cmd.args(["run", "-c", file.to_str().unwrap()]);
    let o = run_cmd(&dir, cmd);
    assert_eq!(o.status.code(), Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("is not defined"), "{}", o.stderr);
}

/// GET that reports failures instead of panicking (the child may not be up yet).
async fn try_get(url: &str) -> Option<(u16, bytes::Bytes)> {
    let req = Request::get(url).body(support::full("")).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(2), support::h1_client().request(req))
        .await
        .ok()?
        .ok()?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

/// Kills the child if the test fails before it exits.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_and_exits_zero_on_sigterm() {
    let up = support::echo_upstream().await;
    let dir = TempDir::new("sigterm");
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let file = dir.file("run.yaml", &run_config(&listen, &admin, up.addr));
    let mut cmd = bin();
    cmd.args(["run", "-c", file.to_str().unwrap()]);
    let cap = Captured::attach(&dir, "run", &mut cmd);
    let mut guard = ChildGuard(Some(cmd.spawn().expect("cannot start breakwater")));
    let pid = guard.0.as_ref().unwrap().id();

    // ready within a few seconds
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((200, _)) = try_get(&format!("http://{admin}/readyz")).await {
            break;
        }
        if let Some(status) = guard.0.as_mut().unwrap().try_wait().unwrap() {
            panic!("breakwater exited early ({status}): {}", cap.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "not ready after 10s: {}",
            cap.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, body) = try_get(&format!("http://{listen}/hello?x=1"))
        .await
        .expect("request through the proxy failed");
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"path=/hello?x=1");
    assert_eq!(up.hits(), 1);

    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill failed to run");
    assert!(kill.success());
    let child = guard.0.take().unwrap();
    let (status, child) = tokio::task::spawn_blocking(move || {
        let mut child = child;
        let s = wait_for(&mut child, Duration::from_secs(5));
        (s, child)
    })
    .await
    .unwrap();
    guard.0 = Some(child);
    let status = status.unwrap_or_else(|| {
        panic!(
            "still running 5s after SIGTERM (drain_timeout 2s): {}",
            cap.stderr()
        )
    });
    assert_eq!(status.code(), Some(0), "{}", cap.stderr());
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "{:?}",
        sent.elapsed()
    );
    assert!(cap.stderr().contains("SIGTERM"), "{}", cap.stderr());
    // the ports are released
    assert!(std::net::TcpStream::connect(&listen).is_err());
}
