//! Fuzz target: a peer's certificate (DER from the TLS handshake) never panics SPIFFE id extraction.
#![no_main]

use rustls_pki_types::CertificateDer;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::proxy::tls::spiffe_id_of(&CertificateDer::from(data));
});
