//! Responses the proxy makes itself (SPEC section 3): every one carries `Proxy-Status`
//! (RFC 9209) naming breakwater and the reason, and is rendered as a trailers-only gRPC
//! response (HTTP 200, `grpc-status` in the headers) when the request was gRPC, because
//! gRPC clients cannot decode a plain 429 or 503.

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Response, StatusCode};

use super::body::Body;
use super::grpc::{self, code};
use crate::error::ErrorKind;

/// The `Proxy-Status` header name.
pub static PROXY_STATUS: HeaderName = HeaderName::from_static("proxy-status");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// How the proxy answers for one reason: HTTP status, RFC 9209 type, gRPC status.
struct Answer {
    status: StatusCode,
    proxy_status: &'static str,
    grpc_code: u8,
    grpc_message: &'static str,
    body: &'static str,
}

fn answer(kind: ErrorKind) -> Answer {
    match kind {
        ErrorKind::RateLimited(_) => Answer {
            status: StatusCode::TOO_MANY_REQUESTS,
            proxy_status: r#"breakwater; error=http_request_denied; details="rate_limited""#,
            grpc_code: code::RESOURCE_EXHAUSTED,
            grpc_message: "breakwater: rate limited",
            body: "rate limited\n",
        },
        ErrorKind::CircuitOpen => Answer {
            status: StatusCode::SERVICE_UNAVAILABLE,
            proxy_status: r#"breakwater; error=destination_unavailable; details="circuit_open""#,
            grpc_code: code::UNAVAILABLE,
            grpc_message: "breakwater: circuit open",
            body: "upstream circuit open\n",
        },
        ErrorKind::Overloaded => Answer {
            status: StatusCode::SERVICE_UNAVAILABLE,
            proxy_status: r#"breakwater; error=connection_limit_reached; details="overloaded""#,
            grpc_code: code::UNAVAILABLE,
            grpc_message: "breakwater: overloaded",
            body: "overloaded\n",
        },
        ErrorKind::Timeout(_) => Answer {
            status: StatusCode::GATEWAY_TIMEOUT,
            proxy_status: r#"breakwater; error=http_response_timeout; details="timeout""#,
            grpc_code: code::DEADLINE_EXCEEDED,
            grpc_message: "breakwater: deadline exceeded",
            body: "upstream timed out\n",
        },
        ErrorKind::UpstreamUnavailable { connect: true } => Answer {
            status: StatusCode::BAD_GATEWAY,
            proxy_status: r#"breakwater; error=connection_refused; details="upstream_unavailable""#,
            grpc_code: code::UNAVAILABLE,
            grpc_message: "breakwater: upstream unavailable",
            body: "upstream unavailable\n",
        },
        ErrorKind::UpstreamUnavailable { connect: false } => Answer {
            status: StatusCode::BAD_GATEWAY,
            proxy_status: r#"breakwater; error=connection_terminated; details="upstream_unavailable""#,
            grpc_code: code::UNAVAILABLE,
            grpc_message: "breakwater: upstream connection failed",
            body: "upstream unavailable\n",
        },
        ErrorKind::NoRoute => Answer {
            status: StatusCode::NOT_FOUND,
            proxy_status: r#"breakwater; error=destination_not_found; details="no_route""#,
            grpc_code: code::UNIMPLEMENTED,
            grpc_message: "breakwater: no route",
            body: "no route\n",
        },
        ErrorKind::BadRequest => Answer {
            status: StatusCode::BAD_REQUEST,
            proxy_status: r#"breakwater; error=http_request_error; details="bad_request""#,
            grpc_code: code::INTERNAL,
            grpc_message: "breakwater: bad request",
            body: "bad request\n",
        },
        ErrorKind::Internal => Answer {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            proxy_status: r#"breakwater; error=proxy_internal_error; details="internal""#,
            grpc_code: code::INTERNAL,
            grpc_message: "breakwater: internal error",
            body: "internal proxy error\n",
        },
    }
}

