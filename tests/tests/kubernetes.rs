//! Kubernetes discovery with real traffic: the agent's Kubernetes source watches a Kubernetes API
//! stand-in (kmock's `KubernetesEmulator`, `tests/kmock/server.py`), its models are reconciled
//! into the kernel data path of a cluster-in-a-box node, and a client pod's connections to the
//! Service's cluster IP follow what the test writes through the API: endpoints added, a
//! `TrafficPolicy` that takes effect, an invalid one that is rejected whole while the service
//! keeps what the valid one gives it, a conflict decided by age, the elected agent's status and
//! Event, and deletion.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_agent::{
    datapath::{Datapath, DatapathConfig, spec::Algorithm},
    discovery::{
        Update,
        kubernetes::{
            self, SERVICE_NAME_LABEL,
            k8s_openapi::api::{
                coordination::v1::Lease,
                core::v1::{Namespace, Pod, Service},
                discovery::v1::EndpointSlice,
                events::v1::Event,
            },
            kube::{
                self, Api,
                api::{
                    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams,
                    PostParams,
                },
            },
        },
    },
    model::{ClusterModel, ObjectName},
    policy::{
        TrafficPolicy,
        status::{EVENT_REASON_INVALID, LEASE_NAME, StatusConfig},
    },
    reconcile::Reconciler,
};
use mesh_tests::{Cluster, HitReport, PodChild, PodHandle};
use serde_json::{Value, json};
use tokio::{runtime::Runtime, sync::mpsc, task::JoinHandle};

const NS: &str = "shop";
const NODE: &str = "a";
/// The agent's namespace and identity for the policy-status Lease.
const AGENT_NS: &str = "mesh-system";
const AGENT_ID: &str = "mesh-agent-a";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// How long a change written to the API may take to reach the data path.
const CONVERGE: Duration = Duration::from_secs(20);

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

/// The kmock server, killed (by its pid) when dropped.
struct Kmock {
    child: Child,
    url: String,
}

impl Kmock {
    fn start() -> Result<Self> {
        ensure_kmock()?;
        let script = mesh_tests::workspace_root().join("tests/kmock/server.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting python3 {}", script.display()))?;
        let stdout = child.stdout.take().context("kmock stdout")?;
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut server = Self {
            child,
            url: String::new(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("kmock printed no ready line within 30 s")?;
        let Some(url) = line.trim().strip_prefix("ready ") else {
            bail!("kmock did not start: {line:?}");
        };
        url.clone_into(&mut server.url);
        Ok(server)
    }
}

impl Drop for Kmock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Installs kmock (from `PyPI`) when `python3` cannot import it; `cargo xtask install-deps` does too.
fn ensure_kmock() -> Result<()> {
    let importable = || {
        Command::new("python3")
            .args(["-c", "import kmock"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if importable() {
        return Ok(());
    }
    for extra in [&[][..], &["--break-system-packages"][..]] {
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "kmock"])
            .args(extra)
            .output()
            .context("running python3 -m pip")?;
        if out.status.success() && importable() {
            return Ok(());
        }
    }
    bail!("kmock is not installed and `python3 -m pip install kmock` failed")
}

/// Drives the discovery source and applies its models, as the agent's main loop will.
struct Agent {
    rt: Runtime,
    source: JoinHandle<Result<(), kubernetes::KubernetesError>>,
    updates: mpsc::Receiver<Update>,
    reconciler: Reconciler,
    model: Option<ClusterModel>,
    rejected: Vec<String>,
}

impl Agent {
    /// Receives updates, reconciling each model into `dp`, until `done` holds for the newest
    /// model (and the rejections so far).
    fn converge(
        &mut self,
        dp: &mut Datapath,
        what: &str,
        done: impl Fn(&ClusterModel, &[String]) -> bool,
    ) -> ClusterModel {
        let deadline = Instant::now() + CONVERGE;
        loop {
            if let Some(m) = &self.model
                && done(m, &self.rejected)
            {
                return m.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{what}: not reached in {CONVERGE:?}; last model {:#?}; rejections {:?}",
                self.model,
                self.rejected
            );
            let updates = &mut self.updates;
            let got = self
                .rt
                .block_on(async { tokio::time::timeout(left, updates.recv()).await });
            match got {
                Ok(Some(Update::Model(m))) => {
                    let report = self.reconciler.reconcile(dp, &m);
                    assert!(report.errors.is_empty(), "reconcile: {report:?}");
                    self.model = Some(m);
                }
                Ok(Some(Update::Rejected(r))) => self.rejected.push(r.to_string()),
                Ok(None) => panic!("{what}: the Kubernetes source stopped"),
                Ok(Some(Update::Resolved(_))) | Err(_) => {}
            }
        }
    }
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

fn slice(version: u32, backends: &[&PodHandle]) -> EndpointSlice {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|p| {
            json!({
                "addresses": [p.ipv4().to_string()],
                "conditions": { "ready": true },
                "nodeName": NODE,
                "targetRef": { "kind": "Pod", "namespace": NS, "name": p.name() },
            })
        })
        .collect();
    from_json(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-x1",
            "namespace": NS,
            "labels": { SERVICE_NAME_LABEL: "web" },
            "annotations": { "test/version": version.to_string() },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }],
        "endpoints": endpoints,
    }))
}

