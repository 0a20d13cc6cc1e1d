//! corrald, the corral supervisor daemon (see ARCHITECTURE.md and
//! `corral_supervisor::daemon`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use corral_supervisor::dbus::Bus;

/// The corral supervisor: serves the apps of a policy from pre-forked,
/// sandboxed worker pools.
#[derive(Debug, Parser)]
#[command(name = "corrald", version)]
struct Args {
    /// The policy file (drop-ins in policy.d/ next to it are merged).
    #[arg(long, value_name = "PATH", default_value = corral_policy::defaults::POLICY_PATH)]
    policy: PathBuf,

    /// The D-Bus bus to serve org.corral.Manager1 on (docs/dbus.md);
    /// `none`: no D-Bus. An unreachable bus is logged, not fatal.
    #[arg(long, value_enum, env = "CORRAL_BUS", default_value_t = Bus::System)]
    bus: Bus,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Internal: the per-app zygote corrald starts (control socket on stdin).
    #[command(hide = true)]
    Zygote,
}

fn main() -> ExitCode {
    let args = Args::parse();
    use corral_supervisor::daemon::logging::{self, Role};
    logging::init(match args.command {
        Some(Command::Zygote) => Role::Zygote,
        None => Role::Daemon,
    });
    match args.command {
        Some(Command::Zygote) => corral_runtime::zygote::main(),
        // Absolute: `corral status` and a refused reload's errors name the
        // file for clients in any directory.
        None => corral_supervisor::daemon::run(
            &std::path::absolute(&args.policy).unwrap_or(args.policy),
            args.bus,
        ),
    }
}
