//! Workload identity: SPIFFE ids, the certificates that carry them, and the CA that signs them.

pub mod auth;
pub mod ca;
pub mod cli;
pub mod client;
pub mod csr;
pub mod manager;
pub mod server;
pub mod spiffe;
pub mod tls;

/// The CA's gRPC API (`proto/ca.proto`).
#[allow(clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("kernmesh.ca.v1");
}

use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use spiffe::{SpiffeId, SpiffeIdError};

/// One workload's current certificate: the leaf (URI SAN = `id`) first, then intermediates up to
/// (not including) the root, and its private key, which only ever lives in memory.
#[derive(Debug)]
pub struct WorkloadCert {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial number, as `meshctl identities` shows it.
    pub serial: String,
}

/// What the proxies need from the identity side. Every handshake asks again, so a rotated
/// certificate or a new root is used from the next handshake on, without touching live streams.
pub trait CertProvider: Send + Sync + 'static {
    /// The trust domain this node's workloads belong to; peers outside it are refused.
    fn trust_domain(&self) -> &str;
    /// The current certificate of a workload on this node, or `None` if it has none (yet).
    fn workload(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>>;
    /// The roots peers' chains must lead to: more than one during a root rotation's overlap.
    fn roots(&self) -> Arc<rustls::RootCertStore>;
}

/// Fills `buf` from the process's TLS provider's CSPRNG (ring's `SystemRandom`).
///
/// # Panics
/// If the operating system's random source fails, which nothing here can recover from.
pub fn random_bytes(buf: &mut [u8]) {
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
        .expect("the OS random source works");
}

/// Why a peer's certificate chain is not a valid workload certificate.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("empty certificate chain")]
    Empty,
    #[error("chain does not verify against the root bundle: {0}")]
    Chain(String),
    #[error("leaf certificate: {0}")]
    Leaf(String),
}

/// Verifies `chain` (leaf first) as a client certificate against `roots` at `now` (signatures,
/// validity, client-auth usage) and returns the SPIFFE id of its single URI SAN.
pub fn verify_workload_chain(
    roots: Arc<rustls::RootCertStore>,
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<SpiffeId, VerifyError> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::Empty)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots)
        .build()
        .map_err(|e| VerifyError::Chain(e.to_string()))?;
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    verifier
        .verify_client_cert(
            leaf,
            intermediates,
            rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)),
        )
        .map_err(|e| VerifyError::Chain(e.to_string()))?;
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| VerifyError::Leaf(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| VerifyError::Leaf(e.to_string()))?
        .ok_or_else(|| VerifyError::Leaf("no subjectAltName".to_owned()))?;
    match san.value.general_names.as_slice() {
        [GeneralName::URI(uri)] => uri
            .parse()
            .map_err(|e: SpiffeIdError| VerifyError::Leaf(format!("URI SAN {uri:?}: {e}"))),
        other => Err(VerifyError::Leaf(format!(
            "expected exactly one URI SAN, found {other:?}"
        ))),
    }
}

/// A root store of `certs`, skipping any that do not parse as a trust anchor.
#[must_use]
pub fn root_store(certs: &[CertificateDer<'static>]) -> Arc<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    let _ = store.add_parsable_certificates(certs.iter().cloned());
    Arc::new(store)
}
