//! Brings the kernel's mesh maps to the snapshot's mesh view (enrolled pods by address, this
//! node's enrolled pods by cgroup, same-node identity verdicts) and publishes the identity
//! numbers the proxies name a captured connection's two ends with.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    authz::MtlsMode,
    datapath::{
        Datapath, DatapathError,
        mesh::{IdentityVerdict, MeshEndpointSpec, MeshWorkloadSpec, PeerAuthentication},
    },
    identity::SpiffeId,
    model::ObjectName,
    state::{Snapshot, Stores, uid_in_cgroup_name},
};

/// Deepest cgroup directory searched for pods under the attach point (the kubelet's pod cgroups
/// sit 2–3 levels below the root: `kubepods.slice/kubepods-<qos>.slice/…-pod<uid>.slice`).
const MAX_CGROUP_SCAN_DEPTH: usize = 6;

/// Identity number (the kernel's name for a SPIFFE id) → the id, as the mesh maps hold them.
#[derive(Debug, Default)]
pub struct IdentityNumbers {
    by_number: HashMap<u32, SpiffeId>,
}

impl IdentityNumbers {
    /// The SPIFFE id the kernel numbered `n`, if it is a current mesh identity.
    #[must_use]
    pub fn id(&self, n: u32) -> Option<&SpiffeId> {
        self.by_number.get(&n)
    }
}

/// What one sync wrote (for the log and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MeshSyncReport {
    pub endpoints: usize,
    pub workloads: usize,
    pub verdicts: usize,
}

/// The owner's part that writes the mesh maps; lives on the data-path owner thread.
pub struct MeshSync {
    cgroup_root: PathBuf,
    stores: Arc<Stores>,
    /// The workloads last written (the periodic cgroup rescan writes only on a change).
    workloads: Vec<MeshWorkloadSpec>,
}

impl MeshSync {
    /// `cgroup_root` is the programs' attach point; pods' cgroups are found below it.
    #[must_use]
    pub fn new(cgroup_root: PathBuf, stores: Arc<Stores>) -> Self {
        Self {
            cgroup_root,
            stores,
            workloads: Vec::new(),
        }
    }

    /// Writes every mesh map from `snap`. Identity numbers are handed out first (so each
    /// verdict and endpoint names a number the table already holds), then pods by address, this
    /// node's pods by cgroup, and the same-node verdicts.
    pub fn sync(
        &mut self,
        dp: &mut Datapath,
        snap: &Snapshot,
    ) -> Result<MeshSyncReport, DatapathError> {
        let view = &snap.mesh;
        let model = &snap.model;
        let mut number_of: HashMap<&SpiffeId, u32> = HashMap::new();
        for pod in view.enrolled.values() {
            if !number_of.contains_key(&pod.identity) {
                number_of.insert(&pod.identity, dp.identity_number(&pod.identity)?);
            }
        }
        self.stores
            .identity_numbers
            .store(Arc::new(IdentityNumbers {
                by_number: number_of
                    .iter()
                    .map(|(id, n)| (*n, (*id).clone()))
                    .collect(),
            }));
        let mut endpoints = Vec::new();
        for (name, pod) in &view.enrolled {
            let Some(p) = model.pods.get(name) else {
                continue;
            };
            if p.host_network {
                continue;
            }
            for ip in &p.ips {
                endpoints.push(MeshEndpointSpec {
                    addr: *ip,
                    identity: number_of[&pod.identity],
                    enrolled: true,
                    local: p.node == model.node,
                    peer_auth: match pod.mode {
                        MtlsMode::Strict => PeerAuthentication::Strict,
                        MtlsMode::Permissive => PeerAuthentication::Permissive,
                    },
                    default_deny: !pod.policies.allow.is_empty(),
                });
            }
        }
        dp.set_mesh_endpoints(&endpoints)?;
        let workloads = self.scan_workloads(snap, &number_of);
        dp.set_mesh_workloads(&workloads)?;
        let workload_count = workloads.len();
        self.workloads = workloads;
        let entries = view.kernel_entries(
            model,
            &|id| {
                number_of
                    .get(id)
                    .copied()
                    .unwrap_or(crate::authz::UNAUTHENTICATED)
            },
            &|name| {
                view.enrolled
                    .get(name)
                    .and_then(|p| number_of.get(&p.identity).copied())
                    .unwrap_or(crate::authz::UNAUTHENTICATED)
            },
        );
        let verdicts: Vec<IdentityVerdict> = entries.into_iter().map(Into::into).collect();
        dp.set_identity_verdicts(&verdicts)?;
        Ok(MeshSyncReport {
            endpoints: endpoints.len(),
            workloads: workload_count,
            verdicts: verdicts.len(),
        })
    }

