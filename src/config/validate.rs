//! Semantic checks the YAML types cannot express (references, uniqueness, cross-field
//! rules), and resolution of each route's effective blocks from its policy and inline
//! overrides. All errors are collected, so one `validate` run shows every problem.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::model::*;
use super::values::{Dur, TimeoutSetting, Toggle};
use super::{ConfigError, ConfigErrors};

/// The whole-request deadline a route gets when neither it nor its policy sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// A route with its policy and inline blocks resolved: what the stack builder builds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EffectiveRoute {
    /// The listener the route belongs to.
    pub listener: String,
    /// The route's unique name.
    pub name: String,
    /// The upstream it forwards to.
    pub upstream: String,
    /// Its match conditions.
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    /// Prefix removed before forwarding.
    pub strip_prefix: Option<String>,
    /// Whole-request deadline, if any.
    pub timeout: Option<Dur>,
    /// Retry settings, if on.
    pub retry: Option<RetryConfig>,
    /// Breaker settings, if on.
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Rate limit, if on.
    pub rate_limit: Option<RateLimitConfig>,
    /// Concurrency limit, if on.
    pub concurrency_limit: Option<ConcurrencyLimitConfig>,
    /// Fallback response, if on.
    pub fallback: Option<FallbackConfig>,
}

struct Errs<'a> {
    file: &'a str,
    list: Vec<ConfigError>,
}

impl Errs<'_> {
    fn push(&mut self, at: (u64, u64), path: String, message: String, hint: Option<&str>) {
        self.list.push(ConfigError {
            file: self.file.to_string(),
            line: at.0,
            column: at.1,
            path,
            message,
            hint: hint.map(str::to_string),
        });
    }
}

