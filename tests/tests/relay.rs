//! The relay end to end (issue 11): two real agents on two harness nodes serve their flows on
//! mTLS with certificates from the real mesh CA (`mesh-agent ca --kubernetes`, its
//! `TokenReview`s answered by the kmock API stand-in running on node a): each agent's for its
//! own pod (`…/sa/mesh-agent`), the relay's by the CA's relay rule (`…/sa/mesh-relay`).
//! `mesh-agent relay` follows both and serves them merged, so `meshctl --server` (`flows`,
//! `top`, `map`, `status`) sees the whole cluster; a relay with a certificate from another CA
//! (file mode) is refused by the agents, and so is an impostor holding a workload certificate
//! of the mesh CA with another id; the live map page, rendered by headless Chromium, shows the
//! expected nodes and edges (read from its DOM) and the test saves a screenshot under `target/`.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Cluster, NodeHandle, PodChild, PodHandle,
    agent::{AgentProcess, workspace_binary, write_atomically},
};
use serde_json::Value;

const WEB: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
const DOWN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11)), 80);
const RELAY: &str = "127.0.0.1:4245";
const ROGUE_RELAY: &str = "127.0.0.1:4246";
const IMPOSTOR_RELAY: &str = "127.0.0.1:4247";
const RELAY_ID: &str = "spiffe://cluster.local/ns/mesh-system/sa/mesh-relay";
const IMPOSTOR_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const WEB_PAGE: &str = "127.0.0.1:8081";
const FROM_CLIENT: usize = 10;
const FROM_BATCH: usize = 6;
const REFUSED: usize = 3;

/// `down` ejects its only backend after two refusals, so its circuit opens during the test.
const POLICY: &str = "policies:
  - apiVersion: traffic.kernmesh.io/v1alpha1
    kind: TrafficPolicy
    metadata: { name: down }
    spec:
      targetRefs: [{ group: \"\", kind: Service, name: down }]
      outlierDetection: { consecutiveFailures: 2, baseEjectionTime: 300s, maxEjectionPercent: 100, healthyPanicThreshold: 0 }
";

/// A CA under `dir/name` signing a server certificate for the agents and a client one for the
/// relay (`<name>-agent.{crt,key}`, `<name>-relay.{crt,key}`).
fn pki(dir: &Path, name: &str) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} root"));
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let ca_file = dir.join(format!("{name}-ca.crt"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    for (who, san) in [
        ("agent", "flows.mesh-system.svc"),
        ("relay", "relay.mesh-system.svc"),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![san.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join(format!("{name}-{who}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-{who}.key")), key.serialize_pem()).unwrap();
    }
}

fn model(node: &str, pods: &[(&PodHandle, &str)]) -> String {
    let mut pod_list = String::new();
    for (p, n) in pods {
        let _ = writeln!(
            pod_list,
            "  - {{ name: {}, node: {n}, serviceAccount: {}, ips: [{}] }}",
            p.name(),
            p.name(),
            p.ipv4()
        );
    }
    let endpoint = |name: &str| {
        let (p, n) = pods.iter().find(|(p, _)| p.name() == name).unwrap();
        format!(
            "      - {{ ip: {}, node: {n}, pod: {} }}\n",
            p.ipv4(),
            p.name()
        )
    };
    format!(
        "node: {node}\nservices:\n  - name: web\n    clusterIPs: [{}]\n    ports:\n      - {{ name: tcp, port: 80 }}\n    endpoints:\n{}{}  - name: down\n    clusterIPs: [{}]\n    ports:\n      - {{ name: tcp, port: 80 }}\n    endpoints:\n{}pods:\n{pod_list}{POLICY}",
        WEB.ip(),
        endpoint("web-0"),
        endpoint("web-1"),
        DOWN.ip(),
        endpoint("idle"),
    )
}

/// Polls `f` until it returns `Some` (at most `limit`).
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<Option<T>, String>) -> T {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(e) => last = e,
        }
        assert!(
            start.elapsed() < limit,
            "timed out waiting for {what}: {last}"
        );
        thread::sleep(Duration::from_millis(300));
    }
}

/// `meshctl --server SERVER ARGS` run in node `a`.
fn meshctl(a: &NodeHandle, server: &str, args: &[&str]) -> Output {
    let mut cmd = a.command(workspace_binary("meshctl").unwrap());
    cmd.args(["--server", server]).args(args);
    cmd.output().unwrap()
}

