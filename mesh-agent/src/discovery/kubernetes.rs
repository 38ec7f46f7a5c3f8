//! The Kubernetes source: watches Services, `EndpointSlices` (`discovery.k8s.io/v1`), the Pods of
//! this node, Namespaces and this node's Node through kube-rs watchers (with their default
//! backoff), keeps its own stores, and after each batch of events (debounced by [`DEBOUNCE`])
//! sends a complete [`ClusterModel`] as [`Update::Model`] — once every watcher has finished its
//! initial list, and only when the model changed.
//!
//! Watches (kube-proxy's, for the same reasons): Services and `EndpointSlices` with the label
//! selector [`PROXY_LABEL_SELECTOR`], so objects of Services another proxy implements
//! (`service.kubernetes.io/service-proxy-name`) and slices of headless Services
//! (`service.kubernetes.io/headless`) never reach the agent; Pods with
//! no selector (every node's: tunnel destinations); the Node with `metadata.name=<node>`. Each
//! watch's initial state comes as a streaming list by default (KEP-3157 `sendInitialEvents`:
//! one watch event per object, so a 10,000-slice list is never held whole; see [`ListMode`] and
//! [`run_with_mode`] for the fallback to lists on older API servers); lists and streams are
//! served from the API server's watch cache (`resourceVersion=0`), and every object is
//! slimmed before it is stored (`managedFields`, annotations, pod containers and statuses, node
//! status dropped), so memory follows what the model uses. `TrafficPolicy` objects (few, and
//! read whole by the policy parser and the status writer) are watched and kept as they are.
//!
//! What becomes what (each rule is kube-proxy's unless said otherwise):
//! - **Service** → [`model::Service`]: `spec.clusterIPs` (or `spec.clusterIP`); headless (`None`),
//!   address-less and `ExternalName` services are left out. Ports: TCP and UDP (SCTP is skipped).
//!   `spec.internalTrafficPolicy: Local` → [`model::TrafficPolicy::Local`] (only this node's
//!   endpoints, no fallback). The Service's `targetPort` is not used: it is the `EndpointSlice`
//!   controller's input.
//! - **`EndpointSlice`** → [`Endpoint`]s of the service named by its `kubernetes.io/service-name`
//!   label (several slices merge; the same address and ports seen twice counts once, the most
//!   usable copy wins). An endpoint serves a service port only if its slice lists a port of the
//!   same name and protocol, on the number listed there. Conditions: `ready` and `serving`
//!   (absent = true), `terminating` (absent = false); [`ClusterModel::desired_specs`] uses
//!   serving-and-terminating endpoints only when no endpoint is ready. `hints.forZones` /
//!   `hints.forNodes` are the topology hints; for `trafficDistribution: PreferClose` /
//!   `PreferSameZone` / `PreferSameNode` an endpoint without hints is hinted for its own zone
//!   (node), as the `EndpointSlice` controller would (kube-proxy reads only hints). `nodeName`;
//!   a `Pod` `targetRef`. `FQDN` slices are ignored.
//! - **Pod** (scheduled on any node; terminal pods skipped) → [`model::Pod`]:
//!   `spec.nodeName`, `spec.serviceAccountName` (default `default`), `status.podIPs`,
//!   `spec.hostNetwork` (host-network pods are never local pod endpoints); `status.hostIPs` →
//!   [`ClusterModel::nodes`](model::ClusterModel::nodes) (where a node's agent is reached).
//!   Other nodes' pods keep only the enrollment label.
//! - **Namespace**: objects of a namespace that is not (or no longer) there, or is terminating,
//!   are left out, so deleting a namespace drops its services and pods at once.
//! - **Node** (this one): its `topology.kubernetes.io/zone` label is
//!   [`ClusterModel::node_zone`]; no Node object or no label means zone hints are not used.
//! - **`TrafficPolicy`** (`traffic.kernmesh.io/v1alpha1`, watched as dynamic objects so one
//!   malformed object cannot stall the watch): every policy goes through the one parser
//!   ([`crate::policy::parse`]) and is resolved onto the Services ([`crate::policy::resolve`]:
//!   Service-targeted beats Namespace-targeted, the oldest wins between equals). A Service's
//!   settings are the winning policy's, else the defaults
//!   ([`CircuitSettings::default`](crate::datapath::spec::CircuitSettings::default)); `ClientIP`
//!   affinity always comes from the Service's own `spec.sessionAffinity`. An invalid policy
//!   applies nowhere: it is reported once per distinct message as [`Update::Rejected`] and
//!   logged, while the elected status writer ([`crate::policy::status`]) records it in the
//!   policy's `status.conditions` and as a Warning Event. Without the CRD installed, the agent
//!   runs with the defaults and keeps retrying the watch.
//!
//! Watch errors are logged and retried with the watcher's backoff; [`run`] only returns when the
//! receiver of the updates is gone.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt as _, stream::select_all};
use k8s_openapi::api::{
    core::v1::{
        Namespace as K8sNamespace, Node as K8sNode, Pod as K8sPod, Service as K8sService,
        ServiceSpec as K8sServiceSpec,
    },
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{
    sync::{mpsc, watch as watch_channel},
    time::Instant,
};
use tracing::{debug, info, warn};

pub use crate::config::ListMode;
use crate::{
    datapath::spec::Protocol,
    discovery::{self, ObjectRef, Update},
    model::{self, ClusterModel, Endpoint, ObjectName, ServicePort, ServiceSettings},
    policy::{
        self, PolicyError, TrafficPolicy,
        status::{Desired, DesiredStatus, StatusConfig},
    },
};

/// The kube-rs and API-type crates this source is built on, for callers that build the client.
pub use {k8s_openapi, kube};

/// Label joining an `EndpointSlice` to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label of Services (and their slices) that another proxy implements.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the `EndpointSlice` controller puts on the slices of headless Services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// kube-proxy's label selector on its Service and `EndpointSlice` informers: objects of
/// Services another proxy owns, and headless ones, never reach the agent at all.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// The Node label naming its zone (topology hints).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Kubernetes' default `ClientIP` affinity timeout (`sessionAffinityConfig.clientIP.timeoutSeconds`).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_hours(3);
/// Quiet time that ends a batch of watch events.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// Longest batch under continuous churn: a model goes out at least this often.
pub const MAX_BATCH: Duration = Duration::from_secs(1);
/// Why the Kubernetes source stopped.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// The receiver of the updates was dropped (the agent is shutting down).
    #[error("sending the cluster model of node {node}: the update channel is closed")]
    ChannelClosed { node: String },
    /// A watcher stream ended, which kube-rs watchers never do by design.
    #[error("watching {kind}: the watch stream ended")]
    WatchEnded { kind: &'static str },
    /// The blocking thread building the model was cancelled (the runtime is shutting down).
    #[error("building the cluster model of node {node}: the blocking task was cancelled")]
    BuildCancelled { node: String },
}

/// A Service's own settings: `ClientIP` affinity from its `spec` (policies add the rest).
#[must_use]
pub fn service_settings(spec: Option<&K8sServiceSpec>) -> ServiceSettings {
    ServiceSettings {
        affinity_timeout: spec_affinity(spec),
        ..ServiceSettings::default()
    }
}

/// `ClientIP` affinity from the Service spec, as Kubernetes defines it.
fn spec_affinity(spec: Option<&K8sServiceSpec>) -> Option<Duration> {
    let spec = spec?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let seconds = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .filter(|&s| s > 0);
    Some(seconds.map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs))
}

/// Ports of a Service (TCP and UDP; SCTP and out-of-range ports skipped).
#[must_use]
pub fn service_ports(spec: &K8sServiceSpec) -> Vec<ServicePort> {
    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        let Some(protocol) = protocol(p.protocol.as_deref()) else {
            debug!(
                protocol = p.protocol.as_deref(),
                port = p.port,
                "service port skipped: protocol not balanced"
            );
            continue;
        };
        let Some(port) = port_number(p.port) else {
            continue;
        };
        // The Service's `targetPort` (number or name) is the EndpointSlice controller's input;
        // the port an endpoint serves on is the one its slice lists (kube-proxy reads only that).
        out.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port,
            protocol,
            target_port: None,
        });
    }
    out
}

/// A port's protocol (absent = TCP, as the API defaults it); `None` for SCTP.
fn protocol(name: Option<&str>) -> Option<Protocol> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// Cluster IPs of a Service: none for headless, `ExternalName` or not-yet-allocated services.
#[must_use]
pub fn cluster_ips(spec: &K8sServiceSpec) -> Vec<IpAddr> {
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let listed = spec.cluster_ips.as_deref().unwrap_or_default();
    let single = spec.cluster_ip.as_slice();
    let raw: &[String] = if listed.is_empty() { single } else { listed };
    let mut out = Vec::new();
    for ip in raw {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(_) => warn!(cluster_ip = %ip, "service cluster IP is not an address; skipped"),
        }
    }
    out
}

/// A Service reduced, when it arrives, to what the model reads. Kept instead of the API object
/// (whose metadata and spec structs alone are over a kilobyte each). No annotations: settings
/// come only from `TrafficPolicy` objects.
#[derive(Clone, Debug)]
struct StoredService {
    /// The Service's own settings ([`service_settings`]: `ClientIP` affinity from its spec).
    settings: ServiceSettings,
    /// Whether the Service had a spec at all.
    has_spec: bool,
    cluster_ips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    internal_traffic_policy: model::TrafficPolicy,
    traffic_distribution: Option<String>,
    /// Labelled `kernmesh.io/dataplane-mode=none`: traffic to it stays out of the mesh.
    mesh_opt_out: bool,
}

impl StoredService {
    fn new(svc: &K8sService) -> Self {
        let spec = svc.spec.as_ref();
        Self {
            settings: service_settings(spec),
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

/// Node and zone names, one allocation each however many endpoints name them.
#[derive(Default)]
struct Names(BTreeSet<Arc<str>>);

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.0.get(name) {
            return Arc::clone(n);
        }
        let n: Arc<str> = Arc::from(name);
        self.0.insert(Arc::clone(&n));
        n
    }
}

/// One address of an `EndpointSlice` endpoint, as stored (see [`StoredSlice`]); 100,000 of
/// them for 10,000 services, so names are shared and hints (rare) boxed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SliceEndpoint {
    ip: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<Arc<str>>,
    pod: Option<ObjectName>,
    zone: Option<Arc<str>>,
    hints: Option<Box<model::Hints>>,
}

