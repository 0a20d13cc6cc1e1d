//! `corral compile`: compile modules ahead of time into the cache (or a
//! file), for this host or other targets, several at once.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytesize::ByteSize;
use corral_compiler::{
    BuiltEngine, Cache, CpuFeatures, EngineOptions, ProgramKind, Source, build_engine, host_triple,
};
use serde::Serialize;

use super::cache::{CacheDirArgs, load_policy};

/// Compile WebAssembly modules and components ahead of time.
///
/// Each FILE (.wasm or .wat; core module or component) is compiled once per
/// --target into the cache at <cache>/<target>/<engine-hash>/<sha256>.cwasm,
/// where corrald finds it. Prints the key, the artifact size and the time
/// taken ("cached" when it was already there). Files compile in parallel.
#[derive(Debug, clap::Args)]
#[command(after_long_help = EXAMPLES)]
pub struct CompileCommand {
    /// Modules or components to compile (.wasm binary or .wat text).
    #[arg(value_name = "FILE", required_unless_present = "policy")]
    pub files: Vec<PathBuf>,

    /// Compile every app of this policy with that app's engine settings,
    /// into the policy's `daemon.cache-dir` (unless --cache is given).
    #[arg(long, value_name = "PATH", conflicts_with = "files")]
    pub policy: Option<PathBuf>,

    /// Target triple to compile for; repeat for several. Default: this
    /// host. Other targets fill <cache>/<TRIPLE>/ for copying to machines
    /// of that kind (e.g. aarch64-unknown-linux-gnu, riscv64gc-unknown-linux-gnu,
    /// s390x-unknown-linux-gnu, x86_64-unknown-linux-gnu).
    #[arg(long = "target", value_name = "TRIPLE")]
    pub targets: Vec<String>,

    /// CPU features the code may use: `native` (this host's; only for the
    /// host target) or `baseline` (any CPU of the architecture; always
    /// used for other targets).
    #[arg(long, value_name = "native|baseline", default_value = "native")]
    pub cpu_features: CpuFeatures,

    #[command(flatten)]
    pub dir: CacheDirArgs,

    /// Write the artifact to OUT instead of the cache (one FILE, one target).
    #[arg(
        short = 'o',
        long = "output",
        value_name = "OUT",
        conflicts_with = "policy"
    )]
    pub output: Option<PathBuf>,

    /// How many files to compile at once. Default: the number of CPUs.
    #[arg(short = 'j', long, value_name = "N")]
    pub jobs: Option<usize>,

    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

const EXAMPLES: &str = "\
Examples:
  corral compile app.wasm                       into the per-user or policy cache
  corral compile --policy /etc/corral/policy.toml
  corral compile --target aarch64-unknown-linux-gnu --cache ./fleet-cache *.wasm
  corral compile app.wat -o app.cwasm           a file, no cache";

/// What each worker thread is compiling: label, file size, start.
type Running = Mutex<Vec<Option<(String, u64, Instant)>>>;

