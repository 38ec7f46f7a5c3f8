//! The static YAML source: a documented schema for running without Kubernetes (the demo, tests,
//! edge boxes), parsed → validated → turned into a [`ClusterModel`], and reloaded on change.
//! A bad file is rejected whole with file, line, field and reason; the last good model stays.
//!
//! ```yaml
//! node: node-a                        # this agent's node (overridden by --node-name)
//! services:
//!   - name: web                       # required; unique per namespace
//!     namespace: default              # default: default
//!     clusterIPs: [10.96.0.10]        # one or more (IPv4 and/or IPv6)
//!     ports:
//!       - { name: http, port: 80, targetPort: 8080, protocol: TCP }   # protocol TCP|UDP
//!     sessionAffinity: { timeoutSeconds: 10800 }   # ClientIP affinity (per client pod), as the
//!                                                  # Service's spec.sessionAffinityConfig
//!     endpoints:
//!       - { ip: 10.1.0.3, node: node-a, pod: web-0, ready: true, weight: 1 }
//!       # optional: serving (default: ready), terminating (default: false); a serving and
//!       # terminating endpoint is used only while no endpoint is ready (as kube-proxy)
//! pods:                               # pods of interest (same-node bypass, identity)
//!   - { name: web-0, namespace: default, node: node-a, serviceAccount: web, ips: [10.1.0.3] }
//!   # optional: hostNetwork: true (the pod has the node's addresses: never a local pod endpoint)
//!   # optional: labels: { app: web, kernmesh.io/dataplane-mode: none }   (selectors, opt-out)
//! nodes:                              # where each node's agent is reached (HBONE, 15008)
//!   - { name: node-a, addresses: [192.168.0.1] }
//! namespaces:                         # enrollment (a Namespace's kernmesh.io/dataplane-mode label)
//!   - { name: default, dataplaneMode: mesh }   # mesh | none
//! authorizationPolicies:              # AuthorizationPolicy objects, exactly as in Kubernetes
//!   - apiVersion: security.kernmesh.io/v1alpha1
//!     kind: AuthorizationPolicy
//!     metadata: { name: web-from-shop, namespace: default }
//!     spec:
//!       selector: { matchLabels: { app: web } }
//!       rules: [{ from: [{ source: { namespaces: [shop] } }], to: [{ operation: { ports: ["8080"] } }] }]
//! peerAuthentications:                # PeerAuthentication objects, exactly as in Kubernetes
//!   - apiVersion: security.kernmesh.io/v1alpha1
//!     kind: PeerAuthentication
//!     metadata: { name: default, namespace: default }
//!     spec: { mtls: { mode: STRICT } }
//! policies:                           # TrafficPolicy objects, exactly as in Kubernetes
//!   - apiVersion: traffic.kernmesh.io/v1alpha1
//!     kind: TrafficPolicy
//!     metadata: { name: web, namespace: default }
//!     spec:
//!       targetRefs: [{ group: "", kind: Service, name: web }]
//!       loadBalancer: { simple: ROUND_ROBIN }
//!       outlierDetection: { consecutiveFailures: 5, baseEjectionTime: 30s }
//! telemetry: { accessLog: true, otlpLogs: false }   # live switch (`telemetry::switch`)
//! ```
//!
//! Services take `labels:` too (`kernmesh.io/dataplane-mode: none` opts a service out).
//!
//! Policies go through the same parser, validation and resolution as in Kubernetes
//! ([`crate::policy`]): an invalid policy is rejected alone (reported as [`Update::Rejected`]
//! with its line and the same message a cluster would show in its status), and the services it
//! targets keep what the valid policies give them. Without a `metadata.creationTimestamp`,
//! conflicts between policies of the same level are decided by `namespace/name`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_saphyr::Spanned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Update;
use crate::{
    authz,
    datapath::spec::Protocol,
    model::{self, ClusterModel, Endpoint, ObjectName, Pod, ServicePort, ServiceSettings},
    policy,
};

