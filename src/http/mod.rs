//! The shared HTTP vocabulary of the proxy and its layers: the body type, the replayable
//! request body, gRPC helpers and the proxy's own (synthetic) responses.

pub mod body;
pub mod grpc;
pub mod replay;
pub mod synthetic;

pub use body::Body;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::telemetry::span::{keys, Attributes};

/// The downstream client's address, put in request extensions by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// The absolute deadline of the whole request, put in request extensions by the
/// timeout layer so retry and the upstream client can see the time left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub tokio::time::Instant);

/// Attempt number (1-based), put in request extensions by the retry layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt(pub u32);

/// The upstream endpoint that answered, put in response extensions by the client.
#[derive(Debug, Clone)]
pub struct UpstreamEndpoint(pub Arc<EndpointAddr>);

/// An upstream endpoint's address as configured, and what spans record of it.
#[derive(Debug, PartialEq, Eq)]
pub struct EndpointAddr {
    /// `host:port`, as configured.
    pub addr: Box<str>,
    /// Its host and port as attempt spans record them (`server.address`, an IPv6
    /// address without its brackets, and `server.port`), split and encoded once.
    pub span_attributes: Attributes,
}

impl EndpointAddr {
    /// Splits a configured `host:port`.
    pub fn new(addr: &str) -> EndpointAddr {
        let (host, port) = split_host_port(addr).unwrap_or((addr, None));
        let mut span_attributes = Attributes::default();
        span_attributes.str(&keys::SERVER_ADDRESS, host);
        if let Some(port) = port {
            span_attributes.int(&keys::SERVER_PORT, i64::from(port));
        }
        EndpointAddr {
            addr: addr.into(),
            span_attributes,
        }
    }
}

/// `host[:port]` or `[v6]:port` into host and port.
pub fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if s.is_empty() {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let port = rest[end + 1..]
            .strip_prefix(':')
            .and_then(|p| p.parse().ok());
        return Some((&rest[..end], port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h, p.parse().ok())),
        Some(_) => Some((s, None)),
        None => Some((s, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::span::Scalar;

    #[test]
    fn host_and_port() {
        assert_eq!(split_host_port("a.b:80"), Some(("a.b", Some(80))));
        assert_eq!(split_host_port("a.b"), Some(("a.b", None)));
        assert_eq!(split_host_port("[::1]:9000"), Some(("::1", Some(9000))));
        assert_eq!(split_host_port("::1"), Some(("::1", None)));
        assert_eq!(split_host_port(""), None);
        let e = EndpointAddr::new("[::1]:9000");
        assert_eq!(&*e.addr, "[::1]:9000");
        let attrs: Vec<_> = e.span_attributes.iter().collect();
        assert_eq!(
            attrs,
            [
                ("server.address", Scalar::Str("::1")),
                ("server.port", Scalar::I64(9000))
            ]
        );
    }
}
