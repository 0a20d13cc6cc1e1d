//! An app's sub-tables: `pool`, `limits`, `sandbox`, `restart`.

use std::time::Duration;

use super::checker::{Checker, join};
use crate::defaults;
use crate::parse::parse_duration;
use crate::source::{Node, NodeKind};
use crate::spec::*;

pub(super) const POOL_KEYS: &[&str] = &[
    "min",
    "max",
    "idle-timeout",
    "concurrency",
    "max-requests",
    "zygote",
    "reuse",
];
pub(super) const REUSE_KEYS: &[&str] = &["requests", "concurrent"];
pub(super) const ZYGOTE_MODES: &[(&str, ZygoteMode)] = &[
    ("on-demand", ZygoteMode::OnDemand),
    ("kept", ZygoteMode::Kept),
];
pub(super) const LIMIT_KEYS: &[&str] = &[
    "memory",
    "timeout",
    "instances",
    "tables",
    "stdout",
    "module-size",
    "cpu-weight",
    "cpu",
    "app-memory",
    "processes",
];
pub(super) const SANDBOX_KEYS: &[&str] = &["landlock", "seccomp", "cgroups"];
/// `sandbox.cgroups`: a cgroup is either required or used where there is one.
pub(super) const CGROUP_ENFORCEMENTS: &[(&str, Enforcement)] = &[
    ("require", Enforcement::Require),
    ("best-effort", Enforcement::BestEffort),
];
/// `limits.cpu-weight`: the kernel's range for `cpu.weight`.
pub(crate) const CPU_WEIGHT_RANGE: (i64, i64) = (1, 10_000);
/// `limits.cpu`: at most 1,000 CPUs.
pub(crate) const CPU_PERCENT_MAX: u32 = 100_000;
/// `limits.app-memory`: less than this cannot hold a zygote and a worker.
pub(crate) const APP_MEMORY_MIN: u64 = 16 * 1024 * 1024;
pub(super) const RESTART_KEYS: &[&str] = &["on", "backoff", "give-up"];
pub(super) const ENFORCEMENTS: &[(&str, Enforcement)] = &[
    ("require", Enforcement::Require),
    ("best-effort", Enforcement::BestEffort),
    ("off", Enforcement::Off),
];
pub(super) const RESTART_ONS: &[(&str, RestartOn)] = &[
    ("always", RestartOn::Always),
    ("failure", RestartOn::Failure),
    ("never", RestartOn::Never),
];

pub(super) fn pool_spec(
    cx: &mut Checker<'_>,
    node: Option<&Node>,
    path: &str,
    kind: Option<AppKind>,
) -> Option<PoolSpec> {
    let mut pool = defaults::POOL;
    let Some(node) = node else { return Some(pool) };
    let t = cx.table(node, path)?;
    cx.check_keys(t, path, POOL_KEYS);
    let before = cx.error_count();
    let max_ok;
    if let Some(e) = t.get("max") {
        match cx.integer(&e.value, &join(path, "max"), 1, defaults::POOL_MAX_LIMIT) {
            Some(n) => {
                pool.max = n as u32;
                max_ok = true;
            }
            None => max_ok = false,
        }
    } else {
        max_ok = true;
    }
    let min_ok = match t.get("min") {
        Some(e) => match cx.integer(&e.value, &join(path, "min"), 0, defaults::POOL_MAX_LIMIT) {
            Some(n) => {
                pool.min = n as u32;
                true
            }
            None => false,
        },
        None => true,
    };
    if max_ok && min_ok && pool.max < pool.min {
        // Point at whichever of the two this table set (max if both).
        let (at, key, msg) = match (t.get("max"), t.get("min")) {
            (Some(e), _) => (
                e.value.at,
                "max",
                format!("{} is below pool.min ({})", pool.max, pool.min),
            ),
            (None, Some(e)) => (
                e.value.at,
                "min",
                format!(
                    "{} is above pool.max ({}, the default): raise pool.max too",
                    pool.min, pool.max
                ),
            ),
            (None, None) => unreachable!("defaults have min <= max"),
        };
        cx.error(at, &join(path, key), msg);
    }
    if let Some(e) = t.get("idle-timeout")
        && let Some(d) = cx.duration(&e.value, &join(path, "idle-timeout"))
    {
        pool.idle_timeout = d;
    }
    if let Some(e) = t.get("concurrency")
        && let Some(n) = cx.integer(&e.value, &join(path, "concurrency"), 1, 1 << 20)
    {
        pool.concurrency = n as u32;
    }
    if let Some(e) = t.get("max-requests") {
        let p = join(path, "max-requests");
        match &e.value.kind {
            NodeKind::Str(s) if s == "unlimited" => pool.max_requests = None,
            NodeKind::Str(s) => cx.error(
                e.value.at,
                &p,
                format!("`{s}`: use a number of requests (at least 1) or \"unlimited\""),
            ),
            _ => {
                if let Some(n) = cx.integer(&e.value, &p, 1, i64::MAX) {
                    pool.max_requests = Some(n as u64);
                }
            }
        }
    }
    if let Some(e) = t.get("zygote")
        && let Some(v) = cx.one_of(&e.value, &join(path, "zygote"), ZYGOTE_MODES)
    {
        pool.zygote = v;
    }
    if let Some(e) = t.get("reuse") {
        pool.reuse = reuse_spec(cx, &e.value, &join(path, "reuse"), kind);
    }
    (cx.error_count() == before).then_some(pool)
}