fn loc<T>(v: &At<T>) -> (u64, u64) {
    (v.referenced.line(), v.referenced.column())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks the config, fills in loaded data (fallback bodies) and returns the effective routes.
pub fn validate(
    config: &mut Config,
    file: &str,
    base: &Path,
) -> Result<Vec<EffectiveRoute>, ConfigErrors> {
    let mut errs = Errs {
        file,
        list: Vec::new(),
    };

    if config.admin.address.value.parse::<SocketAddr>().is_err() {
        errs.push(
            loc(&config.admin.address),
            "admin.address".into(),
            format!("{:?} is not an ip:port address", config.admin.address.value),
            Some("write it like 127.0.0.1:9901"),
        );
    }

    for (name, up) in &config.upstreams {
        let path = format!("upstreams.{name}");
        if up.endpoints.value.is_empty() {
            errs.push(
                loc(&up.endpoints),
                format!("{path}.endpoints"),
                "an upstream needs at least one endpoint".into(),
                Some("list host:port endpoints, like [127.0.0.1:9000]"),
            );
        }
        for (i, ep) in up.endpoints.value.iter().enumerate() {
            if !valid_endpoint(ep) {
                errs.push(
                    loc(&up.endpoints),
                    format!("{path}.endpoints[{i}]"),
                    format!("{ep:?} is not a host:port endpoint"),
                    Some("write it like 127.0.0.1:9000 or orders.internal:8080"),
                );
            }
        }
        if let Some(tls) = &up.tls {
            errs.push(
                loc(tls),
                format!("{path}.tls"),
                "TLS to upstreams is not supported by this build".into(),
                Some("remove `tls` and reach the upstream over cleartext, or put a TLS-originating sidecar beside it"),
            );
        }
        if up.connect_timeout.0.is_zero() {
            errs.push(
                loc(&up.endpoints),
                format!("{path}.connect_timeout"),
                "a connect timeout of 0 would fail every connection".into(),
                Some("use a duration like 1s"),
            );
        }
    }

    for (name, policy) in config.policies.iter_mut() {
        let path = format!("policies.{name}");
        let at = loc(policy);
        if let Some(Toggle::On(fb)) = &mut policy.value.fallback {
            load_fallback(&mut errs, &format!("{path}.fallback"), at, fb, base);
        }
        check_blocks(
            &mut errs,
            &path,
            loc(policy),
            &policy.value.retry,
            &policy.value.circuit_breaker,
            &policy.value.rate_limit,
        );
    }

    if config.listeners.is_empty() {
        errs.push(
            (0, 0),
            "listeners".into(),
            "no listeners are configured".into(),
            Some("add a listener with a name, an address and routes"),
        );
    }

    let mut listener_names = HashSet::new();
    let mut addresses = HashSet::new();
    let mut route_names = HashSet::new();
    let mut routes = Vec::new();
    let known_upstreams: Vec<&str> = config.upstreams.keys().map(String::as_str).collect();
    let known_policies: Vec<&str> = config.policies.keys().map(String::as_str).collect();

    for (li, l) in config.listeners.iter_mut().enumerate() {
        let lpath = format!("listeners[{li}]");
        if !valid_name(&l.name.value) {
            errs.push(
                loc(&l.name),
                format!("{lpath}.name"),
                format!("listener name {:?} is not allowed", l.name.value),
                Some("use letters, digits, '.', '_' and '-'"),
            );
        } else if !listener_names.insert(l.name.value.clone()) {
            errs.push(
                loc(&l.name),
                format!("{lpath}.name"),
                format!("listener name {:?} is used twice", l.name.value),
                Some("give each listener its own name"),
            );
        }
        match l.address.value.parse::<SocketAddr>() {
            Ok(a) => {
                if a.port() != 0 && !addresses.insert(a) {
                    errs.push(
                        loc(&l.address),
                        format!("{lpath}.address"),
                        format!("address {a} is used by another listener"),
                        Some("give each listener its own port"),
                    );
                }
            }
            Err(_) => errs.push(
                loc(&l.address),
                format!("{lpath}.address"),
                format!("{:?} is not an ip:port address", l.address.value),
                Some("write it like 0.0.0.0:8080 or 127.0.0.1:8080"),
            ),
        }
        if l.protocols.is_empty() {
            errs.push(
                loc(&l.address),
                format!("{lpath}.protocols"),
                "no protocols are enabled".into(),
                Some("use [http1, http2], or leave the key out for both"),
            );
        }
        if let Some(tls) = &l.tls {
            errs.push(
                loc(tls),
                format!("{lpath}.tls"),
                "TLS termination is not supported by this build".into(),
                Some("remove `tls` and terminate TLS in front of breakwater (a load balancer or ingress)"),
            );
        }
        if l.max_header_bytes.0 < 1024 || l.max_header_bytes.0 > 16 << 20 {
            errs.push(
                loc(&l.address),
                format!("{lpath}.max_header_bytes"),
                format!("{} bytes is out of range", l.max_header_bytes.0),
                Some("use a size from 1KiB to 16MiB; 64KiB is the default"),
            );
        }
        if l.header_read_timeout.0.is_zero() || l.idle_timeout.0.is_zero() {
            errs.push(
                loc(&l.address),
                lpath.clone(),
                "header_read_timeout and idle_timeout must be above 0".into(),
                Some("use durations like 10s and 60s"),
            );
        }
        if l.routes.is_empty() {
            errs.push(
                loc(&l.name),
                format!("{lpath}.routes"),
                "a listener needs at least one route".into(),
                Some("add a route, e.g. { name: all, match: { path_prefix: / }, upstream: NAME }"),
            );
        }

        for (ri, r) in l.routes.iter_mut().enumerate() {
            let rpath = format!("{lpath}.routes[{ri}]");
            let at = loc(&r.name);
            if !valid_name(&r.name.value) {
                errs.push(
                    at,
                    format!("{rpath}.name"),
                    format!("route name {:?} is not allowed", r.name.value),
                    Some("use letters, digits, '.', '_' and '-' (the name appears in metrics and URLs)"),
                );
            } else if !route_names.insert(r.name.value.clone()) {
                errs.push(
                    at,
                    format!("{rpath}.name"),
                    format!("route name {:?} is used twice", r.name.value),
                    Some("route names are unique across all listeners; rename one"),
                );
            }
            if !config.upstreams.contains_key(&r.upstream.value) {
                errs.push(
                    loc(&r.upstream),
                    format!("{rpath}.upstream"),
                    format!("upstream {:?} is not defined", r.upstream.value),
                    Some(&format!(
                        "define it under `upstreams`, or use one of: {}",
                        list_or_none(&known_upstreams)
                    )),
                );
            }
            let policy = match &r.policy {
                Some(p) => match config.policies.get(&p.value) {
                    Some(pc) => Some(&pc.value),
                    None => {
                        errs.push(
                            loc(p),
                            format!("{rpath}.policy"),
                            format!("policy {:?} is not defined", p.value),
                            Some(&format!(
                                "define it under `policies`, or use one of: {}",
                                list_or_none(&known_policies)
                            )),
                        );
                        None
                    }
                },
                None => None,
            };
            check_match(&mut errs, &rpath, at, &r.matcher);
            if let Some(sp) = &r.strip_prefix {
                if !sp.starts_with('/') {
                    errs.push(
                        at,
                        format!("{rpath}.strip_prefix"),
                        format!("{sp:?} does not start with '/'"),
                        Some("write it like /api"),
                    );
                }
            }
            check_blocks(
                &mut errs,
                &rpath,
                at,
                &r.retry,
                &r.circuit_breaker,
                &r.rate_limit,
            );
            if let Some(Toggle::On(fb)) = &mut r.fallback {
                load_fallback(&mut errs, &format!("{rpath}.fallback"), at, fb, base);
            }

            let pick = |inline: &Option<TimeoutSetting>, pol: Option<&Option<TimeoutSetting>>| {
                match inline.or_else(|| pol.and_then(|p| *p)) {
                    Some(TimeoutSetting::Off) => None,
                    Some(TimeoutSetting::After(d)) => Some(d),
                    None => Some(Dur(DEFAULT_TIMEOUT)),
                }
            };
            let fallback = resolve(&r.fallback, policy.map(|p| &p.fallback));
            if r.matcher.grpc_service.is_some() {
                if let Some(up) = config.upstreams.get(&r.upstream.value) {
                    if up.protocol != Protocol::Http2 {
                        errs.push(
                            at,
                            format!("{rpath}.match.grpc_service"),
                            format!(
                                "gRPC route forwards to upstream {:?}, which speaks http1",
                                r.upstream.value
                            ),
                            Some("set `protocol: http2` on the upstream; gRPC needs HTTP/2"),
                        );
                    }
                }
            }
            routes.push(EffectiveRoute {
                listener: l.name.value.clone(),
                name: r.name.value.clone(),
                upstream: r.upstream.value.clone(),
                matcher: r.matcher.clone(),
                strip_prefix: r.strip_prefix.clone(),
                timeout: pick(&r.timeout, policy.map(|p| &p.timeout)),
                retry: resolve(&r.retry, policy.map(|p| &p.retry)),
                circuit_breaker: resolve(&r.circuit_breaker, policy.map(|p| &p.circuit_breaker)),
                rate_limit: resolve(&r.rate_limit, policy.map(|p| &p.rate_limit)),
                concurrency_limit: resolve(
                    &r.concurrency_limit,
                    policy.map(|p| &p.concurrency_limit),
                ),
                fallback,
            });
        }
    }

    if let Some(Toggle::On(t)) = &config.telemetry.tracing {
        if !matches!(t.otlp_protocol.as_str(), "http" | "grpc") {
            errs.push(
                (0, 0),
                "telemetry.tracing.otlp_protocol".into(),
                format!("unknown OTLP protocol {:?}", t.otlp_protocol),
                Some("use http or grpc"),
            );
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            errs.push(
                (0, 0),
                "telemetry.tracing.sample_ratio".into(),
                format!("sample_ratio {} is out of range", t.sample_ratio),
                Some("use a number from 0 to 1"),
            );
        }
        if t.otlp_endpoint.starts_with("https://") {
            errs.push(
                (0, 0),
                "telemetry.tracing.otlp_endpoint".into(),
                "https collector endpoints need TLS, which this build does not have".into(),
                Some("use an http:// endpoint, e.g. a collector sidecar on http://127.0.0.1:4318"),
            );
        } else if !t.otlp_endpoint.starts_with("http://") {
            errs.push(
                (0, 0),
                "telemetry.tracing.otlp_endpoint".into(),
                format!("{:?} is not an http URL", t.otlp_endpoint),
                Some("write it like http://127.0.0.1:4318"),
            );
        }
    }

    if errs.list.is_empty() {
        Ok(routes)
    } else {
        Err(ConfigErrors(errs.list))
    }
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "(none defined)".into()
    } else {
        names.join(", ")
    }
}

