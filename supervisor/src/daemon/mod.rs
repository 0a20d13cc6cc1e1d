//! corrald, the supervisor (see ARCHITECTURE.md, "Processes").
//!
//! corrald reads the policy, binds each app's sockets (or takes them from
//! systemd), compiles each module into the artifact cache, and runs one
//! supervising task per app. It never runs guest code and never forks
//! without exec: per app it starts a zygote (`corrald zygote`, see
//! `corral_runtime::zygote`) and hands it the spec, the listening sockets and the open
//! artifact over a control socket (`corral_runtime::protocol`). The zygote forks the
//! workers, which accept on the sockets themselves.
//!
//! Per app (`supervisor.rs`): at `pool.min = 0` corrald only watches the
//! listening sockets for a waiting connection (without accepting it) and
//! starts the zygote then; the zygote exits when its last worker retires.
//! A zygote that dies otherwise is restarted with exponential backoff
//! (`restart.backoff`); `restart.give-up` crashes within its window mark
//! the app failed, and only that app.

pub(crate) mod listeners;
pub mod logging;
pub mod manager;
pub(crate) mod metrics;
mod supervisor;
mod sys;

pub use supervisor::run;
