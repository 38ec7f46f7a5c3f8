//! The source's stores: each watched kind as the watcher last listed it, reduced on arrival to
//! what the model reads.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A Service reduced, when it arrives, to what the model reads. Kept instead of the API object
/// (whose metadata and spec structs alone are over a kilobyte each). No annotations: settings
/// come only from `TrafficPolicy` objects.
#[derive(Clone, Debug)]
pub(super) struct StoredService {
    /// The Service's own setting: `ClientIP` affinity from its spec ([`spec_affinity`]; the
    /// rest of [`ServiceSettings`] comes from `TrafficPolicy` objects). 16 bytes, where the
    /// whole settings are 88 (10,000 services in the benchmark).
    pub(super) affinity_timeout: Option<Duration>,
    /// Whether the Service had a spec at all.
    pub(super) has_spec: bool,
    pub(super) cluster_ips: Vec<IpAddr>,
    pub(super) ports: Vec<ServicePort>,
    pub(super) internal_traffic_policy: model::TrafficPolicy,
    pub(super) traffic_distribution: Option<String>,
    /// Labelled `kernmesh.io/dataplane-mode=none`: traffic to it stays out of the mesh.
    pub(super) mesh_opt_out: bool,
}

impl StoredService {
    /// The Service's own settings, as [`service_settings`] reads them from its spec.
    pub(super) fn settings(&self) -> ServiceSettings {
        ServiceSettings {
            affinity_timeout: self.affinity_timeout,
            ..ServiceSettings::default()
        }
    }

    pub(super) fn new(svc: &K8sService) -> Self {
        let spec = svc.spec.as_ref();
        Self {
            affinity_timeout: spec_affinity(spec),
            has_spec: spec.is_some(),
            cluster_ips: spec.map(cluster_ips).unwrap_or_default(),
            ports: spec.map(service_ports).unwrap_or_default(),
            internal_traffic_policy: match spec.and_then(|s| s.internal_traffic_policy.as_deref()) {
                Some("Local") => model::TrafficPolicy::Local,
                _ => model::TrafficPolicy::Cluster,
            },
            traffic_distribution: spec.and_then(|s| s.traffic_distribution.clone()),
            mesh_opt_out: crate::authz::DataplaneMode::from_labels(svc.labels())
                == Some(crate::authz::DataplaneMode::None),
        }
    }
}

/// Node and zone names of slice endpoints, one allocation each however many endpoints name
/// them, each endpoint naming them by a 4-byte number.
pub(super) type Names = Interner<str>;

impl Default for Names {
    fn default() -> Self {
        Self::new()
    }
}

impl Names {
    /// The number of `name` (interned if new), never zero: `Option` of it is 4 bytes.
    pub(super) fn number(&mut self, name: &str) -> std::num::NonZeroU32 {
        std::num::NonZeroU32::new(self.id(name).saturating_add(1))
            .unwrap_or(std::num::NonZeroU32::MIN)
    }

    /// The name of a [`Names::number`] of these names.
    pub(super) fn name(&self, number: std::num::NonZeroU32) -> &Arc<str> {
        self.get(number.get() - 1)
    }
}

/// One address of an `EndpointSlice` endpoint, as stored (see [`StoredSlice`]); 100,000 of
/// them for 10,000 services, so names are shared, and pod names and hints (rare) kept by the
/// slice: 32 bytes (ten of them fill a 320-byte allocation; 40 bytes each took 448).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SliceEndpoint {
    pub(super) ip: IpAddr,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    /// In [`Names`] (as is `zone`).
    pub(super) node: Option<std::num::NonZeroU32>,
    /// Where the `targetRef` pod's name ends in [`StoredSlice::pods`] (it starts where the
    /// previous endpoint's ends); an empty name is no `targetRef` pod (a pod name is never
    /// empty). Four bytes, where a `Box<str>` per endpoint is 16 and an allocation.
    pub(super) pod_end: u32,
    pub(super) zone: Option<std::num::NonZeroU32>,
}