fn valid_endpoint(ep: &str) -> bool {
    if ep.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match ep.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && port.parse::<u16>().map(|p| p > 0).unwrap_or(false)
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        }
        None => false,
    }
}

/// An inline block replaces the policy's block wholesale; absent everywhere means off.
fn resolve<T: Clone>(inline: &Option<Toggle<T>>, policy: Option<&Option<Toggle<T>>>) -> Option<T> {
    match inline {
        Some(t) => t.on().cloned(),
        None => policy
            .and_then(|p| p.as_ref())
            .and_then(|t| t.on().cloned()),
    }
}

fn check_match(errs: &mut Errs<'_>, rpath: &str, at: (u64, u64), m: &MatchConfig) {
    let mpath = format!("{rpath}.match");
    if m.path.is_some() && m.path_prefix.is_some() {
        errs.push(
            at,
            mpath.clone(),
            "both `path` and `path_prefix` are set".into(),
            Some("keep one: `path` matches exactly, `path_prefix` matches the start"),
        );
    }
    for (key, v) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
        if let Some(p) = v {
            if !p.starts_with('/') {
                errs.push(
                    at,
                    format!("{mpath}.{key}"),
                    format!("{p:?} does not start with '/'"),
                    Some("write paths like /orders"),
                );
            }
        }
    }
    if let Some(methods) = &m.methods {
        for (i, meth) in methods.iter().enumerate() {
            if http::Method::from_bytes(meth.as_bytes()).is_err()
                || meth.is_empty()
                || meth.bytes().any(|b| b.is_ascii_lowercase())
            {
                errs.push(
                    at,
                    format!("{mpath}.methods[{i}]"),
                    format!("{meth:?} is not an HTTP method (methods are case-sensitive)"),
                    Some("use upper-case names like GET, POST, PUT"),
                );
            }
        }
    }
    if let Some(headers) = &m.headers {
        for (name, value) in headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                errs.push(
                    at,
                    format!("{mpath}.headers.{name}"),
                    format!("{name:?}: {value:?} is not a valid header"),
                    Some("header names are tokens like x-canary; values are visible ASCII"),
                );
            }
        }
    }
    if let Some(svc) = &m.grpc_service {
        if svc.is_empty() || svc.contains('/') {
            errs.push(
                at,
                format!("{mpath}.grpc_service"),
                format!("{svc:?} is not a gRPC service name"),
                Some("write the full service name without slashes, like inventory.v1.Inventory"),
            );
        }
    }
}

