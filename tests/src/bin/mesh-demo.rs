//! `mesh-demo`: the README's first command. Builds a two-node cluster in a box, runs the real
//! `mesh-agent` on each node from a static model file, sends real traffic to a service and
//! narrates what happened with `meshctl`: load balancing, live flows, a backend killed (its
//! circuit opens in the kernel) and recovering through a half-open probe, fail-fast, a `SIGKILL`ed
//! agent that loses no connection, and same-node bypass.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    process::Stdio,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use mesh_tests::{
    Cluster, PodChild, PodHandle,
    agent::{AgentProcess, write_atomically},
    mtls::CaSetup,
};

const VIP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
const EMPTY_VIP: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 11)), 80);

#[expect(
    clippy::too_many_lines,
    reason = "a narrated script reads best top to bottom"
)]
fn main() -> Result<()> {
    ensure!(
        mesh_tests::is_root(),
        "mesh-demo needs root: it creates namespaces and loads eBPF"
    );
    let started = Instant::now();
    step(
        1,
        "Build a cluster in a box: 2 nodes, 4 pods (network namespaces + veth + cgroups)",
    );
    let cluster = Cluster::new("mesh-demo")?;
    let node_a = cluster.add_node("node-a")?;
    let node_b = cluster.add_node("node-b")?;
    let client = cluster.add_pod(&node_a, "client")?;
    let web = [
        cluster.add_pod(&node_a, "web-0")?,
        cluster.add_pod(&node_a, "web-1")?,
        cluster.add_pod(&node_b, "web-2")?,
    ];
    for p in std::iter::once(&client).chain(&web) {
        say(&format!(
            "pod {:<7} on {:<7} {:<10} {}",
            p.name(),
            p.node().name(),
            p.ipv4().to_string(),
            p.ipv6()
        ));
    }
    let mut servers: Vec<Option<PodChild>> = Vec::new();
    for p in &web {
        servers.push(Some(p.serve(
            p.name(),
            &[SocketAddr::new(p.ipv4().into(), 80)],
            &[],
        )?));
    }

    step(2, "Start mesh-agent on each node from a static model file");
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work)?;
    let model_file = work.join("mesh.yaml");
    let model = model_yaml(&client, &web);
    write_atomically(&model_file, &model)?;
    for line in model.lines() {
        say(&format!("│ {line}"));
    }
    let pins = cluster.bpffs_dir()?;
    let mut agent_a = AgentProcess::new(
        node_a.clone(),
        model_file.clone(),
        pins.join("node-a"),
        work.join("a.sock"),
    );
    "warn,mesh_ebpf=debug".clone_into(&mut agent_a.log_filter);
    let mut agent_b = AgentProcess::new(
        node_b.clone(),
        model_file.clone(),
        pins.join("node-b"),
        work.join("b.sock"),
    );
    // Same-node bypass is off by default (the kernel's sockmap reads can fail blocking readers
    // with EAGAIN); the demo turns it on to show it (step 8).
    for agent in [&mut agent_a, &mut agent_b] {
        agent.env.push(("MESH_BYPASS".into(), "true".into()));
    }
    agent_a.start()?;
    agent_b.start()?;
    say("both agents ready; on node-a:");
    meshctl(&agent_a, &["services"])?;

    step(
        3,
        "client opens 30 connections to web (10.96.0.10:80); meshctl flows --follow watches",
    );
    let (flows, watcher) = follow_flows(&agent_a)?;
    let r = client.hit(VIP, 30, &[])?;
    say(&format!(
        "answers by backend: {:?}; errors: {:?}",
        r.counts, r.errors
    ));
    say(&format!(
        "the application saw the service address from getpeername(): {}",
        r.peer_mismatch == 0
    ));
    say(&format!(
        "connect latency p50 {} µs, p99 {} µs",
        r.connect_us.p50, r.connect_us.p99
    ));
    thread::sleep(Duration::from_millis(200));
    show_flows(&flows, 6);
    meshctl(&agent_a, &["backends", "web"])?;

    step(
        4,
        "Kill web-1: its connects are refused; the kernel counts 3 and opens its circuit",
    );
    servers[1] = None;
    let r = client.hit(VIP, 30, &[])?;
    say(&format!(
        "answers: {:?}; errors seen by the client: {:?}",
        r.counts, r.errors
    ));
    let ejected = Instant::now();
    thread::sleep(Duration::from_millis(200));
    show_flows(&flows, 20);
    meshctl(&agent_a, &["circuits"])?;
    if let Some(line) = agent_a
        .stderr()
        .lines()
        .find(|l| l.contains("circuit opened"))
    {
        say(&format!(
            "kernel log (aya-log → agent's tracing): {}",
            line.trim()
        ));
    }

    step(
        5,
        "web-1 is back, but ejected: nothing reaches it until the ejection time ends",
    );
    servers[1] = Some(web[1].serve("web-1", &[SocketAddr::new(web[1].ipv4().into(), 80)], &[])?);
    let r = client.hit(VIP, 12, &[])?;
    say(&format!("answers: {:?}", r.counts));
    thread::sleep(
        Duration::from_secs(3).saturating_sub(ejected.elapsed()) + Duration::from_millis(300),
    );
    say("ejection time over: the next connection to web-1 is the single half-open probe");
    let r = client.hit(VIP, 12, &[])?;
    say(&format!("answers: {:?}", r.counts));
    show_flows(&flows, 20);
    meshctl(&agent_a, &["backends", "web"])?;

    step(
        6,
        "Fail fast: a service with no endpoints fails connect() at once",
    );
    let r = client.hit(EMPTY_VIP, 100, &[])?;
    say(&format!(
        "{EMPTY_VIP}: errors {:?}, connect p50 {} µs (no timeout, no SYN sent)",
        r.errors, r.connect_us.p50
    ));

    step(
        7,
        "SIGKILL the agent on node-a while the client keeps connecting; change the model meanwhile",
    );
    let c = client.clone();
    let load = thread::spawn(move || c.hit(VIP, 20_000, &["--timeout-ms", "2000"]));
    thread::sleep(Duration::from_millis(300));
    agent_a.kill();
    say(
        "agent killed; programs stay attached through their pinned links; model now least-connections",
    );
    write_atomically(&model_file, &model.replace("ROUND_ROBIN", "LEAST_REQUEST"))?;
    agent_a.start()?;
    let r = load
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    say(&format!(
        "agent back (adopted its pins); {} connections meanwhile, {} failed",
        r.ok() + r.failed(),
        r.failed()
    ));
    meshctl(&agent_a, &["services"])?;

    step(
        8,
        "Same-node bypass (opt-in, on here): client ↔ web-0 (both on node-a) skip TCP/IP via sockmap + sk_msg",
    );
    let iface = client.host_ifname().to_owned();
    let bytes = || -> Result<u64> {
        let s = node_a.iface_stats(&iface)?;
        Ok(s.rx_bytes + s.tx_bytes)
    };
    for target in [&web[0], &web[2]] {
        let b0 = bytes()?;
        let t = client.transfer(SocketAddr::new(target.ipv4().into(), 80), 8 << 20)?;
        say(&format!(
            "8 MiB echoed with {} ({}): {} bytes crossed the client's veth; sha256 intact: {}",
            target.name(),
            if target.node().name() == "node-a" {
                "same node: bypass"
            } else {
                "other node: stack"
            },
            bytes()? - b0,
            t.sha256_sent == t.sha256_received
        ));
    }

    step(
        9,
        "mTLS: enroll the namespace; a CA signs each node's pods; client → web-2 crosses nodes in an HBONE tunnel",
    );
    let ca = CaSetup {
        node: node_a.clone(),
        dir: work.join("ca"),
        static_pods: model_file.clone(),
        ttl: "24h".to_owned(),
    };
    let _ca = ca.start()?;
    let enrolled = format!(
        "{}nodes:\n  - {{ name: node-a, addresses: [{}] }}\n  - {{ name: node-b, addresses: [{}] }}\nnamespaces:\n  - {{ name: default, dataplaneMode: mesh }}\n",
        model.replace("ROUND_ROBIN", "LEAST_REQUEST"),
        node_a.ipv4(),
        node_b.ipv4()
    );
    write_atomically(&model_file, &enrolled)?;
    say(
        "CA listening; namespace default labelled dataplaneMode: mesh; agents restarted with the CA",
    );
    for agent in [&mut agent_a, &mut agent_b] {
        agent.kill();
        agent.env = ca.agent_env(&agent.node.clone(), &work)?;
        agent.start()?;
    }
    wait_for_certificates(&agent_a)?;
    wait_for_certificates(&agent_b)?;
    meshctl(&agent_a, &["identities"])?;
    let r = client.hit(SocketAddr::new(web[2].ipv4().into(), 80), 10, &[])?;
    say(&format!(
        "client → web-2 (node-b) directly: answers {:?}, errors {:?}",
        r.counts, r.errors
    ));
    meshctl(&agent_a, &["tunnels"])?;
    if let Some(line) = agent_b
        .stderr()
        .lines()
        .find(|l| l.contains("HBONE stream admitted"))
    {
        say(&format!("node-b's agent: {}", line.trim()));
    }
    say("a DENY policy on the client's identity (cluster.local/ns/default/sa/frontend):");
    write_atomically(
        &model_file,
        &format!(
            "{enrolled}authorizationPolicies:\n  - apiVersion: security.kernmesh.io/v1alpha1\n    kind: AuthorizationPolicy\n    metadata: {{ name: no-frontend, namespace: default }}\n    spec:\n      action: DENY\n      rules: [{{ from: [{{ source: {{ principals: [cluster.local/ns/default/sa/frontend] }} }}] }}]\n"
        ),
    )?;
    thread::sleep(Duration::from_millis(1500));
    for target in [&web[0], &web[2]] {
        let r = client.hit(SocketAddr::new(target.ipv4().into(), 80), 5, &[])?;
        say(&format!(
            "client → {} ({}): answers {:?}, errors {:?}",
            target.name(),
            if target.node().name() == "node-a" {
                "same node: the kernel refuses at connect()"
            } else {
                "other node: node-b's agent answers 401"
            },
            r.counts,
            r.errors
        ));
    }
    write_atomically(&model_file, &enrolled)?;

    step(10, "Agent status and kernel counters on node-a");
    meshctl(&agent_a, &["status"])?;
    drop(watcher);
    println!(
        "\ndemo finished in {:.1?}; tearing the cluster down",
        started.elapsed()
    );
    Ok(())
}

