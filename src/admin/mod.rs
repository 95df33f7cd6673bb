//! The admin listener (SPEC section 5): metrics, health, readiness, the effective
//! config, status JSON and page, reload, and manual breaker control. A separate small
//! HTTP/1.1 server so that it stays reachable when the data-path listeners are busy.

mod page;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::layers::circuit_breaker::ForceAction;
use crate::proxy::Shared;

type AdminResponse = Response<Full<Bytes>>;

/// Serves the admin endpoints until `stop` fires.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, v: &Value) -> AdminResponse {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(req: Request<Incoming>, shared: &Shared) -> AdminResponse {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET | Method::HEAD, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(shared.metrics.encode())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (Method::GET | Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Method::GET | Method::HEAD, "/readyz") => {
            if shared.draining.load(Ordering::SeqCst) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (Method::GET | Method::HEAD, "/config") => {
            let loaded = shared.loaded.load();
            let v = serde_json::to_value(&loaded.config).unwrap_or(Value::Null);
            json_response(StatusCode::OK, &v)
        }
        (Method::GET | Method::HEAD, "/status") => json_response(StatusCode::OK, &status(shared)),
        (Method::GET | Method::HEAD, "/") => {
            let mut r = Response::new(Full::new(Bytes::from(page::render(&status(shared)))));
            r.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        (Method::POST, "/reload") => match crate::reload(shared).await {
            Ok(report) => json_response(
                StatusCode::OK,
                &json!({
                    "result": "applied",
                    "routes": report.routes,
                    "needs_restart": report.needs_restart,
                }),
            ),
            Err(e) => json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "result": "rejected", "errors": e.to_string() }),
            ),
        },
        (m, p) if p.starts_with("/circuit/") => circuit(m, p, shared),
        (_, "/metrics" | "/healthz" | "/readyz" | "/config" | "/status" | "/" | "/reload") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn circuit(method: Method, path: &str, shared: &Shared) -> AdminResponse {
    let mut parts = path.trim_start_matches("/circuit/").splitn(2, '/');
    let (route, action) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
    }
    let routers = shared.routers.load();
    let Some(r) = routers.route(route) else {
        return text(StatusCode::NOT_FOUND, format!("no route named {route:?}\n"));
    };
    let Some(breaker) = &r.state.breaker else {
        return text(
            StatusCode::NOT_FOUND,
            format!("route {route:?} has no circuit breaker\n"),
        );
    };
    let Some(action) = ForceAction::parse(action) else {
        return text(
            StatusCode::BAD_REQUEST,
            "unknown action; use force-open, force-closed or auto\n",
        );
    };
    breaker.force(action);
    tracing::warn!(route, action = ?action, "circuit breaker forced from the admin endpoint");
    json_response(
        StatusCode::OK,
        &json!({ "route": route, "state": breaker.state().as_str() }),
    )
}

/// The `/status` document (SPEC section 5).
pub fn status(shared: &Shared) -> Value {
    let routers = shared.routers.load();
    let routes: Vec<Value> = routers
        .routes()
        .map(|r| {
            let circuit = r.state.breaker.as_ref().map(|b| {
                let (failures, requests) = b.window_counts();
                json!({
                    "state": b.state().as_str(),
                    "failures_in_window": failures,
                    "requests_in_window": requests,
                })
            });
            let rate_limit = r
                .state
                .limiter
                .as_ref()
                .map(|l| json!({ "tokens": l.tokens(), "burst": l.burst() }));
            json!({
                "listener": r.spec.listener,
                "name": r.spec.name,
                "upstream": r.spec.upstream,
                "inflight": r.state.stats.inflight(),
                "requests": r.state.stats.requests(),
                "errors": r.state.stats.errors(),
                "circuit": circuit,
                "rate_limit": rate_limit,
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "routes": routes,
    })
}
