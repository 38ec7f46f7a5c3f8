//! Reconciliation: cluster model → desired data-path contents → the minimal set of map updates.
//! Unchanged services are not touched; changed ones are rewritten in place (backend ids and
//! circuit state kept); gone ones removed. Established connections are never disturbed: the
//! kernel translated them at connect time.

use std::{collections::BTreeMap, net::IpAddr};

use mesh_common::service::ServiceKey;
use tracing::{debug, warn};

use crate::{
    datapath::{Datapath, service_key, spec::ServiceSpec},
    model::{ClusterModel, ObjectName},
};

/// What one reconciliation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Service addresses written (new or changed).
    pub applied: usize,
    /// Service addresses removed.
    pub removed: usize,
    /// Service addresses already as desired.
    pub unchanged: usize,
    /// Failures, each naming the service address and the reason; the rest still converged.
    pub errors: Vec<String>,
}

/// Remembers what it wrote so the next model costs only its difference.
#[derive(Debug, Default)]
pub struct Reconciler {
    applied: BTreeMap<ServiceKey, (ObjectName, ServiceSpec)>,
    /// Kernel entries found at start (a restart) whose content is not known yet: each is either
    /// rewritten from the model or removed as stale on the first reconciliation.
    adopted: Vec<ServiceKey>,
    local_ips: Vec<IpAddr>,
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

    /// Brings the data path to `model`.
    pub fn reconcile(&mut self, dp: &mut Datapath, model: &ClusterModel) -> Report {
        let mut report = Report::default();
        let mut desired: BTreeMap<ServiceKey, (ObjectName, ServiceSpec)> = BTreeMap::new();
        for (name, spec) in model.desired_specs() {
            desired.insert(service_key(spec.vip, spec.protocol), (name, spec));
        }
        for (key, (name, spec)) in &desired {
            if self.applied.get(key).is_some_and(|(_, s)| s == spec) {
                report.unchanged += 1;
                continue;
            }
            match dp.apply_service(spec) {
                Ok(_) => {
                    self.applied.insert(*key, (name.clone(), spec.clone()));
                    report.applied += 1;
                }
                Err(e) => report.errors.push(format!(
                    "service {name} {} {:?}: {e}",
                    spec.vip, spec.protocol
                )),
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
                Err(e) => report.errors.push(format!("removing a stale service: {e}")),
            }
            self.applied.remove(&key);
        }
        self.adopted.clear();
        let mut local = model.local_pod_ips();
        local.sort_unstable();
        if local != self.local_ips {
            match dp.set_local_endpoints(&local) {
                Ok(()) => self.local_ips = local,
                Err(e) => report.errors.push(format!("local endpoints: {e}")),
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
    pub fn owner(&self, key: &ServiceKey) -> Option<&(ObjectName, ServiceSpec)> {
        self.applied.get(key)
    }

    /// Everything currently applied.
    pub fn applied(&self) -> impl Iterator<Item = (&ServiceKey, &(ObjectName, ServiceSpec))> {
        self.applied.iter()
    }
}
