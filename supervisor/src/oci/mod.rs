//! Modules from OCI registries: `module = "oci://HOST[:PORT]/REPO:TAG"`
//! (or `@sha256:...`), `corral pull` and `corral push`.
//!
//! The distribution protocol (and its token flow) is oci-client's; which
//! blob is the module is `corral_compiler::image`'s, shared with the
//! containerd shim. What this module adds:
//!
//! - fetching: the manifest (an index is followed to its Wasm platform),
//!   then the module's layer, each checked against its digest, the layer
//!   against `limits.module-size` before and while it is read; the module
//!   lands in `<cache>/oci/sha256/<hex>.wasm`, named by its own SHA-256,
//!   so a module pulled under two names is stored (and compiled) once;
//! - pinning ([`Pins`]): which manifest a reference resolved to, kept in
//!   the state directory, so that corrald restarted while the registry is
//!   down serves the same bytes;
//! - registry settings: `[registries."HOST[:PORT]"]`'s `ca-file`,
//!   `auth-file` (read when a fetch starts, never logged, never handed to a
//!   zygote) and `plain-http`.

mod auth;
mod pins;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use corral_compiler::image::{self, Descriptor, Parsed};
use corral_policy::{OciRef, OciVersion, RegistrySpec};
use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};

pub use auth::read_auth;
pub use pins::{Pin, Pins};

/// Where fetched modules live under the cache directory (no `-` in the
/// name, so the artifact cache's listing and gc skip it).
pub const STORE_DIR: &str = "oci";

/// The registry settings an operation uses: the policy's, or none.
#[derive(Debug, Clone, Default)]
pub struct Registries(pub std::collections::BTreeMap<String, RegistrySpec>);

impl Registries {
    fn spec(&self, registry: &str) -> RegistrySpec {
        self.0.get(registry).cloned().unwrap_or_default()
    }
}

/// A module fetched and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The reference as asked for.
    pub reference: OciRef,
    /// Hex SHA-256 of the manifest (of the index, when the reference named
    /// one): what a tag resolved to, and what `@sha256:` pins.
    pub manifest: String,
    /// Hex SHA-256 of the module: its name in the store and the cache key.
    pub module: String,
    pub size: u64,
    /// The module in the store.
    pub path: PathBuf,
    /// Whether the module's bytes were already in the store.
    pub cached: bool,
}

/// What to show while a large module downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Quiet,
    /// `\r`-updated lines on stderr (a terminal).
    Terminal,
}

/// `<cache>/oci/sha256/<hex>.wasm`.
pub fn store_path(cache_dir: &Path, module_hex: &str) -> PathBuf {
    cache_dir
        .join(STORE_DIR)
        .join("sha256")
        .join(format!("{module_hex}.wasm"))
}

fn client(spec: &RegistrySpec, registry: &str) -> anyhow::Result<Client> {
    ensure_crypto_provider();
    let mut config = ClientConfig {
        protocol: if spec.plain_http {
            ClientProtocol::HttpsExcept(vec![registry.to_string()])
        } else {
            ClientProtocol::Https
        },
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        user_agent: concat!("corral/", env!("CARGO_PKG_VERSION")),
        platform_resolver: None,
        ..ClientConfig::default()
    };
    if let Some(ca) = &spec.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("reading ca-file {}", ca.display()))?;
        config
            .extra_root_certificates
            .push(oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: pem,
            });
    }
    Ok(Client::new(config))
}

/// rustls needs a process-wide crypto provider when none is built in: ring,
/// the one wasmtime-wasi-http's rustls already uses.
fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn credentials(spec: &RegistrySpec, registry: &str) -> anyhow::Result<RegistryAuth> {
    match &spec.auth_file {
        Some(file) => read_auth(file, registry),
        None => Ok(RegistryAuth::Anonymous),
    }
}

fn reference(r: &OciRef) -> Reference {
    match &r.version {
        OciVersion::Tag(t) => {
            Reference::with_tag(r.registry.clone(), r.repository.clone(), t.clone())
        }
        OciVersion::Digest(d) => Reference::with_digest(
            r.registry.clone(),
            r.repository.clone(),
            format!("sha256:{d}"),
        ),
    }
}