fn meshctl_json(a: &NodeHandle, server: &str, args: &[&str]) -> Result<Value, String> {
    let out = meshctl(a, server, &[args, &["-o", "json"]].concat());
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// `mesh-agent relay` in node `a` following both agents, with its credentials in `tls`.
fn relay(a: &NodeHandle, b: &NodeHandle, tls: &[String], listen: &str, web: &str) -> PodChild {
    let mut cmd = a.command(workspace_binary("mesh-agent").unwrap());
    cmd.arg("relay")
        .arg("--agents")
        .arg(format!("{}:4244,{}", a.ipv4(), b.ipv4()))
        .args(tls)
        .args(["--listen", listen, "--web-listen", web])
        .env("RUST_LOG", "info");
    a.spawn(cmd).expect("starting the relay")
}

/// File mode: the relay's certificate of PKI `name`.
fn file_tls(dir: &Path, name: &str) -> Vec<String> {
    let file = |f: String| dir.join(f).display().to_string();
    vec![
        "--tls-cert".into(),
        file(format!("{name}-relay.crt")),
        "--tls-key".into(),
        file(format!("{name}-relay.key")),
        "--tls-ca".into(),
        file(format!("{name}-ca.crt")),
    ]
}

/// The mesh CA on node a, and how to reach it.
struct MeshCa {
    _kmock: PodChild,
    url: String,
    process: PodChild,
    address: String,
    server_name: String,
    root: PathBuf,
}

impl MeshCa {
    /// kmock (the API server: pods and `TokenReview`) and `mesh-agent ca --kubernetes`, both in
    /// node a (the harness's nodes have no route to the host) on `pods`.
    fn start(a: &NodeHandle, work: &Path, pods: &[(&str, &str, &str, &str)]) -> Self {
        mesh_tests::kmock::ensure_kmock().unwrap();
        let preload = work.join("kmock-objects.jsonl");
        let lines: Vec<String> = pods
            .iter()
            .map(|(ns, name, node, sa)| {
                serde_json::json!({"resource": "v1/pods", "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []}
                }})
                .to_string()
            })
            .collect();
        std::fs::write(&preload, lines.join("\n")).unwrap();
        let mut cmd = a.command("python3");
        cmd.arg(mesh_tests::workspace_root().join("tests/kmock/server.py"))
            .args(["--port", "0", "--preload"])
            .arg(&preload);
        let mut kmock = a.spawn(cmd).expect("starting kmock");
        let url = kmock
            .wait_for_line(|l| l.starts_with("ready "), Duration::from_mins(1))
            .unwrap()
            .trim_start_matches("ready ")
            .to_owned();
        let kubeconfig = work.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kmock\n  cluster: {{ server: \"{url}\" }}\ncontexts:\n- name: kmock\n  context: {{ cluster: kmock, user: test }}\ncurrent-context: kmock\nusers:\n- name: test\n  user: {{}}\n"
            ),
        )
        .unwrap();
        let address = format!("{}:15012", a.ipv4());
        let ca_dir = work.join("ca");
        let mut cmd = a.command(workspace_binary("mesh-agent").unwrap());
        cmd.args([
            "ca",
            "--kubernetes",
            "--listen",
            &address,
            "--metrics-addr",
            "none",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--dir")
        .arg(&ca_dir)
        .args(["--server-name", &a.ipv4().to_string()])
        .env("RUST_LOG", "info");
        let mut process = a.spawn(cmd).expect("starting the CA");
        process
            .wait_for_line(|l| l.starts_with("listening"), Duration::from_secs(20))
            .unwrap();
        Self {
            _kmock: kmock,
            url,
            process,
            address,
            server_name: a.ipv4().to_string(),
            root: ca_dir.join("ca-cert.pem"),
        }
    }

    /// A token of `ns/sa` bound to pod `ns/pod` for the CA's audience, minted the kubelet's way
    /// (`TokenRequest`, from node a), written to `work/token-<pod>`.
    fn token(&self, a: &NodeHandle, work: &Path, ns: &str, sa: &str, pod: &str) -> PathBuf {
        let url = &self.url;
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": ["kernmesh-ca"], "expirationSeconds": 3600,
                     "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod}}
        });
        let mut cmd = a.command("curl");
        cmd.args([
            "-sS",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(body.to_string())
        .arg(format!(
            "{url}/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"
        ));
        let out = a.output(cmd).unwrap();
        let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "TokenRequest: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let token = reply["status"]["token"]
            .as_str()
            .expect("a token")
            .to_owned();
        let file = work.join(format!("token-{pod}"));
        std::fs::write(&file, token).unwrap();
        file
    }

    /// Mesh CA mode flags for a relay with `token` asking for `id` as pod `pod`.
    fn relay_tls(&self, token: &Path, id: &str, pod: &str) -> Vec<String> {
        vec![
            "--ca-address".into(),
            self.address.clone(),
            "--ca-server-name".into(),
            self.server_name.clone(),
            "--ca-root-file".into(),
            self.root.display().to_string(),
            "--ca-token-file".into(),
            token.display().to_string(),
            "--relay-id".into(),
            id.into(),
            "--pod-name".into(),
            pod.into(),
        ]
    }
}

fn edge<'v>(map: &'v Value, source: &str, destination: &str) -> Option<&'v Value> {
    map["edges"]
        .as_array()?
        .iter()
        .find(|e| e["source"] == source && e["destination"] == destination)
}

