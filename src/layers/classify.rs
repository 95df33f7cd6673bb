//! What happened to one upstream attempt, and whether a configured condition list
//! (retry `when`, breaker `failure_on`) matches it. Retry, the breaker and the attempt
//! metrics all classify through here, so they agree on what a failure is.

use http::Response;

use crate::config::Condition;
use crate::error::{BoxError, ErrorKind, TimeoutKind};
use crate::http::{grpc, Body};

/// The gRPC status of a response whose status was read from its trailers before any
/// of its body was forwarded; put in response extensions by the upstream client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcStatus(pub u8);

/// A `grpc-retry-pushback-ms` read from trailers ahead of forwarding (negative: do not
/// retry); put in response extensions by the upstream client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcPushback(pub i64);

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered; `grpc` is its gRPC status when known at header time.
    Response {
        /// HTTP status.
        status: u16,
        /// gRPC status from trailers-only headers or prefetched trailers.
        grpc: Option<u8>,
    },
    /// No connection could be made.
    ConnectFailure,
    /// The connection broke.
    Reset,
    /// A deadline fired.
    Timeout(TimeoutKind),
    /// The proxy itself refused (breaker, limiter): not an upstream outcome.
    Refused,
    /// Anything else.
    Other,
}

impl Outcome {
    /// Classifies an attempt's result.
    pub fn of(result: &Result<Response<Body>, BoxError>) -> Outcome {
        match result {
            Ok(res) => Outcome::of_response(res),
            Err(e) => Outcome::of_error(e),
        }
    }

    /// Classifies a response.
    pub fn of_response(res: &Response<Body>) -> Outcome {
        let grpc = grpc::status(res.headers())
            .or_else(|| res.extensions().get::<GrpcStatus>().map(|g| g.0));
        Outcome::Response {
            status: res.status().as_u16(),
            grpc,
        }
    }

    /// Classifies an error.
    pub fn of_error(e: &BoxError) -> Outcome {
        match ErrorKind::of_box(e) {
            ErrorKind::UpstreamUnavailable { connect: true } => Outcome::ConnectFailure,
            ErrorKind::UpstreamUnavailable { connect: false } => Outcome::Reset,
            ErrorKind::Timeout(k) => Outcome::Timeout(k),
            ErrorKind::RateLimited(_) | ErrorKind::CircuitOpen | ErrorKind::Overloaded => {
                Outcome::Refused
            }
            _ => Outcome::Other,
        }
    }
}

/// A parsed list of conditions, matched without allocation.
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    list: Vec<Condition>,
}

impl Conditions {
    /// From a config list.
    pub fn new(list: &[Condition]) -> Conditions {
        Conditions {
            list: list.to_vec(),
        }
    }

    /// The conditions, in config order.
    pub fn list(&self) -> &[Condition] {
        &self.list
    }

    /// The index of the first condition that matches `o`.
    pub fn matches(&self, o: &Outcome) -> Option<usize> {
        self.list.iter().position(|c| matches_one(*c, o))
    }

    /// Whether any condition matches `o`.
    pub fn any(&self, o: &Outcome) -> bool {
        self.matches(o).is_some()
    }
}

fn matches_one(c: Condition, o: &Outcome) -> bool {
    match (c, *o) {
        (Condition::ConnectFailure, Outcome::ConnectFailure) => true,
        (Condition::Reset, Outcome::Reset) => true,
        (Condition::Timeout, Outcome::Timeout(TimeoutKind::PerTry)) => true,
        (Condition::Status5xx, Outcome::Response { status, .. }) => (500..600).contains(&status),
        (Condition::GatewayError, Outcome::Response { status, .. }) => {
            matches!(status, 502..=504)
        }
        (Condition::Retriable4xx, Outcome::Response { status, .. }) => status == 409,
        (Condition::Status(code), Outcome::Response { status, .. }) => status == code,
        (Condition::Grpc(code), Outcome::Response { grpc: Some(g), .. }) => g == code,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, grpc: Option<u8>) -> Outcome {
        Outcome::Response { status, grpc }
    }

    #[test]
    fn conditions_match_outcomes() {
        let c = Conditions::new(&[
            Condition::ConnectFailure,
            Condition::GatewayError,
            Condition::Status(429),
            Condition::Grpc(14),
        ]);
        assert_eq!(c.matches(&Outcome::ConnectFailure), Some(0));
        assert_eq!(c.matches(&resp(503, None)), Some(1));
        assert_eq!(c.matches(&resp(500, None)), None);
        assert_eq!(c.matches(&resp(429, None)), Some(2));
        assert_eq!(c.matches(&resp(200, Some(14))), Some(3));
        assert_eq!(c.matches(&resp(200, Some(0))), None);
        assert_eq!(c.matches(&Outcome::Reset), None);
        assert_eq!(c.matches(&Outcome::Refused), None);
        let t = Conditions::new(&[Condition::Timeout, Condition::Status5xx]);
        assert!(t.any(&Outcome::Timeout(TimeoutKind::PerTry)));
        assert!(
            !t.any(&Outcome::Timeout(TimeoutKind::Request)),
            "an expired total deadline is never retried"
        );
        assert!(t.any(&resp(500, None)));
        assert!(!Conditions::new(&[Condition::Retriable4xx]).any(&resp(404, None)));
    }
}