fn pod(name: &str, ip: Ipv4Addr, node: &str) -> Pod {
    from_json(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": NS },
        "spec": { "nodeName": node, "serviceAccountName": "shop", "containers": [] },
        "status": { "phase": "Running", "podIPs": [{ "ip": ip.to_string() }] },
    }))
}

/// A `TrafficPolicy` in [`NS`] targeting the Service `web`, with `spec` fields added.
fn traffic_policy(name: &str, extra: &Value) -> DynamicObject {
    let mut spec = json!({ "targetRefs": [{ "group": "", "kind": "Service", "name": "web" }] });
    for (k, v) in extra.as_object().expect("spec fields") {
        spec[k] = v.clone();
    }
    from_json(json!({
        "apiVersion": "traffic.kernmesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": { "name": name, "namespace": NS },
        "spec": spec,
    }))
}

fn count(r: &HitReport, name: &str) -> u64 {
    r.counts.get(name).copied().unwrap_or(0)
}

fn web() -> ObjectName {
    ObjectName::new(NS, "web")
}

fn ready_endpoints(m: &ClusterModel) -> usize {
    m.services
        .get(&web())
        .map_or(0, |s| s.endpoints.iter().filter(|e| e.ready).count())
}

/// The whole set-up; field order is drop order (the source and data path before the cluster).
struct Scenario {
    agent: Agent,
    dp: Datapath,
    namespaces: Api<Namespace>,
    services: Api<Service>,
    slices: Api<EndpointSlice>,
    pods: Api<Pod>,
    events: Api<Event>,
    policies: Api<DynamicObject>,
    leases: Api<Lease>,
    _servers: Vec<PodChild>,
    client: PodHandle,
    backends: Vec<PodHandle>,
    _cluster: Cluster,
    _kmock: Kmock,
}

