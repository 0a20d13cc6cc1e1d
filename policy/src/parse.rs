//! Parsers of single values written in a policy (durations, sizes, guest
//! paths): what both the typed spec (its deserializers, [`crate::DirGrant::new`])
//! and the validator use, so that each value has one reading and one
//! error message. They depend on nothing else in the crate.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Remove `.` and resolve `..` lexically, as systemd does for unit paths.
pub(crate) fn clean_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) => Ok(d),
        Err(_) => Err(format!(
            "`{text}` is not a duration: use a number with a unit, e.g. \"100ms\", \"30s\", \"5m\", \"1h\""
        )),
    }
}

/// Check a guest path: absolute, no `..`, normalized (`//` and `.` removed).
pub(crate) fn normalize_guest_path(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!(
            "`{text}` is relative: a guest path must be absolute, e.g. \"/data\""
        ));
    }
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "`{text}` contains `..`: a guest path may not climb out"
                ));
            }
            p if p.contains('\0') => return Err("a guest path may not contain NUL".to_string()),
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// A size written as a string: a number of bytes, or a number with a unit
/// (`"128MiB"`, `"1GiB"`, `"1.5KiB"`).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    match text.trim().parse::<bytesize::ByteSize>() {
        Ok(size) => Ok(size.as_u64()),
        Err(_) => Err(format!(
            "`{text}` is not a size: use bytes or a number with a unit, e.g. \"128MiB\", \"1GiB\", \"512KiB\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths() {
        assert_eq!(normalize_guest_path("/data//x/./y/").unwrap(), "/data/x/y");
        assert_eq!(normalize_guest_path("/").unwrap(), "/");
        assert!(
            normalize_guest_path("data")
                .unwrap_err()
                .contains("relative")
        );
        assert!(
            normalize_guest_path("/data/../etc")
                .unwrap_err()
                .contains("..")
        );
    }
}
