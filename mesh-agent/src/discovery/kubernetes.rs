//! The Kubernetes source: watches Services, `EndpointSlices` (`discovery.k8s.io/v1`), the Pods of
//! this node and Namespaces through kube-rs watchers (with their default backoff), keeps its own
//! stores, and after each batch of events (debounced by [`DEBOUNCE`]) sends a complete
//! [`ClusterModel`] as [`Update::Model`] — once every watcher has finished its initial list, and
//! only when the model changed.
//!
//! What becomes what:
//! - **Service** → [`model::Service`]: `spec.clusterIPs` (or `spec.clusterIP`); headless (`None`),
//!   address-less and `ExternalName` services are left out. Ports: TCP and UDP (SCTP is skipped).
//!   A numeric `targetPort` is the endpoints' port; a named one is resolved per endpoint from the
//!   `EndpointSlice` ports (keyed by the service port name, into [`Endpoint::ports`]); where no
//!   slice resolves it, the service port number is used.
//! - **`EndpointSlice`** → [`Endpoint`]s of the service named by its `kubernetes.io/service-name`
//!   label (several slices merge; the same address and ports seen twice counts once). Each address
//!   of each endpoint; `conditions.ready` (absent = ready); `nodeName`; a `Pod` `targetRef`.
//!   `FQDN` slices are ignored.
//! - **Pod** (only those with `spec.nodeName` = this node; terminal pods skipped) → [`model::Pod`]:
//!   `spec.serviceAccountName` (default `default`) and `status.podIPs`.
//! - **Namespace**: objects of a namespace that is not (or no longer) there, or is terminating,
//!   are left out, so deleting a namespace drops its services and pods at once.
//!
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
    time::Duration,
};

use futures::{Stream, StreamExt as _, stream::select_all};
use k8s_openapi::{
    api::{
        core::v1::{
            Namespace as K8sNamespace, Pod as K8sPod, Service as K8sService,
            ServiceSpec as K8sServiceSpec,
        },
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
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
        let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                debug!(
                    protocol = other,
                    port = p.port,
                    "service port skipped: protocol not balanced"
                );
                continue;
            }
        };
        let Some(port) = port_number(p.port) else {
            continue;
        };
        let target_port = match &p.target_port {
            Some(IntOrString::Int(n)) => port_number(*n).unwrap_or(port),
            // Named: resolved per endpoint from the EndpointSlice ports; this is the fallback.
            Some(IntOrString::String(s)) => s.parse().ok().filter(|&n| n != 0).unwrap_or(port),
            None => port,
        };
        out.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port,
            protocol,
            target_port,
        });
    }
    out
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

/// Endpoints of one `EndpointSlice` (`FQDN` slices and unparsable addresses skipped).
#[must_use]
pub fn slice_endpoints(slice: &EndpointSlice) -> Vec<Endpoint> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Vec::new();
    }
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    let ports: BTreeMap<String, u16> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p.name.clone().unwrap_or_default(), port_number(p.port?)?)))
        .collect();
    let mut out = Vec::new();
    for ep in &slice.endpoints {
        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
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
            out.push(Endpoint {
                ip,
                ports: ports.clone(),
                ready,
                node: ep.node_name.clone(),
                pod: pod.clone(),
                weight: 1,
            });
        }
    }
    out
}