/// How often the file is checked for changes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Most YAML nodes a static model may have (a 10,000-service model has about 600,000).
pub const MAX_YAML_NODES: usize = 20_000_000;
/// Namespace of objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A rejected file: where, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no position (an unreadable file).
    pub line: u64,
    pub column: u64,
    /// Dotted path of the field (`services[1].ports[0].port`), empty when unknown.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileDoc {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    services: Vec<Spanned<FileService>>,
    #[serde(default)]
    pods: Vec<Spanned<FilePod>>,
    /// Nodes and the addresses their agents are reached at (HBONE tunnels, port 15008).
    #[serde(default)]
    nodes: Vec<Spanned<FileNode>>,
    /// `TrafficPolicy` objects, read as plain data and judged by [`policy::parse`].
    #[serde(default)]
    policies: Vec<Spanned<serde_json::Value>>,
    /// Enrollment per namespace.
    #[serde(default)]
    namespaces: Vec<Spanned<FileNamespace>>,
    /// `AuthorizationPolicy` objects, judged by [`authz::parse_authorization`].
    #[serde(default)]
    authorization_policies: Vec<Spanned<serde_json::Value>>,
    /// `PeerAuthentication` objects, judged by [`authz::parse_peer_authentication`].
    #[serde(default)]
    peer_authentications: Vec<Spanned<serde_json::Value>>,
    /// The live telemetry switch ([`crate::telemetry::switch`]).
    #[serde(default)]
    telemetry: Option<Spanned<serde_json::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileNode {
    name: String,
    /// The node's `InternalIP`s (IPv4 and/or IPv6).
    addresses: Vec<IpAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileNamespace {
    name: String,
    /// `mesh` or `none` (a Namespace's `kernmesh.io/dataplane-mode` label).
    #[serde(default)]
    dataplane_mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileService {
    name: Spanned<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<Spanned<IpAddr>>,
    #[serde(default)]
    ports: Vec<Spanned<FilePort>>,
    #[serde(default)]
    session_affinity: Option<FileAffinity>,
    #[serde(default)]
    endpoints: Vec<Spanned<FileEndpoint>>,
    /// The Service's labels (`kernmesh.io/dataplane-mode: none` opts it out of the mesh).
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilePort {
    #[serde(default)]
    name: Option<String>,
    port: Spanned<u32>,
    #[serde(default)]
    target_port: Option<Spanned<u32>>,
    #[serde(default)]
    protocol: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileAffinity {
    timeout_seconds: Spanned<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FileEndpoint {
    ip: IpAddr,
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
    #[serde(default)]
    weight: Option<Spanned<u32>>,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
}

impl FileEndpoint {
    fn to_model(&self, namespace: &str, weight: u32) -> Endpoint {
        let ready = self.ready.unwrap_or(true);
        Endpoint {
            ip: self.ip,
            ports: std::sync::Arc::new(self.ports.clone()),
            ready,
            serving: self.serving.unwrap_or(ready),
            terminating: self.terminating.unwrap_or(false),
            node: self.node.as_deref().map(std::sync::Arc::from),
            pod: self
                .pod
                .as_ref()
                .map(|p| ObjectName::new(namespace, p.clone())),
            weight,
            hints: model::Hints::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FilePod {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    node: String,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    host_network: bool,
    /// The pod's labels (authorization selectors, `kernmesh.io/dataplane-mode`).
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Collects the first validation error with its position.
struct Check<'a> {
    file: &'a Path,
}

impl Check<'_> {
    fn err<T>(&self, at: &Spanned<T>, field: String, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: at.referenced.line(),
            column: at.referenced.column(),
            field,
            reason: reason.into(),
        }
    }
}

/// Parses and validates a static model. `node` overrides the file's `node:`.
pub fn parse(file: &Path, text: &str, node: Option<&str>) -> Result<ClusterModel, ConfigError> {
    parse_full(file, text, node).map(|(model, _)| model)
}

/// The `nodes:` section: node name → addresses, each node once with at least one address.
fn parse_nodes(
    chk: &Check<'_>,
    nodes: &[Spanned<FileNode>],
) -> Result<BTreeMap<String, Vec<IpAddr>>, ConfigError> {
    let mut out = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.value.addresses.is_empty() {
            return Err(chk.err(
                n,
                format!("nodes[{i}].addresses"),
                "a node needs at least one address".to_owned(),
            ));
        }
        if out
            .insert(n.value.name.clone(), n.value.addresses.clone())
            .is_some()
        {
            return Err(chk.err(
                n,
                format!("nodes[{i}].name"),
                format!("duplicate node {}", n.value.name),
            ));
        }
    }
    Ok(out)
}

/// [`parse`], plus the policies rejected on their own (the model is valid without them).
pub fn parse_full(
    file: &Path,
    text: &str,
    node: Option<&str>,
) -> Result<(ClusterModel, Vec<ConfigError>), ConfigError> {
    parse_all(file, text, node).map(|(model, rejected, _)| (model, rejected))
}

/// A parsed file: its model, the policies it rejected, and its telemetry switch.
type Parsed = (
    ClusterModel,
    Vec<ConfigError>,
    crate::telemetry::switch::Setting,
);

/// [`parse_full`], plus the file's telemetry switch (absent: the default).
fn parse_all(file: &Path, text: &str, node: Option<&str>) -> Result<Parsed, ConfigError> {
    // The parser's default budget (250,000 nodes) protects against hostile input; a cluster
    // model is trusted operator input and 10,000 services with their endpoints need more.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! { max_nodes: MAX_YAML_NODES, max_events: 4 * MAX_YAML_NODES },
    };
    let doc: FileDoc = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        ConfigError {
            file: file.to_owned(),
            line,
            column,
            field: String::new(),
            reason: e
                .to_string()
                .lines()
                .next()
                .unwrap_or("invalid YAML")
                .to_owned(),
        }
    })?;
    let chk = Check { file };
    let mut model = ClusterModel {
        node: node
            .map(str::to_owned)
            .or_else(|| doc.node.clone())
            .unwrap_or_default(),
        ..ClusterModel::default()
    };
    let mut vips: BTreeMap<(IpAddr, u16, Protocol), ObjectName> = BTreeMap::new();
    for (i, s) in doc.services.iter().enumerate() {
        let svc = service(&chk, i, s, &mut vips)?;
        if model.services.contains_key(&svc.name) {
            return Err(chk.err(
                &s.value.name,
                format!("services[{i}].name"),
                format!("duplicate service {}", svc.name),
            ));
        }
        model.services.insert(svc.name.clone(), svc);
    }
    model.nodes = parse_nodes(&chk, &doc.nodes)?;
    for (i, p) in doc.pods.iter().enumerate() {
        let name = ObjectName::new(
            p.value
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            p.value.name.clone(),
        );
        if model.pods.contains_key(&name) {
            return Err(chk.err(
                p,
                format!("pods[{i}].name"),
                format!("duplicate pod {name}"),
            ));
        }
        model.pods.insert(
            name.clone(),
            std::sync::Arc::new(Pod {
                name: name.clone(),
                node: p.value.node.clone(),
                service_account: p
                    .value
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
                ips: p.value.ips.clone(),
                uid: String::new(),
                host_network: p.value.host_network,
            }),
        );
        if !p.value.labels.is_empty() {
            model.mesh.pod_labels.insert(name, p.value.labels.clone());
        }
    }
    for (i, s) in doc.services.iter().enumerate() {
        if authz::DataplaneMode::from_labels(&s.value.labels) == Some(authz::DataplaneMode::None) {
            let name = ObjectName::new(
                s.value
                    .namespace
                    .clone()
                    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
                s.value.name.value.clone(),
            );
            debug_assert!(
                model.services.contains_key(&name),
                "services[{i}] was added"
            );
            model.mesh.opted_out_services.insert(name);
        }
    }
    let rejected = apply_policies(&chk, &doc.policies, &mut model)?;
    apply_mesh(&chk, &doc, &mut model)?;
    let telemetry =
        doc.telemetry
            .as_ref()
            .map_or(Ok(crate::telemetry::switch::Setting::default()), |t| {
                crate::telemetry::switch::parse(&t.value)
                    .map_err(|(field, reason)| chk.err(t, field, reason))
            })?;
    Ok((model, rejected, telemetry))
}

/// Parses the `policies:` list with the one policy parser, resolves it onto the services and
/// writes the winners' settings; returns the policies rejected on their own.
fn apply_policies(
    chk: &Check<'_>,
    docs: &[Spanned<serde_json::Value>],
    model: &mut ClusterModel,
) -> Result<Vec<ConfigError>, ConfigError> {
    let mut parsed: Vec<policy::ParsedPolicy> = Vec::with_capacity(docs.len());
    let mut rejected = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let p = policy::parse(&d.value);
        if parsed.iter().any(|q| q.name == p.name) {
            return Err(chk.err(
                d,
                format!("policies[{i}].metadata.name"),
                format!("duplicate TrafficPolicy {}", p.name),
            ));
        }
        if let Err(e) = &p.outcome {
            rejected.push(chk.err(d, format!("policies[{i}]"), e.to_string()));
        }
        parsed.push(p);
    }
    // A namespace "exists" in a static model when something lives in it.
    let namespaces: BTreeSet<&str> = model
        .services
        .keys()
        .chain(model.pods.keys())
        .map(|n| n.namespace.as_str())
        .collect();
    let services: BTreeSet<ObjectName> = model.services.keys().cloned().collect();
    let resolution = policy::resolve(&parsed, &services, &|ns| namespaces.contains(ns));
    for (name, settings) in &resolution.settings {
        if let Some(svc) = model.services.get_mut(name) {
            settings.apply(&mut svc.settings);
        }
    }
    model.policies = resolution.report;
    Ok(rejected)
}

/// Reads the enrollment and the security objects (each through the one parser Kubernetes uses).
/// Unlike a `TrafficPolicy`, an invalid security object rejects the whole file, so the last good
/// file keeps serving: dropping one DENY policy because of a typo would open what it closed
/// (the Kubernetes source keeps the object's last valid version for the same reason).
fn apply_mesh(chk: &Check<'_>, doc: &FileDoc, model: &mut ClusterModel) -> Result<(), ConfigError> {
    for (i, n) in doc.namespaces.iter().enumerate() {
        let mode = match n.value.dataplane_mode.as_ref() {
            None => None,
            Some(m) => match m.value.as_str() {
                authz::mesh::MODE_MESH => Some(authz::DataplaneMode::Mesh),
                authz::mesh::MODE_NONE => Some(authz::DataplaneMode::None),
                other => {
                    return Err(chk.err(
                        m,
                        format!("namespaces[{i}].dataplaneMode"),
                        format!("{other:?} is not mesh or none"),
                    ));
                }
            },
        };
        if doc.namespaces[..i]
            .iter()
            .any(|o| o.value.name == n.value.name)
        {
            return Err(chk.err(
                n,
                format!("namespaces[{i}].name"),
                format!("duplicate namespace {}", n.value.name),
            ));
        }
        if let Some(mode) = mode {
            model
                .mesh
                .namespace_modes
                .insert(n.value.name.clone(), mode);
        }
    }
    for (i, d) in doc.authorization_policies.iter().enumerate() {
        let p = authz::parse_authorization(&d.value);
        if model.mesh.authorization.iter().any(|q| q.name == p.name) {
            return Err(chk.err(
                d,
                format!("authorizationPolicies[{i}].metadata.name"),
                format!("duplicate AuthorizationPolicy {}", p.name),
            ));
        }
        if let Err(e) = &p.outcome {
            return Err(chk.err(d, format!("authorizationPolicies[{i}]"), e.to_string()));
        }
        model.mesh.authorization.push(p);
    }
    for (i, d) in doc.peer_authentications.iter().enumerate() {
        let p = authz::parse_peer_authentication(&d.value);
        if model
            .mesh
            .peer_authentication
            .iter()
            .any(|q| q.name == p.name)
        {
            return Err(chk.err(
                d,
                format!("peerAuthentications[{i}].metadata.name"),
                format!("duplicate PeerAuthentication {}", p.name),
            ));
        }
        if let Err(e) = &p.outcome {
            return Err(chk.err(d, format!("peerAuthentications[{i}]"), e.to_string()));
        }
        model.mesh.peer_authentication.push(p);
    }
    Ok(())
}

fn service(
    chk: &Check<'_>,
    i: usize,
    s: &Spanned<FileService>,
    vips: &mut BTreeMap<(IpAddr, u16, Protocol), ObjectName>,
) -> Result<model::Service, ConfigError> {
    let f = &s.value;
    let at = |field: &str| format!("services[{i}].{field}");
    if f.name.value.is_empty() {
        return Err(chk.err(&f.name, at("name"), "must not be empty"));
    }
    let name = ObjectName::new(
        f.namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        f.name.value.clone(),
    );
    if f.cluster_ips.is_empty() {
        return Err(chk.err(
            s,
            at("clusterIPs"),
            "a service needs at least one cluster IP",
        ));
    }
    let mut ports = Vec::new();
    let mut port_names = BTreeSet::new();
    for (j, p) in f.ports.iter().enumerate() {
        let field = |x: &str| at(&format!("ports[{j}].{x}"));
        let port = valid_port(chk, &p.value.port, field("port"))?;
        let target_port = match &p.value.target_port {
            Some(t) => valid_port(chk, t, field("targetPort"))?,
            None => port,
        };
        let protocol = match p.value.protocol.as_ref().map(|s| (s, s.value.as_str())) {
            None | Some((_, "TCP")) => Protocol::Tcp,
            Some((_, "UDP")) => Protocol::Udp,
            Some((sp, other)) => {
                return Err(chk.err(
                    sp,
                    field("protocol"),
                    format!("{other:?} is not TCP or UDP"),
                ));
            }
        };
        let pname = p.value.name.clone().unwrap_or_default();
        if !port_names.insert(pname.clone()) {
            return Err(chk.err(p, field("name"), format!("duplicate port name {pname:?}")));
        }
        for ip in &f.cluster_ips {
            if let Some(owner) = vips.insert((ip.value, port, protocol), name.clone()) {
                return Err(chk.err(
                    &p.value.port,
                    field("port"),
                    format!(
                        "{} {protocol:?} is already used by service {owner}",
                        SocketAddr::new(ip.value, port)
                    ),
                ));
            }
        }
        ports.push(ServicePort {
            name: pname,
            port,
            protocol,
            target_port: Some(target_port),
        });
    }
    if ports.is_empty() {
        return Err(chk.err(s, at("ports"), "a service needs at least one port"));
    }
    let settings = settings(chk, i, f)?;
    let mut endpoints = Vec::new();
    for (j, e) in f.endpoints.iter().enumerate() {
        let weight = match &e.value.weight {
            Some(w) if w.value == 0 => {
                return Err(chk.err(
                    w,
                    at(&format!("endpoints[{j}].weight")),
                    "must be at least 1",
                ));
            }
            Some(w) => w.value,
            None => 1,
        };
        endpoints.push(e.value.to_model(&name.namespace, weight));
    }
    Ok(model::Service {
        name,
        cluster_ips: f.cluster_ips.iter().map(|s| s.value).collect(),
        ports,
        settings,
        endpoints,
        internal_traffic_policy: model::TrafficPolicy::default(),
    })
}

fn valid_port(chk: &Check<'_>, p: &Spanned<u32>, field: String) -> Result<u16, ConfigError> {
    match u16::try_from(p.value) {
        Ok(v) if v != 0 => Ok(v),
        _ => Err(chk.err(
            p,
            field,
            format!("port {} is out of range 1..=65535", p.value),
        )),
    }
}

/// The service's own settings: `ClientIP` affinity (load balancing and circuit breaking come
/// from policies).
fn settings(chk: &Check<'_>, i: usize, f: &FileService) -> Result<ServiceSettings, ConfigError> {
    let at = |field: &str| format!("services[{i}].{field}");
    let affinity_timeout = match &f.session_affinity {
        Some(a) if a.timeout_seconds.value == 0 => {
            return Err(chk.err(
                &a.timeout_seconds,
                at("sessionAffinity.timeoutSeconds"),
                "must be at least 1",
            ));
        }
        Some(a) => Some(Duration::from_secs(a.timeout_seconds.value)),
        None => None,
    };
    Ok(ServiceSettings {
        affinity_timeout,
        ..ServiceSettings::default()
    })
}

/// Reads and parses `path`.
pub fn load(path: &Path, node: Option<&str>) -> Result<ClusterModel, ConfigError> {
    load_full(path, node).map(|(model, _)| model)
}

/// Reads and parses `path`, with the policies rejected on their own.
pub fn load_full(
    path: &Path,
    node: Option<&str>,
) -> Result<(ClusterModel, Vec<ConfigError>), ConfigError> {
    parse_read(path, std::fs::read(path), node).map(|(model, rejected, _)| (model, rejected))
}

/// Parses what reading `path` gave: its bytes as UTF-8 text, or the read's error as the file's.
fn parse_read(
    path: &Path,
    bytes: std::io::Result<Vec<u8>>,
    node: Option<&str>,
) -> Result<Parsed, ConfigError> {
    let text = bytes
        .and_then(|b| {
            String::from_utf8(b)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })
        .map_err(|e| ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            field: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
    parse_all(path, &text, node)
}

/// What identifies one version of the file without reading it: device, inode, size, and
/// modification and change times with nanoseconds, of the resolved target (`metadata` follows
/// symlinks: a `ConfigMap` mount's `..data` swap, like any rename-replace, gives a new inode
/// even when size and mtime are the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Changed less than `racy` ago (or in the future): a same-size rewrite in place may
    /// still come within the file system's timestamp tick and leave the stamp as it is, so
    /// the stamp is not trusted yet (git's "racily clean" rule). The change time counts, as
    /// nothing can set it back.
    fn is_racy(&self, racy: Duration) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let changed = Duration::new(
            u64::try_from(self.ctime.0).unwrap_or(0),
            u32::try_from(self.ctime.1).unwrap_or(0),
        );
        now.checked_sub(changed).is_none_or(|age| age < racy)
    }
}

