//! corrald, the corral supervisor daemon (see ARCHITECTURE.md and
//! `corral_supervisor::daemon`). This entry point wires the daemon to its
//! front ends (the Unix-socket API and D-Bus), so the daemon imports
//! neither.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use corral_supervisor::daemon::{FrontEnds, SystemdSockets};
use corral_supervisor::dbus::Bus;
use corral_supervisor::manager::Manager;

/// The corral supervisor: serves the apps of a policy from pre-forked,
/// sandboxed worker pools.
#[derive(Debug, Parser)]
#[command(name = "corrald", version)]
struct Args {
    /// The policy file (drop-ins in policy.d/ next to it are merged).
    #[arg(long, value_name = "PATH", default_value = corral_policy::defaults::POLICY_PATH)]
    policy: PathBuf,

    /// The D-Bus bus to serve org.corral.Manager1 on (docs/dbus.md);
    /// `none`: no D-Bus. Default: the system bus, when the machine has one
    /// (none is an info line); an unreachable bus asked for here is an
    /// error in the log, not fatal.
    #[arg(long, value_enum, env = "CORRAL_BUS")]
    bus: Option<Bus>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Internal: the per-app zygote corrald starts (control socket on stdin).
    #[command(hide = true)]
    Zygote,
    /// Internal: the zygote template zygotes are forked from (control
    /// socket on stdin).
    #[command(hide = true)]
    Template,
}

/// The management front ends: the Unix-socket API (and metrics listener)
/// and D-Bus.
struct Apis {
    bus: Option<Bus>,
}

impl FrontEnds for Apis {
    async fn start(
        self,
        manager: Manager,
        daemon: &corral_policy::DaemonSpec,
        systemd: &SystemdSockets,
    ) -> Box<dyn std::any::Any + Send> {
        corral_supervisor::api::spawn(manager.clone(), daemon, systemd);
        // No bus, or a name we may not own, is logged and corrald serves
        // on without D-Bus.
        let bus = self.bus.unwrap_or_default();
        Box::new(corral_supervisor::dbus::spawn(manager, bus, self.bus.is_some()).await)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    use corral_supervisor::daemon::logging::{self, Role};
    logging::init(match args.command {
        Some(Command::Zygote | Command::Template) => Role::Zygote,
        None => Role::Daemon,
    });
    match args.command {
        Some(Command::Zygote) => corral_runtime::zygote::main(),
        Some(Command::Template) => corral_runtime::template::main(),
        // Absolute: `corral status` and a refused reload's errors name the
        // file for clients in any directory.
        None => corral_supervisor::daemon::run(
            &std::path::absolute(&args.policy).unwrap_or(args.policy),
            Apis { bus: args.bus },
        ),
    }
}
