//! corrald's side of the per-app counters (`corral_runtime::counters`):
//! one page per app, and their Prometheus text (`GET /metrics`,
//! `daemon.metrics`).
//!
//! The page belongs to corrald, not to a zygote, so the counters survive
//! zygote restarts, reloads and scale to zero; they count from corrald's
//! start.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use corral_runtime::counters::{AppCounters, BUCKETS};

use super::state::{AppInfo, AppState, escape_label};

/// The counter pages of every app corrald has served, by app name. A page
/// outlives the app's versions (reloads, restarts); an app removed from
/// the policy keeps its page (4 KiB) in case it comes back.
#[derive(Debug, Default)]
pub(crate) struct Blocks {
    apps: Mutex<BTreeMap<String, Block>>,
}

#[derive(Debug)]
struct Block {
    counters: &'static AppCounters,
    fd: OwnedFd,
}

impl Blocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Block>> {
        self.apps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The app's page, made on first use; `None` (logged) when the memfd
    /// cannot be made: the app runs, its counters stay at zero.
    pub(crate) fn counters(&self, app: &str) -> Option<&'static AppCounters> {
        let mut apps = self.lock();
        if let Some(block) = apps.get(app) {
            return Some(block.counters);
        }
        match corral_runtime::counters::create_page() {
            Ok((fd, counters)) => {
                apps.insert(app.to_string(), Block { counters, fd });
                Some(counters)
            }
            Err(e) => {
                tracing::error!(app, "cannot create the app's metrics page: {e}");
                None
            }
        }
    }

    /// A copy of the page's fd, for a zygote's `Start` message.
    pub(crate) fn fd_for_zygote(&self, app: &str) -> Option<OwnedFd> {
        self.counters(app)?;
        let apps = self.lock();
        match apps.get(app)?.fd.try_clone() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::error!(app, "cannot pass the metrics page: {e}");
                None
            }
        }
    }

    /// The page of an app that has one (never creates it).
    pub(crate) fn get(&self, app: &str) -> Option<&'static AppCounters> {
        self.lock().get(app).map(|b| b.counters)
    }

    /// Fold the workers' numbers into an app's record: `requests` comes
    /// from the page, `errors` is the record's (crashed workers) plus the
    /// page's (failed requests).
    pub(crate) fn fill(&self, info: &mut AppInfo) {
        if let Some(c) = self.get(&info.name) {
            info.requests = c.requests.load(Ordering::Relaxed);
            info.errors = info.errors.saturating_add(c.errors.load(Ordering::Relaxed));
        }
    }

    /// The Prometheus text exposition (format 0.0.4) for `apps` (records
    /// already [`Blocks::fill`]ed).
    pub(crate) fn render(&self, apps: &[AppInfo]) -> String {
        let zero = AppCounters::default();
        let pages: Vec<(&AppInfo, &AppCounters)> = apps
            .iter()
            .map(|a| (a, self.get(&a.name).unwrap_or(&zero)))
            .collect();
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        type Value = fn(&AppInfo, &AppCounters) -> u64;
        let simple: [(&str, &str, &str, Value); 11] = [
            (
                "corral_app_requests_total",
                "counter",
                "Requests served since corrald started: http requests, stdio connections, command runs.",
                |a, _| a.requests,
            ),
            (
                "corral_app_errors_total",
                "counter",
                "Failed requests (http status >= 500; stdio/command instances that trapped, hit a limit or exited non-zero) plus crashed workers.",
                |a, _| a.errors,
            ),
            (
                "corral_app_instances_total",
                "counter",
                "Wasm instances created (one per http request, stdio connection or command run).",
                |_, c| c.instances.load(Ordering::Relaxed),
            ),
            (
                "corral_app_workers",
                "gauge",
                "Live worker processes.",
                |a, _| u64::from(a.workers),
            ),
            (
                "corral_app_busy_workers",
                "gauge",
                "Workers serving at least one connection.",
                |a, _| u64::from(a.busy),
            ),
            (
                "corral_app_cold_starts_total",
                "counter",
                "Zygote starts (from zero processes, and restarts).",
                |a, _| a.cold_starts,
            ),
            (
                "corral_app_cold_starts_forked_total",
                "counter",
                "Zygote starts forked from the zygote template (the rest were exec'd).",
                |a, _| a.cold_starts_forked,
            ),
            (
                "corral_app_cache_hits_total",
                "counter",
                "Artifact cache hits when the app was prepared.",
                |_, c| c.cache_hits.load(Ordering::Relaxed),
            ),
            (
                "corral_app_cache_misses_total",
                "counter",
                "Artifact cache misses (compiles) when the app was prepared.",
                |_, c| c.cache_misses.load(Ordering::Relaxed),
            ),
            (
                "corral_app_sandbox_kills_total",
                "counter",
                "Workers killed by the seccomp filter.",
                |_, c| c.sandbox_kills.load(Ordering::Relaxed),
            ),
            (
                "corral_app_guest_log_dropped_bytes_total",
                "counter",
                "Bytes of guest stdout/stderr not logged: past an instance's limits.stdout, or over the app's log rate.",
                |_, c| c.log_dropped_bytes.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in simple {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (a, c) in &pages {
                let _ = writeln!(
                    out,
                    "{name}{{app=\"{}\"}} {}",
                    escape_label(&a.name),
                    value(a, c)
                );
            }
        }
        // From each app's cgroup; apps without one have no sample.
        type Figure = fn(&crate::cgroup::Usage) -> String;
        let figures: [(&str, &str, &str, Figure); 5] = [
            (
                "corral_app_cpu_seconds_total",
                "counter",
                "CPU time of all the app's processes (its cgroup's cpu.stat usage_usec).",
                |u| format!("{}", u.cpu_usec as f64 / 1e6),
            ),
            (
                "corral_app_memory_bytes",
                "gauge",
                "Memory of all the app's processes (its cgroup's memory.current).",
                |u| u.memory_bytes.to_string(),
            ),
            (
                "corral_app_memory_peak_bytes",
                "gauge",
                "Highest memory of the app's processes (its cgroup's memory.peak, Linux 5.19+).",
                |u| u.memory_peak_bytes.unwrap_or(u.memory_bytes).to_string(),
            ),
            (
                "corral_app_tasks",
                "gauge",
                "Processes and threads of the app (its cgroup's pids.current).",
                |u| u.tasks.to_string(),
            ),
            (
                "corral_app_oom_kills_total",
                "counter",
                "The app's processes killed by the OOM killer at limits.app-memory (memory.events oom_kill).",
                |u| u.oom_kills.to_string(),
            ),
        ];
        for (name, kind, help, value) in figures {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (a, _) in &pages {
                if let Some(u) = &a.cgroup {
                    let _ = writeln!(
                        out,
                        "{name}{{app=\"{}\"}} {}",
                        escape_label(&a.name),
                        value(u)
                    );
                }
            }
        }
        let name = "corral_app_state";
        let _ = writeln!(
            out,
            "# HELP {name} 1 for the app's current state, 0 for the others.\n# TYPE {name} gauge"
        );
        const STATES: [AppState; 7] = [
            AppState::Starting,
            AppState::Running,
            AppState::Idle,
            AppState::Restarting,
            AppState::Failed,
            AppState::Stopped,
            AppState::Finished,
        ];
        for (a, _) in &pages {
            for s in STATES {
                let _ = writeln!(
                    out,
                    "{name}{{app=\"{}\",state=\"{s}\"}} {}",
                    escape_label(&a.name),
                    u8::from(a.state == s)
                );
            }
        }
        let name = "corral_app_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from an http request's head to its response's head; a stdio connection's whole life.\n# TYPE {name} histogram"
        );
        for (a, c) in &pages {
            let app = escape_label(&a.name);
            let mut cumulative = 0u64;
            for (i, bound) in BUCKETS
                .iter()
                .map(|b| b.to_string())
                .chain(["+Inf".to_string()])
                .enumerate()
            {
                cumulative = cumulative.saturating_add(load(&c.latency[i]));
                let _ = writeln!(
                    out,
                    "{name}_bucket{{app=\"{app}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let sum = load(&c.latency_sum_us) as f64 / 1e6;
            let _ = writeln!(out, "{name}_sum{{app=\"{app}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{app=\"{app}\"}} {cumulative}");
        }
        let name = "corral_app_tls_cert_expiry_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} When the certificate the app serves expires (notAfter), Unix time in seconds; apps without tls have none.\n# TYPE {name} gauge"
        );
        for (a, _) in &pages {
            if let Some(tls) = &a.tls {
                let _ = writeln!(
                    out,
                    "{name}{{app=\"{}\"}} {}",
                    escape_label(&a.name),
                    tls.not_after
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP corral_build_info corral's version and the wasmtime it embeds.\n# TYPE corral_build_info gauge\ncorral_build_info{{version=\"{}\",wasmtime_version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            corral_compiler::WASMTIME_VERSION
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_page_is_shared_through_its_fd_and_rendered() {
        let blocks = Blocks::default();
        let counters = blocks.counters("web").unwrap();
        counters.begin();
        counters.observe(Duration::from_micros(700), false);
        counters.begin();
        counters.observe(Duration::from_secs(20), true);
        // What a zygote does with the fd: map it again (here in the same
        // process, which shows it is the same memory).
        let fd = blocks.fd_for_zygote("web").unwrap();
        let other = corral_runtime::counters::map_page(&fd).unwrap();
        other.sandbox_kills.fetch_add(1, Ordering::Relaxed);
        assert_eq!(counters.sandbox_kills.load(Ordering::Relaxed), 1);
        assert!(
            rustix::fs::ftruncate(&fd, 0).is_err(),
            "sealed against shrinking"
        );

        let mut info = AppInfo {
            name: "web".into(),
            kind: "http".into(),
            state: AppState::Running,
            state_since: 0,
            workers: 2,
            busy: 1,
            requests: 0,
            errors: 1,
            cold_starts: 3,
            cold_starts_forked: 2,
            last_error: None,
            module: "/m.wasm".into(),
            digest: None,
            artifact: None,
            world: None,
            sandbox: vec![],
            listen: vec![],
            zygote_pid: None,
            tls: None,
            cgroup: None,
        };
        blocks.fill(&mut info);
        assert_eq!((info.requests, info.errors), (2, 2));
        let text = blocks.render(&[info]);
        for line in [
            "corral_app_requests_total{app=\"web\"} 2",
            "corral_app_errors_total{app=\"web\"} 2",
            "corral_app_sandbox_kills_total{app=\"web\"} 1",
            "corral_app_state{app=\"web\",state=\"running\"} 1",
            "corral_app_state{app=\"web\",state=\"idle\"} 0",
            "corral_app_request_duration_seconds_bucket{app=\"web\",le=\"0.0005\"} 0",
            "corral_app_request_duration_seconds_bucket{app=\"web\",le=\"0.001\"} 1",
            "corral_app_request_duration_seconds_bucket{app=\"web\",le=\"10\"} 1",
            "corral_app_request_duration_seconds_bucket{app=\"web\",le=\"+Inf\"} 2",
            "corral_app_request_duration_seconds_count{app=\"web\"} 2",
            "corral_app_request_duration_seconds_sum{app=\"web\"} 20.0007",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !text.contains("corral_app_memory_bytes{"),
            "no sample for an app without a cgroup\n{text}"
        );
    }

    /// An app's cgroup figures, as its cgroup files give them.
    #[test]
    fn cgroup_figures_are_rendered_for_apps_that_have_one() {
        let blocks = Blocks::default();
        let info = AppInfo {
            name: "fat".into(),
            kind: "stdio".into(),
            state: AppState::Running,
            state_since: 0,
            workers: 1,
            busy: 1,
            requests: 0,
            errors: 0,
            cold_starts: 1,
            cold_starts_forked: 0,
            last_error: None,
            module: "/m.wasm".into(),
            artifact: None,
            tls: None,
            digest: None,
            world: None,
            sandbox: vec![],
            listen: vec![],
            zygote_pid: None,
            cgroup: Some(crate::cgroup::Usage {
                path: "/sys/fs/cgroup/x/apps/fat".into(),
                cpu_usec: 2_500_000,
                memory_bytes: 1000,
                memory_peak_bytes: None,
                tasks: 5,
                oom_kills: 2,
                pids_max_hits: 0,
                limits: vec![],
            }),
        };
        let text = blocks.render(&[info]);
        for line in [
            "corral_app_cpu_seconds_total{app=\"fat\"} 2.5",
            "corral_app_memory_bytes{app=\"fat\"} 1000",
            "corral_app_memory_peak_bytes{app=\"fat\"} 1000",
            "corral_app_tasks{app=\"fat\"} 5",
            "corral_app_oom_kills_total{app=\"fat\"} 2",
            "# TYPE corral_app_oom_kills_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
