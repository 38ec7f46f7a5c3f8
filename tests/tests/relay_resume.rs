//! The relay resumes each agent by the agent's flow numbering (`seq`, `instance`), not by time:
//! a real agent on a harness node serves its flows on mTLS (file mode) and `mesh-agent relay`
//! follows it. Flows from connects on both CPUs (whose kernel stamps may come out of time
//! order), flows replayed after the relay's connection is cut again and again (`ss -K`) while
//! traffic runs, and the flows of a restarted agent (a new instance, numbering from 1 again)
//! all reach the relay's client exactly once: the relay's flows are compared with the agent's
//! own history, flow by flow. The restarted agent runs in a time namespace whose monotonic
//! clock is an hour ahead, so it stamps its flows an hour earlier than the first instance did
//! (as after the node's clock was stepped back): a relay resuming by time would drop them all.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Cluster, NodeHandle, PodChild,
    agent::{AgentProcess, workspace_binary, write_atomically},
};
use serde_json::Value;

const WEB: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
const RELAY: &str = "127.0.0.1:4245";
/// Connections per traffic phase: each gives an open and a close flow, and the three phases
/// stay inside the agent's 10,000-flow history.
const HITS: usize = 1200;
const CUTS: usize = 5;

/// A CA and the agent's server and the relay's client certificates, under `dir`.
fn pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "relay resume root");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    for (who, san) in [
        ("agent", "flows.mesh-system.svc"),
        ("relay", "relay.mesh-system.svc"),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![san.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join(format!("{who}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{who}.key")), key.serialize_pem()).unwrap();
    }
}

fn meshctl(node: &NodeHandle, args: &[&str]) -> Output {
    let mut cmd = node.command(workspace_binary("meshctl").unwrap());
    cmd.args(["--server", RELAY]).args(args);
    cmd.output().unwrap()
}

/// One flow's identity in its agent's stream, and its time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Numbered {
    instance: u64,
    seq: u64,
    time: u64,
}

