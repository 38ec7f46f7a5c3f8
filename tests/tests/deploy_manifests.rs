//! The Kubernetes deployment in `deploy/`, checked without a cluster (not a kernel test).
//!
//! Every document of `deploy/kubernetes/*.yaml` must parse into its typed Kubernetes API object
//! (k8s-openapi) with no field the API does not know — a misspelt or misplaced field is ignored by
//! the API server's lenient decoding, so it would silently not apply — and the properties the agent
//! relies on must hold: the capabilities, the host mounts, the probes, least-privilege RBAC, the
//! surge-free rolling update and the command line. The Helm chart cannot be rendered here (no
//! `helm`), so it is checked as text: `Chart.yaml` parses, every `.Values.x.y` a template uses
//! exists in `values.yaml`, template actions balance, and its defaults match the plain manifests.
//! The uninstall path (the cleanup `DaemonSet` and the chart's pre-delete hook) is checked against
//! the agent's `DaemonSet`, and `.github/workflows/kind.yml` (which cannot run here) is parsed and
//! its steps and workload objects checked.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::{
    Resource,
    api::{
        admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
        apps::v1::{DaemonSet, Deployment},
        core::v1::{
            ConfigMap, Container, HostPathVolumeSource, Namespace, PodSpec, ResourceQuota, Service,
            ServiceAccount, Volume, VolumeMount,
        },
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The capabilities the agent needs (reasons in `deploy/kubernetes/daemonset.yaml`).
const CAPABILITIES: [&str; 5] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"];
/// The agent's command line in Kubernetes mode: flag → value (`None` for a switch).
const AGENT_ARGS: [(&str, Option<&str>); 9] = [
    ("--node-name", Some("$(NODE_NAME)")),
    ("--kubernetes", None),
    ("--pin-dir", Some("/sys/fs/bpf/mesh")),
    ("--cgroup", Some("/sys/fs/cgroup")),
    ("--admin-socket", Some("/run/mesh/admin.sock")),
    ("--readiness-addr", Some("0.0.0.0:15021")),
    ("--metrics-addr", Some("0.0.0.0:15020")),
    ("--log-json", None),
    // The flow API for the relay (relay.yaml), Hubble's agent port.
    ("--flow-api-listen", Some("0.0.0.0:4244")),
];
/// ztunnel-compatible readiness and metrics ports.
const READINESS_PORT: i32 = 15021;
const METRICS_PORT: i32 = 15020;
const AGENT_CONTAINER: &str = "mesh-agent";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Files in `dir` whose name ends with one of `suffixes`, sorted.
fn files(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut out: Vec<PathBuf> = entries
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| suffixes.iter().any(|s| n.ends_with(s)))
        })
        .collect();
    out.sort();
    out
}

/// Parses a YAML file of one or more documents into JSON values (empty documents dropped).
fn yaml_documents(path: &Path) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

// --- typed objects ----------------------------------------------------------------------------

/// Every object of `deploy/kubernetes/`, typed.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    quotas: Vec<ResourceQuota>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    crds: Vec<CustomResourceDefinition>,
    admission_policies: Vec<ValidatingAdmissionPolicy>,
    admission_bindings: Vec<ValidatingAdmissionPolicyBinding>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
}

/// The CA's manifests (`ca*.yaml`) are checked on their own (`Manifests::load_ca`): they add a
/// second `ServiceAccount`, `ClusterRole` and `Role` that the agent's checks must not see.
fn is_ca_manifest(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("ca"))
}

/// The relay's manifest (`relay.yaml`) is checked on its own, as the CA's.
fn is_relay_manifest(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("relay"))
}

impl Manifests {
    fn load() -> Self {
        Self::load_where(|p| !is_ca_manifest(p) && !is_relay_manifest(p))
    }

    fn load_ca() -> Self {
        Self::load_where(is_ca_manifest)
    }

    fn load_where(keep: impl Fn(&Path) -> bool) -> Self {
        let dir = deploy_dir().join("kubernetes");
        let paths: Vec<PathBuf> = files(&dir, &[".yaml", ".yml"])
            .into_iter()
            .filter(|p| keep(p))
            .collect();
        assert!(!paths.is_empty(), "no manifests in {}", dir.display());
        let mut m = Self::default();
        for path in paths {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let docs = yaml_documents(&path);
            assert!(!docs.is_empty(), "{name} holds no document");
            for (i, doc) in docs.into_iter().enumerate() {
                m.add(&format!("{name} (document {})", i + 1), &doc);
            }
        }
        m
    }

    fn add(&mut self, at: &str, doc: &Value) {
        let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        let is = |api: &str, k: &str| api_version == api && kind == k;
        if is(Namespace::API_VERSION, Namespace::KIND) {
            self.namespaces.push(typed(at, doc));
        } else if is(ResourceQuota::API_VERSION, ResourceQuota::KIND) {
            self.quotas.push(typed(at, doc));
        } else if is(ServiceAccount::API_VERSION, ServiceAccount::KIND) {
            self.service_accounts.push(typed(at, doc));
        } else if is(ClusterRole::API_VERSION, ClusterRole::KIND) {
            self.cluster_roles.push(typed(at, doc));
        } else if is(ClusterRoleBinding::API_VERSION, ClusterRoleBinding::KIND) {
            self.bindings.push(typed(at, doc));
        } else if is(ConfigMap::API_VERSION, ConfigMap::KIND) {
            self.config_maps.push(typed(at, doc));
        } else if is(DaemonSet::API_VERSION, DaemonSet::KIND) {
            self.daemon_sets.push(typed(at, doc));
        } else if is(Role::API_VERSION, Role::KIND) {
            self.roles.push(typed(at, doc));
        } else if is(RoleBinding::API_VERSION, RoleBinding::KIND) {
            self.role_bindings.push(typed(at, doc));
        } else if is(
            CustomResourceDefinition::API_VERSION,
            CustomResourceDefinition::KIND,
        ) {
            self.crds.push(typed(at, doc));
        } else if is(
            ValidatingAdmissionPolicy::API_VERSION,
            ValidatingAdmissionPolicy::KIND,
        ) {
            self.admission_policies.push(typed(at, doc));
        } else if is(
            ValidatingAdmissionPolicyBinding::API_VERSION,
            ValidatingAdmissionPolicyBinding::KIND,
        ) {
            self.admission_bindings.push(typed(at, doc));
        } else if is(Deployment::API_VERSION, Deployment::KIND) {
            self.deployments.push(typed(at, doc));
        } else if is(Service::API_VERSION, Service::KIND) {
            self.services.push(typed(at, doc));
        } else {
            panic!(
                "{at}: unexpected object `{api_version}` `{kind}` (a typo, or a new kind this test \
                 must learn to check)"
            );
        }
    }
}

/// Deserializes `doc` as `T` and requires that serializing it back keeps every field of `doc`:
/// a field k8s-openapi drops is one the API server would ignore too.
fn typed<T: Resource + DeserializeOwned + Serialize>(at: &str, doc: &Value) -> T {
    let obj: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{at}: not a valid {} {}: {e}", T::API_VERSION, T::KIND));
    let back = serde_json::to_value(&obj).expect("k8s-openapi objects serialize");
    let mut lost = Vec::new();
    lost_fields("", doc, &back, &mut lost);
    assert!(
        lost.is_empty(),
        "{at}: {} fields the Kubernetes API does not have (misspelt or misplaced?) or values it \
         reads differently:\n  {}",
        T::KIND,
        lost.join("\n  ")
    );
    obj
}

/// Paths of `original` that are missing from, or different in, `back`.
fn lost_fields(path: &str, original: &Value, back: &Value, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (key, value) in o {
                let at = format!("{path}.{key}");
                match b.get(key) {
                    Some(v) => lost_fields(&at, value, v, out),
                    None => out.push(format!("{at}: unknown field")),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (value, v)) in o.iter().zip(b).enumerate() {
                lost_fields(&format!("{path}[{i}]"), value, v, out);
            }
        }
        _ if original == back => {}
        _ => out.push(format!("{path}: written {original}, read as {back}")),
    }
}

fn only<'a, T>(items: &'a [T], what: &str) -> &'a T {
    assert_eq!(
        items.len(),
        1,
        "deploy/kubernetes must hold exactly one {what}"
    );
    &items[0]
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod template spec")
}

fn agent(ds: &DaemonSet) -> &Container {
    pod_spec(ds)
        .containers
        .iter()
        .find(|c| c.name == AGENT_CONTAINER)
        .unwrap_or_else(|| panic!("the DaemonSet has no container named `{AGENT_CONTAINER}`"))
}

