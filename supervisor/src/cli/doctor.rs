//! `corral doctor`: what this kernel offers the sandbox, and what each app
//! of a policy would get from it.

use std::path::PathBuf;
use std::process::ExitCode;

use corral_policy::Environment;

use corral_runtime::sandbox::{self, KernelSupport, LandlockSupport, SandboxPlan};

/// Show the kernel's sandbox features (landlock ABI, seccomp, user
/// namespaces, cgroup v2 delegation) and, for each app of the policy, the
/// layers its workers would get.
///
/// Exits 1 when an app's `require`d layer is missing (corrald would refuse
/// to start it) or the policy is invalid.
#[derive(Debug, clap::Args)]
pub struct DoctorCommand {
    /// The policy whose apps to check; without it only the kernel is shown,
    /// unless the default policy file exists.
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct AppReport {
    app: String,
    kind: String,
    landlock: String,
    seccomp: String,
    /// The layers with this policy's enforcement; `None` when refused.
    layers: Option<sandbox::ActiveLayers>,
    /// Why `require` refuses the app, if it does.
    refused: Option<String>,
    /// `sandbox.cgroups` and what it gets here.
    cgroups: String,
    cgroup: String,
}

impl DoctorCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let kernel = sandbox::probe_kernel();
        let policy_path = match self.policy {
            Some(p) => Some(p),
            None => {
                let default = super::default_policy_path();
                default.exists().then_some(default)
            }
        };
        let mut apps = Vec::new();
        if let Some(path) = &policy_path {
            let policy = match corral_policy::load(path, &Environment::from_process()) {
                Ok(p) => p,
                Err(err) => {
                    for d in err.diagnostics() {
                        eprintln!("{d}");
                    }
                    eprintln!("the policy is invalid; run `corral check` for details");
                    return Ok(ExitCode::FAILURE);
                }
            };
            for (name, app) in &policy.apps {
                let plan = SandboxPlan::for_app(app);
                let (layers, mut refused) = match plan.predict(&kernel) {
                    Ok(layers) => (Some(layers), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                if refused.is_none() {
                    refused = crate::fitness::cgroup_refusal(app, &kernel);
                }
                apps.push(AppReport {
                    app: name.clone(),
                    kind: app.kind.to_string(),
                    landlock: app.sandbox.landlock.to_string(),
                    seccomp: app.sandbox.seccomp.to_string(),
                    layers: if refused.is_some() { None } else { layers },
                    refused,
                    cgroups: app.sandbox.cgroups.to_string(),
                    cgroup: crate::fitness::cgroup_line(app, &kernel),
                });
            }
        }
        if self.json {
            let out = serde_json::json!({
                "kernel": kernel,
                "policy": policy_path,
                "apps": apps,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            print!("{}", render_kernel(&kernel));
            if let Some(path) = &policy_path {
                println!("\npolicy {}:", path.display());
                for a in &apps {
                    match (&a.layers, &a.refused) {
                        (Some(layers), _) => {
                            println!("  {} ({}): {layers}", a.app, a.kind);
                            for m in &layers.missing {
                                println!("    not enforced here: {m}");
                            }
                            println!("    cgroup: {}", a.cgroup);
                        }
                        (None, Some(why)) => println!("  {} ({}): REFUSED: {why}", a.app, a.kind),
                        (None, None) => {}
                    }
                }
            }
        }
        let refused = apps.iter().any(|a| a.refused.is_some());
        Ok(if refused {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn render_kernel(k: &KernelSupport) -> String {
    let mut out = format!(
        "kernel {} ({})\n",
        k.release,
        k.arch.map_or(std::env::consts::ARCH, |a| a.as_str())
    );
    let landlock = match k.landlock {
        LandlockSupport::Available { abi } => {
            let mut parts = vec!["files"];
            if abi >= 4 {
                parts.push("tcp");
            }
            if abi >= 6 {
                parts.push("scoping");
            }
            format!("ABI {abi} ({})", parts.join(", "))
        }
        LandlockSupport::NotEnabled => {
            "built in, not enabled at boot (add landlock to lsm=)".into()
        }
        LandlockSupport::NotImplemented => "not in this kernel".into(),
    };
    out += &format!("  landlock:        {landlock}\n");
    out += &format!(
        "  seccomp:         {}\n",
        match &k.seccomp.reason {
            None => "filters with KILL_PROCESS".to_owned(),
            Some(why) => format!("unavailable: {why}"),
        }
    );
    let userns = &k.user_namespaces;
    let mut userns_line = match userns.max {
        Some(0) => "disabled (max_user_namespaces = 0)".to_owned(),
        Some(n) => format!("yes (max {n})"),
        None => "no".to_owned(),
    };
    if let Some(b) = userns.unprivileged_clone {
        userns_line += &format!(", unprivileged_userns_clone = {}", u8::from(b));
    }
    if userns.apparmor_restricted == Some(true) {
        userns_line += ", restricted by AppArmor for unprivileged users";
    }
    out += &format!("  user namespaces: {userns_line}\n");
    let cg = &k.cgroup_v2;
    let cgroup_line = match &cg.mount {
        None => "no cgroup2 mount".to_owned(),
        Some(m) => format!(
            "{}{} , own cgroup {}, delegated: {}{}",
            m.display(),
            if cg.hybrid { " (hybrid with v1)" } else { "" },
            cg.own_cgroup.as_deref().unwrap_or("?"),
            yes_no(cg.delegated),
            if cg.controllers.is_empty() {
                String::new()
            } else {
                format!(", controllers: {}", cg.controllers.join(" "))
            }
        ),
    };
    out += &format!("  cgroup v2:       {}\n", cgroup_line.replace(" ,", ","));
    out += &format!(
        "  app cgroups:     {}\n",
        match crate::cgroup::host_support(cg) {
            Ok(()) =>
                "yes: cpu, memory, pids (corrald needs Delegate=yes, as corrald.service sets)"
                    .to_owned(),
            Err(why) =>
                format!("no: {why}; apps run without (sandbox.cgroups = \"require\" refuses them)"),
        }
    );
    out
}
