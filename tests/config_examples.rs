//! The example and benchmark configs shipped in the repository load and validate.

use std::path::Path;

fn check(rel: &str) -> breakwater::config::Loaded {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    match breakwater::config::load(&path) {
        Ok(loaded) => loaded,
        Err(e) => panic!("{rel} does not load:\n{e}"),
    }
}

#[test]
fn sidecar_example_loads() {
    let l = check("config/breakwater.yaml");
    let names: Vec<_> = l.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["write", "read"]);
    assert!(l.routes[0].retry.is_none(), "writes are not retried");
    assert_eq!(l.routes[1].retry.as_ref().map(|r| r.attempts), Some(3));
    assert!(l.routes.iter().all(|r| r.circuit_breaker.is_some()));
}

#[test]
fn gateway_example_loads() {
    check("config/gateway.yaml");
}

#[test]
fn demo_config_loads() {
    let l = check("config/demo.yaml");
    let names: Vec<_> = l.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["api", "limited", "raw"]);
    let raw = &l.routes[2];
    assert!(raw.retry.is_none() && raw.circuit_breaker.is_none() && raw.fallback.is_none());
}

#[test]
fn bench_bare_config_loads() {
    let l = check("bench/breakwater-bare.yaml");
    for r in &l.routes {
        assert!(r.timeout.is_none() && r.retry.is_none() && r.circuit_breaker.is_none());
        assert!(r.rate_limit.is_none() && r.concurrency_limit.is_none() && r.fallback.is_none());
    }
}

#[test]
fn bench_layers_config_loads() {
    let l = check("bench/breakwater-layers.yaml");
    assert_eq!(l.routes.len(), 2);
    for r in &l.routes {
        assert!(r.timeout.is_some() && r.retry.is_some() && r.circuit_breaker.is_some());
        assert!(r.rate_limit.is_some() && r.concurrency_limit.is_some() && r.fallback.is_some());
    }
}