/// An `EndpointSlice` reduced, when it arrives, to what the model reads: the service it belongs
/// to, its ports and one entry per endpoint address. Kept instead of the API object, which
/// carries several times more (every `targetRef` field, an `Option` per condition and hint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct StoredSlice {
    /// The `kubernetes.io/service-name` label.
    pub(super) service: Option<String>,
    /// (name, protocol, port) as listed; SCTP and invalid numbers already dropped.
    pub(super) ports: Vec<(String, Protocol, u16)>,
    pub(super) endpoints: Vec<SliceEndpoint>,
    /// The endpoints' `targetRef` pods back to back (see [`SliceEndpoint::pod_end`]): each its
    /// name, or `namespace/name` when its namespace is not the slice's (a name never holds
    /// `/`).
    pub(super) pods: String,
    /// The endpoints that carry hints (few do): (index in `endpoints`, hints), in index
    /// order.
    pub(super) hints: Vec<(u32, model::Hints)>,
}

impl StoredSlice {
    /// Reads a slice (`FQDN` slices and unparsable addresses give no endpoints).
    pub(super) fn new(slice: &EndpointSlice, names: &mut Names) -> Self {
        let mut out = Self {
            service: slice.labels().get(SERVICE_NAME_LABEL).cloned(),
            ports: slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.name.clone().unwrap_or_default(),
                        protocol(p.protocol.as_deref())?,
                        port_number(p.port?)?,
                    ))
                })
                .collect(),
            endpoints: Vec::new(),
            pods: String::new(),
            hints: Vec::new(),
        };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            return out;
        }
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        out.endpoints.reserve_exact(slice.endpoints.len());
        for ep in &slice.endpoints {
            // Absent conditions read as kube-proxy reads them: ready and serving, not terminating.
            let conditions = ep.conditions.as_ref();
            let hinted = ep.hints.as_ref();
            let hints = model::Hints {
                zones: hinted
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                nodes: hinted
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
            };
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| Some((r.namespace.as_deref(), r.name.as_deref()?)))
                .filter(|(_, name)| !name.is_empty());
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    warn!(address = %addr, slice = %slice.name_any(), "endpoint address is not an IP; skipped");
                    continue;
                };
                match pod {
                    Some((Some(ns), name)) if ns != namespace => {
                        out.pods.push_str(ns);
                        out.pods.push('/');
                        out.pods.push_str(name);
                    }
                    Some((_, name)) => out.pods.push_str(name),
                    None => {}
                }
                if hints != model::Hints::default() {
                    // A slice holds at most 1,000 endpoints.
                    let index = u32::try_from(out.endpoints.len()).unwrap_or(u32::MAX);
                    out.hints.push((index, hints.clone()));
                }
                out.endpoints.push(SliceEndpoint {
                    ip,
                    ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                    serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                    terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                    node: ep.node_name.as_deref().map(|n| names.number(n)),
                    // Past 4 GiB of pod names in one slice the ends would wrap: a slice holds
                    // at most 1,000 endpoints.
                    pod_end: u32::try_from(out.pods.len()).unwrap_or(u32::MAX),
                    zone: ep.zone.as_deref().map(|z| names.number(z)),
                });
            }
        }
        // `filter_map` and pushes leave spare places (4 for a slice's one port): the store
        // keeps every slice.
        out.ports.shrink_to_fit();
        out.endpoints.shrink_to_fit();
        out.pods.shrink_to_fit();
        out.hints.shrink_to_fit();
        out
    }

    /// The hints of endpoint `index`, if it has any.
    fn hints(&self, index: usize) -> Option<&model::Hints> {
        let i = self
            .hints
            .binary_search_by_key(&index, |(i, _)| *i as usize)
            .ok()?;
        Some(&self.hints[i].1)
    }

    /// The `targetRef` pod of endpoint `index` as stored: `name` or `namespace/name`.
    fn pod(&self, index: usize) -> Option<&str> {
        let start = index
            .checked_sub(1)
            .map_or(0, |prev| self.endpoints[prev].pod_end as usize);
        let end = self.endpoints[index].pod_end as usize;
        self.pods.get(start..end).filter(|p| !p.is_empty())
    }

    /// The model endpoints of this slice (in `namespace`) for a service with `service_ports`
    /// (see [`slice_endpoints`]).
    pub(super) fn endpoints(
        &self,
        names: &Names,
        namespace: &str,
        service_ports: &[ServicePort],
        traffic_distribution: Option<&str>,
    ) -> Vec<Endpoint> {
        // One map per slice, shared by its endpoints.
        let ports: Arc<BTreeMap<String, u16>> = Arc::new(
            self.ports
                .iter()
                .filter(|(name, protocol, _)| {
                    service_ports
                        .iter()
                        .any(|sp| &sp.name == name && sp.protocol == *protocol)
                })
                .map(|(name, _, port)| (name.clone(), *port))
                .collect(),
        );
        let same_node = traffic_distribution == Some("PreferSameNode");
        let same_zone =
            same_node || matches!(traffic_distribution, Some("PreferClose" | "PreferSameZone"));
        self.endpoints
            .iter()
            .enumerate()
            .map(|(index, ep)| {
                let mut hints = self.hints(index).cloned().unwrap_or_default();
                if same_zone
                    && hints.zones.is_empty()
                    && let Some(zone) = ep.zone
                {
                    hints.zones.insert(names.name(zone).to_string());
                }
                if same_node
                    && hints.nodes.is_empty()
                    && let Some(node) = ep.node
                {
                    hints.nodes.insert(names.name(node).to_string());
                }
                Endpoint {
                    ip: ep.ip,
                    ports: Arc::clone(&ports),
                    ready: ep.ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                    node: ep.node.map(|n| Arc::clone(names.name(n))),
                    pod: self.pod(index).map(|p| match p.split_once('/') {
                        Some((ns, name)) => ObjectName::new(ns, name),
                        None => ObjectName::new(namespace, p),
                    }),
                    weight: 1,
                    hints,
                }
            })
            .collect()
    }
}

