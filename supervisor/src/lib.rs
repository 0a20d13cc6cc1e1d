//! corral's supervisor crate: the `corral` command and (in later modules)
//! the `corrald` daemon, its worker pools, the Wasm host and the sandbox.

pub mod api;
pub mod cli;
pub mod daemon;
pub mod dbus;
pub mod host;
pub mod sandbox;
