//! Object paths of the per-app objects: `/org/corral/Manager1/app/<label>`.
//!
//! An app name may hold characters an object path element cannot (`-`,
//! `.`), so the name is escaped the way systemd's `bus_label_escape` does
//! it (and `sd_bus_path_encode`): ASCII letters stay, digits stay except as
//! the first character, every other byte becomes `_` and two lowercase hex
//! digits, and the empty name is `_`. `hello-world` is
//! `/org/corral/Manager1/app/hello_2dworld`; a busctl user who knows
//! `/org/freedesktop/systemd1/unit/...` reads it at once.

use std::fmt::Write as _;

use zbus::OwnedObjectPath;

/// The manager object, and the parent of every app object.
pub const MANAGER_PATH: &str = "/org/corral/Manager1";

/// `name` as one object path element.
pub fn escape_label(name: &str) -> String {
    if name.is_empty() {
        return "_".to_string();
    }
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()) {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "_{b:02x}");
        }
    }
    out
}

/// The inverse of [`escape_label`]; `None` for a label it cannot produce.
pub fn unescape_label(label: &str) -> Option<String> {
    if label == "_" {
        return Some(String::new());
    }
    let bytes = label.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = label.get(i + 1..i + 3)?;
            if hex.bytes().any(|c| c.is_ascii_uppercase()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The object path of app `name`.
pub fn app_path(name: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("{MANAGER_PATH}/app/{}", escape_label(name)))
        .expect("an escaped label is a valid object path element")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_systemd() {
        // As systemd: a leading digit is escaped too, hex is lowercase.
        assert_eq!(escape_label("hello"), "hello");
        assert_eq!(escape_label("hello-world"), "hello_2dworld");
        assert_eq!(escape_label("a.b_c"), "a_2eb_5fc");
        assert_eq!(escape_label("9lives"), "_39lives");
        assert_eq!(escape_label("app9"), "app9");
        assert_eq!(escape_label(""), "_");
        assert_eq!(escape_label("é"), "_c3_a9");
    }

    #[test]
    fn unescape_inverts_escape() {
        for name in [
            "hello",
            "hello-world",
            "a.b_c",
            "9lives",
            "",
            "é",
            "_",
            "__x",
        ] {
            assert_eq!(
                unescape_label(&escape_label(name)).as_deref(),
                Some(name),
                "{name:?}"
            );
        }
        assert_eq!(unescape_label("_2"), None);
        assert_eq!(unescape_label("_zz"), None);
        assert_eq!(unescape_label("_2D"), None);
    }

    #[test]
    fn app_paths_are_valid_object_paths() {
        assert_eq!(
            app_path("echo-1").as_str(),
            "/org/corral/Manager1/app/echo_2d1"
        );
        assert_eq!(app_path("").as_str(), "/org/corral/Manager1/app/_");
    }
}
