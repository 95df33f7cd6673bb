//! breakwater: a resilience proxy.
#![forbid(unsafe_code)]

pub mod config;
