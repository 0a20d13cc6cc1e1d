//! `corral start|stop|restart|recompile APP` and `corral reload`: ask
//! corrald to change something (root or members of `daemon.api-group`).

use std::process::ExitCode;

use serde_json::Value;

use super::client::{Call, Target, exit};
use super::status::{out, pretty};

/// What to do with an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
    Recompile,
}

/// Start, stop, restart or recompile one app.
#[derive(Debug, clap::Args)]
pub struct AppCommand {
    /// The app, as the policy names it.
    #[arg(value_name = "APP")]
    pub app: String,

    #[command(flatten)]
    pub target: Target,
}

impl AppCommand {
    pub fn execute(self, action: Action) -> anyhow::Result<ExitCode> {
        let name = self.app.as_str();
        let call = match action {
            Action::Start => Call::Start(name),
            Action::Stop => Call::Stop(name),
            Action::Restart => Call::Restart(name),
            Action::Recompile => Call::Recompile(name),
        };
        Ok(match self.target.call(call) {
            Ok(app) if self.target.json => {
                out(&format!("{}\n", pretty(&app)));
                ExitCode::SUCCESS
            }
            Ok(app) => {
                out(&format!(
                    "{}: {} ({} workers)\n",
                    app["name"].as_str().unwrap_or(name),
                    app["state"].as_str().unwrap_or("?"),
                    app["workers"]
                ));
                ExitCode::SUCCESS
            }
            Err(e) => e.report(),
        })
    }
}

/// Make corrald read its policy again (as SIGHUP does). A policy with
/// errors is refused: every error is printed and the exit code is 1. An
/// app whose new version could not be applied (its module does not
/// compile, its new address is in use) is printed with the reason, and the
/// exit code is 1 too.
#[derive(Debug, clap::Args)]
pub struct ReloadCommand {
    #[command(flatten)]
    pub target: Target,
}

impl ReloadCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let report = match self.target.call(Call::Reload) {
            Ok(report) => report,
            Err(e) => return Ok(e.report()),
        };
        let applied = report["applied"].as_bool().unwrap_or(false);
        let refused = report["refused"].as_array().cloned().unwrap_or_default();
        if self.target.json {
            out(&format!("{}\n", pretty(&report)));
        } else if applied {
            let list = |key: &str| -> String {
                let names: Vec<&str> = report[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                if names.is_empty() {
                    "-".into()
                } else {
                    names.join(", ")
                }
            };
            out(&format!(
                "reloaded: added {}; removed {}; changed {}; unchanged {}\n",
                list("added"),
                list("removed"),
                list("changed"),
                list("unchanged")
            ));
            for r in &refused {
                eprintln!(
                    "refused {}: {}",
                    r["app"].as_str().unwrap_or_default(),
                    r["reason"].as_str().unwrap_or_default()
                );
            }
            if !refused.is_empty() {
                eprintln!(
                    "reload incomplete: {} app{} refused (each serves its previous version, if it had one)",
                    refused.len(),
                    if refused.len() == 1 { "" } else { "s" }
                );
            }
        } else {
            let errors = report["errors"].as_array().cloned().unwrap_or_default();
            for e in &errors {
                eprintln!("{}", e["text"].as_str().unwrap_or_default());
            }
            eprintln!(
                "reload refused: {} error{}; corrald still serves the previous policy",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            );
        }
        Ok(if applied && refused.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(exit::FAILED)
        })
    }
}
