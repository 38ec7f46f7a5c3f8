//! Fuzz target: the static cluster file (YAML) parser and validator never panics on any bytes.
#![no_main]

use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mesh_agent::discovery::file::parse_full(Path::new("fuzz.yaml"), text, None);
    }
});
