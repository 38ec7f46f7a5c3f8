//! Read-mostly state: immutable snapshots that one owner publishes and every other task reads
//! without waiting (ztunnel's stores, linkerd2-proxy's `watch`). The data-path owner publishes
//! the model with its indexes and the kernel's counters; the agent's main loop publishes the
//! sources' health and the current rejections.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Instant, SystemTime},
};

use arc_swap::ArcSwap;

use crate::{
    datapath::{service_key, spec::Protocol},
    discovery::{ObjectRef, Rejection, RejectionKey},
    model::{ClusterModel, ObjectName},
    reconcile::{AppliedService, AppliedServices},
};

/// The model as last reconciled into the kernel, with the indexes readers need.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Counts reconciliations; 0 before the first.
    pub generation: u64,
    /// When it was published.
    pub published: Option<Instant>,
    /// The model without its services' endpoints: what the kernel got from them is in
    /// `services` (the applied specs); a 10,000-service model's 100,000 endpoints would
    /// otherwise be held twice for as long as the snapshot lives. Pods, policies, service
    /// settings and ports stay.
    pub model: Arc<ClusterModel>,
    /// Service addresses in the kernel by their map key (service by VIP).
    pub services: AppliedServices,
    /// Backends over all service addresses.
    pub backends: usize,
    /// Pod by any of its addresses: the pods the model holds whole (this node's, the mesh's).
    /// The three pod indexes share one `Arc` per pod (no string copies), which flows keep to
    /// name their pods without allocating per event. Other nodes' other pods are found in
    /// [`ClusterModel::other_pods`](crate::model::ClusterModel::other_pods) (see
    /// [`Snapshot::pod_by_ip`]).
    pub pod_by_ip: HashMap<IpAddr, Arc<ObjectName>>,
    /// This node's pods by Kubernetes UID (as a number, see [`uid_key`]), as the kubelet
    /// names its cgroup. Only this node's: a pod's cgroup exists only on its node, and
    /// other nodes' pods are 99 % of a large cluster's.
    pub pod_by_uid: HashMap<u128, Arc<ObjectName>>,
    /// This node's pods by bare name (static setups name a pod's cgroup after the pod); the
    /// first in namespace order wins, as a scan of the model did.
    pub pod_by_name: HashMap<PodByName, Arc<ObjectName>>,
    /// Enrollment, SPIFFE id, mTLS mode and authorization policies of every pod (issue 9):
    /// what the proxies' authorization hook and `meshctl policies` read.
    pub mesh: Arc<crate::authz::MeshView>,
}

impl Snapshot {
    /// Indexes `model` and the services the reconciler holds; drops the model's endpoints (see
    /// [`Snapshot::model`]).
    #[must_use]
    pub fn build(generation: u64, mut model: ClusterModel, services: AppliedServices) -> Self {
        for service in model.services.values_mut() {
            service.endpoints = Vec::new();
        }
        let model = Arc::new(model);
        let mut pod_by_ip = HashMap::with_capacity(model.pods.len());
        let mut pod_by_uid = HashMap::new();
        let mut pod_by_name = HashMap::new();
        for (name, pod) in &model.pods {
            let shared = Arc::new(name.clone());
            for ip in &pod.ips {
                pod_by_ip.entry(*ip).or_insert_with(|| Arc::clone(&shared));
            }
            if pod.node != model.node {
                continue;
            }
            if let Some(uid) = uid_key(&pod.uid) {
                pod_by_uid.insert(uid, Arc::clone(&shared));
            }
            pod_by_name
                .entry(PodByName(Arc::clone(&shared)))
                .or_insert(shared);
        }
        let mesh = Arc::new(crate::authz::MeshView::build(&model, &model.mesh.settings));
        Self {
            mesh,
            generation,
            published: Some(Instant::now()),
            backends: services.values().map(|s| s.spec.backends.len()).sum(),
            model,
            services,
            pod_by_ip,
            pod_by_uid,
            pod_by_name,
        }
    }