fn parse_flows(out: &Output) -> Result<Vec<Numbered>, String> {
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).map_err(|e| format!("{e}: {l}"))?;
            Ok(Numbered {
                instance: v["instance"].as_u64().unwrap_or(0),
                seq: v["seq"].as_u64().unwrap_or(0),
                time: v["time_unix_nano"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// The agent's own history (`meshctl flows` on its admin socket), in seq order.
fn agent_flows(agent: &AgentProcess) -> Vec<Numbered> {
    parse_flows(&agent.meshctl(&["flows", "-o", "json"]).unwrap()).unwrap()
}

/// The agent's flows once it holds at least `n` (or after 10 s, whatever it holds: the caller's
/// assertions then say what is missing). A client's last connections close just before it
/// exits; their events reach the agent's history when its ring reader next drains — a CI run
/// once read the history before that.
fn agent_flows_at_least(agent: &AgentProcess, n: usize) -> Vec<Numbered> {
    let start = Instant::now();
    loop {
        let flows = agent_flows(agent);
        if flows.len() >= n || start.elapsed() > Duration::from_secs(10) {
            return flows;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the relay's client has every flow of `expected` exactly once; returns the
/// relay's flows. (Flows the agent numbered after `expected` was taken may be there too.)
fn relay_has_exactly(node: &NodeHandle, expected: &[Numbered], what: &str) -> Vec<Numbered> {
    let start = Instant::now();
    let instances: BTreeSet<u64> = expected.iter().map(|f| f.instance).collect();
    let want: BTreeSet<(u64, u64)> = expected.iter().map(|f| (f.instance, f.seq)).collect();
    loop {
        let last = match parse_flows(&meshctl(node, &["flows", "-o", "json"])) {
            Ok(flows) => {
                let mut count: BTreeMap<(u64, u64), usize> = BTreeMap::new();
                for f in flows.iter().filter(|f| instances.contains(&f.instance)) {
                    *count.entry((f.instance, f.seq)).or_default() += 1;
                }
                let repeated: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
                assert!(repeated.is_empty(), "{what}: sent twice: {repeated:?}");
                let got: BTreeSet<(u64, u64)> = count.into_keys().collect();
                let missing: Vec<_> = want.difference(&got).collect();
                if missing.is_empty() {
                    return flows;
                }
                format!(
                    "{} missing, the first {:?}",
                    missing.len(),
                    &missing[..missing.len().min(5)]
                )
            }
            Err(e) => e,
        };
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: the relay's flows never matched the agent's: {last}"
        );
        thread::sleep(Duration::from_millis(300));
    }
}

/// Starts the agent as [`AgentProcess::spawn`] does, but in a time namespace whose
/// `CLOCK_MONOTONIC` is `ahead` seconds ahead (`unshare --time` execs the agent itself), and
/// waits until it is ready. The kernel's event times are not shifted, so the agent's flows,
/// kernel time plus its (wall − monotonic) offset, come `ahead` seconds early.
fn start_shifted(a: &NodeHandle, agent: &AgentProcess, ahead: u32) -> PodChild {
    let mut cmd = a.command("unshare");
    cmd.args(["--time", "--monotonic", &ahead.to_string()])
        .arg(workspace_binary("mesh-agent").unwrap())
        .arg("--config-file")
        .arg(&agent.config)
        .args([
            "--readiness-addr",
            "127.0.0.1:15021",
            "--node-name",
            a.name(),
        ])
        .arg("--cgroup")
        .arg(a.cgroup_dir())
        .arg("--pin-dir")
        .arg(&agent.pins)
        .arg("--admin-socket")
        .arg(&agent.socket)
        .env("RUST_LOG", "info")
        .envs(agent.env.iter().map(|(k, v)| (k, v)));
    let mut child = a
        .spawn(cmd)
        .expect("starting the agent in a time namespace");
    let start = Instant::now();
    while !agent
        .meshctl_json(&["status"])
        .is_ok_and(|s| s["ready"] == true)
    {
        if let Ok(Some(exit)) = child.try_status() {
            panic!("the agent exited ({exit}): {}", child.stderr_text());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the agent is not ready: {}",
            child.stderr_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
    child
}

fn try_relay_status(node: &NodeHandle) -> Result<Value, String> {
    let out = meshctl(node, &["status", "-o", "json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

fn relay_status(node: &NodeHandle) -> Value {
    try_relay_status(node).unwrap()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one story: out-of-order stamps, cuts, a restart, each checked flow by flow"
)]
fn the_relay_takes_every_flow_once_across_reordered_stamps_reconnects_and_an_agent_restart() {
    let Some(_k) = mesh_tests::kernel_test("relay_resume") else {
        return;
    };
    let cluster = Cluster::new("relay_resume").unwrap();
    let a = cluster.add_node("a").unwrap();
    let client = cluster.add_pod(&a, "client").unwrap();
    let web0 = cluster.add_pod(&a, "web-0").unwrap();
    let _server = web0
        .serve(
            "web-0",
            &[SocketAddr::new(IpAddr::V4(web0.ipv4()), 80)],
            &[],
        )
        .unwrap();
    let pins = cluster.bpffs_dir().unwrap();
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).unwrap();
    pki(&work);
    let config = work.join("mesh.yaml");
    write_atomically(
        &config,
        &format!(
            "node: a\nservices:\n  - name: web\n    clusterIPs: [{}]\n    ports:\n      - {{ name: tcp, port: 80 }}\n    endpoints:\n      - {{ ip: {}, node: a, pod: web-0 }}\npods:\n  - {{ name: client, node: a, ips: [{}] }}\n  - {{ name: web-0, node: a, ips: [{}] }}\n",
            WEB.ip(),
            web0.ipv4(),
            client.ipv4(),
            web0.ipv4(),
        ),
    )
    .unwrap();
    let file = |f: &str| work.join(f).display().to_string();
    let mut agent = AgentProcess::new(a.clone(), config, pins.join("a"), work.join("admin.sock"));
    agent.env.extend([
        ("MESH_FLOW_API_LISTEN".into(), format!("{}:4244", a.ipv4())),
        ("MESH_FLOW_API_CERT".into(), file("agent.crt")),
        ("MESH_FLOW_API_KEY".into(), file("agent.key")),
        ("MESH_FLOW_API_CA".into(), file("ca.crt")),
    ]);
    agent.start().unwrap();
    let mut cmd = a.command(workspace_binary("mesh-agent").unwrap());
    cmd.arg("relay")
        .args(["--agents", &format!("{}:4244", a.ipv4())])
        .args([
            "--tls-cert",
            &file("relay.crt"),
            "--tls-key",
            &file("relay.key"),
        ])
        .args(["--tls-ca", &file("ca.crt")])
        .args(["--listen", RELAY, "--web-listen", "none"])
        .env("RUST_LOG", "info");
    let relay: PodChild = a.spawn(cmd).expect("starting the relay");
    let start = Instant::now();
    while !try_relay_status(&a).is_ok_and(|s| s["sources"][0]["state"] == "running") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the relay never followed the agent: {}",
            relay.stderr_text()
        );
        thread::sleep(Duration::from_millis(200));
    }

    // 1. Connects from several threads, so both CPUs emit events: the ring is in submit order,
    // and a flow stamped earlier than the one before it must still reach the relay.
    let r = client.hit(WEB, HITS, &["--concurrency", "8"]).unwrap();
    assert_eq!(r.ok(), HITS as u64, "{r:?}");
    let first = agent_flows_at_least(&agent, HITS);
    assert!(first.len() >= HITS, "an open per connect at least");
    let instance = first[0].instance;
    assert_ne!(instance, 0, "the agent numbers its flows");
    assert_eq!(
        first
            .iter()
            .map(|f| (f.instance, f.seq))
            .collect::<Vec<_>>(),
        (1..=first.len() as u64)
            .map(|s| (instance, s))
            .collect::<Vec<_>>(),
        "the agent's history is numbered 1, 2, … in order"
    );
    let reordered = first.windows(2).filter(|w| w[1].time <= w[0].time).count();
    eprintln!("flows stamped no later than the flow before them: {reordered}");
    relay_has_exactly(&a, &first, "both CPUs' flows");

    // 2. The relay's connection is cut again and again while traffic runs: every reconnect
    // replays the agent's history, and only what the relay lacks is taken.
    let reconnects_before = relay_status(&a)["sources"][0]["restarts"]
        .as_u64()
        .unwrap_or(0);
    let traffic = {
        let client = client.clone();
        thread::spawn(move || client.hit(WEB, HITS, &["--concurrency", "2"]).unwrap())
    };
    let mut cut = 0;
    let cutting = Instant::now();
    while cut < CUTS {
        assert!(
            cutting.elapsed() < Duration::from_mins(1),
            "the relay did not reconnect: {}",
            relay.stderr_text()
        );
        thread::sleep(Duration::from_millis(300));
        let mut ss = a.command("ss");
        ss.args([
            "-K",
            "-t",
            "dst",
            &a.ipv4().to_string(),
            "dport",
            "=",
            ":4244",
        ]);
        let out = ss.output().unwrap();
        assert!(
            out.status.success(),
            "ss -K: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if String::from_utf8_lossy(&out.stdout).contains(":4244") {
            cut += 1;
        }
    }
    let r = traffic.join().unwrap();
    assert_eq!(r.ok(), HITS as u64, "{r:?}");
    let second = agent_flows_at_least(&agent, first.len() + HITS);
    assert!(second.len() >= first.len() + HITS);
    relay_has_exactly(&a, &second, "flows across reconnects");
    let status = relay_status(&a);
    let source = &status["sources"][0];
    assert!(
        source["restarts"].as_u64().unwrap_or(0) >= reconnects_before + CUTS as u64,
        "every cut made the relay reconnect: {status}"
    );
    assert_eq!(
        status["flows_lagged_total"].as_u64().unwrap_or(0),
        0,
        "no gap in the agent's numbering: {status}"
    );

    // 3. The agent restarts: its new instance numbers from 1 again, below what the relay
    // took from the old one, and stamps its flows an hour earlier; it is followed all the same.
    let (exit, _) = agent.terminate(Duration::from_secs(20)).unwrap();
    assert!(exit.success(), "{exit}");
    let mut restarted = start_shifted(&a, &agent, 3600);
    let r = client.hit(WEB, HITS / 4, &["--concurrency", "2"]).unwrap();
    assert_eq!(r.ok(), (HITS / 4) as u64, "{r:?}");
    let third = agent_flows_at_least(&agent, HITS / 4);
    assert!(
        !third.is_empty() && third.iter().all(|f| f.instance != instance),
        "a new instance"
    );
    assert_eq!(third[0].seq, 1, "numbering starts again");
    assert!(third.len() >= HITS / 4);
    let earliest_before = first.iter().map(|f| f.time).min().unwrap();
    assert!(
        third.iter().all(|f| f.time < earliest_before),
        "the restarted agent stamps its flows earlier than the first one did"
    );
    let merged = relay_has_exactly(&a, &third, "the restarted agent's flows");
    assert!(
        merged.iter().filter(|f| f.instance == instance).count() >= second.len(),
        "the old instance's flows stay kept"
    );
    let log = relay.stderr_text();
    assert!(
        log.contains("the agent restarted: following its new numbering"),
        "{log}"
    );
    restarted.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let exit = restarted.wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(exit.success(), "{exit}: {}", restarted.stderr_text());
}
