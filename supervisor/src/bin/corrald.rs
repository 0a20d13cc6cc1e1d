//! corrald, the corral supervisor daemon (see ARCHITECTURE.md).

fn main() -> std::process::ExitCode {
    eprintln!("corrald: the daemon is not built yet; use `corral check` to validate a policy");
    std::process::ExitCode::FAILURE
}