/// `pool.reuse = { requests = N, concurrent = M }`: http apps only (that
/// the module is a WASI 0.3 handler is checked against the module, before
/// the app starts).
fn reuse_spec(
    cx: &mut Checker<'_>,
    node: &Node,
    path: &str,
    kind: Option<AppKind>,
) -> Option<Reuse> {
    let t = cx.table(node, path)?;
    cx.check_keys(t, path, REUSE_KEYS);
    let before = cx.error_count();
    let mut count = |key: &str| -> Option<u32> {
        match t.get(key) {
            Some(e) => cx
                .integer(&e.value, &join(path, key), 1, i64::from(u32::MAX))
                .map(|n| n as u32),
            None => {
                cx.error(
                    node.at,
                    &join(path, key),
                    "missing: pool.reuse needs both `requests` and `concurrent` (for example { requests = 128, concurrent = 16 })".to_string(),
                );
                None
            }
        }
    };
    let requests = count("requests");
    let concurrent = count("concurrent");
    if let Some(kind) = kind
        && kind != AppKind::Http
    {
        cx.error(
            node.at,
            path,
            format!("kind = \"{kind}\" has no requests to reuse an instance for: pool.reuse applies to http apps with a WASI 0.3 (wasi:http/handler@0.3) component"),
        );
    }
    if cx.error_count() != before {
        return None;
    }
    Some(Reuse {
        requests: requests?,
        concurrent: concurrent?,
    })
}

/// The largest `limits.instances` and `limits.tables` (the least is 1).
pub(crate) const LIMIT_COUNT_MAX: i64 = 1_000_000;

/// `limits.memory`: at least one Wasm page.
pub(crate) fn check_memory(bytes: u64) -> Result<u64, String> {
    if bytes < defaults::WASM_PAGE {
        Err(format!("{bytes} bytes is less than one Wasm page (64KiB)"))
    } else {
        Ok(bytes)
    }
}

/// `limits.cpu`: `"N%"` of one CPU, 1% to 100000%.
pub(crate) fn parse_cpu(text: &str) -> Result<u32, String> {
    let form = "use a share of one CPU in percent, e.g. \"50%\" or \"150%\" (1.5 CPUs)";
    let n = text
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<u32>().ok())
        .ok_or_else(|| format!("`{text}`: {form}"))?;
    if n == 0 || n > CPU_PERCENT_MAX {
        return Err(format!(
            "`{text}`: must be between 1% and {CPU_PERCENT_MAX}%; {form}"
        ));
    }
    Ok(n)
}

/// `limits.app-memory`: enough for a zygote and a worker.
pub(crate) fn check_app_memory(bytes: u64) -> Result<u64, String> {
    if bytes < APP_MEMORY_MIN {
        Err(format!(
            "{bytes} bytes is less than 16MiB, which a zygote and one worker need"
        ))
    } else {
        Ok(bytes)
    }
}

/// Tasks of one worker that `pids.max` counts: its thread and its epoch
/// ticker (more while a guest's file I/O runs on tokio's blocking threads).
pub(crate) const TASKS_PER_WORKER: u32 = 2;

/// `limits.processes` against the pool: the zygote and `pool.max` workers
/// must fit.
pub(crate) fn check_processes(processes: u32, pool_max: u32) -> Result<(), String> {
    let need = u64::from(pool_max) * u64::from(TASKS_PER_WORKER) + 1;
    if u64::from(processes) < need {
        Err(format!(
            "{processes} is below what the pool needs: pids.max counts threads, and the zygote (1) and pool.max = {pool_max} workers ({TASKS_PER_WORKER} each: its thread and its epoch ticker) are {need}; raise it to {need} or more, or lower pool.max"
        ))
    } else {
        Ok(())
    }
}

