//! Arbitrary bytes as a policy file: loading must return a policy or
//! diagnostics, never panic, and every diagnostic must point inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // A directory that does not exist: module and dir lookups fail cleanly.
    let path = std::path::Path::new("/nonexistent-corral-fuzz/policy.toml");
    let env = corral_policy::Environment::default();
    if let Err(err) = corral_policy::parse_str(text, path, &env) {
        let lines = text.lines().count().max(1) + 1;
        for d in err.diagnostics() {
            assert!(d.line <= lines, "diagnostic beyond the end of the file: {d}");
            let _ = d.to_string();
        }
    }
});
