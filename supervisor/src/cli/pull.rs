//! `corral pull`: fetch modules from OCI registries, verify them and compile
//! them into the cache (pre-warming a fleet); and the fetching that
//! `corral run` and `corral compile` do for an `oci://` FILE.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, bail};
use corral_compiler::CpuFeatures;
use corral_policy::{OciRef, Policy};

use super::cache::{CacheDirArgs, load_policy};
use super::compile::CompileCommand;
use crate::oci::{self, Fetched, Registries};

/// Fetch modules from OCI registries and compile them into the cache.
///
/// Each REF is an `oci://HOST[:PORT]/REPOSITORY:TAG` or `...@sha256:DIGEST`
/// reference, or the name of an app of the policy whose module is one. A
/// tag is resolved now; the module (the CNCF Wasm artifact's layer, a
/// runwasi image's Wasm layer, or that of an index's wasip1/wasip2/wasm
/// entry) is checked against its digest, stored under <cache>/oci/ by its
/// SHA-256, and compiled for each --target as `corral compile` does.
/// corrald resolves its own references when it starts and on `corral
/// reload`; a pull fills the cache so that neither downloads nor compiles.
/// Registry settings ([registries."HOST[:PORT]"]: ca-file, auth-file,
/// plain-http) come from --policy, else from the default policy when it is
/// readable.
#[derive(Debug, clap::Args)]
#[command(after_long_help = PULL_EXAMPLES)]
pub struct PullCommand {
    /// oci:// references or app names.
    #[arg(value_name = "REF", required = true)]
    pub refs: Vec<String>,

    /// The policy whose [registries] (and apps, for app names) to use.
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,

    /// Target triple to compile for; repeat for several (as `corral compile`).
    #[arg(long = "target", value_name = "TRIPLE")]
    pub targets: Vec<String>,

    /// CPU features the code may use: `native` or `baseline`.
    #[arg(long, value_name = "native|baseline", default_value = "native")]
    pub cpu_features: CpuFeatures,

    /// Only fetch and verify; do not compile.
    #[arg(long)]
    pub no_compile: bool,

    #[command(flatten)]
    pub dir: CacheDirArgs,
}

const PULL_EXAMPLES: &str = "\
Examples:
  corral pull oci://registry.example.com:5000/apps/hello:v1
  corral pull --policy /etc/corral/policy.toml web api
  corral pull --target aarch64-unknown-linux-gnu --cache ./fleet-cache oci://reg/app@sha256:...";

/// Publish a module or component in an OCI registry as a CNCF Wasm
/// artifact (config application/vnd.wasm.config.v0+json, one
/// application/wasm layer), the form `wkg`, `wash` and `oras` write.
/// Prints the manifest's digest: `REF@sha256:...` names exactly this push.
/// Registry settings come from --policy as for `corral pull`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = PUSH_EXAMPLES)]
pub struct PushCommand {
    /// The module or component (.wasm binary or .wat text).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Where: oci://HOST[:PORT]/REPOSITORY:TAG.
    #[arg(value_name = "REF")]
    pub reference: String,

    /// The policy whose [registries] to use.
    #[arg(long, value_name = "PATH")]
    pub policy: Option<PathBuf>,
}

const PUSH_EXAMPLES: &str = "\
Examples:
  corral push app.wasm oci://registry.example.com:5000/apps/hello:v1
  corral push --policy build-host.toml app.wasm oci://127.0.0.1:5000/hello:latest";

/// The policy named, else the default one if it can be read (its
/// registries are what a fleet host uses), else none.
fn registry_policy(path: Option<&Path>) -> anyhow::Result<Option<Policy>> {
    match path {
        Some(p) => load_policy(p).map(Some),
        None => Ok(load_policy(&super::default_policy_path()).ok()),
    }
}

fn registries(policy: Option<&Policy>) -> Registries {
    Registries(policy.map(|p| p.registries.clone()).unwrap_or_default())
}