    /// Looks for new or removed pod cgroups (a pod's cgroup appears after its object, when the
    /// kubelet starts it) and rewrites the workloads if they changed. Until a pod's cgroup is
    /// listed its connects are not enrolled: see ARCHITECTURE.md, "Enrollment window".
    pub fn rescan(&mut self, dp: &mut Datapath, snap: &Snapshot) -> Result<bool, DatapathError> {
        if !snap.mesh.enrolled.keys().any(|n| {
            snap.model
                .pods
                .get(n)
                .is_some_and(|p| p.node == snap.model.node)
        }) && self.workloads.is_empty()
        {
            return Ok(false);
        }
        let numbers = self.stores.identity_numbers.load();
        let number_of: HashMap<&SpiffeId, u32> =
            numbers.by_number.iter().map(|(n, id)| (id, *n)).collect();
        let workloads = self.scan_workloads(snap, &number_of);
        if workloads == self.workloads {
            return Ok(false);
        }
        dp.set_mesh_workloads(&workloads)?;
        self.workloads = workloads;
        Ok(true)
    }

    /// This node's enrolled pods with a cgroup under the attach point, by cgroup id.
    fn scan_workloads(
        &self,
        snap: &Snapshot,
        number_of: &HashMap<&SpiffeId, u32>,
    ) -> Vec<MeshWorkloadSpec> {
        let local: BTreeMap<&ObjectName, u32> = snap
            .mesh
            .enrolled
            .iter()
            .filter(|(n, _)| {
                snap.model
                    .pods
                    .get(*n)
                    .is_some_and(|p| p.node == snap.model.node && !p.host_network)
            })
            .filter_map(|(n, p)| Some((n, *number_of.get(&p.identity)?)))
            .collect();
        let mut out = Vec::new();
        if local.is_empty() {
            return out;
        }
        let mut found = Vec::new();
        pod_cgroups(&self.cgroup_root, 0, snap, &mut found);
        for (name, cgroup_id) in found {
            if let Some(identity) = local.get(name.as_ref()) {
                out.push(MeshWorkloadSpec {
                    cgroup_id,
                    identity: *identity,
                    enrolled: true,
                });
            }
        }
        out.sort_by_key(|w| w.cgroup_id);
        out.dedup_by_key(|w| w.cgroup_id);
        out
    }
}

/// Every directory below `dir` whose own name names a pod of the snapshot (the kubelet's
/// `…pod<uid>.slice`, or the pod's name for static set-ups), with its cgroup id (inode); the
/// search stops at a pod's directory (its children are its containers).
fn pod_cgroups(dir: &Path, depth: usize, snap: &Snapshot, out: &mut Vec<(Arc<ObjectName>, u64)>) {
    if depth >= MAX_CGROUP_SCAN_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = e.file_name();
        let name = name.to_string_lossy();
        let pod = uid_in_cgroup_name(&name)
            .and_then(|uid| snap.pod_by_uid.get(&crate::state::uid_key(&uid)?))
            .or_else(|| snap.pod_by_name.get(name.as_ref()));
        match pod {
            Some(pod) => {
                if let Ok(md) = e.metadata() {
                    out.push((Arc::clone(pod), md.ino()));
                }
            }
            None => pod_cgroups(&e.path(), depth + 1, snap, out),
        }
    }
}

/// The node address of `node` to tunnel to, preferring the family of `pod`.
#[must_use]
pub fn node_address(snap: &Snapshot, node: &str, pod: IpAddr) -> Option<IpAddr> {
    let addrs = snap.model.nodes.get(node)?;
    addrs
        .iter()
        .find(|a| a.is_ipv4() == pod.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
}