/// Values interned once and named by a number: the namespaces, nodes and service accounts of
/// pods (a few hundred distinct among 100,000 pods) and their nodes' address lists. Never
/// shrinks: it grows with the distinct values ever seen, not with the pods.
pub(super) struct Interner<T: ?Sized> {
    list: Vec<Arc<T>>,
    index: std::collections::HashMap<Arc<T>, u32>,
}

impl<T: ?Sized + Eq + std::hash::Hash> Interner<T> {
    pub(super) fn new() -> Self {
        Self {
            list: Vec::new(),
            index: std::collections::HashMap::new(),
        }
    }

    /// The number of `value`, interning it if new.
    pub(super) fn id(&mut self, value: &T) -> u32
    where
        for<'a> Arc<T>: From<&'a T>,
    {
        if let Some(&id) = self.index.get(value) {
            return id;
        }
        let shared: Arc<T> = Arc::from(value);
        // Four billion distinct namespaces, nodes or address lists do not happen; past that
        // the last number would be shared (a wrong name, never a panic).
        let id = u32::try_from(self.list.len()).unwrap_or(u32::MAX);
        self.list.push(Arc::clone(&shared));
        self.index.insert(shared, id);
        id
    }

    /// The number of `value` if it is interned.
    pub(super) fn find(&self, value: &T) -> Option<u32> {
        self.index.get(value).copied()
    }

    /// The value of number `id`, which [`Interner::id`] of this interner gave (every such
    /// number stays valid: nothing is ever removed).
    pub(super) fn get(&self, id: u32) -> &Arc<T> {
        &self.list[id as usize]
    }
}

/// A pod's key in the pod store: its namespace (interned) and name — 24 bytes and one
/// allocation, where an [`ObjectName`] is 48 and two.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct PodKey {
    pub(super) namespace: u32,
    pub(super) name: Box<str>,
}

