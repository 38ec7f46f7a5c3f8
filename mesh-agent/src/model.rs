//! The cluster model every discovery source produces (Kubernetes or a static file): services
//! with ports, settings and endpoints, the pods of this node, and the node itself.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::datapath::spec::{Algorithm, BackendSpec, CircuitSettings, Protocol, ServiceSpec};

/// `namespace/name`, the identity of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl ObjectName {
    #[must_use]
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Port on the endpoints (a number; named target ports are resolved by the source).
    pub target_port: u16,
}

/// Per-service data-path settings: a `TrafficPolicy` (or the defaults) and the Service's affinity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSettings {
    pub algorithm: Algorithm,
    /// `ClientIP` affinity idle timeout.
    pub affinity_timeout: Option<Duration>,
    pub circuit: CircuitSettings,
    /// Maglev/weighted table size; `None` = chosen by the data path.
    pub table_size: Option<u32>,
}

/// One endpoint (a pod address) of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Port name → port number on this endpoint (empty: use the service port's target port).
    pub ports: BTreeMap<String, u16>,
    /// Not-ready endpoints get no new connections.
    pub ready: bool,
    pub node: Option<String>,
    pub pod: Option<ObjectName>,
    /// Relative weight (for the weighted algorithm); 1 by default.
    pub weight: u32,
}

/// A service: its addresses, ports, settings and endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: ObjectName,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub settings: ServiceSettings,
    pub endpoints: Vec<Endpoint>,
}

/// A pod of interest (the ones on this node, for identity and same-node bypass).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: ObjectName,
    pub node: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// Kubernetes UID (the kubelet names the pod's cgroup after it); empty for static pods.
    pub uid: String,
}

/// Everything the agent knows about the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterModel {
    /// The node this agent runs on.
    pub node: String,
    pub services: BTreeMap<ObjectName, Service>,
    pub pods: BTreeMap<ObjectName, Pod>,
    /// Which `TrafficPolicy` applies to each service and how every policy stands.
    pub policies: crate::policy::Report,
}

impl ClusterModel {
    /// What the data path should hold: one spec per (cluster IP, port) of every service, from
    /// ready endpoints only.
    #[must_use]
    pub fn desired_specs(&self) -> Vec<(ObjectName, ServiceSpec)> {
        let mut out = Vec::new();
        for svc in self.services.values() {
            for ip in &svc.cluster_ips {
                for port in &svc.ports {
                    let backends = svc
                        .endpoints
                        .iter()
                        .filter(|e| e.ready && e.ip.is_ipv4() == ip.is_ipv4())
                        .map(|e| BackendSpec {
                            addr: SocketAddr::new(
                                e.ip,
                                e.ports.get(&port.name).copied().unwrap_or(port.target_port),
                            ),
                            weight: e.weight.max(1),
                        })
                        .collect();
                    out.push((
                        svc.name.clone(),
                        ServiceSpec {
                            vip: SocketAddr::new(*ip, port.port),
                            protocol: port.protocol,
                            algorithm: svc.settings.algorithm,
                            affinity_timeout: svc.settings.affinity_timeout,
                            circuit: svc.settings.circuit,
                            table_size: svc.settings.table_size,
                            backends,
                        },
                    ));
                }
            }
        }
        out
    }

    /// Addresses of the pods on this node (same-node bypass candidates).
    #[must_use]
    pub fn local_pod_ips(&self) -> Vec<IpAddr> {
        self.pods
            .values()
            .filter(|p| p.node == self.node)
            .flat_map(|p| p.ips.iter().copied())
            .collect()
    }
}
