//! The Datadog agent's eBPF-less protocol, so that the agent's system-probe
//! can take our events as it takes those of Datadog's own tracer, and
//! `serve` can take Datadog tracers. Plain TCP, no reply: frames of a 4-byte
//! little-endian length and a msgpack body that encodes the agent's Go
//! structs (SPEC.md in the shared reference, `datadog-ebpfless/`).
//!
//! - `wire`: msgpack as the Go encoder writes it and the agent reads it;
//! - `msg`: the agent's structs, in Go's field order;
//! - `frame`: framing, and the 256 KiB limit;
//! - `outbound`: our Hello and events as messages; `inbound`: the reverse.
//!
//! Invariants: a frame is written as one buffer, never over 256 KiB; a
//! syscall message's type comes from its payload, so the key the agent
//! dereferences for that type is never nil; no Goodbye is ever built; an
//! IP is always sent as text the agent can parse; decoding never panics nor
//! recurses on the input's nesting.

pub mod frame;
pub mod inbound;
pub mod msg;
pub mod outbound;
pub mod wire;

#[cfg(test)]
mod tests;
