//! `corral-sandbox-probe`: a test tool that enters an app's worker sandbox
//! and tries one action; see `corral_supervisor::sandbox::probe`.

fn main() -> std::process::ExitCode {
    corral_supervisor::sandbox::probe::main()
}
