//! The `corral` command; everything lives in `corral_supervisor::cli`.

fn main() -> std::process::ExitCode {
    corral_supervisor::cli::main()
}