/// Waits (at most 20 s) until every enrolled pod of `agent`'s node has a valid certificate.
fn wait_for_certificates(agent: &AgentProcess) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = agent.meshctl_json(&["identities"])?;
        let ready = v.as_array().is_some_and(|rows| {
            rows.iter()
                .all(|r| r["cert_state"] == "valid" || r["cert_state"] == "not-enrolled")
        });
        if ready {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "certificates not issued: {v}\n{}",
            agent.stderr()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn model_yaml(client: &PodHandle, web: &[PodHandle]) -> String {
    let mut endpoints = String::new();
    for p in web {
        let _ = writeln!(
            endpoints,
            "      - {{ ip: {}, node: {}, pod: {} }}",
            p.ipv4(),
            p.node().name(),
            p.name()
        );
    }
    let mut pods = String::new();
    for p in std::iter::once(client).chain(web) {
        let sa = if p.name() == "client" {
            "frontend"
        } else {
            "web"
        };
        let _ = writeln!(
            pods,
            "  - {{ name: {}, node: {}, serviceAccount: {sa}, ips: [{}] }}",
            p.name(),
            p.node().name(),
            p.ipv4()
        );
    }
    format!(
        "services:\n  - name: web\n    clusterIPs: [{}]\n    ports:\n      - {{ name: http, port: 80 }}\n    endpoints:\n{endpoints}  - name: empty\n    clusterIPs: [{}]\n    ports:\n      - {{ port: 80 }}\npods:\n{pods}policies:\n  - apiVersion: traffic.kernmesh.io/v1alpha1\n    kind: TrafficPolicy\n    metadata: {{ name: web }}\n    spec:\n      targetRefs: [{{ kind: Service, name: web }}]\n      loadBalancer: {{ simple: ROUND_ROBIN }}\n      outlierDetection: {{ consecutiveFailures: 3, baseEjectionTime: 3s, maxEjectionPercent: 50 }}\n",
        VIP.ip(),
        EMPTY_VIP.ip()
    )
}

fn step(n: u32, what: &str) {
    println!("\n[{n}] {what}");
}

fn say(line: &str) {
    println!("    {line}");
}

/// Runs `meshctl ARGS` against `agent` and prints what it printed, indented.
fn meshctl(agent: &AgentProcess, args: &[&str]) -> Result<()> {
    say(&format!("$ meshctl {}", args.join(" ")));
    let out = agent.meshctl(args)?;
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
    {
        say(&format!("  {line}"));
    }
    Ok(())
}

/// Kills the follower when dropped.
struct Watcher(std::process::Child);

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `meshctl flows --follow` and hands its lines over a channel.
fn follow_flows(agent: &AgentProcess) -> Result<(mpsc::Receiver<String>, Watcher)> {
    say("$ meshctl flows --follow --namespace default");
    let mut child = agent
        .meshctl_command()?
        .args(["flows", "--follow", "--namespace", "default"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting meshctl flows --follow")?;
    let stdout = child.stdout.take().context("meshctl stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    thread::sleep(Duration::from_millis(300));
    Ok((rx, Watcher(child)))
}

/// Prints what `meshctl flows --follow` printed since last time (at most `max` lines): the
/// header and every fail/eject/recover/reject line, then closes and opens to fill up, in order.
fn show_flows(flows: &mpsc::Receiver<String>, max: usize) {
    // The agent drains the kernel's ring at least every 100 ms.
    thread::sleep(Duration::from_millis(300));
    let lines: Vec<String> = flows.try_iter().collect();
    let rank = |l: &str| match l {
        l if l.starts_with("TIME") => 0,
        l if l.contains(" open ") => 3,
        l if l.contains(" close ") => 2,
        _ => 1,
    };
    let mut keep: Vec<usize> = (0..lines.len()).collect();
    keep.sort_by_key(|&i| (rank(&lines[i]), i));
    keep.truncate(max);
    keep.sort_unstable();
    for &i in &keep {
        say(&format!("  {}", lines[i]));
    }
    if lines.len() > keep.len() {
        say(&format!("  … {} flow lines in all", lines.len()));
    }
}
