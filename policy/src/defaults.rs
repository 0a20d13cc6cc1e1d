//! The default of every policy key, in one place; `docs/policy.md` lists
//! the same values and a test keeps the two in step.

use std::time::Duration;

use crate::spec::{
    AppKind, Enforcement, Limits, PoolSpec, RestartOn, RestartSpec, SandboxSpec, ZygoteMode,
};

/// The main policy file.
pub const POLICY_PATH: &str = "/etc/corral/policy.toml";
/// Drop-ins: `*.toml` in this directory next to the main file.
pub const DROP_IN_DIR: &str = "policy.d";

pub const CACHE_DIR: &str = "/var/cache/corral";
pub const STATE_DIR: &str = "/var/lib/corral";
pub const API_SOCKET: &str = "/run/corral/api.sock";
pub const API_GROUP: &str = "corral";
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest `pool.min`/`pool.max` accepted.
pub const POOL_MAX_LIMIT: i64 = 4096;

pub const POOL: PoolSpec = PoolSpec {
    min: 0,
    max: 4,
    idle_timeout: Duration::from_secs(60),
    concurrency: 16,
    max_requests: None,
    zygote: ZygoteMode::OnDemand,
    reuse: None,
};

/// `limits.module-size`: large components (an interpreter with its
/// standard library) reach tens of MiB.
pub const MODULE_SIZE: u64 = 256 * 1024 * 1024;

pub(crate) const WASM_PAGE: u64 = 64 * 1024;

/// Default limits; the timeout depends on the kind (a long-running
/// `command` app has none).
pub const fn limits(kind: AppKind) -> Limits {
    Limits {
        memory: 128 * 1024 * 1024,
        timeout: match kind {
            AppKind::Http | AppKind::Stdio => Some(Duration::from_secs(30)),
            AppKind::Command => None,
        },
        instances: 1000,
        tables: 1000,
        stdout: 1024 * 1024,
        module_size: MODULE_SIZE,
    }
}

pub const SANDBOX: SandboxSpec = SandboxSpec {
    landlock: Enforcement::Require,
    seccomp: Enforcement::Require,
};

pub const RESTART: RestartSpec = RestartSpec {
    on: RestartOn::Failure,
    backoff_min: Duration::from_millis(100),
    backoff_max: Duration::from_secs(30),
    give_up: Some(crate::spec::GiveUp {
        crashes: 5,
        window: Duration::from_secs(10),
    }),
};
