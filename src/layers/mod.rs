//! The resilience layers, one module each, each a tower `Layer` + `Service` over
//! `Request<Body>` / `Response<Body>` / `BoxError`. Per route, outermost first:
//! trace -> metrics -> fallback -> rate_limit -> concurrency_limit -> timeout -> retry ->
//! circuit_breaker -> attempt (per-try timeout) -> upstream. Each rejects in `call`
//! (never parks in `poll_ready`), so a refused request is answered at once.

pub mod attempt;
pub mod circuit_breaker;
pub mod classify;
pub mod concurrency_limit;
pub mod fallback;
pub mod metrics;
pub mod rate_limit;
pub mod retry;
pub mod timeout;
pub mod trace;
