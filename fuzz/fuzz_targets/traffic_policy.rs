//! Fuzz target: a `TrafficPolicy` object (JSON from the API server or a file) never panics the parser.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(object) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = mesh_agent::policy::parse::parse(&object);
    }
});
