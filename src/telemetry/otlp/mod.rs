//! OTLP trace export: the wire format of spans ([`wire`]) and the transport that
//! sends an encoded `ExportTraceServiceRequest` to the collector over HTTP/protobuf
//! (`POST /v1/traces`) or gRPC (`TraceService/Export`, h2c).
//!
//! Why not opentelemetry-otlp's exporter: it holds every finished span until the
//! batch is sent, then converts each into owned protobuf structs (a `String` for
//! each attribute key and value, `Vec`s for ids, a map to group spans by scope),
//! encodes those and frees it all. With every request traced that was about 11% of
//! the proxy's CPU, more than the whole budget tracing has. Here a span is written
//! in wire format the moment it ends, while its data is still in cache, and freed
//! (see [`super::batch`]).

pub mod wire;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, TE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The gRPC method of the OTLP trace service.
const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// The largest collector answer read (an export answer is a few bytes).
const MAX_ANSWER: usize = 64 * 1024;
/// How long one export may take, unless `OTEL_EXPORTER_OTLP_TIMEOUT` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1, `application/x-protobuf`.
    Http,
    /// gRPC over h2c.
    Grpc,
}

/// Where encoded span batches go: the collector, or a test's stand-in.
pub trait Transport: Send + Sync + 'static {
    /// Sends one encoded `ExportTraceServiceRequest`.
    fn send(
        &self,
        message: wire::Message,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// The OTLP client of a collector.
pub struct OtlpExporter {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    protocol: Protocol,
    headers: HeaderMap,
    timeout: Duration,
}

impl fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("uri", &self.uri)
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl OtlpExporter {
    /// An exporter to the collector at `base` (`http://host:port`, without the
    /// signal path). Extra headers come from `OTEL_EXPORTER_OTLP_TRACES_HEADERS` or
    /// `OTEL_EXPORTER_OTLP_HEADERS`, the timeout from `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`
    /// or `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), as the OTLP exporter spec asks.
    pub fn new(base: &str, protocol: Protocol) -> Result<OtlpExporter, String> {
        let base = base.trim_end_matches('/');
        if base.starts_with("https://") {
            return Err(format!(
                "otlp_endpoint {base}: https is not supported in this build; use http:// (e.g. a local collector)"
            ));
        }
        let path = match protocol {
            Protocol::Http => "/v1/traces",
            Protocol::Grpc => GRPC_PATH,
        };
        let uri: Uri = format!("{base}{path}")
            .parse()
            .map_err(|e| format!("otlp_endpoint {base}: not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(format!("otlp_endpoint {base}: expected http://host:port"));
        }
        let headers = env_headers(
            std::env::var("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
                .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_HEADERS"))
                .ok()
                .as_deref(),
        );
        let timeout = std::env::var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(protocol == Protocol::Grpc)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(OtlpExporter {
            client,
            uri,
            protocol,
            headers,
            timeout,
        })
    }

    async fn post(&self, mut message: wire::Message) -> Result<(), String> {
        if self.protocol == Protocol::Grpc {
            // gRPC message framing: uncompressed flag, then the length (big endian).
            let len = u32::try_from(message.as_slice().len()).map_err(|_| "batch too large")?;
            let [a, b, c, d] = len.to_be_bytes();
            message.prepend(&[0, a, b, c, d]);
        }
        let body = message.into_bytes();
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let h = req.headers_mut();
        for (k, v) in &self.headers {
            h.append(k, v.clone());
        }
        match self.protocol {
            Protocol::Http => {
                h.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-protobuf"),
                );
            }
            Protocol::Grpc => {
                h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                h.insert(TE, HeaderValue::from_static("trailers"));
            }
        }
        let res = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("sending to {}: {e}", self.uri))?;
        let status = res.status();
        let grpc_in_head = grpc_status(res.headers());
        let answer = Limited::new(res.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer of {}: {e}", self.uri))?;
        if !status.is_success() {
            return Err(format!("{} answered {status}", self.uri));
        }
        if self.protocol == Protocol::Grpc {
            let code = grpc_in_head.or_else(|| answer.trailers().and_then(grpc_status));
            match code {
                Some((0, _)) => {}
                Some((code, msg)) => {
                    return Err(format!("{} answered grpc-status {code}: {msg}", self.uri))
                }
                None => return Err(format!("{} answered without a grpc-status", self.uri)),
            }
        }
        Ok(())
    }
}

impl Transport for OtlpExporter {
    async fn send(&self, message: wire::Message) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.post(message)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{} did not answer within {:?}",
                self.uri, self.timeout
            )),
        }
    }
}

/// `grpc-status` and `grpc-message` of a header block, if it has a status.
fn grpc_status(h: &HeaderMap) -> Option<(u32, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    let msg = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some((code, msg))
}

/// Parses `key=value,key2=value2` (values percent-decoded); malformed pairs are skipped.
fn env_headers(v: Option<&str>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for pair in v.unwrap_or("").split(',') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.trim().as_bytes()),
            HeaderValue::from_bytes(&percent_decode(v.trim())),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    map
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(byte) = hex {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_from_the_environment_syntax() {
        let h = env_headers(Some(
            "api-key=abc%20def, x-tenant = t1 ,broken,=x,bad name=1",
        ));
        assert_eq!(h.get("api-key").unwrap(), "abc def");
        assert_eq!(h.get("x-tenant").unwrap(), "t1");
        assert_eq!(h.len(), 2);
        assert!(env_headers(None).is_empty());
        assert_eq!(percent_decode("%zz%4"), b"%zz%4");
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(OtlpExporter::new("https://c:4318", Protocol::Http)
            .unwrap_err()
            .contains("https is not supported"));
        assert!(OtlpExporter::new("collector:4318", Protocol::Http).is_err());
        let e = OtlpExporter::new("http://127.0.0.1:4317/", Protocol::Grpc).unwrap();
        assert_eq!(e.uri.path(), GRPC_PATH);
        let e = OtlpExporter::new("http://127.0.0.1:4318", Protocol::Http).unwrap();
        assert_eq!(e.uri.to_string(), "http://127.0.0.1:4318/v1/traces");
    }
}
