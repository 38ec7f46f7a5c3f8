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
//!     loadBalancer: round-robin       # random | round-robin | weighted | maglev | least-connections
//!     sessionAffinity: { timeoutSeconds: 10800 }   # ClientIP affinity (per client pod)
//!     circuitBreaker:                 # Envoy's names; defaults as Envoy's
//!       maxConnections: 0             # per backend, 0 = unlimited (the default)
//!       consecutiveFailures: 5        # 0 = outlier detection off
//!       baseEjectionTime: 30s
//!       maxEjectionTime: 300s
//!       maxEjectionPercent: 10
//!     endpoints:
//!       - { ip: 10.1.0.3, node: node-a, pod: web-0, ready: true, weight: 1 }
//!       # optional: serving (default: ready), terminating (default: false); a serving and
//!       # terminating endpoint is used only while no endpoint is ready (as kube-proxy)
//! pods:                               # pods of interest (same-node bypass, identity)
//!   - { name: web-0, namespace: default, node: node-a, serviceAccount: web, ips: [10.1.0.3] }
//!   # optional: hostNetwork: true (the pod has the node's addresses: never a local pod endpoint)
//! ```

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
use tracing::{info, warn};

use super::Update;
use crate::{
    datapath::spec::{
        Algorithm, CircuitSettings, DEFAULT_BASE_EJECTION, DEFAULT_CONSECUTIVE_FAILURES,
        DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_EJECTION, DEFAULT_MAX_EJECTION_PERCENT,
        DEFAULT_PANIC_THRESHOLD_PERCENT, Protocol,
    },
    model::{self, ClusterModel, Endpoint, ObjectName, Pod, ServicePort, ServiceSettings},
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
    load_balancer: Option<Spanned<String>>,
    #[serde(default)]
    session_affinity: Option<FileAffinity>,
    #[serde(default)]
    circuit_breaker: Option<FileCircuit>,
    #[serde(default)]
    endpoints: Vec<Spanned<FileEndpoint>>,
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
struct FileCircuit {
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    consecutive_failures: Option<u32>,
    #[serde(default)]
    base_ejection_time: Option<Spanned<String>>,
    #[serde(default)]
    max_ejection_time: Option<Spanned<String>>,
    #[serde(default)]
    max_ejection_percent: Option<Spanned<u32>>,
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
        node: node.map(str::to_owned).or(doc.node).unwrap_or_default(),
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
            Pod {
                name,
                node: p.value.node.clone(),
                service_account: p
                    .value
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
                ips: p.value.ips.clone(),
                uid: String::new(),
                host_network: p.value.host_network,
            },
        );
    }
    Ok(model)
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

fn settings(chk: &Check<'_>, i: usize, f: &FileService) -> Result<ServiceSettings, ConfigError> {
    let at = |field: &str| format!("services[{i}].{field}");
    let algorithm = match f.load_balancer.as_ref().map(|s| (s, s.value.as_str())) {
        None | Some((_, "random")) => Algorithm::Random,
        Some((_, "round-robin")) => Algorithm::RoundRobin,
        Some((_, "weighted")) => Algorithm::Weighted,
        Some((_, "maglev")) => Algorithm::Maglev,
        Some((_, "least-connections")) => Algorithm::LeastConn,
        Some((sp, other)) => {
            return Err(chk.err(
                sp,
                at("loadBalancer"),
                format!("{other:?} is not one of random, round-robin, weighted, maglev, least-connections"),
            ));
        }
    };
    let duration = |s: &Option<Spanned<String>>, field: &str, default: Duration| match s {
        None => Ok(default),
        Some(sp) => humantime::parse_duration(&sp.value).map_err(|e| {
            chk.err(
                sp,
                at(&format!("circuitBreaker.{field}")),
                format!("{:?}: {e}", sp.value),
            )
        }),
    };
    let cb = f.circuit_breaker.as_ref();
    let circuit = CircuitSettings {
        max_connections: cb
            .and_then(|b| b.max_connections)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS),
        consecutive_failures: cb
            .and_then(|b| b.consecutive_failures)
            .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES),
        base_ejection: duration(
            &cb.and_then(|b| b.base_ejection_time.clone()),
            "baseEjectionTime",
            DEFAULT_BASE_EJECTION,
        )?,
        max_ejection: duration(
            &cb.and_then(|b| b.max_ejection_time.clone()),
            "maxEjectionTime",
            DEFAULT_MAX_EJECTION,
        )?,
        max_ejection_percent: match cb.and_then(|b| b.max_ejection_percent.as_ref()) {
            Some(p) if p.value > 100 => {
                return Err(chk.err(
                    p,
                    at("circuitBreaker.maxEjectionPercent"),
                    format!("{} is not 0..=100", p.value),
                ));
            }
            Some(p) => p.value,
            None => DEFAULT_MAX_EJECTION_PERCENT,
        },
        panic_threshold_percent: DEFAULT_PANIC_THRESHOLD_PERCENT,
    };
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
        algorithm,
        affinity_timeout,
        circuit,
        table_size: None,
    })
}

/// Reads and parses `path`.
pub fn load(path: &Path, node: Option<&str>) -> Result<ClusterModel, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        field: String::new(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text, node)
}

/// Watches `path`: sends the model at start and whenever the file's content changes; a bad
/// version is reported as [`Update::Rejected`] and the previous model stays in force.
pub async fn watch(
    path: PathBuf,
    node: Option<String>,
    interval: Duration,
    updates: mpsc::Sender<Update>,
) {
    // A digest of the last content seen, not the content: a 10,000-service file is megabytes.
    let mut last: Option<u64> = None;
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let digest = tokio::fs::read(&path).await.ok().map(|bytes| {
            let mut h = std::hash::DefaultHasher::new();
            std::hash::Hash::hash(&bytes, &mut h);
            std::hash::Hasher::finish(&h)
        });
        if digest.is_some() && digest == last {
            continue;
        }
        let update = match load(&path, node.as_deref()) {
            Ok(model) => {
                info!(file = %path.display(), services = model.services.len(), "static model loaded");
                Update::Model(model)
            }
            Err(e) => {
                warn!(error = %e, "static model rejected; keeping the last good state");
                Update::Rejected(e.to_string())
            }
        };
        last = digest;
        if updates.send(update).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
node: node-a
services:
  - name: web
    clusterIPs: [10.96.0.10]
    ports:
      - { name: http, port: 80, targetPort: 8080 }
    loadBalancer: maglev
    circuitBreaker: { consecutiveFailures: 3, baseEjectionTime: 2s }
    endpoints:
      - { ip: 10.1.0.3, node: node-a, pod: web-0 }
      - { ip: 10.1.0.4, ready: false }
pods:
  - { name: web-0, node: node-a, ips: [10.1.0.3] }
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
    fn bad_settings_are_rejected_with_the_field() {
        let e = parse_str(&GOOD.replace("maglev", "fastest")).unwrap_err();
        assert_eq!(e.field, "services[0].loadBalancer", "{e}");
        let e = parse_str(&GOOD.replace("2s", "two seconds")).unwrap_err();
        assert_eq!(
            e.field, "services[0].circuitBreaker.baseEjectionTime",
            "{e}"
        );
        let text = "services:\n  - name: a\n    clusterIPs: [10.96.0.1]\n    ports: [{port: 80}]\n  - name: b\n    clusterIPs: [10.96.0.1]\n    ports: [{port: 80}]\n";
        let e = parse_str(text).unwrap_err();
        assert!(
            e.reason.contains("already used by service default/a"),
            "{e}"
        );
    }
}
