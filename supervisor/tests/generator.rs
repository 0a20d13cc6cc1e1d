//! corral-generator as systemd runs it: the real binary, three output
//! directories, a policy from `$CORRAL_POLICY`. It writes a socket unit per
//! `[sockets.NAME]`, and whatever is wrong it exits 0 (a generator must
//! not fail the boot). What it logs goes to /dev/kmsg or stderr; the
//! end-to-end test under systemd (tests/e2e-systemd) checks the units with
//! `systemd-analyze verify` and that they serve.

use std::path::Path;
use std::process::Command;

fn generate(policy: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_corral-generator"))
        .args([out, out, out])
        .env("CORRAL_POLICY", policy)
        .output()
        .expect("run corral-generator")
}

#[test]
fn writes_one_socket_unit_per_socket() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[sockets.web]\nlisten = \"127.0.0.1:8080\"\n[apps.web]\nmodule = \"absent-at-early-boot.wasm\"\nkind = \"http\"\nlisten = [\"systemd:web\"]\n",
    )
    .unwrap();
    let out = dir.path().join("normal");
    std::fs::create_dir(&out).unwrap();
    let run = generate(&policy, &out);
    assert!(run.status.success(), "{run:?}");
    let unit = std::fs::read_to_string(out.join("corral-web.socket")).unwrap();
    assert!(unit.contains("\nListenStream=127.0.0.1:8080\n"), "{unit}");
    assert!(unit.contains("\nFileDescriptorName=web\n"), "{unit}");
    assert!(unit.contains("\nService=corrald.service\n"), "{unit}");
    assert!(out.join("sockets.target.wants/corral-web.socket").exists());
}

#[test]
fn a_broken_or_missing_policy_writes_nothing_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("normal");
    std::fs::create_dir(&out).unwrap();
    let broken = dir.path().join("policy.toml");
    std::fs::write(&broken, "[sockets.web]\nlisten = \"nowhere\"\n").unwrap();
    for policy in [broken, dir.path().join("absent.toml")] {
        let run = generate(&policy, &out);
        assert!(run.status.success(), "{policy:?}: {run:?}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "{policy:?}");
    }
    // Without arguments (not how systemd runs it): a usage line, still 0.
    let run = Command::new(env!("CARGO_BIN_EXE_corral-generator"))
        .env("CORRAL_POLICY", dir.path().join("absent.toml"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{run:?}");
}