/// An `EndpointSlice` reduced, when it arrives, to what the model reads: the service it belongs
/// to, its ports and one entry per endpoint address. Kept instead of the API object, which
/// carries several times more (every `targetRef` field, an `Option` per condition and hint).
#[derive(Clone, Debug, PartialEq, Eq)]
struct StoredSlice {
    /// The `kubernetes.io/service-name` label.
    service: Option<String>,
    /// (name, protocol, port) as listed; SCTP and invalid numbers already dropped.
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

impl StoredSlice {
    /// Reads a slice (`FQDN` slices and unparsable addresses give no endpoints).
    fn new(slice: &EndpointSlice, names: &mut Names) -> Self {
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
        };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            return out;
        }
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
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
                .and_then(|r| {
                    let ns = r.namespace.clone().unwrap_or_else(|| namespace.clone());
                    Some(ObjectName::new(ns, r.name.clone()?))
                });
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    warn!(address = %addr, slice = %slice.name_any(), "endpoint address is not an IP; skipped");
                    continue;
                };
                out.endpoints.push(SliceEndpoint {
                    ip,
                    ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                    serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                    terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                    node: ep.node_name.as_deref().map(|n| names.get(n)),
                    pod: pod.clone(),
                    zone: ep.zone.as_deref().map(|z| names.get(z)),
                    hints: (hints != model::Hints::default()).then(|| Box::new(hints.clone())),
                });
            }
        }
        out.endpoints.shrink_to_fit();
        out
    }

    /// The model endpoints of this slice for a service with `service_ports` (see
    /// [`slice_endpoints`]).
    fn endpoints(
        &self,
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
            .map(|ep| {
                let mut hints = ep.hints.as_deref().cloned().unwrap_or_default();
                if same_zone
                    && hints.zones.is_empty()
                    && let Some(zone) = &ep.zone
                {
                    hints.zones.insert(zone.to_string());
                }
                if same_node
                    && hints.nodes.is_empty()
                    && let Some(node) = &ep.node
                {
                    hints.nodes.insert(node.to_string());
                }
                Endpoint {
                    ip: ep.ip,
                    ports: Arc::clone(&ports),
                    ready: ep.ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                    node: ep.node.clone(),
                    pod: ep.pod.clone(),
                    weight: 1,
                    hints,
                }
            })
            .collect()
    }
}

/// Endpoints of one `EndpointSlice` of a service with `service_ports` (`FQDN` slices and
/// unparsable addresses skipped). An endpoint serves a service port only if the slice lists a
/// port of the same name and protocol (kube-proxy's `ServicePortName` match), on the number the
/// slice gives; a slice port the service does not have is dropped. With `trafficDistribution`
/// `PreferClose`/`PreferSameZone` (`PreferSameNode`), an endpoint without zone (node) hints gets
/// its own zone (node) as hint — what the `EndpointSlice` controller writes for these values;
/// kube-proxy reads only the hints, so without the controller (or before it caught up) it would
/// not prefer close endpoints.
#[must_use]
pub fn slice_endpoints(
    slice: &EndpointSlice,
    service_ports: &[ServicePort],
    traffic_distribution: Option<&str>,
) -> Vec<Endpoint> {
    StoredSlice::new(slice, &mut Names::default()).endpoints(service_ports, traffic_distribution)
}

/// Merges endpoints of several slices: one entry per (address, ports), the most usable copy
/// (ready, then serving), sorted so the model does not depend on slice order. During a
/// rollout an address can sit in two slices at once, terminating in one and ready in another.
#[must_use]
pub fn merge_endpoints(all: impl IntoIterator<Item = Endpoint>) -> Vec<Endpoint> {
    let mut merged: BTreeMap<(IpAddr, Arc<BTreeMap<String, u16>>), Endpoint> = BTreeMap::new();
    for ep in all {
        match merged.entry((ep.ip, Arc::clone(&ep.ports))) {
            Entry::Vacant(v) => {
                v.insert(ep);
            }
            Entry::Occupied(mut o) => {
                let rank = |e: &Endpoint| (e.ready, e.serving);
                let cur = o.get_mut();
                if rank(&ep) > rank(cur) {
                    *cur = ep;
                }
            }
        }
    }
    merged.into_values().collect()
}

/// The node addresses a pod's status names (`status.hostIPs`, else `status.hostIP`): where
/// the agent of its node is reached.
fn host_ips(pod: &K8sPod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = status
        .host_ips
        .iter()
        .flatten()
        .map(|h| h.ip.as_str())
        .collect();
    let raw = if listed.is_empty() {
        status.host_ip.as_deref().into_iter().collect()
    } else {
        listed
    };
    raw.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// A pod of the model, if it is scheduled (on any node) and not finished.
#[must_use]
pub fn pod_of(pod: &K8sPod) -> Option<model::Pod> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().map(|p| p.ip.clone()).collect::<Vec<_>>())
        .unwrap_or_default();
    let raw = if listed.is_empty() {
        status.and_then(|s| s.pod_ip.clone()).into_iter().collect()
    } else {
        listed
    };
    for ip in raw {
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    Some(model::Pod {
        name: ObjectName::new(pod.namespace().unwrap_or_default(), pod.name_any()),
        node: node.to_owned(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        ips,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        host_network: spec.host_network.unwrap_or(false),
    })
}

/// What the model reads of a Pod, stored instead of the Pod: every node's pods are watched
/// (100,000 in the control-plane benchmark), and a `k8s-openapi` `Pod` held inline in the store
/// is ≈ 2 KB of mostly empty spec and status fields before any of its strings (≈ 450 MB of
/// B-tree nodes for 100,000 pods, measured with heaptrack). Converted once per watch event.
#[derive(Clone, Debug)]
struct StoredPod {
    /// [`pod_of`]'s result: `None` for a pod not scheduled yet or finished.
    pod: Option<model::Pod>,
    /// The labels the model keeps: every label of this node's pods (policy selectors), only
    /// the enrollment label of other nodes' pods (a pod elsewhere may opt out of the mesh).
    labels: BTreeMap<String, String>,
    /// `status.hostIPs` (else `status.hostIP`): where the agent of the pod's node is reached.
    host_ips: Vec<IpAddr>,
}

impl StoredPod {
    fn new(pod: &K8sPod, node: &str) -> Self {
        let model_pod = pod_of(pod);
        let all = pod.labels();
        let labels = match &model_pod {
            Some(p) if p.node == node => all.clone(),
            Some(_) => all
                .get(crate::authz::DATAPLANE_MODE_LABEL)
                .map(|mode| {
                    BTreeMap::from([(crate::authz::DATAPLANE_MODE_LABEL.to_owned(), mode.clone())])
                })
                .unwrap_or_default(),
            None => BTreeMap::new(),
        };
        Self {
            pod: model_pod,
            labels,
            host_ips: host_ips(pod),
        }
    }
}

/// Objects of one kind as the watcher last listed and updated them, each stored as `V` (the
/// object itself, or what the model reads of it). During a (re)list the old contents stay
/// visible until the list is complete, as kube-rs reflectors do.
struct Store<V> {
    objects: BTreeMap<ObjectName, V>,
    relisting: Option<BTreeMap<ObjectName, V>>,
    /// Whether a first complete list arrived.
    ready: bool,
}

fn key_of<K: Resource>(obj: &K) -> ObjectName {
    ObjectName::new(obj.namespace().unwrap_or_default(), obj.name_any())
}

impl<V> Store<V> {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            relisting: None,
            ready: false,
        }
    }

    /// Applies a watch event, storing each object as `convert` makes it.
    fn apply_as<K: Resource>(&mut self, event: watcher::Event<K>, mut convert: impl FnMut(K) -> V) {
        match event {
            watcher::Event::Init => self.relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(obj) => {
                let key = key_of(&obj);
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, convert(obj));
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.relisting.take() {
                    self.objects = listed;
                }
                self.ready = true;
            }
            watcher::Event::Apply(obj) => {
                self.objects.insert(key_of(&obj), convert(obj));
            }
            watcher::Event::Delete(obj) => {
                self.objects.remove(&key_of(&obj));
            }
        }
    }
}

impl<K: Resource> Store<K> {
    fn apply(&mut self, event: watcher::Event<K>) {
        self.apply_as(event, |k| k);
    }
}

impl Store<StoredService> {
    fn apply_service(&mut self, event: watcher::Event<K8sService>) {
        self.apply_as(event, |s| StoredService::new(&s));
    }
}

impl Store<StoredPod> {
    fn apply_pod(&mut self, node: &str, event: watcher::Event<K8sPod>) {
        self.apply_as(event, |p| StoredPod::new(&p, node));
    }
}

impl Store<StoredSlice> {
    fn apply_slice(&mut self, names: &mut Names, event: watcher::Event<EndpointSlice>) {
        self.apply_as(event, |s| StoredSlice::new(&s, names));
    }
}

/// A rejected policy to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The `TrafficPolicy`.
    pub policy: ObjectName,
    /// Every problem of it.
    pub error: PolicyError,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl From<Rejection> for discovery::Rejection {
    fn from(r: Rejection) -> Self {
        let problems: Vec<String> = r.error.problems.iter().map(ToString::to_string).collect();
        Self::InvalidField {
            object: ObjectRef::new("TrafficPolicy", r.policy),
            field: "spec".to_owned(),
            message: format!("{}; rejected as a whole", problems.join("; ")),
        }
    }
}

/// Everything watched, plus what is remembered between models.
struct State {
    node: String,
    services: Store<StoredService>,
    slices: Store<StoredSlice>,
    /// Node and zone names the slices share.
    names: Names,
    pods: Store<StoredPod>,
    namespaces: Store<K8sNamespace>,
    /// This node only (its zone).
    nodes: Store<K8sNode>,
    policies: Store<DynamicObject>,
    /// Whether the `TrafficPolicy` CRD was found missing (logged once per absence).
    policy_crd_missing: bool,
    /// Rejections already reported per policy (each is reported once while it persists).
    reported: BTreeMap<ObjectName, String>,
    /// What each policy's status should say, for the elected writer.
    desired_status: DesiredStatus,
    /// `AuthorizationPolicy` and `PeerAuthentication` objects, whole (few; the parser names
    /// every field of a malformed one).
    authz_policies: Store<DynamicObject>,
    peer_authns: Store<DynamicObject>,
    /// Which security CRDs were found missing (logged once per absence).
    security_crd_missing: BTreeSet<&'static str>,
    /// Security-object rejections already reported (kind, object) → message.
    security_reported: BTreeMap<(&'static str, ObjectName), String>,
    /// The last valid version of each security object: an update that is invalid leaves it
    /// applying (Envoy's NACK keeps the last good config) — dropping a DENY because its edit
    /// has a typo would open what it closed. An object never valid applies nowhere.
    last_good_authz: BTreeMap<ObjectName, crate::authz::ParsedAuthz>,
    last_good_peer: BTreeMap<ObjectName, crate::authz::ParsedPeerAuthn>,
    /// What each security object's status should say (`Accepted` or `Invalid`), per kind.
    authz_status: DesiredStatus,
    peer_status: DesiredStatus,
}

impl State {
    fn new(node: String) -> Self {
        Self {
            node,
            services: Store::new(),
            slices: Store::new(),
            names: Names::default(),
            pods: Store::new(),
            namespaces: Store::new(),
            nodes: Store::new(),
            policies: Store::new(),
            policy_crd_missing: false,
            reported: BTreeMap::new(),
            desired_status: DesiredStatus::new(),
            authz_policies: Store::new(),
            peer_authns: Store::new(),
            security_crd_missing: BTreeSet::new(),
            security_reported: BTreeMap::new(),
            last_good_authz: BTreeMap::new(),
            last_good_peer: BTreeMap::new(),
            authz_status: DesiredStatus::new(),
            peer_status: DesiredStatus::new(),
        }
    }

    fn ready(&self) -> bool {
        self.services.ready
            && self.slices.ready
            && self.pods.ready
            && self.namespaces.ready
            && self.nodes.ready
            && self.policies.ready
            && self.authz_policies.ready
            && self.peer_authns.ready
    }

    /// This node's zone label, if its Node object has one.
    fn zone(&self) -> Option<String> {
        self.nodes
            .objects
            .get(&ObjectName::new("", self.node.clone()))
            .and_then(|n| n.labels().get(ZONE_LABEL))
            .filter(|z| !z.is_empty())
            .cloned()
    }

