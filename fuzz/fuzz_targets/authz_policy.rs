//! Fuzz target: `AuthorizationPolicy` and `PeerAuthentication` objects (JSON) never panic their parser.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(object) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = mesh_agent::authz::parse::parse_authorization(&object);
        let _ = mesh_agent::authz::parse::parse_peer_authentication(&object);
    }
});
