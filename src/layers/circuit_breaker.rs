//! Circuit breaker (being written).