/// One file to compile for one target with one engine.
struct Job<'e> {
    label: String,
    file: PathBuf,
    target: String,
    cpu: CpuFeatures,
    engine: &'e BuiltEngine,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct JobResult {
    file: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    app: Option<String>,
    target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<ProgramKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    cached: bool,
    /// Milliseconds this run spent compiling (0 when cached).
    compile_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl CompileCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let host = host_triple();
        let targets: Vec<String> = if self.targets.is_empty() {
            vec![host.clone()]
        } else {
            self.targets.clone()
        };
        if self.output.is_some() && (self.files.len() != 1 || targets.len() != 1) {
            bail!("-o OUT takes exactly one FILE and at most one --target");
        }

        // (app name, file, engine options) for every input.
        let mut inputs: Vec<(Option<String>, PathBuf, EngineOptions)> = Vec::new();
        let policy = self.policy.as_deref().map(load_policy).transpose()?;
        if let Some(policy) = &policy {
            for (name, app) in &policy.apps {
                let opts = EngineOptions::for_app(app).with_cpu(self.cpu_features);
                // An oci:// module is fetched (resolving a tag now) first.
                let file = match &app.oci {
                    Some(r) => {
                        let dir = self.dir.resolve(Some(policy))?;
                        super::pull::fetch(r, Some(policy), &dir, app.limits.module_size)
                            .with_context(|| format!("app {name}"))?
                            .path
                    }
                    None => app.module.clone(),
                };
                inputs.push((Some(name.clone()), file, opts));
            }
        } else {
            let opts = EngineOptions::default_for_cli().with_cpu(self.cpu_features);
            for file in &self.files {
                let fetched = super::pull::file_or_fetched(file, None, &self.dir)?;
                let label = (fetched != *file).then(|| file.display().to_string());
                inputs.push((label, fetched, opts.clone()));
            }
        }

        // One engine per distinct (options, target); compiling needs no pool.
        let mut engines: Vec<(EngineOptions, String, BuiltEngine)> = Vec::new();
        for (_, _, opts) in &inputs {
            let opts = opts.clone().without_pooling();
            for target in &targets {
                if engines.iter().any(|(o, t, _)| *o == opts && t == target) {
                    continue;
                }
                let engine = build_engine(&opts, (target != &host).then_some(target.as_str()))?;
                engines.push((opts.clone(), target.clone(), engine));
            }
        }
        let engine_for = |opts: &EngineOptions, target: &str| {
            let opts = opts.clone().without_pooling();
            engines
                .iter()
                .find(|(o, t, _)| *o == opts && t == target)
                .map(|(_, _, e)| e)
                .expect("an engine was built for every input and target")
        };

        if let Some(out) = &self.output {
            let (_, file, opts) = &inputs[0];
            return write_output(engine_for(opts, &targets[0]), file, out, self.json);
        }

        let policy_ref = policy.as_ref();
        let dir = self.dir.resolve(policy_ref)?;
        let cache = Cache::open(&dir)?;

        let mut jobs = Vec::new();
        for (app, file, opts) in &inputs {
            for target in &targets {
                jobs.push(Job {
                    label: app.clone().unwrap_or_else(|| file.display().to_string()),
                    file: file.clone(),
                    target: target.clone(),
                    cpu: opts.cpu,
                    engine: engine_for(opts, target),
                });
            }
        }
        let apps: Vec<Option<String>> = inputs
            .iter()
            .flat_map(|(app, _, _)| targets.iter().map(move |_| app.clone()))
            .collect();

        let workers = self
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .clamp(1, jobs.len().max(1));
        let show_progress = !self.json && std::io::stderr().is_terminal();
        let results = run_jobs(&cache, &jobs, workers, &host, show_progress);

        let mut failed = 0;
        let results: Vec<JobResult> = results
            .into_iter()
            .zip(apps)
            .map(|(mut r, app)| {
                r.app = app;
                failed += usize::from(r.error.is_some());
                r
            })
            .collect();
        if self.json {
            let out = serde_json::json!({ "cache": dir, "results": results });
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            for r in &results {
                print_result(r);
            }
        }
        Ok(if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

/// Run `jobs` on `workers` threads (wasmtime also compiles the functions of
/// each module in parallel); results in job order.
fn run_jobs(
    cache: &Cache,
    jobs: &[Job<'_>],
    workers: usize,
    host: &str,
    show_progress: bool,
) -> Vec<JobResult> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<JobResult>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let running: Running = Mutex::new(vec![None; workers]);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for slot in 0..workers {
            let (next, results, running) = (&next, &results, &running);
            handles.push(s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { break };
                    let size = std::fs::metadata(&job.file).map_or(0, |m| m.len());
                    running.lock().expect("progress lock")[slot] = Some((
                        format!("{} ({})", job.label, job.target),
                        size,
                        Instant::now(),
                    ));
                    let result = run_job(cache, job, host);
                    running.lock().expect("progress lock")[slot] = None;
                    *results[i].lock().expect("result lock") = Some(result);
                }
            }));
        }
        if show_progress {
            let (running, done) = (&running, &done);
            s.spawn(move || progress(running, done));
        }
        for h in handles {
            let _ = h.join();
        }
        done.store(true, Ordering::SeqCst);
    });
    results
        .into_iter()
        .map(|m| m.into_inner().expect("result lock").expect("every job ran"))
        .collect()
}