    /// The pod owning an address: a pod held whole, else one of other nodes' other pods
    /// (a name made for the call: those are not held as names, see
    /// [`OtherPods`](crate::model::OtherPods)).
    #[must_use]
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<ObjectName>> {
        self.pod_by_ip
            .get(&ip)
            .cloned()
            .or_else(|| self.model.other_pods.name_at(ip).map(Arc::new))
    }

    /// The service owning an address and protocol.
    #[must_use]
    pub fn service_by_addr(&self, addr: SocketAddr, protocol: Protocol) -> Option<&AppliedService> {
        self.services
            .get(&service_key(addr, protocol))
            .map(AsRef::as_ref)
    }

    /// The pod whose cgroup is `path` or contains it: the deepest path component that names a
    /// pod — the kubelet's `pod<uid>` (systemd driver: `…-pod<uid with _>.slice`), or the pod's
    /// name (static setups, the test harness).
    #[must_use]
    pub fn pod_by_cgroup_path(&self, path: &Path) -> Option<&Arc<ObjectName>> {
        path.components().rev().find_map(|c| {
            let c = c.as_os_str().to_string_lossy();
            uid_in_cgroup_name(&c)
                .and_then(|uid| self.pod_by_uid.get(&uid_key(&uid)?))
                .or_else(|| self.pod_by_name.get(c.as_ref()))
        })
    }
}

/// A pod's key in [`Snapshot::pod_by_name`]: its bare name, held as the shared name (no copy of
/// the string), looked up by `&str`.
#[derive(Clone, Debug)]
pub struct PodByName(Arc<ObjectName>);

impl PartialEq for PodByName {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for PodByName {}

impl std::hash::Hash for PodByName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so `Borrow<str>` lookups find it.
        self.0.name.as_str().hash(state);
    }
}

impl std::borrow::Borrow<str> for PodByName {
    fn borrow(&self) -> &str {
        &self.0.name
    }
}

/// A Kubernetes UID (`8-4-4-4-12` hex digits, with `-` or the systemd driver's `_`) as the
/// 128-bit number it spells: a map key without a string per pod. `None` for anything else
/// (static pods have no UID; a cgroup name never holds another form).
#[must_use]
pub fn uid_key(uid: &str) -> Option<u128> {
    let mut digits = 0;
    let mut n: u128 = 0;
    for c in uid.chars() {
        if c == '-' || c == '_' {
            continue;
        }
        n = (n << 4) | u128::from(c.to_digit(16)?);
        digits += 1;
        if digits > 32 {
            return None;
        }
    }
    (digits == 32 && uid.len() == 36).then_some(n)
}

