//! The agent's identity manager: one certificate per workload identity with pods on this node,
//! its key made in memory (never written anywhere), renewed at half-life (jittered), retried
//! with backoff, dropped when the identity's last pod leaves. Serves [`CertProvider`].
//!
//! As ztunnel, certificates are per identity (namespace + service account), not per pod: pods
//! sharing a service account on a node share one certificate. The CA is asked on behalf of one
//! of those pods, which it checks is on this node.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rcgen::{KeyPair, PublicKeyData as _};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::{info, warn};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{
    CertProvider, SpiffeId, WorkloadCert,
    ca::cert_facts,
    client::{CaClient, CaClientError, CaEndpoint},
    csr, random_bytes, root_store, verify_workload_chain,
};
use crate::model::{ClusterModel, ObjectName};

/// Settings of the manager.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    pub trust_domain: String,
    /// Lifetime asked of the CA; `None` = the CA's default (24 h).
    pub requested_ttl: Option<Duration>,
    /// First retry delay after a failed request; doubled per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Roots trusted before the CA has sent a bundle (and always: the CA's certificate is
    /// checked against them and the bundle together), e.g. a mounted `ConfigMap`.
    pub anchors: Vec<CertificateDer<'static>>,
}

impl ManagerConfig {
    #[must_use]
    pub fn new(trust_domain: &str, anchors: Vec<CertificateDer<'static>>) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            requested_ttl: None,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            anchors,
        }
    }
}

/// How a certificate stands, as `meshctl identities` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// Requested, none received yet.
    Pending,
    Valid,
    /// Past its renewal time, the new one not received yet (still usable).
    Renewing,
    Expired,
}

impl CertState {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Valid => "valid",
            Self::Renewing => "renewing",
            Self::Expired => "expired",
        }
    }
}

/// One identity's certificate status.
#[derive(Clone, Debug)]
pub struct CertStatus {
    pub id: SpiffeId,
    pub pods: Vec<ObjectName>,
    pub serial: Option<String>,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    pub renew_at: Option<SystemTime>,
    pub state: CertState,
}

/// What the manager has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct ManagerCounters {
    /// Certificates received (first issue and renewals).
    pub issued: AtomicU64,
    /// Requests that failed (each retry counts).
    pub failures: AtomicU64,
}

struct Entry {
    pods: BTreeSet<ObjectName>,
    renew_at: Option<SystemTime>,
    task: tokio::task::JoinHandle<()>,
}

struct Inner {
    config: ManagerConfig,
    client: CaClient,
    certs: RwLock<HashMap<SpiffeId, Arc<WorkloadCert>>>,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    /// The CA's latest bundle (empty until the first answer).
    bundle: ArcSwap<Vec<CertificateDer<'static>>>,
    /// Anchors ∪ bundle, what peers' chains are checked against.
    roots: ArcSwap<rustls::RootCertStore>,
    counters: ManagerCounters,
}

/// The identity manager; cheap to clone (shared).
#[derive(Clone)]
pub struct IdentityManager {
    inner: Arc<Inner>,
}

impl IdentityManager {
    #[must_use]
    pub fn new(config: ManagerConfig, endpoint: CaEndpoint) -> Self {
        let roots = root_store(&config.anchors);
        Self {
            inner: Arc::new(Inner {
                client: CaClient::new(endpoint),
                certs: RwLock::default(),
                entries: Mutex::default(),
                bundle: ArcSwap::from_pointee(Vec::new()),
                roots: ArcSwap::new(roots),
                counters: ManagerCounters::default(),
                config,
            }),
        }
    }

    #[must_use]
    pub fn counters(&self) -> &ManagerCounters {
        &self.inner.counters
    }

    /// Makes the managed set exactly `workloads` (pod → identity): new identities start being
    /// requested, identities whose last pod left stop being renewed and their certificate (and
    /// key) is dropped at once.
    pub fn set_workloads(&self, workloads: &BTreeMap<ObjectName, SpiffeId>) {
        let mut wanted: HashMap<SpiffeId, BTreeSet<ObjectName>> = HashMap::new();
        for (pod, id) in workloads {
            wanted.entry(id.clone()).or_default().insert(pod.clone());
        }
        let mut entries = self.inner.lock_entries();
        entries.retain(|id, e| {
            if wanted.contains_key(id) {
                return true;
            }
            e.task.abort();
            self.inner.write_certs().remove(id);
            info!(identity = %id, "identity left this node: certificate dropped");
            false
        });
        for (id, pods) in wanted {
            if let Some(e) = entries.get_mut(&id) {
                e.pods = pods;
                continue;
            }
            let inner = Arc::clone(&self.inner);
            let task_id = id.clone();
            let task = tokio::spawn(async move { inner.run(task_id).await });
            entries.insert(
                id,
                Entry {
                    pods,
                    renew_at: None,
                    task,
                },
            );
        }
    }

