//! What the watches parse: the API types cut down to the fields the source reads. Everything
//! else in the JSON (`managedFields`, annotations such as `kubectl`'s copy of the whole
//! object, pod containers and statuses, service status) is skipped by the parser without
//! being allocated, so a 10,000-service list costs what the model needs, not what the API
//! server stores. Each converts into the `k8s-openapi` type the conversion functions take.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::ObjectReference,
        core::v1::{HostIP, Namespace, Node, Pod, PodIP, PodSpec, PodStatus, Service, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice},
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
