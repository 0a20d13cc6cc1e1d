//! `corral doctor` and the layers column of `corral check`, run as the real
//! binary against a policy in a temporary directory.

use std::process::Command;

const CORRAL: &str = env!("CARGO_BIN_EXE_corral");

fn guest(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/guests")
        .join(name)
}

fn policy(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::write(dir.join("m.wat"), "(module (func (export \"_start\")))").unwrap();
    let path = dir.join("policy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[apps.web]
module = "{}"
kind = "http"
listen = ["127.0.0.1:1"]

[apps.job]
module = "m.wat"
kind = "command"
sandbox = {{ landlock = "best-effort", seccomp = "best-effort" }}
"#,
            guest("http-hello.wasm").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn doctor_reports_the_kernel_and_each_apps_layers_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(CORRAL)
        .args(["doctor", "--json", "--policy"])
        .arg(policy(dir.path()))
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let kernel = corral_runtime::sandbox::probe_kernel();
    // The report is the probe's, and each app is there with its layers or
    // the refusal; the exit code says whether any app is refused.
    assert_eq!(report["kernel"], serde_json::to_value(&kernel).unwrap());
    let apps = report["apps"].as_array().unwrap();
    let names: Vec<&str> = apps.iter().map(|a| a["app"].as_str().unwrap()).collect();
    assert_eq!(names, ["job", "web"]);
    let web = &apps[1];
    let refused = !web["refused"].is_null();
    assert_eq!(out.status.success(), !refused, "{report:#}");
    if let Some(abi) = kernel.landlock.abi().filter(|&abi| abi >= 4)
        && kernel.seccomp.available
    {
        assert!(!refused, "{report:#}");
        assert_eq!(web["layers"]["landlock"]["abi"], abi);
        assert!(web["layers"]["seccomp"]["allowed_calls"].as_u64().unwrap() > 50);
    }
}

#[test]
fn doctor_prints_the_kernel_facts() {
    let out = Command::new(CORRAL)
        .args(["doctor", "--policy"])
        .arg(policy(tempfile::tempdir().unwrap().path()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "landlock:",
        "seccomp:",
        "user namespaces:",
        "cgroup v2:",
        "web (http):",
    ] {
        assert!(text.contains(line), "{line} missing in:\n{text}");
    }
}

#[test]
fn check_shows_the_layers_each_app_would_get() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(CORRAL)
        .args(["check", "--policy"])
        .arg(policy(dir.path()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("LAYERS ON THIS KERNEL"), "{text}");
    let web = text.lines().find(|l| l.starts_with("web ")).unwrap();
    assert!(
        web.contains("landlock=") && web.contains("seccomp="),
        "{web}"
    );
}

/// Issue 15 item 10: what the module and the policy decide (a memory
/// minimum above `limits.memory`, a world that does not fit the kind) fails
/// `corral check`, one line per problem naming the app, and the apps that
/// fit are still listed.
#[test]
fn check_exits_non_zero_for_an_app_whose_module_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[apps.huge]
module = "{}"
kind = "command"
limits = {{ memory = "64MiB" }}

[apps.wrong-world]
module = "{}"
kind = "stdio"
listen = ["127.0.0.1:1"]

[apps.fine]
module = "{}"
kind = "http"
listen = ["127.0.0.1:2"]
"#,
            guest("huge-memory.wat").display(),
            guest("http-hello.wasm").display(),
            guest("http-hello.wasm").display(),
        ),
    )
    .unwrap();
    let out = Command::new(CORRAL)
        .args(["check", "--policy"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("fine ")), "{stdout}");
    let huge = stderr
        .lines()
        .find(|l| l.contains("`huge`"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        huge.contains("4294967296") && huge.contains("limits.memory"),
        "{huge}"
    );
    let wrong = stderr
        .lines()
        .find(|l| l.contains("`wrong-world`"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        wrong.contains("kind = \"stdio\"") && wrong.contains("component"),
        "{wrong}"
    );
    assert!(!stderr.contains("`fine`"), "{stderr}");
    // The same as JSON.
    let out = Command::new(CORRAL)
        .args(["check", "--json", "--policy"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runnable"], false);
    assert_eq!(v["refused"].as_array().unwrap().len(), 2, "{v}");
}
