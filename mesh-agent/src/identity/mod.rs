//! Workload identity: SPIFFE ids, the certificates that carry them, and the CA that signs them.

pub mod spiffe;

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
