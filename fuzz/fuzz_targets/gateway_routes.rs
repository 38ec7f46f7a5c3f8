//! Fuzz target: the gateway's route file parser and compiler (Gateway API YAML) never panics.
#![no_main]

use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = mesh_agent::gateway::config::parse(Path::new("fuzz.yaml"), text);
    }
});
