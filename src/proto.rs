//! The event model generated from `proto/cws/v1/events.proto`, with prost
//! types for gRPC and protojson serde impls (proto field names) for JSON.
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/cws.v1.rs"));
include!(concat!(env!("OUT_DIR"), "/cws.v1.serde.rs"));