    fn namespace_live(&self, ns: &str) -> bool {
        self.namespaces
            .objects
            .get(&ObjectName::new("", ns))
            .is_some_and(|n| {
                n.metadata.deletion_timestamp.is_none()
                    && n.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
            })
    }

    /// Parses every policy of a live namespace and resolves them onto the Services there;
    /// remembers what each policy's status should say.
    fn resolve_policies(&mut self) -> (policy::Resolution, Vec<Rejection>) {
        let resource = ApiResource::erase::<TrafficPolicy>(&());
        let mut parsed = Vec::with_capacity(self.policies.objects.len());
        let mut objects = Vec::with_capacity(self.policies.objects.len());
        for (name, obj) in &self.policies.objects {
            if !self.namespace_live(&name.namespace) {
                continue;
            }
            let mut value = serde_json::to_value(obj).unwrap_or_default();
            // List items may come without their type; this watch is of one kind.
            if let Some(map) = value.as_object_mut() {
                map.entry("apiVersion")
                    .or_insert_with(|| resource.api_version.clone().into());
                map.entry("kind")
                    .or_insert_with(|| resource.kind.clone().into());
            }
            parsed.push(policy::parse(&value));
            objects.push(obj);
        }
        let services: BTreeSet<ObjectName> = self
            .services
            .objects
            .keys()
            .filter(|n| self.namespace_live(&n.namespace))
            .cloned()
            .collect();
        let resolution = policy::resolve(&parsed, &services, &|ns| self.namespace_live(ns));
        let mut fresh = Vec::new();
        let mut reported = BTreeMap::new();
        let mut desired = DesiredStatus::new();
        for (p, obj) in parsed.into_iter().zip(objects) {
            if let Some(state) = resolution.report.policies.get(&p.name) {
                desired.insert(
                    p.name.clone(),
                    Desired {
                        condition: policy::status::condition(state),
                        current: policy::status::current_condition(obj),
                        reference: obj.object_ref(&resource),
                    },
                );
            }
            if let Err(error) = p.outcome {
                let message = error.to_string();
                if self.reported.get(&p.name) != Some(&message) {
                    fresh.push(Rejection {
                        policy: p.name.clone(),
                        error,
                    });
                }
                reported.insert(p.name, message);
            }
        }
        self.reported = reported;
        self.desired_status = desired;
        (resolution, fresh)
    }

    /// The complete model, and the policy rejections not reported before.
    fn build(&mut self) -> (ClusterModel, Vec<Rejection>) {
        let (resolution, fresh) = self.resolve_policies();
        let mut slices_by_service: BTreeMap<ObjectName, Vec<&StoredSlice>> = BTreeMap::new();
        for (key, slice) in &self.slices.objects {
            if let Some(svc) = &slice.service {
                slices_by_service
                    .entry(ObjectName::new(key.namespace.clone(), svc.clone()))
                    .or_default()
                    .push(slice);
            }
        }
        let mut model = ClusterModel {
            node: self.node.clone(),
            node_zone: self.zone(),
            ..ClusterModel::default()
        };
        for (name, svc) in &self.services.objects {
            if !self.namespace_live(&name.namespace) {
                continue;
            }
            let mut settings = svc.settings.clone();
            if let Some(p) = resolution.settings.get(name) {
                p.apply(&mut settings);
            }
            if !svc.has_spec || svc.cluster_ips.is_empty() {
                continue;
            }
            let distribution = svc.traffic_distribution.as_deref();
            let endpoints = merge_endpoints(
                slices_by_service
                    .get(name)
                    .into_iter()
                    .flatten()
                    .flat_map(|s| s.endpoints(&svc.ports, distribution)),
            );
            model.services.insert(
                name.clone(),
                model::Service {
                    name: name.clone(),
                    cluster_ips: svc.cluster_ips.clone(),
                    ports: svc.ports.clone(),
                    settings,
                    endpoints,
                    internal_traffic_policy: svc.internal_traffic_policy,
                },
            );
        }
        model.policies = resolution.report;
        for stored in self.pods.objects.values() {
            if let Some(p) = &stored.pod
                && self.namespace_live(&p.name.namespace)
            {
                // The labels were cut at store time (see `StoredPod::labels`).
                if !stored.labels.is_empty() {
                    model
                        .mesh
                        .pod_labels
                        .insert(p.name.clone(), stored.labels.clone());
                }
                for &ip in &stored.host_ips {
                    let addrs = model.nodes.entry(p.node.clone()).or_default();
                    if !addrs.contains(&ip) {
                        addrs.push(ip);
                    }
                }
                model.pods.insert(p.name.clone(), p.clone());
            }
        }
        for (name, svc) in &self.services.objects {
            if svc.mesh_opt_out && model.services.contains_key(name) {
                model.mesh.opted_out_services.insert(name.clone());
            }
        }
        for (name, ns) in &self.namespaces.objects {
            if self.namespace_live(&name.name)
                && let Some(mode) = crate::authz::DataplaneMode::from_labels(ns.labels())
            {
                model.mesh.namespace_modes.insert(name.name.clone(), mode);
            }
        }
        (model, fresh)
    }

    /// Parses every `AuthorizationPolicy` and `PeerAuthentication` of a live namespace into the
    /// model; returns the rejections not reported before and the objects that were rejected
    /// and no longer are (valid again, or gone).
    fn security(
        &mut self,
        model: &mut ClusterModel,
    ) -> (Vec<discovery::Rejection>, Vec<(&'static str, ObjectName)>) {
        let authz_resource = ApiResource::erase::<crate::authz::types::AuthorizationPolicy>(&());
        let peer_resource = ApiResource::erase::<crate::authz::types::PeerAuthentication>(&());
        let mut reported = BTreeMap::new();
        let mut fresh = Vec::new();
        let typed = |obj: &DynamicObject, r: &ApiResource| {
            let mut value = serde_json::to_value(obj).unwrap_or_default();
            // List items may come without their type; each watch is of one kind.
            if let Some(map) = value.as_object_mut() {
                map.entry("apiVersion")
                    .or_insert_with(|| r.api_version.clone().into());
                map.entry("kind").or_insert_with(|| r.kind.clone().into());
            }
            value
        };
        let mut note = |kind: &'static str, name: &ObjectName, error: Option<String>| {
            let Some(message) = error else { return };
            let key = (kind, name.clone());
            if self.security_reported.get(&key) != Some(&message) {
                fresh.push(discovery::Rejection::InvalidField {
                    object: ObjectRef::new(kind, name.clone()),
                    field: "spec".to_owned(),
                    message: message.clone(),
                });
            }
            reported.insert(key, message);
        };
        let mut good_authz = BTreeMap::new();
        let mut authz_status = DesiredStatus::new();
        for (name, obj) in &self.authz_policies.objects {
            if self.namespace_live(&name.namespace) {
                let p = crate::authz::parse_authorization(&typed(obj, &authz_resource));
                authz_status.insert(
                    p.name.clone(),
                    security_desired(obj, &authz_resource, p.generation, p.outcome.as_ref().err()),
                );
                note(
                    crate::authz::types::AUTHZ_KIND,
                    &p.name,
                    p.outcome.as_ref().err().map(problems_text),
                );
                let p = keep_last_good(p, &self.last_good_authz, &mut good_authz);
                model.mesh.authorization.push(p);
            }
        }
        self.last_good_authz = good_authz;
        let mut good_peer = BTreeMap::new();
        let mut peer_status = DesiredStatus::new();
        for (name, obj) in &self.peer_authns.objects {
            if self.namespace_live(&name.namespace) {
                let p = crate::authz::parse_peer_authentication(&typed(obj, &peer_resource));
                peer_status.insert(
                    p.name.clone(),
                    security_desired(obj, &peer_resource, p.generation, p.outcome.as_ref().err()),
                );
                note(
                    crate::authz::types::PEER_AUTHN_KIND,
                    &p.name,
                    p.outcome.as_ref().err().map(problems_text),
                );
                let p = keep_last_good(p, &self.last_good_peer, &mut good_peer);
                model.mesh.peer_authentication.push(p);
            }
        }
        self.last_good_peer = good_peer;
        self.authz_status = authz_status;
        self.peer_status = peer_status;
        let resolved = self
            .security_reported
            .keys()
            .filter(|k| !reported.contains_key(*k))
            .cloned()
            .collect();
        self.security_reported = reported;
        (fresh, resolved)
    }
}

/// One item of the merged watch streams (boxed: the objects are large and differ in size).
enum Change {
    Services(Box<Result<watcher::Event<K8sService>, watcher::Error>>),
    Slices(Box<Result<watcher::Event<EndpointSlice>, watcher::Error>>),
    Pods(Box<Result<watcher::Event<K8sPod>, watcher::Error>>),
    Namespaces(Box<Result<watcher::Event<K8sNamespace>, watcher::Error>>),
    Nodes(Box<Result<watcher::Event<K8sNode>, watcher::Error>>),
    Policies(Box<Result<watcher::Event<DynamicObject>, watcher::Error>>),
    /// `AuthorizationPolicy` objects (issue 9).
    AuthzPolicies(Box<Result<watcher::Event<DynamicObject>, watcher::Error>>),
    /// `PeerAuthentication` objects (issue 9).
    PeerAuthns(Box<Result<watcher::Event<DynamicObject>, watcher::Error>>),
}

/// Where a watch event stands in its watch's initial state, for the streaming-list fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Marker {
    /// The watch (re)started its initial state.
    Init,
    /// The initial state is complete (for a streaming list: the initial-events-end bookmark).
    InitDone,
    /// The API server refused the watch's options: 422 Invalid (or 400) on the watch request,
    /// what a server without streaming lists answers `sendInitialEvents` /
    /// `resourceVersionMatch` with.
    Refused,
    Other,
}

fn marker_of<T>(r: &Result<watcher::Event<T>, watcher::Error>) -> Marker {
    match r {
        Ok(watcher::Event::Init) => Marker::Init,
        Ok(watcher::Event::InitDone) => Marker::InitDone,
        Err(watcher::Error::WatchStartFailed(kube::Error::Api(s)))
            if s.code == 422 || s.code == 400 =>
        {
            Marker::Refused
        }
        _ => Marker::Other,
    }
}

impl Change {
    fn marker(&self) -> Marker {
        match self {
            Self::Services(r) => marker_of(r),
            Self::Slices(r) => marker_of(r),
            Self::Pods(r) => marker_of(r),
            Self::Namespaces(r) => marker_of(r),
            Self::Nodes(r) => marker_of(r),
            Self::Policies(r) | Self::AuthzPolicies(r) | Self::PeerAuthns(r) => marker_of(r),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Services(_) => "Services",
            Self::Slices(_) => "EndpointSlices",
            Self::Pods(_) => "Pods",
            Self::Namespaces(_) => "Namespaces",
            Self::Nodes(_) => "Nodes",
            Self::Policies(_) => "TrafficPolicies",
            Self::AuthzPolicies(_) => "AuthorizationPolicies",
            Self::PeerAuthns(_) => "PeerAuthentications",
        }
    }
}

type ChangeStream = Pin<Box<dyn Stream<Item = Change> + Send>>;