/// What the model reads of a Pod, stored instead of the Pod: every node's pods are watched
/// (100,000 in the control-plane benchmark), and a `k8s-openapi` `Pod` held inline in the store
/// is ≈ 2 KB of mostly empty spec and status fields before any of its strings. Converted once
/// per watch event. Pods not scheduled yet or finished are not stored (the model has no use
/// for them).
#[derive(Clone, Debug)]
pub(super) enum StoredPod {
    /// This node's pod, or another node's that carries the dataplane-mode label: held whole,
    /// and shared (`Arc`) with the model.
    Whole(Box<WholePod>),
    /// Another node's pod without that label (nearly all of a large cluster's): 20 bytes in
    /// the table ([`OtherRow`]). The model names it by address ([`model::OtherPods`]), or makes it whole if its
    /// namespace is in the mesh.
    Other(OtherPod),
}

#[derive(Clone, Debug)]
pub(super) struct WholePod {
    /// [`pod_of`]'s result.
    pub(super) pod: Arc<model::Pod>,
    /// The labels the model keeps: every label of this node's pods (policy selectors), only
    /// the enrollment label of other nodes' pods (a pod elsewhere may opt out of the mesh).
    pub(super) labels: BTreeMap<String, String>,
    /// `status.hostIPs` (else `status.hostIP`): where the agent of the pod's node is reached.
    pub(super) host_ips: Vec<IpAddr>,
}

/// Another node's pod, as numbers: at most one address per family (the API allows no more;
/// a pod listing more is stored whole), its placement (node and node addresses) and service
/// account interned in [`PodStore`]. Held so while a change waits for the next table; the
/// table keeps it as an [`OtherRow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct OtherPod {
    pub(super) v4: Option<std::net::Ipv4Addr>,
    pub(super) v6: Option<std::net::Ipv6Addr>,
    /// `PodStore::placements`' number of (node, node addresses).
    pub(super) placement: u32,
    pub(super) service_account: u32,
    pub(super) host_network: bool,
}

/// An [`OtherPod`] in the table: 20 bytes instead of 36 (issue 8: 99,000 of the benchmark's
/// 100,000 pods are such rows). IPv6 addresses, which most clusters' pods do not have, are
/// kept beside the rows ([`OtherTable::v6`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct OtherRow {
    /// The IPv4 address; 0 = none (a pod whose address is 0.0.0.0 is stored whole).
    v4: u32,
    /// Index of the IPv6 address in [`OtherTable::v6`]; `u32::MAX` = none.
    v6: u32,
    placement: u32,
    service_account: u32,
    host_network: bool,
}

impl OtherPod {
    /// The pod's addresses, IPv4 first.
    pub(super) fn ips(&self) -> impl Iterator<Item = IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }
}

/// Every node's pods, keyed compactly, with the values their entries name by number. Other
/// nodes' pods outside the mesh ([`StoredPod::Other`], nearly all of a large cluster's) are
/// kept in one flat table that the model shares ([`OtherTable`]), the rest whole by name.
pub(super) struct PodStore {
    /// Pods held whole ([`StoredPod::Whole`]); its `ready` is the pods' list's.
    pub(super) store: Store<Box<WholePod>, PodKey>,
    /// The other pods.
    pub(super) others: OtherTable,
    /// During a (re)list: the other pods listed so far (the store's own `relisting` holds
    /// the whole ones); the old contents stay visible until the list is complete.
    relisting_others: Option<Vec<(PodKey, OtherPod)>>,
    /// Namespaces, node names and service accounts.
    pub(super) strings: Interner<str>,
    /// Node address lists (`status.hostIPs`), one per node in practice.
    pub(super) host_ips: Interner<[IpAddr]>,
    /// (node name, node address list) of other pods, as `[strings id, host_ips id]`: one
    /// number a pod instead of two (a few hundred distinct pairs: one per node).
    pub(super) placements: Interner<[u32]>,
}

