//! `containerd-shim-corral-v1 -v`, as containerd and operators run it
//! (issue 14: it printed `InvalidArgument("Shim namespace cannot be empty")`).

use std::process::Command;

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-corral-v1");

#[test]
fn the_version_flag_prints_the_version_without_a_namespace() {
    // go-flag spellings of the framework's own parser.
    for flag in ["-v", "--v", "-version", "--version", "-v=true"] {
        let out = Command::new(SHIM).arg(flag).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{flag}: {:?}\n{stderr}", out.status);
        assert!(
            stdout.starts_with("containerd-shim-corral-v1:\n"),
            "{flag}: {stdout}"
        );
        assert!(
            stdout.contains(&format!("  Version:  {}\n", env!("CARGO_PKG_VERSION"))),
            "{flag}: {stdout}"
        );
        assert!(
            stdout.contains("io.containerd.corral.v1"),
            "{flag}: {stdout}"
        );
        assert!(stderr.is_empty(), "{flag}: {stderr}");
    }
}

#[test]
fn without_the_version_flag_a_namespace_is_still_required() {
    let out = Command::new(SHIM).arg("start").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("namespace"), "{stderr}");
}
