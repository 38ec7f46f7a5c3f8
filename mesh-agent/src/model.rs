//! The cluster model every discovery source produces (Kubernetes or a static file): services
//! with ports, settings and endpoints, the pods of this node, and the node itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use crate::datapath::spec::{
    Algorithm, BackendSpec, CircuitSettings, EndpointAddr, Protocol, ServiceSpec,
};

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
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Port on endpoints that list no port of this name: the static file's explicit
    /// `targetPort`. `None` (Kubernetes): only endpoints whose `EndpointSlice` lists this port
    /// (same name and protocol, checked by the source) serve it, on the port number listed
    /// there, as kube-proxy does; the Service's own `targetPort` is never used.
    pub target_port: Option<u16>,
}

/// Which endpoints traffic from inside the cluster may use (`spec.internalTrafficPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TrafficPolicy {
    /// Every usable endpoint in the cluster.
    #[default]
    Cluster,
    /// Only this node's endpoints; none here means the connect fails, never a remote one.
    Local,
}

/// Topology hints of an endpoint (`EndpointSlice` `hints`): the zones and nodes it should
/// serve. Empty sets mean "no hint".
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hints {
    pub zones: BTreeSet<String>,
    pub nodes: BTreeSet<String>,
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
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Port name → port number on this endpoint (empty: use the service port's target port).
    /// Shared: every endpoint of one `EndpointSlice` lists the same ports, and a 10,000-service
    /// model has 100,000 endpoints.
    pub ports: Arc<BTreeMap<String, u16>>,
    /// Not-ready endpoints get no new connections (unless no endpoint is ready, see `serving`).
    pub ready: bool,
    /// Whether the endpoint still serves, whatever its terminating state (KEP-1669). An endpoint
    /// that is `serving` and `terminating` is used only when no endpoint is ready, so a
    /// one-replica rollout keeps working. The static file sets it to `ready`.
    pub serving: bool,
    /// The endpoint's pod is shutting down (the file source: never).
    pub terminating: bool,
    /// Shared: a few hundred node names for 100,000 endpoints.
    pub node: Option<Arc<str>>,
    pub pod: Option<ObjectName>,
    /// Relative weight (for the weighted algorithm); 1 by default.
    pub weight: u32,
    /// Topology hints (Kubernetes only).
    pub hints: Hints,
}

/// A service: its addresses, ports, settings and endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    pub name: ObjectName,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub settings: ServiceSettings,
    pub endpoints: Vec<Endpoint>,
    /// `spec.internalTrafficPolicy` (the file source: `Cluster`).
    pub internal_traffic_policy: TrafficPolicy,
}

/// A pod of interest (the ones on this node, for identity and same-node bypass).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pod {
    pub name: ObjectName,
    pub node: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// Kubernetes UID (the kubelet names the pod's cgroup after it); empty for static pods, and
    /// for other nodes' pods in Kubernetes (no cgroup of theirs is on this node).
    pub uid: String,
    /// `spec.hostNetwork`: the pod's addresses are the node's, so it is never a local pod
    /// endpoint (same-node bypass would capture every host-network socket of the node).
    pub host_network: bool,
}

/// Other nodes' pods outside the mesh, as what their consumers need: each one's name by its
/// addresses (flows and metrics name a remote peer; telemetry asks whether a pod still
/// exists). A large cluster's pods are almost all of this kind (99,000 of the control-plane
/// benchmark's 100,000), so they are held in a few flat arrays — about 30 bytes a pod —
/// instead of a [`Pod`] each (hundreds of bytes with its map entries and indexes). Tunnels,
/// authorization and identity concern mesh pods only, which stay in [`ClusterModel::pods`];
/// a pod here joins them when it or its namespace is labelled into the mesh (the source
/// rebuilds the model on every change). Built once per model, never changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct OtherPods {
    /// Distinct namespaces, sorted.
    namespaces: Vec<Box<str>>,
    /// Pod names back to back, in (namespace, name) order.
    names: String,
    /// Per pod, in (namespace, name) order: its namespace (index) and where its name ends in
    /// `names` (it starts where the previous one ends).
    pods: Vec<(u32, u32)>,
    /// IPv4 address → pod (index), sorted; an address two pods claim names the first.
    v4: Vec<(u32, u32)>,
    /// IPv6 address → pod (index), sorted.
    v6: Vec<([u8; 16], u32)>,
}

