//! cws-instrumentation: a ptrace + seccomp workload security tracer for
//! containers where eBPF cannot run (AWS Fargate and the like).
//!
//! `trace -- ENTRYPOINT` forks the entrypoint under ptrace with a seccomp
//! filter that stops only the syscalls worth watching, decodes them into
//! events (the model is `proto/cws/v1/events.proto`), and exits with the
//! workload's status. `serve` is a reference agent sidecar; `setup` copies
//! the binary into a volume shared with the application container.
//!
//! The modules form layers, each importing only lower ones:
//! - bottom: [`proto`] (the event model), [`text`] (names as lossless text), [`log`], [`exit`],
//!   [`address`], [`cli`], [`auth`] (the token and TLS between tracer and agent);
//! - [`queue`]: the bounded queue between the tracer and the exporters;
//! - [`trace`]: the engine (one thread owns every ptrace call);
//!   [`context`] and [`ecs`]: who is tracing what, for the agent;
//! - [`datadog`]: the Datadog agent's eBPF-less protocol (msgpack frames);
//! - [`export`] (the queue's consumers: JSON lines, verbose printer, gRPC),
//!   [`serve`], [`setup`];
//! - [`command`]: the subcommands, which put the layers together.
//!
//! ARCHITECTURE.md maps the code and states its invariants.

pub mod address;
pub mod auth;
pub mod cli;
pub mod command;
pub mod context;
pub mod datadog;
pub mod ecs;
pub mod exit;
pub mod export;
pub mod log;
pub mod proto;
pub mod queue;
pub mod serve;
pub mod setup;
pub mod text;
pub mod trace;
