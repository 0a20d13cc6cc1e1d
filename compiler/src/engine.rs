//! The one wasmtime engine configuration corral uses, derived from an app's
//! spec.
//!
//! Invariant: every setting that changes compiled code (cranelift flags, ISA
//! features, tunables, wasm features) depends only on [`EngineOptions::cpu`]
//! and the target, never on pooling or limits. So the same app compiled by
//! `corral compile` and loaded by the daemon gets the same
//! `Engine::precompile_compatibility_hash()`, and turning pooling off (or
//! falling back to on-demand allocation) never invalidates the cache.
//!
//! Settings the host relies on: epoch interruption (timeouts, not fuel), the
//! component model, async support (always on in wasmtime 48 when the `async`
//! feature is compiled in; `Config::async_support` is a deprecated no-op
//! there), wasm backtraces with names and DWARF details (set explicitly, so
//! `WASMTIME_BACKTRACE_DETAILS` does not change the hash), and copy-on-write
//! memory images.

use std::fmt;

use corral_policy::{AppKind, AppSpec};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, WasmBacktraceDetails,
};

use crate::error::CompileError;

/// The engine-relevant part of an app's spec. Serializable and hashable:
/// corrald names the engine a zygote needs to the zygote template, which
/// keeps one built engine per distinct value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct EngineOptions {
    /// Bytes of linear memory per instance (`limits.memory`); also the
    /// pooling allocator's slot size.
    pub memory_limit: u64,
    /// Pre-reserve instance slots (pooling allocator); `None` allocates on
    /// demand. Does not affect compiled code.
    pub pooling: Option<PoolingOptions>,
    /// Which CPU features compiled code may use.
    pub cpu: CpuFeatures,
}

/// Sizes of the pooling allocator for one worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct PoolingOptions {
    /// Requests (stores) a worker runs at once (`pool.concurrency`).
    pub concurrency: u32,
    /// Core instances per store (`limits.instances`).
    pub instances_per_store: u32,
    /// Tables per store (`limits.tables`).
    pub tables_per_store: u32,
}

/// Which CPU features compiled code may use.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CpuFeatures {
    /// Everything this host's CPU has (fastest; artifacts run only on CPUs
    /// with the same features or more). Only meaningful for the host target.
    #[default]
    Native,
    /// The target architecture's baseline (e.g. x86-64 with SSE2 only):
    /// artifacts run on every CPU of that architecture. Always used for
    /// cross-target compiles.
    Baseline,
}

impl fmt::Display for CpuFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuFeatures::Native => "native",
            CpuFeatures::Baseline => "baseline",
        })
    }
}

impl std::str::FromStr for CpuFeatures {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(CpuFeatures::Native),
            "baseline" => Ok(CpuFeatures::Baseline),
            _ => Err(format!("`{s}`: expected `native` or `baseline`")),
        }
    }
}

/// The most instance slots a pool reserves, whatever the policy says:
/// wasmtime's own default, so a large `limits.instances` cannot reserve
/// terabytes of address space.
const MAX_POOL_SLOTS: u32 = 1000;

impl EngineOptions {
    /// Options for an app from the policy. `http` and `stdio` apps create an
    /// instance per request or connection, so they use the pooling
    /// allocator; a `command` app has one long-running instance and does not.
    pub fn for_app(app: &AppSpec) -> Self {
        let pooling = match app.kind {
            AppKind::Http | AppKind::Stdio => Some(PoolingOptions {
                concurrency: app.pool.concurrency.max(1),
                instances_per_store: app.limits.instances.max(1),
                tables_per_store: app.limits.tables.max(1),
            }),
            AppKind::Command => None,
        };
        EngineOptions {
            memory_limit: app.limits.memory,
            pooling,
            cpu: CpuFeatures::Native,
        }
    }

    /// Options for `corral run FILE` and `corral compile FILE` without a
    /// policy: the default memory limit, on-demand allocation, native CPU
    /// features. Compiled code is identical to [`EngineOptions::for_app`]'s.
    pub fn default_for_cli() -> Self {
        EngineOptions {
            memory_limit: corral_policy::defaults::limits(AppKind::Command).memory,
            pooling: None,
            cpu: CpuFeatures::Native,
        }
    }

    /// The same options with another CPU feature set.
    pub fn with_cpu(mut self, cpu: CpuFeatures) -> Self {
        self.cpu = cpu;
        self
    }

    /// The same options without the pooling allocator.
    pub fn without_pooling(mut self) -> Self {
        self.pooling = None;
        self
    }
}

/// The target triple of this host (the one `corral` was built for).
pub fn host_triple() -> String {
    target_lexicon::HOST.to_string()
}

/// THE engine configuration: used to compile and to load. `target` is a
/// triple such as `aarch64-unknown-linux-gnu`; `None` is this host.
///
/// A foreign target, or [`CpuFeatures::Baseline`], compiles for the
/// target's baseline CPU; pooling is left off for foreign targets (such an
/// engine only compiles).
pub fn engine_config(opts: &EngineOptions, target: Option<&str>) -> Result<Config, CompileError> {
    let mut config = Config::new();
    // Code-affecting settings, identical for every app.
    config
        .epoch_interruption(true)
        .wasm_component_model(true)
        .wasm_backtrace_details(WasmBacktraceDetails::Enable)
        .memory_init_cow(true)
        .parallel_compilation(true);

    let host = host_triple();
    let foreign = target.is_some_and(|t| t != host);
    match (target, opts.cpu) {
        (Some(t), _) => {
            config.target(t).map_err(|e| CompileError::Target {
                target: t.to_string(),
                reason: e.to_string(),
            })?;
        }
        // Naming the host triple explicitly turns off host CPU detection.
        (None, CpuFeatures::Baseline) => {
            config.target(&host).map_err(|e| CompileError::Target {
                target: host.clone(),
                reason: e.to_string(),
            })?;
        }
        (None, CpuFeatures::Native) => {}
    }

    // Runtime-only settings below: they do not change compiled code.
    if let (Some(p), false) = (opts.pooling, foreign) {
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling_config(
            opts.memory_limit,
            p,
        )));
    }
    Ok(config)
}

