//! Fuzz target: the HBONE CONNECT request's fields and the SNI name, as a peer sends them, never panic the parsers.
#![no_main]

use mesh_agent::proxy::{connect, tls};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // One input carries the four header values and the SNI text, split at 0xff bytes.
    let mut parts = data.split(|b| *b == 0xff);
    let authority = parts.next().unwrap_or_default();
    let forwarded = parts.next().unwrap_or_default();
    let baggage = parts.next().unwrap_or_default();
    let traceparent = parts.next().unwrap_or_default();
    let sni = parts.next().unwrap_or_default();
    if let Ok(text) = std::str::from_utf8(authority) {
        let _ = connect::parse_authority(text);
    }
    let _ = connect::parse_forwarded(forwarded);
    let _ = connect::parse_baggage(baggage);
    let _ = connect::parse_traceparent(traceparent);
    if let Ok(text) = std::str::from_utf8(sni) {
        let _ = tls::id_from_sni(text);
    }
});
