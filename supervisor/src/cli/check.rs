//! `corral check`: validate a policy and show what it defines.

use std::path::PathBuf;
use std::process::ExitCode;

use corral_policy::{Environment, Policy, PolicyError};

/// Validate a policy file and its drop-ins (`policy.d/*.toml` beside it).
///
/// Prints a table of the apps and exits 0, or prints every error as
/// `file:line:col: key: problem` and exits 1. A valid policy with an app
/// that cannot run on this machine (its module does not fit its spec, or a
/// `require`d sandbox layer its grants need is missing from this kernel)
/// also exits 1, with one line per reason. A valid policy that needs more
/// open files than corrald would get here (the hard RLIMIT_NOFILE) gets a
/// warning.
#[derive(Debug, clap::Args)]
pub struct CheckCommand {
    /// The main policy file; drop-ins are read from `policy.d/` beside it.
    #[arg(long, value_name = "PATH", default_value = corral_policy::defaults::POLICY_PATH)]
    pub policy: PathBuf,

    /// Print the validated policy, or the errors, as JSON.
    #[arg(long)]
    pub json: bool,
}

impl CheckCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let result = corral_policy::load(&self.policy, &Environment::from_process());
        match (result, self.json) {
            (Ok(policy), false) => {
                print!("{}", render_table(&policy));
                warn_about_open_files(&policy);
                let refused = refusals(&policy);
                for why in &refused {
                    eprintln!("error: {why}");
                }
                if refused.is_empty() {
                    Ok(ExitCode::SUCCESS)
                } else {
                    let n = refused.len();
                    eprintln!(
                        "{n} app problem{} on this machine: corrald would not start {}",
                        if n == 1 { "" } else { "s" },
                        if n == 1 { "that app" } else { "those apps" }
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
            (Ok(policy), true) => {
                warn_about_open_files(&policy);
                let refused = refusals(&policy);
                let worlds: std::collections::BTreeMap<&str, Option<String>> = policy
                    .apps
                    .iter()
                    .map(|(name, app)| {
                        (
                            name.as_str(),
                            crate::fitness::world(app).map(|w| w.to_string()),
                        )
                    })
                    .collect();
                let out = serde_json::json!({
                    "valid": true,
                    "runnable": refused.is_empty(),
                    "refused": refused,
                    "worlds": worlds,
                    "policy": policy,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                Ok(if refused.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            (Err(err), false) => {
                print_errors(&err);
                Ok(ExitCode::FAILURE)
            }
            (Err(err), true) => {
                let out = serde_json::json!({ "valid": false, "errors": err.diagnostics() });
                println!("{}", serde_json::to_string_pretty(&out)?);
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

/// A policy that needs more descriptors than corrald would get here is
/// valid, but apps would fail to start: say so (stderr, exit code 0).
fn warn_about_open_files(policy: &Policy) {
    use crate::daemon::open_files;
    if let Some(warning) = open_files::shortfall(policy, open_files::hard_limit()) {
        eprintln!("warning: {warning}");
    }
}

/// Why each app that cannot run here cannot (see [`crate::fitness`]).
fn refusals(policy: &Policy) -> Vec<String> {
    let kernel = crate::fitness::kernel();
    policy
        .apps
        .values()
        .flat_map(|app| crate::fitness::refusals(app, kernel))
        .collect()
}

fn print_errors(err: &PolicyError) {
    let diagnostics = err.diagnostics();
    for d in &diagnostics {
        eprintln!("{d}");
    }
    let n = diagnostics.len();
    eprintln!(
        "{n} error{} found; nothing was changed",
        if n == 1 { "" } else { "s" }
    );
}

/// The apps as an aligned table, one row per app, then a summary line.
pub(crate) fn render_table(policy: &Policy) -> String {
    let mut rows = vec![
        [
            "APP",
            "KIND",
            "WORLD",
            "LISTEN",
            "POOL",
            "SANDBOX",
            "LAYERS ON THIS KERNEL",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let kernel = crate::fitness::kernel();
    for (name, app) in &policy.apps {
        // What a worker would get here if every layer were best-effort;
        // a refusal is printed below the table and fails the check.
        let plan = corral_runtime::sandbox::SandboxPlan::for_app(app);
        let mut layers = plan.predict_best_effort(kernel).to_string();
        if plan.predict(kernel).is_err() {
            layers.push_str(" (require: refused)");
        }
        let listen: Vec<String> = app.listen.iter().map(ToString::to_string).collect();
        rows.push(vec![
            name.clone(),
            app.kind.to_string(),
            crate::fitness::world(app).map_or_else(|| "-".to_string(), |w| w.to_string()),
            if listen.is_empty() {
                "-".into()
            } else {
                listen.join(",")
            },
            format!("{}..{}", app.pool.min, app.pool.max),
            format!(
                "landlock={} seccomp={}",
                app.sandbox.landlock, app.sandbox.seccomp
            ),
            layers,
        ]);
    }
    let mut out = super::table(&rows);
    let files = policy.sources.len();
    out.push_str(&format!(
        "{} app{} from {} file{}: policy is valid\n",
        policy.apps.len(),
        if policy.apps.len() == 1 { "" } else { "s" },
        files,
        if files == 1 { "" } else { "s" },
    ));
    out
}
