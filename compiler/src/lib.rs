//! corral-compiler: the engine configuration, ahead-of-time compilation
//! (wasmtime/cranelift) and the content-addressed artifact cache shared by
//! `corral compile` and the daemon.
//!
//! - [`engine_config`] / [`new_engine`]: THE wasmtime configuration, derived
//!   from an app's spec ([`EngineOptions`]); the same one compiles and loads.
//! - [`Cache`]: `<cache>/<target>/<engine-hash>/<module-sha256>.cwasm`, with
//!   atomic writes, a per-entry compile lock, digest checks before loading,
//!   LRU garbage collection that keeps entries in use. See docs/cache.md.
//! - The one `unsafe` deserialize is in `deserialize.rs`.

mod cache;
mod deserialize;
mod engine;
mod error;
mod fs;
pub mod image;
mod lock;
pub mod preflight;
mod source;
mod sources;

pub use cache::{
    Artifact, ArtifactKey, Cache, CompiledEntry, Entry, EntryMeta, GcReport, Handoff,
    PinnedArtifact, Program, Verification, load_handed_over,
};
pub use engine::{
    Allocation, BuiltEngine, CpuFeatures, EngineOptions, PoolingOptions, build_engine,
    engine_config, engine_hash, host_triple, new_engine,
};
pub use error::{CacheError, CompileError, chain};
pub use fs::write_atomic;
pub use source::{ProgramKind, Source};

/// The wasmtime release corral is built with (the workspace pins it with
/// `=`; a test checks this against Cargo.lock). wasmtime exports no such
/// constant, and `corral --version`, `corrald` and the APIs report it.
pub const WASMTIME_VERSION: &str = "48.0.8";

#[cfg(test)]
mod tests {
    #[test]
    fn wasmtime_version_matches_the_lock_file() {
        let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
            .expect("Cargo.lock");
        let entry = format!(
            "name = \"wasmtime\"\nversion = \"{}\"",
            super::WASMTIME_VERSION
        );
        assert!(lock.contains(&entry), "Cargo.lock has no {entry:?}");
    }
}
