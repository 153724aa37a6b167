//! The event model generated from `proto/cws/v1/events.proto` and
//! `service.proto`: prost types and the tonic client and server for gRPC,
//! and protojson serde impls (proto field names) for JSON lines.

#[allow(clippy::all, missing_docs)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/cws.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/cws.v1.serde.rs"));
}

pub use generated::*;

use std::time::{SystemTime, UNIX_EPOCH};

/// The version of `service.proto` this build speaks (Hello and Welcome).
pub const PROTOCOL_VERSION: u32 = 1;

/// A wall-clock time as the protobuf well-known type.
pub fn timestamp(time: SystemTime) -> pbjson_types::Timestamp {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32 }
}