fn pooling_config(memory_limit: u64, p: PoolingOptions) -> PoolingAllocationConfig {
    let stores = p.concurrency.min(MAX_POOL_SLOTS);
    let mut pool = PoolingAllocationConfig::new();
    // wasmtime's default of one table per module would refuse any module
    // with more (reference types), whatever `limits.tables` allows.
    pool.max_tables_per_module(p.tables_per_store.min(MAX_POOL_SLOTS));
    pool.total_component_instances(stores)
        .total_stacks(stores)
        .total_core_instances(
            stores
                .saturating_mul(p.instances_per_store)
                .min(MAX_POOL_SLOTS),
        )
        .total_memories(
            stores
                .saturating_mul(p.instances_per_store)
                .min(MAX_POOL_SLOTS),
        )
        .total_tables(
            stores
                .saturating_mul(p.tables_per_store)
                .min(MAX_POOL_SLOTS),
        )
        .max_memory_size(usize::try_from(memory_limit).unwrap_or(usize::MAX));
    pool
}

/// How instances of an engine are allocated, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocation {
    /// The pooling allocator, as the options asked.
    Pooling,
    /// On demand, as the options asked.
    OnDemand,
    /// The options asked for pooling, but reserving the pool failed (for
    /// example under a low `RLIMIT_AS` or `vm.overcommit_memory=2`); the
    /// engine allocates on demand instead. Compiled code is the same.
    OnDemandFallback { reason: String },
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allocation::Pooling => f.write_str("pooling"),
            Allocation::OnDemand => f.write_str("on-demand"),
            Allocation::OnDemandFallback { reason } => {
                write!(f, "on-demand (pooling failed: {reason})")
            }
        }
    }
}

/// A host engine and how it allocates instances.
#[derive(Clone)]
pub struct BuiltEngine {
    pub engine: Engine,
    pub allocation: Allocation,
}

impl fmt::Debug for BuiltEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuiltEngine")
            .field("allocation", &self.allocation)
            .finish_non_exhaustive()
    }
}

/// An engine for this host. If the pooling allocator cannot reserve its
/// address space, falls back to on-demand allocation and logs a warning;
/// use [`build_engine`] to see that in the result.
pub fn new_engine(opts: &EngineOptions) -> Result<Engine, CompileError> {
    build_engine(opts, None).map(|b| b.engine)
}

/// An engine for `target` (`None`: this host), with how it allocates.
pub fn build_engine(
    opts: &EngineOptions,
    target: Option<&str>,
) -> Result<BuiltEngine, CompileError> {
    let config = engine_config(opts, target)?;
    let pooled = opts.pooling.is_some() && target.is_none_or(|t| t == host_triple());
    match Engine::new(&config) {
        Ok(engine) => Ok(BuiltEngine {
            engine,
            allocation: if pooled {
                Allocation::Pooling
            } else {
                Allocation::OnDemand
            },
        }),
        Err(e) if pooled => {
            let reason = format!("{e:#}");
            tracing::warn!(%reason, "pooling allocator unavailable; allocating instances on demand");
            let config = engine_config(&opts.clone().without_pooling(), target)?;
            let engine = Engine::new(&config).map_err(|e| engine_error(target, &e))?;
            Ok(BuiltEngine {
                engine,
                allocation: Allocation::OnDemandFallback { reason },
            })
        }
        Err(e) => Err(engine_error(target, &e)),
    }
}

fn engine_error(target: Option<&str>, e: &wasmtime::Error) -> CompileError {
    match target {
        Some(t) => CompileError::Target {
            target: t.to_string(),
            reason: format!("{e:#}"),
        },
        None => CompileError::Engine {
            reason: format!("{e:#}"),
        },
    }
}

/// The engine part of a cache key: a hex SHA-256 of wasmtime's
/// `precompile_compatibility_hash()`, fed with fixed-endian integers so the
/// same engine settings give the same name on every build host.
pub fn engine_hash(engine: &Engine) -> String {
    use std::hash::Hash;
    let mut hasher = StableHasher(<sha2::Sha256 as sha2::Digest>::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let digest = sha2::Digest::finalize(hasher.0);
    hex::encode(&digest[..16])
}

/// A `std::hash::Hasher` that feeds SHA-256, integers little-endian.
struct StableHasher(sha2::Sha256);

impl std::hash::Hasher for StableHasher {
    fn finish(&self) -> u64 {
        // Only the full digest is used (see `engine_hash`).
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        sha2::Digest::update(&mut self.0, bytes);
    }
    fn write_u16(&mut self, i: u16) {
        self.write(&i.to_le_bytes());
    }
    fn write_u32(&mut self, i: u32) {
        self.write(&i.to_le_bytes());
    }
    fn write_u64(&mut self, i: u64) {
        self.write(&i.to_le_bytes());
    }
    fn write_u128(&mut self, i: u128) {
        self.write(&i.to_le_bytes());
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
    fn write_i16(&mut self, i: i16) {
        self.write_u16(i as u16);
    }
    fn write_i32(&mut self, i: i32) {
        self.write_u32(i as u32);
    }
    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64);
    }
    fn write_i128(&mut self, i: i128) {
        self.write_u128(i as u128);
    }
    fn write_isize(&mut self, i: isize) {
        self.write_u64(i as u64);
    }
}
