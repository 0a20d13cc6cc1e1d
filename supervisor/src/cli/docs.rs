//! `corral completions SHELL` and `corral man`: shell completions and man
//! pages generated from the clap definitions, for packaging (hidden from
//! `--help`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::CommandFactory as _;

/// Print (or write into DIR) the completion script for SHELL.
#[derive(Debug, clap::Args)]
pub struct CompletionsCommand {
    /// bash, zsh, fish, elvish or powershell.
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,

    /// Write the script into DIR under its usual name (bash: `corral`,
    /// zsh: `_corral`, fish: `corral.fish`) instead of printing it.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl CompletionsCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let mut cmd = super::Cli::command();
        match &self.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let path = match self.shell {
                    // clap_complete names it corral.bash; bash-completion and
                    // dh_bash-completion look for the command's own name.
                    clap_complete::Shell::Bash => {
                        let path = dir.join("corral");
                        let mut script = Vec::new();
                        clap_complete::generate(self.shell, &mut cmd, "corral", &mut script);
                        std::fs::write(&path, script)
                            .with_context(|| format!("writing {}", path.display()))?;
                        path
                    }
                    shell => clap_complete::generate_to(shell, &mut cmd, "corral", dir)
                        .with_context(|| format!("writing into {}", dir.display()))?,
                };
                println!("{}", path.display());
            }
            None => clap_complete::generate(self.shell, &mut cmd, "corral", &mut std::io::stdout()),
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Print corral(1), or write corral.1 and one page per subcommand
/// (corral-status.1, ...) into DIR.
#[derive(Debug, clap::Args)]
pub struct ManCommand {
    /// Write the pages into DIR instead of printing corral(1).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl ManCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let cmd = super::Cli::command();
        match &self.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                for path in write_pages(&cmd, dir)? {
                    println!("{}", path.display());
                }
            }
            None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// corral.1, then corral-SUB.1 for each visible subcommand (and theirs).
fn write_pages(cmd: &clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let cmd = cmd.clone();
    let path = dir.join(format!("{}.1", cmd.get_name()));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap takes only `&'static str` names here (without its `string`
        // feature); this process writes a handful of pages and exits.
        let name: &'static str =
            Box::leak(format!("{}-{}", cmd.get_name(), sub.get_name()).into_boxed_str());
        let sub = sub
            .clone()
            .name(name)
            .bin_name(format!("corral {}", sub.get_name()));
        written.extend(write_pages(&sub, dir)?);
    }
    Ok(written)
}
