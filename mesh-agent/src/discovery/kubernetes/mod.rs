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
//!   Other nodes' pods keep only the enrollment label; those without it, in a namespace
//!   without a mode (outside the mesh: almost all of a large cluster's), are only names by
//!   address ([`model::OtherPods`]).
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

mod convert;
mod events;
mod lean;
mod run;
mod state;
mod store;
#[cfg(test)]
mod tests;
mod watch;

// One source split by job: every module sees the others' items (`pub(super)`), as when it was
// one file.
#[allow(clippy::wildcard_imports)]
use self::{convert::*, events::*, state::*, store::*, watch::*};
pub use self::{
    convert::{
        cluster_ips, merge_endpoints, pod_of, service_ports, service_settings, slice_endpoints,
    },
    run::run_with_status,
    state::Rejection,
};

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
