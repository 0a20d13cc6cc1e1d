//! The library half of `containerd-shim-corral-v1` (the binary is
//! src/main.rs): what the tests reach directly.

pub mod content;
