//! Rate limit (being written).
