//! The agent binary as a user runs it, in a harness node: static-file discovery with precise
//! rejections, hitless SIGKILL restart (zero failed connections, changes made while down applied
//! on return), readiness, and `meshctl` over the admin socket.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Cluster, PodChild, PodHandle,
    agent::{AgentProcess, write_atomically},
};
use serde_json::Value;

const VIP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);

/// Waits until the agent reports a `last_rejection` containing `needle`.
fn rejection(agent: &AgentProcess, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let s = agent.meshctl_json(&["status"]).unwrap();
        let r = s["last_rejection"].as_str().unwrap_or_default().to_owned();
        if r.contains(needle) {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no rejection with {needle:?}; last: {r:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The static model: `web` (with `backends`) under a `TrafficPolicy` choosing `algorithm`
/// (`ROUND_ROBIN`, `RANDOM`, …), and `empty` with the defaults.
fn model(backends: &[&PodHandle], algorithm: &str) -> String {
    let endpoints: Vec<String> = backends
        .iter()
        .map(|p| {
            format!(
                "      - {{ ip: {}, node: a, pod: {} }}\n",
                p.ipv4(),
                p.name()
            )
        })
        .collect();
    format!(
        "node: a\nservices:\n  - name: web\n    clusterIPs: [{}]\n    ports:\n      - {{ name: http, port: 80 }}\n    endpoints:\n{}  - name: empty\n    clusterIPs: [10.96.0.11]\n    ports: [{{ port: 80 }}]\npods:\n  - {{ name: client, node: a, serviceAccount: frontend, ips: [10.1.0.2] }}\npolicies:\n  - apiVersion: traffic.kernmesh.io/v1alpha1\n    kind: TrafficPolicy\n    metadata: {{ name: web }}\n    spec:\n      targetRefs: [{{ kind: Service, name: web }}]\n      loadBalancer: {{ simple: {algorithm} }}\n",
        VIP.ip(),
        endpoints.concat()
    )
}

fn write(path: &Path, text: &str) {
    write_atomically(path, text).unwrap();
}

struct Setup {
    agent: AgentProcess,
    _servers: Vec<PodChild>,
    client: PodHandle,
    backends: Vec<PodHandle>,
    _cluster: Cluster,
}

fn setup(test: &str) -> Setup {
    let cluster = Cluster::new(test).unwrap();
    let node = cluster.add_node("a").unwrap();
    let client = cluster.add_pod(&node, "client").unwrap();
    let (backends, servers) =
        mesh_tests::meshpod::backend_pods(&cluster, &node, "web-", 3, 80).unwrap();
    let dir = cluster.bpffs_dir().unwrap();
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).unwrap();
    let config = work.join("mesh.yaml");
    write(
        &config,
        &model(&[&backends[0], &backends[1]], "ROUND_ROBIN"),
    );
    let agent = AgentProcess::new(node, config, dir.join("a"), work.join("admin.sock"));
    Setup {
        agent,
        _servers: servers,
        client,
        backends,
        _cluster: cluster,
    }
}

#[test]
fn static_file_drives_the_kernel_and_bad_files_change_nothing() {
    let Some(_k) = mesh_tests::kernel_test("agent_static_file") else {
        return;
    };
    let mut s = setup("agent_static_file");
    s.agent.start().unwrap();
    let r = s.client.hit(VIP, 20, &[]).unwrap();
    assert_eq!(
        (r.counts.get("web-0"), r.counts.get("web-1")),
        (Some(&10), Some(&10)),
        "{r:?}"
    );
    let good = std::fs::read_to_string(&s.agent.config).unwrap();
    let cases = [
        ("services:\n  - name: web\n    ports: [\n", "mesh.yaml:"),
        (
            &*good.replace("  - name: empty", "  - nme: empty"),
            "nme",
        ),
        (
            &*good.replace(
                "  - name: empty",
                "  - name: web\n    clusterIPs: [10.96.0.12]\n    ports: [{port: 80}]\n  - name: empty",
            ),
            "duplicate service default/web",
        ),
        (
            &*good.replace("port: 80 }", "port: 70000 }"),
            "services[0].ports[0].port: port 70000 is out of range",
        ),
    ];
    for (bad, needle) in cases {
        write(&s.agent.config, bad);
        let why = rejection(&s.agent, needle);
        assert!(why.contains("mesh.yaml:"), "names the file and line: {why}");
        let r = s.client.hit(VIP, 10, &[]).unwrap();
        assert_eq!(
            r.ok(),
            10,
            "traffic keeps flowing on the last good state after {why}: {r:?}"
        );
    }
    // An invalid policy is rejected alone, with its line and the cluster's message; the rest of
    // the file applies and `web` falls back to the defaults.
    write(
        &s.agent.config,
        &model(&[&s.backends[0], &s.backends[1]], "FASTEST"),
    );
    let why = rejection(&s.agent, "spec.loadBalancer.simple");
    assert!(
        why.contains("mesh.yaml:16:5")
            && why.contains(": policies[0]: TrafficPolicy default/web: spec.loadBalancer.simple: \"FASTEST\" is not one of"),
        "{why}"
    );
    let p = s.agent.meshctl_json(&["policies"]).unwrap();
    let web = p["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["service"] == "default/web")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        web["policy"], "",
        "defaults while the policy is invalid: {p}"
    );
    assert_eq!(web["algorithm"], "random", "{p}");
    assert_eq!(web["not_applied"][0]["reason"], "Invalid", "{p}");
    assert_eq!(p["policies"][0]["reason"], "Invalid", "{p}");
    let r = s.client.hit(VIP, 10, &[]).unwrap();
    assert_eq!(r.ok(), 10, "{r:?}");
    // A good change is applied.
    write(&s.agent.config, &model(&[&s.backends[2]], "RANDOM"));
    let start = Instant::now();
    loop {
        let r = s.client.hit(VIP, 10, &[]).unwrap();
        if r.counts.get("web-2") == Some(&10) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "new model not applied: {r:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    s.agent.kill();
}

#[test]
fn sigkill_restart_loses_no_connection_and_applies_changes_made_while_down() {
    let Some(_k) = mesh_tests::kernel_test("agent_restart") else {
        return;
    };
    let mut s = setup("agent_restart");
    s.agent.start().unwrap();
    let client = s.client.clone();
    let load = thread::spawn(move || client.hit(VIP, 30_000, &["--timeout-ms", "2000"]).unwrap());
    thread::sleep(Duration::from_millis(300));
    s.agent.kill();
    // While the agent is down: web-2 joins.
    write(
        &s.agent.config,
        &model(
            &[&s.backends[0], &s.backends[1], &s.backends[2]],
            "ROUND_ROBIN",
        ),
    );
    thread::sleep(Duration::from_millis(300));
    s.agent.start().unwrap();
    assert!(
        !load.is_finished(),
        "the client was still connecting when the agent came back"
    );
    let r = load.join().unwrap();
    assert_eq!(
        r.failed(),
        0,
        "zero failed connections across SIGKILL and restart: {:?}",
        r.errors
    );
    assert_eq!(r.ok(), 30_000);
    let r = s.client.hit(VIP, 30, &[]).unwrap();
    assert_eq!(
        r.counts.get("web-2"),
        Some(&10),
        "the change made while down is applied: {r:?}"
    );
    let services = s.agent.meshctl_json(&["services"]).unwrap();
    assert_eq!(
        services.as_array().unwrap().len(),
        2,
        "the model's two services after adoption, nothing stale: {services}"
    );
    s.agent.kill();
}

/// `meshctl policies`: `web` under its policy, `empty` with the defaults, and the policy's
/// condition.
fn policies_table_shows_what_applies(agent: &AgentProcess) {
    let out = agent.meshctl(&["policies"]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("default/web")[..4],
        ["default/web", "default/web", "Service", "round-robin"],
        "{table}"
    );
    assert_eq!(
        row("default/empty")[..3],
        ["default/empty", "(defaults)", "random"],
        "{table}"
    );
    assert!(
        table.contains("POLICY")
            && table.lines().any(|l| l.starts_with("default/web")
                && l.contains("True")
                && l.contains("Accepted")),
        "the policy and its condition: {table}"
    );
}

#[test]
fn meshctl_shows_services_backends_circuits_identities_and_live_flows() {
    let Some(_k) = mesh_tests::kernel_test("agent_meshctl") else {
        return;
    };
    let mut s = setup("agent_meshctl");
    s.agent.start().unwrap();
    let out = s.agent.meshctl(&["services"]).unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("10.96.0.10:80") && table.contains("round-robin"),
        "{table}"
    );
    policies_table_shows_what_applies(&s.agent);
    let backends = s.agent.meshctl_json(&["backends", "web"]).unwrap();
    assert_eq!(backends.as_array().unwrap().len(), 2, "{backends}");
    assert_eq!(backends[0]["circuit"], "closed");
    let yaml = String::from_utf8_lossy(
        &s.agent
            .meshctl(&["backends", "default/web", "-o", "yaml"])
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(yaml.contains("circuit: closed"), "{yaml}");
    let ids = s.agent.meshctl_json(&["identities"]).unwrap();
    assert_eq!(
        ids[0]["spiffe_id"], "spiffe://cluster.local/ns/default/sa/frontend",
        "{ids}"
    );
    assert!(
        s.agent
            .meshctl_json(&["circuits"])
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty()
    );
    let unknown = s.agent.meshctl(&["backends", "nope"]).unwrap();
    assert!(!unknown.status.success(), "unknown service is an error");

    // Live flows, filtered, as JSON lines.
    let mut cmd = s.agent.meshctl_command().unwrap();
    cmd.args([
        "flows",
        "--follow",
        "--service",
        "web",
        "--verdict",
        "close",
        "-o",
        "json",
    ]);
    cmd.stdout(std::process::Stdio::piped());
    let mut follow = cmd.spawn().unwrap();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(s.client.hit(VIP, 4, &[]).unwrap().ok(), 4);
    let stdout = follow.stdout.take().unwrap();
    let lines: Vec<Value> = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .take(4)
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let _ = follow.kill();
    let _ = follow.wait();
    for f in &lines {
        assert_eq!(f["verdict"], "close", "{f}");
        assert_eq!(f["service"], "default/web", "{f}");
        assert_eq!(f["source_pod"], "client", "{f}");
    }
    // History with a table.
    let out = s
        .agent
        .meshctl(&["flows", "--since", "1m", "--verdict", "open"])
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.lines().count() >= 5 && table.contains("default/client"),
        "{table}"
    );

    // Not reachable: a clear message and a non-zero exit.
    s.agent.kill();
    let out = s.agent.meshctl(&["status"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the mesh agent"), "{err}");
}

#[test]
fn rejects_name_the_client_pod_through_its_cgroup() {
    let Some(_k) = mesh_tests::kernel_test("agent_reject_flows") else {
        return;
    };
    let mut s = setup("agent_reject_flows");
    s.agent.start().unwrap();
    // Rejects happen before a source address exists: the pod is named through its cgroup.
    let empty: std::net::SocketAddr = "10.96.0.11:80".parse().unwrap();
    assert_eq!(
        s.client
            .hit(empty, 2, &[])
            .unwrap()
            .errors
            .get("EHOSTUNREACH"),
        Some(&2)
    );
    thread::sleep(Duration::from_millis(300));
    let rejects = s
        .agent
        .meshctl(&["flows", "--verdict", "reject", "-o", "json"])
        .unwrap();
    let rejects: Vec<Value> = String::from_utf8_lossy(&rejects.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    assert_eq!(
        rejects[0]["source_pod"],
        "client",
        "{rejects:?}\n{}",
        s.agent.stderr()
    );
    assert_eq!(rejects[0]["service"], "default/empty", "{rejects:?}");
    assert_eq!(rejects[0]["reason"], "reject_no_backends", "{rejects:?}");
}