/// How long after a change the file's stamp is not trusted ([`Stamp::is_racy`]): well above
/// any file system's timestamp granularity (ext4/xfs: the kernel's coarse clock, a few ms).
const RACY: Duration = Duration::from_secs(2);

/// Watches `path`: sends the model at start and whenever the file's content changes; a bad
/// version is reported as [`Update::Rejected`] and the previous model stays in force.
///
/// Each check costs one `stat` while the file is unchanged: it is read (and hashed) only when
/// its [`Stamp`] changed or is too recent to trust, and parsed only when the content's digest
/// changed (a `touch` reads it once and does nothing); a 10,000-service file re-read and
/// hashed every 500 ms cost the agent ≈ 15 % of a core. Envoy's file-based xDS watches the
/// directory with inotify for the same rename-replace; a `stat` per tick needs no inotify
/// support from the mount.
pub async fn watch(
    path: PathBuf,
    node: Option<String>,
    interval: Duration,
    updates: mpsc::Sender<Update>,
) {
    let reads = std::sync::atomic::AtomicU64::new(0);
    watch_counting(path, node, interval, RACY, updates, &reads).await;
}

/// [`watch`], counting the reads of the file in `reads` (for tests).
async fn watch_counting(
    path: PathBuf,
    node: Option<String>,
    interval: Duration,
    racy: Duration,
    updates: mpsc::Sender<Update>,
    reads: &std::sync::atomic::AtomicU64,
) {
    // A digest of the last content seen, not the content: a 10,000-service file is megabytes.
    let mut last: Option<u64> = None;
    // The stamp of the version `last` was read from, once old enough to trust.
    let mut known: Option<Stamp> = None;
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        // Taken before reading: a change between the two shows as a new stamp next time (one
        // more read), never as a stamp that hides new content.
        let stamp = tokio::fs::metadata(&path).await.ok().map(|m| Stamp::of(&m));
        if stamp.is_some() && stamp == known {
            continue;
        }
        reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        debug!(file = %path.display(), "static model file read");
        let bytes = tokio::fs::read(&path).await;
        let digest = bytes.as_ref().ok().map(|bytes| {
            let mut h = std::hash::DefaultHasher::new();
            std::hash::Hash::hash(bytes, &mut h);
            std::hash::Hasher::finish(&h)
        });
        let trusted = stamp.filter(|s| !s.is_racy(racy));
        if digest.is_some() && digest == last {
            known = trusted;
            continue;
        }
        // Parsing a large model takes a while: off the async workers, so admin calls and the
        // flow pump never queue behind it. It parses the bytes just hashed, not a second read.
        let (p, n) = (path.clone(), node.clone());
        let loaded = tokio::task::spawn_blocking(move || parse_read(&p, bytes, n.as_deref()))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let sent = match loaded {
            Ok((model, rejected, telemetry)) => {
                crate::telemetry::switch::apply(&path, telemetry);
                info!(file = %path.display(), services = model.services.len(), policies = model.policies.policies.len(), "static model loaded");
                // The model first: accepting it clears the file's rejection, these set it again.
                let mut sent = updates.send(Update::Model(model)).await.is_ok();
                for e in rejected {
                    warn!(error = %e, "policy rejected; the services it targets keep the defaults or another valid policy");
                    sent = sent
                        && updates
                            .send(Update::Rejected(super::Rejection::file(e)))
                            .await
                            .is_ok();
                }
                sent
            }
            Err(e) => {
                warn!(error = %e, "static model rejected; keeping the last good state");
                updates
                    .send(Update::Rejected(super::Rejection::file(e)))
                    .await
                    .is_ok()
            }
        };
        last = digest;
        known = trusted;
        if !sent {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::spec::{Algorithm, DEFAULT_MAX_CONNECTIONS};

    const GOOD: &str = "\
node: node-a
services:
  - name: web
    clusterIPs: [10.96.0.10]
    ports:
      - { name: http, port: 80, targetPort: 8080 }
    sessionAffinity: { timeoutSeconds: 60 }
    endpoints:
      - { ip: 10.1.0.3, node: node-a, pod: web-0 }
      - { ip: 10.1.0.4, ready: false }
pods:
  - { name: web-0, node: node-a, ips: [10.1.0.3] }
policies:
  - apiVersion: traffic.kernmesh.io/v1alpha1
    kind: TrafficPolicy
    metadata: { name: web }
    spec:
      targetRefs: [{ group: \"\", kind: Service, name: web }]
      loadBalancer: { consistentHash: { maglev: { tableSize: 4099 } } }
      outlierDetection: { consecutiveFailures: 3, baseEjectionTime: 2s }
";

    fn parse_str(text: &str) -> Result<ClusterModel, ConfigError> {
        parse(Path::new("mesh.yaml"), text, None)
    }

    #[test]
    fn a_good_file_becomes_the_model() {
        let m = parse_str(GOOD).unwrap();
        assert_eq!(m.node, "node-a");
        let web = &m.services[&ObjectName::new("default", "web")];
        assert_eq!(web.settings.algorithm, Algorithm::Maglev);
        assert_eq!(web.settings.table_size, Some(4099));
        assert_eq!(web.settings.affinity_timeout, Some(Duration::from_mins(1)));
        assert_eq!(web.settings.circuit.consecutive_failures, 3);
        assert_eq!(web.settings.circuit.base_ejection, Duration::from_secs(2));
        assert_eq!(
            web.settings.circuit.max_connections,
            DEFAULT_MAX_CONNECTIONS
        );
        let specs = m.desired_specs();
        assert_eq!(specs.len(), 1);
        assert_eq!(
            specs[0].1.backends.len(),
            1,
            "not-ready endpoints get no connections"
        );
        assert_eq!(specs[0].1.backends[0].addr.port(), 8080);
        assert_eq!(m.local_pod_ips(), vec![IpAddr::from([10, 1, 0, 3])]);
    }

    #[test]
    fn malformed_yaml_names_the_line() {
        let e = parse_str("services:\n  - name: web\n    ports: [\n").unwrap_err();
        assert!(e.line >= 3, "{e}");
        assert!(e.to_string().starts_with("mesh.yaml:"), "{e}");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name_and_line() {
        let e = parse_str("services:\n  - name: web\n    clusterIPs: [10.96.0.1]\n    prots: []\n")
            .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.reason.contains("prots"), "{e}");
    }

    #[test]
    fn duplicate_service_is_rejected() {
        let text = "services:\n  - name: a\n    clusterIPs: [10.96.0.1]\n    ports: [{port: 80}]\n  - name: a\n    clusterIPs: [10.96.0.2]\n    ports: [{port: 80}]\n";
        let e = parse_str(text).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (5, "services[1].name"), "{e}");
        assert!(e.reason.contains("duplicate service default/a"), "{e}");
    }

    #[test]
    fn port_out_of_range_is_rejected() {
        let text = "services:\n  - name: a\n    clusterIPs: [10.96.0.1]\n    ports:\n      - { port: 70000 }\n";
        let e = parse_str(text).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (5, "services[0].ports[0].port"),
            "{e}"
        );
        assert!(e.reason.contains("out of range"), "{e}");
    }

    #[test]
    fn an_invalid_policy_is_rejected_alone_with_its_line_and_the_cluster_message() {
        let text = GOOD.replace("2s", "two seconds");
        let (m, rejected) = parse_full(Path::new("mesh.yaml"), &text, None).unwrap();
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        let e = &rejected[0];
        assert_eq!((e.line, e.field.as_str()), (14, "policies[0]"), "{e}");
        assert_eq!(
            e.to_string(),
            "mesh.yaml:14:5: policies[0]: TrafficPolicy default/web: \
             spec.outlierDetection.baseEjectionTime: \"two seconds\" is not a duration like 30s, \
             1m30s or 500ms (units h, m, s, ms); rejected as a whole"
        );
        let web = &m.services[&ObjectName::new("default", "web")];
        assert_eq!(
            web.settings,
            ServiceSettings {
                affinity_timeout: Some(Duration::from_mins(1)),
                ..ServiceSettings::default()
            },
            "nothing of the invalid policy applies"
        );
        let state = &m.policies.policies[&ObjectName::new("default", "web")];
        assert_eq!(state.reason, policy::Reason::Invalid);
    }

    #[test]
    fn the_old_per_service_settings_are_gone() {
        let text = GOOD.replace(
            "    sessionAffinity: { timeoutSeconds: 60 }\n",
            "    loadBalancer: round-robin\n",
        );
        let e = parse_str(&text).unwrap_err();
        assert!(e.reason.contains("loadBalancer"), "{e}");
    }

    #[test]
    fn duplicate_policies_reject_the_file() {
        let dup = GOOD.split_once("\npolicies:\n").unwrap().1;
        let e = parse_str(&format!("{GOOD}{dup}")).unwrap_err();
        assert_eq!(e.field, "policies[1].metadata.name", "{e}");
        assert!(
            e.reason.contains("duplicate TrafficPolicy default/web"),
            "{e}"
        );
    }

    #[test]
    fn bad_settings_are_rejected_with_the_field() {
        let text = "services:\n  - name: a\n    clusterIPs: [10.96.0.1]\n    ports: [{port: 80}]\n  - name: b\n    clusterIPs: [10.96.0.1]\n    ports: [{port: 80}]\n";
        let e = parse_str(text).unwrap_err();
        assert!(
            e.reason.contains("already used by service default/a"),
            "{e}"
        );
    }

    const MESH: &str = "\
services:
  - name: web
    namespace: shop
    clusterIPs: [10.96.0.10]
    ports: [{ port: 80 }]
  - name: legacy
    namespace: shop
    labels: { kernmesh.io/dataplane-mode: none }
    clusterIPs: [10.96.0.11]
    ports: [{ port: 80 }]
pods:
  - { name: web-0, namespace: shop, node: a, serviceAccount: web, ips: [10.1.0.3], labels: { app: web } }
  - { name: old-0, namespace: shop, node: a, ips: [10.1.0.4], labels: { kernmesh.io/dataplane-mode: none } }
namespaces:
  - { name: shop, dataplaneMode: mesh }
authorizationPolicies:
  - apiVersion: security.kernmesh.io/v1alpha1
    kind: AuthorizationPolicy
    metadata: { name: web, namespace: shop }
    spec:
      selector: { matchLabels: { app: web } }
      rules: [{ from: [{ source: { namespaces: [shop] } }] }]
peerAuthentications:
  - apiVersion: security.kernmesh.io/v1alpha1
    kind: PeerAuthentication
    metadata: { name: default, namespace: shop }
    spec: { mtls: { mode: STRICT } }
";

    #[test]
    fn enrollment_and_security_objects_come_from_the_file() {
        let m = parse_str(MESH).unwrap();
        let v = authz::MeshView::build(&m, &authz::MeshSettings::default());
        let web = &v.enrolled[&ObjectName::new("shop", "web-0")];
        assert_eq!(
            web.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(web.mode, authz::MtlsMode::Strict);
        assert_eq!(web.policies.allow.len(), 1);
        assert_eq!(
            v.not_enrolled(&m, &ObjectName::new("shop", "old-0")),
            Some(authz::NotEnrolled::OptedOut)
        );
        assert!(
            m.mesh
                .opted_out_services
                .contains(&ObjectName::new("shop", "legacy"))
        );
        assert!(
            !m.mesh
                .opted_out_services
                .contains(&ObjectName::new("shop", "web"))
        );
        assert!(
            m.mesh
                .endpoint_enrolled("shop", Some(&ObjectName::new("shop", "web-0")))
        );
        assert!(
            !m.mesh
                .endpoint_enrolled("shop", Some(&ObjectName::new("shop", "old-0")))
        );
        assert!(
            m.mesh.endpoint_enrolled("shop", None),
            "a remote pod: by its namespace"
        );
        assert!(!m.mesh.endpoint_enrolled("default", None));
        let other = crate::identity::SpiffeId::new("cluster.local", "other", "x").unwrap();
        assert!(
            !v.authorize(Some(&other), IpAddr::from([10, 1, 0, 3]), 80)
                .allowed
        );
    }

    #[test]
    fn an_invalid_security_object_rejects_the_file_with_file_line_and_column() {
        let text = MESH.replace(
            "rules: [{ from: [{ source: { namespaces: [shop] } }] }]",
            "rules: [{ to: [{ operation: { methods: [GET] } }] }]",
        );
        let e = parse_full(Path::new("mesh.yaml"), &text, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mesh.yaml:17:5: authorizationPolicies[0]: AuthorizationPolicy shop/web: \
             spec.rules[0].to[0].operation.methods: L7 fields are not supported by this L4 \
             policy (Istio ambient needs a waypoint proxy for them); rejected as a whole"
        );
        let text = MESH.replace("mode: STRICT", "mode: DISABLE");
        let e = parse_full(Path::new("mesh.yaml"), &text, None).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "mesh.yaml:24:5: peerAuthentications[0]: PeerAuthentication shop/default: spec.mtls.mode: DISABLE is not supported"
            ),
            "{e}"
        );
        let e =
            parse_str(&MESH.replace("dataplaneMode: mesh", "dataplaneMode: ambient")).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (15, "namespaces[0].dataplaneMode"),
            "{e}"
        );
    }

    /// Waits for a model naming node `want` (the tests tell versions apart by it: `node-a`,
    /// `node-b`, `node-c` have the same size); a half-written version in between may come.
    async fn until_node(rx: &mut mpsc::Receiver<Update>, want: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Update::Model(m))) if m.node == want => return,
                Ok(Some(_)) => {}
                other => panic!("no model of {want}: {other:?}"),
            }
        }
    }

    /// A fresh directory under the system's temp dir for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mesh-file-watch-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const A: &str = "node: node-a\nservices: []\n";
    const B: &str = "node: node-b\nservices: []\n";
    const C: &str = "node: node-c\nservices: []\n";
    const TICK: Duration = Duration::from_millis(20);

    fn reads(r: &std::sync::atomic::AtomicU64) -> u64 {
        r.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[tokio::test]
    async fn an_unchanged_file_is_stat_not_read_and_a_same_size_rename_replace_is_seen() {
        use std::sync::{Arc, atomic::AtomicU64};
        let dir = scratch("rename");
        let file = dir.join("mesh.yaml");
        std::fs::write(&file, A).unwrap();
        let reads_count = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = mpsc::channel(8);
        let r = Arc::clone(&reads_count);
        let f = file.clone();
        // No racy window here: every stamp is trusted at once (the next test covers it).
        let task = tokio::spawn(async move {
            watch_counting(f, None, TICK, Duration::ZERO, tx, &r).await;
        });
        until_node(&mut rx, "node-a").await;
        tokio::time::sleep(TICK * 15).await;
        assert_eq!(reads(&reads_count), 1, "an unchanged file was read again");

        // Touched (new mtime and ctime, same content): read once more, nothing sent.
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(std::time::SystemTime::now())
            .unwrap();
        tokio::time::sleep(TICK * 15).await;
        assert_eq!(reads(&reads_count), 2);
        assert!(rx.try_recv().is_err(), "a rewrite without change was sent");

        // Replaced by rename with the same size and the same mtime to the nanosecond: only
        // the inode tells (a ConfigMap update, or `cp -p` then `mv`).
        let before = std::fs::metadata(&file).unwrap();
        let tmp = dir.join(".mesh.yaml.tmp");
        std::fs::write(&tmp, B).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(before.modified().unwrap())
            .unwrap();
        let replacement = std::fs::metadata(&tmp).unwrap();
        assert_eq!(
            (replacement.len(), replacement.modified().unwrap()),
            (before.len(), before.modified().unwrap())
        );
        std::fs::rename(&tmp, &file).unwrap();
        until_node(&mut rx, "node-b").await;
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_configmap_data_swap_and_a_quick_same_size_rewrite_in_place_are_seen() {
        use std::os::unix::fs::symlink;
        use std::sync::{Arc, atomic::AtomicU64};
        let dir = scratch("configmap");
        // kubelet's atomic writer: `mesh.yaml -> ..data/mesh.yaml`, `..data -> ..<timestamp>`.
        for (version, text) in [("..v1", A), ("..v2", B)] {
            std::fs::create_dir(dir.join(version)).unwrap();
            std::fs::write(dir.join(version).join("mesh.yaml"), text).unwrap();
        }
        let when = std::fs::metadata(dir.join("..v1/mesh.yaml"))
            .unwrap()
            .modified()
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(dir.join("..v2/mesh.yaml"))
            .unwrap()
            .set_modified(when)
            .unwrap();
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/mesh.yaml", dir.join("mesh.yaml")).unwrap();
        let reads_count = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = mpsc::channel(8);
        let r = Arc::clone(&reads_count);
        let f = dir.join("mesh.yaml");
        let task = tokio::spawn(async move {
            watch_counting(f, None, TICK, RACY, tx, &r).await;
        });
        until_node(&mut rx, "node-a").await;
        symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        until_node(&mut rx, "node-b").await;
        // Rewritten in place at once with the same size and mtime: within the racy window
        // the stamp is not trusted, so the content is read again and the change seen.
        let target = dir.join("..v2/mesh.yaml");
        std::fs::write(&target, C).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&target)
            .unwrap()
            .set_modified(when)
            .unwrap();
        until_node(&mut rx, "node-c").await;
        // Once the file is older than the window, checks stop reading it.
        tokio::time::sleep(RACY + TICK * 5).await;
        let settled = reads(&reads_count);
        tokio::time::sleep(TICK * 15).await;
        assert_eq!(
            reads(&reads_count),
            settled,
            "a settled file was read again"
        );
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
