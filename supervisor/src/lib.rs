//! corral's supervisor crate: the `corrald` daemon (apps, reconcile,
//! restarts, systemd), its manager and front ends (Unix-socket API,
//! D-Bus), the `corral` command and the systemd generator. Everything that
//! runs guest code (zygotes, workers, the Wasm host, the OS sandbox) is
//! `corral_runtime`'s.

pub mod api;
pub mod cli;
pub mod daemon;
pub mod dbus;
pub mod fitness;
pub mod manager;
pub mod oci;