/// On a terminal: one status line naming the compiles that have taken
/// longer than a second (file, size, elapsed), redrawn twice a second.
fn progress(running: &Running, done: &AtomicBool) {
    use std::io::Write;
    let mut drawn = false;
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(500));
        let line: Vec<String> = running
            .lock()
            .expect("progress lock")
            .iter()
            .flatten()
            .filter(|(_, _, t)| t.elapsed() > Duration::from_secs(1))
            .map(|(label, size, t)| {
                format!("{label} {} {}s", ByteSize(*size), t.elapsed().as_secs())
            })
            .collect();
        if !line.is_empty() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[Kcompiling {}", line.join(", "));
            let _ = err.flush();
            drawn = true;
        }
    }
    if drawn {
        eprint!("\r\x1b[K");
    }
}

fn run_job(cache: &Cache, job: &Job<'_>, host: &str) -> JobResult {
    let mut r = JobResult {
        file: job.file.clone(),
        app: None,
        target: job.target.clone(),
        key: None,
        kind: None,
        path: None,
        size: None,
        cached: false,
        compile_ms: 0,
        error: None,
    };
    let outcome = Source::read(&job.file).and_then(|source| {
        r.kind = Some(source.kind);
        if job.target == host && job.cpu == CpuFeatures::Native {
            cache
                .load_or_compile_source(&job.engine.engine, &source)
                .map(|a| {
                    (
                        a.key,
                        a.path,
                        a.meta.artifact_size,
                        a.cache_hit,
                        a.compile_time,
                    )
                })
        } else {
            cache
                .compile_for_target(&job.engine.engine, &job.target, job.cpu, &source)
                .map(|e| {
                    (
                        e.key,
                        e.path,
                        e.meta.artifact_size,
                        e.cache_hit,
                        e.compile_time,
                    )
                })
        }
    });
    match outcome {
        Ok((key, path, size, hit, took)) => {
            r.key = Some(key.to_string());
            r.path = Some(path);
            r.size = Some(size);
            r.cached = hit;
            r.compile_ms = took.map_or(0, |d| d.as_millis() as u64);
        }
        Err(e) => r.error = Some(corral_compiler::chain(&e)),
    }
    r
}

fn print_result(r: &JobResult) {
    let name = match &r.app {
        Some(app) => format!("{app} ({})", r.file.display()),
        None => r.file.display().to_string(),
    };
    match (&r.error, &r.key) {
        (Some(e), _) => eprintln!("corral: {e}"),
        (None, Some(key)) => println!(
            "{}  {name}  {}  {key}  {}  {}",
            if r.cached { "cached  " } else { "compiled" },
            r.kind.map_or("-".into(), |k| k.to_string()),
            ByteSize(r.size.unwrap_or(0)),
            if r.cached {
                "-".to_string()
            } else {
                format!("{} ms", r.compile_ms)
            },
        ),
        (None, None) => {}
    }
}

/// `-o OUT`: compile one file and write the artifact there (temp file and
/// rename), leaving the cache alone.
fn write_output(
    engine: &BuiltEngine,
    file: &Path,
    out: &Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let source = Source::read(file)?;
    let start = Instant::now();
    let compiled = source.precompile(&engine.engine)?;
    let took = start.elapsed();
    corral_compiler::write_atomic(out, &compiled)?;
    if json {
        let outj = serde_json::json!({
            "file": file, "output": out, "kind": source.kind, "module-sha256": source.digest,
            "size": compiled.len(), "compile-ms": took.as_millis() as u64,
        });
        println!("{}", serde_json::to_string_pretty(&outj)?);
    } else {
        println!(
            "compiled  {}  {}  -> {}  {}  {} ms",
            file.display(),
            source.kind,
            out.display(),
            ByteSize(compiled.len() as u64),
            took.as_millis()
        );
    }
    Ok(ExitCode::SUCCESS)
}