/// `limits.timeout`: positive, or off (`None`).
pub(crate) fn check_timeout(timeout: Option<Duration>) -> Result<(), String> {
    if timeout == Some(Duration::ZERO) {
        Err("0s would stop every request at once: use a positive duration or \"off\"".to_string())
    } else {
        Ok(())
    }
}

/// Check every field of a [`Limits`] built in code, as the policy checks
/// each key: `(key, problem)` per bad field.
pub(crate) fn check_limits(limits: &Limits) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if let Err(why) = check_memory(limits.memory) {
        problems.push(("memory", why));
    }
    if let Err(why) = check_timeout(limits.timeout) {
        problems.push(("timeout", why));
    }
    for (key, n) in [("instances", limits.instances), ("tables", limits.tables)] {
        if let Err(why) = super::checker::check_range(i64::from(n), 1, LIMIT_COUNT_MAX) {
            problems.push((key, why));
        }
    }
    if let Err(why) = super::checker::check_range(
        i64::from(limits.cpu_weight),
        CPU_WEIGHT_RANGE.0,
        CPU_WEIGHT_RANGE.1,
    ) {
        problems.push(("cpu-weight", why));
    }
    if let Some(n) = limits.cpu
        && let Err(why) = parse_cpu(&format!("{n}%"))
    {
        problems.push(("cpu", why));
    }
    if let Some(n) = limits.app_memory
        && let Err(why) = check_app_memory(n)
    {
        problems.push(("app-memory", why));
    }
    problems
}

pub(super) fn limits_spec(
    cx: &mut Checker<'_>,
    node: Option<&Node>,
    path: &str,
    kind: Option<AppKind>,
) -> Option<Limits> {
    let mut limits = defaults::limits(kind.unwrap_or(AppKind::Http));
    let Some(node) = node else {
        return Some(limits);
    };
    let t = cx.table(node, path)?;
    cx.check_keys(t, path, LIMIT_KEYS);
    let before = cx.error_count();
    if let Some(e) = t.get("memory") {
        let p = join(path, "memory");
        if let Some(n) = cx.size(&e.value, &p) {
            match check_memory(n) {
                Ok(n) => limits.memory = n,
                Err(why) => cx.error(e.value.at, &p, why),
            }
        }
    }
    if let Some(e) = t.get("timeout")
        && let Some(d) = cx.duration_or_off(&e.value, &join(path, "timeout"))
    {
        if let Err(why) = check_timeout(d) {
            cx.error(e.value.at, &join(path, "timeout"), why);
        }
        limits.timeout = d;
    }
    if let Some(e) = t.get("instances")
        && let Some(n) = cx.integer(&e.value, &join(path, "instances"), 1, LIMIT_COUNT_MAX)
    {
        limits.instances = n as u32;
    }
    if let Some(e) = t.get("tables")
        && let Some(n) = cx.integer(&e.value, &join(path, "tables"), 1, LIMIT_COUNT_MAX)
    {
        limits.tables = n as u32;
    }
    if let Some(e) = t.get("stdout")
        && let Some(n) = cx.size(&e.value, &join(path, "stdout"))
    {
        limits.stdout = n;
    }
    if let Some(e) = t.get("module-size")
        && let Some(n) = cx.size(&e.value, &join(path, "module-size"))
    {
        if n < 8 {
            cx.error(
                e.value.at,
                &join(path, "module-size"),
                format!("{n} bytes cannot hold a module: use a size such as \"64MiB\""),
            );
        }
        limits.module_size = n;
    }
    if let Some(e) = t.get("cpu-weight")
        && let Some(n) = cx.integer(
            &e.value,
            &join(path, "cpu-weight"),
            CPU_WEIGHT_RANGE.0,
            CPU_WEIGHT_RANGE.1,
        )
    {
        limits.cpu_weight = n as u32;
    }
    if let Some(e) = t.get("cpu") {
        let p = join(path, "cpu");
        if let Some(text) = cx.string(&e.value, &p) {
            match parse_cpu(text) {
                Ok(n) => limits.cpu = Some(n),
                Err(why) => cx.error(e.value.at, &p, why),
            }
        }
    }
    if let Some(e) = t.get("app-memory") {
        let p = join(path, "app-memory");
        if let Some(n) = cx.size(&e.value, &p) {
            match check_app_memory(n) {
                Ok(n) => limits.app_memory = Some(n),
                Err(why) => cx.error(e.value.at, &p, why),
            }
        }
    }
    if let Some(e) = t.get("processes")
        && let Some(n) = cx.integer(&e.value, &join(path, "processes"), 2, 4_194_304)
    {
        limits.processes = Some(n as u32);
    }
    (cx.error_count() == before).then_some(limits)
}

