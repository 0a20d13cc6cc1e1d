//! What rules an app out on this machine before any process of it starts:
//! its module against its spec (`corral_compiler::preflight`: not Wasm, a
//! memory minimum above `limits.memory`, the wrong world for its kind) and
//! its grants against the kernel (a `require`d sandbox layer the kernel
//! lacks). Both depend only on the policy, the module file and the kernel,
//! so `corral check` and corrald's reconcile decide them once, with one
//! clear error each, instead of a zygote finding them in a crash loop.

use std::sync::OnceLock;

use corral_policy::AppSpec;
use corral_runtime::sandbox::{KernelSupport, SandboxPlan, probe_kernel};

/// Every reason `app` cannot run on `kernel`, each a full sentence naming
/// the app; empty when it may start.
pub fn refusals(app: &AppSpec, kernel: &KernelSupport) -> Vec<String> {
    let mut out = Vec::new();
    if let Err(e) = SandboxPlan::for_app(app).predict(kernel) {
        out.push(e.to_string());
    }
    // An `oci://` app not fetched yet (`corral check` does not go to the
    // registry) has no module file: corrald checks it once fetched.
    if app.oci.is_none() || !app.module.as_os_str().is_empty() {
        out.extend(
            corral_compiler::preflight::check_app(app)
                .iter()
                .map(ToString::to_string),
        );
    }
    out
}

/// The world `app`'s module targets (`None`: unreadable, or none corral
/// knows; [`refusals`] says why).
pub fn world(app: &AppSpec) -> Option<corral_compiler::preflight::World> {
    let source = corral_compiler::Source::read(&app.module).ok()?;
    corral_compiler::preflight::world_of(&source)
}

/// This machine's kernel, probed once per process (it does not change
/// under a running corrald).
pub fn kernel() -> &'static KernelSupport {
    static KERNEL: OnceLock<KernelSupport> = OnceLock::new();
    KERNEL.get_or_init(probe_kernel)
}

/// `corral check` and `corral doctor`: why `sandbox.cgroups = "require"`
/// refuses `app` on this host, as far as one can tell from outside
/// corrald (cgroup v2 with the cpu, memory and pids controllers; corrald
/// itself also needs Delegate=yes, which corrald.service sets).
pub fn cgroup_refusal(app: &AppSpec, kernel: &KernelSupport) -> Option<String> {
    if app.sandbox.cgroups != corral_policy::Enforcement::Require {
        return None;
    }
    let why = crate::cgroup::host_support(&kernel.cgroup_v2).err()?;
    Some(format!(
        "app {}: sandbox.cgroups = \"require\" but apps cannot have cgroups of their own here: {why}; to fix it, {}",
        app.name,
        crate::cgroup::HOW_TO_FIX
    ))
}

/// What app cgroups give `app` here, in one line (`corral check`, `corral
/// doctor`): the limits its cgroup would get, or why it would run without.
pub fn cgroup_line(app: &AppSpec, kernel: &KernelSupport) -> String {
    match crate::cgroup::host_support(&kernel.cgroup_v2) {
        Ok(()) => {
            let values: Vec<String> = crate::cgroup::settings(&app.limits)
                .into_iter()
                .map(|(f, v)| format!("{f}={v}"))
                .collect();
            format!("own cgroup under corrald.service: {}", values.join(" "))
        }
        Err(why) if app.limits.wants_cgroup_limits() => format!(
            "none here: limits.cpu-weight, limits.cpu, limits.app-memory and limits.processes are NOT enforced ({why})"
        ),
        Err(why) => format!("none here ({why})"),
    }
}