/// The container's arguments as flag → value (`None` for a switch).
fn flags(args: &[String]) -> BTreeMap<&str, Option<&str>> {
    let mut out = BTreeMap::new();
    let mut iter = args.iter().peekable();
    while let Some(arg) = iter.next() {
        assert!(arg.starts_with("--"), "argument `{arg}` follows no flag");
        let (flag, value) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value)),
            None if iter.peek().is_some_and(|next| !next.starts_with("--")) => {
                (arg.as_str(), iter.next().map(String::as_str))
            }
            None => (arg.as_str(), None),
        };
        assert!(out.insert(flag, value).is_none(), "flag {flag} given twice");
    }
    out
}

fn flag<'a>(c: &'a Container, name: &str) -> &'a str {
    let args = c.args.as_deref().unwrap_or_default();
    flags(args)
        .get(name)
        .copied()
        .flatten()
        .unwrap_or_else(|| panic!("the agent's args have no `{name} <value>`"))
}

/// The container mount holding `path` (the longest mount path that is a prefix of it) and the
/// host path of its volume.
fn host_mount<'a>(ds: &'a DaemonSet, path: &str) -> (&'a VolumeMount, &'a HostPathVolumeSource) {
    let mount = agent(ds)
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(path).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("no volume is mounted at or above {path}"));
    let host = volume(ds, &mount.name)
        .host_path
        .as_ref()
        .unwrap_or_else(|| {
            panic!(
                "{path} is mounted from volume `{}`, which is not a hostPath",
                mount.name
            )
        });
    (mount, host)
}

fn volume<'a>(ds: &'a DaemonSet, name: &str) -> &'a Volume {
    pod_spec(ds)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("volume `{name}` is mounted but not defined"))
}

// --- plain manifests --------------------------------------------------------------------------

#[test]
fn every_document_is_a_known_kubernetes_object_in_one_namespace() {
    let m = Manifests::load();
    let ns = only(&m.namespaces, "Namespace");
    let ns_name = ns
        .metadata
        .name
        .as_deref()
        .expect("the Namespace has a name");
    assert_eq!(ns_name, "mesh-system");
    only(&m.service_accounts, "ServiceAccount");
    only(&m.cluster_roles, "ClusterRole");
    only(&m.bindings, "ClusterRoleBinding");
    only(&m.config_maps, "ConfigMap");
    only(&m.daemon_sets, "DaemonSet");
    only(&m.roles, "Role");
    only(&m.role_bindings, "RoleBinding");
    let mut crds: Vec<&str> = m
        .crds
        .iter()
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    crds.sort_unstable();
    assert_eq!(
        crds,
        [
            "authorizationpolicies.security.kernmesh.io",
            "peerauthentications.security.kernmesh.io",
            "routepolicies.gateway.kernmesh.io",
            "trafficpolicies.traffic.kernmesh.io"
        ]
    );
    only(&m.admission_policies, "ValidatingAdmissionPolicy");
    only(&m.admission_bindings, "ValidatingAdmissionPolicyBinding");
    let namespaced = m
        .quotas
        .iter()
        .map(|o| (&o.metadata, "ResourceQuota"))
        .chain(
            m.service_accounts
                .iter()
                .map(|o| (&o.metadata, "ServiceAccount")),
        )
        .chain(m.config_maps.iter().map(|o| (&o.metadata, "ConfigMap")))
        .chain(m.roles.iter().map(|o| (&o.metadata, "Role")))
        .chain(m.role_bindings.iter().map(|o| (&o.metadata, "RoleBinding")))
        .chain(m.daemon_sets.iter().map(|o| (&o.metadata, "DaemonSet")));
    for (meta, kind) in namespaced {
        assert_eq!(
            meta.namespace.as_deref(),
            Some(ns_name),
            "{kind} {:?} must live in {ns_name}",
            meta.name
        );
    }
}

#[test]
fn namespace_admits_a_privileged_critical_pod() {
    let m = Manifests::load();
    let ns = only(&m.namespaces, "Namespace");
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged"),
        "hostNetwork, hostPath and added capabilities need Pod Security level `privileged`"
    );
    let class = pod_spec(only(&m.daemon_sets, "DaemonSet"))
        .priority_class_name
        .clone()
        .expect("the agent has a priority class");
    assert_eq!(class, "system-node-critical");
    let covered = m.quotas.iter().any(|q| {
        q.spec
            .as_ref()
            .and_then(|s| s.scope_selector.as_ref())
            .and_then(|s| s.match_expressions.as_ref())
            .is_some_and(|exprs| {
                exprs.iter().any(|e| {
                    e.scope_name == "PriorityClass"
                        && e.operator == "In"
                        && e.values.iter().flatten().any(|v| *v == class)
                })
            })
    });
    assert!(
        covered,
        "no ResourceQuota admits priority class {class} outside kube-system"
    );
}

#[test]
fn agent_has_exactly_the_ebpf_capabilities_and_nothing_else() {
    let m = Manifests::load();
    let ds = only(&m.daemon_sets, "DaemonSet");
    let sc = agent(ds)
        .security_context
        .as_ref()
        .expect("the agent container has a securityContext");
    let caps = sc.capabilities.as_ref().expect("capabilities are explicit");
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(CAPABILITIES), "capabilities.add");
    assert_eq!(
        caps.add.as_ref().map(Vec::len),
        Some(CAPABILITIES.len()),
        "duplicate capability"
    );
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "capabilities.drop"
    );
    // The API server refuses `allowPrivilegeEscalation: false` with an added `CAP_SYS_ADMIN`.
    assert!(
        added.iter().all(|c| !c.starts_with("CAP_")),
        "spell capabilities without the CAP_ prefix: {added:?}"
    );
    assert_ne!(
        sc.privileged,
        Some(true),
        "the agent must not be privileged"
    );
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_user, Some(0), "capabilities are granted to uid 0");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let seccomp = sc.seccomp_profile.as_ref().map(|p| p.type_.as_str());
    assert_eq!(seccomp, Some("RuntimeDefault"), "seccompProfile");
    let pod = pod_spec(ds);
    assert_eq!(pod.host_network, Some(true), "the agent serves node ports");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
    assert_ne!(pod.host_ipc, Some(true), "hostIPC is not needed");
    assert_eq!(pod.containers.len(), 1, "one container");
    assert!(
        pod.init_containers.is_none(),
        "no init containers (they would need their own review)"
    );
}

#[test]
fn bpffs_cgroup_and_admin_socket_are_host_mounts() {
    let m = Manifests::load();
    let ds = only(&m.daemon_sets, "DaemonSet");
    let c = agent(ds);

    let (bpffs, host) = host_mount(ds, flag(c, "--pin-dir"));
    assert_eq!(
        host.path, "/sys/fs/bpf",
        "--pin-dir must be in the host's bpffs"
    );
    assert_eq!(bpffs.mount_path, "/sys/fs/bpf");
    assert_ne!(bpffs.read_only, Some(true), "pins are written into bpffs");
    // Bidirectional is rejected by the API server for a container that is not privileged.
    assert_eq!(
        bpffs.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "bpffs propagation"
    );

    let cgroup = flag(c, "--cgroup");
    let (mount, host) = host_mount(ds, cgroup);
    assert_eq!(
        mount.mount_path, cgroup,
        "--cgroup must be the mounted cgroup root itself"
    );
    assert_eq!(
        host.path, "/sys/fs/cgroup",
        "--cgroup must be the host's cgroup v2 root"
    );
    assert_eq!(host.type_.as_deref(), Some("Directory"));
    assert_eq!(
        mount.read_only,
        Some(true),
        "attaching needs only a read-only fd"
    );

    let socket = flag(c, "--admin-socket");
    let (mount, host) = host_mount(ds, socket);
    assert_eq!(
        Path::new(socket).parent(),
        Some(Path::new(&mount.mount_path)),
        "the admin socket's directory is the host mount"
    );
    assert_eq!(
        host.path, "/run/mesh",
        "meshctl on the host finds the socket in /run/mesh"
    );
    assert_eq!(host.type_.as_deref(), Some("DirectoryOrCreate"));
    assert_ne!(mount.read_only, Some(true), "the agent creates the socket");

    let mounted: BTreeSet<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    for v in pod_spec(ds).volumes.iter().flatten() {
        assert!(
            mounted.contains(v.name.as_str()),
            "volume `{}` is never mounted",
            v.name
        );
    }
}