/// Fetch `reference` for the CLI (its own runtime; progress on a terminal).
pub(crate) fn fetch(
    reference: &OciRef,
    policy: Option<&Policy>,
    cache_dir: &Path,
    limit: u64,
) -> anyhow::Result<Fetched> {
    let registries = registries(policy);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(oci::fetch(
        reference,
        &registries,
        cache_dir,
        limit,
        oci::progress_for_stderr(),
    ))
    .with_context(|| format!("fetching {reference}"))
}

/// A FILE argument that is an `oci://` reference, fetched: the stored
/// module's path. Anything else is returned as is.
pub(crate) fn file_or_fetched(
    file: &Path,
    policy: Option<&Policy>,
    cache: &CacheDirArgs,
) -> anyhow::Result<PathBuf> {
    let Some(text) = file.to_str().filter(|t| OciRef::is_reference(t)) else {
        return Ok(file.to_path_buf());
    };
    let reference = OciRef::parse(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = cache.resolve(policy)?;
    let policy = match policy {
        Some(p) => Some(p.clone()),
        None => registry_policy(None)?,
    };
    let fetched = fetch(
        &reference,
        policy.as_ref(),
        &dir,
        corral_policy::defaults::MODULE_SIZE,
    )?;
    Ok(fetched.path)
}

impl PullCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let policy = registry_policy(self.policy.as_deref())?;
        let dir = self.dir.resolve(policy.as_ref())?;
        let mut wanted = Vec::new();
        for r in &self.refs {
            if OciRef::is_reference(r) {
                let parsed = OciRef::parse(r).map_err(|e| anyhow::anyhow!("{e}"))?;
                wanted.push((parsed, corral_policy::defaults::MODULE_SIZE));
                continue;
            }
            let Some(policy) = &policy else {
                bail!(
                    "`{r}` is not an oci:// reference, and there is no policy to find an app of that name in (--policy)"
                );
            };
            match policy.apps.get(r) {
                Some(app) => match &app.oci {
                    Some(reference) => wanted.push((reference.clone(), app.limits.module_size)),
                    None => bail!("app `{r}`'s module is a file, not an oci:// reference"),
                },
                None => bail!("`{r}` is not an oci:// reference nor an app of the policy"),
            }
        }
        let mut files = Vec::new();
        let mut failed = false;
        for (reference, limit) in &wanted {
            let started = Instant::now();
            match fetch(reference, policy.as_ref(), &dir, *limit) {
                Ok(f) => {
                    println!(
                        "{reference}  sha256:{}  module sha256:{}  {} bytes  {}",
                        f.manifest,
                        f.module,
                        f.size,
                        if f.cached {
                            "already stored".to_string()
                        } else {
                            format!("{:.2}s", started.elapsed().as_secs_f64())
                        }
                    );
                    files.push(f.path);
                }
                Err(e) => {
                    eprintln!("corral: {e:#}");
                    failed = true;
                }
            }
        }
        if !self.no_compile && !files.is_empty() {
            let compile = CompileCommand {
                files,
                policy: None,
                targets: self.targets,
                cpu_features: self.cpu_features,
                dir: CacheDirArgs { cache: Some(dir) },
                output: None,
                jobs: None,
                json: false,
            };
            if compile.execute()? != ExitCode::SUCCESS {
                failed = true;
            }
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    }
}

impl PushCommand {
    pub fn execute(self) -> anyhow::Result<ExitCode> {
        let reference = OciRef::parse(&self.reference).map_err(|e| anyhow::anyhow!("{e}"))?;
        if matches!(reference.version, corral_policy::OciVersion::Digest(_)) {
            bail!(
                "push to a tag (oci://HOST/REPO:TAG): a digest names what is pushed, it is printed after the push"
            );
        }
        let policy = registry_policy(self.policy.as_deref())?;
        let source = corral_compiler::Source::read(&self.file)?;
        let started = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let digest = rt
            .block_on(oci::push(&source, &reference, &registries(policy.as_ref())))
            .with_context(|| format!("pushing {} to {reference}", self.file.display()))?;
        eprintln!(
            "pushed {} ({} bytes, {}) in {:.2}s",
            self.file.display(),
            source.wasm.len(),
            source.kind,
            started.elapsed().as_secs_f64()
        );
        println!("{}", reference.at_digest(&digest));
        Ok(ExitCode::SUCCESS)
    }
}