/// Merges endpoints of several slices: one entry per (address, ports), ready if any copy is,
/// sorted so the model does not depend on slice order.
#[must_use]
pub fn merge_endpoints(all: impl IntoIterator<Item = Endpoint>) -> Vec<Endpoint> {
    let mut merged: BTreeMap<(IpAddr, BTreeMap<String, u16>), Endpoint> = BTreeMap::new();
    for ep in all {
        match merged.entry((ep.ip, ep.ports.clone())) {
            Entry::Vacant(v) => {
                v.insert(ep);
            }
            Entry::Occupied(mut o) => {
                let cur = o.get_mut();
                if ep.ready && !cur.ready {
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
    })
}

/// Objects of one kind as the watcher last listed and updated them. During a (re)list the old
/// contents stay visible until the list is complete, as kube-rs reflectors do.
struct Store<K> {
    objects: BTreeMap<ObjectName, K>,
    relisting: Option<BTreeMap<ObjectName, K>>,
    /// Whether a first complete list arrived.
    ready: bool,
}

impl<K: Resource> Store<K> {
    fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            relisting: None,
            ready: false,
        }
    }

    fn key(obj: &K) -> ObjectName {
        ObjectName::new(obj.namespace().unwrap_or_default(), obj.name_any())
    }

    fn apply(&mut self, event: watcher::Event<K>) {
        match event {
            watcher::Event::Init => self.relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(obj) => {
                let key = Self::key(&obj);
                self.relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key, obj);
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.relisting.take() {
                    self.objects = listed;
                }
                self.ready = true;
            }
            watcher::Event::Apply(obj) => {
                self.objects.insert(Self::key(&obj), obj);
            }
            watcher::Event::Delete(obj) => {
                self.objects.remove(&Self::key(&obj));
            }
        }
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
    services: Store<K8sService>,
    slices: Store<EndpointSlice>,
    pods: Store<K8sPod>,
    namespaces: Store<K8sNamespace>,
    policies: Store<DynamicObject>,
    /// Whether the `TrafficPolicy` CRD was found missing (logged once per absence).
    policy_crd_missing: bool,
    /// Rejections already reported per policy (each is reported once while it persists).
    reported: BTreeMap<ObjectName, String>,
    /// What each policy's status should say, for the elected writer.
    desired_status: DesiredStatus,
}

impl State {
    fn new(node: String) -> Self {
        Self {
            node,
            services: Store::new(),
            slices: Store::new(),
            pods: Store::new(),
            namespaces: Store::new(),
            policies: Store::new(),
            policy_crd_missing: false,
            reported: BTreeMap::new(),
            desired_status: DesiredStatus::new(),
        }
    }

    fn ready(&self) -> bool {
        self.services.ready
            && self.slices.ready
            && self.pods.ready
            && self.namespaces.ready
            && self.policies.ready
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
        let mut slices_by_service: BTreeMap<ObjectName, Vec<&EndpointSlice>> = BTreeMap::new();
        for (key, slice) in &self.slices.objects {
            if let Some(svc) = slice.labels().get(SERVICE_NAME_LABEL) {
                slices_by_service
                    .entry(ObjectName::new(key.namespace.clone(), svc.clone()))
                    .or_default()
                    .push(slice);
            }
        }
        let mut model = ClusterModel {
            node: self.node.clone(),
            ..ClusterModel::default()
        };
        for (name, svc) in &self.services.objects {
            if !self.namespace_live(&name.namespace) {
                continue;
            }
            let mut settings = service_settings(svc.spec.as_ref());
            if let Some(p) = resolution.settings.get(name) {
                p.apply(&mut settings);
            }
            let Some(spec) = svc.spec.as_ref() else {
                continue;
            };
            let ips = cluster_ips(spec);
            if ips.is_empty() {
                continue;
            }
            let endpoints = merge_endpoints(
                slices_by_service
                    .get(name)
                    .into_iter()
                    .flatten()
                    .flat_map(|s| slice_endpoints(s)),
            );
            model.services.insert(
                name.clone(),
                model::Service {
                    name: name.clone(),
                    cluster_ips: ips,
                    ports: service_ports(spec),
                    settings,
                    endpoints,
                },
            );
        }
        model.policies = resolution.report;
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
    Policies(Box<Result<watcher::Event<DynamicObject>, watcher::Error>>),
}

impl Change {
    fn kind(&self) -> &'static str {
        match self {
            Self::Services(_) => "Services",
            Self::Slices(_) => "EndpointSlices",
            Self::Pods(_) => "Pods",
            Self::Namespaces(_) => "Namespaces",
            Self::Policies(_) => "TrafficPolicies",
        }
    }
}

type ChangeStream = Pin<Box<dyn Stream<Item = Change> + Send>>;

fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(Box<Result<watcher::Event<K>, watcher::Error>>) -> Change,
) -> ChangeStream
where
    K: Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher(api, config)
        .default_backoff()
        .map(move |r| wrap(Box::new(r)))
        .boxed()
}

