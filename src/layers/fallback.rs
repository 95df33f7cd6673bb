//! Fallback responses: when a listed reason happens, answer with the configured status,
//! headers and body (or a trailers-only gRPC status for gRPC requests, when
//! `grpc_status` is set) instead of the proxy's standard error. Sits just inside the
//! metrics layer, outside everything else, so it sees every failure the inner layers
//! produce, and `upstream_5xx` only after retries are exhausted. The answer still
//! carries `Proxy-Status` naming the reason.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service};

use crate::config::{FallbackConfig, FallbackReason};
use crate::error::{BoxError, ErrorKind};
use crate::http::synthetic::{self, PROXY_STATUS};
use crate::http::{grpc, Body};
use crate::telemetry::metrics::{Metrics, ReasonLabels};

const REASONS: [FallbackReason; 6] = [
    FallbackReason::CircuitOpen,
    FallbackReason::RateLimited,
    FallbackReason::Overloaded,
    FallbackReason::Timeout,
    FallbackReason::UpstreamUnavailable,
    FallbackReason::Upstream5xx,
];

fn index(r: FallbackReason) -> usize {
    REASONS.iter().position(|x| *x == r).unwrap_or(0)
}

fn label(r: FallbackReason) -> &'static str {
    match r {
        FallbackReason::CircuitOpen => "circuit_open",
        FallbackReason::RateLimited => "rate_limited",
        FallbackReason::Overloaded => "overloaded",
        FallbackReason::Timeout => "timeout",
        FallbackReason::UpstreamUnavailable => "upstream_unavailable",
        FallbackReason::Upstream5xx => "upstream_5xx",
    }
}

/// Which fallback reason an error is, if any.
pub fn reason_of(kind: ErrorKind) -> Option<FallbackReason> {
    Some(match kind {
        ErrorKind::CircuitOpen => FallbackReason::CircuitOpen,
        ErrorKind::RateLimited(_) => FallbackReason::RateLimited,
        ErrorKind::Overloaded => FallbackReason::Overloaded,
        ErrorKind::Timeout(_) => FallbackReason::Timeout,
        ErrorKind::UpstreamUnavailable { .. } => FallbackReason::UpstreamUnavailable,
        _ => return None,
    })
}

#[derive(Debug)]
struct Shared {
    enabled: [bool; 6],
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    grpc: Option<(u8, HeaderValue)>,
    counters: [Counter; 6],
}

impl Shared {
    fn render(
        &self,
        is_grpc: bool,
        reason: FallbackReason,
        proxy_status: HeaderValue,
    ) -> Response<Body> {
        let mut res = match (&self.grpc, is_grpc) {
            (Some((code, msg)), true) => synthetic::grpc_response(*code, msg.clone()),
            _ => {
                let mut r = Response::new(Body::full(self.body.clone()));
                *r.status_mut() = self.status;
                *r.headers_mut() = self.headers.clone();
                r
            }
        };
        res.headers_mut().insert(PROXY_STATUS.clone(), proxy_status);
        res.extensions_mut().insert(FallbackAnswer(label(reason)));
        res
    }
}

/// Marks a response the fallback layer made, with the reason's label (for the trace
/// layer above, which would otherwise have to parse `Proxy-Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackAnswer(pub &'static str);

/// Replaces listed failures with the configured response.
#[derive(Debug, Clone)]
pub struct FallbackLayer {
    shared: Arc<Shared>,
}

