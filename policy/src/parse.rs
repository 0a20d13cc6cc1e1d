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
        // humantime checks its arithmetic rather than saturate.
        Err(humantime::DurationError::NumberOverflow) => {
            Err(format!("`{text}` is too large for a duration"))
        }
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

/// The largest size: what a TOML integer can hold, so that a size written
/// with a unit is bounded like one written in bytes.
pub(crate) const MAX_SIZE: u64 = i64::MAX as u64;

/// A size written as a string: a number of bytes, or a number with a unit
/// (`"128MiB"`, `"1GiB"`, `"1.5KiB"`). At most [`MAX_SIZE`]: bytesize
/// saturates at 2^64-1 (`"9999999PiB"` would be 16EiB less one byte), so
/// the value is worked out again, exactly, to tell.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let not_a_size = || {
        format!(
            "`{text}` is not a size: use bytes or a number with a unit, e.g. \"128MiB\", \"1GiB\", \"512KiB\""
        )
    };
    let trimmed = text.trim();
    let size = trimmed
        .parse::<bytesize::ByteSize>()
        .map_err(|_| not_a_size())?;
    let digits = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    let factor = match unit.trim_start() {
        "" => 1,
        unit => format!("1{unit}")
            .parse::<bytesize::ByteSize>()
            .map_err(|_| not_a_size())?
            .as_u64(),
    };
    let fits = if number.contains('.') {
        number
            .parse::<f64>()
            .is_ok_and(|n| n * (factor as f64) < MAX_SIZE as f64)
    } else {
        // Only digits: a failed parse is an overflow.
        number
            .parse::<u128>()
            .ok()
            .and_then(|n| n.checked_mul(u128::from(factor)))
            .is_some_and(|bytes| bytes <= u128::from(MAX_SIZE))
    };
    if !fits {
        return Err(format!(
            "`{text}` is too large: a size must be below 8EiB ({MAX_SIZE} bytes)"
        ));
    }
    Ok(size.as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size(" 1.5 KiB ").unwrap(), 1536);
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("7EiB").unwrap(), 7 << 60);
        assert_eq!(parse_size(&MAX_SIZE.to_string()).unwrap(), MAX_SIZE);
        assert!(
            parse_size("12 parsecs")
                .unwrap_err()
                .contains("is not a size")
        );
        // Each of these saturated to 2^64-1 (or rounded to it) before.
        for huge in [
            "9999999PiB",
            "8EiB",
            "16EiB",
            "99999999999999999999999999999999999999999KiB",
            "18446744073709551615",
            "9223372036854775808",
            "10000000000.5GiB",
        ] {
            let err = parse_size(huge)
                .map(|n| n.to_string())
                .unwrap_or_else(|e| e);
            assert!(err.contains("is too large"), "{huge}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        let err = parse_duration("99999999999999999999999s").unwrap_err();
        assert!(err.contains("too large"), "{err}");
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("is not a duration")
        );
    }

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