pub(super) fn sandbox_spec(
    cx: &mut Checker<'_>,
    node: Option<&Node>,
    path: &str,
) -> Option<SandboxSpec> {
    let mut sandbox = defaults::SANDBOX;
    let Some(node) = node else {
        return Some(sandbox);
    };
    let t = cx.table(node, path)?;
    cx.check_keys(t, path, SANDBOX_KEYS);
    let before = cx.error_count();
    if let Some(e) = t.get("landlock")
        && let Some(v) = cx.one_of(&e.value, &join(path, "landlock"), ENFORCEMENTS)
    {
        sandbox.landlock = v;
    }
    if let Some(e) = t.get("seccomp")
        && let Some(v) = cx.one_of(&e.value, &join(path, "seccomp"), ENFORCEMENTS)
    {
        sandbox.seccomp = v;
    }
    if let Some(e) = t.get("cgroups")
        && let Some(v) = cx.one_of(&e.value, &join(path, "cgroups"), CGROUP_ENFORCEMENTS)
    {
        sandbox.cgroups = v;
    }
    (cx.error_count() == before).then_some(sandbox)
}

pub(super) fn restart_spec(
    cx: &mut Checker<'_>,
    node: Option<&Node>,
    path: &str,
) -> Option<RestartSpec> {
    let mut restart = defaults::RESTART;
    let Some(node) = node else {
        return Some(restart);
    };
    let t = cx.table(node, path)?;
    cx.check_keys(t, path, RESTART_KEYS);
    let before = cx.error_count();
    if let Some(e) = t.get("on")
        && let Some(v) = cx.one_of(&e.value, &join(path, "on"), RESTART_ONS)
    {
        restart.on = v;
    }
    if let Some(e) = t.get("backoff") {
        let p = join(path, "backoff");
        if let Some(text) = cx.string(&e.value, &p) {
            match parse_backoff(text) {
                Ok((lo, hi)) => {
                    restart.backoff_min = lo;
                    restart.backoff_max = hi;
                }
                Err(why) => cx.error(e.value.at, &p, why),
            }
        }
    }
    if let Some(e) = t.get("give-up") {
        let p = join(path, "give-up");
        if let Some(text) = cx.string(&e.value, &p) {
            match parse_give_up(text) {
                Ok(g) => restart.give_up = g,
                Err(why) => cx.error(e.value.at, &p, why),
            }
        }
    }
    (cx.error_count() == before).then_some(restart)
}

fn parse_backoff(text: &str) -> Result<(Duration, Duration), String> {
    let form = "use \"MIN..MAX\", e.g. \"100ms..30s\"";
    let (lo, hi) = text
        .split_once("..")
        .ok_or_else(|| format!("`{text}`: {form}"))?;
    let lo = parse_duration(lo).map_err(|why| format!("{why} ({form})"))?;
    let hi = parse_duration(hi).map_err(|why| format!("{why} ({form})"))?;
    if lo.is_zero() {
        return Err(format!("`{text}`: the first delay must be above zero"));
    }
    if hi < lo {
        return Err(format!("`{text}`: the maximum is below the minimum"));
    }
    Ok((lo, hi))
}

fn parse_give_up(text: &str) -> Result<Option<GiveUp>, String> {
    if text == "off" {
        return Ok(None);
    }
    let form = "use \"N in DURATION\" (e.g. \"5 in 10s\") or \"off\"";
    let (n, window) = text
        .split_once(" in ")
        .ok_or_else(|| format!("`{text}`: {form}"))?;
    let crashes: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("`{text}`: `{n}` is not a count; {form}"))?;
    if crashes == 0 {
        return Err(format!("`{text}`: the count must be at least 1; {form}"));
    }
    let window = parse_duration(window).map_err(|why| format!("{why} ({form})"))?;
    if window.is_zero() {
        return Err(format!("`{text}`: the window must be above zero"));
    }
    Ok(Some(GiveUp { crashes, window }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_and_give_up() {
        assert_eq!(
            parse_backoff("100ms..30s").unwrap(),
            (Duration::from_millis(100), Duration::from_secs(30))
        );
        assert!(parse_backoff("30s..1s").is_err());
        assert!(parse_backoff("0s..1s").is_err());
        let g = parse_give_up("10 in 60s").unwrap().unwrap();
        assert_eq!((g.crashes, g.window), (10, Duration::from_secs(60)));
        assert_eq!(parse_give_up("off").unwrap(), None);
        assert!(parse_give_up("0 in 1s").is_err());
        assert!(parse_give_up("ten in 1s").is_err());
    }
}