impl FallbackLayer {
    /// From a validated config (its body already loaded).
    pub fn new(route: &str, cfg: &FallbackConfig, metrics: &Metrics) -> Self {
        let mut enabled = [false; 6];
        for r in &cfg.when {
            enabled[index(*r)] = true;
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            // Validated at load time; a header that still fails to parse is skipped.
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.append(k, v);
            }
        }
        let counters = REASONS.map(|r| {
            metrics
                .fallbacks
                .get_or_create(&ReasonLabels {
                    route: route.to_string(),
                    reason: label(r).to_string(),
                })
                .clone()
        });
        FallbackLayer {
            shared: Arc::new(Shared {
                enabled,
                status: StatusCode::from_u16(cfg.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                headers,
                body: cfg.body_bytes.clone(),
                grpc: cfg.grpc_status.map(|c| {
                    let msg = cfg
                        .grpc_message
                        .as_deref()
                        .unwrap_or("breakwater: fallback");
                    (c, synthetic::grpc_message(msg))
                }),
                counters,
            }),
        }
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Fallback {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The fallback service.
#[derive(Debug, Clone)]
pub struct Fallback<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request<Body>> for Fallback<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let is_grpc = grpc::is_grpc(req.headers());
        ResponseFuture {
            inner: self.inner.call(req),
            shared: self.shared.clone(),
            is_grpc,
        }
    }
}

pin_project! {
    /// Response future of [`Fallback`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        shared: Arc<Shared>,
        is_grpc: bool,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        let sh = &**this.shared;
        Poll::Ready(match result {
            Err(e) => {
                let kind = ErrorKind::of_box(&e);
                match reason_of(kind) {
                    Some(r) if sh.enabled[index(r)] => {
                        sh.counters[index(r)].inc();
                        Ok(sh.render(*this.is_grpc, r, synthetic::proxy_status(kind)))
                    }
                    _ => Err(e),
                }
            }
            Ok(res)
                if res.status().is_server_error()
                    && sh.enabled[index(FallbackReason::Upstream5xx)] =>
            {
                sh.counters[index(FallbackReason::Upstream5xx)].inc();
                let ps = HeaderValue::from_str(&format!(
                    "breakwater; received-status={}; details=\"upstream_5xx\"",
                    res.status().as_u16()
                ))
                .unwrap_or(HeaderValue::from_static(
                    "breakwater; details=\"upstream_5xx\"",
                ));
                Ok(sh.render(*this.is_grpc, FallbackReason::Upstream5xx, ps))
            }
            Ok(res) => Ok(res),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{CircuitOpen, Overloaded};
    use http_body_util::BodyExt;
    use std::collections::BTreeMap;
    use tower_test::mock;

    fn cfg(when: Vec<FallbackReason>) -> FallbackConfig {
        FallbackConfig {
            when,
            status: 200,
            headers: BTreeMap::from([("content-type".to_string(), "application/json".to_string())]),
            body: Some("{\"degraded\":true}".into()),
            body_file: None,
            body_bytes: Bytes::from_static(b"{\"degraded\":true}"),
            grpc_status: Some(14),
            grpc_message: Some("cached answer unavailable".into()),
        }
    }

    async fn one(
        c: &FallbackConfig,
        m: &Metrics,
        req: Request<Body>,
        answer: Result<Response<Body>, BoxError>,
    ) -> Result<Response<Body>, BoxError> {
        let (mut svc, mut handle) =
            mock::spawn_layer::<Request<Body>, Response<Body>, _>(FallbackLayer::new("r", c, m));
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = svc.call(req);
        let (_, send) = handle.next_request().await.unwrap();
        match answer {
            Ok(r) => send.send_response(r),
            Err(e) => send.send_error(e),
        }
        fut.await
    }

    #[tokio::test]
    async fn listed_reason_gets_the_configured_answer() {
        let m = Metrics::new();
        let c = cfg(vec![FallbackReason::CircuitOpen]);
        let res = one(&c, &m, Request::new(Body::Empty), Err(CircuitOpen.into()))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "application/json");
        assert_eq!(
            res.headers()["proxy-status"],
            r#"breakwater; error=destination_unavailable; details="circuit_open""#
        );
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"degraded\":true}");
        assert!(m
            .encode()
            .contains(r#"breakwater_fallbacks_total{route="r",reason="circuit_open"} 1"#));
    }

    #[tokio::test]
    async fn unlisted_reason_passes_the_error_on() {
        let m = Metrics::new();
        let c = cfg(vec![FallbackReason::CircuitOpen]);
        let err = one(&c, &m, Request::new(Body::Empty), Err(Overloaded.into()))
            .await
            .unwrap_err();
        assert_eq!(ErrorKind::of_box(&err), ErrorKind::Overloaded);
    }

    #[tokio::test]
    async fn upstream_5xx_names_the_received_status() {
        let m = Metrics::new();
        let c = cfg(vec![FallbackReason::Upstream5xx]);
        let up = Response::builder()
            .status(503)
            .body(Body::full("boom"))
            .unwrap();
        let res = one(&c, &m, Request::new(Body::Empty), Ok(up))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["proxy-status"],
            r#"breakwater; received-status=503; details="upstream_5xx""#
        );
        let ok = Response::builder().status(404).body(Body::Empty).unwrap();
        assert_eq!(
            one(&c, &m, Request::new(Body::Empty), Ok(ok))
                .await
                .unwrap()
                .status(),
            404
        );
    }

    #[tokio::test]
    async fn grpc_requests_get_the_grpc_status() {
        let m = Metrics::new();
        let c = cfg(vec![FallbackReason::CircuitOpen]);
        let req = Request::builder()
            .header("content-type", "application/grpc+proto")
            .body(Body::Empty)
            .unwrap();
        let res = one(&c, &m, req, Err(CircuitOpen.into())).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["grpc-status"], "14");
        assert_eq!(res.headers()["grpc-message"], "cached answer unavailable");
        assert!(res.headers().contains_key("proxy-status"));
    }
}