/// Other nodes' pods outside the mesh as one table: their names and addresses as the model's
/// [`model::OtherPods`], shared (`Arc`) with every model built while no pod of it is left out
/// of the model (a namespace not live, or in the mesh), and the rest of each [`OtherPod`]
/// beside it. About 40 bytes a pod in all, where a map entry keyed by name (≈ 90 bytes) plus
/// the model's own copy (≈ 26) held the same pods twice. Watch events between two models are
/// collected in `changes` and merged into a new table when the next model is built
/// ([`PodStore::compact`]): the model's copy was rebuilt as often before.
#[derive(Default)]
pub(super) struct OtherTable {
    pub(super) pods: Arc<model::OtherPods>,
    /// Per pod of `pods`, in its order.
    attrs: Vec<OtherRow>,
    /// The IPv6 addresses the rows name.
    v6: Vec<std::net::Ipv6Addr>,
    /// Pods changed since `pods` was built: the new value, `None` for removed (or now
    /// stored whole).
    pub(super) changes: BTreeMap<PodKey, Option<OtherPod>>,
}

impl PodStore {
    pub(super) fn new() -> Self {
        Self {
            store: Store::new(),
            others: OtherTable::default(),
            relisting_others: None,
            strings: Interner::new(),
            host_ips: Interner::new(),
            placements: Interner::new(),
        }
    }

    /// The node name (a `strings` id) and node address list (a `host_ips` id) of placement
    /// `id`, which [`StoredPod::new`] interned.
    pub(super) fn placement(&self, id: u32) -> (u32, u32) {
        match **self.placements.get(id) {
            [node, host_ips] => (node, host_ips),
            // Every placement is interned as a pair.
            _ => (u32::MAX, u32::MAX),
        }
    }

    /// How many pods are stored (the other pods as of the last model).
    pub(super) fn len(&self) -> usize {
        self.store.objects.len() + self.others.len()
    }

