//! breakwater: a resilience proxy.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod http;
pub mod telemetry;
pub mod layers;
