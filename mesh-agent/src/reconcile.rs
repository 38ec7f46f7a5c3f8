//! Reconciliation: cluster model → desired data-path contents → the minimal set of map updates.
//! Unchanged services are not touched; changed ones are rewritten in place (backend ids and
//! circuit state kept); gone ones removed. Established connections are never disturbed: the
//! kernel translated them at connect time.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use mesh_common::service::ServiceKey;
use tracing::{debug, warn};

use crate::{
    datapath::{
        Datapath, DatapathError, ip_from_be, service_key,
        spec::{Protocol, ServiceSpec},
    },
    model::{ClusterModel, ObjectName},
};

/// One reconciliation step that failed; the others still converged.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("service {service} {vip} {protocol:?}: {source}")]
    ApplyService {
        service: ObjectName,
        vip: SocketAddr,
        protocol: Protocol,
        source: DatapathError,
    },
    #[error("removing the stale service {vip} (protocol {protocol}): {source}")]
    RemoveService {
        vip: SocketAddr,
        protocol: u8,
        source: DatapathError,
    },
    #[error("local endpoints ({count} pod addresses): {source}")]
    LocalEndpoints { count: usize, source: DatapathError },
    #[error("mesh maps (enrolled pods, workloads, identity verdicts): {source}")]
    Mesh { source: DatapathError },
}

impl ReconcileError {
    /// A short, fixed name of the kind of failure (a metric label).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ApplyService { source, .. }
            | Self::RemoveService { source, .. }
            | Self::LocalEndpoints { source, .. }
            | Self::Mesh { source }
                if matches!(source, DatapathError::MapFull { .. }) =>
            {
                "map_full"
            }
            Self::ApplyService { .. } => "apply_service",
            Self::RemoveService { .. } => "remove_service",
            Self::LocalEndpoints { .. } => "local_endpoints",
            Self::Mesh { .. } => "mesh",
        }
    }
}

/// What one reconciliation did.
#[derive(Debug, Default)]
pub struct Report {
    /// Service addresses written (new or changed).
    pub applied: usize,
    /// Service addresses removed.
    pub removed: usize,
    /// Service addresses already as desired.
    pub unchanged: usize,
    /// Failures, each naming the service address and the reason; the rest still converged.
    pub errors: Vec<ReconcileError>,
}

/// A service address as written to the kernel: which service owns it, and its spec. Shared
/// (`Arc`) with the read snapshots, so publishing them copies pointers, not specs.
#[derive(Debug, PartialEq, Eq)]
pub struct AppliedService {
    /// Shared (`Arc`) so flows name their service without copying strings per event.
    pub name: Arc<ObjectName>,
    /// Shared (`Arc`) with the data path's mirror of what it wrote, which reads the backends'
    /// addresses from it instead of keeping a copy.
    pub spec: Arc<ServiceSpec>,
}

/// Every service address in the kernel, by its map key.
pub type AppliedServices = BTreeMap<ServiceKey, Arc<AppliedService>>;

/// Remembers what it wrote so the next model costs only its difference.
#[derive(Debug, Default)]
pub struct Reconciler {
    applied: AppliedServices,
    /// Kernel entries found at start (a restart) whose content is not known yet: each is either
    /// rewritten from the model or removed as stale on the first reconciliation.
    adopted: Vec<ServiceKey>,
    /// What `LOCAL_ENDPOINTS` holds (`None` until the first write: a previous agent may have left
    /// other addresses pinned).
    local_ips: Option<Vec<IpAddr>>,
    /// Same-node bypass off: `LOCAL_ENDPOINTS` is kept empty.
    no_bypass: bool,
}

impl Reconciler {
    /// A reconciler for a data path that may already hold services (pinned maps adopted after
    /// a restart).
    #[must_use]
    pub fn new(dp: &Datapath) -> Self {
        Self {
            adopted: dp.service_keys().copied().collect(),
            ..Self::default()
        }
    }

    /// Turns same-node bypass on or off for this node.
    #[must_use]
    pub fn with_bypass(mut self, on: bool) -> Self {
        self.no_bypass = !on;
        self
    }

    /// Brings the data path to `model`.
    pub fn reconcile(&mut self, dp: &mut Datapath, model: &ClusterModel) -> Report {
        let mut report = Report::default();
        let mut desired: BTreeMap<ServiceKey, (ObjectName, ServiceSpec)> = BTreeMap::new();
        for (name, spec) in model.desired_specs() {
            desired.insert(service_key(spec.vip, spec.protocol), (name, spec));
        }
        for (key, (name, spec)) in &mut desired {
            if self
                .applied
                .get(key)
                .is_some_and(|a| *a.spec == *spec && *a.name == *name)
            {
                report.unchanged += 1;
                continue;
            }
            let shared = Arc::new(std::mem::replace(spec, ServiceSpec::tcp(spec.vip, [])));
            match dp.apply_shared_service(&shared) {
                Ok(_) => {
                    let entry = AppliedService {
                        name: Arc::new(name.clone()),
                        spec: shared,
                    };
                    self.applied.insert(*key, Arc::new(entry));
                    report.applied += 1;
                }
                Err(source) => report.errors.push(ReconcileError::ApplyService {
                    service: name.clone(),
                    vip: shared.vip,
                    protocol: shared.protocol,
                    source,
                }),
            }
        }
        let stale: Vec<ServiceKey> = self
            .applied
            .keys()
            .chain(&self.adopted)
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            match dp.remove_service(&key) {
                Ok(true) => report.removed += 1,
                Ok(false) => {}
                Err(source) => report.errors.push(ReconcileError::RemoveService {
                    vip: SocketAddr::new(
                        ip_from_be(key.addr_be, key.family),
                        u16::from_be(key.port_be),
                    ),
                    protocol: key.proto,
                    source,
                }),
            }
            self.applied.remove(&key);
        }
        self.adopted.clear();
        let mut local = if self.no_bypass {
            Vec::new()
        } else {
            model.local_pod_ips()
        };
        local.sort_unstable();
        if self.local_ips.as_ref() != Some(&local) {
            match dp.set_local_endpoints(&local) {
                Ok(()) => self.local_ips = Some(local),
                Err(source) => report.errors.push(ReconcileError::LocalEndpoints {
                    count: local.len(),
                    source,
                }),
            }
        }
        for e in &report.errors {
            warn!(error = %e, "reconciliation error; the rest converged");
        }
        debug!(
            applied = report.applied,
            removed = report.removed,
            unchanged = report.unchanged,
            "reconciled"
        );
        report
    }

    /// The service that owns a data-path key, and the spec written for it.
    #[must_use]
    pub fn owner(&self, key: &ServiceKey) -> Option<&AppliedService> {
        self.applied.get(key).map(AsRef::as_ref)
    }

    /// Everything currently applied.
    #[must_use]
    pub fn applied(&self) -> &AppliedServices {
        &self.applied
    }
}
