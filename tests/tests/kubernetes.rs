//! Kubernetes discovery with real traffic: the agent's Kubernetes source watches a Kubernetes API
//! stand-in (kmock's `KubernetesEmulator`, `tests/kmock/server.py`), its models are reconciled
//! into the kernel data path of a cluster-in-a-box node, and a client pod's connections to the
//! Service's cluster IP follow what the test writes through the API: endpoints added, a rejected
//! annotation that keeps the last good settings, a valid one that takes effect, and deletion.

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
            self, ANN_LB_ALGORITHM, ANN_MAX_EJECTION_PERCENT, EVENT_REASON, SERVICE_NAME_LABEL,
            k8s_openapi::api::{
                core::v1::{Namespace, Pod, Service},
                discovery::v1::EndpointSlice,
                events::v1::Event,
            },
            kube::{
                self, Api,
                api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
            },
        },
    },
    model::{ClusterModel, ObjectName},
    reconcile::Reconciler,
};
use mesh_tests::{Cluster, HitReport, PodChild, PodHandle};
use serde_json::{Value, json};
use tokio::{runtime::Runtime, sync::mpsc, task::JoinHandle};

const NS: &str = "shop";
const NODE: &str = "a";
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
        let source = rt.spawn(kubernetes::run(kube_client.clone(), NODE.to_owned(), tx));
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
            events: Api::namespaced(kube_client, NS),
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

    fn patch_service(&self, patch: Value) {
        self.block_on(
            self.services
                .patch("web", &PatchParams::default(), &Patch::Merge(patch)),
        )
        .expect("patch service");
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

    /// An invalid annotation: reported naming object and field, and recorded as an Event; the
    /// previous settings stay and traffic flows.
    fn bad_annotation_is_rejected(&mut self) {
        let before = self.agent.model.as_ref().expect("model").services[&web()]
            .settings
            .clone();
        self.patch_service(json!({ "metadata": { "annotations": {
            ANN_MAX_EJECTION_PERCENT: "150",
        } } }));
        let want = format!(
            "Service {NS}/web: annotation {ANN_MAX_EJECTION_PERCENT}: \"150\" is not 0..=100; \
             keeping the last good settings"
        );
        let m = self.converge("rejection of max-ejection-percent 150", |_, rejected| {
            rejected.contains(&want)
        });
        assert_eq!(self.agent.rejected, vec![want.clone()], "reported once");
        assert_eq!(m.services[&web()].settings, before);
        assert_eq!(ready_endpoints(&m), 3);
        let r = self.client.hit(vip(), 60, &[]).expect("hit");
        assert_eq!(
            r.ok(),
            60,
            "traffic flows with the previous settings: {r:?}"
        );
        assert_eq!(r.counts.len(), 3, "{r:?}");

        // Best effort on the agent's side, but kmock accepts it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let event = loop {
            let listed = self
                .block_on(self.events.list(&ListParams::default()))
                .map(|l| l.items)
                .unwrap_or_default();
            if let Some(e) = listed
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(EVENT_REASON))
            {
                break e;
            }
            assert!(
                Instant::now() < deadline,
                "no {EVENT_REASON} Event recorded"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.note.as_deref(), Some(want.as_str()));
        let regarding = event.regarding.expect("regarding");
        assert_eq!(
            (regarding.kind.as_deref(), regarding.name.as_deref()),
            (Some("Service"), Some("web"))
        );
    }

    /// Valid annotations (the percent fixed, round robin): the distribution becomes exact.
    fn round_robin_takes_effect(&mut self) {
        self.patch_service(json!({ "metadata": { "annotations": {
            ANN_MAX_EJECTION_PERCENT: "50",
            ANN_LB_ALGORITHM: "round-robin",
        } } }));
        let m = self.converge("round robin applied", |m, _| {
            m.services
                .get(&web())
                .is_some_and(|s| s.settings.algorithm == Algorithm::RoundRobin)
        });
        assert_eq!(m.services[&web()].settings.circuit.max_ejection_percent, 50);
        assert_eq!(self.agent.rejected.len(), 1, "{:?}", self.agent.rejected);
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
    s.bad_annotation_is_rejected();
    s.round_robin_takes_effect();
    s.delete_service();
    s.delete_namespace();
}

/// The agent binary as a user starts it (`mesh-agent --kubernetes`, kubeconfig pointing at the
/// API stand-in): objects written through the API drive the kernel, and a bad annotation shows
/// in `meshctl status` without breaking the service.
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
    let slices: Api<EndpointSlice> = Api::namespaced(kube_client, NS);
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
    // A bad annotation: reported by the agent, service unharmed.
    let bad = json!({ "metadata": { "annotations": { ANN_MAX_EJECTION_PERCENT: "150" } } });
    rt.block_on(services.patch("web", &PatchParams::default(), &Patch::Merge(bad)))
        .expect("annotate");
    let start = Instant::now();
    loop {
        let status = agent.meshctl_json(&["status"]).unwrap();
        let why = status["last_rejection"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if why.contains(ANN_MAX_EJECTION_PERCENT) && why.contains("shop/web") {
            break;
        }
        assert!(
            start.elapsed() < CONVERGE,
            "no rejection reported: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