fn check_blocks(
    errs: &mut Errs<'_>,
    path: &str,
    at: (u64, u64),
    retry: &Option<Toggle<RetryConfig>>,
    cb: &Option<Toggle<CircuitBreakerConfig>>,
    rl: &Option<Toggle<RateLimitConfig>>,
) {
    if let Some(Toggle::On(r)) = retry {
        let b = &r.backoff;
        if b.base.0.is_zero() || b.base > b.max {
            errs.push(
                at,
                format!("{path}.retry.backoff"),
                format!(
                    "backoff base {} must be above 0 and at most max {}",
                    b.base, b.max
                ),
                Some("for example { base: 25ms, max: 250ms }"),
            );
        }
        if r.per_try_timeout.is_some_and(|d| d.0.is_zero()) {
            errs.push(
                at,
                format!("{path}.retry.per_try_timeout"),
                "a per-try timeout of 0 would fail every attempt".into(),
                Some("use a duration like 500ms, or leave it out"),
            );
        }
        if r.when.is_empty() {
            errs.push(
                at,
                format!("{path}.retry.when"),
                "no retry conditions are listed, so nothing would be retried".into(),
                Some(
                    "list conditions like [connect-failure, gateway-error], or use `retry: false`",
                ),
            );
        }
        if let RetryMethods::List(l) = &r.methods {
            if l.is_empty() {
                errs.push(
                    at,
                    format!("{path}.retry.methods"),
                    "an empty method list retries nothing but connect failures".into(),
                    Some("use idempotent, any, or a list like [GET, PUT]"),
                );
            }
        }
    }
    if let Some(Toggle::On(c)) = cb {
        let w = c.window.0;
        if w < Duration::from_secs(1) || w > Duration::from_secs(600) {
            errs.push(
                at,
                format!("{path}.circuit_breaker.window"),
                format!("window {} is out of range", c.window),
                Some("use 1s to 10m"),
            );
        }
        if c.open_for.0.is_zero() {
            errs.push(
                at,
                format!("{path}.circuit_breaker.open_for"),
                "open_for must be above 0".into(),
                Some("use a duration like 30s"),
            );
        }
        if c.half_open_requests == 0 {
            errs.push(
                at,
                format!("{path}.circuit_breaker.half_open_requests"),
                "at least one probe is needed to close the breaker again".into(),
                Some("use 1 or more"),
            );
        }
        if c.minimum_requests == 0 {
            errs.push(
                at,
                format!("{path}.circuit_breaker.minimum_requests"),
                "minimum_requests must be at least 1".into(),
                Some("20 is a common choice"),
            );
        }
        if c.consecutive_failures == Some(0) {
            errs.push(
                at,
                format!("{path}.circuit_breaker.consecutive_failures"),
                "0 would trip on every call".into(),
                Some("use 1 or more, or leave it out"),
            );
        }
        if c.failure_on.is_empty() {
            errs.push(
                at,
                format!("{path}.circuit_breaker.failure_on"),
                "no failure conditions are listed, so the breaker could never trip".into(),
                Some("list conditions like [connect-failure, timeout, 5xx]"),
            );
        }
    }
    if let Some(Toggle::On(r)) = rl {
        if r.burst == Some(0) {
            errs.push(
                at,
                format!("{path}.rate_limit.burst"),
                "a burst of 0 refuses every request".into(),
                Some("use 1 or more, or leave it out to default to the tokens per second"),
            );
        }
    }
}