fn errors(e: &Value) -> u64 {
    e["errors"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one story: agents, relays, traffic, meshctl cluster-wide, the page in Chromium"
)]
fn relay_merges_both_agents_flows_over_mtls_and_the_web_map_shows_them() {
    let Some(_k) = mesh_tests::kernel_test("relay_two_agents") else {
        return;
    };
    let cluster = Cluster::new("relay_two_agents").unwrap();
    let a = cluster.add_node("a").unwrap();
    let b = cluster.add_node("b").unwrap();
    let client = cluster.add_pod(&a, "client").unwrap();
    let batch = cluster.add_pod(&b, "batch").unwrap();
    let web0 = cluster.add_pod(&a, "web-0").unwrap();
    let web1 = cluster.add_pod(&b, "web-1").unwrap();
    let idle = cluster.add_pod(&b, "idle").unwrap();
    let _servers: Vec<PodChild> = [&web0, &web1]
        .iter()
        .map(|p| {
            p.serve(p.name(), &[SocketAddr::new(IpAddr::V4(p.ipv4()), 80)], &[])
                .unwrap()
        })
        .collect();
    let pins = cluster.bpffs_dir().unwrap();
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).unwrap();
    pki(&work, "rogue");
    let ca = MeshCa::start(
        &a,
        &work,
        &[
            ("mesh-system", "mesh-agent-a", "a", "mesh-agent"),
            ("mesh-system", "mesh-agent-b", "b", "mesh-agent"),
            ("mesh-system", "mesh-relay-0", "a", "mesh-relay"),
            ("default", "client", "a", "client"),
        ],
    );
    let pods = [
        (&client, "a"),
        (&batch, "b"),
        (&web0, "a"),
        (&web1, "b"),
        (&idle, "b"),
    ];
    let mut agents = Vec::new();
    for node in [&a, &b] {
        let config = work.join(format!("mesh-{}.yaml", node.name()));
        write_atomically(&config, &model(node.name(), &pods)).unwrap();
        let mut agent = AgentProcess::new(
            node.clone(),
            config,
            pins.join(node.name()),
            work.join(format!("admin-{}.sock", node.name())),
        );
        // As the DaemonSet: the CA's address, bundle and a token bound to the agent's own pod,
        // the pod's name from the downward API, and the flow API turned on.
        let pod = format!("mesh-agent-{}", node.name());
        let token = ca.token(&a, &work, "mesh-system", "mesh-agent", &pod);
        agent.env.extend([
            (
                "MESH_FLOW_API_LISTEN".into(),
                format!("{}:4244", node.ipv4()),
            ),
            ("MESH_CA_ADDRESS".into(), ca.address.clone()),
            ("MESH_CA_SERVER_NAME".into(), ca.server_name.clone()),
            ("MESH_CA_ROOT_FILE".into(), ca.root.display().to_string()),
            ("MESH_CA_TOKEN_FILE".into(), token.display().to_string()),
            ("POD_NAME".into(), pod),
        ]);
        agent.start().unwrap();
        agents.push(agent);
    }
    let relay_token = ca.token(&a, &work, "mesh-system", "mesh-relay", "mesh-relay-0");
    let _relay = relay(
        &a,
        &b,
        &ca.relay_tls(&relay_token, RELAY_ID, "mesh-relay-0"),
        RELAY,
        WEB_PAGE,
    );
    let _rogue_relay = relay(&a, &b, &file_tls(&work, "rogue"), ROGUE_RELAY, "none");
    // A certificate the mesh CA did sign, for pod `client`'s id, asked with node a's agent token
    // (what a compromised node could get): it chains to the mesh roots but is not the relay.
    let node_a_token = work.join("token-mesh-agent-a");
    let mut impostor = relay(
        &a,
        &b,
        &ca.relay_tls(&node_a_token, IMPOSTOR_ID, "client"),
        IMPOSTOR_RELAY,
        "none",
    );

    // Both agents followed: one source per agent, named by its node.
    let status = wait_for(
        "the relay to follow both agents",
        Duration::from_secs(20),
        || {
            let s = meshctl_json(&a, RELAY, &["status"])?;
            let running = s["sources"]
                .as_array()
                .map_or(0, |v| v.iter().filter(|x| x["state"] == "running").count());
            Ok((running == 2).then_some(s))
        },
    );
    let names: Vec<&str> = status["sources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("a (")) && names.iter().any(|n| n.starts_with("b (")),
        "{status}"
    );
    assert_eq!(status["ready"], true, "{status}");

    // Real connections through the kernel of each node.
    let r = client.hit(WEB, FROM_CLIENT, &[]).unwrap();
    assert_eq!(r.ok(), FROM_CLIENT as u64, "{r:?}");
    let r = batch.hit(WEB, FROM_BATCH, &[]).unwrap();
    assert_eq!(r.ok(), FROM_BATCH as u64, "{r:?}");
    let r = client.hit(DOWN, REFUSED, &[]).unwrap();
    assert_eq!(r.ok(), 0, "nothing listens in idle: {r:?}");

    // The cluster-wide map through the relay: exact attempts per workload → service pair,
    // node a's client and node b's batch in one graph.
    let map = wait_for("the merged map", Duration::from_secs(20), || {
        let m = meshctl_json(&a, RELAY, &["map", "--window", "10m"])?;
        let done = edge(&m, "default/client", "default/web")
            .is_some_and(|e| e["attempts"] == FROM_CLIENT)
            && edge(&m, "default/batch", "default/web")
                .is_some_and(|e| e["attempts"] == FROM_BATCH)
            && edge(&m, "default/client", "default/down")
                .is_some_and(|e| errors(e) == REFUSED as u64)
            && m["nodes"].as_array().is_some_and(|n| {
                n.iter()
                    .any(|n| n["id"] == "default/down" && n["open_circuits"] == 1)
            });
        Ok(done.then_some(m))
    });
    let down = edge(&map, "default/client", "default/down").unwrap();
    assert_eq!(down["attempts"], REFUSED, "{down}");
    assert!(
        down["errors"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k == "refused" || k.starts_with("reject:")),
        "refused at connect, or rejected once the circuit opened: {down}"
    );
    let web = edge(&map, "default/client", "default/web").unwrap();
    assert_eq!(
        (errors(web), &web["opened"]),
        (0, &Value::from(FROM_CLIENT)),
        "{web}"
    );

    // `flows` through the relay carries the node each flow came from.
    let out = meshctl(&a, RELAY, &["flows", "--verdict", "open", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let from = |node: &str, pod: &str| {
        flows
            .iter()
            .filter(|f| f["node"] == node && f["source_pod"] == pod)
            .count()
    };
    assert_eq!(
        (from("a", "client"), from("b", "batch")),
        (FROM_CLIENT, FROM_BATCH),
        "{flows:?}"
    );

    // `top` lists the busiest pair first and the failing one.
    let out = meshctl(&a, RELAY, &["top", "--window", "10m"]);
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (busiest, failing) = top.split_once("FAILING").unwrap();
    let first = busiest.lines().nth(2).unwrap_or_default();
    assert!(
        first.starts_with("default/client") && first.contains("default/web"),
        "{top}"
    );
    assert!(
        failing.contains("default/down") && !failing.contains("default/web"),
        "{top}"
    );

    // The rogue relay's certificate chains to another CA: the agents refuse it (and it
    // refuses theirs), so it never gets a flow.
    let rogue = meshctl_json(&a, ROGUE_RELAY, &["status"]).unwrap();
    assert_eq!(rogue["ready"], false, "{rogue}");
    for s in rogue["sources"].as_array().unwrap() {
        assert_eq!(s["state"], "down", "{rogue}");
        assert!(s["restarts"].as_u64().unwrap() >= 1, "{rogue}");
    }
    // The impostor holds a mesh certificate with another id: refused by both agents for it.
    let impostor_status = wait_for(
        "the impostor to be refused by both agents",
        Duration::from_secs(20),
        || {
            let s = meshctl_json(&a, IMPOSTOR_RELAY, &["status"])?;
            let refused = s["sources"].as_array().is_some_and(|v| {
                v.len() == 2
                    && v.iter()
                        .all(|x| x["state"] == "down" && x["restarts"].as_u64() >= Some(1))
            });
            Ok(refused.then_some(s))
        },
    );
    assert_eq!(impostor_status["ready"], false, "{impostor_status}");
    let refusal = format!("client identity {IMPOSTOR_ID} is not the expected {RELAY_ID}");
    for agent in &agents {
        let log = agent.stderr();
        assert!(
            log.contains(&refusal),
            "the agent's log lacks {refusal:?}: {log}"
        );
    }
    let impostor_log = impostor.stderr_text();
    assert!(
        impostor_log.contains("certificate received"),
        "the impostor got its certificate from the CA: {impostor_log}"
    );
    impostor.kill();
    let ca_log = ca.process.stderr_text();
    assert!(
        ca_log.lines().any(|l| l.contains("certificate signed")
            && l.contains("relay mesh-system/mesh-relay")
            && l.contains(RELAY_ID)),
        "the CA signed the relay's certificate by its relay rule: {ca_log}"
    );
    let rogue_flows = meshctl(&a, ROGUE_RELAY, &["flows"]);
    assert_eq!(
        String::from_utf8_lossy(&rogue_flows.stdout).lines().count(),
        1,
        "header only"
    );

    // The web page in headless Chromium: the rendered DOM has the nodes and edges.
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/relay");
    std::fs::create_dir_all(&target).unwrap();
    let url = format!("http://{WEB_PAGE}/?window=600");
    let chromium = |extra: &[String]| {
        let mut cmd = a.command("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--window-size=1000,700",
        ])
        .arg(format!(
            "--user-data-dir={}",
            work.join("chromium").display()
        ))
        .args(extra)
        .arg(&url);
        cmd.output()
            .expect("chromium is installed (cargo xtask install-deps installs Debian's chromium)")
    };
    let dom = chromium(&["--dump-dom".to_owned()]);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    std::fs::write(target.join("map.html"), &dom).unwrap();
    for needle in [
        format!("class=\"edge\" data-source=\"default/client\" data-destination=\"default/web\" data-attempts=\"{FROM_CLIENT}\" data-errors=\"0\""),
        format!("class=\"edge\" data-source=\"default/batch\" data-destination=\"default/web\" data-attempts=\"{FROM_BATCH}\" data-errors=\"0\""),
        format!("class=\"edge error\" data-source=\"default/client\" data-destination=\"default/down\" data-attempts=\"{REFUSED}\" data-errors=\"{REFUSED}\""),
        "data-id=\"default/client\" data-kind=\"workload\"".to_owned(),
        "data-id=\"default/batch\" data-kind=\"workload\"".to_owned(),
        "class=\"node service\" data-id=\"default/web\" data-kind=\"service\" data-open-circuits=\"0\"".to_owned(),
        "class=\"node service circuit-open\" data-id=\"default/down\" data-kind=\"service\" data-open-circuits=\"1\"".to_owned(),
        "default/down (1 open circuit)".to_owned(),
        "<tr class=\"error\"><td>default/client</td><td>default/down</td>".to_owned(),
    ] {
        assert!(dom.contains(&needle), "the rendered page lacks {needle}:\n{dom}");
    }
    let shot = target.join("relay-map.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(&[format!("--screenshot={}", shot.display())]);
    assert!(
        shot.metadata().is_ok_and(|m| m.len() > 1000),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(agents);
}