/// The pod UID in a kubelet cgroup name (`pod<uid>`, `kubepods-besteffort-pod<uid_>.slice`), in
/// the API's `-` form.
#[must_use]
pub fn uid_in_cgroup_name(name: &str) -> Option<String> {
    let name = name.strip_suffix(".slice").unwrap_or(name);
    let (_, uid) = name.rsplit_once("pod")?;
    // A UID is 36 characters: 32 hex digits and 4 separators.
    (uid.len() == 36
        && uid
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_'))
    .then(|| uid.replace('_', "-"))
}

/// Kernel counters as the data-path owner last read them.
#[derive(Clone, Debug, Default)]
pub struct KernelStats {
    pub counters: Vec<(&'static str, u64)>,
    pub map_full_total: u64,
    /// Bytes of kernel memory in lookup tables (`Datapath::table_bytes`).
    pub lb_table_bytes: u64,
    /// Removed backends whose state slots are quarantined.
    pub retired_backends: u64,
    /// When they were read (`None`: not yet).
    pub read_at: Option<Instant>,
    /// Why the last read failed, if it did.
    pub error: Option<String>,
}

/// The health of one discovery source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Started (or restarted); nothing received from it yet.
    Starting { restarts: u32 },
    /// Sending updates.
    Running { restarts: u32 },
    /// Ended, failed or panicked; restarted after a backoff.
    Down {
        restarts: u32,
        reason: String,
        retry_at: SystemTime,
    },
}

/// One source as status shows it.
#[derive(Clone, Debug)]
pub struct SourceHealth {
    pub state: SourceState,
    /// When a model from this source was last reconciled into the kernel.
    pub last_sync: Option<SystemTime>,
    /// The last failure (kept after a restart, for `meshctl status`).
    pub last_error: Option<String>,
}

impl SourceHealth {
    /// A source just started.
    #[must_use]
    pub fn starting() -> Self {
        Self {
            state: SourceState::Starting { restarts: 0 },
            last_sync: None,
            last_error: None,
        }
    }

    /// How many times it was restarted.
    #[must_use]
    pub fn restarts(&self) -> u32 {
        match &self.state {
            SourceState::Starting { restarts }
            | SourceState::Running { restarts }
            | SourceState::Down { restarts, .. } => *restarts,
        }
    }
}

/// A rejection that currently applies.
#[derive(Clone, Debug)]
pub struct CurrentRejection {
    pub rejection: Rejection,
    /// The source that reported it.
    pub source: String,
    pub since: SystemTime,
}

/// The agent's health: published by the main loop after each change.
#[derive(Clone, Debug, Default)]
pub struct AgentStatus {
    pub ready: bool,
    /// Why not ready (empty when ready).
    pub not_ready_reason: String,
    pub sources: BTreeMap<String, SourceHealth>,
    /// Every current rejection, by file or object field.
    pub rejections: BTreeMap<RejectionKey, CurrentRejection>,
    /// Errors of the last reconciliation (the rest converged).
    pub reconcile_errors: Vec<String>,
    /// When the first model reached the kernel.
    pub first_sync: Option<SystemTime>,
}

impl AgentStatus {
    /// Recomputes readiness: ready once a model is in the kernel and while every source runs.
    pub fn update_readiness(&mut self) {
        let down = self.sources.iter().find_map(|(name, h)| match &h.state {
            SourceState::Running { .. } | SourceState::Starting { restarts: 0 } => None,
            SourceState::Starting { .. } => Some(format!(
                "discovery source {name} restarted, waiting for its first update (last failure: {})",
                h.last_error.as_deref().unwrap_or("unknown")
            )),
            SourceState::Down { reason, .. } => {
                Some(format!("discovery source {name} is down: {reason}"))
            }
        });
        self.not_ready_reason = match (down, self.first_sync) {
            (Some(why), _) => why,
            (None, None) => "no model reconciled yet".to_owned(),
            (None, Some(_)) => String::new(),
        };
        self.ready = self.not_ready_reason.is_empty();
    }

    /// A valid model from `source`: its file parsed whole, so the file's rejection is over
    /// (Envoy and kube-proxy keep serving the last good config while a new one is bad, and
    /// forget the error once a good one arrives); Services it no longer has cannot be wrong.
    pub fn accept_model(&mut self, source: &str, model: &ClusterModel) {
        self.rejections.retain(|key, r| {
            r.source != source
                || match key {
                    RejectionKey::File(_) => false,
                    RejectionKey::Field(object, _) => {
                        object.kind != "Service" || model.services.contains_key(&object.name)
                    }
                }
        });
    }

    /// A rejection from `source`: replaces an older one of the same file or object field.
    pub fn reject(&mut self, source: &str, rejection: Rejection) {
        self.rejections.insert(
            rejection.key(),
            CurrentRejection {
                rejection,
                source: source.to_owned(),
                since: SystemTime::now(),
            },
        );
    }

    /// `object` is valid again: none of its fields' rejections apply any more.
    pub fn resolve(&mut self, object: &ObjectRef) {
        self.rejections
            .retain(|key, _| !matches!(key, RejectionKey::Field(o, _) if o == object));
    }

    /// The newest current rejection, as one line (the `last_rejection` field).
    #[must_use]
    pub fn last_rejection(&self) -> Option<String> {
        self.rejections
            .values()
            .max_by_key(|r| r.since)
            .map(|r| r.rejection.to_string())
    }
}

/// Every snapshot, each swapped whole by its one writer.
#[derive(Default)]
pub struct Stores {
    pub snapshot: ArcSwap<Snapshot>,
    pub kernel: ArcSwap<KernelStats>,
    pub status: ArcSwap<AgentStatus>,
    /// The kernel's identity numbers of the current mesh identities (the owner's mesh sync
    /// writes them; the outbound proxy names a captured connection's ends with them).
    pub identity_numbers: ArcSwap<crate::meshsync::IdentityNumbers>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pod;

    fn model() -> ClusterModel {
        let mut m = ClusterModel {
            node: "a".into(),
            ..ClusterModel::default()
        };
        for (ns, name, uid, ip) in [
            (
                "shop",
                "web-0",
                "0b7c6f0e-1c1a-4e2b-9a8d-2f0c3b4a5d6e",
                "10.1.0.3",
            ),
            ("default", "client", "", "10.1.0.2"),
            ("other", "client", "", "10.1.0.9"),
        ] {
            let name = ObjectName::new(ns, name);
            m.pods.insert(
                name.clone(),
                Arc::new(Pod {
                    name,
                    node: "a".into(),
                    service_account: "sa".into(),
                    ips: vec![ip.parse().unwrap()],
                    uid: uid.into(),
                    host_network: false,
                }),
            );
        }
        m
    }

    #[test]
    fn the_snapshot_keeps_services_but_not_their_endpoints() {
        let mut m = model();
        let name = ObjectName::new("shop", "web");
        m.services.insert(
            name.clone(),
            crate::model::Service {
                name: name.clone(),
                cluster_ips: vec!["10.96.0.10".parse().unwrap()],
                ports: Vec::new(),
                settings: crate::model::ServiceSettings::default(),
                endpoints: vec![crate::model::Endpoint {
                    ip: "10.1.0.3".parse().unwrap(),
                    ports: Arc::default(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node: None,
                    pod: None,
                    weight: 1,
                    hints: crate::model::Hints::default(),
                }],
                internal_traffic_policy: crate::model::TrafficPolicy::default(),
            },
        );
        let s = Snapshot::build(1, m, AppliedServices::new());
        assert!(s.model.services[&name].endpoints.is_empty());
        assert_eq!(s.model.services[&name].cluster_ips.len(), 1);
        assert_eq!(s.model.pods.len(), 3);
    }

    #[test]
    fn indexes_find_pods_by_address_uid_and_name() {
        let s = Snapshot::build(1, model(), AppliedServices::new());
        assert_eq!(
            s.pod_by_ip("10.1.0.3".parse().unwrap()).as_deref(),
            Some(&ObjectName::new("shop", "web-0"))
        );
        assert_eq!(s.pod_by_ip("10.1.0.4".parse().unwrap()), None);
        let web = Some(&ObjectName::new("shop", "web-0"));
        for path in [
            "/sys/fs/cgroup/kubepods/burstable/pod0b7c6f0e-1c1a-4e2b-9a8d-2f0c3b4a5d6e/abc",
            "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b7c6f0e_1c1a_4e2b_9a8d_2f0c3b4a5d6e.slice/cri-containerd-1.scope",
        ] {
            assert_eq!(
                s.pod_by_cgroup_path(Path::new(path)).map(AsRef::as_ref),
                web,
                "{path}"
            );
        }
        // A bare name: the first namespace in order, as the scan it replaces.
        assert_eq!(
            s.pod_by_cgroup_path(Path::new("/sys/fs/cgroup/node-a/client"))
                .map(AsRef::as_ref),
            Some(&ObjectName::new("default", "client"))
        );
        assert_eq!(
            s.pod_by_cgroup_path(Path::new("/sys/fs/cgroup/system.slice")),
            None
        );
    }

    #[test]
    fn only_this_nodes_pods_are_found_by_cgroup() {
        let mut m = model();
        let name = ObjectName::new("shop", "elsewhere");
        m.pods.insert(
            name.clone(),
            Arc::new(Pod {
                name,
                node: "b".into(),
                service_account: "sa".into(),
                ips: vec!["10.2.0.3".parse().unwrap()],
                uid: "1b7c6f0e-1c1a-4e2b-9a8d-2f0c3b4a5d6e".into(),
                host_network: false,
            }),
        );
        let s = Snapshot::build(1, m, AppliedServices::new());
        // Named by address (a tunnel destination, a flow's peer) …
        assert_eq!(
            s.pod_by_ip("10.2.0.3".parse().unwrap()).as_deref(),
            Some(&ObjectName::new("shop", "elsewhere"))
        );
        // … but no cgroup of this node is another node's pod.
        for path in [
            "/sys/fs/cgroup/kubepods/pod1b7c6f0e-1c1a-4e2b-9a8d-2f0c3b4a5d6e",
            "/sys/fs/cgroup/node-a/elsewhere",
        ] {
            assert_eq!(s.pod_by_cgroup_path(Path::new(path)), None, "{path}");
        }
    }

    #[test]
    fn uids_key_by_their_number_in_either_separator_form() {
        let dashes = uid_key("0b7c6f0e-1c1a-4e2b-9a8d-2f0c3b4a5d6e");
        assert!(dashes.is_some());
        assert_eq!(dashes, uid_key("0b7c6f0e_1c1a_4e2b_9a8d_2f0c3b4a5d6e"));
        assert_ne!(dashes, uid_key("0b7c6f0e-1c1a-4e2b-9a8d-2f0c3b4a5d6f"));
        for bad in [
            "",
            "pod-uid-1",
            "0b7c6f0e-1c1a-4e2b-9a8d-2f0c3b4a5d6",
            "0b7c6f0e-1c1a-4e2b-9a8d-2f0c3b4a5d6g",
        ] {
            assert_eq!(uid_key(bad), None, "{bad}");
        }
    }

    fn field(name: &str, field: &str) -> Rejection {
        Rejection::InvalidField {
            object: ObjectRef::new("Service", ObjectName::new("shop", name)),
            field: field.into(),
            message: format!("{field} is bad"),
        }
    }

    #[test]
    fn a_rejection_lasts_until_its_object_is_valid_or_gone() {
        let mut st = AgentStatus::default();
        st.reject("kubernetes", field("web", "a"));
        st.reject("kubernetes", field("web", "b"));
        st.reject("kubernetes", field("api", "a"));
        st.reject("kubernetes", field("api", "a"));
        assert_eq!(st.rejections.len(), 3, "one entry per object field");
        // Unrelated churn: a new model that still has both services changes nothing.
        let mut m = ClusterModel::default();
        for name in ["web", "api"] {
            let name = ObjectName::new("shop", name);
            m.services.insert(
                name.clone(),
                crate::model::Service {
                    name,
                    cluster_ips: vec![],
                    ports: vec![],
                    settings: crate::model::ServiceSettings::default(),
                    internal_traffic_policy: crate::model::TrafficPolicy::default(),
                    endpoints: vec![],
                },
            );
        }
        st.accept_model("kubernetes", &m);
        assert_eq!(st.rejections.len(), 3);
        // web becomes valid: both its entries go, api's stays.
        st.resolve(&ObjectRef::new("Service", ObjectName::new("shop", "web")));
        assert_eq!(st.rejections.len(), 1);
        assert_eq!(
            st.last_rejection().as_deref(),
            Some("Service shop/api: a is bad")
        );
        // api disappears from the model: its rejection goes too.
        m.services.remove(&ObjectName::new("shop", "api"));
        st.accept_model("kubernetes", &m);
        assert!(st.rejections.is_empty());
    }

    #[test]
    fn readiness_follows_the_first_sync_and_every_source() {
        let mut st = AgentStatus::default();
        st.sources.insert("file".into(), SourceHealth::starting());
        st.update_readiness();
        assert_eq!(
            (st.ready, st.not_ready_reason.as_str()),
            (false, "no model reconciled yet")
        );
        st.first_sync = Some(SystemTime::now());
        st.sources.get_mut("file").unwrap().state = SourceState::Running { restarts: 0 };
        st.update_readiness();
        assert!(st.ready, "{}", st.not_ready_reason);
        st.sources.get_mut("file").unwrap().state = SourceState::Down {
            restarts: 0,
            reason: "panicked: boom".into(),
            retry_at: SystemTime::now(),
        };
        st.update_readiness();
        assert!(!st.ready);
        assert_eq!(
            st.not_ready_reason,
            "discovery source file is down: panicked: boom"
        );
    }
}
