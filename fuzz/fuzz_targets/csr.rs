//! Fuzz target: a CSR (DER from a node agent) never panics the CA's check.
#![no_main]

use std::sync::LazyLock;

use mesh_agent::identity::SpiffeId;

static EXPECTED: LazyLock<SpiffeId> =
    LazyLock::new(|| SpiffeId::new("cluster.local", "default", "fuzz").expect("a valid SPIFFE id"));

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::identity::csr::check(data, &EXPECTED);
});
