//! Which blob of an OCI image is the Wasm module: the media-type rules
//! shared by corral's registry client (`corral pull`, corrald) and the
//! containerd shim (which reads the same documents out of containerd's
//! content store). Pure: the callers fetch and verify the bytes.
//!
//! Read:
//! - the CNCF TAG-Runtime Wasm artifact: config
//!   `application/vnd.wasm.config.v0+json`, one `application/wasm` layer
//!   (what `wkg`, `wash`, `oras` and `corral push` write);
//! - runwasi's Wasm images: an OCI image whose layers include
//!   `application/vnd.wasm.content.layer.v1+wasm` (the first such layer is
//!   the module, as runwasi's entrypoint is);
//! - an image index (or docker manifest list), of which the entry for the
//!   `wasip2`, `wasip1` or `wasm` platform (OS or architecture) is taken,
//!   else the one for this host's `linux/ARCH`.
//!
//! Anything else is refused with the media types it has.

use serde::{Deserialize, Serialize};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Every manifest type a registry is asked for.
pub const MANIFEST_TYPES: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// The CNCF Wasm artifact's config and layer.
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
pub const WASM_LAYER: &str = "application/wasm";
/// runwasi's layer type.
pub const RUNWASI_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";

/// Layer media types that are a Wasm module or component.
pub const WASM_LAYER_TYPES: &[&str] = &[
    WASM_LAYER,
    RUNWASI_LAYER,
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
    "application/vnd.w3c.wasm.module.v1+wasm",
];

/// Index platforms (OS or architecture) that mean Wasm, preferred first.
pub const WASM_PLATFORMS: &[&str] = &["wasip2", "wasip1", "wasi", "wasm"];

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    /// `sha256:HEX`.
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// The hex part of a `sha256:` digest; `None` for other algorithms or a
    /// malformed one.
    pub fn sha256(&self) -> Option<&str> {
        let hex = self.digest.strip_prefix("sha256:")?;
        (hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then_some(hex)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
}

/// A manifest or an index, as far as corral reads it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// What a manifest document is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An index: fetch this entry's manifest next.
    Index(Descriptor),
    /// A manifest: this layer is the module.
    Module(Descriptor),
}

/// Why an image has no module corral can run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("the manifest is not JSON: {0}")]
    NotJson(String),
    #[error("`{0}` is not an image manifest or index")]
    NotAManifest(String),
    #[error("the index has no Wasm platform (wasip2, wasip1 or wasm); its platforms: {0}")]
    NoWasmPlatform(String),
    #[error(
        "the image has no Wasm layer (application/wasm or {RUNWASI_LAYER}); config {config}, layers: {layers}"
    )]
    NoWasmLayer { config: String, layers: String },
    #[error(
        "a CNCF Wasm artifact ({WASM_CONFIG}) must have exactly one {WASM_LAYER} layer; it has: {0}"
    )]
    BadArtifact(String),
    #[error("`{0}` is not a sha256 digest")]
    BadDigest(String),
}

/// Read a manifest or index. `media_type` is what the registry or store
/// said it is (the document's own `mediaType` is used when that is empty).
pub fn parse(media_type: &str, bytes: &[u8]) -> Result<Parsed, ImageError> {
    let doc: Document =
        serde_json::from_slice(bytes).map_err(|e| ImageError::NotJson(e.to_string()))?;
    let media_type = if media_type.is_empty() || media_type == "application/json" {
        doc.media_type.clone()
    } else {
        media_type.to_string()
    };
    let is_index = media_type == OCI_INDEX
        || media_type == DOCKER_LIST
        || (media_type.is_empty() && !doc.manifests.is_empty());
    let is_manifest = media_type == OCI_MANIFEST
        || media_type == DOCKER_MANIFEST
        || (media_type.is_empty() && doc.config.is_some());
    if is_index {
        return pick_platform(&doc.manifests).map(Parsed::Index);
    }
    if !is_manifest {
        return Err(ImageError::NotAManifest(if media_type.is_empty() {
            "(no media type)".into()
        } else {
            media_type
        }));
    }
    wasm_layer(doc.config.as_ref(), &doc.layers).map(Parsed::Module)
}

/// The index entry for Wasm; failing that, the one for this host's
/// `linux/ARCH` (runwasi images are also built for a Linux platform, their
/// layers being Wasm all the same: the manifest's layers decide).
fn pick_platform(manifests: &[Descriptor]) -> Result<Descriptor, ImageError> {
    let host_arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    for want in WASM_PLATFORMS {
        if let Some(m) = manifests.iter().find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == *want || p.architecture == *want)
        }) {
            checked(m)?;
            return Ok(m.clone());
        }
    }
    if let Some(m) = manifests.iter().find(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == host_arch)
    }) {
        checked(m)?;
        return Ok(m.clone());
    }
    let found: Vec<String> = manifests
        .iter()
        .map(|m| match &m.platform {
            Some(p) => format!("{}/{}", p.os, p.architecture),
            None => "(none)".to_string(),
        })
        .collect();
    Err(ImageError::NoWasmPlatform(list(&found)))
}