#[test]
fn agent_runs_in_kubernetes_mode_with_the_agreed_command_line() {
    let m = Manifests::load();
    let ds = only(&m.daemon_sets, "DaemonSet");
    let c = agent(ds);
    let args = c.args.as_deref().unwrap_or_default();
    assert_eq!(flags(args), BTreeMap::from(AGENT_ARGS), "the agent's args");
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        node_name,
        Some("spec.nodeName"),
        "NODE_NAME comes from the downward API"
    );
    // The API server is reached directly when the ConfigMap says where (optional keys).
    for (name, key) in [
        ("KUBERNETES_SERVICE_HOST", "k8s-service-host"),
        ("KUBERNETES_SERVICE_PORT", "k8s-service-port"),
    ] {
        let from = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.config_map_key_ref.as_ref())
            .unwrap_or_else(|| panic!("{name} comes from the ConfigMap"));
        assert_eq!(
            (from.key.as_str(), from.optional),
            (key, Some(true)),
            "{name}"
        );
    }
    let image = c.image.as_deref().expect("the agent has an image");
    assert!(
        image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
        "image {image} is not tagged with the workspace version"
    );
}

#[test]
fn probes_and_ports_are_the_ztunnel_ones() {
    let m = Manifests::load();
    let c = agent(only(&m.daemon_sets, "DaemonSet"));
    let ready = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("readinessProbe is an httpGet");
    assert_eq!(
        ready.port,
        IntOrString::Int(READINESS_PORT),
        "readiness port"
    );
    assert_eq!(ready.path.as_deref(), Some("/healthz/ready"));
    let live = c.liveness_probe.as_ref().expect("a livenessProbe");
    let live_port = live
        .tcp_socket
        .as_ref()
        .map(|t| &t.port)
        .or_else(|| live.http_get.as_ref().map(|h| &h.port));
    assert_eq!(
        live_port,
        Some(&IntOrString::Int(READINESS_PORT)),
        "liveness port"
    );
    assert!(
        flag(c, "--readiness-addr").ends_with(&format!(":{READINESS_PORT}")),
        "--readiness-addr and the probe disagree"
    );
    let ports: BTreeSet<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(
        ports,
        BTreeSet::from([15001, 15008, METRICS_PORT, READINESS_PORT, 4244]),
        "container ports"
    );
}

#[test]
fn rolling_update_never_runs_two_agents_on_a_node() {
    let m = Manifests::load();
    let ds = only(&m.daemon_sets, "DaemonSet");
    let spec = ds.spec.as_ref().expect("DaemonSet spec");
    let strategy = spec
        .update_strategy
        .as_ref()
        .expect("an explicit updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert!(
        matches!(&rolling.max_surge, Some(IntOrString::Int(0)))
            || matches!(&rolling.max_surge, Some(IntOrString::String(s)) if s == "0%"),
        "maxSurge must be 0: two agents on one node would both own the pins (got {:?})",
        rolling.max_surge
    );
    assert_eq!(
        rolling.max_unavailable,
        Some(IntOrString::Int(1)),
        "maxUnavailable"
    );
    assert_eq!(spec.min_ready_seconds, Some(5), "minReadySeconds");
    let pod = pod_spec(ds);
    assert_eq!(pod.termination_grace_period_seconds, Some(30));
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the selector's {k} is not on the pod template"
        );
    }
    let everywhere =
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    assert!(
        everywhere,
        "the agent must tolerate every taint (operator: Exists, no key)"
    );
    let resources = agent(ds).resources.as_ref().expect("resources");
    let quantity = |map: &Option<BTreeMap<String, Quantity>>, key: &str| {
        map.as_ref().and_then(|m| m.get(key)).map(|q| q.0.clone())
    };
    assert_eq!(
        quantity(&resources.requests, "cpu").as_deref(),
        Some("100m")
    );
    assert_eq!(
        quantity(&resources.requests, "memory").as_deref(),
        Some("128Mi")
    );
    assert_eq!(
        quantity(&resources.limits, "memory").as_deref(),
        Some("256Mi")
    );
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_uses() {
    let m = Manifests::load();
    let role = only(&m.cluster_roles, "ClusterRole");
    assert!(
        role.aggregation_rule.is_none(),
        "an aggregated role grants what others add"
    );
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.non_resource_urls.is_none(),
            "no non-resource URLs: {rule:?}"
        );
        assert!(
            rule.resource_names.is_none(),
            "unexpected resourceNames: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for part in [group, resource, verb] {
                        assert!(!part.contains('*'), "wildcard in {rule:?}");
                    }
                    granted.insert((group.as_str(), resource.as_str(), verb.as_str()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "pods"),
        ("", "namespaces"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group, resource, verb));
        }
    }
    for verb in ["get", "list", "watch"] {
        expected.insert(("traffic.kernmesh.io", "trafficpolicies", verb));
    }
    for resource in ["authorizationpolicies", "peerauthentications"] {
        for verb in ["get", "list", "watch"] {
            expected.insert(("security.kernmesh.io", resource, verb));
        }
    }
    expected.insert((
        "security.kernmesh.io",
        "authorizationpolicies/status",
        "patch",
    ));
    expected.insert((
        "security.kernmesh.io",
        "peerauthentications/status",
        "patch",
    ));
    // Written by the agent holding the policy-status Lease.
    expected.insert(("traffic.kernmesh.io", "trafficpolicies/status", "patch"));
    // Both groups serve the same Event objects (core/v1 and events.k8s.io/v1).
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            expected.insert((group, "events", verb));
        }
    }
    let extra: Vec<_> = granted.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "ClusterRole (group, resource, verb): granted but unused {extra:?}; needed but missing \
         {missing:?}"
    );
}

#[test]
fn binding_grants_the_role_to_the_agents_service_account() {
    let m = Manifests::load();
    let role = only(&m.cluster_roles, "ClusterRole");
    let binding = only(&m.bindings, "ClusterRoleBinding");
    let sa = only(&m.service_accounts, "ServiceAccount");
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        role.metadata.name.as_ref(),
        "roleRef.name"
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "exactly one subject: {subjects:?}");
    let subject = &subjects[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(
        Some(&subject.name),
        sa.metadata.name.as_ref(),
        "subject name"
    );
    assert_eq!(
        subject.namespace, sa.metadata.namespace,
        "subject namespace"
    );
    let used = pod_spec(only(&m.daemon_sets, "DaemonSet"))
        .service_account_name
        .as_ref();
    assert_eq!(
        used,
        sa.metadata.name.as_ref(),
        "the DaemonSet runs as another ServiceAccount"
    );
}

#[test]
fn the_policy_status_lease_is_the_only_namespaced_grant() {
    let m = Manifests::load();
    let role = only(&m.roles, "Role");
    let binding = only(&m.role_bindings, "RoleBinding");
    let sa = only(&m.service_accounts, "ServiceAccount");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    let names = rule.resource_names.clone().unwrap_or_default();
                    granted.insert((group.clone(), resource.clone(), verb.clone(), names));
                }
            }
        }
    }
    let lease = vec![mesh_agent::policy::status::LEASE_NAME.to_owned()];
    let expected: BTreeSet<_> = [
        ("create", Vec::new()),
        ("get", lease.clone()),
        ("patch", lease.clone()),
    ]
    .into_iter()
    .map(|(verb, names)| {
        (
            "coordination.k8s.io".to_owned(),
            "leases".to_owned(),
            verb.to_owned(),
            names,
        )
    })
    .collect();
    assert_eq!(granted, expected, "Role rules");
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subject = &binding.subjects.as_deref().unwrap_or_default()[0];
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    // The agent learns its namespace and identity from the downward API.
    let c = agent(only(&m.daemon_sets, "DaemonSet"));
    for (var, path) in [
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_NAME", "metadata.name"),
    ] {
        let field = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == var)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .unwrap_or_else(|| panic!("{var} from the downward API"));
        assert_eq!(field.field_path, path, "{var}");
    }
}

