//! corrald, the supervisor (see ARCHITECTURE.md, "Processes").
//!
//! corrald reads the policy, binds each app's sockets (or takes them from
//! systemd), compiles each module into the artifact cache, and runs one
//! supervising task per app. It never runs guest code and never forks
//! without exec: per app it gets a zygote (`corral_runtime::zygote`),
//! forked by the zygote template it exec'd once (`template.rs`,
//! `corral_runtime::template`) or exec'd itself (`corrald zygote`), and
//! hands it the spec, the listening sockets and the open artifact over a
//! control socket (`corral_runtime::protocol`).
//! The zygote forks the workers, which accept on the sockets themselves.
//!
//! By job:
//! - `service.rs`: the service loop: start, systemd notifications,
//!   signals, the API's requests, idle-exit, stop;
//! - `reconcile.rs`: which app versions run (start, reload, stop, restart,
//!   recompile), the one place that changes it;
//! - `template.rs`: the zygote template's keeper (start, restart, fork
//!   requests);
//! - `app.rs`: one app's task: at `pool.min = 0` it only watches the
//!   listening sockets for a waiting connection (without accepting it) and
//!   starts the zygote then; the zygote exits when its last worker retires.
//!   A zygote that dies otherwise is restarted with exponential backoff
//!   (`restart.backoff`); `restart.give-up` crashes within its window mark
//!   the app failed, and only that app.
//!
//! The daemon serves the [`crate::manager::Manager`]'s requests; the front
//! ends that make them (the Unix-socket API, D-Bus) are started by corrald's
//! entry point through [`FrontEnds`]: nothing here imports them.

mod app;
pub mod listeners;
pub mod logging;
pub(crate) mod open_files;
mod reconcile;
mod service;
mod status;
mod sys;
mod template;

pub use listeners::SystemdSockets;
pub use service::run;

/// What corrald's entry point starts beside the daemon: the management
/// front ends over its [`crate::manager::Manager`]. Started once, in
/// corrald's runtime, after the policy's apps are declared (the first
/// request already lists them) and before they start (`READY=1` waits for
/// it).
pub trait FrontEnds: Send + 'static {
    /// Start serving `manager`; what the future gives is kept until corrald
    /// stops (dropping it stops the front end).
    fn start(
        self,
        manager: crate::manager::Manager,
        daemon: &corral_policy::DaemonSpec,
        systemd: &SystemdSockets,
    ) -> impl std::future::Future<Output = Box<dyn std::any::Any + Send>> + Send;
}