/// Fetch `r`: resolve it (a tag is resolved now), follow an index, and
/// store the module verified; a module already stored is not downloaded
/// again. `limit` is the largest module accepted.
pub async fn fetch(
    r: &OciRef,
    registries: &Registries,
    cache_dir: &Path,
    limit: u64,
    progress: Progress,
) -> anyhow::Result<Fetched> {
    let spec = registries.spec(&r.registry);
    let client = client(&spec, &r.registry)?;
    let auth = credentials(&spec, &r.registry)?;
    let top = reference(r);
    let (bytes, digest) = client
        .pull_manifest_raw(&top, &auth, image::MANIFEST_TYPES)
        .await
        .map_err(explain)?;
    let manifest = verified_manifest(&bytes, &digest, r)?;
    let mut parsed = image::parse("", &bytes)?;
    let mut depth = 0;
    let layer: Descriptor = loop {
        match parsed {
            Parsed::Module(layer) => break layer,
            Parsed::Index(entry) => {
                depth += 1;
                if depth > 1 {
                    bail!("an index of indexes is not read");
                }
                let hex = entry.sha256().unwrap_or_default().to_string();
                let inner = r.at_digest(&hex);
                let (bytes, digest) = client
                    .pull_manifest_raw(&reference(&inner), &auth, image::MANIFEST_TYPES)
                    .await
                    .map_err(explain)?;
                verified_manifest(&bytes, &digest, &inner)?;
                parsed = image::parse(&entry.media_type, &bytes)?;
            }
        }
    };
    if layer.size > limit {
        bail!(
            "the module layer is {} bytes, more than limits.module-size ({limit} bytes)",
            layer.size
        );
    }
    let hex = layer
        .sha256()
        .expect("image::parse checks digests")
        .to_string();
    let path = store_path(cache_dir, &hex);
    // Reading and hashing a large module is blocking work.
    let intact = {
        let (path, hex) = (path.clone(), hex.clone());
        tokio::task::spawn_blocking(move || stored_intact(&path, &hex)).await?
    };
    if intact {
        return Ok(Fetched {
            reference: r.clone(),
            manifest,
            module: hex,
            size: layer.size,
            path,
            cached: true,
        });
    }
    let data = download(&client, &top, &layer, limit, progress, r).await?;
    let (data, got) = tokio::task::spawn_blocking(move || {
        let got = hex::encode(Sha256::digest(&data));
        (data, got)
    })
    .await?;
    if got != hex {
        bail!(
            "the module layer does not match its digest (the manifest says sha256:{hex}, the registry sent sha256:{got})"
        );
    }
    let data = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || write_store(&path, &data).map(|()| data)).await??
    };
    Ok(Fetched {
        reference: r.clone(),
        manifest,
        module: hex,
        size: data.len() as u64,
        path,
        cached: false,
    })
}

/// The manifest's own digest, checked: the bytes hash to what the registry
/// said and, for a `@sha256:` reference, to what the reference pins.
fn verified_manifest(bytes: &[u8], said: &str, r: &OciRef) -> anyhow::Result<String> {
    let got = hex::encode(Sha256::digest(bytes));
    if said.strip_prefix("sha256:").is_some_and(|s| s != got) {
        bail!(
            "the manifest does not match its digest (registry says {said}, bytes are sha256:{got})"
        );
    }
    if let OciVersion::Digest(want) = &r.version
        && *want != got
    {
        bail!("the manifest does not match the pinned digest sha256:{want} (got sha256:{got})");
    }
    Ok(got)
}

fn stored_intact(path: &Path, hex: &str) -> bool {
    std::fs::read(path).is_ok_and(|b| hex::encode(Sha256::digest(&b)) == hex)
}