    /// Every managed identity and its certificate's state.
    #[must_use]
    pub fn status(&self) -> Vec<CertStatus> {
        let now = SystemTime::now();
        let entries = self.inner.lock_entries();
        let certs = self.inner.read_certs();
        let mut out: Vec<CertStatus> = entries
            .iter()
            .map(|(id, e)| {
                let cert = certs.get(id);
                let state = match cert {
                    None => CertState::Pending,
                    Some(c) if c.not_after <= now => CertState::Expired,
                    Some(_) if e.renew_at.is_some_and(|t| t <= now) => CertState::Renewing,
                    Some(_) => CertState::Valid,
                };
                CertStatus {
                    id: id.clone(),
                    pods: e.pods.iter().cloned().collect(),
                    serial: cert.map(|c| c.serial.clone()),
                    not_before: cert.map(|c| c.not_before),
                    not_after: cert.map(|c| c.not_after),
                    renew_at: e.renew_at,
                    state,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The current bundle the CA sent (DER roots).
    #[must_use]
    pub fn bundle(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.inner.bundle.load_full()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for e in self
            .entries
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
        {
            e.task.abort();
        }
    }
}

/// Stops every renewal task when the last handle goes (the tasks hold the inner state too, so
/// the `Drop` of `Inner` alone would never run while they live).
impl Drop for IdentityManager {
    fn drop(&mut self) {
        // Two owners at least while tasks run: this handle and each task's. When only this
        // handle and the tasks remain, nothing outside can reach the manager any more.
        let entries = self.inner.lock_entries();
        let tasks = entries.len();
        if Arc::strong_count(&self.inner) <= tasks + 1 {
            for e in entries.values() {
                e.task.abort();
            }
        }
    }
}

impl Inner {
    fn lock_entries(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read_certs(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SpiffeId, Arc<WorkloadCert>>> {
        self.certs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_certs(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<SpiffeId, Arc<WorkloadCert>>> {
        self.certs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One identity's life: request, keep, renew at half-life, retry with backoff.
    async fn run(self: Arc<Self>, id: SpiffeId) {
        let mut backoff = self.config.backoff_initial;
        loop {
            let Some(pod) = self
                .lock_entries()
                .get(&id)
                .and_then(|e| e.pods.first().cloned())
            else {
                return;
            };
            match self.fetch(&id, &pod).await {
                Ok(cert) => {
                    backoff = self.config.backoff_initial;
                    let renew_at = renewal_time(cert.not_before, cert.not_after);
                    info!(identity = %id, serial = cert.serial, not_after = %humantime::format_rfc3339_seconds(cert.not_after), "certificate received");
                    self.counters.issued.fetch_add(1, Ordering::Relaxed);
                    {
                        // Stored under the entries lock, and only while the identity is still
                        // wanted: `set_workloads` removes entry and certificate under the same
                        // lock, so a certificate arriving as its last pod leaves is never kept.
                        let mut entries = self.lock_entries();
                        let Some(e) = entries.get_mut(&id) else {
                            return;
                        };
                        e.renew_at = Some(renew_at);
                        self.write_certs().insert(id.clone(), Arc::new(cert));
                    }
                    let wait = renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .max(Duration::from_millis(100));
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    warn!(identity = %id, pod = %pod, error = %e, retry_in = ?backoff, "certificate request failed");
                    tokio::time::sleep(jitter(backoff, 0.2)).await;
                    backoff = (backoff * 2).min(self.config.backoff_max);
                }
            }
        }
    }

    /// A new key, a CSR, the CA's answer checked (chain verifies against the bundle it came
    /// with, names `id`, and certifies our key).
    async fn fetch(&self, id: &SpiffeId, pod: &ObjectName) -> Result<WorkloadCert, FetchError> {
        let key = KeyPair::generate().map_err(|e| FetchError::Local(e.to_string()))?;
        let csr = csr::request(id, &key).map_err(|e| FetchError::Local(e.to_string()))?;
        let mut trust = self.config.anchors.clone();
        for r in self.bundle.load().iter() {
            if !trust.contains(r) {
                trust.push(r.clone());
            }
        }
        let signed = self
            .client
            .create_certificate(pod, id, csr, self.config.requested_ttl, &trust)
            .await?;
        let got =
            verify_workload_chain(root_store(&signed.roots), &signed.chain, SystemTime::now())
                .map_err(|e| FetchError::Answer(e.to_string()))?;
        if &got != id {
            return Err(FetchError::Answer(format!(
                "certificate names {got}, not {id}"
            )));
        }
        let leaf = &signed.chain[0];
        let (_, parsed) =
            X509Certificate::from_der(leaf).map_err(|e| FetchError::Answer(e.to_string()))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(FetchError::Answer(
                "certificate is not for our key".to_owned(),
            ));
        }
        let (not_before, not_after, serial) = cert_facts(leaf).map_err(FetchError::Answer)?;
        // The bundle is taken from the CA's answer: a root added for a rotation is trusted
        // from now on, a root removed after the overlap stops being trusted.
        let mut all = self.config.anchors.clone();
        for r in &signed.roots {
            if !all.contains(r) {
                all.push(r.clone());
            }
        }
        self.roots.store(root_store(&all));
        self.bundle.store(Arc::new(signed.roots));
        Ok(WorkloadCert {
            id: id.clone(),
            chain: signed.chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            serial,
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Ca(#[from] CaClientError),
    #[error("invalid answer from the CA: {0}")]
    Answer(String),
    #[error("{0}")]
    Local(String),
}

/// Half-life, pulled earlier by up to 5 % of the lifetime at random so a node's certificates
/// (all issued at its start) do not all renew in the same instant (Istio's agent jitters too).
fn renewal_time(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    let early = life.mul_f64(0.05 * unit_random());
    not_before + life / 2 - early
}

/// `d` ± `frac` at random.
fn jitter(d: Duration, frac: f64) -> Duration {
    d.mul_f64(1.0 - frac + 2.0 * frac * unit_random())
}

fn unit_random() -> f64 {
    let mut b = [0u8; 4];
    random_bytes(&mut b);
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

impl CertProvider for IdentityManager {
    fn trust_domain(&self) -> &str {
        &self.inner.config.trust_domain
    }

    /// An expired certificate is not offered (a peer would refuse it); the renewal task keeps
    /// retrying and the next handshake after it succeeds gets the new one.
    fn workload(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.inner
            .read_certs()
            .get(id)
            .filter(|c| c.not_after > SystemTime::now())
            .cloned()
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        self.inner.roots.load_full()
    }
}

/// The identities of this node's pods (host-network pods have the node's identity, not their
/// own, and get none). Pods whose service account does not make a valid id are logged and
/// skipped. Enrollment (which namespaces are in the mesh) is the caller's filter.
#[must_use]
pub fn local_workloads(model: &ClusterModel, trust_domain: &str) -> BTreeMap<ObjectName, SpiffeId> {
    model
        .pods
        .iter()
        .filter(|(_, p)| p.node == model.node && !p.host_network)
        .filter_map(|(name, p)| {
            match SpiffeId::new(trust_domain, &name.namespace, &p.service_account) {
                Ok(id) => Some((name.clone(), id)),
                Err(e) => {
                    warn!(pod = %name, error = %e, "pod gets no identity");
                    None
                }
            }
        })
        .collect()
}

/// The identities of this node's enrolled pods (namespace labelled into the mesh, pod not opted
/// out), as the snapshot's mesh view names them: only these get certificates, as ztunnel
/// fetches certificates only for workloads in ambient mode.
#[must_use]
pub fn enrolled_local_workloads(snap: &crate::state::Snapshot) -> BTreeMap<ObjectName, SpiffeId> {
    snap.mesh
        .enrolled
        .iter()
        .filter(|(name, _)| {
            snap.model
                .pods
                .get(*name)
                .is_some_and(|p| p.node == snap.model.node && !p.host_network)
        })
        .map(|(name, p)| (name.clone(), p.identity.clone()))
        .collect()
}

/// The agent process's manager, set once by `main` when a CA is configured (`--ca-address`).
/// A process-wide slot rather than a field of `app::Shared` so the admin API, the proxies and
/// the model follower reach it without every part's constructor changing in this round; the
/// set-once `OnceLock` is what makes "one manager per agent" hold.
static GLOBAL: std::sync::OnceLock<IdentityManager> = std::sync::OnceLock::new();

/// Installs the agent's manager; `false` if one was installed already (the first stays).
pub fn install(manager: IdentityManager) -> bool {
    GLOBAL.set(manager).is_ok()
}

/// The agent's manager, if a CA is configured.
#[must_use]
pub fn global() -> Option<&'static IdentityManager> {
    GLOBAL.get()
}

impl IdentityManager {
    /// Keeps the managed identities equal to the enrolled local pods of the published snapshot: checks the
    /// snapshot every 500 ms and recomputes only when the model changed (a new `Arc`).
    pub async fn follow(self, stores: Arc<crate::state::Stores>) {
        let mut last: Option<Arc<ClusterModel>> = None;
        loop {
            let snap = stores.snapshot.load_full();
            if last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &snap.model)) {
                self.set_workloads(&enrolled_local_workloads(&snap));
                last = Some(Arc::clone(&snap.model));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_half_life_pulled_earlier_by_at_most_five_percent() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let na = nb + Duration::from_secs(100);
        for _ in 0..100 {
            let t = renewal_time(nb, na);
            assert!(t <= nb + Duration::from_secs(50));
            assert!(t >= nb + Duration::from_secs(45));
        }
    }
}
