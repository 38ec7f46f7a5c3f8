//! Test certificates: an rcgen-made CA and a [`CertProvider`] over a fixed map of workload
//! certificates, for the proxies' tests (the real provider is the CA client in `identity`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::{CertProvider, SpiffeId, WorkloadCert};

/// Errors of the test CA (rcgen's, or a root the store refuses).
#[derive(Debug, thiserror::Error)]
pub enum TestCaError {
    #[error("rcgen: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("root store: {0}")]
    Root(#[from] rustls::Error),
}

static SERIAL: AtomicU64 = AtomicU64::new(1);

/// A self-signed root that issues workload certificates.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    root: CertificateDer<'static>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// Validity of a test certificate.
#[derive(Debug, Clone, Copy)]
pub enum Validity {
    /// rcgen's default (1975 to 4096).
    Long,
    /// Ended in 2021.
    Expired,
}

impl TestCa {
    /// A new root named `name`.
    pub fn new(name: &str) -> Result<Self, TestCaError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let root = params.self_signed(&key)?.der().clone();
        Ok(Self { params, key, root })
    }

    /// The root certificate.
    #[must_use]
    pub fn root(&self) -> CertificateDer<'static> {
        self.root.clone()
    }

    /// A root store holding only this root.
    pub fn roots(&self) -> Result<Arc<RootCertStore>, TestCaError> {
        let mut store = RootCertStore::empty();
        store.add(self.root.clone())?;
        Ok(Arc::new(store))
    }

    /// A workload certificate whose URI SAN is `uri` (normally `id`'s; tests of a wrong SAN pass
    /// another), usable for client and server auth, as Istio's are.
    pub fn issue_with_uri(
        &self,
        id: &SpiffeId,
        uri: &str,
        validity: Validity,
    ) -> Result<Arc<WorkloadCert>, TestCaError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        if let Validity::Expired = validity {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let to_system = |secs: i64| {
            u64::try_from(secs).map_or(SystemTime::UNIX_EPOCH, |s| {
                SystemTime::UNIX_EPOCH + Duration::from_secs(s)
            })
        };
        let (not_before, not_after) = (
            to_system(params.not_before.unix_timestamp()),
            to_system(params.not_after.unix_timestamp()),
        );
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Arc::new(WorkloadCert {
            id: id.clone(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            serial: format!("{serial:x}"),
        }))
    }

    /// A valid workload certificate for `id`.
    pub fn issue(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, TestCaError> {
        self.issue_with_uri(id, &id.to_string(), Validity::Long)
    }
}

/// A [`CertProvider`] over certificates the test hands it.
#[derive(Debug)]
pub struct StaticCertProvider {
    trust_domain: String,
    roots: Mutex<Arc<RootCertStore>>,
    certs: Mutex<HashMap<SpiffeId, Arc<WorkloadCert>>>,
}

impl StaticCertProvider {
    #[must_use]
    pub fn new(trust_domain: &str, roots: Arc<RootCertStore>) -> Arc<Self> {
        Arc::new(Self {
            trust_domain: trust_domain.to_owned(),
            roots: Mutex::new(roots),
            certs: Mutex::new(HashMap::new()),
        })
    }

    /// Sets (or replaces) the certificate of `cert.id`.
    pub fn insert(&self, cert: Arc<WorkloadCert>) {
        self.certs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cert.id.clone(), cert);
    }

    /// Replaces the roots.
    pub fn set_roots(&self, roots: Arc<RootCertStore>) {
        *self.roots.lock().unwrap_or_else(PoisonError::into_inner) = roots;
    }
}

impl CertProvider for StaticCertProvider {
    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn workload(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.certs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn roots(&self) -> Arc<RootCertStore> {
        self.roots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