impl OtherPods {
    /// Pods as (namespace, name, IPv4 address, IPv6 address), in any order; a name given
    /// twice counts once (the first).
    #[must_use]
    pub fn build(pods: Vec<(&str, &str, Option<Ipv4Addr>, Option<Ipv6Addr>)>) -> Self {
        Self::build_with(pods.into_iter().map(|p| (p, ())).collect()).0
    }

    /// As [`OtherPods::build`], each pod with a value of the caller's: the values come back
    /// in the pods' order here (index `i` is the pod [`OtherPods::pod`] `i` names), so a
    /// caller keeps what else it knows of each pod beside this table instead of in a second
    /// copy of the names.
    #[must_use]
    #[allow(clippy::type_complexity)]
    pub fn build_with<T>(
        mut pods: Vec<((&str, &str, Option<Ipv4Addr>, Option<Ipv6Addr>), T)>,
    ) -> (Self, Vec<T>) {
        pods.sort_by(|a, b| (a.0.0, a.0.1).cmp(&(b.0.0, b.0.1)));
        pods.dedup_by(|a, b| (a.0.0, a.0.1) == (b.0.0, b.0.1));
        let mut out = Self {
            names: String::with_capacity(pods.iter().map(|p| p.0.1.len()).sum()),
            pods: Vec::with_capacity(pods.len()),
            ..Self::default()
        };
        let mut values = Vec::with_capacity(pods.len());
        for (index, ((namespace, name, v4, v6), value)) in pods.into_iter().enumerate() {
            values.push(value);
            if out.namespaces.last().map(AsRef::as_ref) != Some(namespace) {
                out.namespaces.push(namespace.into());
            }
            out.names.push_str(name);
            // Beyond 4 GiB of names or 4 billion pods the offsets would wrap: no cluster has
            // that many (Kubernetes' tested limit is 150,000 pods).
            let ns = u32::try_from(out.namespaces.len() - 1).unwrap_or(u32::MAX);
            let end = u32::try_from(out.names.len()).unwrap_or(u32::MAX);
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            out.pods.push((ns, end));
            if let Some(v4) = v4 {
                out.v4.push((u32::from(v4), index));
            }
            if let Some(v6) = v6 {
                out.v6.push((v6.octets(), index));
            }
        }
        // Stable: among pods claiming one address, the first in name order stays first.
        out.v4.sort_by_key(|e| e.0);
        out.v4.dedup_by_key(|e| e.0);
        out.v6.sort_by_key(|e| e.0);
        out.v6.dedup_by_key(|e| e.0);
        out.names.shrink_to_fit();
        out.v4.shrink_to_fit();
        out.v6.shrink_to_fit();
        (out, values)
    }

    /// How many pods.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// The namespace and name of pod `index` (`0..len()`, in (namespace, name) order).
    #[must_use]
    pub fn pod(&self, index: usize) -> (&str, &str) {
        self.at(index)
    }

