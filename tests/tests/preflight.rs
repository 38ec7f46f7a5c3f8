//! What the agent checks before it attaches: the kernel has every feature the data path uses,
//! and no other socket load balancer (Cilium's, Calico's) sits on the cgroup's socket hooks —
//! unless the agent is told to coexist; its own pinned links (a restart) never count as foreign.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsFd as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_agent::datapath::{
    bpfsys::{self, Insn},
    probe,
};
use mesh_tests::{
    Cluster, NodeHandle, PodChild,
    agent::{AgentProcess, workspace_binary, write_atomically},
};

const VIP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
const CONNECT4: u32 = 10;

#[test]
fn the_kernel_probe_passes_here_with_every_feature() {
    let Some(_k) = mesh_tests::kernel_test("preflight_kernel_probe") else {
        return;
    };
    let results = probe::results();
    let absent: Vec<_> = results
        .iter()
        .filter(|(_, r)| !matches!(r, Ok(true)))
        .map(|(f, r)| format!("{}: {r:?}", f.name))
        .collect();
    assert_eq!(
        absent,
        Vec::<String>::new(),
        "every feature is present on this kernel"
    );
    let features = probe::probe().unwrap();
    assert!(
        features.reset_tracepoint,
        "this kernel has BTF and tp_btf: no fallback expected ({features:?})"
    );
    assert!(!features.release.is_empty());
}

/// The agent binary on `node` with `extra` flags (not waited for).
fn spawn_agent(agent: &AgentProcess, node: &NodeHandle, extra: &[&str]) -> PodChild {
    let mut cmd = node.command(workspace_binary("mesh-agent").unwrap());
    cmd.arg("--config-file")
        .arg(&agent.config)
        .args(["--readiness-addr", "none", "--node-name", "a"])
        .arg("--cgroup")
        .arg(node.cgroup_dir())
        .arg("--pin-dir")
        .arg(&agent.pins)
        .arg("--admin-socket")
        .arg(&agent.socket)
        .args(extra)
        .env("RUST_LOG", "info");
    node.spawn(cmd).unwrap()
}

fn wait_ready(agent: &AgentProcess, child: &PodChild) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if agent
            .meshctl_json(&["status"])
            .is_ok_and(|s| s["ready"] == true)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("agent not ready: {}", child.stderr_text());
}

#[test]
fn a_foreign_connect4_program_stops_the_agent_unless_told_to_coexist() {
    let Some(_k) = mesh_tests::kernel_test("preflight_coexist") else {
        return;
    };
    let cluster = Cluster::new("preflight_coexist").unwrap();
    let node = cluster.add_node("a").unwrap();
    let client = cluster.add_pod(&node, "client").unwrap();
    let (backends, _servers) =
        mesh_tests::meshpod::backend_pods(&cluster, &node, "web-", 1, 80).unwrap();
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).unwrap();
    let config = work.join("mesh.yaml");
    write_atomically(
        &config,
        &format!(
            "node: a\nservices:\n  - name: web\n    clusterIPs: [{}]\n    ports:\n      - {{ name: http, port: 80 }}\n    endpoints:\n      - {{ ip: {}, node: a, pod: web-0 }}\npods: []\n",
            VIP.ip(),
            backends[0].ipv4()
        ),
    )
    .unwrap();
    let pins: PathBuf = cluster.bpffs_dir().unwrap().join("a");
    let agent = AgentProcess::new(node.clone(), config, pins, work.join("admin.sock"));

    // Another socket LB's connect4 program (named as Cilium's is, after the kernel's 15-byte
    // cut): allows every connect unchanged.
    let prog = bpfsys::prog_load(
        bpfsys::prog_type::CGROUP_SOCK_ADDR,
        CONNECT4,
        "cil_sock4_connect",
        &[Insn::mov_r0(1), Insn::exit()],
    )
    .unwrap_or_else(|(e, log)| panic!("loading the foreign program: {e}: {log}"));
    let prog_id = bpfsys::prog_info(prog.as_fd()).unwrap().id;
    let cgroup = std::fs::File::open(node.cgroup_dir()).unwrap();
    let foreign = bpfsys::cgroup_link_create(prog.as_fd(), cgroup.as_fd(), CONNECT4).unwrap();

    // Refused: non-zero exit, one line naming the program.
    let mut child = spawn_agent(&agent, &node, &[]);
    let status = child.wait_timeout(Duration::from_secs(20)).unwrap();
    let stderr = child.stderr_text();
    assert!(!status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("refusing")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&format!(
            "connect4 id {prog_id} `cil_sock4_conne` (cgroup_sock_addr)"
        )),
        "{stderr}"
    );
    assert!(lines[0].contains("--coexist"), "{stderr}");
    assert!(
        !agent.pins.join("links").exists(),
        "nothing attached before refusing"
    );

    // Told to coexist, it starts and serves beside the foreign program.
    let mut child = spawn_agent(&agent, &node, &["--coexist"]);
    wait_ready(&agent, &child);
    let r = client.hit(VIP, 5, &[]).unwrap();
    assert_eq!(r.counts.get("web-0"), Some(&5), "{r:?}");
    child.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = child.wait_timeout(Duration::from_secs(10));

    // The foreign program goes; our own pinned links (a restart) do not count as foreign.
    drop(foreign);
    drop(prog);
    let mut child = spawn_agent(&agent, &node, &[]);
    wait_ready(&agent, &child);
    let r = client.hit(VIP, 5, &[]).unwrap();
    assert_eq!(r.counts.get("web-0"), Some(&5), "{r:?}");
    child.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = child.wait_timeout(Duration::from_secs(10));
}
