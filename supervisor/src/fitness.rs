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
