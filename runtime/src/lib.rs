//! corral's guest runtime: everything that runs in a zygote or a worker,
//! and nothing of corrald's (see ARCHITECTURE.md, "Processes").
//!
//! - [`host`]: the Wasm host: WASI preview1, WASI 0.2 commands and
//!   `wasi:http` handlers, limits, the guest log.
//! - [`sandbox`]: the OS sandbox (landlock, seccomp, rlimits,
//!   no_new_privs) a process enters before it runs guest code.
//! - [`guest`]: the one seam every runner goes through, in an order the
//!   types enforce: load the artifact and pick the guest for its kind
//!   ([`guest::Guest::prepare`]), enter the sandbox
//!   ([`guest::Guest::enter`]), then run it once, serve its listeners, or
//!   fork a pool of workers (the zygote). `corral run`, the containerd
//!   shim's task process and corrald's zygotes all use it.
//! - [`zygote`] and the worker: the per-app pool of pre-forked workers,
//!   and the serve loops (HTTP/1.1, HTTP/2, stdio) that workers and the
//!   standalone runners share; [`protocol`]: the zygote ↔ corrald messages.
//! - [`template`]: the one process per corrald that app zygotes are forked
//!   from (engines built, image paged in; never an app's data).
//! - [`counters`]: the per-app metrics page workers write and corrald reads.
//! - [`tls`]: an app's certificate and key, read by corrald, made into a
//!   rustls server configuration by its zygote, used by its workers.
//!
//! Crate arrows point one way: `runtime → compiler → policy`; corrald
//! (`supervisor`) and the shim depend on this crate, never the reverse.

pub mod counters;
pub mod guest;
pub mod host;
mod pool;
pub mod protocol;
pub mod sandbox;
pub mod sys;
pub mod template;
pub mod tls;
mod worker;
pub mod zygote;

pub use worker::TokioTimer;
