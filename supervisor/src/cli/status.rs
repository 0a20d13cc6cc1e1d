//! `corral status [APP]` and `corral apps`: what corrald says about its
//! apps, as tables (or its JSON with `--json`).

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::client::{Call, Target};

/// Show corrald and its apps, or one app in detail (like `systemctl status`).
#[derive(Debug, clap::Args)]
pub struct StatusCommand {
    /// The app to show; without it, corrald and a table of every app.
    #[arg(value_name = "APP")]
    pub app: Option<String>,

    #[command(flatten)]
    pub target: Target,
}

impl StatusCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let t = &self.target;
        let result = match &self.app {
            Some(name) => t.call(Call::GetApp(name)).map(|app| {
                if t.json {
                    out(&format!("{}\n", pretty(&app)));
                } else {
                    out(&render_app(&app, now_ms()));
                }
            }),
            None => t.call(Call::Info).and_then(|info| {
                let apps = t.call(Call::ListApps)?;
                if t.json {
                    out(&format!(
                        "{}\n",
                        pretty(&serde_json::json!({ "daemon": info, "apps": apps }))
                    ));
                } else {
                    out(&format!(
                        "{}\n{}",
                        render_daemon(&info, now_ms()),
                        render_apps(&apps)
                    ));
                }
                Ok(())
            }),
        };
        Ok(match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => e.report(),
        })
    }
}

/// List the apps corrald serves, one line each.
#[derive(Debug, clap::Args)]
pub struct AppsCommand {
    #[command(flatten)]
    pub target: Target,
}

impl AppsCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        Ok(match self.target.call(Call::ListApps) {
            Ok(apps) if self.target.json => {
                out(&format!("{}\n", pretty(&apps)));
                ExitCode::SUCCESS
            }
            Ok(apps) => {
                out(&render_apps(&apps));
                ExitCode::SUCCESS
            }
            Err(e) => e.report(),
        })
    }
}