fn write_store(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().expect("store paths have a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    corral_compiler::write_atomic(path, data).with_context(|| format!("writing {}", path.display()))
}

async fn download(
    client: &Client,
    image: &Reference,
    layer: &Descriptor,
    limit: u64,
    progress: Progress,
    r: &OciRef,
) -> anyhow::Result<Vec<u8>> {
    let desc = oci_client::manifest::OciDescriptor {
        media_type: layer.media_type.clone(),
        digest: layer.digest.clone(),
        size: layer.size as i64,
        ..Default::default()
    };
    let mut stream = client
        .pull_blob_stream(image, &desc)
        .await
        .map_err(explain)?;
    let total = stream.content_length.unwrap_or(layer.size);
    let mut data = Vec::with_capacity(usize::try_from(layer.size.min(limit)).unwrap_or(0));
    let started = Instant::now();
    let mut shown = Instant::now();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            if e.to_string().to_ascii_lowercase().contains("digest") {
                anyhow::anyhow!("the module layer does not match its digest: {e}")
            } else {
                anyhow::anyhow!("reading the module layer: {e}")
            }
        })?;
        data.extend_from_slice(&chunk);
        if data.len() as u64 > limit {
            bail!("the module layer is more than limits.module-size ({limit} bytes)");
        }
        if progress == Progress::Terminal && shown.elapsed() > Duration::from_millis(100) {
            shown = Instant::now();
            eprint!("\r{r}: {} / {}", mib(data.len() as u64), mib(total));
            let _ = std::io::stderr().flush();
        }
    }
    if progress == Progress::Terminal {
        eprintln!(
            "\r{r}: {} in {:.1}s        ",
            mib(data.len() as u64),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(data)
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// Publish `source` (a module or component) at `r` as a CNCF Wasm
/// artifact. Returns the manifest's hex digest.
pub async fn push(
    source: &corral_compiler::Source,
    r: &OciRef,
    registries: &Registries,
) -> anyhow::Result<String> {
    let spec = registries.spec(&r.registry);
    let client = client(&spec, &r.registry)?;
    let auth = credentials(&spec, &r.registry)?;
    let wasm = &source.wasm;
    let is_component = source.kind == corral_compiler::ProgramKind::Component;
    let layer_digest = format!("sha256:{}", hex::encode(Sha256::digest(wasm)));
    let config = image::WasmConfig {
        created: None,
        architecture: "wasm".into(),
        os: if is_component { "wasip2" } else { "wasip1" }.into(),
        layer_digests: vec![layer_digest],
    };
    let config = oci_client::client::Config {
        data: serde_json::to_vec(&config)?.into(),
        media_type: image::WASM_CONFIG.to_string(),
        annotations: None,
    };
    let layer = oci_client::client::ImageLayer::new(wasm.to_vec(), image::WASM_LAYER.into(), None);
    let target = reference(r);
    let mut manifest =
        oci_client::manifest::OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
    manifest.media_type = Some(image::OCI_MANIFEST.to_string());
    client
        .push(&target, &[layer], config, &auth, Some(manifest))
        .await
        .map_err(explain)?;
    let digest = client
        .fetch_manifest_digest(&target, &auth)
        .await
        .map_err(explain)?;
    Ok(digest.trim_start_matches("sha256:").to_string())
}

/// oci-client's errors, said the way an operator needs them.
fn explain(e: oci_client::errors::OciDistributionError) -> anyhow::Error {
    use oci_client::errors::OciDistributionError as E;
    let chain = |e: &dyn std::error::Error| {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    };
    match &e {
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => anyhow::anyhow!(
            "the registry refused access (401: wrong or missing credentials; see auth-file): {}",
            chain(&e)
        ),
        E::ImageManifestNotFoundError(_) => {
            anyhow::anyhow!("no such tag or digest in the registry: {}", chain(&e))
        }
        E::RegistryError { envelope, .. } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|x| format!("{:?}: {}", x.code, x.message))
                .collect();
            let unknown = codes
                .iter()
                .any(|c| c.contains("ManifestUnknown") || c.contains("NameUnknown"));
            if unknown {
                anyhow::anyhow!(
                    "no such tag or digest in the registry ({})",
                    codes.join("; ")
                )
            } else if codes
                .iter()
                .any(|c| c.contains("Unauthorized") || c.contains("Denied"))
            {
                anyhow::anyhow!(
                    "the registry refused access (wrong or missing credentials; see auth-file): {}",
                    codes.join("; ")
                )
            } else {
                anyhow::anyhow!("the registry answered: {}", codes.join("; "))
            }
        }
        E::ServerError { code, message, .. } => anyhow::anyhow!(
            "the registry answered {code}{}",
            if message.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", message.trim())
            }
        ),
        E::DigestError(_) => anyhow::anyhow!("a blob does not match its digest: {}", chain(&e)),
        E::RequestError(_) => {
            let text = chain(&e);
            let hint = if text.contains("InvalidContentType") || text.contains("corrupt message") {
                " (it does not speak HTTPS: if it is a plain-HTTP registry, say so with plain-http = true in its [registries.\"HOST:PORT\"] table)"
            } else if text.contains("certificate") || text.contains("UnknownIssuer") {
                " (its certificate is not trusted: give its CA with ca-file in its [registries.\"HOST:PORT\"] table)"
            } else {
                ""
            };
            anyhow::anyhow!("cannot reach the registry: {text}{hint}")
        }
        _ => anyhow::anyhow!("{}", chain(&e)),
    }
}

/// Whether stderr is a terminal (progress is shown only there).
pub fn progress_for_stderr() -> Progress {
    use std::io::IsTerminal as _;
    if std::io::stderr().is_terminal() {
        Progress::Terminal
    } else {
        Progress::Quiet
    }
}
