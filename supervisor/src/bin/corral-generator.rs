//! corral-generator: the systemd generator that turns the policy's
//! `[sockets.NAME]` tables into `corral-NAME.socket` units (see
//! supervisor/src/generator.rs and docs/policy.md). systemd runs it at boot
//! and on `systemctl daemon-reload` with three output directories.
//!
//! The policy is /etc/corral/policy.toml, or `$CORRAL_POLICY` (for tests).
//! It always exits 0: a generator must not fail the boot.

#[path = "../generator.rs"]
mod generator;

fn main() {
    let args: Vec<std::path::PathBuf> = std::env::args_os().skip(1).map(Into::into).collect();
    let policy = std::env::var_os("CORRAL_POLICY")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| corral_policy::defaults::POLICY_PATH.into());
    generator::run(&args, &policy);
}