impl State {
    fn apply(&mut self, change: Change) {
        let kind = change.kind();
        let err = match change {
            Change::Services(r) => (*r).map(|e| self.services.apply(e)).err(),
            Change::Slices(r) => (*r).map(|e| self.slices.apply(e)).err(),
            Change::Pods(r) => (*r).map(|e| self.pods.apply(e)).err(),
            Change::Namespaces(r) => (*r).map(|e| self.namespaces.apply(e)).err(),
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
        };
        if let Some(e) = err {
            warn!(kind, error = %e, "watch error; retrying with backoff");
        }
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

/// Watches the API through `client` and sends a complete model for `node` after each batch of
/// changes. Returns `Err(ChannelClosed)` when `updates` is closed; watch errors are retried.
/// Policy status is written by the elected agent when the downward API names the agent's pod
/// ([`StatusConfig::from_env`]).
pub async fn run(
    client: kube::Client,
    node: String,
    updates: mpsc::Sender<Update>,
) -> Result<(), KubernetesError> {
    let status = StatusConfig::from_env(&node);
    run_with_status(client, node, status, updates).await
}

/// [`run`], standing for election as policy status writer with `status` (none: never write).
pub async fn run_with_status(
    client: kube::Client,
    node: String,
    status: Option<StatusConfig>,
    updates: mpsc::Sender<Update>,
) -> Result<(), KubernetesError> {
    let (desired_tx, desired_rx) =
        watch_channel::channel(std::sync::Arc::new(DesiredStatus::new()));
    if let Some(config) = status {
        tokio::spawn(policy::status::run(client.clone(), config, desired_rx));
    }
    let policy_resource = ApiResource::erase::<TrafficPolicy>(&());
    let mut changes = select_all([
        watch(
            Api::<K8sService>::all(client.clone()),
            watcher::Config::default(),
            Change::Services,
        ),
        watch(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            Change::Slices,
        ),
        watch(
            Api::<K8sPod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            Change::Pods,
        ),
        watch(
            Api::<K8sNamespace>::all(client.clone()),
            watcher::Config::default(),
            Change::Namespaces,
        ),
        watcher(
            Api::<DynamicObject>::all_with(client.clone(), &policy_resource),
            watcher::Config::default(),
        )
        .default_backoff()
        .map(|r| Change::Policies(Box::new(r)))
        .boxed(),
    ]);
    let mut state = State::new(node.clone());
    let mut last_sent: Option<ClusterModel> = None;
    info!(node = %node, "watching Kubernetes: Services, EndpointSlices, Pods of this node, Namespaces, TrafficPolicies");
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
        let had_problems: Vec<ObjectName> = state.reported.keys().cloned().collect();
        let (model, rejections) = state.build();
        desired_tx.send_if_modified(|d| {
            let differs = **d != state.desired_status;
            if differs {
                *d = std::sync::Arc::new(state.desired_status.clone());
            }
            differs
        });
        if last_sent.as_ref() != Some(&model) {
            debug!(
                services = model.services.len(),
                pods = model.pods.len(),
                policies = model.policies.policies.len(),
                "sending the cluster model"
            );
            if updates.send(Update::Model(model.clone())).await.is_err() {
                return Err(KubernetesError::ChannelClosed { node });
            }
            last_sent = Some(model);
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
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{
        core::v1::{
            ClientIPConfig, ObjectReference, ServicePort as K8sServicePort, SessionAffinityConfig,
        },
        discovery::v1::{Endpoint as K8sEndpoint, EndpointConditions, EndpointPort},
    };
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
                    target_port: 53
                },
                ServicePort {
                    name: "http".to_owned(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    target_port: 8080
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
            .apply(watcher::Event::Apply(service("web", &[], "10.96.0.20")));
        state.slices.apply(watcher::Event::Apply(slice(
            "web-1",
            "web",
            &[("10.1.0.2", None), ("10.1.0.3", Some(false))],
        )));
        state.slices.apply(watcher::Event::Apply(slice(
            "web-2",
            "web",
            &[("10.1.0.4", Some(true)), ("10.1.0.2", None)],
        )));
        state.slices.apply(watcher::Event::Apply(slice(
            "other",
            "db",
            &[("10.1.0.9", None)],
        )));
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
            .apply(watcher::Event::Apply(service("web", &[], "10.96.0.20")));
        state
            .services
            .apply(watcher::Event::Apply(service("db", &[], "10.96.0.21")));
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
    fn deleted_namespace_drops_its_objects_and_pods_follow_the_node() {
        let mut state = State::new("a".to_owned());
        state
            .namespaces
            .apply(watcher::Event::Apply(namespace("default")));
        state
            .services
            .apply(watcher::Event::Apply(service("web", &[], "10.96.0.20")));
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
}
