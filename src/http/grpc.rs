//! gRPC over HTTP/2 details the proxy needs: recognising gRPC requests, status codes,
//! and the `grpc-timeout` header.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

/// `grpc-status` header name.
pub const GRPC_STATUS: &str = "grpc-status";
/// `grpc-message` header name.
pub const GRPC_MESSAGE: &str = "grpc-message";
/// `grpc-timeout` header name.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// gRPC status codes used by the proxy's own answers.
pub mod code {
    /// DEADLINE_EXCEEDED.
    pub const DEADLINE_EXCEEDED: u8 = 4;
    /// RESOURCE_EXHAUSTED.
    pub const RESOURCE_EXHAUSTED: u8 = 8;
    /// UNIMPLEMENTED.
    pub const UNIMPLEMENTED: u8 = 12;
    /// INTERNAL.
    pub const INTERNAL: u8 = 13;
    /// UNAVAILABLE.
    pub const UNAVAILABLE: u8 = 14;
}

/// Whether a request is gRPC: its `content-type` starts with `application/grpc`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The `grpc-status` in a header map (trailers, or trailers-only headers).
pub fn status(headers: &HeaderMap) -> Option<u8> {
    let v = headers.get(GRPC_STATUS)?.to_str().ok()?;
    v.trim().parse::<u8>().ok().filter(|c| *c <= 16)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
pub fn parse_timeout(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a remaining budget as `grpc-timeout`, rounding down so the upstream never
/// gets more time than is left.
pub fn encode_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let micros = d.as_micros();
    let s = if micros <= MAX {
        format!("{}u", micros.max(1))
    } else if d.as_millis() <= MAX {
        format!("{}m", d.as_millis())
    } else if u128::from(d.as_secs()) <= MAX {
        format!("{}S", d.as_secs())
    } else {
        format!("{}M", (d.as_secs() / 60).min(MAX as u64))
    };
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("99999999S"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_trip() {
        assert_eq!(
            parse_timeout(&HeaderValue::from_static("100m")),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            parse_timeout(&HeaderValue::from_static("2S")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(parse_timeout(&HeaderValue::from_static("123456789S")), None);
        assert_eq!(parse_timeout(&HeaderValue::from_static("5x")), None);
        let v = encode_timeout(Duration::from_millis(1500));
        assert_eq!(parse_timeout(&v), Some(Duration::from_millis(1500)));
        let v = encode_timeout(Duration::from_secs(3600 * 24));
        assert_eq!(parse_timeout(&v), Some(Duration::from_secs(3600 * 24)));
    }
}