/// What the watches parse: the API types cut down to the fields the source reads. Everything
/// else in the JSON (`managedFields`, annotations such as `kubectl`'s copy of the whole
/// object, pod containers and statuses, service status) is skipped by the parser without
/// being allocated, so a 10,000-service list costs what the model needs, not what the API
/// server stores. Each converts into the `k8s-openapi` type the conversion functions take.
mod lean {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::ObjectReference,
            core::v1::{
                HostIP, Namespace, Node, Pod, PodIP, PodSpec, PodStatus, Service, ServiceSpec,
            },
            discovery::v1::{
                Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
            },
        },
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };
    use serde::{Deserialize, Deserializer};

    use super::ZONE_LABEL;

    /// The metadata fields read (no annotations: settings come only from `TrafficPolicy`).
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        deletion_timestamp: Option<Time>,
        labels: Option<BTreeMap<String, String>>,
    }

    fn meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
        let m = Meta::deserialize(d)?;
        Ok(ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            deletion_timestamp: m.deletion_timestamp,
            labels: m.labels,
            ..ObjectMeta::default()
        })
    }

    /// Declares a lean type as the API resource it stands for, so `Api<Lean>` lists and watches
    /// the same URLs.
    macro_rules! resource {
        ($lean:ident, $full:ty) => {
            impl k8s_openapi::Resource for $lean {
                const API_VERSION: &'static str = <$full as k8s_openapi::Resource>::API_VERSION;
                const GROUP: &'static str = <$full as k8s_openapi::Resource>::GROUP;
                const KIND: &'static str = <$full as k8s_openapi::Resource>::KIND;
                const VERSION: &'static str = <$full as k8s_openapi::Resource>::VERSION;
                const URL_PATH_SEGMENT: &'static str =
                    <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT;
                type Scope = <$full as k8s_openapi::Resource>::Scope;
            }
            impl k8s_openapi::ListableResource for $lean {
                const LIST_KIND: &'static str = <$full as k8s_openapi::ListableResource>::LIST_KIND;
            }
            impl k8s_openapi::Metadata for $lean {
                type Ty = ObjectMeta;
                fn metadata(&self) -> &ObjectMeta {
                    &self.metadata
                }
                fn metadata_mut(&mut self) -> &mut ObjectMeta {
                    &mut self.metadata
                }
            }
        };
    }

    /// A Service: metadata and spec (no status).
    #[derive(Clone, Debug, Deserialize)]
    pub struct LeanService {
        #[serde(deserialize_with = "meta")]
        metadata: ObjectMeta,
        spec: Option<ServiceSpec>,
    }
    resource!(LeanService, Service);

    impl LeanService {
        pub fn into_full(self) -> Service {
            Service {
                metadata: self.metadata,
                spec: self.spec,
                status: None,
            }
        }
    }

    /// The `targetRef` fields read.
    #[derive(Clone, Debug, Deserialize)]
    struct LeanRef {
        kind: Option<String>,
        name: Option<String>,
        namespace: Option<String>,
    }

    /// An endpoint of a slice: a whole list of slices is held at once while it is parsed, so
    /// `targetRef`'s other fields and `deprecatedTopology` are not.
    #[derive(Clone, Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct LeanEndpoint {
        #[serde(default)]
        addresses: Vec<String>,
        conditions: Option<EndpointConditions>,
        hints: Option<EndpointHints>,
        node_name: Option<String>,
        target_ref: Option<LeanRef>,
        zone: Option<String>,
    }

    /// An `EndpointSlice`.
    #[derive(Clone, Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct LeanSlice {
        #[serde(deserialize_with = "meta")]
        metadata: ObjectMeta,
        address_type: String,
        #[serde(default)]
        endpoints: Vec<LeanEndpoint>,
        ports: Option<Vec<EndpointPort>>,
    }
    resource!(LeanSlice, EndpointSlice);

    impl LeanSlice {
        pub fn into_full(self) -> EndpointSlice {
            EndpointSlice {
                metadata: self.metadata,
                address_type: self.address_type,
                endpoints: self
                    .endpoints
                    .into_iter()
                    .map(|e| Endpoint {
                        addresses: e.addresses,
                        conditions: e.conditions,
                        hints: e.hints,
                        node_name: e.node_name,
                        target_ref: e.target_ref.map(|r| ObjectReference {
                            kind: r.kind,
                            name: r.name,
                            namespace: r.namespace,
                            ..ObjectReference::default()
                        }),
                        zone: e.zone,
                        ..Endpoint::default()
                    })
                    .collect(),
                ports: self.ports,
            }
        }
    }

    #[derive(Clone, Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct LeanPodSpec {
        node_name: Option<String>,
        service_account_name: Option<String>,
        host_network: Option<bool>,
    }

    #[derive(Clone, Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct LeanPodStatus {
        phase: Option<String>,
        #[serde(rename = "hostIP")]
        host_ip: Option<String>,
        #[serde(rename = "hostIPs")]
        host_ips: Option<Vec<HostIP>>,
        #[serde(rename = "podIP")]
        pod_ip: Option<String>,
        #[serde(rename = "podIPs")]
        pod_ips: Option<Vec<PodIP>>,
    }

    /// A Pod: node, service account, host network, phase and addresses.
    #[derive(Clone, Debug, Deserialize)]
    pub struct LeanPod {
        #[serde(deserialize_with = "meta")]
        metadata: ObjectMeta,
        spec: Option<LeanPodSpec>,
        status: Option<LeanPodStatus>,
    }
    resource!(LeanPod, Pod);

    impl LeanPod {
        /// Labels are kept: authorization and peer-authentication selectors match them (the
        /// store then keeps only what the model needs, see `StoredPod`).
        pub fn into_full(self) -> Pod {
            Pod {
                metadata: self.metadata,
                spec: self.spec.map(|s| PodSpec {
                    node_name: s.node_name,
                    service_account_name: s.service_account_name,
                    host_network: s.host_network,
                    ..PodSpec::default()
                }),
                status: self.status.map(|s| PodStatus {
                    phase: s.phase,
                    host_ip: s.host_ip,
                    host_ips: s.host_ips,
                    pod_ip: s.pod_ip,
                    pod_ips: s.pod_ips,
                    ..PodStatus::default()
                }),
            }
        }
    }

    #[derive(Clone, Debug, Deserialize)]
    struct LeanNamespaceStatus {
        phase: Option<String>,
    }

    /// A Namespace: its name, deletion mark and phase.
    #[derive(Clone, Debug, Deserialize)]
    pub struct LeanNamespace {
        #[serde(deserialize_with = "meta")]
        metadata: ObjectMeta,
        status: Option<LeanNamespaceStatus>,
    }
    resource!(LeanNamespace, Namespace);

    impl LeanNamespace {
        pub fn into_full(self) -> Namespace {
            let mut metadata = self.metadata;
            if let Some(labels) = metadata.labels.as_mut() {
                labels.retain(|k, _| k == crate::authz::DATAPLANE_MODE_LABEL);
            }
            Namespace {
                metadata,
                spec: None,
                status: self
                    .status
                    .map(|s| k8s_openapi::api::core::v1::NamespaceStatus {
                        phase: s.phase,
                        conditions: None,
                    }),
            }
        }
    }

    /// A Node: only its zone label (its status lists every image on the node).
    #[derive(Clone, Debug, Deserialize)]
    pub struct LeanNode {
        #[serde(deserialize_with = "meta")]
        metadata: ObjectMeta,
    }
    resource!(LeanNode, Node);

    impl LeanNode {
        pub fn into_full(self) -> Node {
            let mut metadata = self.metadata;
            if let Some(labels) = metadata.labels.as_mut() {
                labels.retain(|k, _| k == ZONE_LABEL);
            }
            Node {
                metadata,
                spec: None,
                status: None,
            }
        }
    }
}

