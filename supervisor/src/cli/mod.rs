//! The `corral` command: one file per subcommand, each an `XxxCommand`
//! (clap `Args`) with `execute`, as wasmtime's `src/commands/` does.
//!
//! Exit codes (documented in `corral --help` and docs/cli.md):
//! 0 success, 1 the thing checked is invalid or the operation failed,
//! 2 bad command line (clap's own code).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cache;
mod check;
mod compile;
mod doctor;
mod run;

pub use cache::{CacheCommand, CacheDirArgs};
pub use check::CheckCommand;
pub use compile::CompileCommand;
pub use doctor::DoctorCommand;
pub use run::RunCommand;

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

const EXIT_CODES: &str =
    "Exit codes: 0 success; 1 invalid input or failed operation; 2 bad command line.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a policy file and its drop-ins, and show the apps it defines.
    Check(CheckCommand),
    /// Compile WebAssembly modules and components ahead of time into the cache.
    Compile(CompileCommand),
    /// List, verify, garbage-collect or clear the artifact cache.
    Cache(CacheCommand),
    /// Show the kernel's sandbox features and the layers each app would get.
    Doctor(DoctorCommand),
    /// Run a Wasm module or component once, or serve an http component.
    Run(RunCommand),
}

impl Cli {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Check(c) => c.execute(),
            Command::Compile(c) => c.execute(),
            Command::Cache(c) => c.execute(),
            Command::Doctor(c) => c.execute(),
            Command::Run(c) => c.execute(),
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