#[test]
fn config_map_feeds_the_agent_and_its_static_model_is_valid() {
    let m = Manifests::load();
    let cm = only(&m.config_maps, "ConfigMap");
    let ds = only(&m.daemon_sets, "DaemonSet");
    let data = cm.data.clone().unwrap_or_default();
    let c = agent(ds);
    let rust_log = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "RUST_LOG")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.config_map_key_ref.as_ref())
        .expect("RUST_LOG comes from the ConfigMap");
    assert_eq!(
        Some(&rust_log.name),
        cm.metadata.name.as_ref(),
        "RUST_LOG's ConfigMap"
    );
    assert!(
        data.contains_key(&rust_log.key),
        "the ConfigMap has no key {}",
        rust_log.key
    );

    let (mount, config) = c
        .volume_mounts
        .iter()
        .flatten()
        .find_map(|mnt| {
            volume(ds, &mnt.name)
                .config_map
                .as_ref()
                .filter(|cfg| Some(&cfg.name) == cm.metadata.name.as_ref())
                .map(|cfg| (mnt, cfg))
        })
        .expect("the ConfigMap is mounted");
    assert_eq!(
        Some(&config.name),
        cm.metadata.name.as_ref(),
        "mounted ConfigMap"
    );
    assert_eq!(
        mount.mount_path, "/etc/mesh",
        "--config-file /etc/mesh/mesh.yaml"
    );

    let text = data
        .get("mesh.yaml")
        .expect("the ConfigMap holds an example mesh.yaml");
    let model =
        mesh_agent::discovery::file::parse(Path::new("configmap.yaml#mesh.yaml"), text, None)
            .unwrap_or_else(|e| panic!("the example static model is rejected by the agent: {e}"));
    assert!(
        !model.services.is_empty(),
        "the example static model has no service"
    );
    assert!(
        model.policies.policies.values().all(|p| p.accepted),
        "the example policies are accepted: {:?}",
        model.policies.policies
    );
}

// --- Helm chart -------------------------------------------------------------------------------

fn chart_dir() -> PathBuf {
    deploy_dir().join("helm/mesh")
}

/// `Chart.yaml` (Helm chart API v2); unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(
    dead_code,
    reason = "fields are parsed to validate Chart.yaml, not all are read"
)]
struct Chart {
    api_version: String,
    name: String,
    version: String,
    #[serde(default)]
    app_version: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, rename = "type")]
    type_: Option<String>,
    #[serde(default)]
    kube_version: Option<String>,
    #[serde(default)]
    keywords: Vec<String>,
    #[serde(default)]
    home: Option<String>,
    #[serde(default)]
    sources: Vec<String>,
    #[serde(default)]
    icon: Option<String>,
    #[serde(default)]
    deprecated: Option<bool>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    maintainers: Vec<Value>,
    #[serde(default)]
    dependencies: Vec<Value>,
}

fn values() -> Value {
    let docs = yaml_documents(&chart_dir().join("values.yaml"));
    assert_eq!(docs.len(), 1, "values.yaml is one document");
    docs.into_iter().next().unwrap()
}

fn templates() -> Vec<(String, String)> {
    let paths = files(&chart_dir().join("templates"), &[".yaml", ".tpl"]);
    assert!(!paths.is_empty(), "the chart has no templates");
    paths
        .iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                read(p),
            )
        })
        .collect()
}

/// The actions (`{{ … }}`) of a template, trim markers and comments removed.
fn actions(name: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .unwrap_or_else(|| panic!("{name}: `{{{{` without `}}}}`"));
        let action = after[..end]
            .trim_start_matches('-')
            .trim_end_matches('-')
            .trim();
        if !action.starts_with("/*") {
            out.push(action.to_owned());
        }
        rest = &after[end + 2..];
    }
    assert!(!rest.contains("}}"), "{name}: `}}}}` without `{{{{`");
    out
}

/// `.Values.a.b` paths used in `text`.
fn values_paths(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices(".Values.") {
        let path: String = text[i + ".Values.".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
            .collect();
        let path = path.trim_end_matches('.');
        if !path.is_empty() {
            out.insert(path.to_owned());
        }
    }
    out
}

#[test]
fn helm_chart_metadata_parses() {
    let path = chart_dir().join("Chart.yaml");
    let chart: Chart = serde_saphyr::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not a valid Chart.yaml: {e}", path.display()));
    assert_eq!(chart.api_version, "v2", "Chart.yaml apiVersion");
    assert_eq!(chart.name, "mesh");
    let semver = chart.version.split('.').count() == 3
        && chart
            .version
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    assert!(
        semver,
        "chart version {} is not MAJOR.MINOR.PATCH",
        chart.version
    );
    assert_eq!(
        chart.app_version.as_deref(),
        Some(env!("CARGO_PKG_VERSION")),
        "appVersion must be the workspace version (the default image tag)"
    );
}

#[test]
fn helm_templates_use_only_values_that_exist() {
    let values = values();
    let mut missing = Vec::new();
    for (name, text) in templates() {
        for path in values_paths(&text) {
            if !path_exists(&values, &path) {
                missing.push(format!("{name}: .Values.{path}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "values used but not in values.yaml:\n  {}",
        missing.join("\n  ")
    );
}

/// Whether every key of `path` exists (a key may hold null or an empty value).
fn path_exists(values: &Value, path: &str) -> bool {
    let mut node = values;
    for key in path.split('.') {
        match node.get(key) {
            Some(next) => node = next,
            None => return false,
        }
    }
    true
}

#[test]
fn helm_template_actions_balance_and_includes_are_defined() {
    let templates = templates();
    let mut defined = BTreeSet::new();
    let mut included = BTreeSet::new();
    for (name, text) in &templates {
        let mut depth = 0_i32;
        for action in actions(name, text) {
            let word = action.split_whitespace().next().unwrap_or_default();
            match word {
                "if" | "with" | "range" | "define" | "block" => depth += 1,
                "end" => depth -= 1,
                _ => {}
            }
            assert!(
                depth >= 0,
                "{name}: `{{{{ end }}}}` without an opening action"
            );
            let quoted = action.split('"').nth(1).map(str::to_owned);
            if word == "define" {
                defined.insert(quoted.expect("define names a template"));
            } else if let Some(i) = action
                .find("include \"")
                .or_else(|| action.find("template \""))
            {
                included.insert(action[i..].split('"').nth(1).unwrap().to_owned());
            }
        }
        assert_eq!(depth, 0, "{name}: {depth} unclosed if/with/range/define");
    }
    let undefined: Vec<_> = included.difference(&defined).collect();
    assert!(
        undefined.is_empty(),
        "templates included but never defined: {undefined:?}"
    );
}

#[test]
fn helm_defaults_match_the_plain_manifests() {
    let m = Manifests::load();
    let ds = only(&m.daemon_sets, "DaemonSet");
    let c = agent(ds);
    let pod = pod_spec(ds);
    let values = values();
    assert_eq!(values["resources"], json(&c.resources), "values.resources");
    assert_eq!(
        values["nodeSelector"],
        json(&pod.node_selector),
        "values.nodeSelector"
    );
    assert_eq!(
        values["tolerations"],
        json(&pod.tolerations),
        "values.tolerations"
    );
    assert_eq!(
        values["priorityClassName"].as_str(),
        pod.priority_class_name.as_deref(),
        "values.priorityClassName"
    );
    let cm = only(&m.config_maps, "ConfigMap");
    let level = cm
        .data
        .as_ref()
        .and_then(|d| d.get("log-level"))
        .map(String::as_str);
    assert_eq!(values["logLevel"].as_str(), level, "values.logLevel");
    let image = c.image.as_deref().unwrap_or_default();
    let repository = image.rsplit_once(':').map_or(image, |(repo, _)| repo);
    assert_eq!(
        values["image"]["repository"].as_str(),
        Some(repository),
        "values.image.repository"
    );

    // The fixed parts of the pod are text in the template: every capability and argument of the
    // plain manifest must appear as a list item, and no other capability may.
    let template = read(&chart_dir().join("templates/daemonset.yaml"));
    let items: BTreeSet<&str> = template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    for arg in c.args.iter().flatten() {
        assert!(
            items.contains(arg.as_str()),
            "templates/daemonset.yaml lacks argument {arg}"
        );
    }
    let added = list_after(&template, "add:");
    assert_eq!(
        added,
        BTreeSet::from(CAPABILITIES),
        "templates/daemonset.yaml capabilities.add"
    );
    for needle in [
        "maxSurge: 0",
        "mountPropagation: HostToContainer",
        "type: RuntimeDefault",
    ] {
        assert!(
            template.contains(needle),
            "templates/daemonset.yaml lacks `{needle}`"
        );
    }
}

/// The items of the block sequence right after the first line that ends with `key`.
fn list_after<'a>(text: &'a str, key: &str) -> BTreeSet<&'a str> {
    text.lines()
        .skip_while(|l| !l.trim_end().ends_with(key))
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- "))
        .collect()
}

/// A typed field as JSON (`null` when absent), to compare with values.yaml.
fn json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("API objects serialize")
}

// --- uninstall (cleanup DaemonSet and Helm pre-delete hook) -----------------------------------

/// `deploy/kubernetes/cleanup/cleanup-daemonset.yaml`, typed. It lives in a subdirectory so
/// that `kubectl apply -f deploy/kubernetes/` (and [`Manifests::load`]) never picks it up.
fn cleanup_daemon_set() -> DaemonSet {
    let path = deploy_dir().join("kubernetes/cleanup/cleanup-daemonset.yaml");
    let docs = yaml_documents(&path);
    assert_eq!(docs.len(), 1, "{} is one DaemonSet", path.display());
    typed("cleanup/cleanup-daemonset.yaml", &docs[0])
}

/// The host path behind the mount holding `path` in container `c` of `ds`.
fn container_host_path<'a>(ds: &'a DaemonSet, c: &'a Container, path: &str) -> &'a str {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(path).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("cleanup: nothing mounted at or above {path}"));
    assert_ne!(
        mount.mount_path, "/",
        "cleanup: {path} must come from a host mount"
    );
    &volume(ds, &mount.name)
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("cleanup: {path} is not from a hostPath volume"))
        .path
}

