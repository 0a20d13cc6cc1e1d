//! `containerd-shim-corral-v1`: a containerd shim v2 runtime that runs
//! Wasm images with corral's host, artifact cache and sandbox
//! (`runtime_type = "io.containerd.corral.v1"`, see docs/shim.md).
//!
//! containerd runs this binary with `start` / `delete` and then as the
//! shim's ttrpc server ([`service`]); the shim runs the same binary again
//! as `guest <plan>` for each container's process ([`guest`]).

mod cgroup;
mod guest;
mod plan;
mod service;
mod sys;

use std::path::PathBuf;

/// The first argument that makes this binary a task's process.
pub(crate) const GUEST_ARG: &str = "guest";
/// Where the node's artifact cache is (default [`DEFAULT_CACHE`]); read
/// from containerd's environment, which shims inherit.
pub(crate) const CACHE_ENV: &str = "CORRAL_SHIM_CACHE";
/// The node's cache unless [`CACHE_ENV`] says otherwise. Not inside corrald's cache (`/var/cache/corral`): that one belongs to
/// the `corral` user, and a root-only directory in it would stop
/// `corral cache` and corrald's gc from walking it.
pub(crate) const DEFAULT_CACHE: &str = "/var/cache/corral-shim";
/// `require` or `best-effort` (default): what happens when the kernel
/// lacks landlock or seccomp.
pub(crate) const SANDBOX_ENV: &str = "CORRAL_SHIM_SANDBOX";

pub(crate) fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

/// What `-v` prints: the layout of containerd's own shims
/// (`containerd-shim-runc-v2 -v`), so tools that read theirs read ours.
fn version_text() -> String {
    format!(
        "containerd-shim-corral-v1:\n  Version:  {}\n  Runtime:  {RUNTIME_ID} (shim API: task v2)\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The runtime type containerd names this shim by.
const RUNTIME_ID: &str = "io.containerd.corral.v1";

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == GUEST_ARG) {
        let Some(plan) = args.next() else {
            eprintln!("usage: containerd-shim-corral-v1 guest PLAN (started by the shim itself)");
            return std::process::ExitCode::from(2);
        };
        return guest::main(PathBuf::from(plan).as_path());
    }
    // `-v` (containerd and operators ask): the framework would refuse it
    // for want of a namespace before it looked at the flag.
    let all: Vec<_> = std::env::args_os().skip(1).collect();
    if containerd_shim::parse(&all).is_ok_and(|flags| flags.version) {
        print!("{}", version_text());
        return std::process::ExitCode::SUCCESS;
    }
    containerd_shim::run::<service::Service>(RUNTIME_ID, None);
    std::process::ExitCode::SUCCESS
}
