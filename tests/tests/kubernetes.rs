//! Kubernetes discovery with real traffic: the real `mesh-agent --kubernetes` binary watches a
//! Kubernetes API stand-in (kmock's `KubernetesEmulator`, `tests/kmock/server.py`, which honours
//! label and field selectors) and programs the kernel of a cluster-in-a-box node; a client pod's
//! connections to Service cluster IPs follow what the test writes through the API. Nothing of
//! the agent's loop is re-implemented here: what the agent did is seen through traffic,
//! `meshctl` and the pinned maps.
//!
//! - `agent_follows_the_kubernetes_api` (against a stand-in without streaming lists, so the
//!   agent falls back to lists): endpoints added, a `TrafficPolicy` that takes effect,
//!   an invalid one that is rejected whole while the service keeps what the valid one gives it
//!   (reported, written to its status and recorded as an Event by the elected agent), a
//!   conflict decided by age, deletion of the Service and of its namespace.
//! - `agent_applies_kube_proxy_semantics`: terminating endpoints, `internalTrafficPolicy: Local`,
//!   named target ports, topology hints and `PreferClose`, Services of another proxy and
//!   headless ones filtered by the watches' label selectors, host-network pods, and the initial
//!   state streamed from the watch cache (`sendInitialEvents`).
//! - `policy_status_has_one_writer_and_fails_over`: of two status writers only the Lease holder
//!   writes, and the other takes over when it dies.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use mesh_agent::{
    discovery::kubernetes::{
        PROXY_LABEL_SELECTOR, SERVICE_NAME_LABEL, ZONE_LABEL,
        k8s_openapi::api::{
            coordination::v1::Lease,
            core::v1::{Namespace, Node, Pod, Service},
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
    model::ObjectName,
    policy::{
        TrafficPolicy,
        status::{EVENT_REASON_INVALID, LEASE_NAME, StatusConfig},
    },
};
use mesh_tests::{
    Cluster, HitReport, NodeHandle, PodChild, PodHandle, agent::AgentProcess, kmock::Kmock,
};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

const NS: &str = "shop";
const NODE: &str = "a";
/// The agent's namespace and identity for the policy-status Lease (the downward API's
/// `POD_NAMESPACE` and `POD_NAME`).
const AGENT_NS: &str = "mesh-system";
const AGENT_ID: &str = "mesh-agent-a";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// How long a change written to the API may take to reach the data path.
const CONVERGE: Duration = Duration::from_secs(20);

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("valid object")
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

/// kmock, a cluster, the API clients, and the real agent of node [`NODE`] (started later, so
/// objects can exist before its first list). Field order is drop order: the agent first.
struct Harness {
    agent: AgentProcess,
    rt: Runtime,
    kube: kube::Client,
    cluster: Cluster,
    kmock: Kmock,
}

impl Harness {
    fn new(test: &str) -> Self {
        Self::with_server(test, &[])
    }

    /// With more flags for kmock (`["--watch-list", "off"]`: an API server without streaming
    /// lists).
    fn with_server(test: &str, kmock_flags: &[&str]) -> Self {
        let cluster = Cluster::new(test).expect("cluster");
        let work = std::env::temp_dir().join(cluster.prefix());
        std::fs::create_dir_all(&work).expect("work dir");
        let kmock = Kmock::start_with(&work, None, kmock_flags).expect("kmock API stand-in");
        let node = cluster.add_node(NODE).expect("node");
        let kubeconfig = kmock.kubeconfig(&work).expect("kubeconfig");
        let mut agent = AgentProcess::new(
            node,
            work.join("unused.yaml"),
            cluster.bpffs_dir().expect("bpffs").join(NODE),
            work.join("admin.sock"),
        );
        agent.kubeconfig = Some(kubeconfig);
        // As in its DaemonSet: the agent stands for election as the policy status writer.
        agent.env = vec![
            ("POD_NAMESPACE".to_owned(), AGENT_NS.to_owned()),
            ("POD_NAME".to_owned(), AGENT_ID.to_owned()),
        ];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let config = kube::Config::new(kmock.url.parse().expect("url"));
        let kube = rt
            .block_on(async { kube::Client::try_from(config) })
            .expect("kube client");
        Self {
            agent,
            rt,
            kube,
            cluster,
            kmock,
        }
    }

    fn node(&self) -> NodeHandle {
        self.agent.node.clone()
    }

    fn namespaced<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.kube.clone(), NS)
    }

    fn create<K>(&self, api: &Api<K>, obj: Value)
    where
        K: kube::Resource
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let obj: K = from_json(obj);
        self.rt
            .block_on(api.create(&PostParams::default(), &obj))
            .expect("create");
    }

    fn patch<K>(&self, api: &Api<K>, name: &str, patch: Value)
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        self.rt
            .block_on(api.patch(name, &PatchParams::default(), &Patch::Merge(patch)))
            .expect("patch");
    }

    /// Hits `addr` from `client` (`n` connections, `args`) until `ok` holds for the report.
    fn hit_until(
        &self,
        client: &PodHandle,
        addr: SocketAddr,
        what: &str,
        args: &[&str],
        ok: &dyn Fn(&HitReport) -> bool,
    ) -> HitReport {
        let start = Instant::now();
        loop {
            let r = client.hit(addr, 20, args).expect("hit");
            if ok(&r) {
                return r;
            }
            assert!(
                start.elapsed() < CONVERGE,
                "{what}: not reached in {CONVERGE:?}; last {r:?}\nagent log:\n{}",
                self.agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn policies(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.kube.clone(),
            NS,
            &ApiResource::erase::<TrafficPolicy>(&()),
        )
    }

    fn create_policy(&self, policy: &DynamicObject) {
        self.rt
            .block_on(self.policies().create(&PostParams::default(), policy))
            .expect("create TrafficPolicy");
    }

    /// The `Accepted` condition the elected agent wrote on a policy: (status, reason, message).
    fn wait_for_condition(&self, name: &str, reason: &str) -> (String, String, String) {
        let start = Instant::now();
        loop {
            let obj = self
                .rt
                .block_on(self.policies().get(name))
                .expect("get TrafficPolicy");
            let c = &obj.data["status"]["conditions"][0];
            // The condition of the policy's current spec (the API server bumps `generation` on
            // every spec change; the writer reports the generation it judged).
            if c["reason"] == reason && c["observedGeneration"].as_i64() == obj.metadata.generation
            {
                assert_eq!(c["type"], "Accepted", "{c}");
                assert!(
                    c["lastTransitionTime"]
                        .as_str()
                        .is_some_and(|t| !t.is_empty()),
                    "{c}"
                );
                let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                return (text("status"), text("reason"), text("message"));
            }
            assert!(
                start.elapsed() < CONVERGE,
                "TrafficPolicy {name}: no condition {reason} in {CONVERGE:?}; status {}\nagent \
                 log:\n{}",
                obj.data["status"],
                self.agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `meshctl services` of `web` until `ok` holds for it.
    fn web_service_until(&self, what: &str, ok: &dyn Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let listed = self.agent.meshctl_json(&["services"]).expect("services");
            if let Some(web) = listed
                .as_array()
                .and_then(|l| l.iter().find(|s| s["name"] == "web"))
                && ok(web)
            {
                return web.clone();
            }
            assert!(
                start.elapsed() < CONVERGE,
                "{what}: {listed}\nagent log:\n{}",
                self.agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `meshctl policies` until `ok` holds for it.
    fn policies_until(&self, what: &str, ok: &dyn Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let p = self.agent.meshctl_json(&["policies"]).expect("policies");
            if ok(&p) {
                return p;
            }
            assert!(
                start.elapsed() < CONVERGE,
                "{what}: {p}\nagent log:\n{}",
                self.agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `meshctl services`: the programmed addresses by service name.
    fn services(&self) -> BTreeMap<String, Vec<String>> {
        let listed = self
            .agent
            .meshctl_json(&["services"])
            .expect("meshctl services");
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in listed.as_array().expect("a list") {
            out.entry(s["name"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .push(s["address"].as_str().unwrap_or_default().to_owned());
        }
        out
    }
}

fn namespace_object() -> Value {
    json!({ "metadata": { "name": NS } })
}

fn pod_object(name: &str, ip: Ipv4Addr, node: &str, host_network: bool) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": NS },
        "spec": { "nodeName": node, "serviceAccountName": "shop", "hostNetwork": host_network,
                  "containers": [] },
        "status": { "phase": "Running", "podIPs": [{ "ip": ip.to_string() }] },
    })
}

fn service_object(name: &str, vip: Ipv4Addr, spec: &Value, labels: &Value) -> Value {
    let mut s = json!({
        "metadata": { "name": name, "namespace": NS, "labels": labels },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip.to_string(),
            "clusterIPs": [vip.to_string()],
            "ports": [{ "name": "http", "port": 80, "targetPort": 80, "protocol": "TCP" }],
        },
    });
    for (k, v) in spec.as_object().expect("spec fields") {
        s["spec"][k] = v.clone();
    }
    s
}

/// One endpoint of `pod` on `node` with `extra` fields (conditions, zone, hints).
fn endpoint(pod: &PodHandle, node: &str, extra: &Value) -> Value {
    let mut e = json!({
        "addresses": [pod.ipv4().to_string()],
        "conditions": { "ready": true },
        "nodeName": node,
        "targetRef": { "kind": "Pod", "namespace": NS, "name": pod.name() },
    });
    for (k, v) in extra.as_object().expect("endpoint fields") {
        e[k] = v.clone();
    }
    e
}

fn http_port() -> Value {
    json!([{ "name": "http", "port": 80, "protocol": "TCP" }])
}

fn slice_object(name: &str, service: &str, endpoints: &[Value], ports: &Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": { "name": name, "namespace": NS, "labels": { SERVICE_NAME_LABEL: service } },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// Endpoints as kube-rs would have serialised them in a merge patch (the whole list replaces).
fn endpoints_patch(endpoints: &[Value], ports: &Value) -> Value {
    json!({ "endpoints": endpoints, "ports": ports })
}

/// The service `web` and its slice `web-x1` with `backends` (all ready, on [`NODE`]).
fn web_slice(backends: &[&PodHandle]) -> Vec<Value> {
    backends
        .iter()
        .map(|p| endpoint(p, NODE, &json!({})))
        .collect()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario, read top to bottom"
)]
fn agent_follows_the_kubernetes_api() {
    let Some(_k) = mesh_tests::kernel_test("kubernetes_agent") else {
        return;
    };
    // An API server without streaming lists (< 1.27, or the WatchList gate off): the agent's
    // default `discovery.listMode: auto` is refused, falls back to lists, and says so once.
    let mut h = Harness::with_server("kubernetes_agent", &["--watch-list", "off"]);
    let node = h.node();
    let client = h.cluster.add_pod(&node, "client").expect("client pod");
    let (backends, _servers) =
        mesh_tests::meshpod::backend_pods(&h.cluster, &node, "b", 3, 80).expect("backend pods");
    let namespaces: Api<Namespace> = Api::all(h.kube.clone());
    let services: Api<Service> = h.namespaced();
    let slices: Api<EndpointSlice> = h.namespaced();
    let pods: Api<Pod> = h.namespaced();
    let events: Api<Event> = h.namespaced();
    h.create(&namespaces, namespace_object());
    h.create(
        &services,
        service_object("web", VIP, &json!({}), &json!({})),
    );
    h.create(
        &slices,
        slice_object(
            "web-x1",
            "web",
            &web_slice(&[&backends[0], &backends[1]]),
            &http_port(),
        ),
    );
    for b in &backends {
        h.create(&pods, pod_object(b.name(), b.ipv4(), NODE, false));
    }
    h.create(
        &pods,
        pod_object("remote", Ipv4Addr::new(10, 9, 9, 9), "b", false),
    );
    h.agent
        .start()
        .expect("mesh-agent --kubernetes becomes ready");

    // The streaming watches were refused (422), then every resource was listed from the watch
    // cache and watched from the list's version; the fallback is logged once.
    let requests = h.kmock.requests();
    let refused = requests
        .iter()
        .filter(|r| r["phase"] == "request" && r["params"]["sendInitialEvents"] == "true")
        .count();
    assert!(refused >= 1, "no streaming watch was tried: {requests:?}");
    for path in [
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/pods",
        "/api/v1/namespaces",
        "/api/v1/nodes",
        "/apis/traffic.kernmesh.io/v1alpha1/trafficpolicies",
    ] {
        let list = requests
            .iter()
            .find(|r| {
                r["phase"] == "response"
                    && r["method"] == "GET"
                    && r["path"] == path
                    && r["params"].get("watch").is_none()
            })
            .unwrap_or_else(|| panic!("no list of {path} served after the fallback: {requests:?}"));
        assert_eq!(list["params"]["resourceVersion"], "0", "{list}");
    }
    let log = h.agent.stderr();
    assert_eq!(
        log.matches("does not serve streaming lists").count(),
        1,
        "the fallback is logged once: {log}"
    );

    // Two endpoints, and only they, get traffic; the application sees the service address.
    let r = h.hit_until(&client, vip(), "two endpoints", &[], &|r| {
        r.ok() == 20 && count(r, "b0") > 0 && count(r, "b1") > 0 && count(r, "b2") == 0
    });
    assert_eq!(r.peer_mismatch, 0, "{r:?}");
    // The pods of this node are the agent's identities; the one elsewhere is not.
    let ids = h.agent.meshctl_json(&["identities"]).expect("identities");
    let mut names: Vec<&str> = ids
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|i| i["pod"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["b0", "b1", "b2"], "{ids}");

    // Scale to three.
    h.patch(
        &slices,
        "web-x1",
        endpoints_patch(
            &web_slice(&backends.iter().collect::<Vec<_>>()),
            &http_port(),
        ),
    );
    h.hit_until(&client, vip(), "three endpoints", &[], &|r| {
        r.ok() == 20 && ["b0", "b1", "b2"].iter().all(|b| count(r, b) > 0)
    });

    // A valid policy (round robin, half the backends may be ejected): the distribution becomes
    // exact, `meshctl policies` names it, and the elected agent marks it Accepted.
    h.create_policy(&traffic_policy(
        "web-rr",
        &json!({
            "loadBalancer": { "simple": "ROUND_ROBIN" },
            "outlierDetection": { "maxEjectionPercent": 50 },
        }),
    ));
    let web = h.web_service_until("round robin applied", &|s| s["algorithm"] == "round-robin");
    assert_eq!(web["max_ejection_percent"], 50, "{web}");
    let assert_round_robin = || {
        let r = client.hit(vip(), 90, &[]).expect("hit");
        assert_eq!(r.ok(), 90, "{r:?}");
        for b in ["b0", "b1", "b2"] {
            assert!(
                (29..=31).contains(&count(&r, b)),
                "round robin gives each backend a third: {r:?}"
            );
        }
        assert!(
            r.per_conn.windows(2).all(|w| w[0] != w[1]),
            "round robin never repeats a backend back to back: {:?}",
            r.per_conn
        );
    };
    assert_round_robin();
    h.policies_until("round robin from policy shop/web-rr", &|p| {
        p["services"][0]["service"] == "shop/web"
            && p["services"][0]["policy"] == "shop/web-rr"
            && p["services"][0]["algorithm"] == "round-robin"
    });
    let (status, _, message) = h.wait_for_condition("web-rr", "Accepted");
    assert_eq!(
        (status.as_str(), message.as_str()),
        ("True", "applies to its targets")
    );
    let leases: Api<Lease> = Api::namespaced(h.kube.clone(), AGENT_NS);
    let lease =
        h.rt.block_on(leases.get(LEASE_NAME))
            .expect("the election Lease exists");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(AGENT_ID),
        "this agent holds the Lease"
    );

    // An invalid policy on the same Service: rejected whole, reported naming object, field and
    // reason, written to its status and recorded as a Warning Event; the service keeps what the
    // valid policy gives it, and traffic flows.
    h.create_policy(&traffic_policy(
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
    let start = Instant::now();
    loop {
        let status = h.agent.meshctl_json(&["status"]).expect("status");
        if status["last_rejection"].as_str() == Some(want.as_str()) {
            break;
        }
        assert!(
            start.elapsed() < CONVERGE,
            "no rejection reported: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let web = h.web_service_until("settings of web", &|_| true);
    assert_eq!(
        (
            web["algorithm"].as_str(),
            web["max_ejection_percent"].as_u64()
        ),
        (Some("round-robin"), Some(50)),
        "nothing of the invalid policy applies: {web}"
    );
    let p = h.policies_until("the invalid policy listed", &|p| {
        p["services"][0]["not_applied"][0]["policy"] == "shop/web-bad"
    });
    assert_eq!(p["services"][0]["policy"], "shop/web-rr", "{p}");
    assert_eq!(
        p["services"][0]["not_applied"][0]["reason"], "Invalid",
        "{p}"
    );
    assert_round_robin();
    let (status, _, message) = h.wait_for_condition("web-bad", "Invalid");
    assert_eq!(
        (status.as_str(), message.as_str()),
        ("False", want.as_str())
    );
    let start = Instant::now();
    let event = loop {
        let listed =
            h.rt.block_on(events.list(&ListParams::default()))
                .map(|l| l.items)
                .unwrap_or_default();
        if let Some(e) = listed
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(EVENT_REASON_INVALID))
        {
            break e;
        }
        assert!(
            start.elapsed() < CONVERGE,
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

    // A second valid policy on the same Service is younger: Conflicted, and it takes over only
    // when the older one is deleted (the Gateway API's conflict rule).
    // creationTimestamp has a one-second resolution: make the age difference visible.
    std::thread::sleep(Duration::from_millis(1100));
    h.create_policy(&traffic_policy(
        "web-young",
        &json!({ "loadBalancer": { "simple": "RANDOM" } }),
    ));
    let (status, _, message) = h.wait_for_condition("web-young", "Conflicted");
    assert_eq!(status, "False");
    assert!(
        message.contains(&format!("older policy {NS}/web-rr wins")),
        "{message}"
    );
    let web = h.web_service_until("settings of web", &|_| true);
    assert_eq!(web["algorithm"], "round-robin", "{web}");
    h.rt.block_on(h.policies().delete("web-rr", &DeleteParams::default()))
        .expect("delete web-rr");
    let web = h.web_service_until("the younger policy applies", &|s| {
        s["algorithm"] == "random"
    });
    assert_eq!(
        web["max_ejection_percent"], 10,
        "web-young sets no outlier detection: the defaults, nothing merged from web-rr: {web}"
    );
    let (status, _, _) = h.wait_for_condition("web-young", "Accepted");
    assert_eq!(status, "True");

    // Deleting the Service removes it from the kernel: the cluster IP no longer leads anywhere.
    h.rt.block_on(services.delete("web", &DeleteParams::default()))
        .expect("delete service");
    h.hit_until(
        &client,
        vip(),
        "service deleted",
        &["--timeout-ms", "300"],
        &|r| r.ok() == 0,
    );
    assert!(h.services().is_empty(), "{:?}", h.services());

    // Deleting the namespace drops its remaining objects (the pods) from the agent's model.
    h.rt.block_on(namespaces.delete(NS, &DeleteParams::default()))
        .expect("delete namespace");
    let start = Instant::now();
    while !h
        .agent
        .meshctl_json(&["identities"])
        .expect("identities")
        .as_array()
        .is_some_and(Vec::is_empty)
    {
        assert!(
            start.elapsed() < CONVERGE,
            "pods of a deleted namespace stay"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(h.agent.pid().is_some(), "the agent keeps running");
}

/// The IPv4 addresses in the pinned `LOCAL_ENDPOINTS` map (same-node bypass candidates).
fn local_endpoints(pins: &Path) -> Vec<Ipv4Addr> {
    let path = pins.join("maps/LOCAL_ENDPOINTS");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool map dump {}", path.display());
    let entries: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    entries
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            // The key is `EndpointKey`: the address bytes in network order first.
            let bytes: Vec<u8> = e["key"]
                .as_array()
                .expect("raw key bytes")
                .iter()
                .map(|b| {
                    u8::from_str_radix(b.as_str().unwrap_or_default().trim_start_matches("0x"), 16)
                        .expect("hex byte")
                })
                .collect();
            Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
        })
        .collect()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario per kube-proxy rule, read top to bottom"
)]
fn agent_applies_kube_proxy_semantics() {
    let Some(_k) = mesh_tests::kernel_test("kubernetes_semantics") else {
        return;
    };
    let mut h = Harness::new("kubernetes_semantics");
    // Same-node bypass is opt-in; on here, so part 7 can show which pods become candidates.
    h.agent
        .env
        .push(("MESH_BYPASS".to_owned(), "true".to_owned()));
    let node_a = h.node();
    let node_b = h.cluster.add_node("b").expect("node b");
    let client = h.cluster.add_pod(&node_a, "client").expect("client pod");
    let (local, _local_servers) =
        mesh_tests::meshpod::backend_pods(&h.cluster, &node_a, "a", 2, 80).expect("pods on a");
    let (remote, _remote_servers) =
        mesh_tests::meshpod::backend_pods(&h.cluster, &node_b, "b", 1, 80).expect("pod on b");
    let (a0, a1, b0) = (&local[0], &local[1], &remote[0]);
    // a0 also serves port 8080, under another name, for the named-port case.
    let _a0_8080: PodChild = a0
        .serve("a0-8080", &[SocketAddr::new(a0.ipv4().into(), 8080)], &[])
        .expect("a0 on 8080");

    let vip = |n: u8| Ipv4Addr::new(10, 96, 1, n);
    let at = |n: u8| SocketAddr::from((vip(n), 80));
    let namespaces: Api<Namespace> = Api::all(h.kube.clone());
    let nodes: Api<Node> = Api::all(h.kube.clone());
    let services: Api<Service> = h.namespaced();
    let slices: Api<EndpointSlice> = h.namespaced();
    let pods: Api<Pod> = h.namespaced();
    let none = json!({});
    let ready = |p: &PodHandle, node: &str| endpoint(p, node, &none);
    let terminating = |p: &PodHandle, node: &str, serving: bool| {
        endpoint(
            p,
            node,
            &json!({ "conditions": { "ready": false, "serving": serving, "terminating": true } }),
        )
    };
    let zoned = |p: &PodHandle, node: &str, zone: &str, hint: Option<&str>| {
        let mut extra = json!({ "zone": zone });
        if let Some(hint) = hint {
            extra["hints"] = json!({ "forZones": [{ "name": hint }] });
        }
        endpoint(p, node, &extra)
    };

    h.create(&namespaces, namespace_object());
    for (name, zone) in [("a", "z1"), ("b", "z2")] {
        h.create(
            &nodes,
            json!({ "metadata": { "name": name, "labels": { ZONE_LABEL: zone } } }),
        );
    }
    // Pods of node a, and a host-network pod whose address is the node's.
    for p in [&client, a0, a1] {
        h.create(&pods, pod_object(p.name(), p.ipv4(), "a", false));
    }
    h.create(&pods, pod_object("hostnet", node_a.ipv4(), "a", true));
    h.create(&pods, pod_object(b0.name(), b0.ipv4(), "b", false));

    // 1: rollout — the only endpoint is terminating but still serving; b0 is not ready.
    h.create(&services, service_object("rollout", vip(1), &none, &none));
    let not_ready = endpoint(
        b0,
        "b",
        &json!({ "conditions": { "ready": false, "serving": false, "terminating": false } }),
    );
    h.create(
        &slices,
        slice_object(
            "rollout-1",
            "rollout",
            &[terminating(a0, "a", true), not_ready.clone()],
            &http_port(),
        ),
    );
    // 2: internalTrafficPolicy Local — ready endpoints on both nodes.
    h.create(
        &services,
        service_object(
            "local",
            vip(2),
            &json!({ "internalTrafficPolicy": "Local" }),
            &none,
        ),
    );
    h.create(
        &slices,
        slice_object(
            "local-1",
            "local",
            &[ready(a1, "a"), ready(b0, "b")],
            &http_port(),
        ),
    );
    // 3: a named target port: the slice lists `http` on 8080; the Service's number is 80.
    let mut named = service_object("named", vip(3), &none, &none);
    named["spec"]["ports"][0]["targetPort"] = json!("web");
    h.create(&services, named);
    let port_8080 = json!([{ "name": "http", "port": 8080, "protocol": "TCP" }]);
    h.create(
        &slices,
        slice_object("named-1", "named", &[ready(a0, "a")], &port_8080),
    );
    // 4: zone hints written by the EndpointSlice controller.
    h.create(&services, service_object("zonal", vip(4), &none, &none));
    h.create(
        &slices,
        slice_object(
            "zonal-1",
            "zonal",
            &[
                zoned(a0, "a", "z1", Some("z1")),
                zoned(b0, "b", "z2", Some("z2")),
            ],
            &http_port(),
        ),
    );
    // 5: PreferClose without hints (no controller wrote them): the agent prefers this zone.
    h.create(
        &services,
        service_object(
            "close",
            vip(5),
            &json!({ "trafficDistribution": "PreferClose" }),
            &none,
        ),
    );
    h.create(
        &slices,
        slice_object(
            "close-1",
            "close",
            &[zoned(a1, "a", "z1", None), zoned(b0, "b", "z2", None)],
            &http_port(),
        ),
    );
    // 6: a Service another proxy implements, and a headless one: never watched.
    let other_proxy = json!({ "service.kubernetes.io/service-proxy-name": "other-proxy" });
    h.create(
        &services,
        service_object("other", vip(6), &none, &other_proxy),
    );
    let mut other_slice = slice_object("other-1", "other", &[ready(a0, "a")], &http_port());
    other_slice["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] =
        json!("other-proxy");
    h.create(&slices, other_slice);
    let mut headless = service_object("headless", vip(7), &none, &none);
    headless["spec"]["clusterIP"] = json!("None");
    headless["spec"]["clusterIPs"] = json!(["None"]);
    h.create(&services, headless);
    let mut headless_slice =
        slice_object("headless-1", "headless", &[ready(a0, "a")], &http_port());
    headless_slice["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    h.create(&slices, headless_slice);

    h.agent
        .start()
        .expect("mesh-agent --kubernetes becomes ready");
    let fail_fast = ["--timeout-ms", "300"];
    let unreachable = |r: &HitReport| r.errors.get("EHOSTUNREACH").copied() == Some(20);

    // The initial state is streamed (KEP-3157) from the watch cache, with kube-proxy's selector
    // on Services and slices: no list request at all, each stream ended by its
    // initial-events-end bookmark.
    let requests = h.kmock.requests();
    for (path, selector) in [
        ("/api/v1/services", ("labelSelector", PROXY_LABEL_SELECTOR)),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            ("labelSelector", PROXY_LABEL_SELECTOR),
        ),
        ("/api/v1/nodes", ("fieldSelector", "metadata.name=a")),
        // Every node's pods (tunnel destinations' identities and nodes), from the cache.
        ("/api/v1/pods", ("resourceVersion", "0")),
        ("/api/v1/namespaces", ("resourceVersion", "0")),
        (
            "/apis/traffic.kernmesh.io/v1alpha1/trafficpolicies",
            ("resourceVersion", "0"),
        ),
    ] {
        let stream = requests
            .iter()
            .find(|r| {
                r["phase"] == "request"
                    && r["path"] == path
                    && r["params"]["sendInitialEvents"] == "true"
            })
            .unwrap_or_else(|| panic!("no streaming list of {path}: {requests:?}"));
        assert_eq!(stream["params"]["resourceVersion"], "0", "{stream}");
        assert_eq!(
            stream["params"]["resourceVersionMatch"], "NotOlderThan",
            "{stream}"
        );
        assert_eq!(stream["params"][selector.0], selector.1, "{stream}");
        assert!(
            requests
                .iter()
                .any(|r| r["phase"] == "initial-events-end" && r["path"] == path),
            "no initial-events-end bookmark sent for {path}: {requests:?}"
        );
        assert!(
            !requests.iter().any(|r| r["method"] == "GET"
                && r["path"] == path
                && r["params"].get("watch").is_none()),
            "{path} was listed although streaming lists are served: {requests:?}"
        );
    }
    assert!(
        !h.agent.stderr().contains("does not serve streaming lists"),
        "no fallback against a server with streaming lists"
    );

    // 1: the terminating-but-serving endpoint keeps the service working.
    let r = client.hit(at(1), 20, &[]).expect("hit");
    assert_eq!(
        count(&r, "a0"),
        20,
        "serving+terminating used with none ready: {r:?}"
    );
    // A ready endpoint appears: only it is used.
    h.patch(
        &slices,
        "rollout-1",
        endpoints_patch(&[terminating(a0, "a", true), ready(b0, "b")], &http_port()),
    );
    h.hit_until(&client, at(1), "ready endpoint preferred", &[], &|r| {
        count(r, "b0") == 20
    });
    // Nothing serving: the connect fails at once, as with no endpoints.
    h.patch(
        &slices,
        "rollout-1",
        endpoints_patch(&[terminating(a0, "a", false), not_ready], &http_port()),
    );
    h.hit_until(&client, at(1), "nothing serving", &fail_fast, &unreachable);

    // 2: Local: only this node's endpoint, never the remote one ...
    let r = client.hit(at(2), 20, &[]).expect("hit");
    assert_eq!(count(&r, "a1"), 20, "only the local endpoint: {r:?}");
    // ... and none here means failure, not fallback.
    h.patch(
        &slices,
        "local-1",
        endpoints_patch(&[ready(b0, "b")], &http_port()),
    );
    h.hit_until(
        &client,
        at(2),
        "no local endpoint",
        &fail_fast,
        &unreachable,
    );
    h.patch(
        &services,
        "local",
        json!({ "spec": { "internalTrafficPolicy": "Cluster" } }),
    );
    h.hit_until(&client, at(2), "Cluster policy reaches b0", &[], &|r| {
        count(r, "b0") == 20
    });

    // 3: the endpoint's port is the slice's (8080), not the Service's number.
    let r = client.hit(at(3), 20, &[]).expect("hit");
    assert_eq!(count(&r, "a0-8080"), 20, "slice port used: {r:?}");
    // A slice port of another name: the endpoint does not serve `http` at all, even though a0
    // listens on the Service's targetPort number 80.
    h.patch(
        &slices,
        "named-1",
        endpoints_patch(
            &[ready(a0, "a")],
            &json!([{ "name": "metrics", "port": 80, "protocol": "TCP" }]),
        ),
    );
    h.hit_until(
        &client,
        at(3),
        "port of another name",
        &fail_fast,
        &unreachable,
    );
    // The right name with another protocol does not serve it either.
    h.patch(
        &slices,
        "named-1",
        endpoints_patch(
            &[ready(a0, "a")],
            &json!([{ "name": "http", "port": 8080, "protocol": "UDP" }]),
        ),
    );
    std::thread::sleep(Duration::from_secs(1));
    let r = client.hit(at(3), 20, &fail_fast).expect("hit");
    assert!(
        unreachable(&r),
        "a UDP slice port does not serve a TCP service port: {r:?}"
    );

    // 5 (before the zone changes): PreferClose keeps traffic in zone z1.
    let r = client.hit(at(5), 20, &[]).expect("hit");
    assert_eq!(count(&r, "a1"), 20, "PreferClose: same zone only: {r:?}");
    // 4: zone hints: this node is in z1, so only a0 (hinted for z1) ...
    let r = client.hit(at(4), 20, &[]).expect("hit");
    assert_eq!(count(&r, "a0"), 20, "zone hints followed: {r:?}");
    // ... the Node moves to z2 (the agent watches its Node): only b0 ...
    h.patch(
        &nodes,
        "a",
        json!({ "metadata": { "labels": { ZONE_LABEL: "z2" } } }),
    );
    h.hit_until(&client, at(4), "zone z2", &[], &|r| count(r, "b0") == 20);
    // ... a zone no endpoint is hinted for: every endpoint.
    h.patch(
        &nodes,
        "a",
        json!({ "metadata": { "labels": { ZONE_LABEL: "z9" } } }),
    );
    h.hit_until(&client, at(4), "no endpoint for zone z9", &[], &|r| {
        r.ok() == 20 && count(r, "a0") > 0 && count(r, "b0") > 0
    });

    // 6: the other proxy's and the headless Service are not programmed ...
    let programmed = h.services();
    assert!(
        !programmed.contains_key("other") && !programmed.contains_key("headless"),
        "{programmed:?}"
    );
    assert!(programmed.contains_key("rollout"), "{programmed:?}");
    let r = client.hit(at(6), 5, &fail_fast).expect("hit");
    assert_eq!(r.ok(), 0, "another proxy's cluster IP is not ours: {r:?}");
    // ... until the label goes: the watch (through its selector) then delivers them.
    let unlabel = json!({ "metadata": { "labels": {
        "service.kubernetes.io/service-proxy-name": null,
    } } });
    h.patch(&services, "other", unlabel.clone());
    h.patch(&slices, "other-1", unlabel);
    h.hit_until(&client, at(6), "unlabelled service", &[], &|r| {
        count(r, "a0") == 20
    });

    // 7: the host-network pod (the node's address) is not a same-node bypass endpoint.
    let mut bypass = local_endpoints(&h.agent.pins);
    bypass.sort_unstable();
    let mut want = vec![client.ipv4(), a0.ipv4(), a1.ipv4()];
    want.sort_unstable();
    assert_eq!(
        bypass,
        want,
        "node address {} must not be there",
        node_a.ipv4()
    );
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

    let work = std::env::temp_dir().join("kubernetes_policy_status");
    std::fs::create_dir_all(&work).expect("work dir");
    let kmock = Kmock::start(&work, None).expect("kmock API stand-in");
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