#[test]
fn cleanup_daemonset_cleans_exactly_what_the_agent_pins() {
    let m = Manifests::load();
    let agent_ds = only(&m.daemon_sets, "DaemonSet");
    let a = agent(agent_ds);
    let ds = cleanup_daemon_set();
    assert_eq!(
        ds.metadata.namespace, agent_ds.metadata.namespace,
        "same namespace as the agent"
    );
    let pod = pod_spec(&ds);
    let init = only(
        pod.init_containers.as_deref().unwrap_or_default(),
        "cleanup init container",
    );
    let args = init.args.as_deref().unwrap_or_default();
    assert_eq!(
        args.first().map(String::as_str),
        Some("cleanup"),
        "the init container runs `mesh-agent cleanup`"
    );
    assert_eq!(init.command, a.command, "the agent's binary");
    assert_eq!(init.image, a.image, "the agent's image");
    let f = flags(&args[1..]);
    for name in ["--pin-dir", "--cgroup", "--admin-socket"] {
        assert_eq!(
            f.get(name).copied().flatten(),
            Some(flag(a, name)),
            "cleanup {name} must be the agent's"
        );
        // The same host objects: the cleanup sees the agent's pins, cgroup and socket.
        let value = flag(a, name);
        assert_eq!(
            container_host_path(&ds, init, value),
            host_mount(agent_ds, value).1.path,
            "host path behind {name}"
        );
    }
    let pins = init
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mounted");
    assert_ne!(pins.read_only, Some(true), "unpinning writes to bpffs");
    let sc = init.security_context.as_ref().expect("securityContext");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert!(
        added.is_subset(&BTreeSet::from(CAPABILITIES)),
        "no capability the agent does not have: {added:?}"
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_ne!(sc.privileged, Some(true));
    // Every node the agent runs on, and its pods are not the agent's (deleting one DaemonSet
    // never touches the other's pods).
    assert_eq!(pod.tolerations, pod_spec(agent_ds).tolerations);
    let labels = |d: &DaemonSet| d.spec.as_ref().map(|s| s.selector.match_labels.clone());
    assert_ne!(labels(&ds), labels(agent_ds), "distinct selectors");
    let done = only(&pod.containers, "container");
    assert!(
        done.image.as_deref().is_some_and(|i| i.contains("pause")),
        "the main container only holds the pod ready"
    );
}

#[test]
fn helm_uninstall_runs_the_cleanup_in_a_pre_delete_hook() {
    let hook = read(&chart_dir().join("templates/cleanup-hook.yaml"));
    let docs = hook.split("\n---\n").count();
    assert_eq!(
        hook.matches("helm.sh/hook: pre-delete").count(),
        docs,
        "every object of the hook is a pre-delete hook"
    );
    assert_eq!(
        hook.matches("helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded")
            .count(),
        docs
    );
    // The steps, in order: stop the agents (waiting for their pods), clean, wait, remove.
    let steps: Vec<usize> = [
        "daemonset/{{ include \"mesh.fullname\" . }}",
        "--cascade=foreground",
        "--filename=/manifests/cleanup-daemonset.yaml",
        "- rollout",
        "- status",
        "name: remove-cleanup",
    ]
    .iter()
    .map(|s| {
        hook.find(s)
            .unwrap_or_else(|| panic!("cleanup-hook.yaml lacks `{s}`"))
    })
    .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "step order {steps:?}"
    );
    // The DaemonSet the hook applies has the plain manifest's init container, item for item.
    let plain = cleanup_daemon_set();
    let init = &pod_spec(&plain).init_containers.as_ref().unwrap()[0];
    let tpl = read(&chart_dir().join("templates/_cleanup.tpl"));
    let items: BTreeSet<&str> = tpl
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    for arg in init.args.iter().flatten() {
        assert!(
            items.contains(arg.as_str()),
            "_cleanup.tpl lacks argument {arg}"
        );
    }
    let caps: BTreeSet<&str> = init
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(list_after(&tpl, "add:"), caps, "_cleanup.tpl capabilities");
    assert_eq!(values()["cleanup"]["enabled"], Value::Bool(true));
}

// --- the kind workflow (cannot run here: no Docker engine, no internet) ------------------------

fn kind_workflow() -> (String, Value) {
    let path = deploy_dir().join("../.github/workflows/kind.yml");
    let text = read(&path);
    let docs = yaml_documents(&path);
    assert_eq!(docs.len(), 1, "kind.yml is one document");
    (text, docs.into_iter().next().unwrap())
}

#[test]
fn kind_workflow_builds_installs_rolls_and_uninstalls_in_order() {
    let (text, wf) = kind_workflow();
    assert!(
        text.contains("NOT RUN ON THE DEVELOPMENT MACHINE"),
        "the header says why it cannot run here"
    );
    let steps = wf["jobs"]["kind"]["steps"]
        .as_array()
        .expect("jobs.kind.steps");
    let step_text: Vec<String> = steps.iter().map(Value::to_string).collect();
    // Each milestone, in order: build the image, start kind with kube-proxy, install the chart,
    // traffic through the rollouts, uninstall, check the kernel.
    let milestones = [
        "deploy/Dockerfile",
        "kubeProxyMode: iptables",
        "helm/kind-action",
        "kind load docker-image",
        "helm install mesh deploy/helm/mesh",
        "startswith(\\\"mesh_\\\")",
        "rollout restart deployment/web",
        "rollout restart daemonset/mesh-agent",
        "test \\\"$failed\\\" -le \\\"$MAX_FAILED\\\"",
        "helm uninstall mesh",
        "test \\\"$left\\\" -eq 0",
    ];
    let mut last = 0;
    for m in milestones {
        let at = step_text
            .iter()
            .position(|s| s.contains(m))
            .unwrap_or_else(|| panic!("kind.yml has no step with `{m}`"));
        assert!(at >= last, "`{m}` (step {at}) comes before step {last}");
        last = at;
    }
    let bound = wf["env"]["MAX_FAILED"].as_str().expect("env.MAX_FAILED");
    assert!(
        bound.parse::<u32>().is_ok_and(|b| b <= 10),
        "a stated, small bound: {bound}"
    );
    // The DaemonSet the workflow restarts is the chart's for release `mesh`.
    let helpers = read(&chart_dir().join("templates/_helpers.tpl"));
    assert!(helpers.contains("printf \"%s-agent\" .Release.Name"));
}

#[test]
fn kind_workflow_workloads_are_valid_kubernetes_objects() {
    use k8s_openapi::api::{
        apps::v1::Deployment,
        core::v1::{Pod, Service},
    };
    let (_, wf) = kind_workflow();
    let steps = wf["jobs"]["kind"]["steps"].as_array().unwrap();
    let run = steps
        .iter()
        .filter_map(|s| s["run"].as_str())
        .find(|r| r.contains("kind: Deployment"))
        .expect("a step applies the workload");
    let manifest = run
        .split_once("<<'EOF'\n")
        .and_then(|(_, rest)| rest.split_once("\nEOF"))
        .map(|(m, _)| m)
        .expect("the workload is a heredoc");
    let docs: Vec<Value> = serde_saphyr::from_multiple(manifest).expect("workload YAML parses");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["Deployment", "Service", "Pod"]);
    let deployment: Deployment = typed("kind.yml Deployment", &docs[0]);
    let _: Service = typed("kind.yml Service", &docs[1]);
    let _: Pod = typed("kind.yml Pod", &docs[2]);
    assert_eq!(
        deployment.spec.as_ref().and_then(|s| s.replicas),
        Some(2),
        "two replicas"
    );
}