/// The `Proxy-Status` value for a reason.
pub fn proxy_status(kind: ErrorKind) -> HeaderValue {
    HeaderValue::from_static(answer(kind).proxy_status)
}

/// The HTTP status the proxy answers with for a reason (for plain HTTP requests).
pub fn http_status(kind: ErrorKind) -> StatusCode {
    answer(kind).status
}

/// The HTTP status of the proxy's answer as the client sees it (gRPC answers are 200,
/// the failure travels in `grpc-status`); metrics and spans label with this.
pub fn answered_status(kind: ErrorKind, is_grpc: bool) -> u16 {
    if is_grpc {
        200
    } else {
        answer(kind).status.as_u16()
    }
}

/// The gRPC status code the proxy answers with for a reason.
pub fn grpc_code(kind: ErrorKind) -> u8 {
    answer(kind).grpc_code
}

/// Renders the proxy's own answer for a failure.
pub fn error_response(kind: ErrorKind, is_grpc: bool) -> Response<Body> {
    let a = answer(kind);
    let mut res = if is_grpc {
        grpc_response(a.grpc_code, HeaderValue::from_static(a.grpc_message))
    } else {
        let mut r = Response::new(Body::full(a.body));
        *r.status_mut() = a.status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    let h = res.headers_mut();
    h.insert(
        PROXY_STATUS.clone(),
        HeaderValue::from_static(a.proxy_status),
    );
    if let ErrorKind::RateLimited(rl) = kind {
        let secs = rl.retry_after.as_secs() + u64::from(rl.retry_after.subsec_nanos() > 0);
        let secs = secs.max(1);
        if !is_grpc {
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        h.insert(
            RATELIMIT_POLICY.clone(),
            ratelimit_policy(rl.burst, rl.window_secs),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("\"default\";r=0;t={secs}")) {
            h.insert(RATELIMIT.clone(), v);
        }
    }
    res
}

/// `RateLimit-Policy` in the structured-field form of draft-ietf-httpapi-ratelimit-headers:
/// quota `q` tokens per window `w` seconds.
pub fn ratelimit_policy(burst: u32, window_secs: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"default\";q={burst};w={}", window_secs.max(1)))
        .unwrap_or(HeaderValue::from_static("\"default\""))
}

/// A trailers-only gRPC response: HTTP 200 with `grpc-status` in the headers and no body.
pub fn grpc_response(code: u8, message: HeaderValue) -> Response<Body> {
    let mut r = Response::new(Body::Empty);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(grpc::GRPC_STATUS, HeaderValue::from(u16::from(code)));
    h.insert(grpc::GRPC_MESSAGE, message);
    r
}

/// Percent-encodes a gRPC status message as the gRPC spec requires.
pub fn grpc_message(msg: &str) -> HeaderValue {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RateLimited;
    use std::time::Duration;

    #[test]
    fn rate_limited_has_retry_after_and_fields() {
        let kind = ErrorKind::RateLimited(RateLimited {
            retry_after: Duration::from_millis(1200),
            burst: 10,
            window_secs: 2,
        });
        let r = error_response(kind, false);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["ratelimit-policy"], "\"default\";q=10;w=2");
        assert_eq!(r.headers()["ratelimit"], "\"default\";r=0;t=2");
        assert_eq!(
            r.headers()["proxy-status"],
            r#"breakwater; error=http_request_denied; details="rate_limited""#
        );
        let short = ErrorKind::RateLimited(RateLimited {
            retry_after: Duration::from_millis(10),
            burst: 1,
            window_secs: 1,
        });
        assert_eq!(error_response(short, false).headers()["retry-after"], "1");
    }

    #[test]
    fn grpc_answers_are_trailers_only() {
        let r = error_response(ErrorKind::CircuitOpen, true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert!(r.headers().contains_key("proxy-status"));
        let r = error_response(ErrorKind::NoRoute, true);
        assert_eq!(r.headers()["grpc-status"], "12");
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(grpc_message("a%b é"), "a%25b %C3%A9");
    }
}