/// Print `text`; a reader that went away (`corral apps | head -1`) ends
/// the command quietly instead of a panic of `print!`.
pub(crate) fn out(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

pub(crate) fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-11-25T14:14:35Z (3m 12s ago)`.
pub(crate) fn when(ms: u64, now: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    let ago = Duration::from_secs(now.saturating_sub(ms) / 1000);
    format!(
        "{} ({} ago)",
        humantime::format_rfc3339_seconds(at),
        if ago.is_zero() {
            "just now".to_string()
        } else {
            humantime::format_duration(ago).to_string()
        }
    )
    .replace("(just now ago)", "(just now)")
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

/// One app, `systemctl status` style.
pub(crate) fn render_app(a: &Value, now: u64) -> String {
    let state = text(&a["state"]);
    let dot = match state.as_str() {
        "running" | "idle" => "●",
        "failed" => "×",
        _ => "○",
    };
    let mut out = format!("{dot} {} ({} app)\n", text(&a["name"]), text(&a["kind"]));
    let mut zygote = String::new();
    if let Some(pid) = a["zygote_pid"].as_u64() {
        zygote = format!(", zygote pid {pid}");
    }
    let rows = [
        (
            "State",
            format!(
                "{state} since {}",
                when(a["state_since"].as_u64().unwrap_or(0), now)
            ),
        ),
        (
            "Workers",
            format!(
                "{} ({} busy){zygote}",
                text(&a["workers"]),
                text(&a["busy"])
            ),
        ),
        (
            "Requests",
            format!(
                "{} served, {} errors, {} cold starts ({} forked from the template)",
                text(&a["requests"]),
                text(&a["errors"]),
                text(&a["cold_starts"]),
                text(&a["cold_starts_forked"])
            ),
        ),
        ("Last error", text(&a["last_error"])),
        ("Module", text(&a["module"])),
        ("Digest", text(&a["digest"])),
        ("World", text(&a["world"])),
        ("Artifact", text(&a["artifact"])),
        ("Sandbox", text(&a["sandbox"])),
        ("Listen", text(&a["listen"])),
    ];
    for (label, value) in rows {
        out.push_str(&format!("{label:>12}: {value}\n"));
    }
    if let Some(tls) = a["tls"].as_object() {
        let not_after = tls.get("not_after").and_then(Value::as_i64).unwrap_or(0);
        let left = not_after.saturating_sub((now / 1000) as i64);
        let days = |s: i64| match s / 86400 {
            0 => format!("{}h", s / 3600),
            1 => "1 day".to_string(),
            n => format!("{n} days"),
        };
        let expiry = if left < 0 {
            format!("expired {} ago", days(-left))
        } else {
            format!("in {}", days(left))
        };
        out.push_str(&format!(
            "{:>12}: {}, names {}, expires {} ({expiry})\n",
            "TLS",
            text(&tls["subject"]),
            text(&tls["names"]),
            expires(not_after),
        ));
    }
    for (label, value) in cgroup_rows(&a["cgroup"]) {
        out.push_str(&format!("{label:>12}: {value}\n"));
    }
    out
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

/// A certificate's `not_after` (Unix seconds) as an RFC 3339 time.
fn expires(not_after: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + secs(not_after)).to_string()
}

/// The app's cgroup rows: where, what it uses, the limits in force; or
/// that it has none (`corral status` without an app says why).
fn cgroup_rows(cg: &Value) -> Vec<(&'static str, String)> {
    if cg.is_null() {
        return vec![(
            "Cgroup",
            "none: app-wide limits are not enforced (see `corral status`)".to_string(),
        )];
    }
    let bytes = |v: &Value| bytesize::ByteSize(v.as_u64().unwrap_or(0)).to_string();
    let peak = match cg["memory_peak_bytes"].as_u64() {
        Some(p) => format!(" (peak {})", bytesize::ByteSize(p)),
        None => String::new(),
    };
    let mut usage = format!(
        "CPU {:.3} s, memory {}{peak}, {} tasks",
        cg["cpu_usec"].as_u64().unwrap_or(0) as f64 / 1e6,
        bytes(&cg["memory_bytes"]),
        text(&cg["tasks"]),
    );
    for (key, what) in [
        ("oom_kills", "OOM kills"),
        ("pids_max_hits", "forks refused at pids.max"),
    ] {
        if cg[key].as_u64().unwrap_or(0) > 0 {
            usage += &format!(", {} {what}", text(&cg[key]));
        }
    }
    let limits = cg["limits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| Some(format!("{}={}", kv[0].as_str()?, kv[1].as_str()?)))
        .collect::<Vec<_>>()
        .join(" ");
    vec![
        ("Cgroup", text(&cg["path"])),
        ("Resources", usage),
        (
            "Limits",
            if limits.is_empty() {
                "-".to_string()
            } else {
                limits
            },
        ),
    ]
}

/// corrald itself, from `GET /v1/info`.
pub(crate) fn render_daemon(i: &Value, now: u64) -> String {
    let started = i["started"].as_u64().unwrap_or(0);
    let files = match i["policy_files"].as_array() {
        Some(f) if f.len() > 1 => format!(" (+{} drop-ins)", f.len() - 1),
        _ => String::new(),
    };
    let rows = [
        (
            "Version",
            format!(
                "corral {} (wasmtime {}), {}",
                text(&i["version"]),
                text(&i["wasmtime_version"]),
                text(&i["target"])
            ),
        ),
        (
            "Running",
            format!("since {}, pid {}", when(started, now), text(&i["pid"])),
        ),
        ("Policy", format!("{}{files}", text(&i["policy_path"]))),
        (
            "API",
            format!(
                "{} (mutations: root and group {})",
                text(&i["api_socket"]),
                text(&i["api_group"])
            ),
        ),
        (
            "Cache",
            format!(
                "{}: {} entries, {}",
                text(&i["cache"]["dir"]),
                text(&i["cache"]["entries"]),
                bytesize::ByteSize(i["cache"]["bytes"].as_u64().unwrap_or(0))
            ),
        ),
        ("Apps", text(&i["apps"])),
        ("Cgroups", text(&i["cgroups"])),
        ("Template", template_line(&i["template"])),
    ];
    let mut out = String::from("● corrald\n");
    for (label, value) in rows {
        out.push_str(&format!("{label:>12}: {value}\n"));
    }
    out
}

/// The zygote template in one line: "running, pid 4306, 7.0 MiB PSS, 0
/// restarts", "down: why (zygotes are exec'd meanwhile)", "off".
fn template_line(t: &Value) -> String {
    match t["state"].as_str() {
        Some("running") => format!(
            "running, pid {}, {} PSS, {} restarts",
            text(&t["pid"]),
            bytesize::ByteSize(t["pss_bytes"].as_u64().unwrap_or(0)),
            text(&t["restarts"])
        ),
        Some("down") => format!(
            "down: {} (zygotes are exec'd meanwhile; {} restarts)",
            text(&t["last_error"]),
            text(&t["restarts"])
        ),
        Some("off") => "off (daemon.template = false: zygotes are exec'd)".to_string(),
        _ => "-".to_string(),
    }
}

#[cfg(test)]
#[test]
fn the_template_reads_in_one_line() {
    let t = |v| template_line(&serde_json::json!(v));
    assert_eq!(
        t(
            serde_json::json!({"state": "running", "pid": 7, "restarts": 0, "last_error": null,
            "pss_bytes": 7_340_032})
        ),
        "running, pid 7, 7.0 MiB PSS, 0 restarts"
    );
    assert_eq!(
        t(
            serde_json::json!({"state": "down", "pid": null, "restarts": 2,
            "last_error": "exited (signal: 9 (SIGKILL))", "pss_bytes": null})
        ),
        "down: exited (signal: 9 (SIGKILL)) (zygotes are exec'd meanwhile; 2 restarts)"
    );
    assert_eq!(
        t(serde_json::json!({"state": "off"})),
        "off (daemon.template = false: zygotes are exec'd)"
    );
}

/// The apps as an aligned table.
pub(crate) fn render_apps(apps: &Value) -> String {
    let mut rows: Vec<Vec<String>> = vec![
        [
            "APP",
            "KIND",
            "STATE",
            "WORKERS",
            "BUSY",
            "REQUESTS",
            "ERRORS",
            "LISTEN",
            "CERT EXPIRES",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for a in apps.as_array().into_iter().flatten() {
        let mut row: Vec<String> = [
            "name", "kind", "state", "workers", "busy", "requests", "errors", "listen",
        ]
        .iter()
        .map(|k| text(&a[*k]))
        .collect();
        row.push(match a["tls"]["not_after"].as_i64() {
            Some(t) => expires(t),
            None => "-".into(),
        });
        rows.push(row);
    }
    let mut out = super::table(&rows);
    let n = rows.len() - 1;
    out.push_str(&format!("{n} app{}\n", if n == 1 { "" } else { "s" }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_app_reads_like_systemctl_status() {
        let app = serde_json::json!({
            "name": "web", "kind": "http", "state": "running", "state_since": 1_000_000,
            "workers": 2, "busy": 1, "requests": 10, "errors": 1, "cold_starts": 1,
            "cold_starts_forked": 1, "last_error": null, "module": "/srv/web.wasm", "artifact": "x/y/z",
            "sandbox": ["landlock=abi7", "seccomp=on"], "listen": ["127.0.0.1:8080"],
            "zygote_pid": 42
        });
        let out = render_app(&app, 1_000_000 + 75_000);
        assert!(out.starts_with("● web (http app)\n"), "{out}");
        assert!(
            out.contains("       State: running since 1970-01-01T00:16:40Z (1m 15s ago)\n"),
            "{out}"
        );
        assert!(
            out.contains("     Workers: 2 (1 busy), zygote pid 42\n"),
            "{out}"
        );
        assert!(out.contains("  Last error: -\n"), "{out}");
        assert!(
            out.contains(
                "    Requests: 10 served, 1 errors, 1 cold starts (1 forked from the template)\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("     Sandbox: landlock=abi7 seccomp=on\n"),
            "{out}"
        );
        assert!(!out.contains("TLS:"), "{out}");
        let mut tls_app = app.clone();
        tls_app["tls"] = serde_json::json!({
            "subject": "CN=web.test", "names": ["web.test", "127.0.0.1"],
            "not_before": 0, "not_after": 1_000 + 90 * 86400
        });
        let out = render_app(&tls_app, 1_000_000);
        assert!(
            out.contains(
                "         TLS: CN=web.test, names web.test 127.0.0.1, expires 1970-04-01T00:16:40Z (in 90 days)\n"
            ),
            "{out}"
        );
        let table = render_apps(&serde_json::json!([tls_app]));
        assert!(table.contains("1970-04-01T00:16:40Z"), "{table}");
        let table = render_apps(&serde_json::json!([app]));
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(
            table
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("web  http  running"),
            "{table}"
        );
    }
}