#[test]
fn coexistence_is_off_by_default_and_a_value_adds_only_the_flag() {
    assert_eq!(values()["coexist"], Value::Bool(false), "values.coexist");
    let template = read(&chart_dir().join("templates/daemonset.yaml"));
    assert!(
        template
            .contains("{{- if .Values.coexist }}\n            - --coexist\n            {{- end }}"),
        "templates/daemonset.yaml adds --coexist under values.coexist"
    );
    let m = Manifests::load();
    let args = agent(only(&m.daemon_sets, "DaemonSet"))
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        !args.iter().any(|a| a == "--coexist"),
        "the plain manifest refuses to share the socket hooks"
    );
}

#[test]
fn bypass_is_off_by_default_and_a_value_switches_it_through_the_config_map() {
    // Chart: values.bypass → ConfigMap key `bypass` → env MESH_BYPASS (`datapath.bypass`).
    assert_eq!(values()["bypass"], Value::Bool(false), "values.bypass");
    let cm_template = read(&chart_dir().join("templates/configmap.yaml"));
    assert!(
        cm_template.contains("  bypass: {{ .Values.bypass | quote }}\n"),
        "templates/configmap.yaml writes values.bypass as the string the agent parses"
    );
    let ds_template = read(&chart_dir().join("templates/daemonset.yaml"));
    assert!(
        ds_template.contains(
            "- name: MESH_BYPASS\n              valueFrom:\n                configMapKeyRef:\n                  \
             name: {{ include \"mesh.fullname\" . }}\n                  key: bypass\n"
        ),
        "templates/daemonset.yaml feeds MESH_BYPASS from the ConfigMap's `bypass`"
    );
    // Plain manifests: the same key and env, and the agent accepts the value they carry.
    let m = Manifests::load();
    let cm = only(&m.config_maps, "ConfigMap");
    let c = agent(only(&m.daemon_sets, "DaemonSet"));
    let from = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "MESH_BYPASS")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.config_map_key_ref.as_ref())
        .expect("MESH_BYPASS comes from the ConfigMap");
    assert_eq!(
        (Some(&from.name), from.key.as_str(), from.optional),
        (cm.metadata.name.as_ref(), "bypass", None),
        "MESH_BYPASS: a required key of the agent's ConfigMap"
    );
    let value = cm
        .data
        .as_ref()
        .and_then(|d| d.get("bypass"))
        .cloned()
        .expect("the ConfigMap has a `bypass` key");
    assert_eq!(value, "false", "bypass off by default, as values.bypass");
    for (given, on) in [(value.as_str(), false), ("true", true)] {
        let config = mesh_agent::config::AgentConfig::from_raw(mesh_agent::config::RawConfig {
            node: Some("node-a".into()),
            kubernetes: true,
            cgroup: Some("/sys/fs/cgroup".into()),
            bypass: Some(given.to_owned()),
            ..mesh_agent::config::RawConfig::default()
        })
        .unwrap_or_else(|e| panic!("the agent rejects bypass {given:?}: {e}"));
        assert_eq!(config.datapath.bypass, on, "bypass {given:?}");
    }
}

// --- the CA (issue 9) -------------------------------------------------------------------------

/// `mesh-agent ca …` as the agent binary parses it.
#[derive(clap::Parser)]
struct AgentCli {
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(clap::Subcommand)]
enum AgentCommand {
    Ca(mesh_agent::identity::cli::CaArgs),
}

#[test]
fn ca_objects_are_typed_and_live_in_the_mesh_namespace() {
    let m = Manifests::load_ca();
    let sa = only(&m.service_accounts, "ServiceAccount");
    assert_eq!(sa.metadata.name.as_deref(), Some("mesh-ca"));
    only(&m.cluster_roles, "ClusterRole");
    only(&m.bindings, "ClusterRoleBinding");
    only(&m.roles, "Role");
    only(&m.role_bindings, "RoleBinding");
    only(&m.deployments, "Deployment");
    only(&m.services, "Service");
    let namespaced = m
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(m.roles.iter().map(|o| &o.metadata))
        .chain(m.role_bindings.iter().map(|o| &o.metadata))
        .chain(m.deployments.iter().map(|o| &o.metadata))
        .chain(m.services.iter().map(|o| &o.metadata));
    for meta in namespaced {
        assert_eq!(
            meta.namespace.as_deref(),
            Some("mesh-system"),
            "{:?}",
            meta.name
        );
    }
}

#[test]
fn ca_may_review_tokens_and_get_pods_and_keep_only_its_own_secret() {
    let m = Manifests::load_ca();
    let rules = |rules: &[k8s_openapi::api::rbac::v1::PolicyRule]| -> BTreeSet<(String, String, String, Vec<String>)> {
        let mut out = BTreeSet::new();
        for rule in rules {
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        out.insert((
                            group.clone(),
                            resource.clone(),
                            verb.clone(),
                            rule.resource_names.clone().unwrap_or_default(),
                        ));
                    }
                }
            }
        }
        out
    };
    let t = |g: &str, r: &str, v: &str, n: &[&str]| {
        (
            g.to_owned(),
            r.to_owned(),
            v.to_owned(),
            n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        )
    };
    let cluster = only(&m.cluster_roles, "ClusterRole");
    assert_eq!(
        rules(cluster.rules.as_deref().unwrap_or_default()),
        BTreeSet::from([
            t("authentication.k8s.io", "tokenreviews", "create", &[]),
            t("", "pods", "get", &[]),
        ])
    );
    let role = only(&m.roles, "Role");
    assert_eq!(
        rules(role.rules.as_deref().unwrap_or_default()),
        BTreeSet::from([
            t("", "secrets", "create", &[]),
            t("", "secrets", "get", &["mesh-ca"]),
            t("", "configmaps", "create", &[]),
            t("", "configmaps", "patch", &["mesh-ca-root"]),
        ])
    );
    for (kind, role_ref, subjects) in [
        (
            "ClusterRoleBinding",
            &only(&m.bindings, "ClusterRoleBinding").role_ref,
            &only(&m.bindings, "ClusterRoleBinding").subjects,
        ),
        (
            "RoleBinding",
            &only(&m.role_bindings, "RoleBinding").role_ref,
            &only(&m.role_bindings, "RoleBinding").subjects,
        ),
    ] {
        assert_eq!(role_ref.name, "mesh-ca", "{kind}");
        let s = subjects.as_deref().unwrap_or_default();
        assert_eq!(s.len(), 1, "{kind}");
        assert_eq!(
            (s[0].kind.as_str(), s[0].name.as_str()),
            ("ServiceAccount", "mesh-ca"),
            "{kind}"
        );
    }
}

#[test]
fn ca_deployment_serves_15012_with_a_command_line_the_binary_accepts() {
    use clap::Parser as _;
    let m = Manifests::load_ca();
    let dep = only(&m.deployments, "Deployment");
    let spec = dep.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("mesh-ca"));
    let c = only(&pod.containers, "container");
    let args = c.args.clone().unwrap_or_default();
    let cli =
        AgentCli::try_parse_from(std::iter::once("mesh-agent".to_owned()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("mesh-agent {args:?}: {e}"));
    let AgentCommand::Ca(ca) = cli.command;
    assert!(ca.command.is_none(), "the Deployment serves");
    assert!(ca.serve.kubernetes, "Kubernetes mode (TokenReview)");
    assert_eq!(ca.serve.listen.port(), 15012);
    assert_eq!(ca.serve.ca_secret.as_deref(), Some("mesh-system/mesh-ca"));
    // Only the agents' own service account may ask.
    let agents = Manifests::load();
    let agent_sa = only(&agents.service_accounts, "ServiceAccount");
    assert_eq!(
        ca.serve.agent_service_account,
        format!(
            "{}/{}",
            agent_sa.metadata.namespace.as_deref().unwrap(),
            agent_sa.metadata.name.as_deref().unwrap()
        )
    );
    assert!(
        ca.serve
            .server_names
            .iter()
            .any(|n| n == "mesh-ca.mesh-system.svc")
    );
    // Not privileged: no capabilities, non-root.
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    // The Service reaches the container's 15012 and selects the Deployment's pods.
    let svc = only(&m.services, "Service");
    let service_spec = svc.spec.as_ref().unwrap();
    let grpc = service_spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == 15012)
        .expect("port 15012");
    assert_eq!(grpc.target_port, Some(IntOrString::Int(15012)));
    assert!(c.ports.iter().flatten().any(|p| p.container_port == 15012));
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap_or_default();
    for (k, v) in service_spec.selector.clone().unwrap_or_default() {
        assert_eq!(labels.get(&k), Some(&v), "selector {k}={v}");
    }
}

