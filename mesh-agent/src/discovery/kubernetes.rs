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
//! `fieldSelector=spec.nodeName=<node>`; the Node with `metadata.name=<node>`. Initial lists
//! are served from the API server's watch cache (`resourceVersion=0`), and every object is
//! slimmed before it is stored (`managedFields`, annotations other than ours, pod containers and
//! statuses, node status dropped), so memory follows what the model uses.
//!
//! What becomes what (each rule is kube-proxy's unless said otherwise):
//! - **Service** → [`model::Service`]: `spec.clusterIPs` (or `spec.clusterIP`); headless (`None`),
//!   address-less and `ExternalName` services are left out. Ports: TCP and UDP (SCTP is skipped).
//!   `spec.internalTrafficPolicy: Local` → [`TrafficPolicy::Local`] (only this node's endpoints,
//!   no fallback). The Service's `targetPort` is not used: it is the `EndpointSlice`
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
//! - **Pod** (only those with `spec.nodeName` = this node; terminal pods skipped) → [`model::Pod`]:
//!   `spec.serviceAccountName` (default `default`), `status.podIPs`, `spec.hostNetwork`
//!   (host-network pods are never local pod endpoints).
//! - **Namespace**: objects of a namespace that is not (or no longer) there, or is terminating,
//!   are left out, so deleting a namespace drops its services and pods at once.
//! - **Node** (this one): its `topology.kubernetes.io/zone` label is
//!   [`ClusterModel::node_zone`]; no Node object or no label means zone hints are not used.
//!
//! Per-service settings are annotations on the Service, all under the one prefix
//! [`ANNOTATION_PREFIX`] (`mesh.example.io/`). Defaults are Envoy's
//! ([`CircuitSettings::default`](crate::datapath::spec::CircuitSettings::default)).
//!
//! | annotation | value | default | meaning |
//! |---|---|---|---|
//! | `mesh.example.io/lb-algorithm` | `random` \| `round-robin` \| `weighted` \| `maglev` \| `least-connections` | `random` | load-balancing algorithm |
//! | `mesh.example.io/session-affinity-timeout` | duration (`3h`, `90s`); `0s` turns affinity off | `spec.sessionAffinity: ClientIP` → `sessionAffinityConfig.clientIP.timeoutSeconds`, else 10800 s (as Kubernetes); otherwise off | `ClientIP` affinity idle timeout; the annotation wins over `spec` |
//! | `mesh.example.io/max-connections` | whole number, `0` = unlimited | 0 (unlimited, as Istio) | connections per backend |
//! | `mesh.example.io/consecutive-failures` | whole number, `0` = ejection off | 5 | failures before a backend is ejected |
//! | `mesh.example.io/base-ejection-time` | duration > 0 (`30s`, `1m`) | 30 s | first ejection; multiplied by times ejected |
//! | `mesh.example.io/max-ejection-time` | duration > 0 | 300 s | cap of one ejection |
//! | `mesh.example.io/max-ejection-percent` | whole number `0`..=`100` | 10 | share of a service's backends that may be ejected |
//!
//! Durations use `humantime` syntax. **An invalid value** (unknown algorithm, not a number,
//! percent over 100, bad duration) does not break the service: it keeps its last good settings
//! (the defaults if it never had good ones) while ports and endpoints keep following the API. The
//! problem is reported once per distinct value as [`Update::Rejected`] naming the object and the
//! annotation, logged with `warn!`, and recorded best effort as a Kubernetes `Warning` Event with
//! reason [`EVENT_REASON`] on the Service. An unknown key under the prefix (a typo) is reported
//! the same way and otherwise ignored.
//!
//! Watch errors are logged and retried with the watcher's backoff; [`run`] only returns when the
//! receiver of the updates is gone.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
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
    runtime::{
        WatchStreamExt as _,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        watcher,
    },
};
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, info, warn};

use crate::{
    datapath::spec::{Algorithm, Protocol},
    discovery::Update,
    model::{
        self, ClusterModel, Endpoint, ObjectName, ServicePort, ServiceSettings, TrafficPolicy,
    },
};