fn wasm_layer(
    config: Option<&Descriptor>,
    layers: &[Descriptor],
) -> Result<Descriptor, ImageError> {
    let config_type = config.map_or("(none)", |c| c.media_type.as_str());
    let types: Vec<String> = layers.iter().map(|l| l.media_type.clone()).collect();
    if config_type == WASM_CONFIG {
        return match layers {
            [one] if one.media_type == WASM_LAYER => checked(one).cloned(),
            _ => Err(ImageError::BadArtifact(list(&types))),
        };
    }
    match layers
        .iter()
        .find(|l| WASM_LAYER_TYPES.contains(&l.media_type.as_str()))
    {
        Some(layer) => checked(layer).cloned(),
        None => Err(ImageError::NoWasmLayer {
            config: config_type.to_string(),
            layers: list(&types),
        }),
    }
}

fn checked(d: &Descriptor) -> Result<&Descriptor, ImageError> {
    match d.sha256() {
        Some(_) => Ok(d),
        None => Err(ImageError::BadDigest(d.digest.clone())),
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// The CNCF Wasm artifact's config (`application/vnd.wasm.config.v0+json`),
/// as `corral push` writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmConfig {
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    pub architecture: String,
    /// `wasip2` for a component, `wasip1` for a core module.
    pub os: String,
    pub layer_digests: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn manifest(config: &str, layers: &[&str]) -> Vec<u8> {
        let layers: Vec<_> = layers
            .iter()
            .map(|t| serde_json::json!({"mediaType": t, "digest": D, "size": 8}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config, "digest": D, "size": 2},
            "layers": layers,
        }))
        .unwrap()
    }

    #[test]
    fn cncf_artifact_and_runwasi_image_are_read() {
        let m = parse("", &manifest(WASM_CONFIG, &[WASM_LAYER])).unwrap();
        assert!(matches!(m, Parsed::Module(d) if d.media_type == WASM_LAYER));
        let m = parse(
            OCI_MANIFEST,
            &manifest(
                "application/vnd.oci.image.config.v1+json",
                &["application/vnd.oci.image.layer.v1.tar", RUNWASI_LAYER],
            ),
        )
        .unwrap();
        assert!(matches!(m, Parsed::Module(d) if d.media_type == RUNWASI_LAYER));
    }

    #[test]
    fn images_without_wasm_name_what_they_have() {
        let e = parse(
            "",
            &manifest(
                "application/vnd.oci.image.config.v1+json",
                &["application/vnd.oci.image.layer.v1.tar+gzip"],
            ),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("no Wasm layer"), "{text}");
        assert!(
            text.contains("application/vnd.oci.image.layer.v1.tar+gzip"),
            "{text}"
        );
        assert!(
            text.contains("application/vnd.oci.image.config.v1+json"),
            "{text}"
        );
        let e = parse("", &manifest(WASM_CONFIG, &[WASM_LAYER, WASM_LAYER])).unwrap_err();
        assert!(matches!(e, ImageError::BadArtifact(_)), "{e}");
        let e = parse("text/html", b"{}").unwrap_err();
        assert_eq!(e, ImageError::NotAManifest("text/html".into()));
    }

    #[test]
    fn an_index_gives_its_wasm_entry() {
        let index = serde_json::json!({
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": D, "size": 1,
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": OCI_MANIFEST, "digest": D.replace('0', "f"), "size": 2,
                 "platform": {"os": "wasip1", "architecture": "wasm"}},
            ],
        });
        let p = parse("", &serde_json::to_vec(&index).unwrap()).unwrap();
        assert!(matches!(p, Parsed::Index(d) if d.size == 2));
        let linux_only = serde_json::json!({
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": D, "size": 1,
                 "platform": {"os": "linux", "architecture": "s390x"}}],
        });
        let e = parse("", &serde_json::to_vec(&linux_only).unwrap()).unwrap_err();
        assert!(e.to_string().contains("linux/s390x"), "{e}");
        // No Wasm platform: this host's Linux entry (its layers decide).
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let host = serde_json::json!({
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": D, "size": 1,
                 "platform": {"os": "linux", "architecture": "s390x-not"}},
                {"mediaType": OCI_MANIFEST, "digest": D, "size": 3,
                 "platform": {"os": "linux", "architecture": arch}},
            ],
        });
        let p = parse("", &serde_json::to_vec(&host).unwrap()).unwrap();
        assert!(matches!(p, Parsed::Index(d) if d.size == 3));
    }
}
