//! Enrollment, peer authentication and authorization policy objects, read by the real agent:
//!
//! - `agent_reads_security_objects_from_kubernetes`: against the Kubernetes API stand-in (kmock),
//!   the real `mesh-agent --kubernetes` picks up the namespace's enrollment label, a pod's and a
//!   service's opt-out labels, a `PeerAuthentication` and an `AuthorizationPolicy`; `meshctl
//!   policies` shows each pod's identity, mode and selecting policies; an invalid edit (an L7
//!   field) is rejected with object, field and reason in `meshctl status` while the last valid
//!   version keeps applying; fixing it clears the rejection.
//! - `agent_reads_security_objects_from_the_file`: the same objects through the static file; a
//!   bad one rejects the file with `file:line:col` and the last good file keeps serving.
//!
//! Enforcement (HBONE inbound, the kernel's same-node verdicts) is tested where it is built.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use mesh_agent::{
    authz::types::{AuthorizationPolicy, PeerAuthentication},
    discovery::kubernetes::{
        k8s_openapi::api::core::v1::{Namespace, Pod, Service},
        kube::{
            self, Api,
            api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
        },
    },
};
use mesh_tests::{Cluster, agent::AgentProcess, kmock::Kmock};
use serde_json::{Value, json};

const NS: &str = "shop";
const NODE: &str = "a";
const CONVERGE: Duration = Duration::from_secs(20);

