//! Error vocabulary: one small type per thing that can go wrong, and [`ErrorKind`], the
//! one classification that the rescue boundary (what the client sees), the fallback layer
//! and the metrics (what Prometheus counts) all read, so they always agree.

use std::time::Duration;

/// The error type inside every route stack.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which deadline fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// The whole-request deadline (route `timeout` or the client's `grpc-timeout`).
    Request,
    /// One attempt's deadline (`retry.per_try_timeout`).
    PerTry,
}

/// A deadline expired before the upstream answered.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("{} deadline expired", match .kind { TimeoutKind::Request => "request", TimeoutKind::PerTry => "per-try" })]
pub struct Elapsed {
    /// Which deadline.
    pub kind: TimeoutKind,
}

/// The rate limiter refused the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited; retry after {retry_after:?}")]
pub struct RateLimited {
    /// When a token will be available.
    pub retry_after: Duration,
    /// Bucket size, for the `RateLimit-Policy` field.
    pub burst: u32,
    /// Seconds for an empty bucket to refill, the policy's window.
    pub window_secs: u64,
}

/// The circuit breaker is open (or half-open with all probes taken).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("circuit open")]
pub struct CircuitOpen;

/// The concurrency limit is reached.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("too many requests in flight on this route")]
pub struct Overloaded;

/// No route matched the request.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no route matches the request")]
pub struct NoRoute;

/// The request cannot be forwarded as sent.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("bad request: {0}")]
pub struct BadRequest(pub &'static str);

/// Where an upstream failure happened, which decides whether a retry is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// No connection could be made: nothing was sent, any method may be retried.
    Connect,
    /// The connection broke after the request (or part of it) may have been sent.
    Reset,
}

/// Talking to the upstream failed.
#[derive(Debug, thiserror::Error)]
#[error("upstream {}: {source}", match .kind { UpstreamErrorKind::Connect => "connect failed", UpstreamErrorKind::Reset => "connection failed" })]
pub struct UpstreamError {
    /// Connect failure or reset.
    pub kind: UpstreamErrorKind,
    /// The underlying client error.
    #[source]
    pub source: BoxError,
}

/// The classification of a failure the proxy answers for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `rate_limited`.
    RateLimited(RateLimited),
    /// `circuit_open`.
    CircuitOpen,
    /// `overloaded`.
    Overloaded,
    /// `timeout`.
    Timeout(TimeoutKind),
    /// `upstream_unavailable`; `connect` tells a refused connection from a broken one.
    UpstreamUnavailable {
        /// True when the connection was never made.
        connect: bool,
    },
    /// `no_route`.
    NoRoute,
    /// `bad_request`.
    BadRequest,
    /// Anything else (a bug): `internal`.
    Internal,
}

impl ErrorKind {
    /// Classifies an error by walking its source chain once.
    pub fn of(err: &(dyn std::error::Error + 'static)) -> ErrorKind {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(r) = e.downcast_ref::<RateLimited>() {
                return ErrorKind::RateLimited(*r);
            }
            if e.is::<CircuitOpen>() {
                return ErrorKind::CircuitOpen;
            }
            if e.is::<Overloaded>() {
                return ErrorKind::Overloaded;
            }
            if let Some(t) = e.downcast_ref::<Elapsed>() {
                return ErrorKind::Timeout(t.kind);
            }
            if let Some(u) = e.downcast_ref::<UpstreamError>() {
                return ErrorKind::UpstreamUnavailable {
                    connect: u.kind == UpstreamErrorKind::Connect,
                };
            }
            if e.is::<NoRoute>() {
                return ErrorKind::NoRoute;
            }
            if e.is::<BadRequest>() {
                return ErrorKind::BadRequest;
            }
            if e.is::<tokio::time::error::Elapsed>() {
                return ErrorKind::Timeout(TimeoutKind::Request);
            }
            cur = e.source();
        }
        ErrorKind::Internal
    }

    /// Classifies a boxed error.
    pub fn of_box(err: &BoxError) -> ErrorKind {
        ErrorKind::of(err.as_ref())
    }

    /// The reason as written in `Proxy-Status` `details` and `fallback.when`.
    pub fn reason(&self) -> &'static str {
        match self {
            ErrorKind::RateLimited(_) => "rate_limited",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Timeout(_) => "timeout",
            ErrorKind::UpstreamUnavailable { .. } => "upstream_unavailable",
            ErrorKind::NoRoute => "no_route",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Internal => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_walks_sources() {
        let inner: BoxError = Box::new(Elapsed {
            kind: TimeoutKind::PerTry,
        });
        let outer: BoxError = Box::new(UpstreamError {
            kind: UpstreamErrorKind::Reset,
            source: inner,
        });
        // the outermost known type wins
        assert_eq!(
            ErrorKind::of_box(&outer),
            ErrorKind::UpstreamUnavailable { connect: false }
        );
        let e: BoxError = Box::new(CircuitOpen);
        assert_eq!(ErrorKind::of_box(&e).reason(), "circuit_open");
        let e: BoxError = "something odd".into();
        assert_eq!(ErrorKind::of_box(&e), ErrorKind::Internal);
    }
}