    /// The index of the pod `namespace`/`name`, if it is here.
    #[must_use]
    pub fn position(&self, namespace: &str, name: &str) -> Option<usize> {
        let ns = self
            .namespaces
            .binary_search_by(|n| n.as_ref().cmp(namespace))
            .ok()?;
        let key = (u32::try_from(ns).unwrap_or(u32::MAX), name);
        // Binary search over the pods, which are in (namespace, name) order.
        let (mut lo, mut hi) = (0, self.pods.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match (self.pods[mid].0, self.at(mid).1).cmp(&key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// The namespace and name of pod `index`.
    fn at(&self, index: usize) -> (&str, &str) {
        let (ns, end) = self.pods[index];
        let start = index
            .checked_sub(1)
            .map_or(0, |prev| self.pods[prev].1 as usize);
        (
            &self.namespaces[ns as usize],
            &self.names[start..end as usize],
        )
    }

    /// The pod with address `ip`.
    #[must_use]
    pub fn name_at(&self, ip: IpAddr) -> Option<ObjectName> {
        let index = match ip {
            IpAddr::V4(v4) => {
                let key = u32::from(v4);
                let i = self.v4.binary_search_by_key(&key, |e| e.0).ok()?;
                self.v4[i].1
            }
            IpAddr::V6(v6) => {
                let key = v6.octets();
                let i = self.v6.binary_search_by_key(&key, |e| e.0).ok()?;
                self.v6[i].1
            }
        };
        let (ns, name) = self.at(index as usize);
        Some(ObjectName::new(ns, name))
    }

    /// Whether a pod of this name is here.
    #[must_use]
    pub fn contains(&self, name: &ObjectName) -> bool {
        self.position(&name.namespace, &name.name).is_some()
    }

    /// Every pod's namespace and name, in that order.
    pub fn names(&self) -> impl Iterator<Item = (&str, &str)> {
        (0..self.pods.len()).map(|i| self.at(i))
    }
}

/// Everything the agent knows about the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClusterModel {
    /// The node this agent runs on.
    pub node: String,
    /// This node's zone (its Node's `topology.kubernetes.io/zone` label), for topology hints.
    pub node_zone: Option<String>,
    pub services: BTreeMap<ObjectName, Service>,
    /// Pods held whole: this node's, and other nodes' pods the mesh concerns (labelled with
    /// the dataplane-mode label, or in a namespace that is); the static file's are all here.
    /// Shared (`Arc`): the Kubernetes source's store holds the same pods, so a new model
    /// copies pointers, not pods.
    pub pods: BTreeMap<ObjectName, Arc<Pod>>,
    /// Every other pod of other nodes (the Kubernetes source), by name and address only; see
    /// [`OtherPods`]. Shared: unchanged between most models.
    pub other_pods: Arc<OtherPods>,
    /// Node name → the addresses its agent is reached at (a Node's `InternalIP`s; in Kubernetes
    /// from pods' `status.hostIPs`): where the HBONE tunnel to a pod on that node goes.
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
    /// Which `TrafficPolicy` applies to each service and how every policy stands.
    pub policies: crate::policy::Report,
    /// Enrollment labels and security objects (`authz::MeshView::build` turns them into each
    /// pod's identity, mTLS mode and authorization policies). Boxed: the model moves through
    /// channels and commands, and most clusters have few of these.
    pub mesh: Box<crate::authz::MeshInputs>,
}

/// By their complete `Debug` form: the data-path setting types do not implement `Hash`, and
/// their `Debug` output shows every field exactly (durations included), so equal settings hash
/// equal, as `Hash` requires.
impl Hash for ServiceSettings {
    fn hash<H: Hasher>(&self, state: &mut H) {
        format!("{self:?}").hash(state);
    }
}

impl Endpoint {
    /// The port this endpoint serves `port` on, if it serves it at all.
    #[must_use]
    pub fn port_for(&self, port: &ServicePort) -> Option<u16> {
        self.ports.get(&port.name).copied().or(port.target_port)
    }

    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// Topology kube-proxy applies to a service's cluster-wide endpoints (`topologyModeFromHints`
/// in kube-proxy's `pkg/proxy/topology.go`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Every ready endpoint.
    Any,
    /// Ready endpoints hinted for this node.
    SameNode,
    /// Ready endpoints hinted for this node's zone.
    SameZone,
}

/// The cluster's own plumbing — every `kube-system` service (DNS, metrics) and the API server's
/// `default/kubernetes` — is never circuit-broken, whatever a policy says: ejecting the API
/// server or DNS from a node would take that node's control plane down with it.
#[must_use]
pub fn protected_circuit(name: &ObjectName, circuit: CircuitSettings) -> CircuitSettings {
    if name.namespace == "kube-system" || (name.namespace == "default" && name.name == "kubernetes")
    {
        CircuitSettings {
            max_connections: 0,
            consecutive_failures: 0,
            ..circuit
        }
    } else {
        circuit
    }
}

impl ClusterModel {
    /// A 64-bit digest (`SipHash`) of the whole model: a source remembers this instead of a
    /// copy of the last model it sent (100,000 endpoints are tens of MB). Two different models
    /// share a digest with a chance of about 2^-64 per change; the next change would then go
    /// out.
    #[must_use]
    pub fn digest(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    /// kube-proxy's topology mode: node hints when every ready endpoint has one and one is for
    /// this node, else zone hints when every ready endpoint has one and one is for this zone,
    /// else none (so hints never leave a node without endpoints while ready ones exist).
    fn topology(&self, endpoints: &[&Endpoint]) -> Topology {
        let ready: Vec<&&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
        if ready.is_empty() {
            return Topology::Any;
        }
        let all_nodes = ready.iter().all(|e| !e.hints.nodes.is_empty());
        if all_nodes && ready.iter().any(|e| e.hints.nodes.contains(&self.node)) {
            return Topology::SameNode;
        }
        let all_zones = ready.iter().all(|e| !e.hints.zones.is_empty());
        if all_zones
            && let Some(zone) = &self.node_zone
            && ready.iter().any(|e| e.hints.zones.contains(zone))
        {
            return Topology::SameZone;
        }
        Topology::Any
    }

    /// The endpoints a service port uses from this node, by kube-proxy's rules
    /// (`CategorizeEndpoints`): with `internalTrafficPolicy: Cluster`, the ready endpoints the
    /// topology allows, else (none ready anywhere) the serving-and-terminating ones; with
    /// `Local`, this node's ready endpoints, else this node's serving-and-terminating ones,
    /// else none (no fallback to other nodes).
    fn usable<'a>(&self, svc: &Service, endpoints: &[&'a Endpoint]) -> Vec<&'a Endpoint> {
        let pick = |f: &dyn Fn(&Endpoint) -> bool| -> Vec<&'a Endpoint> {
            endpoints.iter().copied().filter(|e| f(e)).collect()
        };
        match svc.internal_traffic_policy {
            TrafficPolicy::Local => {
                let local = |e: &Endpoint| e.node.as_deref() == Some(self.node.as_str());
                let ready = pick(&|e| local(e) && e.ready);
                if ready.is_empty() {
                    pick(&|e| local(e) && e.serving_terminating())
                } else {
                    ready
                }
            }
            TrafficPolicy::Cluster => {
                let topology = self.topology(endpoints);
                let ready = pick(&|e| {
                    e.ready
                        && match topology {
                            Topology::Any => true,
                            Topology::SameNode => e.hints.nodes.contains(&self.node),
                            Topology::SameZone => self
                                .node_zone
                                .as_ref()
                                .is_some_and(|z| e.hints.zones.contains(z)),
                        }
                });
                if ready.is_empty() {
                    pick(&Endpoint::serving_terminating)
                } else {
                    ready
                }
            }
        }
    }

    /// What the data path should hold: one spec per (cluster IP, port) of every service, with
    /// the endpoints of that address family that serve the port and that kube-proxy would use
    /// (traffic policy, topology, terminating fallback).
    #[must_use]
    pub fn desired_specs(&self) -> Vec<(ObjectName, ServiceSpec)> {
        let mut out = Vec::new();
        for svc in self.services.values() {
            for ip in &svc.cluster_ips {
                for port in &svc.ports {
                    let candidates: Vec<&Endpoint> = svc
                        .endpoints
                        .iter()
                        .filter(|e| e.ip.is_ipv4() == ip.is_ipv4() && e.port_for(port).is_some())
                        .collect();
                    let mut backends: Vec<BackendSpec> = self
                        .usable(svc, &candidates)
                        .into_iter()
                        .filter_map(|e| {
                            Some(BackendSpec {
                                addr: EndpointAddr::new(e.ip, e.port_for(port)?),
                                weight: e.weight.max(1),
                            })
                        })
                        .collect();
                    // `filter_map` knows no length: its vector grows by doubling (16 places
                    // for 10 endpoints), and the reconciler keeps it for as long as the
                    // service is applied.
                    backends.shrink_to_fit();
                    out.push((
                        svc.name.clone(),
                        ServiceSpec {
                            vip: SocketAddr::new(*ip, port.port),
                            protocol: port.protocol,
                            algorithm: svc.settings.algorithm,
                            affinity_timeout: svc.settings.affinity_timeout,
                            circuit: protected_circuit(&svc.name, svc.settings.circuit),
                            table_size: svc.settings.table_size,
                            backends,
                        },
                    ));
                }
            }
        }
        out
    }

    /// Whether a pod of this name is in the model (whole or among [`ClusterModel::other_pods`]).
    #[must_use]
    pub fn has_pod(&self, name: &ObjectName) -> bool {
        self.pods.contains_key(name) || self.other_pods.contains(name)
    }

    /// Addresses of the pods on this node (same-node bypass candidates); host-network pods have
    /// the node's addresses and are left out.
    #[must_use]
    pub fn local_pod_ips(&self) -> Vec<IpAddr> {
        self.pods
            .values()
            .filter(|p| p.node == self.node && !p.host_network)
            .flat_map(|p| p.ips.iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn kube_system_and_the_api_server_are_never_circuit_broken() {
        let strict = CircuitSettings {
            max_connections: 10,
            consecutive_failures: 1,
            ..CircuitSettings::default()
        };
        for (ns, name) in [("kube-system", "kube-dns"), ("default", "kubernetes")] {
            let c = super::protected_circuit(&ObjectName::new(ns, name), strict);
            assert_eq!(
                (c.max_connections, c.consecutive_failures),
                (0, 0),
                "{ns}/{name}"
            );
        }
        let c = super::protected_circuit(&ObjectName::new("default", "web"), strict);
        assert_eq!(c, strict);
    }
    use super::*;

    const NODE: &str = "a";

    /// An endpoint `10.1.0.{n}` on `node`, serving port `http` on 8080.
    fn ep(n: u8, node: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            ip: IpAddr::from([10, 1, 0, n]),
            ports: Arc::new(BTreeMap::from([("http".to_owned(), 8080)])),
            ready,
            serving,
            terminating,
            node: Some(node.into()),
            pod: None,
            weight: 1,
            hints: Hints::default(),
        }
    }

    fn ready(n: u8, node: &str) -> Endpoint {
        ep(n, node, true, true, false)
    }

    fn terminating(n: u8, node: &str) -> Endpoint {
        ep(n, node, false, true, true)
    }

    fn zoned(mut e: Endpoint, zones: &[&str]) -> Endpoint {
        e.hints.zones = zones.iter().map(|z| (*z).to_owned()).collect();
        e
    }

    fn model(policy: TrafficPolicy, zone: Option<&str>, endpoints: Vec<Endpoint>) -> ClusterModel {
        let name = ObjectName::new("default", "web");
        let svc = Service {
            name: name.clone(),
            cluster_ips: vec![IpAddr::from([10, 96, 0, 1])],
            ports: vec![ServicePort {
                name: "http".to_owned(),
                port: 80,
                protocol: Protocol::Tcp,
                target_port: None,
            }],
            settings: ServiceSettings::default(),
            endpoints,
            internal_traffic_policy: policy,
        };
        ClusterModel {
            node: NODE.to_owned(),
            node_zone: zone.map(str::to_owned),
            services: BTreeMap::from([(name, svc)]),
            pods: BTreeMap::new(),
            other_pods: Arc::default(),
            nodes: BTreeMap::new(),
            policies: crate::policy::Report::default(),
            mesh: Box::default(),
        }
    }

    /// Last octets of the backends the single spec gets.
    fn backends(m: &ClusterModel) -> Vec<u8> {
        let specs = m.desired_specs();
        assert_eq!(specs.len(), 1);
        specs[0]
            .1
            .backends
            .iter()
            .map(|b| match b.addr.ip() {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn serving_terminating_endpoints_are_used_only_when_none_is_ready() {
        let m = model(
            TrafficPolicy::Cluster,
            None,
            vec![
                ready(1, "b"),
                terminating(2, NODE),
                ep(3, NODE, false, false, true),
            ],
        );
        assert_eq!(backends(&m), [1]);
        let m = model(
            TrafficPolicy::Cluster,
            None,
            vec![
                ep(1, "b", false, false, false),
                terminating(2, "b"),
                ep(3, NODE, false, false, true),
            ],
        );
        assert_eq!(
            backends(&m),
            [2],
            "not-serving and not-terminating endpoints never"
        );
    }

    #[test]
    fn local_policy_uses_this_nodes_endpoints_only() {
        let m = model(
            TrafficPolicy::Local,
            None,
            vec![ready(1, "b"), ready(2, NODE)],
        );
        assert_eq!(backends(&m), [2]);
        let m = model(
            TrafficPolicy::Local,
            None,
            vec![ready(1, "b"), terminating(2, NODE)],
        );
        assert_eq!(
            backends(&m),
            [2],
            "a local terminating one before any remote"
        );
        let m = model(TrafficPolicy::Local, None, vec![ready(1, "b")]);
        assert!(backends(&m).is_empty(), "no remote fallback");
    }

    #[test]
    fn zone_hints_apply_only_when_complete_and_useful() {
        let hinted = || {
            vec![
                zoned(ready(1, "b"), &["z1"]),
                zoned(ready(2, "c"), &["z2"]),
                zoned(terminating(3, "c"), &[]),
            ]
        };
        assert_eq!(
            backends(&model(TrafficPolicy::Cluster, Some("z1"), hinted())),
            [1]
        );
        assert_eq!(
            backends(&model(TrafficPolicy::Cluster, Some("z3"), hinted())),
            [1, 2],
            "no endpoint for this zone: all"
        );
        assert_eq!(
            backends(&model(TrafficPolicy::Cluster, None, hinted())),
            [1, 2],
            "node without a zone: all"
        );
        let mut partial = hinted();
        partial.push(ready(4, "c"));
        assert_eq!(
            backends(&model(TrafficPolicy::Cluster, Some("z1"), partial)),
            [1, 2, 4],
            "a ready endpoint without hints: hints ignored"
        );
        let mut by_node = hinted();
        for e in &mut by_node {
            e.hints.nodes = e.node.iter().map(ToString::to_string).collect();
        }
        by_node[1].node = Some(NODE.into());
        by_node[1].hints.nodes = BTreeSet::from([NODE.to_owned()]);
        assert_eq!(
            backends(&model(TrafficPolicy::Cluster, Some("z1"), by_node)),
            [2],
            "node hints before zone hints"
        );
    }

    #[test]
    fn ports_come_from_the_endpoint_or_the_explicit_target_port() {
        let mut m = model(
            TrafficPolicy::Cluster,
            None,
            vec![ready(1, "b"), ready(2, "b")],
        );
        let svc = m.services.values_mut().next().unwrap();
        svc.endpoints[1].ports = Arc::default();
        assert_eq!(
            backends(&m),
            [1],
            "an endpoint not listing the port does not serve it"
        );
        m.services.values_mut().next().unwrap().ports[0].target_port = Some(9090);
        let specs = m.desired_specs();
        let addrs: Vec<String> = specs[0]
            .1
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect();
        assert_eq!(addrs, ["10.1.0.1:8080", "10.1.0.2:9090"]);
    }

    #[test]
    fn other_pods_are_found_by_address_and_name() {
        let v4 = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        let v6 = |s: &str| Some(s.parse::<Ipv6Addr>().unwrap());
        let pods = OtherPods::build(vec![
            ("shop", "web-1", v4("10.0.0.2"), None),
            ("default", "zeta", v4("10.0.0.1"), v6("fd00::1")),
            ("shop", "web-0", v4("10.0.0.1"), None),
            ("default", "alpha", None, v6("fd00::2")),
            ("shop", "web-1", v4("10.0.0.9"), None),
        ]);
        assert_eq!(pods.len(), 4, "a name given twice counts once");
        let names: Vec<(&str, &str)> = pods.names().collect();
        assert_eq!(
            names,
            [
                ("default", "alpha"),
                ("default", "zeta"),
                ("shop", "web-0"),
                ("shop", "web-1")
            ]
        );
        let at = |ip: &str| pods.name_at(ip.parse().unwrap()).map(|n| n.to_string());
        assert_eq!(
            at("10.0.0.1").as_deref(),
            Some("default/zeta"),
            "first in name order"
        );
        assert_eq!(at("fd00::1").as_deref(), Some("default/zeta"));
        assert_eq!(at("fd00::2").as_deref(), Some("default/alpha"));
        assert_eq!(at("10.0.0.2").as_deref(), Some("shop/web-1"));
        assert_eq!(
            at("10.0.0.9"),
            None,
            "the second copy's address is not kept"
        );
        assert_eq!(at("10.0.0.3"), None);
        for (ns, name) in names {
            assert!(pods.contains(&ObjectName::new(ns, name)), "{ns}/{name}");
        }
        for (ns, name) in [("shop", "web-2"), ("other", "web-0"), ("default", "")] {
            assert!(!pods.contains(&ObjectName::new(ns, name)), "{ns}/{name}");
        }
        assert!(!OtherPods::default().contains(&ObjectName::new("a", "b")));
        assert_eq!(
            OtherPods::default().name_at("10.0.0.1".parse().unwrap()),
            None
        );
    }

    #[test]
    fn host_network_pods_are_not_local_endpoints() {
        let pod = |name: &str, ip: u8, host_network: bool| Pod {
            name: ObjectName::new("default", name),
            node: NODE.to_owned(),
            service_account: "default".to_owned(),
            ips: vec![IpAddr::from([10, 1, 0, ip])],
            uid: String::new(),
            host_network,
        };
        let mut m = model(TrafficPolicy::Cluster, None, Vec::new());
        for p in [pod("app", 1, false), pod("agent", 2, true)] {
            m.pods.insert(p.name.clone(), Arc::new(p));
        }
        assert_eq!(m.local_pod_ips(), [IpAddr::from([10, 1, 0, 1])]);
    }
}
