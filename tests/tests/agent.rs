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

/// Waits until the agent reports a current rejection whose message contains `needle`; returns
/// `(key, message)`.
fn rejection(agent: &AgentProcess, needle: &str) -> (String, String) {
    let start = Instant::now();
    loop {
        let s = agent.meshctl_json(&["status"]).unwrap();
        let found = s["rejections"].as_array().and_then(|all| {
            all.iter().find_map(|r| {
                let msg = r["message"].as_str().unwrap_or_default();
                msg.contains(needle).then(|| {
                    (
                        r["key"].as_str().unwrap_or_default().to_owned(),
                        msg.to_owned(),
                    )
                })
            })
        });
        if let Some(found) = found {
            assert_eq!(
                s["last_rejection"].as_str(),
                Some(found.1.as_str()),
                "the newest rejection is the last one: {s}"
            );
            return found;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no rejection with {needle:?}: {s}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The agent's current rejections.
fn rejections(agent: &AgentProcess) -> Vec<Value> {
    let s = agent.meshctl_json(&["status"]).unwrap();
    s["rejections"].as_array().cloned().unwrap_or_default()
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

/// An invalid policy is rejected alone, with its line and the cluster's message; the rest of
/// the file applies and `web` falls back to the defaults.
fn invalid_policy_is_rejected_alone(s: &Setup) {
    write(
        &s.agent.config,
        &model(&[&s.backends[0], &s.backends[1]], "FASTEST"),
    );
    let (_, why) = rejection(&s.agent, "spec.loadBalancer.simple");
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
        let (key, why) = rejection(&s.agent, needle);
        assert!(why.contains("mesh.yaml:"), "names the file and line: {why}");
        assert_eq!(
            key,
            format!("file {}", s.agent.config.display()),
            "one entry per file"
        );
        let r = s.client.hit(VIP, 10, &[]).unwrap();
        assert_eq!(
            r.ok(),
            10,
            "traffic keeps flowing on the last good state after {why}: {r:?}"
        );
        let current = rejections(&s.agent);
        assert_eq!(
            current.len(),
            1,
            "a newer problem replaces the older one: {current:?}"
        );
        assert_eq!(current[0]["kind"], "invalid_file", "{current:?}");
    }
    // The rejection stays while the file stays bad (the source polls it every 500 ms).
    thread::sleep(Duration::from_millis(1200));
    let current = rejections(&s.agent);
    assert_eq!(current.len(), 1, "still rejected: {current:?}");
    let status = s.agent.meshctl_json(&["status"]).unwrap();
    assert_eq!(
        status["ready"], true,
        "the last good state serves: {status}"
    );
    assert_eq!(status["sources"][0]["name"], "file", "{status}");
    assert_eq!(status["sources"][0]["state"], "running", "{status}");
    assert_eq!(status["sources"][0]["synced"], true, "{status}");
    let table = String::from_utf8_lossy(&s.agent.meshctl(&["status"]).unwrap().stdout).into_owned();
    assert!(
        table.contains("rejected file ") && table.contains("out of range"),
        "the table lists the rejection: {table}"
    );
    invalid_policy_is_rejected_alone(&s);
    // A good change is applied, and clears the file's rejections.
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
    let status = s.agent.meshctl_json(&["status"]).unwrap();
    assert_eq!(status["rejections"], Value::Array(vec![]), "{status}");
    assert_eq!(status["last_rejection"], "", "{status}");
    assert!(
        status["sources"][0]["last_sync_age_ms"].as_u64().unwrap() < 5_000,
        "the sync is recent: {status}"
    );
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
    assert_eq!(
        lines.len(),
        4,
        "meshctl flows --follow printed 4 flows: {lines:?}"
    );
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

#[test]
fn sigterm_drains_stops_and_leaves_traffic_flowing() {
    let Some(_k) = mesh_tests::kernel_test("agent_sigterm") else {
        return;
    };
    let mut s = setup("agent_sigterm");
    s.agent.start().unwrap();
    let started = Instant::now();
    let (exit, log) = s.agent.terminate(Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "exits cleanly on SIGTERM ({exit}): {log}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no subscriber holds the drain, so it ends at once: {:?}\n{log}",
        started.elapsed()
    );
    assert!(log.contains("SIGTERM") && log.contains("drained"), "{log}");
    assert!(!s.agent.socket.exists(), "the admin socket is removed");
    assert_eq!(
        s.client.hit(VIP, 10, &[]).unwrap().ok(),
        10,
        "programs stay attached through their pins"
    );
}

/// Reads `GET /healthz/ready` at `addr`: (status code, body).
fn readiness(addr: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    c.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((code, body))
}

#[test]
fn a_failing_source_makes_the_agent_unready_and_is_restarted_with_backoff() {
    let Some(_k) = mesh_tests::kernel_test("agent_source_down") else {
        return;
    };
    let mut s = setup("agent_source_down");
    // No kubeconfig at that path: every run of the Kubernetes source fails at once.
    s.agent.kubeconfig = Some(s.agent.config.with_file_name("no-such-kubeconfig"));
    // The agent runs in the host's namespace with a kubeconfig: a port of its own there.
    let addr = format!("127.0.0.1:{}", 20_000 + std::process::id() % 20_000);
    s.agent.readiness_addr = Some(addr.clone());
    s.agent.spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        let st = s.agent.meshctl_json(&["status"]);
        if let Ok(st) = st
            && st["sources"][0]["restarts"].as_u64().unwrap_or(0) >= 3
        {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the source was not restarted 3 times: {}",
            s.agent.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["ready"], false, "{status}");
    let source = &status["sources"][0];
    assert_eq!(source["name"], "kubernetes", "{status}");
    assert!(
        source["last_error"]
            .as_str()
            .unwrap()
            .contains("failed: building the Kubernetes client"),
        "{status}"
    );
    assert!(
        status["not_ready_reason"]
            .as_str()
            .unwrap()
            .contains("discovery source kubernetes"),
        "{status}"
    );
    let (code, body) = readiness(&addr).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("not ready: discovery source kubernetes"),
        "{body}"
    );
    // Exponential backoff: 500 ms, then 1 s, then 2 s.
    let log = s.agent.stderr();
    let delays: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("discovery source stopped"))
        .filter_map(|l| l.split("retry_in=").nth(1)?.split_whitespace().next())
        .collect();
    assert_eq!(delays[..3], ["500ms", "1s", "2s"], "{log}");
    // SIGTERM is honoured while the source keeps failing.
    let (exit, log) = s.agent.terminate(Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "{exit}: {log}");
}

/// Entries in the node's pinned `LOCAL_ENDPOINTS` map (the same-node bypass candidates).
fn local_endpoints(pins: &Path) -> usize {
    let data = aya::maps::MapData::from_pin(pins.join("maps/LOCAL_ENDPOINTS")).unwrap();
    let map: aya::maps::HashMap<
        _,
        mesh_common::bypass::EndpointKey,
        mesh_common::bypass::LocalEndpoint,
    > = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    map.keys().count()
}

#[test]
fn same_node_bypass_is_off_by_default_and_switched_per_node() {
    let Some(_k) = mesh_tests::kernel_test("agent_bypass_off") else {
        return;
    };
    let mut s = setup("agent_bypass_off");
    s.agent.start().unwrap();
    let config = s.agent.meshctl_json(&["config"]).unwrap();
    assert_eq!(config["config"]["datapath"]["bypass"], false, "{config}");
    assert_eq!(
        local_endpoints(&s.agent.pins),
        0,
        "bypass off by default: no pod is a candidate"
    );
    s.agent.terminate(Duration::from_secs(10)).unwrap();
    s.agent.env.push(("MESH_BYPASS".into(), "true".into()));
    s.agent.start().unwrap();
    let start = Instant::now();
    while local_endpoints(&s.agent.pins) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "bypass on: this node's pods never became candidates"
        );
        thread::sleep(Duration::from_millis(50));
    }
    s.agent.terminate(Duration::from_secs(10)).unwrap();
    // The same node restarted with bypass off: its pinned candidates are cleared at once.
    s.agent.env.retain(|(k, _)| k != "MESH_BYPASS");
    s.agent.env.push(("MESH_BYPASS".into(), "false".into()));
    s.agent.start().unwrap();
    let start = Instant::now();
    while local_endpoints(&s.agent.pins) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "LOCAL_ENDPOINTS still has this node's pods with bypass off"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let config = s.agent.meshctl_json(&["config"]).unwrap();
    assert_eq!(config["config"]["datapath"]["bypass"], false, "{config}");
    let r = s.client.hit(VIP, 10, &[]).unwrap();
    assert_eq!(r.ok(), 10, "traffic still flows, through the stack: {r:?}");
}
