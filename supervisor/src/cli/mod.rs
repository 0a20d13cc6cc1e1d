//! The `corral` command: one file per subcommand, each an `XxxCommand`
//! (clap `Args`) with `execute`, as wasmtime's `src/commands/` does.
//!
//! Exit codes (documented in `corral --help`, README.md and docs/api.md):
//! 0 success, 1 the thing checked is invalid or the operation failed (a
//! refused reload too), 2 bad command line (clap's own code); the commands
//! that talk to corrald add 3 no such app, 4 access denied, 5 corrald not
//! reachable (see [`client::exit`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cache;
mod check;
pub mod client;
mod compile;
mod control;
mod docs;
mod doctor;
mod events;
mod pull;
mod run;
mod status;

pub use cache::{CacheCommand, CacheDirArgs};
pub use check::CheckCommand;
pub use compile::CompileCommand;
pub use control::{Action, AppCommand, ReloadCommand};
pub use docs::{CompletionsCommand, ManCommand};
pub use doctor::DoctorCommand;
pub use events::EventsCommand;
pub use pull::{PullCommand, PushCommand};
pub use run::RunCommand;
pub use status::{AppsCommand, StatusCommand};

/// Where the policy lives unless `--policy` says otherwise.
pub fn default_policy_path() -> PathBuf {
    PathBuf::from(corral_policy::defaults::POLICY_PATH)
}

/// corral: run WebAssembly apps as sandboxed, socket-activated services.
#[derive(Debug, Parser)]
#[command(name = "corral", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 success; 1 invalid input or failed operation (a refused \
     reload too); 2 bad command line; 3 no such app; 4 access denied (mutations need root or \
     daemon.api-group); 5 corrald not reachable.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a policy file and its drop-ins, and show the apps it defines.
    Check(CheckCommand),
    /// Compile WebAssembly modules and components ahead of time into the cache.
    Compile(CompileCommand),
    /// List, verify, garbage-collect or clear the artifact cache.
    Cache(CacheCommand),
    /// Fetch modules from OCI registries, verify and compile them into the cache.
    Pull(PullCommand),
    /// Publish a module in an OCI registry (CNCF Wasm artifact).
    Push(PushCommand),
    /// Show the kernel's sandbox features and the layers each app would get.
    Doctor(DoctorCommand),
    /// Run a Wasm module or component once, or serve an http component.
    Run(RunCommand),
    /// Show corrald and its apps, or one app in detail.
    Status(StatusCommand),
    /// List the apps corrald serves.
    Apps(AppsCommand),
    /// Start a stopped or failed app.
    Start(AppCommand),
    /// Stop an app: it finishes its requests; its sockets stay bound.
    Stop(AppCommand),
    /// Restart an app on a new zygote (its sockets stay bound).
    Restart(AppCommand),
    /// Compile an app's module again, ignoring the cache, and restart it.
    Recompile(AppCommand),
    /// Make corrald read its policy again; prints every error if refused.
    Reload(ReloadCommand),
    /// Follow app state changes.
    Events(EventsCommand),
    /// Print or write shell completions (for packaging).
    #[command(hide = true)]
    Completions(CompletionsCommand),
    /// Print or write the man pages (for packaging).
    #[command(hide = true)]
    Man(ManCommand),
}

impl Cli {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Check(c) => c.execute(),
            Command::Compile(c) => c.execute(),
            Command::Cache(c) => c.execute(),
            Command::Doctor(c) => c.execute(),
            Command::Pull(c) => c.execute(),
            Command::Push(c) => c.execute(),
            Command::Run(c) => c.execute(),
            Command::Status(c) => c.execute(),
            Command::Apps(c) => c.execute(),
            Command::Start(c) => c.execute(Action::Start),
            Command::Stop(c) => c.execute(Action::Stop),
            Command::Restart(c) => c.execute(Action::Restart),
            Command::Recompile(c) => c.execute(Action::Recompile),
            Command::Reload(c) => c.execute(),
            Command::Events(c) => c.execute(),
            Command::Completions(c) => c.execute(),
            Command::Man(c) => c.execute(),
        }
    }
}

/// Entry point of the `corral` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.execute() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corral: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Rows as a table: columns padded to their widest cell, two spaces apart,
/// no trailing blanks (the first row is the header).
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
