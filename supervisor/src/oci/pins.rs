//! What each `oci://` reference resolved to, kept in
//! `<state>/oci-pins.json`: corrald resolves tags only when it starts or
//! reloads, and when the registry cannot be reached then, it serves what the
//! reference last resolved to (the module is still in the store).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One reference's resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Pin {
    /// Hex SHA-256 of the manifest (or index).
    pub manifest: String,
    /// Hex SHA-256 of the module.
    pub module: String,
}

/// The pins file.
#[derive(Debug, Clone, Default)]
pub struct Pins {
    path: PathBuf,
    pins: BTreeMap<String, Pin>,
}

impl Pins {
    pub const FILE: &str = "oci-pins.json";

    /// Read `<state_dir>/oci-pins.json` (empty if absent or unreadable: the
    /// pins are a fallback, not a requirement).
    pub fn load(state_dir: &Path) -> Pins {
        let path = state_dir.join(Self::FILE);
        let pins = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Pins { path, pins }
    }

    pub fn get(&self, reference: &str) -> Option<&Pin> {
        self.pins.get(reference)
    }

    /// Record a resolution and write the file (atomically).
    pub fn set(&mut self, reference: &str, pin: Pin) -> anyhow::Result<()> {
        if self.pins.get(reference) == Some(&pin) {
            return Ok(());
        }
        self.pins.insert(reference.to_string(), pin);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        corral_compiler::write_atomic(&self.path, &serde_json::to_vec_pretty(&self.pins)?)?;
        Ok(())
    }
}
