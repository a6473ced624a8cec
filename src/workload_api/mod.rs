//! The SPIFFE Workload API and Envoy SDS on a unix socket (and, unattested, TCP): listener binding, peer
//! credentials and attestation once per connection, the security header, and the streams.

pub mod client;
pub mod codec;
mod denial;
mod follow;
pub mod jwt;
pub mod listener;
pub mod metrics;
pub mod sds;
pub mod server;

/// The generated protobuf messages and gRPC service (from `proto/workload.proto`).
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("_");
}

/// The metadata every call must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