/// The kube-rs and API-type crates this source is built on, for callers that build the client.
pub use {k8s_openapi, kube};

/// The one prefix of every annotation this source reads.
pub const ANNOTATION_PREFIX: &str = "mesh.example.io/";
/// Load-balancing algorithm annotation.
pub const ANN_LB_ALGORITHM: &str = "mesh.example.io/lb-algorithm";
/// `ClientIP` affinity timeout annotation.
pub const ANN_SESSION_AFFINITY_TIMEOUT: &str = "mesh.example.io/session-affinity-timeout";
/// Per-backend connection limit annotation.
pub const ANN_MAX_CONNECTIONS: &str = "mesh.example.io/max-connections";
/// Consecutive failures before ejection annotation.
pub const ANN_CONSECUTIVE_FAILURES: &str = "mesh.example.io/consecutive-failures";
/// Base ejection time annotation.
pub const ANN_BASE_EJECTION_TIME: &str = "mesh.example.io/base-ejection-time";
/// Maximum ejection time annotation.
pub const ANN_MAX_EJECTION_TIME: &str = "mesh.example.io/max-ejection-time";
/// Maximum ejected share annotation.
pub const ANN_MAX_EJECTION_PERCENT: &str = "mesh.example.io/max-ejection-percent";
/// Every annotation key this source understands.
pub const ANNOTATIONS: [&str; 7] = [
    ANN_LB_ALGORITHM,
    ANN_SESSION_AFFINITY_TIMEOUT,
    ANN_MAX_CONNECTIONS,
    ANN_CONSECUTIVE_FAILURES,
    ANN_BASE_EJECTION_TIME,
    ANN_MAX_EJECTION_TIME,
    ANN_MAX_EJECTION_PERCENT,
];

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
/// Reason of the Kubernetes Event recorded for a rejected annotation.
pub const EVENT_REASON: &str = "InvalidAnnotation";
/// Reporting controller of those Events.
pub const EVENT_CONTROLLER: &str = "mesh-agent";

/// Longest annotation value quoted in a report (Events allow 1 kB of note).
const MAX_QUOTED_VALUE: usize = 100;

/// Why the Kubernetes source stopped.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// The receiver of the updates was dropped (the agent is shutting down).
    #[error("sending the cluster model of node {node}: the update channel is closed")]
    ChannelClosed { node: String },
    /// A watcher stream ended, which kube-rs watchers never do by design.
    #[error("watching {kind}: the watch stream ended")]
    WatchEnded { kind: &'static str },
}

/// One problem with one annotation of a Service.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// A known key with a value that cannot be used: the service keeps its last good settings.
    #[error("annotation {key}: {value:?} {reason}; keeping the last good settings")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    /// A key under the prefix that this source does not know (likely a typo): ignored.
    #[error("annotation {key}: unknown setting (known: {known}); ignored", known = known_suffixes())]
    Unknown { key: String },
}