#[test]
fn helm_ca_template_matches_the_plain_manifest() {
    let text = read(&chart_dir().join("templates/ca.yaml"));
    let m = Manifests::load_ca();
    let dep = only(&m.deployments, "Deployment");
    let c = only(
        &dep.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers,
        "container",
    );
    for arg in c.args.iter().flatten().filter(|a| a.starts_with("--")) {
        assert!(text.contains(arg.as_str()), "templates/ca.yaml lacks {arg}");
    }
    for needle in [
        "tokenreviews",
        "kind: Deployment",
        "kind: Service",
        "15012",
        ".Values.ca.enabled",
    ] {
        assert!(text.contains(needle), "templates/ca.yaml lacks {needle}");
    }
}

/// The agent reaches the CA as the CA expects: a projected token for the CA's audience, the
/// published bundle, and the node address pods reach the outbound listener at.
#[test]
fn the_agent_gets_what_mtls_needs() {
    let m = Manifests::load();
    let ds = only(&m.daemon_sets, "DaemonSet");
    let c = agent(ds);
    let env = |name: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("env {name}"))
    };
    let host_ip = env("MESH_CAPTURE_ADDRESS")
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(host_ip.as_deref(), Some("status.hostIP"));
    let token_file = env("MESH_CA_TOKEN_FILE").value.clone().unwrap();
    let root_file = env("MESH_CA_ROOT_FILE").value.clone().unwrap();
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let mounted = |file: &str| {
        let mnt = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|v| file.starts_with(&format!("{}/", v.mount_path)))
            .unwrap_or_else(|| panic!("{file} is not under a mount"));
        let vol = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mnt.name)
            .unwrap();
        (file[mnt.mount_path.len() + 1..].to_owned(), vol.clone())
    };
    let (path, vol) = mounted(&token_file);
    let token = vol
        .projected
        .and_then(|p| p.sources)
        .into_iter()
        .flatten()
        .find_map(|s| s.service_account_token)
        .expect("a projected service-account token");
    assert_eq!(token.path, path);
    assert_eq!(
        token.audience.as_deref(),
        Some(mesh_agent::identity::auth::CA_AUDIENCE)
    );
    let (key, vol) = mounted(&root_file);
    assert_eq!(key, mesh_agent::identity::cli::ROOT_CERT_KEY);
    let cm = vol.config_map.expect("the bundle comes from a ConfigMap");
    assert_eq!(cm.name, "mesh-ca-root");
    assert_eq!(cm.optional, Some(true), "the agent starts before the CA");
}

#[derive(clap::Parser)]
struct RelayCli {
    #[command(subcommand)]
    command: RelayCommand,
}

#[derive(clap::Subcommand)]
enum RelayCommand {
    Relay(mesh_agent::relay::RelayArgs),
}

/// The relay's objects are typed, its arguments are ones `mesh-agent relay` accepts, it may only
/// read pods, and the Helm template carries the same arguments.
#[test]
fn relay_manifest_is_typed_its_args_parse_and_helm_matches() {
    use clap::Parser as _;
    let m = Manifests::load_where(is_relay_manifest);
    only(&m.service_accounts, "ServiceAccount");
    only(&m.role_bindings, "RoleBinding");
    only(&m.services, "Service");
    let role = only(&m.roles, "Role");
    let rules = role.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["pods".to_owned()][..])
    );
    assert_eq!(
        rules[0].verbs,
        ["get", "list", "watch"].map(str::to_owned).to_vec()
    );
    let dep = only(&m.deployments, "Deployment");
    let c = only(
        &dep.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers,
        "container",
    );
    let args = c.args.clone().unwrap();
    let RelayCommand::Relay(parsed) =
        RelayCli::try_parse_from(std::iter::once("mesh-agent".to_owned()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("relay.yaml args: {e}"))
            .command;
    assert_eq!(
        parsed.agent_pods.as_deref(),
        Some("mesh-system/app.kubernetes.io/name=mesh-agent")
    );
    assert_eq!(parsed.listen.port(), 4245);
    let text = read(&chart_dir().join("templates/relay.yaml"));
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            text.contains(arg.as_str()),
            "templates/relay.yaml lacks {arg}"
        );
    }
    assert!(text.contains(".Values.relay.enabled"));
}

/// The relay's and the agents' flow-API certificates come from the mesh CA, and the three
/// manifests agree on who is who: the relay asks for its own account's id, which is exactly
/// what the CA's `--relay-service-account` allows and what the agents accept by default; the
/// relay accepts the `DaemonSet` account's id, which the agents ask for (their own pod's, named
/// by `POD_NAME`); the relay mounts the CA's bundle and a token for the CA's audience.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one cross-check of three manifests and the chart"
)]
fn relay_and_flow_api_certificates_come_from_the_mesh_ca_and_name_each_other() {
    use clap::Parser as _;
    use mesh_agent::relay::tls::{DEFAULT_AGENT_ACCOUNT, DEFAULT_RELAY_ACCOUNT};
    let relay = Manifests::load_where(is_relay_manifest);
    let dep = only(&relay.deployments, "Deployment");
    let ns = dep.metadata.namespace.as_deref().unwrap();
    let pod = dep.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let relay_sa = pod.service_account_name.as_deref().unwrap();
    let c = only(&pod.containers, "container");
    let RelayCommand::Relay(parsed) = RelayCli::try_parse_from(
        std::iter::once("mesh-agent".to_owned()).chain(c.args.clone().unwrap()),
    )
    .unwrap()
    .command;
    assert!(
        parsed.tls.cert.is_none(),
        "the relay uses the mesh CA, not files"
    );
    assert_eq!(
        parsed.ca.ca_address.as_deref(),
        Some("mesh-ca.mesh-system.svc:15012")
    );
    let agents = Manifests::load();
    let ds = only(&agents.daemon_sets, "DaemonSet");
    let agent_sa = pod_spec(ds).service_account_name.as_deref().unwrap();
    let id = |sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    assert_eq!(parsed.relay_id.as_deref(), Some(id(relay_sa).as_str()));
    assert_eq!(parsed.agent_id.as_deref(), Some(id(agent_sa).as_str()));
    // The agents set neither MESH_FLOW_API_ID nor MESH_FLOW_API_CLIENT_ID: their defaults hold.
    assert_eq!(DEFAULT_AGENT_ACCOUNT, (ns, agent_sa));
    assert_eq!(DEFAULT_RELAY_ACCOUNT, (ns, relay_sa));
    let env = |c: &Container, name: &str| {
        c.env.iter().flatten().find(|e| e.name == name).map(|e| {
            e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.clone())
                .or_else(|| e.value.clone())
        })
    };
    let agent_c = agent(ds);
    assert_eq!(env(agent_c, "MESH_FLOW_API_ID"), None);
    assert_eq!(env(agent_c, "MESH_FLOW_API_CLIENT_ID"), None);
    assert_eq!(
        env(agent_c, "POD_NAME"),
        Some(Some("metadata.name".to_owned())),
        "the agent's own pod, which the CA checks"
    );
    assert!(flag(agent_c, "--flow-api-listen").ends_with(":4244"));
    // The CA allows that account exactly.
    let ca = Manifests::load_ca();
    let ca_dep = ca
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("mesh-ca"))
        .expect("the CA Deployment");
    let ca_c = only(
        &ca_dep
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers,
        "container",
    );
    // `ca` is a subcommand, not a flag: the value after each flag.
    let ca_args = ca_c.args.clone().unwrap();
    let ca_flag = |name: &str| {
        ca_args
            .iter()
            .position(|a| a == name)
            .and_then(|i| ca_args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| panic!("the CA's {name}"))
    };
    assert_eq!(
        ca_flag("--relay-service-account"),
        format!("{ns}/{relay_sa}")
    );
    // The relay's bundle is the CA's published ConfigMap, its token is for the CA's audience,
    // and both are mounted where its flags say.
    let volume = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("relay volume {name}"))
    };
    let mount = |name: &str| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == name)
            .map_or_else(
                || panic!("relay mount {name}"),
                |m| PathBuf::from(&m.mount_path),
            )
    };
    let root_cm = volume("ca-root").config_map.as_ref().unwrap();
    assert_eq!(
        format!("{ns}/{}", root_cm.name),
        ca_flag("--root-configmap")
    );
    assert_ne!(
        root_cm.optional,
        Some(true),
        "the relay waits for the bundle"
    );
    assert_eq!(
        parsed.ca.ca_root_file.as_deref().and_then(Path::parent),
        Some(mount("ca-root").as_path())
    );
    let token = volume("ca-token")
        .projected
        .as_ref()
        .unwrap()
        .sources
        .as_ref()
        .unwrap()[0]
        .service_account_token
        .as_ref()
        .unwrap();
    assert_eq!(
        token.audience.as_deref(),
        Some(mesh_agent::identity::auth::CA_AUDIENCE)
    );
    assert_eq!(
        parsed.ca.ca_token_file,
        Some(mount("ca-token").join(&token.path))
    );
    // Helm: the same choice behind relay.certificates, and the flow API turned on with the relay.
    let chart = |f: &str| read(&chart_dir().join(f));
    let helm_relay = chart("templates/relay.yaml");
    assert!(helm_relay.contains(".Values.relay.certificates"));
    let helm_ds = chart("templates/daemonset.yaml");
    for needle in [
        "{{- if .Values.relay.enabled }}",
        "- --flow-api-listen",
        "- 0.0.0.0:4244",
        "MESH_FLOW_API_CLIENT_ID",
    ] {
        assert!(
            helm_ds.contains(needle),
            "templates/daemonset.yaml lacks {needle}"
        );
    }
    assert!(chart("templates/ca.yaml").contains("- --relay-service-account"));
    assert_eq!(values()["relay"]["certificates"], "mesh-ca");
}

