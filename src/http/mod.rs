//! The shared HTTP vocabulary of the proxy and its layers: the body type, the replayable
//! request body, gRPC helpers and the proxy's own (synthetic) responses.

pub mod body;
pub mod grpc;
pub mod replay;
pub mod synthetic;

pub use body::Body;

use std::net::SocketAddr;

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