impl AnnotationError {
    fn invalid(key: &str, value: &str, reason: impl Into<String>) -> Self {
        let mut value = value.to_owned();
        if value.len() > MAX_QUOTED_VALUE {
            let mut cut = MAX_QUOTED_VALUE;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        Self::Invalid {
            key: key.to_owned(),
            value,
            reason: reason.into(),
        }
    }

    /// The annotation key concerned.
    #[must_use]
    pub fn key(&self) -> &str {
        match self {
            Self::Invalid { key, .. } | Self::Unknown { key } => key,
        }
    }
}

fn known_suffixes() -> String {
    ANNOTATIONS
        .iter()
        .map(|k| k.trim_start_matches(ANNOTATION_PREFIX))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Settings from a Service's annotations and `spec`: `settings` is `None` when any known
/// annotation is invalid (the caller keeps the last good ones); `problems` lists every problem.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedSettings {
    pub settings: Option<ServiceSettings>,
    pub problems: Vec<AnnotationError>,
}

/// Parses the per-service settings (see the module table).
#[must_use]
pub fn parse_settings(
    annotations: &BTreeMap<String, String>,
    spec: Option<&K8sServiceSpec>,
) -> ParsedSettings {
    let mut settings = ServiceSettings {
        affinity_timeout: spec_affinity(spec),
        ..ServiceSettings::default()
    };
    let mut problems = Vec::new();
    let mut invalid = false;
    for (key, value) in annotations
        .iter()
        .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
    {
        let result = apply_annotation(&mut settings, key, value.trim());
        match result {
            Ok(true) => {}
            Ok(false) => problems.push(AnnotationError::Unknown { key: key.clone() }),
            Err(reason) => {
                invalid = true;
                problems.push(AnnotationError::invalid(key, value, reason));
            }
        }
    }
    ParsedSettings {
        settings: (!invalid).then_some(settings),
        problems,
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

/// Applies one annotation under the prefix: `Ok(false)` for an unknown key, `Err(reason)` for an
/// unusable value.
fn apply_annotation(s: &mut ServiceSettings, key: &str, value: &str) -> Result<bool, String> {
    match key {
        ANN_LB_ALGORITHM => s.algorithm = parse_algorithm(value)?,
        ANN_SESSION_AFFINITY_TIMEOUT => {
            let d = parse_duration(value)?;
            s.affinity_timeout = (!d.is_zero()).then_some(d);
        }
        ANN_MAX_CONNECTIONS => s.circuit.max_connections = parse_u32(value)?,
        ANN_CONSECUTIVE_FAILURES => s.circuit.consecutive_failures = parse_u32(value)?,
        ANN_BASE_EJECTION_TIME => s.circuit.base_ejection = parse_positive_duration(value)?,
        ANN_MAX_EJECTION_TIME => s.circuit.max_ejection = parse_positive_duration(value)?,
        ANN_MAX_EJECTION_PERCENT => {
            let p = parse_u32(value)?;
            if p > 100 {
                return Err("is not 0..=100".to_owned());
            }
            s.circuit.max_ejection_percent = p;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// An algorithm by its annotation name.
pub fn parse_algorithm(value: &str) -> Result<Algorithm, String> {
    Ok(match value {
        "random" => Algorithm::Random,
        "round-robin" => Algorithm::RoundRobin,
        "weighted" => Algorithm::Weighted,
        "maglev" => Algorithm::Maglev,
        "least-connections" => Algorithm::LeastConn,
        _ => {
            return Err(
                "is not one of random, round-robin, weighted, maglev, least-connections".to_owned(),
            );
        }
    })
}

fn parse_u32(value: &str) -> Result<u32, String> {
    value
        .parse::<u32>()
        .map_err(|_| format!("is not a whole number in 0..={}", u32::MAX))
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("is not a duration like 30s or 5m ({e})"))
}

fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let d = parse_duration(value)?;
    if d.is_zero() {
        return Err("is not longer than 0s".to_owned());
    }
    Ok(d)
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

/// A Service reduced, when it arrives, to what the model and the Events read. Kept instead of
/// the API object (whose metadata and spec structs alone are over a kilobyte each).
#[derive(Clone, Debug)]
struct StoredService {
    /// Names the Service in the `Warning` Events about it.
    reference: k8s_openapi::api::core::v1::ObjectReference,
    /// This source's annotations only.
    annotations: BTreeMap<String, String>,
    /// The `spec` fields [`parse_settings`] reads (session affinity), only for `ClientIP`.
    affinity: Option<Box<K8sServiceSpec>>,
    /// Whether the Service had a spec at all.
    has_spec: bool,
    cluster_ips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    internal_traffic_policy: TrafficPolicy,
    traffic_distribution: Option<String>,
}

impl StoredService {
    fn new(svc: &K8sService) -> Self {
        let spec = svc.spec.as_ref();
        Self {
            reference: svc.object_ref(&()),
            annotations: svc
                .annotations()
                .iter()
                .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            affinity: spec
                .filter(|s| s.session_affinity.as_deref() == Some("ClientIP"))
                .map(|s| {
                    Box::new(K8sServiceSpec {
                        session_affinity: s.session_affinity.clone(),
                        session_affinity_config: s.session_affinity_config.clone(),
                        ..K8sServiceSpec::default()
                    })
                }),
            has_spec: spec.is_some(),
            cluster_ips: spec.map(cluster_ips).unwrap_or_default(),
            ports: spec.map(service_ports).unwrap_or_default(),
            internal_traffic_policy: match spec.and_then(|s| s.internal_traffic_policy.as_deref()) {
                Some("Local") => TrafficPolicy::Local,
                _ => TrafficPolicy::Cluster,
            },
            traffic_distribution: spec.and_then(|s| s.traffic_distribution.clone()),
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

/// A pod of the model, if it runs on `node` and is not finished.
#[must_use]
pub fn pod_of(pod: &K8sPod, node: &str) -> Option<model::Pod> {
    let spec = pod.spec.as_ref()?;
    if spec.node_name.as_deref() != Some(node) {
        return None;
    }
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

impl Store<StoredSlice> {
    fn apply_slice(&mut self, names: &mut Names, event: watcher::Event<EndpointSlice>) {
        self.apply_as(event, |s| StoredSlice::new(&s, names));
    }
}

/// A rejected annotation to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The Service.
    pub service: ObjectName,
    /// The problem.
    pub error: AnnotationError,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Service {}: {}", self.service, self.error)
    }
}

/// Everything watched, plus what is remembered between models.
struct State {
    node: String,
    services: Store<StoredService>,
    slices: Store<StoredSlice>,
    /// Node and zone names the slices share.
    names: Names,
    pods: Store<K8sPod>,
    namespaces: Store<K8sNamespace>,
    /// This node only (its zone).
    nodes: Store<K8sNode>,
    /// Last good settings of each service (kept while its annotations are invalid).
    last_good: BTreeMap<ObjectName, ServiceSettings>,
    /// Problems already reported per service (each is reported once while it persists).
    reported: BTreeMap<ObjectName, BTreeSet<String>>,
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
            last_good: BTreeMap::new(),
            reported: BTreeMap::new(),
        }
    }

    fn ready(&self) -> bool {
        self.services.ready
            && self.slices.ready
            && self.pods.ready
            && self.namespaces.ready
            && self.nodes.ready
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

    /// The complete model, and the annotation problems not reported before.
    fn build(&mut self) -> (ClusterModel, Vec<Rejection>) {
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
        let mut fresh = Vec::new();
        let mut seen = BTreeSet::new();
        for (name, svc) in &self.services.objects {
            if !self.namespace_live(&name.namespace) {
                continue;
            }
            seen.insert(name.clone());
            let parsed = parse_settings(&svc.annotations, svc.affinity.as_deref());
            let settings = match parsed.settings {
                Some(s) => {
                    self.last_good.insert(name.clone(), s.clone());
                    s
                }
                None => self.last_good.get(name).cloned().unwrap_or_default(),
            };
            let messages: BTreeSet<String> =
                parsed.problems.iter().map(ToString::to_string).collect();
            let before = self.reported.remove(name).unwrap_or_default();
            for error in parsed.problems {
                if !before.contains(&error.to_string()) {
                    fresh.push(Rejection {
                        service: name.clone(),
                        error,
                    });
                }
            }
            if !messages.is_empty() {
                self.reported.insert(name.clone(), messages);
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
        // Forget services that are gone (a re-created one starts from the defaults again).
        self.last_good.retain(|k, _| seen.contains(k));
        self.reported.retain(|k, _| seen.contains(k));
        for pod in self.pods.objects.values() {
            if let Some(p) = pod_of(pod, &self.node)
                && self.namespace_live(&p.name.namespace)
            {
                model.pods.insert(p.name.clone(), p);
            }
        }
        (model, fresh)
    }
}

/// One item of the merged watch streams (boxed: the objects are large and differ in size).
enum Change {
    Services(Box<Result<watcher::Event<K8sService>, watcher::Error>>),
    Slices(Box<Result<watcher::Event<EndpointSlice>, watcher::Error>>),
    Pods(Box<Result<watcher::Event<K8sPod>, watcher::Error>>),
    Namespaces(Box<Result<watcher::Event<K8sNamespace>, watcher::Error>>),
    Nodes(Box<Result<watcher::Event<K8sNode>, watcher::Error>>),
}

impl Change {
    fn kind(&self) -> &'static str {
        match self {
            Self::Services(_) => "Services",
            Self::Slices(_) => "EndpointSlices",
            Self::Pods(_) => "Pods",
            Self::Namespaces(_) => "Namespaces",
            Self::Nodes(_) => "Nodes",
        }
    }
}

type ChangeStream = Pin<Box<dyn Stream<Item = Change> + Send>>;

/// What the watches parse: the API types cut down to the fields the source reads. Everything
/// else in the JSON (`managedFields`, other tools' annotations such as `kubectl`'s copy of the
/// whole object, pod containers and statuses, service status) is skipped by the parser without
/// being allocated, so a 10,000-service list costs what the model needs, not what the API
/// server stores. Each converts into the `k8s-openapi` type the conversion functions take.
mod lean {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::ObjectReference,
            core::v1::{Namespace, Node, Pod, PodIP, PodSpec, PodStatus, Service, ServiceSpec},
            discovery::v1::{
                Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
            },
        },
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };
    use serde::{Deserialize, Deserializer};

    use super::{ANNOTATION_PREFIX, ZONE_LABEL};

    /// The metadata fields read; annotations only under [`ANNOTATION_PREFIX`].
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        deletion_timestamp: Option<Time>,
        labels: Option<BTreeMap<String, String>>,
        annotations: Option<BTreeMap<String, String>>,
    }

    fn meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
        let m = Meta::deserialize(d)?;
        let ours: BTreeMap<String, String> = m
            .annotations
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .collect();
        Ok(ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            uid: m.uid,
            resource_version: m.resource_version,
            deletion_timestamp: m.deletion_timestamp,
            labels: m.labels,
            annotations: (!ours.is_empty()).then_some(ours),
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
        pub fn into_full(self) -> Pod {
            let mut metadata = self.metadata;
            metadata.labels = None;
            Pod {
                metadata,
                spec: self.spec.map(|s| PodSpec {
                    node_name: s.node_name,
                    service_account_name: s.service_account_name,
                    host_network: s.host_network,
                    ..PodSpec::default()
                }),
                status: self.status.map(|s| PodStatus {
                    phase: s.phase,
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
            metadata.labels = None;
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

/// One watch: initial lists from the API server's watch cache (`resourceVersion=0`, as
/// informers list; a quorum read of every object would load etcd on each agent restart), each
/// object parsed as its lean type `L` (see [`lean`]) and turned into its full type `K`.
/// Unpaginated: kube-rs leaves `resourceVersion=0` out of a request with a `limit` (a paginated
/// list is a quorum read), and the API server serves a `resourceVersion=0` list from its cache
/// in one response anyway (as it does for client-go's informers, whose `limit` it ignores
/// there).
fn watch<L, K>(
    api: Api<L>,
    config: watcher::Config,
    into: fn(L) -> K,
    wrap: fn(Box<Result<watcher::Event<K>, watcher::Error>>) -> Change,
) -> ChangeStream
where
    L: Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
    L::DynamicType: Default,
    K: 'static,
{
    let mut config = config.any_semantic();
    config.page_size = None;
    watcher(api, config)
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
            Change::Pods(r) => (*r).map(|e| self.pods.apply(e)).err(),
            Change::Namespaces(r) => (*r).map(|e| self.namespaces.apply(e)).err(),
            Change::Nodes(r) => (*r).map(|e| self.nodes.apply(e)).err(),
        };
        if let Some(e) = err {
            warn!(kind, error = %e, "watch error; retrying with backoff");
        }
    }
}

/// The five watches, merged (see the module docs for their selectors).
fn watches(client: &kube::Client, node: &str) -> futures::stream::SelectAll<ChangeStream> {
    select_all([
        watch(
            Api::<lean::LeanService>::all(client.clone()),
            watcher::Config::default().labels(PROXY_LABEL_SELECTOR),
            lean::LeanService::into_full,
            Change::Services,
        ),
        watch(
            Api::<lean::LeanSlice>::all(client.clone()),
            watcher::Config::default().labels(PROXY_LABEL_SELECTOR),
            lean::LeanSlice::into_full,
            Change::Slices,
        ),
        watch(
            Api::<lean::LeanPod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            lean::LeanPod::into_full,
            Change::Pods,
        ),
        watch(
            Api::<lean::LeanNamespace>::all(client.clone()),
            watcher::Config::default(),
            lean::LeanNamespace::into_full,
            Change::Namespaces,
        ),
        watch(
            Api::<lean::LeanNode>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            lean::LeanNode::into_full,
            Change::Nodes,
        ),
    ])
}

/// Watches the API through `client` and sends a complete model for `node` after each batch of
/// changes. Returns `Err(ChannelClosed)` when `updates` is closed; watch errors are retried.
pub async fn run(
    client: kube::Client,
    node: String,
    updates: mpsc::Sender<Update>,
) -> Result<(), KubernetesError> {
    let mut changes = watches(&client, &node);
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: EVENT_CONTROLLER.to_owned(),
            instance: Some(node.clone()),
        },
    );
    let mut state = State::new(node.clone());
    // The digest of the last model sent, not a copy of it (see `ClusterModel::digest`).
    let mut last_sent: Option<u64> = None;
    info!(node = %node, "watching Kubernetes: Services, EndpointSlices, Pods of this node, Namespaces, this Node");
    loop {
        let Some(first) = changes.next().await else {
            return Err(KubernetesError::WatchEnded { kind: "all" });
        };
        state.apply(first);
        let deadline = Instant::now() + MAX_BATCH;
        while Instant::now() < deadline {
            match tokio::time::timeout(DEBOUNCE, changes.next()).await {
                Ok(Some(change)) => state.apply(change),
                Ok(None) => return Err(KubernetesError::WatchEnded { kind: "all" }),
                Err(_) => break,
            }
        }
        if !state.ready() {
            continue;
        }
        if last_sent.is_none() {
            // The start of the first model: the control-plane benchmark times from here.
            info!(
                services = state.services.objects.len(),
                slices = state.slices.objects.len(),
                pods = state.pods.objects.len(),
                "initial lists complete"
            );
        }
        let (model, rejections) = state.build();
        for r in rejections {
            let message = r.to_string();
            warn!(service = %r.service, annotation = r.error.key(), "{message}");
            record_event(&recorder, &state, &r);
            if updates.send(Update::Rejected(message)).await.is_err() {
                return Err(KubernetesError::ChannelClosed { node });
            }
        }
        let digest = model.digest();
        if last_sent == Some(digest) {
            continue;
        }
        debug!(
            services = model.services.len(),
            pods = model.pods.len(),
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
                "the API server is reached through a ClusterIP this agent programs; an agent down \
                 while the control plane moves could not list again: set k8s-service-host and \
                 k8s-service-port (Helm: k8sServiceHost, k8sServicePort) to its direct address"
            );
        }
        if updates.send(Update::Model(model)).await.is_err() {
            return Err(KubernetesError::ChannelClosed { node });
        }
        last_sent = Some(digest);
    }
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

/// Records a `Warning` Event on the Service, in the background; failures are only logged.
fn record_event(recorder: &Recorder, state: &State, r: &Rejection) {
    let Some(svc) = state.services.objects.get(&r.service) else {
        return;
    };
    let reference = svc.reference.clone();
    let recorder = recorder.clone();
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: EVENT_REASON.to_owned(),
        note: Some(r.to_string()),
        action: "ApplySettings".to_owned(),
        secondary: None,
    };
    let service = r.service.clone();
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            debug!(service = %service, error = %e, "recording the InvalidAnnotation Event failed");
        }
    });
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
    use crate::datapath::spec::CircuitSettings;

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
    fn no_annotations_give_envoy_defaults() {
        let p = parse_settings(&BTreeMap::new(), None);
        assert_eq!(p.settings, Some(ServiceSettings::default()));
        assert_eq!(p.settings.unwrap().circuit, CircuitSettings::default());
        assert!(p.problems.is_empty());
    }

    #[test]
    fn every_annotation_parses() {
        let p = parse_settings(
            &ann(&[
                (ANN_LB_ALGORITHM, "maglev"),
                (ANN_SESSION_AFFINITY_TIMEOUT, "90s"),
                (ANN_MAX_CONNECTIONS, "0"),
                (ANN_CONSECUTIVE_FAILURES, " 3 "),
                (ANN_BASE_EJECTION_TIME, "2s"),
                (ANN_MAX_EJECTION_TIME, "1m 30s"),
                (ANN_MAX_EJECTION_PERCENT, "100"),
                ("other.io/x", "ignored"),
            ]),
            None,
        );
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let s = p.settings.unwrap();
        assert_eq!(s.algorithm, Algorithm::Maglev);
        assert_eq!(s.affinity_timeout, Some(Duration::from_secs(90)));
        assert_eq!(
            s.circuit,
            CircuitSettings {
                max_connections: 0,
                consecutive_failures: 3,
                base_ejection: Duration::from_secs(2),
                max_ejection: Duration::from_secs(90),
                max_ejection_percent: 100,
                ..CircuitSettings::default()
            }
        );
        for (name, algo) in [
            ("random", Algorithm::Random),
            ("round-robin", Algorithm::RoundRobin),
            ("weighted", Algorithm::Weighted),
            ("least-connections", Algorithm::LeastConn),
        ] {
            assert_eq!(parse_algorithm(name), Ok(algo));
        }
    }

    #[test]
    fn invalid_values_are_named_and_reject_the_settings() {
        for (key, value, reason) in [
            (ANN_MAX_EJECTION_PERCENT, "150", "is not 0..=100"),
            (ANN_MAX_EJECTION_PERCENT, "ten", "is not a whole number"),
            (ANN_LB_ALGORITHM, "fastest", "is not one of random"),
            (ANN_MAX_CONNECTIONS, "-1", "is not a whole number"),
            (
                ANN_CONSECUTIVE_FAILURES,
                "5000000000",
                "is not a whole number",
            ),
            (ANN_BASE_EJECTION_TIME, "30", "is not a duration"),
            (ANN_BASE_EJECTION_TIME, "0s", "is not longer than 0s"),
            (ANN_MAX_EJECTION_TIME, "soon", "is not a duration"),
            (
                ANN_SESSION_AFFINITY_TIMEOUT,
                "3 hours-ish",
                "is not a duration",
            ),
        ] {
            let p = parse_settings(&ann(&[(key, value)]), None);
            assert_eq!(p.settings, None, "{key}={value}");
            assert_eq!(p.problems.len(), 1, "{key}={value}: {:?}", p.problems);
            let msg = p.problems[0].to_string();
            assert!(
                msg.starts_with(&format!("annotation {key}: {value:?} {reason}")),
                "{msg}"
            );
            assert!(msg.ends_with("; keeping the last good settings"), "{msg}");
        }

        // One bad value among good ones rejects the whole set, naming only the bad one.
        let p = parse_settings(
            &ann(&[
                (ANN_LB_ALGORITHM, "maglev"),
                (ANN_MAX_EJECTION_PERCENT, "101"),
            ]),
            None,
        );
        assert_eq!(p.settings, None);
        assert_eq!(p.problems.len(), 1);
        assert_eq!(p.problems[0].key(), ANN_MAX_EJECTION_PERCENT);
    }

    #[test]
    fn unknown_keys_are_reported_but_do_not_reject() {
        let p = parse_settings(&ann(&[("mesh.example.io/lb-algoritm", "maglev")]), None);
        assert_eq!(p.settings, Some(ServiceSettings::default()));
        assert_eq!(
            p.problems,
            vec![AnnotationError::Unknown {
                key: "mesh.example.io/lb-algoritm".to_owned()
            }]
        );
        assert!(p.problems[0].to_string().contains("known: lb-algorithm,"));
    }

    #[test]
    fn long_values_are_cut_in_reports() {
        let long = "é".repeat(500);
        let p = parse_settings(&ann(&[(ANN_LB_ALGORITHM, &long)]), None);
        assert!(p.problems[0].to_string().len() < 400);
    }

    #[test]
    fn spec_affinity_follows_kubernetes_and_the_annotation_wins() {
        let mut spec = K8sServiceSpec {
            session_affinity: Some("ClientIP".to_owned()),
            ..K8sServiceSpec::default()
        };
        let p = parse_settings(&BTreeMap::new(), Some(&spec));
        assert_eq!(
            p.settings.unwrap().affinity_timeout,
            Some(Duration::from_hours(3))
        );
        spec.session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
        let p = parse_settings(&BTreeMap::new(), Some(&spec));
        assert_eq!(
            p.settings.unwrap().affinity_timeout,
            Some(Duration::from_mins(1))
        );
        let p = parse_settings(&ann(&[(ANN_SESSION_AFFINITY_TIMEOUT, "0s")]), Some(&spec));
        assert_eq!(p.settings.unwrap().affinity_timeout, None);
        spec.session_affinity = Some("None".to_owned());
        let p = parse_settings(&BTreeMap::new(), Some(&spec));
        assert_eq!(p.settings.unwrap().affinity_timeout, None);
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

    #[test]
    fn bad_annotation_keeps_last_good_settings_and_is_reported_once() {
        let mut state = State::new("a".to_owned());
        state
            .namespaces
            .apply(watcher::Event::Apply(namespace("default")));
        let web = ObjectName::new("default", "web");
        state.services.apply_service(watcher::Event::Apply(service(
            "web",
            &[(ANN_LB_ALGORITHM, "round-robin")],
            "10.96.0.20",
        )));
        let (m, r) = state.build();
        assert!(r.is_empty());
        assert_eq!(m.services[&web].settings.algorithm, Algorithm::RoundRobin);
        state.services.apply_service(watcher::Event::Apply(service(
            "web",
            &[
                (ANN_LB_ALGORITHM, "maglev"),
                (ANN_MAX_EJECTION_PERCENT, "150"),
            ],
            "10.96.0.20",
        )));
        let (m, r) = state.build();
        assert_eq!(
            m.services[&web].settings.algorithm,
            Algorithm::RoundRobin,
            "last good kept"
        );
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].to_string(),
            "Service default/web: annotation mesh.example.io/max-ejection-percent: \"150\" is not 0..=100; keeping the last good settings"
        );
        let (_, r) = state.build();
        assert!(r.is_empty(), "reported once while it persists");
        // A service that never had good settings gets the defaults.
        state.services.apply_service(watcher::Event::Apply(service(
            "new",
            &[(ANN_LB_ALGORITHM, "nope")],
            "10.96.0.21",
        )));
        let (m, r) = state.build();
        assert_eq!(r.len(), 1);
        assert_eq!(
            m.services[&ObjectName::new("default", "new")].settings,
            ServiceSettings::default()
        );
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
                ..Default::default()
            }),
        };
        state.pods.apply(watcher::Event::Apply(pod.clone()));
        pod.metadata.name = Some("elsewhere".to_owned());
        pod.spec.as_mut().unwrap().node_name = Some("b".to_owned());
        state.pods.apply(watcher::Event::Apply(pod));
        let (m, _) = state.build();
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.pods.len(), 1);
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
        assert_eq!(pod_of(&pod, "a"), pod_of(&full, "a"));
        assert!(pod_of(&pod, "a").unwrap().host_network);
        assert!(pod.metadata.managed_fields.is_none() && pod.metadata.annotations.is_none());
        assert!(pod.spec.as_ref().unwrap().containers.is_empty());
        assert!(pod.status.as_ref().unwrap().conditions.is_none());

        let mut fat = serde_json::to_value(service(
            "web",
            &[
                (ANN_LB_ALGORITHM, "maglev"),
                ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
            ],
            "10.96.0.20",
        ))
        .unwrap();
        fat["metadata"]["managedFields"] = serde_json::json!([{ "manager": "m" }]);
        fat["status"] = serde_json::json!({ "loadBalancer": {} });
        let full: K8sService = serde_json::from_value(fat.clone()).unwrap();
        let svc = serde_json::from_value::<lean::LeanService>(fat)
            .unwrap()
            .into_full();
        assert_eq!(
            parse_settings(svc.annotations(), svc.spec.as_ref()),
            parse_settings(full.annotations(), full.spec.as_ref())
        );
        assert_eq!(svc.annotations().len(), 1, "only this source's annotations");
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
            TrafficPolicy::Local
        );
    }
}
