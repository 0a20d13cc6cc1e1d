//! `corral cache list|verify|gc|clear`, and where the cache is
//! ([`CacheDirArgs`], shared with `corral compile`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bytesize::ByteSize;
use corral_compiler::{Cache, GcReport};
use corral_policy::{Environment, Policy};

/// Which cache: `--cache`, else the policy's `daemon.cache-dir`.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheDirArgs {
    /// The cache directory. Default: the policy's `daemon.cache-dir` when
    /// `--policy` is given (or, for root, when the default policy is
    /// readable), else `$CACHE_DIRECTORY`, else for non-root users
    /// `$XDG_CACHE_HOME/corral` or `~/.cache/corral`, else /var/cache/corral.
    #[arg(long, value_name = "DIR", global = true)]
    pub cache: Option<PathBuf>,
}

impl CacheDirArgs {
    /// The cache directory to use, given the policy the command read (if
    /// any).
    pub fn resolve(&self, policy: Option<&Policy>) -> anyhow::Result<PathBuf> {
        if let Some(dir) = &self.cache {
            return Ok(dir.clone());
        }
        if let Some(policy) = policy {
            return Ok(policy.daemon.cache_dir.clone());
        }
        if let Some(dir) = Environment::from_process().cache_directory {
            return Ok(dir);
        }
        if rustix::process::geteuid().is_root() {
            let default = crate::cli::default_policy_path();
            if let Ok(policy) = corral_policy::load(&default, &Environment::from_process()) {
                return Ok(policy.daemon.cache_dir);
            }
            return Ok(corral_policy::defaults::CACHE_DIR.into());
        }
        let xdg = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute());
        let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"));
        match xdg.or(home) {
            Some(base) => Ok(base.join("corral")),
            None => bail!(
                "no cache directory: pass --cache DIR (neither XDG_CACHE_HOME nor HOME is set)"
            ),
        }
    }
}

/// Load a policy, turning its diagnostics into one error.
pub(crate) fn load_policy(path: &Path) -> anyhow::Result<Policy> {
    corral_policy::load(path, &Environment::from_process()).map_err(|e| {
        let lines: Vec<String> = e.diagnostics().iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}", lines.join("\n"))
    })
}

/// Inspect and prune the artifact cache.
///
/// Layout: <cache>/<target>/<engine-hash>/<module-sha256>.cwasm, with a
/// .json metadata file beside each artifact (see docs/cache.md).
#[derive(Debug, clap::Args)]
pub struct CacheCommand {
    #[command(subcommand)]
    pub action: CacheAction,

    #[command(flatten)]
    pub dir: CacheDirArgs,

    /// Use this policy's `daemon.cache-dir`.
    #[arg(long, value_name = "PATH", global = true)]
    pub policy: Option<PathBuf>,

    /// Print the result as JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum CacheAction {
    /// List entries, least recently used first: key, kind, size, last use,
    /// source, and whether a running process uses it.
    List,
    /// Check every artifact's size and SHA-256 against its metadata; exit 1
    /// if any is damaged.
    Verify {
        /// Delete damaged entries (they are rebuilt on next use anyway).
        #[arg(long)]
        remove: bool,
    },
    /// Delete least recently used entries until the cache fits in
    /// --max-size. Entries in use by corrald or its workers are kept.
    Gc {
        /// Size limit, e.g. 500MiB or 2GB.
        #[arg(long, value_name = "SIZE", default_value = "1GiB")]
        max_size: ByteSize,
    },
    /// Delete every entry that is not in use.
    Clear,
}

impl CacheCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let policy = self.policy.as_deref().map(load_policy).transpose()?;
        let dir = self.dir.resolve(policy.as_ref())?;
        let cache = Cache::open_existing(&dir);
        match self.action {
            CacheAction::List => list(&cache, self.json),
            CacheAction::Verify { remove } => verify(&cache, remove, self.json),
            CacheAction::Gc { max_size } => {
                let report = cache
                    .gc(max_size.as_u64())
                    .with_context(|| format!("gc of {}", dir.display()))?;
                print_gc(&cache, &report, self.json)
            }
            CacheAction::Clear => {
                let report = cache
                    .clear()
                    .with_context(|| format!("clearing {}", dir.display()))?;
                print_gc(&cache, &report, self.json)
            }
        }
    }
}

fn list(cache: &Cache, json: bool) -> anyhow::Result<ExitCode> {
    let entries = cache.entries()?;
    let total: u64 = entries.iter().map(|e| e.size).sum();
    if json {
        let out = serde_json::json!({
            "cache": cache.root(), "total-size": total, "entries": entries,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    for e in &entries {
        let (kind, source) = match &e.meta {
            Some(m) => (m.kind.to_string(), m.source.display().to_string()),
            None => ("?".into(), "(no metadata)".into()),
        };
        let age = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|now| now.as_secs().saturating_sub(e.last_use))
            .unwrap_or(0);
        println!(
            "{}  {:<9}  {:>10}  used {} ago{}  {}",
            e.key,
            kind,
            ByteSize(e.size).to_string(),
            humantime::format_duration(std::time::Duration::from_secs(age)),
            if e.in_use { "  in-use" } else { "" },
            source,
        );
    }
    println!(
        "{} entr{}, {} in {}",
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" },
        ByteSize(total),
        cache.root().display()
    );
    Ok(ExitCode::SUCCESS)
}

fn verify(cache: &Cache, remove: bool, json: bool) -> anyhow::Result<ExitCode> {
    let results = cache.verify(remove)?;
    let bad = results.iter().filter(|r| r.problem.is_some()).count();
    if json {
        let out = serde_json::json!({
            "cache": cache.root(), "ok": bad == 0, "entries": results,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for r in &results {
            match &r.problem {
                None => println!("ok       {}", r.key),
                Some(p) => println!(
                    "{} {}: {p}",
                    if r.removed { "removed " } else { "DAMAGED " },
                    r.key
                ),
            }
        }
        println!("{} checked, {bad} damaged", results.len());
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_gc(cache: &Cache, report: &GcReport, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        let out = serde_json::json!({ "cache": cache.root(), "report": report });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    for key in &report.removed {
        println!("removed  {key}");
    }
    for key in &report.kept_in_use {
        println!("in use   {key} (kept)");
    }
    println!(
        "removed {} entr{} ({}), {} stale temp file{}; {} left in {}",
        report.removed.len(),
        if report.removed.len() == 1 {
            "y"
        } else {
            "ies"
        },
        ByteSize(report.freed),
        report.stale_temp_files,
        if report.stale_temp_files == 1 {
            ""
        } else {
            "s"
        },
        ByteSize(report.size_after),
        cache.root().display()
    );
    Ok(ExitCode::SUCCESS)
}
