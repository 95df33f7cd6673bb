//! Route matching: the first route of a listener whose conditions all hold takes the
//! request. Conditions are compiled once per config (methods parsed, header names
//! interned, the gRPC service turned into a path prefix).

use http::{HeaderName, HeaderValue, Method, Request};

use crate::config::MatchConfig;

/// A compiled `match` block.
#[derive(Debug, Clone)]
pub struct Matcher {
    path: Option<String>,
    prefix: Option<String>,
    methods: Option<Vec<Method>>,
    host: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Matcher {
    /// Compiles a validated match block.
    pub fn new(m: &MatchConfig) -> Matcher {
        let grpc_prefix = m.grpc_service.as_ref().map(|s| format!("/{s}/"));
        Matcher {
            path: m.path.clone(),
            // validation forbids `grpc_service` only with conflicting paths at runtime;
            // a gRPC service is a path prefix on the wire
            prefix: grpc_prefix
                .or_else(|| m.path_prefix.clone())
                .filter(|p| p != "/"),
            methods: m.methods.as_ref().map(|ms| {
                ms.iter()
                    .filter_map(|s| Method::from_bytes(s.as_bytes()).ok())
                    .collect()
            }),
            host: m.host.as_ref().map(|h| h.to_ascii_lowercase()),
            headers: m
                .headers
                .iter()
                .flatten()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
        }
    }

    /// Whether the request satisfies every condition.
    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        let path = req.uri().path();
        if let Some(p) = &self.path {
            if path != p {
                return false;
            }
        }
        if let Some(p) = &self.prefix {
            if !path.starts_with(p.as_str()) {
                return false;
            }
        }
        if let Some(ms) = &self.methods {
            if !ms.contains(req.method()) {
                return false;
            }
        }
        if let Some(want) = &self.host {
            let got = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                .unwrap_or("");
            let got = strip_port(got);
            if !got.eq_ignore_ascii_case(want) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(k, v)| req.headers().get_all(k).iter().any(|have| have == v))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split(']')
            .next()
            .map(|h| &host[..h.len() + 1])
            .unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The path and query with `prefix` removed from the path (`/api/x` -> `/x`,
/// `/api` -> `/`); `None` when the path does not start with it.
pub fn strip_path(pq: &http::uri::PathAndQuery, prefix: &str) -> Option<http::uri::PathAndQuery> {
    let rest = pq.path().strip_prefix(prefix)?;
    let mut out = String::with_capacity(rest.len() + 16);
    if !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    if let Some(q) = pq.query() {
        out.push('?');
        out.push_str(q);
    }
    out.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn all_conditions_must_hold() {
        let m = Matcher::new(&MatchConfig {
            path_prefix: Some("/orders".into()),
            methods: Some(vec!["GET".into(), "HEAD".into()]),
            host: Some("API.example.com".into()),
            headers: Some(BTreeMap::from([("x-canary".into(), "true".into())])),
            ..Default::default()
        });
        let h = [("host", "api.example.com:8080"), ("x-canary", "true")];
        assert!(m.matches(&req("GET", "/orders/1", &h)));
        assert!(!m.matches(&req("POST", "/orders/1", &h)));
        assert!(!m.matches(&req("GET", "/users", &h)));
        assert!(!m.matches(&req("GET", "/orders", &[("host", "api.example.com")])));
        assert!(!m.matches(&req(
            "GET",
            "/orders",
            &[("host", "other"), ("x-canary", "true")]
        )));
    }

    #[test]
    fn exact_path_and_grpc_service() {
        let m = Matcher::new(&MatchConfig {
            path: Some("/healthz".into()),
            ..Default::default()
        });
        assert!(m.matches(&req("GET", "/healthz", &[])));
        assert!(m.matches(&req("GET", "/healthz?x=1", &[])));
        assert!(!m.matches(&req("GET", "/healthz/x", &[])));
        let g = Matcher::new(&MatchConfig {
            grpc_service: Some("inventory.v1.Inventory".into()),
            ..Default::default()
        });
        assert!(g.matches(&req("POST", "/inventory.v1.Inventory/Get", &[])));
        assert!(!g.matches(&req("POST", "/inventory.v1.InventoryX/Get", &[])));
        let all = Matcher::new(&MatchConfig::default());
        assert!(all.matches(&req("DELETE", "/anything", &[])));
    }

    #[test]
    fn host_from_h2_authority() {
        let m = Matcher::new(&MatchConfig {
            host: Some("shop.example".into()),
            ..Default::default()
        });
        assert!(m.matches(&req("GET", "http://shop.example:8443/x", &[])));
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }

    #[test]
    fn strip_prefix_rewrites_path_keeping_query() {
        let pq = |s: &str| s.parse::<http::uri::PathAndQuery>().unwrap();
        assert_eq!(
            strip_path(&pq("/api/users?id=3"), "/api").unwrap(),
            "/users?id=3"
        );
        assert_eq!(strip_path(&pq("/api"), "/api").unwrap(), "/");
        assert!(strip_path(&pq("/other"), "/api").is_none());
    }
}