#[derive(clap::Parser)]
struct GatewayCli {
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: GatewayCommand,
}

#[derive(clap::Subcommand)]
enum GatewayCommand {
    Gateway(mesh_agent::gateway::GatewayArgs),
}

/// The gateway's objects (`deploy/gateway.yaml`) are typed; its arguments are ones `mesh-agent
/// gateway` accepts (Gateway API objects from Kubernetes, our controller name and Lease); RBAC
/// grants every kind the Kubernetes source watches, the status subresources it writes and the
/// Lease; its `GatewayClass` and Gateway compile with the gateway's own compiler; the Helm
/// template renders the same objects behind `gateway.enabled` with the same defaults.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one manifest checked object by object, then its Helm twin"
)]
fn gateway_manifest_is_typed_its_args_parse_rbac_covers_the_watches_and_helm_matches() {
    use clap::Parser as _;
    use mesh_agent::gateway::{kube_source::Kind, status, status_writer};
    let path = deploy_dir().join("gateway.yaml");
    let mut m = Manifests::default();
    let mut gateway_api = Vec::new();
    for (i, doc) in yaml_documents(&path).into_iter().enumerate() {
        let at = format!("gateway.yaml (document {})", i + 1);
        if doc["apiVersion"]
            .as_str()
            .is_some_and(|a| a.starts_with("gateway.networking.k8s.io/"))
        {
            gateway_api.push(doc);
        } else {
            m.add(&at, &doc);
        }
    }
    only(&m.service_accounts, "ServiceAccount");
    only(&m.bindings, "ClusterRoleBinding");
    only(&m.role_bindings, "RoleBinding");
    let svc = only(&m.services, "Service");
    let dep = only(&m.deployments, "Deployment");
    let template = &dep.spec.as_ref().unwrap().template;
    // Enrolled, so its connects to enrolled backends ride HBONE with its own identity.
    assert_eq!(
        template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .and_then(|l| l.get(mesh_agent::authz::mesh::DATAPLANE_MODE_LABEL))
            .map(String::as_str),
        Some("mesh"),
        "gateway pods carry the enrollment label"
    );
    let pod = template.spec.as_ref().unwrap();
    let c = only(&pod.containers, "container");
    let args = c.args.clone().unwrap();
    let GatewayCommand::Gateway(parsed) =
        GatewayCli::try_parse_from(std::iter::once("mesh-agent".to_owned()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("gateway.yaml args: {e}"))
            .command;
    assert!(parsed.kubernetes, "Services from Kubernetes");
    assert!(
        parsed.routes.is_none(),
        "Gateway API objects from Kubernetes, not a file"
    );
    assert_eq!(parsed.controller_name, status::DEFAULT_CONTROLLER_NAME);
    assert_eq!(parsed.status_lease, status_writer::DEFAULT_LEASE);
    let env: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    for want in ["POD_NAME", "POD_NAMESPACE", "NODE_NAME"] {
        assert!(
            env.contains(want),
            "env {want} (the Lease identity and namespace)"
        );
    }

    // RBAC: every watched kind, the status it writes, the Lease.
    let role = only(&m.cluster_roles, "ClusterRole");
    let grants = |group: &str, resource: &str, verb: &str| {
        role.rules.iter().flatten().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for kind in Kind::ALL {
        let (group, _, _, plural) = kind.gvk();
        for verb in ["get", "list", "watch"] {
            assert!(
                grants(group, plural, verb),
                "ClusterRole lacks {verb} {group}/{plural}"
            );
        }
        if !matches!(
            kind,
            Kind::ReferenceGrant | Kind::Secret | Kind::Namespace | Kind::RoutePolicy
        ) {
            assert!(
                grants(group, &format!("{plural}/status"), "patch"),
                "ClusterRole lacks patch {plural}/status"
            );
        }
    }
    let lease_role = only(&m.roles, "Role");
    let lease_rules = lease_role.rules.as_ref().unwrap();
    assert!(
        lease_rules
            .iter()
            .all(|r| r.resources.as_deref() == Some(&["leases".to_owned()][..]))
    );
    assert!(
        lease_rules
            .iter()
            .any(|r| r.verbs.contains(&"create".to_owned()))
    );
    assert!(lease_rules.iter().any(|r| {
        r.verbs.contains(&"patch".to_owned())
            && r.resource_names.as_deref() == Some(&[status_writer::DEFAULT_LEASE.to_owned()][..])
    }));

    // The GatewayClass names our controller; the Gateway is of that class and compiles.
    let class = gateway_api
        .iter()
        .find(|d| d["kind"] == "GatewayClass")
        .expect("GatewayClass");
    assert_eq!(
        class["spec"]["controllerName"],
        status::DEFAULT_CONTROLLER_NAME
    );
    let gw = gateway_api
        .iter()
        .find(|d| d["kind"] == "Gateway")
        .expect("Gateway");
    assert_eq!(gw["spec"]["gatewayClassName"], class["metadata"]["name"]);
    let cfg = mesh_agent::gateway::config::parse(
        Path::new("gateway.yaml"),
        &serde_json::to_string(gw).unwrap(),
    )
    .unwrap_or_else(|e| panic!("the Gateway does not compile: {e}"));
    let listen = i32::from(cfg.listeners[0].port);
    let http = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("http"))
        .expect("container port http");
    assert_eq!(
        http.container_port, listen,
        "container port = the Gateway's listener"
    );
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        spec.ports.as_ref().unwrap()[0].target_port,
        Some(IntOrString::String("http".into()))
    );

    // Helm: the same objects and arguments, off by default, the same defaults.
    let text = read(&chart_dir().join("templates/gateway.yaml"));
    for needle in [
        ".Values.gateway.enabled",
        "--kubernetes",
        "--controller-name={{ .Values.gateway.controllerName }}",
        "--status-lease={{ .Values.gateway.statusLease }}",
        "kind: GatewayClass",
        "kind: Gateway\n",
        "kind: Deployment",
        "kind: Service",
        "kind: ClusterRole",
        "kind: Role",
        "leases",
        "gatewayclasses/status, gateways/status, httproutes/status, grpcroutes/status",
        "gatewayclasses, gateways, httproutes, grpcroutes, referencegrants",
        "NodePort",
    ] {
        assert!(
            text.contains(needle),
            "templates/gateway.yaml lacks {needle:?}"
        );
    }
    let values = values();
    let g = &values["gateway"];
    assert_eq!(g["enabled"], false, "the gateway is off by default");
    assert_eq!(g["controllerName"], status::DEFAULT_CONTROLLER_NAME);
    assert_eq!(g["statusLease"], status_writer::DEFAULT_LEASE);
    assert_eq!(g["className"], class["metadata"]["name"]);
    assert_eq!(g["httpPort"], listen);
    assert_eq!(g["replicas"], dep.spec.as_ref().unwrap().replicas.unwrap());
    assert_eq!(
        g["resources"],
        json(&c.resources),
        "values.gateway.resources"
    );
    assert_eq!(g["service"]["type"].as_str(), spec.type_.as_deref());
    assert_eq!(g["service"]["port"], spec.ports.as_ref().unwrap()[0].port);
}