impl Scenario {
    /// kmock, one node with a client and three backends serving on port 80, the data path, and
    /// the Kubernetes source running against kmock.
    fn new() -> Self {
        let kmock = Kmock::start().expect("kmock API stand-in");
        let cluster = Cluster::new("kubernetes_discovery").expect("cluster");
        let node = cluster.add_node(NODE).expect("node");
        let client = cluster.add_pod(&node, "client").expect("client pod");
        let (backends, servers) =
            mesh_tests::meshpod::backend_pods(&cluster, &node, "b", 3, 80).expect("backend pods");
        let dp = Datapath::load(&DatapathConfig {
            cgroup: node.cgroup_dir().to_path_buf(),
            pin_dir: cluster.bpffs_dir().expect("bpffs").join(NODE),
        })
        .expect("data path");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let config = kube::Config::new(kmock.url.parse().expect("url"));
        let kube_client = rt
            .block_on(async { kube::Client::try_from(config) })
            .expect("kube client");
        let (tx, updates) = mpsc::channel(16);
        // This agent stands for election as the policy status writer (alone, so it wins).
        let status = StatusConfig {
            namespace: AGENT_NS.to_owned(),
            identity: AGENT_ID.to_owned(),
        };
        let source = rt.spawn(kubernetes::run_with_status(
            kube_client.clone(),
            NODE.to_owned(),
            Some(status),
            tx,
        ));
        let resource = ApiResource::erase::<TrafficPolicy>(&());
        Self {
            agent: Agent {
                rt,
                source,
                updates,
                reconciler: Reconciler::new(&dp),
                model: None,
                rejected: Vec::new(),
            },
            dp,
            namespaces: Api::all(kube_client.clone()),
            services: Api::namespaced(kube_client.clone(), NS),
            slices: Api::namespaced(kube_client.clone(), NS),
            pods: Api::namespaced(kube_client.clone(), NS),
            events: Api::namespaced(kube_client.clone(), NS),
            policies: Api::namespaced_with(kube_client.clone(), NS, &resource),
            leases: Api::namespaced(kube_client, AGENT_NS),
            _servers: servers,
            client,
            backends,
            _cluster: cluster,
            _kmock: kmock,
        }
    }