    pub(super) fn apply_pod(&mut self, node: &str, event: watcher::Event<K8sPod>) {
        let Self {
            store,
            others,
            relisting_others,
            strings,
            host_ips,
            placements,
        } = self;
        let key_of = |pod: &K8sPod, strings: &mut Interner<str>| PodKey {
            namespace: strings.id(pod.namespace().as_deref().unwrap_or_default()),
            name: pod.name_any().into(),
        };
        match event {
            watcher::Event::Init => {
                store.relisting = Some(BTreeMap::new());
                *relisting_others = Some(Vec::new());
            }
            watcher::Event::InitApply(pod) => {
                let key = key_of(&pod, strings);
                let listed = store.relisting.get_or_insert_with(BTreeMap::new);
                match StoredPod::new(&pod, node, strings, host_ips, placements) {
                    Some(StoredPod::Whole(w)) => {
                        listed.insert(key, w);
                    }
                    Some(StoredPod::Other(o)) => {
                        listed.remove(&key);
                        relisting_others.get_or_insert_with(Vec::new).push((key, o));
                    }
                    None => {
                        listed.remove(&key);
                    }
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = store.relisting.take() {
                    // Rebuilt in bulk, as `Store` does.
                    store.objects = listed.into_iter().collect();
                }
                store.ready = true;
                if let Some(listed) = relisting_others.take() {
                    // A pod listed twice counts as its last listing, as in a map.
                    let mut listed: Vec<_> = listed.into_iter().rev().collect();
                    listed.sort_by(|a, b| a.0.cmp(&b.0));
                    listed.dedup_by(|a, b| a.0 == b.0);
                    let whole = &store.objects;
                    let rows = listed
                        .iter()
                        .filter(|(k, _)| !whole.contains_key(k))
                        .map(|(k, o)| (&**strings.get(k.namespace), &*k.name, *o));
                    *others = OtherTable::build(rows);
                }
            }
            watcher::Event::Apply(pod) => {
                let key = key_of(&pod, strings);
                match StoredPod::new(&pod, node, strings, host_ips, placements) {
                    Some(StoredPod::Whole(w)) => {
                        others.changes.insert(key.clone(), None);
                        store.objects.insert(key, w);
                    }
                    Some(StoredPod::Other(o)) => {
                        store.objects.remove(&key);
                        others.changes.insert(key, Some(o));
                    }
                    None => {
                        store.objects.remove(&key);
                        others.changes.insert(key, None);
                    }
                }
            }
            watcher::Event::Delete(pod) => {
                let key = key_of(&pod, strings);
                store.objects.remove(&key);
                others.changes.insert(key, None);
            }
        }
    }

    /// Merges the other pods' changes since the last model into a new table (nothing to do
    /// without changes).
    pub(super) fn compact(&mut self) {
        let pending = std::mem::take(&mut self.others.changes);
        if pending.is_empty() {
            return;
        }
        let strings = &self.strings;
        let old = &self.others;
        // Looked up by borrowed names: no allocation per pod of the table.
        let touched: std::collections::HashSet<(u32, &str)> =
            pending.keys().map(|k| (k.namespace, &*k.name)).collect();
        let kept = (0..old.len()).filter_map(|i| {
            let (namespace, name) = old.pods.pod(i);
            let is_touched = strings
                .find(namespace)
                .is_some_and(|ns| touched.contains(&(ns, name)));
            (!is_touched).then_some((namespace, name, old.get(i)))
        });
        let updated = pending
            .iter()
            .filter_map(|(k, o)| Some((&**strings.get(k.namespace), &*k.name, (*o)?)));
        let table = OtherTable::build(kept.chain(updated));
        self.others = table;
    }
}

impl OtherTable {
    /// The table of these pods (namespace, name, pod), in any order, each name once.
    fn build<'a>(rows: impl Iterator<Item = (&'a str, &'a str, OtherPod)>) -> Self {
        let rows: Vec<_> = rows
            .map(|(ns, name, o)| ((ns, name, o.v4, o.v6), o))
            .collect();
        let (pods, listed) = model::OtherPods::build_with(rows);
        let mut v6 = Vec::new();
        // Into a new vector of its own size: collecting `listed` in place would keep its
        // allocation (36 bytes a pod) for the 20-byte rows.
        let mut attrs = Vec::with_capacity(listed.len());
        attrs.extend(listed.into_iter().map(|o| OtherRow {
            v4: o.v4.map_or(0, u32::from),
            v6: o.v6.map_or(u32::MAX, |a| {
                v6.push(a);
                // Fewer pods than 2³² - 1: the index fits.
                u32::try_from(v6.len() - 1).unwrap_or(u32::MAX)
            }),
            placement: o.placement,
            service_account: o.service_account,
            host_network: o.host_network,
        }));
        v6.shrink_to_fit();
        Self {
            pods: Arc::new(pods),
            attrs,
            v6,
            changes: BTreeMap::new(),
        }
    }

    /// How many pods.
    pub(super) fn len(&self) -> usize {
        self.attrs.len()
    }

    /// Pod `index` (`0..len()`, the order of `pods`).
    pub(super) fn get(&self, index: usize) -> OtherPod {
        let r = self.attrs[index];
        OtherPod {
            v4: (r.v4 != 0).then(|| std::net::Ipv4Addr::from(r.v4)),
            v6: self.v6.get(r.v6 as usize).copied(),
            placement: r.placement,
            service_account: r.service_account,
            host_network: r.host_network,
        }
    }
}