/// `meshctl <args> -o json` until `ok` holds.
fn meshctl_until(
    agent: &AgentProcess,
    args: &[&str],
    what: &str,
    ok: &dyn Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let v = agent.meshctl_json(args).expect("meshctl");
        if ok(&v) {
            return v;
        }
        assert!(
            start.elapsed() < CONVERGE,
            "{what}: not reached in {CONVERGE:?}; last {v}\nagent log:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn workload<'a>(p: &'a Value, pod: &str) -> &'a Value {
    p["workloads"]
        .as_array()
        .and_then(|l| l.iter().find(|w| w["pod"] == pod))
        .unwrap_or(&Value::Null)
}

fn authz_policy(spec: &Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "security.kernmesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": "deny-other", "namespace": NS },
        "spec": spec,
    }))
    .expect("object")
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario, read top to bottom"
)]
fn agent_reads_security_objects_from_kubernetes() {
    let Some(_k) = mesh_tests::kernel_test("authz_kubernetes") else {
        return;
    };
    let cluster = Cluster::new("authz_kubernetes").expect("cluster");
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).expect("work dir");
    let kmock = Kmock::start(&work, None).expect("kmock API stand-in");
    let node = cluster.add_node(NODE).expect("node");
    let mut agent = AgentProcess::new(
        node,
        work.join("unused.yaml"),
        cluster.bpffs_dir().expect("bpffs").join(NODE),
        work.join("admin.sock"),
    );
    agent.kubeconfig = Some(kmock.kubeconfig(&work).expect("kubeconfig"));
    // As in its DaemonSet: the agent stands for election as the status writer.
    agent.env = vec![
        ("POD_NAMESPACE".to_owned(), "mesh-system".to_owned()),
        ("POD_NAME".to_owned(), "mesh-agent-a".to_owned()),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt
        .block_on(async {
            kube::Client::try_from(kube::Config::new(kmock.url.parse().expect("url")))
        })
        .expect("kube client");
    let create = |api: &Api<DynamicObject>, v: Value| {
        let obj: DynamicObject = serde_json::from_value(v).expect("object");
        rt.block_on(api.create(&PostParams::default(), &obj))
            .expect("create");
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    rt.block_on(namespaces.create(
        &PostParams::default(),
        &serde_json::from_value(json!({ "metadata": { "name": NS, "labels": { "kernmesh.io/dataplane-mode": "mesh" } } }))
            .expect("namespace"),
    ))
    .expect("create namespace");
    for (name, ip, labels) in [
        ("web-0", Ipv4Addr::new(10, 1, 0, 3), json!({ "app": "web" })),
        ("db-0", Ipv4Addr::new(10, 1, 0, 4), json!({ "app": "db" })),
        (
            "old-0",
            Ipv4Addr::new(10, 1, 0, 5),
            json!({ "app": "old", "kernmesh.io/dataplane-mode": "none" }),
        ),
    ] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": NS, "labels": labels },
            "spec": { "nodeName": NODE, "serviceAccountName": name.trim_end_matches("-0"), "containers": [] },
            "status": { "phase": "Running", "podIP": ip.to_string(), "podIPs": [{ "ip": ip.to_string() }] },
        }))
        .expect("pod");
        rt.block_on(pods.create(&PostParams::default(), &pod))
            .expect("create pod");
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": "legacy", "namespace": NS, "labels": { "kernmesh.io/dataplane-mode": "none" } },
        "spec": { "clusterIP": "10.96.0.40", "clusterIPs": ["10.96.0.40"], "ports": [{ "name": "http", "port": 80, "protocol": "TCP" }] },
    }))
    .expect("service");
    rt.block_on(services.create(&PostParams::default(), &svc))
        .expect("create service");
    let authz: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        NS,
        &ApiResource::erase::<AuthorizationPolicy>(&()),
    );
    let peers: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        NS,
        &ApiResource::erase::<PeerAuthentication>(&()),
    );
    create(
        &peers,
        json!({
            "apiVersion": "security.kernmesh.io/v1alpha1", "kind": "PeerAuthentication",
            "metadata": { "name": "db-strict", "namespace": NS },
            "spec": { "selector": { "matchLabels": { "app": "db" } }, "mtls": { "mode": "STRICT" } },
        }),
    );
    let deny = json!({
        "action": "DENY",
        "selector": { "matchLabels": { "app": "db" } },
        "rules": [{ "from": [{ "source": { "notNamespaces": [NS] } }] }],
    });
    rt.block_on(authz.create(&PostParams::default(), &authz_policy(&deny)))
        .expect("create AuthorizationPolicy");
    agent
        .start()
        .expect("mesh-agent --kubernetes becomes ready");

    // Enrollment, identities, modes and the selecting policy, as meshctl shows them.
    let p = meshctl_until(&agent, &["policies"], "security view", &|p| {
        workload(p, "shop/db-0")["deny_policies"][0] == "shop/deny-other"
    });
    let web = workload(&p, "shop/web-0");
    assert_eq!(web["enrolled"], true, "{p}");
    assert_eq!(
        web["identity"], "spiffe://cluster.local/ns/shop/sa/web",
        "{p}"
    );
    assert_eq!(
        (web["mtls_mode"].as_str(), web["mode_from"].as_str()),
        (Some("PERMISSIVE"), Some("default")),
        "{p}"
    );
    let db = workload(&p, "shop/db-0");
    assert_eq!(
        (db["mtls_mode"].as_str(), db["mode_from"].as_str()),
        (Some("STRICT"), Some("workload shop/db-strict")),
        "{p}"
    );
    assert_eq!(
        workload(&p, "shop/old-0")["not_enrolled"],
        "opted_out",
        "{p}"
    );
    let legacy = p["services"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["service"] == "shop/legacy"))
        .expect("legacy listed");
    assert_eq!(legacy["mesh_opt_out"], true, "{p}");
    let text = agent
        .meshctl(&["policies"])
        .expect("meshctl policies table");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("spiffe://cluster.local/ns/shop/sa/db") && text.contains("shop/deny-other"),
        "{text}"
    );

    // An edit adds an L7 field: rejected with object, field and reason; the last valid version
    // keeps applying (a DENY dropped for a typo would open what it closed).
    let mut bad = deny.clone();
    bad["rules"][0]["to"] = json!([{ "operation": { "methods": ["GET"] } }]);
    rt.block_on(authz.patch(
        "deny-other",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": bad })),
    ))
    .expect("patch");
    let want = "AuthorizationPolicy shop/deny-other: spec.rules[0].to[0].operation.methods: L7 \
                fields are not supported by this L4 policy (Istio ambient needs a waypoint proxy \
                for them); rejected as a whole";
    meshctl_until(&agent, &["status"], "rejection reported", &|s| {
        s["last_rejection"] == want
    });
    let p = agent.meshctl_json(&["policies"]).expect("policies");
    assert_eq!(
        workload(&p, "shop/db-0")["deny_policies"][0],
        "shop/deny-other",
        "last good kept: {p}"
    );
    let state = p["security"]
        .as_array()
        .and_then(|l| l.iter().find(|o| o["object"] == "shop/deny-other"))
        .expect("deny-other listed");
    assert_eq!(state["accepted"], false, "{p}");
    assert!(
        state["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("the last valid version still applies")),
        "{p}"
    );
    // The elected agent writes the rejection into the object's status.
    let condition = |api: &Api<DynamicObject>, name: &str, reason: &str| {
        let start = Instant::now();
        loop {
            let obj = rt.block_on(api.get(name)).expect("get");
            let c = obj.data["status"]["conditions"][0].clone();
            if c["reason"] == reason {
                return c;
            }
            assert!(
                start.elapsed() < CONVERGE,
                "{name}: no {reason} condition: {}\nagent log:\n{}",
                obj.data["status"],
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let c = condition(&authz, "deny-other", "Invalid");
    assert_eq!(
        (c["type"].as_str(), c["status"].as_str()),
        (Some("Accepted"), Some("False")),
        "{c}"
    );
    assert_eq!(c["message"], want, "{c}");
    let c = condition(&peers, "db-strict", "Accepted");
    assert_eq!(c["status"], "True", "{c}");

    // Fixed: the rejection clears.
    let mut fixed = deny.clone();
    fixed["rules"][0]["to"] = Value::Null;
    rt.block_on(authz.patch(
        "deny-other",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": fixed })),
    ))
    .expect("patch");
    meshctl_until(&agent, &["status"], "rejection cleared", &|s| {
        !s.to_string().contains("deny-other")
    });
    assert_eq!(
        condition(&authz, "deny-other", "Accepted")["status"],
        "True"
    );
}

#[test]
fn agent_reads_security_objects_from_the_file() {
    let Some(_k) = mesh_tests::kernel_test("authz_file") else {
        return;
    };
    let cluster = Cluster::new("authz_file").expect("cluster");
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).expect("work dir");
    let node = cluster.add_node(NODE).expect("node");
    let file = work.join("mesh.yaml");
    let good = "\
node: a
services:
  - { name: web, namespace: shop, clusterIPs: [10.96.0.50], ports: [{ port: 80 }] }
pods:
  - { name: web-0, namespace: shop, node: a, serviceAccount: web, ips: [10.1.0.3], labels: { app: web } }
namespaces:
  - { name: shop, dataplaneMode: mesh }
authorizationPolicies:
  - apiVersion: security.kernmesh.io/v1alpha1
    kind: AuthorizationPolicy
    metadata: { name: only-shop, namespace: shop }
    spec:
      rules: [{ from: [{ source: { namespaces: [shop] } }] }]
peerAuthentications:
  - apiVersion: security.kernmesh.io/v1alpha1
    kind: PeerAuthentication
    metadata: { name: default, namespace: mesh-system }
    spec: { mtls: { mode: STRICT } }
";
    mesh_tests::agent::write_atomically(&file, good).expect("write file");
    let mut agent = AgentProcess::new(
        node,
        file.clone(),
        cluster.bpffs_dir().expect("bpffs").join(NODE),
        work.join("admin.sock"),
    );
    agent
        .start()
        .expect("mesh-agent --config-file becomes ready");
    let p = meshctl_until(&agent, &["policies"], "security view", &|p| {
        workload(p, "shop/web-0")["allow_policies"][0] == "shop/only-shop"
    });
    let web = workload(&p, "shop/web-0");
    assert_eq!(
        web["identity"], "spiffe://cluster.local/ns/shop/sa/web",
        "{p}"
    );
    assert_eq!(
        (web["mtls_mode"].as_str(), web["mode_from"].as_str()),
        (Some("STRICT"), Some("mesh mesh-system/default")),
        "the root namespace's policy is mesh-wide: {p}"
    );
    // A bad edit rejects the file with file:line:col; the last good file keeps serving.
    mesh_tests::agent::write_atomically(
        &file,
        &good.replace("namespaces: [shop]", "namespaces: [\"a*b\"]"),
    )
    .expect("write file");
    let status = meshctl_until(&agent, &["status"], "file rejected", &|s| {
        s["last_rejection"]
            .as_str()
            .is_some_and(|r| r.contains("authorizationPolicies[0]"))
    });
    let r = status["last_rejection"].as_str().unwrap_or_default();
    assert!(
        r.starts_with(&format!("{}:9:5: authorizationPolicies[0]: AuthorizationPolicy shop/only-shop: spec.rules[0].from[0].source.namespaces[0]: \"a*b\" has a *", file.display())),
        "{r}"
    );
    let p = agent.meshctl_json(&["policies"]).expect("policies");
    assert_eq!(
        workload(&p, "shop/web-0")["allow_policies"][0],
        "shop/only-shop",
        "last good kept: {p}"
    );
}