    fn converge(
        &mut self,
        what: &str,
        done: impl Fn(&ClusterModel, &[String]) -> bool,
    ) -> ClusterModel {
        self.agent.converge(&mut self.dp, what, done)
    }

    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.agent.rt.block_on(f)
    }

    /// Namespace, Service (port 80 → targetPort 80), an `EndpointSlice` with b0 and b1, and Pod
    /// objects: the backends on this node and one elsewhere.
    fn create_service_with_two_endpoints(&mut self) {
        let pp = PostParams::default();
        let svc: Service = from_json(json!({
            "metadata": { "name": "web", "namespace": NS },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": VIP.to_string(),
                "clusterIPs": [VIP.to_string()],
                "ports": [{ "name": "http", "port": 80, "targetPort": 80, "protocol": "TCP" }],
            },
        }));
        let mut pods: Vec<Pod> = self
            .backends
            .iter()
            .map(|p| pod(p.name(), p.ipv4(), NODE))
            .collect();
        pods.push(pod("remote", Ipv4Addr::new(10, 9, 9, 9), "b"));
        self.block_on(async {
            let ns = from_json(json!({ "metadata": { "name": NS } }));
            self.namespaces.create(&pp, &ns).await.expect("namespace");
            self.services.create(&pp, &svc).await.expect("service");
            let two = slice(1, &[&self.backends[0], &self.backends[1]]);
            self.slices.create(&pp, &two).await.expect("slice");
            for p in &pods {
                self.pods.create(&pp, p).await.expect("pod");
            }
        });
        let m = self.converge("service with 2 endpoints", |m, _| {
            ready_endpoints(m) == 2 && m.pods.len() == 3
        });
        let svc = &m.services[&web()];
        assert_eq!(svc.cluster_ips, vec![IpAddr::from(VIP)]);
        assert_eq!(svc.endpoints[0].pod, Some(ObjectName::new(NS, "b0")));
        assert!(
            !m.pods.contains_key(&ObjectName::new(NS, "remote")),
            "a pod on another node is not this node's: {:?}",
            m.pods.keys()
        );
        assert_eq!(m.pods[&ObjectName::new(NS, "b1")].service_account, "shop");
        let r = self.client.hit(vip(), 60, &[]).expect("hit");
        assert_eq!(
            r.ok(),
            60,
            "every connection to the cluster IP succeeds: {r:?}"
        );
        assert!(
            count(&r, "b0") > 0 && count(&r, "b1") > 0 && count(&r, "b2") == 0,
            "both endpoints (and only they) get traffic: {r:?}"
        );
        assert_eq!(r.peer_mismatch, 0, "{r:?}");
    }

    fn scale_to_three_endpoints(&mut self) {
        let s = slice(2, &self.backends.iter().collect::<Vec<_>>());
        let patch = json!({ "metadata": s.metadata, "endpoints": s.endpoints });
        self.block_on(
            self.slices
                .patch("web-x1", &PatchParams::default(), &Patch::Merge(patch)),
        )
        .expect("scale slice");
        self.converge("service with 3 endpoints", |m, _| ready_endpoints(m) == 3);
        let r = self.client.hit(vip(), 90, &[]).expect("hit");
        assert_eq!(r.ok(), 90, "{r:?}");
        for b in ["b0", "b1", "b2"] {
            assert!(count(&r, b) > 0, "{b} gets traffic after scaling: {r:?}");
        }
    }

    fn create_policy(&self, policy: &DynamicObject) {
        self.block_on(self.policies.create(&PostParams::default(), policy))
            .expect("create TrafficPolicy");
    }

    /// The `Accepted` condition the elected agent wrote on a policy: (status, reason, message).
    fn wait_for_condition(&self, name: &str, reason: &str) -> (String, String, String) {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let obj = self
                .block_on(self.policies.get(name))
                .expect("get TrafficPolicy");
            let c = &obj.data["status"]["conditions"][0];
            if c["reason"] == reason {
                assert_eq!(c["type"], "Accepted", "{c}");
                assert!(
                    c["lastTransitionTime"]
                        .as_str()
                        .is_some_and(|t| !t.is_empty()),
                    "{c}"
                );
                assert_eq!(c["observedGeneration"], 1, "{c}");
                let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                return (text("status"), text("reason"), text("message"));
            }
            assert!(
                Instant::now() < deadline,
                "TrafficPolicy {name}: no condition {reason} in {CONVERGE:?}; status {}",
                obj.data["status"]
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A valid policy (round robin, half the backends may be ejected): the distribution becomes
    /// exact, and the elected agent marks it Accepted.
    fn round_robin_policy_takes_effect(&mut self) {
        self.create_policy(&traffic_policy(
            "web-rr",
            &json!({
                "loadBalancer": { "simple": "ROUND_ROBIN" },
                "outlierDetection": { "maxEjectionPercent": 50 },
            }),
        ));
        let m = self.converge("round robin applied", |m, _| {
            m.services
                .get(&web())
                .is_some_and(|s| s.settings.algorithm == Algorithm::RoundRobin)
        });
        assert_eq!(m.services[&web()].settings.circuit.max_ejection_percent, 50);
        assert!(self.agent.rejected.is_empty(), "{:?}", self.agent.rejected);
        self.assert_round_robin();
        let (status, _, message) = self.wait_for_condition("web-rr", "Accepted");
        assert_eq!(
            (status.as_str(), message.as_str()),
            ("True", "applies to its targets")
        );
        let lease = self
            .block_on(self.leases.get(LEASE_NAME))
            .expect("the election Lease exists");
        assert_eq!(
            lease.spec.and_then(|s| s.holder_identity).as_deref(),
            Some(AGENT_ID),
            "this agent holds the Lease"
        );
    }

    fn assert_round_robin(&self) {
        let r = self.client.hit(vip(), 90, &[]).expect("hit");
        assert_eq!(r.ok(), 90, "{r:?}");
        let shares: BTreeMap<&str, u64> = ["b0", "b1", "b2"]
            .into_iter()
            .map(|b| (b, count(&r, b)))
            .collect();
        assert!(
            shares.values().all(|&c| (29..=31).contains(&c)),
            "round robin gives each backend a third: {shares:?}"
        );
        assert!(
            r.per_conn.windows(2).all(|w| w[0] != w[1]),
            "round robin never repeats a backend back to back: {:?}",
            r.per_conn
        );
    }

    /// An invalid policy on the same Service: rejected whole, reported naming object, field and
    /// reason, written to its status and recorded as a Warning Event; the service keeps what the
    /// valid policy gives it, and traffic flows.
    fn invalid_policy_is_rejected_and_the_valid_one_stays(&mut self) {
        let before = self.agent.model.as_ref().expect("model").services[&web()]
            .settings
            .clone();
        self.create_policy(&traffic_policy(
            "web-bad",
            &json!({
                "loadBalancer": { "simple": "RANDOM" },
                "outlierDetection": { "maxEjectionPercent": 150 },
            }),
        ));
        let want = format!(
            "TrafficPolicy {NS}/web-bad: spec.outlierDetection.maxEjectionPercent: 150 is not in \
             0..=100; rejected as a whole"
        );
        let m = self.converge("rejection of maxEjectionPercent 150", |_, rejected| {
            rejected.contains(&want)
        });
        assert_eq!(self.agent.rejected, vec![want.clone()], "reported once");
        assert_eq!(m.services[&web()].settings, before, "nothing of it applies");
        let state = &m.policies.policies[&ObjectName::new(NS, "web-bad")];
        assert_eq!(state.message, want);
        assert_eq!(ready_endpoints(&m), 3);
        self.assert_round_robin();
        let (status, _, message) = self.wait_for_condition("web-bad", "Invalid");
        assert_eq!(
            (status.as_str(), message.as_str()),
            ("False", want.as_str())
        );

        let deadline = Instant::now() + Duration::from_secs(10);
        let event = loop {
            let listed = self
                .block_on(self.events.list(&ListParams::default()))
                .map(|l| l.items)
                .unwrap_or_default();
            if let Some(e) = listed
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(EVENT_REASON_INVALID))
            {
                break e;
            }
            assert!(
                Instant::now() < deadline,
                "no {EVENT_REASON_INVALID} Event recorded"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.note.as_deref(), Some(want.as_str()));
        let regarding = event.regarding.expect("regarding");
        assert_eq!(
            (regarding.kind.as_deref(), regarding.name.as_deref()),
            (Some("TrafficPolicy"), Some("web-bad"))
        );
    }

    /// A second valid policy on the same Service is younger: Conflicted, and it takes over only
    /// when the older one is deleted (the Gateway API's conflict rule).
    fn the_oldest_policy_wins_a_conflict(&mut self) {
        // creationTimestamp has a one-second resolution: make the age difference visible.
        std::thread::sleep(Duration::from_millis(1100));
        self.create_policy(&traffic_policy(
            "web-young",
            &json!({ "loadBalancer": { "simple": "RANDOM" } }),
        ));
        let (status, _, message) = self.wait_for_condition("web-young", "Conflicted");
        assert_eq!(status, "False");
        assert!(
            message.contains(&format!("older policy {NS}/web-rr wins")),
            "{message}"
        );
        let m = self.agent.model.clone().expect("model");
        assert_eq!(m.services[&web()].settings.algorithm, Algorithm::RoundRobin);
        self.block_on(self.policies.delete("web-rr", &DeleteParams::default()))
            .expect("delete web-rr");
        let m = self.converge("the younger policy applies", |m, _| {
            m.services
                .get(&web())
                .is_some_and(|s| s.settings.algorithm == Algorithm::Random)
        });
        assert_eq!(
            m.services[&web()].settings.circuit.max_ejection_percent,
            10,
            "web-young sets no outlier detection: the defaults, nothing merged from web-rr"
        );
        let (status, _, _) = self.wait_for_condition("web-young", "Accepted");
        assert_eq!(status, "True");
    }

    /// Deleting the Service: connections to the cluster IP are no longer translated.
    fn delete_service(&mut self) {
        self.block_on(self.services.delete("web", &DeleteParams::default()))
            .expect("delete service");
        self.converge("service removed", |m, _| m.services.is_empty());
        assert_eq!(
            self.dp.service_keys().count(),
            0,
            "no service in the data path"
        );
        let r = self
            .client
            .hit(vip(), 3, &["--timeout-ms", "300"])
            .expect("hit");
        assert_eq!(
            r.ok(),
            0,
            "nothing answers on the unrouted cluster IP: {r:?}"
        );
        assert_eq!(r.failed(), 3, "{r:?}");
    }

    /// Deleting the namespace drops its remaining objects (the pods) from the model.
    fn delete_namespace(&mut self) {
        self.block_on(self.namespaces.delete(NS, &DeleteParams::default()))
            .expect("delete namespace");
        self.converge("namespace gone", |m, _| m.pods.is_empty());
        assert!(!self.agent.source.is_finished(), "the source keeps running");
    }
}

#[test]
fn kubernetes_discovery_drives_the_kernel_data_path() {
    let Some(_k) = mesh_tests::kernel_test("kubernetes_discovery") else {
        return;
    };
    let mut s = Scenario::new();
    let m = s.converge("first (empty) model", |_, _| true);
    assert!(m.services.is_empty() && m.pods.is_empty(), "{m:?}");
    s.create_service_with_two_endpoints();
    s.scale_to_three_endpoints();
    s.round_robin_policy_takes_effect();
    s.invalid_policy_is_rejected_and_the_valid_one_stays();
    s.the_oldest_policy_wins_a_conflict();
    s.delete_service();
    s.delete_namespace();
}

/// The agent binary as a user starts it (`mesh-agent --kubernetes`, kubeconfig pointing at the
/// API stand-in): objects written through the API drive the kernel, a `TrafficPolicy` applies,
/// and an invalid one shows in `meshctl status` and `meshctl policies` without breaking the
/// service.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario, read top to bottom"
)]
fn agent_binary_follows_the_kubernetes_api() {
    let Some(_k) = mesh_tests::kernel_test("kubernetes_agent_binary") else {
        return;
    };
    let kmock = Kmock::start().expect("kmock API stand-in");
    let cluster = Cluster::new("kubernetes_agent_binary").expect("cluster");
    let node = cluster.add_node(NODE).expect("node");
    let client = cluster.add_pod(&node, "client").expect("client pod");
    let (backends, _servers) =
        mesh_tests::meshpod::backend_pods(&cluster, &node, "b", 3, 80).expect("backend pods");
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).unwrap();
    let kubeconfig = work.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kmock\n  cluster: {{ server: \"{}\" }}\ncontexts:\n- name: kmock\n  context: {{ cluster: kmock, user: test }}\ncurrent-context: kmock\nusers:\n- name: test\n  user: {{}}\n",
            kmock.url
        ),
    )
    .unwrap();
    let mut agent = mesh_tests::agent::AgentProcess::new(
        node.clone(),
        work.join("unused.yaml"),
        cluster.bpffs_dir().unwrap().join(NODE),
        work.join("admin.sock"),
    );
    agent.kubeconfig = Some(kubeconfig);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kube_client = rt
        .block_on(async { kube::Client::try_from(kube::Config::new(kmock.url.parse().unwrap())) })
        .unwrap();
    let pp = PostParams::default();
    let namespaces: Api<Namespace> = Api::all(kube_client.clone());
    let services: Api<Service> = Api::namespaced(kube_client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(kube_client.clone(), NS);
    let policies: Api<DynamicObject> =
        Api::namespaced_with(kube_client, NS, &ApiResource::erase::<TrafficPolicy>(&()));
    rt.block_on(async {
        namespaces
            .create(&pp, &from_json(json!({ "metadata": { "name": NS } })))
            .await
            .expect("namespace");
        let svc: Service = from_json(json!({
            "metadata": { "name": "web", "namespace": NS },
            "spec": {
                "clusterIP": VIP.to_string(),
                "clusterIPs": [VIP.to_string()],
                "ports": [{ "name": "http", "port": 80, "targetPort": 80, "protocol": "TCP" }],
            },
        }));
        services.create(&pp, &svc).await.expect("service");
        slices
            .create(&pp, &slice(1, &[&backends[0], &backends[1]]))
            .await
            .expect("slice");
    });
    // The agent starts against the API (it is ready once the first model is in the kernel).
    agent
        .start()
        .expect("mesh-agent --kubernetes becomes ready");
    let hit_until = |what: &str, ok: &dyn Fn(&HitReport) -> bool, args: &[&str]| {
        let start = Instant::now();
        loop {
            let r = client.hit(vip(), 30, args).expect("hit");
            if ok(&r) {
                return r;
            }
            assert!(
                start.elapsed() < CONVERGE,
                "{what}: last {r:?}\n{}",
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    hit_until(
        "two endpoints",
        &|r| r.ok() == 30 && count(r, "b0") > 0 && count(r, "b1") > 0 && count(r, "b2") == 0,
        &[],
    );
    // Scale to three.
    let s = slice(2, &backends.iter().collect::<Vec<_>>());
    let patch = json!({ "metadata": s.metadata, "endpoints": s.endpoints });
    rt.block_on(slices.patch("web-x1", &PatchParams::default(), &Patch::Merge(patch)))
        .expect("scale");
    hit_until(
        "three endpoints",
        &|r| r.ok() == 30 && count(r, "b2") > 0,
        &[],
    );
    // A valid policy applies: round robin, visible in `meshctl policies`.
    rt.block_on(policies.create(
        &pp,
        &traffic_policy(
            "web",
            &json!({ "loadBalancer": { "simple": "ROUND_ROBIN" } }),
        ),
    ))
    .expect("create policy");
    let applied = |what: &str, ok: &dyn Fn(&Value) -> bool| {
        let start = Instant::now();
        loop {
            let p = agent.meshctl_json(&["policies"]).unwrap();
            if ok(&p) {
                return p;
            }
            assert!(
                start.elapsed() < CONVERGE,
                "{what}: {p}\n{}",
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    applied("round robin from policy shop/web", &|p| {
        p["services"][0]["service"] == "shop/web"
            && p["services"][0]["policy"] == "shop/web"
            && p["services"][0]["algorithm"] == "round-robin"
    });
    // An invalid one: reported by the agent, named in `meshctl policies`, service unharmed.
    rt.block_on(policies.create(
        &pp,
        &traffic_policy(
            "web-bad",
            &json!({ "outlierDetection": { "maxEjectionPercent": 150 } }),
        ),
    ))
    .expect("create invalid policy");
    let start = Instant::now();
    loop {
        let status = agent.meshctl_json(&["status"]).unwrap();
        let why = status["last_rejection"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if why.contains("spec.outlierDetection.maxEjectionPercent") && why.contains("shop/web-bad")
        {
            break;
        }
        assert!(
            start.elapsed() < CONVERGE,
            "no rejection reported: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let p = applied("the invalid policy listed", &|p| {
        p["services"][0]["not_applied"][0]["policy"] == "shop/web-bad"
    });
    assert_eq!(p["services"][0]["policy"], "shop/web", "{p}");
    assert_eq!(
        p["services"][0]["not_applied"][0]["reason"], "Invalid",
        "{p}"
    );
    assert_eq!(
        client.hit(vip(), 30, &[]).unwrap().ok(),
        30,
        "the service keeps working"
    );
    // Deleting the Service removes it from the kernel: the cluster IP no longer leads anywhere.
    rt.block_on(services.delete("web", &DeleteParams::default()))
        .expect("delete");
    hit_until(
        "service deleted",
        &|r| r.ok() == 0,
        &["--timeout-ms", "300"],
    );
    let listed = agent.meshctl_json(&["services"]).unwrap();
    assert!(listed.as_array().unwrap().is_empty(), "{listed}");
}

/// The policy status writer (no kernel needed): of two agents only the Lease holder writes; when
/// it dies, the other takes the Lease over once the record has gone unrenewed for the lease
/// duration, and its view of the status is written.
#[test]
fn policy_status_has_one_writer_and_fails_over() {
    use std::sync::Arc;

    use mesh_agent::policy::{
        status::{self, Desired, DesiredStatus, LEASE_DURATION},
        types::PolicyCondition,
    };
    use tokio::sync::watch;

    let kmock = Kmock::start().expect("kmock API stand-in");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(async { kube::Client::try_from(kube::Config::new(kmock.url.parse().unwrap())) })
        .unwrap();
    let resource = ApiResource::erase::<TrafficPolicy>(&());
    let policies: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &resource);
    let leases: Api<Lease> = Api::namespaced(client.clone(), AGENT_NS);
    let created = rt
        .block_on(policies.create(&PostParams::default(), &traffic_policy("p", &json!({}))))
        .expect("create policy");
    let reference = kube::Resource::object_ref(&created, &resource);
    let desired = |reason: &str| {
        let mut d = DesiredStatus::new();
        d.insert(
            ObjectName::new(NS, "p"),
            Desired {
                condition: PolicyCondition {
                    type_: "Accepted".to_owned(),
                    status: "True".to_owned(),
                    reason: reason.to_owned(),
                    message: format!("as seen by the agent writing {reason}"),
                    observed_generation: Some(1),
                    last_transition_time: String::new(),
                },
                current: None,
                reference: reference.clone(),
            },
        );
        Arc::new(d)
    };
    let agent = |id: &str, reason: &str| {
        let (tx, rx) = watch::channel(desired(reason));
        let config = StatusConfig {
            namespace: AGENT_NS.to_owned(),
            identity: id.to_owned(),
        };
        (tx, rt.spawn(status::run(client.clone(), config, rx)))
    };
    let reason_now = || {
        rt.block_on(policies.get("p")).expect("get policy").data["status"]["conditions"][0]
            ["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let holder = || {
        rt.block_on(leases.get(LEASE_NAME))
            .ok()
            .and_then(|l| l.spec)
            .map(|s| (s.holder_identity.unwrap_or_default(), s.lease_transitions))
    };
    let wait = |what: &str, limit: Duration, ok: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !ok() {
            assert!(start.elapsed() < limit, "{what} not within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (_a_tx, a) = agent("agent-a", "WrittenByA");
    wait("agent-a elected and writing", CONVERGE, &|| {
        reason_now() == "WrittenByA"
    });
    assert_eq!(holder(), Some(("agent-a".to_owned(), Some(0))));
    let (_b_tx, b) = agent("agent-b", "WrittenByB");
    // While agent-a renews, agent-b only reads: nothing of its view is written.
    std::thread::sleep(status::RENEW_INTERVAL + Duration::from_secs(2));
    assert_eq!(reason_now(), "WrittenByA", "a non-holder wrote status");
    assert_eq!(holder().unwrap().0, "agent-a");
    // agent-a dies without releasing: agent-b takes over after the lease duration, not before.
    a.abort();
    let died = Instant::now();
    wait(
        "agent-b takes the Lease over",
        LEASE_DURATION + CONVERGE,
        &|| holder().is_some_and(|(h, _)| h == "agent-b"),
    );
    assert!(
        died.elapsed() >= LEASE_DURATION.saturating_sub(status::RENEW_INTERVAL),
        "taken over after {:?}, before the lease could expire",
        died.elapsed()
    );
    assert_eq!(holder(), Some(("agent-b".to_owned(), Some(1))));
    wait("agent-b writes its view", CONVERGE, &|| {
        reason_now() == "WrittenByB"
    });
    b.abort();
}