impl StoredPod {
    /// `None` for a pod the model does not use (not scheduled yet, or finished).
    pub(super) fn new(
        pod: &K8sPod,
        node: &str,
        strings: &mut Interner<str>,
        host_ip_sets: &mut Interner<[IpAddr]>,
        placements: &mut Interner<[u32]>,
    ) -> Option<Self> {
        let mut model_pod = pod_of(pod)?;
        let all = pod.labels();
        if model_pod.node == node {
            return Some(Self::Whole(Box::new(WholePod {
                pod: Arc::new(model_pod),
                labels: all.clone(),
                host_ips: host_ips(pod),
            })));
        }
        // Only this node has the pod's cgroup, which is what the UID names.
        model_pod.uid = String::new();
        let mode = all.get(crate::authz::DATAPLANE_MODE_LABEL);
        let (mut v4, mut v6) = (None, None);
        let mut compact = mode.is_none();
        for ip in &model_pod.ips {
            match ip {
                // 0.0.0.0 is no pod's address; a row's 0 means none.
                IpAddr::V4(a) if v4.is_none() && !a.is_unspecified() => v4 = Some(*a),
                IpAddr::V6(a) if v6.is_none() => v6 = Some(*a),
                _ => compact = false,
            }
        }
        if !compact {
            return Some(Self::Whole(Box::new(WholePod {
                pod: Arc::new(model_pod),
                labels: mode
                    .map(|m| {
                        BTreeMap::from([(crate::authz::DATAPLANE_MODE_LABEL.to_owned(), m.clone())])
                    })
                    .unwrap_or_default(),
                host_ips: host_ips(pod),
            })));
        }
        Some(Self::Other(OtherPod {
            v4,
            v6,
            placement: placements
                .id(&[strings.id(&model_pod.node), host_ip_sets.id(&host_ips(pod))]),
            service_account: strings.id(&model_pod.service_account),
            host_network: model_pod.host_network,
        }))
    }
}

/// Objects of one kind as the watcher last listed and updated them, each stored as `V` (the
/// object itself, or what the model reads of it). During a (re)list the old contents stay
/// visible until the list is complete, as kube-rs reflectors do.
pub(super) struct Store<V, K = ObjectName> {
    pub(super) objects: BTreeMap<K, V>,
    pub(super) relisting: Option<BTreeMap<K, V>>,
    /// Whether a first complete list arrived.
    pub(super) ready: bool,
}

pub(super) fn key_of<K: Resource>(obj: &K) -> ObjectName {
    ObjectName::new(obj.namespace().unwrap_or_default(), obj.name_any())
}

impl<V, K: Ord> Store<V, K> {
    pub(super) fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            relisting: None,
            ready: false,
        }
    }

    /// Applies a watch event, storing each object under `key` as `convert` makes it; an
    /// object `convert` has no use for (`None`) is not stored (and an earlier version of it
    /// is removed).
    pub(super) fn apply_keyed<O>(
        &mut self,
        event: watcher::Event<O>,
        mut key: impl FnMut(&O) -> K,
        mut convert: impl FnMut(O) -> Option<V>,
    ) {
        match event {
            watcher::Event::Init => self.relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(obj) => {
                let key = key(&obj);
                let listed = self.relisting.get_or_insert_with(BTreeMap::new);
                match convert(obj) {
                    Some(v) => listed.insert(key, v),
                    None => listed.remove(&key),
                };
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.relisting.take() {
                    // Rebuilt in bulk: the list's one-by-one inserts left the map's nodes about
                    // half empty, and it lives until the next list (100,000 pods).
                    self.objects = listed.into_iter().collect();
                }
                self.ready = true;
            }
            watcher::Event::Apply(obj) => {
                let key = key(&obj);
                match convert(obj) {
                    Some(v) => self.objects.insert(key, v),
                    None => self.objects.remove(&key),
                };
            }
            watcher::Event::Delete(obj) => {
                self.objects.remove(&key(&obj));
            }
        }
    }
}

impl<V> Store<V> {
    /// Applies a watch event, storing each object as `convert` makes it.
    pub(super) fn apply_as<K: Resource>(
        &mut self,
        event: watcher::Event<K>,
        mut convert: impl FnMut(K) -> V,
    ) {
        self.apply_keyed(event, key_of, |o| Some(convert(o)));
    }
}

impl<O: Resource> Store<O> {
    pub(super) fn apply(&mut self, event: watcher::Event<O>) {
        self.apply_as(event, |k| k);
    }
}

impl Store<StoredService> {
    pub(super) fn apply_service(&mut self, event: watcher::Event<K8sService>) {
        self.apply_as(event, |s| StoredService::new(&s));
    }
}

impl Store<StoredSlice> {
    pub(super) fn apply_slice(&mut self, names: &mut Names, event: watcher::Event<EndpointSlice>) {
        self.apply_as(event, |s| StoredSlice::new(&s, names));
    }
}
