use super::*;

const MINIMAL: &str = "\
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
";

fn errors(text: &str) -> Vec<ConfigError> {
    from_yaml(text, "test.yaml", Path::new(".")).unwrap_err().0
}

#[test]
fn minimal_config_gets_defaults() {
    let l = from_yaml(MINIMAL, "test.yaml", Path::new(".")).unwrap();
    let r = &l.routes[0];
    assert_eq!(r.timeout, Some(values::Dur(DEFAULT_TIMEOUT)));
    assert!(r.retry.is_none() && r.circuit_breaker.is_none() && r.rate_limit.is_none());
    assert_eq!(l.config.admin.address.value, "127.0.0.1:9901");
}

#[test]
fn unknown_key_names_line_and_path() {
    let text = MINIMAL.replace(
        "upstream: app",
        "upstream: app\n        retry: { attempts: 2, bogus: 1 }",
    );
    let e = &errors(&text)[0];
    eprintln!("{e}");
    assert_eq!(e.path, "listeners[0].routes[0].retry.bogus");
    assert_eq!(e.line, 8);
    assert!(e.message.contains("bogus"), "{}", e.message);
    assert!(e.hint.is_some());
}

#[test]
fn bad_duration_names_key() {
    let text = MINIMAL.replace(
        "upstream: app",
        "upstream: app\n        retry:\n          backoff: { base: 25, max: 1s }",
    );
    let e = &errors(&text)[0];
    eprintln!("{e}");
    assert_eq!(e.path, "listeners[0].routes[0].retry.backoff.base");
    assert_eq!(e.line, 9);
    assert!(e.message.contains("no unit"), "{}", e.message);
}

#[test]
fn undefined_upstream_and_policy_are_both_reported() {
    let text = MINIMAL.replace("upstream: app", "upstream: nope\n        policy: missing");
    let errs = errors(&text);
    eprintln!("{}", ConfigErrors(errs.clone()));
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0].path, "listeners[0].routes[0].upstream");
    assert_eq!(errs[0].line, 7);
    assert!(errs[0].hint.as_deref().unwrap().contains("app"));
    assert_eq!(errs[1].path, "listeners[0].routes[0].policy");
}

#[test]
fn inline_block_replaces_policy_block_wholesale() {
    let text = format!(
        "{MINIMAL}policies:\n  std:\n    timeout: 3s\n    retry: {{ attempts: 4, per_try_timeout: 1s }}\n    rate_limit: {{ rate: 10/s }}\n"
    )
    .replace(
        "upstream: app\n",
        "upstream: app\n        policy: std\n        retry: { attempts: 2 }\n        rate_limit: false\n",
    );
    let l = from_yaml(&text, "test.yaml", Path::new(".")).unwrap();
    let r = &l.routes[0];
    assert_eq!(r.timeout, Some(values::Dur::secs(3)));
    let retry = r.retry.as_ref().unwrap();
    assert_eq!(retry.attempts, 2);
    assert_eq!(retry.per_try_timeout, None, "no deep merge");
    assert!(
        r.rate_limit.is_none(),
        "false switches the policy's block off"
    );
}

#[test]
fn off_and_false_switch_blocks_off() {
    for word in ["false", "off"] {
        let text = MINIMAL.replace(
            "upstream: app",
            &format!("upstream: app\n        timeout: {word}\n        retry: {word}"),
        );
        let l = from_yaml(&text, "test.yaml", Path::new(".")).unwrap();
        assert_eq!(l.routes[0].timeout, None);
        assert!(l.routes[0].retry.is_none());
    }
}

#[test]
fn duplicate_route_names_and_bad_values() {
    let text = MINIMAL.replace(
        "        upstream: app\n",
        "        upstream: app\n        circuit_breaker: { failure_rate: 150% }\n      - name: all\n        upstream: app\n",
    );
    let errs = errors(&text);
    eprintln!("{}", ConfigErrors(errs.clone()));
    assert!(
        errs[0].path.ends_with("circuit_breaker.failure_rate"),
        "{:?}",
        errs[0]
    );
}

#[test]
fn duplicate_route_name_is_reported() {
    let text = MINIMAL.replace(
        "        upstream: app\n",
        "        upstream: app\n      - name: all\n        upstream: app\n",
    );
    let errs = errors(&text);
    assert_eq!(errs[0].path, "listeners[0].routes[1].name");
    assert!(errs[0].message.contains("used twice"));
}

#[test]
fn syntax_error_has_location() {
    let e = &errors("listeners: [\n  { name: x\n")[0];
    eprintln!("{e}");
    assert!(e.line >= 1);
}

#[test]
fn conditions_parse() {
    let text = MINIMAL.replace(
        "upstream: app",
        "upstream: app\n        retry: { when: [5xx, 503, grpc-unavailable, connect-failure] }",
    );
    let l = from_yaml(&text, "test.yaml", Path::new(".")).unwrap();
    let when = &l.routes[0].retry.as_ref().unwrap().when;
    assert_eq!(when[2], Condition::Grpc(14));
    let text = MINIMAL.replace(
        "upstream: app",
        "upstream: app\n        retry: { when: [grpc-nope] }",
    );
    assert!(errors(&text)[0].message.contains("gRPC"));
}