/// A watch event of a lean type as the event of its full type.
fn full_event<L, K>(event: watcher::Event<L>, into: fn(L) -> K) -> watcher::Event<K> {
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(into(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(into(o)),
        watcher::Event::InitApply(o) => watcher::Event::InitApply(into(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// A watch's configuration for the mode in use (`streaming`: streaming lists, else lists).
///
/// Streaming (kube-rs `streaming_lists()`): the first watch asks for `sendInitialEvents=true`,
/// `resourceVersionMatch=NotOlderThan`, `resourceVersion=0` and bookmarks; the API server sends
/// every object from its watch cache as one ADDED event each, then a BOOKMARK annotated
/// `k8s.io/initial-events-end`, so at most one object's text is held at a time — the initial
/// list that was the source's memory peak (a 28 MB response for 10,000 slices, plus its parse)
/// is never held whole. client-go's informers do the same with `WatchListClient` on.
///
/// Lists: from the API server's watch cache (`resourceVersion=0`, as informers list; a quorum
/// read of every object would load etcd on each agent restart). Unpaginated: kube-rs leaves
/// `resourceVersion=0` out of a request with a `limit` (a paginated list is a quorum read), and
/// the API server serves a `resourceVersion=0` list from its cache in one response anyway (as
/// it does for client-go's informers, whose `limit` it ignores there).
fn watch_config(config: watcher::Config, streaming: bool) -> watcher::Config {
    let mut config = config.any_semantic();
    config.page_size = None;
    if streaming {
        config.streaming_lists()
    } else {
        config
    }
}

/// One watch (see [`watch_config`]), each object parsed as its lean type `L` (see [`lean`])
/// and turned into its full type `K`.
fn watch<L, K>(
    api: Api<L>,
    config: watcher::Config,
    streaming: bool,
    into: fn(L) -> K,
    wrap: fn(Box<Result<watcher::Event<K>, watcher::Error>>) -> Change,
) -> ChangeStream
where
    L: Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
    L::DynamicType: Default,
    K: 'static,
{
    watcher(api, watch_config(config, streaming))
        .default_backoff()
        .map(move |r| wrap(Box::new(r.map(|e| full_event(e, into)))))
        .boxed()
}

impl State {
    fn apply(&mut self, change: Change) {
        let kind = change.kind();
        let err = match change {
            Change::Services(r) => (*r).map(|e| self.services.apply_service(e)).err(),
            Change::Slices(r) => (*r)
                .map(|e| self.slices.apply_slice(&mut self.names, e))
                .err(),
            Change::Pods(r) => (*r).map(|e| self.pods.apply_pod(&self.node, e)).err(),
            Change::Namespaces(r) => (*r).map(|e| self.namespaces.apply(e)).err(),
            Change::Nodes(r) => (*r).map(|e| self.nodes.apply(e)).err(),
            Change::Policies(r) => match *r {
                Ok(e) => {
                    self.policy_crd_missing = false;
                    self.policies.apply(e);
                    None
                }
                Err(e) if crd_missing(&e) => {
                    // Not an outage: the cluster has no policies. Run with the defaults (and
                    // without stale ones) while the watch keeps retrying.
                    if !self.policy_crd_missing {
                        warn!(
                            crd = "trafficpolicies.traffic.kernmesh.io",
                            "the TrafficPolicy CRD is not installed; every service uses the defaults"
                        );
                    }
                    self.policy_crd_missing = true;
                    self.policies.objects.clear();
                    self.policies.relisting = None;
                    self.policies.ready = true;
                    None
                }
                Err(e) => Some(e),
            },
            Change::AuthzPolicies(r) => {
                let crd = "authorizationpolicies.security.kernmesh.io";
                security_change(
                    &mut self.authz_policies,
                    &mut self.security_crd_missing,
                    crd,
                    *r,
                )
            }
            Change::PeerAuthns(r) => {
                let crd = "peerauthentications.security.kernmesh.io";
                security_change(
                    &mut self.peer_authns,
                    &mut self.security_crd_missing,
                    crd,
                    *r,
                )
            }
        };
        if let Some(e) = err {
            warn!(kind, error = %e, "watch error; retrying with backoff");
        }
    }
}

/// The `Accepted` condition a security object's status should carry: `True`/`Accepted`, or
/// `False`/`Invalid` with the problems (the last valid version, if any, keeps applying).
fn security_desired(
    obj: &DynamicObject,
    resource: &ApiResource,
    generation: Option<i64>,
    error: Option<&crate::authz::ObjectError>,
) -> Desired {
    let (status, reason, message) = match error {
        None => ("True", policy::Reason::Accepted, String::new()),
        Some(e) => ("False", policy::Reason::Invalid, e.to_string()),
    };
    Desired {
        condition: policy::types::PolicyCondition {
            type_: policy::status::CONDITION_ACCEPTED.to_owned(),
            status: status.to_owned(),
            reason: reason.as_str().to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: String::new(),
        },
        current: policy::status::current_condition(obj),
        reference: obj.object_ref(resource),
    }
}

/// A rejected object's problems (`field: reason; …; rejected as a whole`), without the object's
/// name, which the rejection carries.
fn problems_text(e: &crate::authz::ObjectError) -> String {
    let problems: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
    format!("{}; rejected as a whole", problems.join("; "))
}

/// The object to apply: `p` if valid (remembered in `next`), else its last valid version if it
/// had one (kept in `next`), else `p` itself (invalid: applies nowhere).
fn keep_last_good<T: Clone>(
    p: crate::authz::parse::Parsed<T>,
    last: &BTreeMap<ObjectName, crate::authz::parse::Parsed<T>>,
    next: &mut BTreeMap<ObjectName, crate::authz::parse::Parsed<T>>,
) -> crate::authz::parse::Parsed<T> {
    if p.outcome.is_ok() {
        next.insert(p.name.clone(), p.clone());
        return p;
    }
    match last.get(&p.name) {
        Some(good) => {
            next.insert(p.name.clone(), good.clone());
            let mut kept = good.clone();
            kept.superseded_by = p.outcome.err();
            kept
        }
        None => p,
    }
}

/// Applies a security-object watch event; a missing CRD means no such objects (not an outage),
/// as for `TrafficPolicy`.
fn security_change(
    store: &mut Store<DynamicObject>,
    missing: &mut BTreeSet<&'static str>,
    crd: &'static str,
    r: Result<watcher::Event<DynamicObject>, watcher::Error>,
) -> Option<watcher::Error> {
    match r {
        Ok(e) => {
            missing.remove(crd);
            store.apply(e);
            None
        }
        Err(e) if crd_missing(&e) => {
            if missing.insert(crd) {
                warn!(crd, "CRD not installed; no such objects apply");
            }
            store.objects.clear();
            store.relisting = None;
            store.ready = true;
            None
        }
        Err(e) => Some(e),
    }
}

/// Whether a watch error says the resource does not exist (a CRD not installed).
fn crd_missing(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// The watches, merged (see the module docs for their selectors), streaming their initial
/// state or listing it (see [`watch_config`]).
fn watches(
    client: &kube::Client,
    node: &str,
    streaming: bool,
) -> futures::stream::SelectAll<ChangeStream> {
    select_all([
        watch(
            Api::<lean::LeanService>::all(client.clone()),
            watcher::Config::default().labels(PROXY_LABEL_SELECTOR),
            streaming,
            lean::LeanService::into_full,
            Change::Services,
        ),
        watch(
            Api::<lean::LeanSlice>::all(client.clone()),
            watcher::Config::default().labels(PROXY_LABEL_SELECTOR),
            streaming,
            lean::LeanSlice::into_full,
            Change::Slices,
        ),
        watch(
            // Every node's pods: a pod elsewhere in the mesh is a tunnel destination whose
            // identity (service account) and node the capture needs, as ztunnel learns every
            // workload from istiod. Slimmed to what the model reads.
            Api::<lean::LeanPod>::all(client.clone()),
            watcher::Config::default(),
            streaming,
            lean::LeanPod::into_full,
            Change::Pods,
        ),
        watch(
            Api::<lean::LeanNamespace>::all(client.clone()),
            watcher::Config::default(),
            streaming,
            lean::LeanNamespace::into_full,
            Change::Namespaces,
        ),
        watch(
            Api::<lean::LeanNode>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            streaming,
            lean::LeanNode::into_full,
            Change::Nodes,
        ),
        // Whole dynamic objects, not a lean type: the policy parser reports every field of a
        // malformed policy, and the status writer reads its conditions. Policies are few.
        // Listed or streamed as the other watches (see [`watch_config`]).
        dynamic_watch::<TrafficPolicy>(client, streaming, Change::Policies),
        dynamic_watch::<crate::authz::types::AuthorizationPolicy>(
            client,
            streaming,
            Change::AuthzPolicies,
        ),
        dynamic_watch::<crate::authz::types::PeerAuthentication>(
            client,
            streaming,
            Change::PeerAuthns,
        ),
    ])
}

/// A watch of whole dynamic objects of a custom resource `K` (as the `TrafficPolicy` one).
fn dynamic_watch<K>(
    client: &kube::Client,
    streaming: bool,
    wrap: fn(Box<Result<watcher::Event<DynamicObject>, watcher::Error>>) -> Change,
) -> ChangeStream
where
    K: Resource<DynamicType = ()>,
{
    watcher(
        Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<K>(&())),
        watch_config(watcher::Config::default(), streaming),
    )
    .default_backoff()
    .map(move |r| wrap(Box::new(r)))
    .boxed()
}

/// Watches the API through `client` and sends a complete model for `node` after each batch of
/// changes. Returns `Err(ChannelClosed)` when `updates` is closed; watch errors are retried.
/// Policy status is written by the elected agent when the downward API names the agent's pod
/// ([`StatusConfig::from_env`]). Initial state: [`ListMode::Auto`] (see [`run_with_mode`]).
pub async fn run(
    client: kube::Client,
    node: String,
    updates: mpsc::Sender<Update>,
) -> Result<(), KubernetesError> {
    run_with_mode(client, node, ListMode::Auto, updates).await
}

/// [`run`] with the initial state got as `mode` says (the agent's `discovery.listMode`).
pub async fn run_with_mode(
    client: kube::Client,
    node: String,
    mode: ListMode,
    updates: mpsc::Sender<Update>,
) -> Result<(), KubernetesError> {
    let status = StatusConfig::from_env(&node);
    run_with_status(client, node, mode, status, updates).await
}

/// Set once an API server refused streaming lists (or never ended one) in [`ListMode::Auto`]:
/// later runs of the source in this process (restarts by the supervisor) list at once, and the
/// fallback is logged only by the run that set it.
static STREAMING_REFUSED: AtomicBool = AtomicBool::new(false);

/// Whether a watch event in [`ListMode::Auto`] while streaming says to fall back to lists, as
/// client-go's reflector does: the API server refused the streaming watch's options (an API
/// server older than 1.27 forbids `resourceVersionMatch` on a watch, a newer one with the
/// `WatchList` gate off forbids `sendInitialEvents`; both answer 422 Invalid), or a watch
/// restarted its initial state before the initial-events-end bookmark ever came (a server that
/// ignores `sendInitialEvents` sends the objects but no bookmark; kube-rs then starts over when
/// the watch times out, after `timeoutSeconds` = 290 s). `unfinished` holds the watches whose
/// streamed initial state has begun and not yet ended.
fn streaming_fails(change: &Change, unfinished: &mut BTreeSet<&'static str>) -> bool {
    match change.marker() {
        Marker::Refused => true,
        Marker::Init => !unfinished.insert(change.kind()),
        Marker::InitDone => {
            unfinished.remove(change.kind());
            false
        }
        Marker::Other => false,
    }
}

/// Whether a run of the source in `mode` starts with streaming lists.
fn streams_first(mode: ListMode) -> bool {
    match mode {
        ListMode::Stream => true,
        ListMode::List => false,
        ListMode::Auto => !STREAMING_REFUSED.load(Ordering::Relaxed),
    }
}

/// Records the fallback to lists for later runs, logging it only the first time.
fn note_fallback() {
    if !STREAMING_REFUSED.swap(true, Ordering::Relaxed) {
        warn!(
            "the API server does not serve streaming lists (sendInitialEvents, Kubernetes \
             1.27+ with the WatchList feature); listing instead, as client-go's reflector \
             falls back (set discovery.listMode to list to skip the attempt)"
        );
    }
}

/// Applies one batch of changes (until [`DEBOUNCE`] passes quietly, at most [`MAX_BATCH`]);
/// with `unfinished` (streaming in [`ListMode::Auto`]) returns `true` as soon as a change says
/// to fall back to lists (see [`streaming_fails`]).
async fn apply_batch(
    changes: &mut futures::stream::SelectAll<ChangeStream>,
    state: &mut State,
    mut unfinished: Option<&mut BTreeSet<&'static str>>,
) -> Result<bool, KubernetesError> {
    let mut take = |change: Change, state: &mut State| {
        let fails = unfinished
            .as_deref_mut()
            .is_some_and(|u| streaming_fails(&change, u));
        state.apply(change);
        fails
    };
    let Some(first) = changes.next().await else {
        return Err(KubernetesError::WatchEnded { kind: "all" });
    };
    if take(first, state) {
        return Ok(true);
    }
    let deadline = Instant::now() + MAX_BATCH;
    while Instant::now() < deadline {
        match tokio::time::timeout(DEBOUNCE, changes.next()).await {
            Ok(Some(change)) => {
                if take(change, state) {
                    return Ok(true);
                }
            }
            Ok(None) => return Err(KubernetesError::WatchEnded { kind: "all" }),
            Err(_) => break,
        }
    }
    Ok(false)
}

/// [`run_with_mode`], standing for election as policy status writer with `status` (none:
/// never write).
pub async fn run_with_status(
    client: kube::Client,
    node: String,
    mode: ListMode,
    status: Option<StatusConfig>,
    updates: mpsc::Sender<Update>,
) -> Result<(), KubernetesError> {
    let statuses = StatusSenders::start(&client, status);
    let mut streaming = streams_first(mode);
    // Only `auto` falls back; a forced `stream` retries a refusing server with backoff.
    let mut may_fall_back = mode == ListMode::Auto && streaming;
    let mut unfinished: BTreeSet<&'static str> = BTreeSet::new();
    let mut changes = watches(&client, &node, streaming);
    let mut state = State::new(node.clone());
    // The digest of the last model sent, not a copy of it (see `ClusterModel::digest`).
    let mut last_sent: Option<u64> = None;
    info!(
        node = %node,
        list_mode = mode.name(),
        initial_state = if streaming { "streaming lists" } else { "lists" },
        "watching Kubernetes: Services, EndpointSlices, Pods of every node, Namespaces, this \
         Node, TrafficPolicies, AuthorizationPolicies, PeerAuthentications"
    );
    loop {
        let unfinished = may_fall_back.then_some(&mut unfinished);
        if apply_batch(&mut changes, &mut state, unfinished).await? {
            // Every watch starts over with a list; each replaces its store when its list is
            // complete (a watch that had finished streaming keeps serving its store meanwhile).
            note_fallback();
            streaming = false;
            may_fall_back = false;
            changes = watches(&client, &node, streaming);
        }
        if !state.ready() {
            continue;
        }
        let had_problems: Vec<ObjectName> = state.reported.keys().cloned().collect();
        if last_sent.is_none() {
            // The start of the first model: the control-plane benchmark times from here.
            info!(
                services = state.services.objects.len(),
                slices = state.slices.objects.len(),
                pods = state.pods.objects.len(),
                policies = state.policies.objects.len(),
                "initial lists complete"
            );
        }
        // Building (and hashing) a 10,000-service model takes hundreds of milliseconds of CPU:
        // on a blocking thread, so the runtime's workers keep serving the admin API and
        // draining flow events meanwhile (the file source parses the same way). The state
        // moves there and back; nothing else uses it meanwhile.
        let built = tokio::task::spawn_blocking(move || {
            let (mut model, rejections) = state.build();
            let security = state.security(&mut model);
            let digest = model.digest();
            (state, model, rejections, security, digest)
        })
        .await;
        let (model, rejections, security, digest);
        (state, model, rejections, security, digest) = match built {
            Ok(built) => built,
            // A panic in the build stays a panic of this source: the supervisor reports it and
            // restarts the source with backoff.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(KubernetesError::BuildCancelled { node }),
        };
        let (security_rejections, security_resolved) = security;
        statuses.publish(&state);
        if last_sent != Some(digest) {
            debug!(
                services = model.services.len(),
                pods = model.pods.len(),
                policies = model.policies.policies.len(),
                "sending the cluster model"
            );
            if last_sent.is_none()
                && let Some(ip) = api_server_cluster_ip(
                    std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
                    &model,
                )
            {
                warn!(
                    cluster_ip = %ip,
                    "the API server is reached through a ClusterIP this agent programs; an agent \
                     down while the control plane moves could not list again: set \
                     k8s-service-host and k8s-service-port (Helm: k8sServiceHost, \
                     k8sServicePort) to its direct address"
                );
            }
            if updates.send(Update::Model(model)).await.is_err() {
                return Err(KubernetesError::ChannelClosed { node });
            }
            last_sent = Some(digest);
        }
        // A policy that was rejected and is now valid (or gone) clears its rejection.
        for name in had_problems {
            if !state.reported.contains_key(&name) {
                let resolved = Update::Resolved(ObjectRef::new("TrafficPolicy", name));
                if updates.send(resolved).await.is_err() {
                    return Err(KubernetesError::ChannelClosed { node });
                }
            }
        }
        for r in rejections {
            warn!(policy = %r.policy, "{r}");
            if updates.send(Update::Rejected(r.into())).await.is_err() {
                return Err(KubernetesError::ChannelClosed { node });
            }
        }
        if send_security(&updates, security_resolved, security_rejections)
            .await
            .is_err()
        {
            return Err(KubernetesError::ChannelClosed { node });
        }
    }
}

/// The desired statuses per kind, sent to the elected writer.
struct StatusSenders {
    traffic: watch_channel::Sender<Arc<DesiredStatus>>,
    authz: watch_channel::Sender<Arc<DesiredStatus>>,
    peer: watch_channel::Sender<Arc<DesiredStatus>>,
}

impl StatusSenders {
    /// Starts the writer (one election for every kind) when `status` names this agent's pod.
    fn start(client: &kube::Client, status: Option<StatusConfig>) -> Self {
        let (traffic, traffic_rx) = watch_channel::channel(Arc::new(DesiredStatus::new()));
        let (authz, authz_rx) = watch_channel::channel(Arc::new(DesiredStatus::new()));
        let (peer, peer_rx) = watch_channel::channel(Arc::new(DesiredStatus::new()));
        if let Some(config) = status {
            tokio::spawn(policy::status::run_many(
                client.clone(),
                config,
                vec![
                    (ApiResource::erase::<TrafficPolicy>(&()), traffic_rx),
                    (
                        ApiResource::erase::<crate::authz::types::AuthorizationPolicy>(&()),
                        authz_rx,
                    ),
                    (
                        ApiResource::erase::<crate::authz::types::PeerAuthentication>(&()),
                        peer_rx,
                    ),
                ],
            ));
        }
        Self {
            traffic,
            authz,
            peer,
        }
    }

    /// Sends each kind's desired status if it changed.
    fn publish(&self, state: &State) {
        for (tx, now) in [
            (&self.traffic, &state.desired_status),
            (&self.authz, &state.authz_status),
            (&self.peer, &state.peer_status),
        ] {
            tx.send_if_modified(|d| {
                let differs = **d != *now;
                if differs {
                    *d = Arc::new(now.clone());
                }
                differs
            });
        }
    }
}

/// Reports security objects whose rejection is over, then the new rejections; `Err` when the
/// agent stopped listening.
async fn send_security(
    updates: &mpsc::Sender<Update>,
    resolved: Vec<(&'static str, ObjectName)>,
    rejections: Vec<discovery::Rejection>,
) -> Result<(), ()> {
    for (kind, name) in resolved {
        let resolved = Update::Resolved(ObjectRef::new(kind, name));
        updates.send(resolved).await.map_err(|_| ())?;
    }
    for r in rejections {
        warn!("{r}; its last valid version, if it had one, keeps applying");
        updates.send(Update::Rejected(r)).await.map_err(|_| ())?;
    }
    Ok(())
}

/// The cluster IP `host` is, if it is one the model programs: the agent would then reach the API
/// server through its own data path (`KUBERNETES_SERVICE_HOST` left at the kubelet's value).
fn api_server_cluster_ip(host: Option<&str>, model: &ClusterModel) -> Option<IpAddr> {
    let ip: IpAddr = host?.trim().parse().ok()?;
    model
        .services
        .values()
        .any(|s| s.cluster_ips.contains(&ip))
        .then_some(ip)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{
        core::v1::{
            ClientIPConfig, ObjectReference, ServicePort as K8sServicePort, SessionAffinityConfig,
        },
        discovery::v1::{Endpoint as K8sEndpoint, EndpointConditions, EndpointPort},
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use kube::api::ObjectMeta;

    use super::*;
    use crate::datapath::spec::{Algorithm, CircuitSettings};

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn service(name: &str, annotations: &[(&str, &str)], ip: &str) -> K8sService {
        K8sService {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("default".to_owned()),
                annotations: Some(ann(annotations)),
                ..ObjectMeta::default()
            },
            spec: Some(K8sServiceSpec {
                cluster_ip: Some(ip.to_owned()),
                cluster_ips: Some(vec![ip.to_owned()]),
                ports: Some(vec![K8sServicePort {
                    name: Some("http".to_owned()),
                    port: 80,
                    target_port: Some(IntOrString::String("web".to_owned())),
                    ..K8sServicePort::default()
                }]),
                ..K8sServiceSpec::default()
            }),
            ..K8sService::default()
        }
    }

    fn slice(name: &str, service: &str, ips: &[(&str, Option<bool>)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("default".to_owned()),
                labels: Some(ann(&[(SERVICE_NAME_LABEL, service)])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".to_owned(),
            endpoints: ips
                .iter()
                .map(|(ip, ready)| K8sEndpoint {
                    addresses: vec![(*ip).to_owned()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        ..EndpointConditions::default()
                    }),
                    node_name: Some("a".to_owned()),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".to_owned()),
                        name: Some(format!("pod-{ip}")),
                        ..ObjectReference::default()
                    }),
                    ..K8sEndpoint::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some("http".to_owned()),
                port: Some(8080),
                protocol: Some("TCP".to_owned()),
                ..EndpointPort::default()
            }]),
        }
    }

    fn namespace(name: &str) -> K8sNamespace {
        K8sNamespace {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..K8sNamespace::default()
        }
    }

    #[test]
    fn a_service_without_policy_has_the_defaults_and_its_own_affinity() {
        assert_eq!(service_settings(None), ServiceSettings::default());
        assert_eq!(
            service_settings(None).circuit,
            CircuitSettings::default(),
            "Envoy's numbers, unlimited connections"
        );
        let mut spec = K8sServiceSpec {
            session_affinity: Some("ClientIP".to_owned()),
            ..K8sServiceSpec::default()
        };
        assert_eq!(
            service_settings(Some(&spec)).affinity_timeout,
            Some(Duration::from_hours(3)),
            "Kubernetes' default timeout"
        );
        spec.session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
        assert_eq!(
            service_settings(Some(&spec)).affinity_timeout,
            Some(Duration::from_mins(1))
        );
        spec.session_affinity = Some("None".to_owned());
        assert_eq!(service_settings(Some(&spec)).affinity_timeout, None);
    }

    #[test]
    fn ips_and_ports_skip_headless_sctp_and_external_name() {
        let mut spec = service("web", &[], "None").spec.unwrap();
        assert!(cluster_ips(&spec).is_empty());
        spec.cluster_ips = Some(vec!["10.96.0.1".to_owned(), "fd00::1".to_owned()]);
        assert_eq!(cluster_ips(&spec).len(), 2);
        spec.type_ = Some("ExternalName".to_owned());
        assert!(cluster_ips(&spec).is_empty());
        spec.ports = Some(vec![
            K8sServicePort {
                name: Some("dns".to_owned()),
                port: 53,
                protocol: Some("UDP".to_owned()),
                ..K8sServicePort::default()
            },
            K8sServicePort {
                name: Some("sctp".to_owned()),
                port: 9,
                protocol: Some("SCTP".to_owned()),
                ..K8sServicePort::default()
            },
            K8sServicePort {
                name: Some("http".to_owned()),
                port: 80,
                target_port: Some(IntOrString::Int(8080)),
                ..K8sServicePort::default()
            },
        ]);
        let ports = service_ports(&spec);
        assert_eq!(
            ports,
            vec![
                ServicePort {
                    name: "dns".to_owned(),
                    port: 53,
                    protocol: Protocol::Udp,
                    target_port: None
                },
                ServicePort {
                    name: "http".to_owned(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    target_port: None
                },
            ]
        );
    }

    #[test]
    fn slices_merge_and_resolve_named_target_ports() {
        let mut state = State::new("a".to_owned());
        for e in [
            watcher::Event::Apply(namespace("default")),
            watcher::Event::InitDone,
        ] {
            state.namespaces.apply(e);
        }
        state
            .services
            .apply_service(watcher::Event::Apply(service("web", &[], "10.96.0.20")));
        state.slices.apply_slice(
            &mut Names::default(),
            watcher::Event::Apply(slice(
                "web-1",
                "web",
                &[("10.1.0.2", None), ("10.1.0.3", Some(false))],
            )),
        );
        state.slices.apply_slice(
            &mut Names::default(),
            watcher::Event::Apply(slice(
                "web-2",
                "web",
                &[("10.1.0.4", Some(true)), ("10.1.0.2", None)],
            )),
        );
        state.slices.apply_slice(
            &mut Names::default(),
            watcher::Event::Apply(slice("other", "db", &[("10.1.0.9", None)])),
        );
        let (m, rejections) = state.build();
        assert!(rejections.is_empty());
        let svc = &m.services[&ObjectName::new("default", "web")];
        let ips: Vec<String> = svc.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["10.1.0.2", "10.1.0.3", "10.1.0.4"]);
        assert_eq!(
            svc.endpoints.iter().map(|e| e.ready).collect::<Vec<_>>(),
            [true, false, true]
        );
        assert_eq!(
            svc.endpoints[0].pod,
            Some(ObjectName::new("default", "pod-10.1.0.2"))
        );
        assert_eq!(svc.endpoints[0].node.as_deref(), Some("a"));
        let specs = m.desired_specs();
        assert_eq!(specs.len(), 1);
        let backends: Vec<String> = specs[0]
            .1
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect();
        assert_eq!(
            backends,
            ["10.1.0.2:8080", "10.1.0.4:8080"],
            "named port resolved, not-ready left out"
        );
    }

    fn traffic_policy(name: &str, created: &str, spec: &serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "traffic.kernmesh.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": { "name": name, "namespace": "default", "creationTimestamp": created },
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn policies_apply_and_an_invalid_one_is_rejected_whole_and_reported_once() {
        let mut state = State::new("a".to_owned());
        state
            .namespaces
            .apply(watcher::Event::Apply(namespace("default")));
        let web = ObjectName::new("default", "web");
        state
            .services
            .apply_service(watcher::Event::Apply(service("web", &[], "10.96.0.20")));
        state
            .services
            .apply_service(watcher::Event::Apply(service("db", &[], "10.96.0.21")));
        state.policies.apply(watcher::Event::Apply(traffic_policy(
            "ns",
            "2026-01-01T00:00:00Z",
            &serde_json::json!({
                "targetRefs": [{ "kind": "Namespace", "name": "default" }],
                "loadBalancer": { "simple": "LEAST_REQUEST" },
            }),
        )));
        state.policies.apply(watcher::Event::Apply(traffic_policy(
            "web",
            "2026-02-01T00:00:00Z",
            &serde_json::json!({
                "targetRefs": [{ "kind": "Service", "name": "web" }],
                "loadBalancer": { "simple": "ROUND_ROBIN" },
                "outlierDetection": { "maxEjectionPercent": 50 },
            }),
        )));
        let (m, r) = state.build();
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(m.services[&web].settings.algorithm, Algorithm::RoundRobin);
        assert_eq!(m.services[&web].settings.circuit.max_ejection_percent, 50);
        assert_eq!(
            m.services[&ObjectName::new("default", "db")]
                .settings
                .algorithm,
            Algorithm::LeastConn,
            "the namespace policy applies where no Service policy does"
        );
        assert_eq!(state.desired_status.len(), 2);
        assert!(
            state
                .desired_status
                .values()
                .all(|d| d.condition.status == "True"),
            "{:?}",
            state.desired_status
        );
        // The Service's policy turns invalid: rejected whole; web falls back to the namespace's.
        state.policies.apply(watcher::Event::Apply(traffic_policy(
            "web",
            "2026-02-01T00:00:00Z",
            &serde_json::json!({
                "targetRefs": [{ "kind": "Service", "name": "web" }],
                "loadBalancer": { "simple": "ROUND_ROBIN" },
                "outlierDetection": { "maxEjectionPercent": 150 },
            }),
        )));
        let (m, r) = state.build();
        assert_eq!(m.services[&web].settings.algorithm, Algorithm::LeastConn);
        assert_eq!(
            m.services[&web].settings.circuit,
            CircuitSettings::default(),
            "nothing of the invalid policy applies"
        );
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].to_string(),
            "TrafficPolicy default/web: spec.outlierDetection.maxEjectionPercent: 150 is not in \
             0..=100; rejected as a whole"
        );
        let d = &state.desired_status[&ObjectName::new("default", "web")];
        assert_eq!(
            (d.condition.status.as_str(), d.condition.reason.as_str()),
            ("False", "Invalid")
        );
        assert_eq!(d.reference.kind.as_deref(), Some("TrafficPolicy"));
        let (_, r) = state.build();
        assert!(r.is_empty(), "reported once while it persists");
        // A policy that is not even well-typed is rejected the same way, alone.
        state.policies.apply(watcher::Event::Apply(traffic_policy(
            "typo",
            "2026-03-01T00:00:00Z",
            &serde_json::json!({ "targetRefs": [{ "kind": "Service", "name": "db" }], "connectionPool": 5 }),
        )));
        let (m, r) = state.build();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            m.services[&ObjectName::new("default", "db")]
                .settings
                .algorithm,
            Algorithm::LeastConn
        );
    }

    #[test]
    fn a_missing_crd_means_no_policies_not_an_outage() {
        let mut state = State::new("a".to_owned());
        let status = kube::core::Status::failure("not found", "NotFound").with_code(404);
        state.apply(Change::Policies(Box::new(Err(
            watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status))),
        ))));
        assert!(state.policies.ready && state.policy_crd_missing);
        let status = kube::core::Status::failure("forbidden", "Forbidden").with_code(403);
        let mut other = State::new("a".to_owned());
        other.apply(Change::Policies(Box::new(Err(
            watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status))),
        ))));
        assert!(
            !other.policies.ready,
            "other errors are retried, not taken as empty"
        );
    }

    #[test]
    fn streaming_falls_back_on_a_refusal_or_a_restart_before_the_bookmark() {
        let refused = |code: u16, kind: &str| {
            let status = kube::core::Status::failure("resourceVersionMatch is forbidden", kind)
                .with_code(code);
            Change::Slices(Box::new(Err(watcher::Error::WatchStartFailed(
                kube::Error::Api(Box::new(status)),
            ))))
        };
        let mut unfinished = BTreeSet::new();
        // What an API server without streaming lists answers: 422 Invalid.
        assert!(streaming_fails(&refused(422, "Invalid"), &mut unfinished));
        assert!(streaming_fails(
            &refused(400, "BadRequest"),
            &mut unfinished
        ));
        // Other errors are retried by the watch, in either mode.
        assert!(!streaming_fails(
            &refused(403, "Forbidden"),
            &mut unfinished
        ));
        assert!(!streaming_fails(&refused(404, "NotFound"), &mut unfinished));
        let pods = |e: watcher::Event<K8sPod>| Change::Pods(Box::new(Ok(e)));
        let slices = |e: watcher::Event<EndpointSlice>| Change::Slices(Box::new(Ok(e)));
        // Each watch begins once; ends with the bookmark; may begin again after (a 410 relist).
        assert!(!streaming_fails(
            &pods(watcher::Event::Init),
            &mut unfinished
        ));
        assert!(!streaming_fails(
            &slices(watcher::Event::Init),
            &mut unfinished
        ));
        assert!(!streaming_fails(
            &pods(watcher::Event::InitDone),
            &mut unfinished
        ));
        assert!(!streaming_fails(
            &pods(watcher::Event::Init),
            &mut unfinished
        ));
        // The slices' stream began again without its bookmark ever coming: no streaming here.
        assert!(streaming_fails(
            &slices(watcher::Event::Init),
            &mut unfinished
        ));
    }

    #[test]
    fn deleted_namespace_drops_its_objects_and_pods_follow_the_node() {
        let mut state = State::new("a".to_owned());
        state
            .namespaces
            .apply(watcher::Event::Apply(namespace("default")));
        state
            .services
            .apply_service(watcher::Event::Apply(service("web", &[], "10.96.0.20")));
        let mut pod = K8sPod {
            metadata: ObjectMeta {
                name: Some("p".to_owned()),
                namespace: Some("default".to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some("a".to_owned()),
                ..Default::default()
            }),
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ips: Some(vec![k8s_openapi::api::core::v1::PodIP {
                    ip: "10.1.0.7".to_owned(),
                }]),
                host_ip: Some("192.168.0.1".to_owned()),
                ..Default::default()
            }),
        };
        state
            .pods
            .apply_pod("a", watcher::Event::Apply(pod.clone()));
        pod.metadata.name = Some("elsewhere".to_owned());
        pod.spec.as_mut().unwrap().node_name = Some("b".to_owned());
        pod.status.as_mut().unwrap().host_ips = Some(vec![
            k8s_openapi::api::core::v1::HostIP {
                ip: "192.168.0.2".to_owned(),
            },
            k8s_openapi::api::core::v1::HostIP {
                ip: "fd00::2".to_owned(),
            },
        ]);
        state.pods.apply_pod("a", watcher::Event::Apply(pod));
        let (m, _) = state.build();
        assert_eq!(m.services.len(), 1);
        // Both are in the model (the other node's is a tunnel destination); only this node's
        // is a local pod.
        assert_eq!(m.pods.len(), 2);
        assert_eq!(m.pods[&ObjectName::new("default", "elsewhere")].node, "b");
        // Where each node's agent is reached: `status.hostIPs`, else `status.hostIP`.
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(m.nodes["a"], vec![ip("192.168.0.1")]);
        assert_eq!(m.nodes["b"], vec![ip("192.168.0.2"), ip("fd00::2")]);
        let p = &m.pods[&ObjectName::new("default", "p")];
        assert_eq!(p.service_account, "default");
        assert_eq!(p.ips, vec!["10.1.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(m.local_pod_ips(), p.ips);
        state
            .namespaces
            .apply(watcher::Event::Delete(namespace("default")));
        let (m, _) = state.build();
        assert!(m.services.is_empty() && m.pods.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_api_is_retried_not_fatal() {
        // Nothing listens on port 1: every watch fails and backs off; no model goes out.
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(run(client, "a".to_owned(), tx));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!task.is_finished(), "run keeps retrying");
        assert!(rx.try_recv().is_err(), "no model from an API never listed");
        drop(rx);
        task.abort();
    }

    #[test]
    fn relist_replaces_the_store_only_when_complete() {
        let mut store = Store::<K8sNamespace>::new();
        store.apply(watcher::Event::Apply(namespace("old")));
        store.apply(watcher::Event::Init);
        store.apply(watcher::Event::InitApply(namespace("new")));
        assert!(
            store.objects.contains_key(&ObjectName::new("", "old")),
            "old contents visible during relist"
        );
        assert!(!store.ready);
        store.apply(watcher::Event::InitDone);
        assert!(store.ready);
        assert_eq!(
            store.objects.keys().cloned().collect::<Vec<_>>(),
            [ObjectName::new("", "new")]
        );
    }

    fn port(name: &str, protocol: Protocol) -> ServicePort {
        ServicePort {
            name: name.to_owned(),
            port: 80,
            protocol,
            target_port: None,
        }
    }

    fn one_endpoint_slice(
        endpoint: &serde_json::Value,
        ports: &serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "s", "namespace": "default" },
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": [endpoint],
        }))
        .unwrap()
    }

    #[test]
    fn an_endpoint_serves_only_the_ports_its_slice_lists_by_name_and_protocol() {
        let s = one_endpoint_slice(
            &serde_json::json!({ "addresses": ["10.1.0.2"] }),
            &serde_json::json!([
                { "name": "http", "port": 8080, "protocol": "TCP" },
                { "name": "dns", "port": 5353, "protocol": "TCP" },
                { "name": "extra", "port": 9000 },
            ]),
        );
        let ports = [port("http", Protocol::Tcp), port("dns", Protocol::Udp)];
        let eps = slice_endpoints(&s, &ports, None);
        assert_eq!(eps.len(), 1);
        // dns is UDP on the service but TCP in the slice; extra is not a service port.
        assert_eq!(
            eps[0].ports,
            Arc::new(BTreeMap::from([("http".to_owned(), 8080)])),
            "{eps:?}"
        );
        assert_eq!(eps[0].port_for(&ports[0]), Some(8080));
        assert_eq!(
            eps[0].port_for(&ports[1]),
            None,
            "no fallback to any number"
        );
        // Conditions absent: ready and serving, not terminating (kube-proxy's reading).
        assert!(eps[0].ready && eps[0].serving && !eps[0].terminating);
    }

    #[test]
    fn conditions_and_hints_are_read_and_prefer_close_hints_own_zones() {
        let ports = [port("", Protocol::Tcp)];
        let listed = serde_json::json!([{ "port": 80 }]);
        let s = one_endpoint_slice(
            &serde_json::json!({
                "addresses": ["10.1.0.2"], "zone": "z1", "nodeName": "n1",
                "conditions": { "ready": false, "serving": true, "terminating": true },
                "hints": { "forZones": [{ "name": "z2" }], "forNodes": [{ "name": "n2" }] },
            }),
            &listed,
        );
        let e = &slice_endpoints(&s, &ports, Some("PreferClose"))[0];
        assert!(!e.ready && e.serving && e.terminating);
        assert_eq!(
            (e.hints.zones.clone(), e.hints.nodes.clone()),
            (
                BTreeSet::from(["z2".to_owned()]),
                BTreeSet::from(["n2".to_owned()])
            ),
            "hints written by the controller win"
        );
        let bare = one_endpoint_slice(
            &serde_json::json!({ "addresses": ["10.1.0.3"], "zone": "z1", "nodeName": "n1" }),
            &listed,
        );
        assert_eq!(
            slice_endpoints(&bare, &ports, None)[0].hints,
            model::Hints::default()
        );
        let e = &slice_endpoints(&bare, &ports, Some("PreferClose"))[0];
        assert_eq!(e.hints.zones, BTreeSet::from(["z1".to_owned()]));
        assert!(e.hints.nodes.is_empty());
        let e = &slice_endpoints(&bare, &ports, Some("PreferSameNode"))[0];
        assert_eq!(e.hints.nodes, BTreeSet::from(["n1".to_owned()]));
        assert_eq!(e.hints.zones, BTreeSet::from(["z1".to_owned()]));
    }

    #[test]
    fn merge_keeps_the_most_usable_copy() {
        let ports = [port("", Protocol::Tcp)];
        let listed = serde_json::json!([{ "port": 80 }]);
        let terminating = one_endpoint_slice(
            &serde_json::json!({ "addresses": ["10.1.0.2"],
                "conditions": { "ready": false, "serving": true, "terminating": true } }),
            &listed,
        );
        let gone = one_endpoint_slice(
            &serde_json::json!({ "addresses": ["10.1.0.2"],
                "conditions": { "ready": false, "serving": false, "terminating": true } }),
            &listed,
        );
        let merged = merge_endpoints(
            slice_endpoints(&gone, &ports, None)
                .into_iter()
                .chain(slice_endpoints(&terminating, &ports, None)),
        );
        assert_eq!(merged.len(), 1);
        assert!(merged[0].serving);
    }

    #[test]
    fn lean_parsing_keeps_what_the_model_reads_and_drops_the_rest() {
        let fat = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "p", "namespace": "default", "uid": "u1",
                "labels": { "app": "x" },
                "annotations": { "big": "x".repeat(10_000) },
                "managedFields": [{ "manager": "kubectl", "operation": "Apply" }] },
            "spec": { "nodeName": "a", "hostNetwork": true, "serviceAccountName": "sa",
                "containers": [{ "name": "c", "image": "i" }] },
            "status": { "phase": "Running", "podIPs": [{ "ip": "192.168.0.1" }],
                "conditions": [{ "type": "Ready", "status": "True" }] },
        });
        let full: K8sPod = serde_json::from_value(fat.clone()).unwrap();
        let lean: lean::LeanPod = serde_json::from_value(fat).unwrap();
        let pod = lean.into_full();
        assert_eq!(pod_of(&pod), pod_of(&full));
        assert!(pod_of(&pod).unwrap().host_network);
        assert!(pod.metadata.managed_fields.is_none() && pod.metadata.annotations.is_none());
        assert!(pod.spec.as_ref().unwrap().containers.is_empty());
        assert!(pod.status.as_ref().unwrap().conditions.is_none());

        let mut fat = serde_json::to_value(service(
            "web",
            &[("kubectl.kubernetes.io/last-applied-configuration", "{}")],
            "10.96.0.20",
        ))
        .unwrap();
        fat["spec"]["sessionAffinity"] = serde_json::json!("ClientIP");
        fat["metadata"]["managedFields"] = serde_json::json!([{ "manager": "m" }]);
        fat["status"] = serde_json::json!({ "loadBalancer": {} });
        let full: K8sService = serde_json::from_value(fat.clone()).unwrap();
        let svc = serde_json::from_value::<lean::LeanService>(fat)
            .unwrap()
            .into_full();
        assert_eq!(
            service_settings(svc.spec.as_ref()),
            service_settings(full.spec.as_ref())
        );
        assert_eq!(
            service_settings(svc.spec.as_ref()).affinity_timeout,
            Some(DEFAULT_AFFINITY_TIMEOUT)
        );
        assert!(
            svc.metadata.annotations.is_none(),
            "no annotations kept: settings come only from TrafficPolicy"
        );
        assert!(svc.metadata.managed_fields.is_none() && svc.status.is_none());
        assert_eq!(svc.spec, full.spec);

        let fat = serde_json::to_value(slice("s", "web", &[("10.1.0.2", Some(false))])).unwrap();
        let full: EndpointSlice = serde_json::from_value(fat.clone()).unwrap();
        let lean = serde_json::from_value::<lean::LeanSlice>(fat)
            .unwrap()
            .into_full();
        assert_eq!(
            StoredSlice::new(&lean, &mut Names::default()),
            StoredSlice::new(&full, &mut Names::default())
        );

        let node = serde_json::from_value::<lean::LeanNode>(serde_json::json!({
            "metadata": { "name": "a", "labels": { ZONE_LABEL: "z1", "kubernetes.io/os": "linux" } },
            "status": { "images": [{ "names": ["x"] }] },
        }))
        .unwrap()
        .into_full();
        assert_eq!(node.labels().len(), 1);
        assert!(node.status.is_none());
        let ns = serde_json::from_value::<lean::LeanNamespace>(serde_json::json!({
            "metadata": { "name": "x", "deletionTimestamp": "2026-11-29T10:00:00Z" },
            "status": { "phase": "Terminating" },
        }))
        .unwrap()
        .into_full();
        assert!(ns.metadata.deletion_timestamp.is_some());
        assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Terminating"));
    }

    #[test]
    fn an_api_server_behind_a_programmed_cluster_ip_is_noticed() {
        let mut state = State::new("a".to_owned());
        state
            .namespaces
            .apply(watcher::Event::Apply(namespace("default")));
        state.services.apply_service(watcher::Event::Apply(service(
            "kubernetes",
            &[],
            "10.96.0.1",
        )));
        let (m, _) = state.build();
        assert_eq!(
            api_server_cluster_ip(Some("10.96.0.1"), &m),
            Some("10.96.0.1".parse().unwrap())
        );
        assert_eq!(api_server_cluster_ip(Some("192.168.1.10"), &m), None);
        assert_eq!(api_server_cluster_ip(Some("api.example.com"), &m), None);
        assert_eq!(api_server_cluster_ip(None, &m), None);
    }

    #[test]
    fn the_zone_comes_from_this_nodes_object_and_policy_from_the_spec() {
        let mut state = State::new("a".to_owned());
        state
            .namespaces
            .apply(watcher::Event::Apply(namespace("default")));
        let node = |name: &str, zone: &str| -> K8sNode {
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": name, "labels": { ZONE_LABEL: zone } },
            }))
            .unwrap()
        };
        state.nodes.apply(watcher::Event::Apply(node("b", "z2")));
        assert_eq!(
            state.build().0.node_zone,
            None,
            "another node's zone is not ours"
        );
        state.nodes.apply(watcher::Event::Apply(node("a", "z1")));
        assert_eq!(state.build().0.node_zone.as_deref(), Some("z1"));
        let mut svc = service("web", &[], "10.96.0.20");
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".to_owned());
        state.services.apply_service(watcher::Event::Apply(svc));
        let (m, _) = state.build();
        assert_eq!(
            m.services[&ObjectName::new("default", "web")].internal_traffic_policy,
            model::TrafficPolicy::Local
        );
    }

    fn security_object(kind: &str, name: &str, spec: &serde_json::Value) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "security.kernmesh.io/v1alpha1",
            "kind": kind,
            "metadata": { "name": name, "namespace": "default" },
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn enrollment_labels_and_security_objects_reach_the_model_and_the_last_good_stays() {
        let mut state = State::new("a".to_owned());
        let mut ns = namespace("default");
        ns.metadata.labels = Some(ann(&[(crate::authz::DATAPLANE_MODE_LABEL, "mesh")]));
        state.namespaces.apply(watcher::Event::Apply(ns));
        let mut legacy = service("legacy", &[], "10.96.0.30");
        legacy.metadata.labels = Some(ann(&[(crate::authz::DATAPLANE_MODE_LABEL, "none")]));
        state.services.apply_service(watcher::Event::Apply(legacy));
        state
            .services
            .apply_service(watcher::Event::Apply(service("web", &[], "10.96.0.31")));
        let deny = serde_json::json!({
            "action": "DENY",
            "rules": [{ "from": [{ "source": { "namespaces": ["other"] } }] }],
        });
        state
            .authz_policies
            .apply(watcher::Event::Apply(security_object(
                "AuthorizationPolicy",
                "deny-other",
                &deny,
            )));
        state
            .peer_authns
            .apply(watcher::Event::Apply(security_object(
                "PeerAuthentication",
                "default",
                &serde_json::json!({ "mtls": { "mode": "STRICT" } }),
            )));
        let (mut m, _) = state.build();
        let (rejected, resolved) = state.security(&mut m);
        assert!(rejected.is_empty() && resolved.is_empty(), "{rejected:?}");
        assert_eq!(
            m.mesh.namespace_modes.get("default"),
            Some(&crate::authz::DataplaneMode::Mesh)
        );
        assert!(
            m.mesh
                .opted_out_services
                .contains(&ObjectName::new("default", "legacy"))
        );
        assert!(
            !m.mesh
                .opted_out_services
                .contains(&ObjectName::new("default", "web"))
        );
        assert_eq!(m.mesh.authorization.len(), 1);
        assert_eq!(m.mesh.peer_authentication.len(), 1);

        // An edit adds an L7 field: rejected (once) with object, field and reason, and the
        // last valid version keeps applying.
        let mut bad = deny.clone();
        bad["rules"][0]["to"] = serde_json::json!([{ "operation": { "methods": ["GET"] } }]);
        state
            .authz_policies
            .apply(watcher::Event::Apply(security_object(
                "AuthorizationPolicy",
                "deny-other",
                &bad,
            )));
        let (mut m, _) = state.build();
        let (rejected, _) = state.security(&mut m);
        assert_eq!(rejected.len(), 1);
        assert_eq!(
            rejected[0].to_string(),
            "AuthorizationPolicy default/deny-other: spec.rules[0].to[0].operation.methods: L7 fields are not supported by this L4 \
             policy (Istio ambient needs a waypoint proxy for them); rejected as a whole"
        );
        assert!(m.mesh.authorization[0].superseded_by.is_some());
        let kept = m.mesh.authorization[0].outcome.as_ref().unwrap();
        assert_eq!(
            kept.action,
            crate::authz::Action::Deny,
            "the last good DENY still applies"
        );
        let (mut m, _) = state.build();
        assert!(state.security(&mut m).0.is_empty(), "reported once");
        // Fixed: the rejection is resolved.
        state
            .authz_policies
            .apply(watcher::Event::Apply(security_object(
                "AuthorizationPolicy",
                "deny-other",
                &deny,
            )));
        let (mut m, _) = state.build();
        let (_, resolved) = state.security(&mut m);
        assert_eq!(
            resolved,
            vec![(
                "AuthorizationPolicy",
                ObjectName::new("default", "deny-other")
            )]
        );
    }
}