fn load_fallback(
    errs: &mut Errs<'_>,
    path: &str,
    at: (u64, u64),
    fb: &mut FallbackConfig,
    base: &Path,
) {
    if fb.when.is_empty() {
        errs.push(
            at,
            format!("{path}.when"),
            "no reasons are listed, so the fallback would never answer".into(),
            Some("list reasons like [circuit_open, upstream_unavailable]"),
        );
    }
    for (name, value) in &fb.headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || http::HeaderValue::from_str(value).is_err()
        {
            errs.push(
                at,
                format!("{path}.headers.{name}"),
                format!("{name:?}: {value:?} is not a valid header"),
                None,
            );
        }
    }
    match (&fb.body, &fb.body_file) {
        (Some(_), Some(f)) => errs.push(
            loc(f),
            format!("{path}.body_file"),
            "both `body` and `body_file` are set".into(),
            Some("keep one of them"),
        ),
        (Some(b), None) => fb.body_bytes = bytes::Bytes::from(b.clone()),
        (None, Some(f)) => {
            let p = base.join(&f.value);
            match std::fs::read(&p) {
                Ok(data) if data.len() <= 1 << 20 => fb.body_bytes = bytes::Bytes::from(data),
                Ok(_) => errs.push(
                    loc(f),
                    format!("{path}.body_file"),
                    format!("{} is larger than 1MiB", p.display()),
                    Some("fallback bodies are held in memory; keep them small"),
                ),
                Err(e) => errs.push(
                    loc(f),
                    format!("{path}.body_file"),
                    format!("cannot read {}: {e}", p.display()),
                    Some("relative paths are resolved from the config file's folder"),
                ),
            }
        }
        (None, None) => {}
    }
}
