//! Uninstall: `mesh-agent cleanup` after the real agent served a service leaves nothing of ours
//! in the kernel (no program, link, map or pin), pod-to-pod connects keep working, and the
//! service address is no longer translated — the node behaves as one that never ran the mesh.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsFd as _,
    path::Path,
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use mesh_agent::datapath::bpfsys;
use mesh_tests::{
    Cluster, NodeHandle, PodHandle,
    agent::{AgentProcess, workspace_binary, write_atomically},
};

const VIP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);

/// `mesh-agent cleanup` for `agent`'s node, pins and socket, from the host.
fn cleanup(agent: &AgentProcess, node: &NodeHandle) -> Output {
    Command::new(workspace_binary("mesh-agent").unwrap())
        .arg("cleanup")
        .arg("--pin-dir")
        .arg(&agent.pins)
        .arg("--cgroup")
        .arg(node.cgroup_dir())
        .arg("--admin-socket")
        .arg(&agent.socket)
        .output()
        .unwrap()
}

/// Every kernel object reachable from our pins: link ids, and the program ids and map ids they
/// lead to (programs found through the maps they use, so `sk_msg` — held by the sockhash, not
/// by a link — is included).
#[derive(Debug, Default)]
struct Ours {
    links: BTreeSet<u32>,
    progs: BTreeSet<u32>,
    maps: BTreeSet<u32>,
}

fn ours(pins: &Path) -> Ours {
    let mut o = Ours::default();
    for e in std::fs::read_dir(pins.join("links")).unwrap() {
        let fd = bpfsys::obj_get(&e.unwrap().path()).unwrap();
        let l = bpfsys::link_info(fd.as_fd()).unwrap();
        o.links.insert(l.id);
        o.progs.insert(l.prog_id);
    }
    for e in std::fs::read_dir(pins.join("maps")).unwrap() {
        let fd = bpfsys::obj_get(&e.unwrap().path()).unwrap();
        o.maps.insert(bpfsys::map_id(fd.as_fd()).unwrap());
    }
    for info in aya::programs::loaded_programs().filter_map(Result::ok) {
        let uses_ours = info
            .map_ids()
            .ok()
            .flatten()
            .is_some_and(|ids| ids.iter().any(|id| o.maps.contains(id)));
        if uses_ours {
            o.progs.insert(info.id());
        }
    }
    o
}

/// Ids of `o` the kernel still knows.
fn still_alive(o: &Ours) -> Vec<String> {
    let gone = |r: std::io::Result<std::os::fd::OwnedFd>| matches!(r, Err(e) if e.raw_os_error() == Some(libc::ENOENT));
    let mut alive = Vec::new();
    alive.extend(
        o.links
            .iter()
            .filter(|id| !gone(bpfsys::link_fd_by_id(**id)))
            .map(|id| format!("link {id}")),
    );
    alive.extend(
        o.progs
            .iter()
            .filter(|id| !gone(bpfsys::prog_fd_by_id(**id)))
            .map(|id| format!("program {id}")),
    );
    alive.extend(
        o.maps
            .iter()
            .filter(|id| !gone(bpfsys::map_fd_by_id(**id)))
            .map(|id| format!("map {id}")),
    );
    alive
}

/// Programs attached directly to `cgroup` at any socket hook.
fn attached(cgroup: &Path) -> Vec<(&'static str, u32)> {
    let dir = std::fs::File::open(cgroup).unwrap();
    bpfsys::SOCKET_HOOKS
        .iter()
        .flat_map(|(t, name)| {
            bpfsys::prog_query(dir.as_fd(), *t, false)
                .unwrap()
                .into_iter()
                .map(move |id| (*name, id))
        })
        .collect()
}

#[test]
fn cleanup_leaves_the_node_as_it_was_before_the_mesh() {
    let Some(_k) = mesh_tests::kernel_test("cleanup_uninstall") else {
        return;
    };
    let cluster = Cluster::new("cleanup_uninstall").unwrap();
    let node = cluster.add_node("a").unwrap();
    let client = cluster.add_pod(&node, "client").unwrap();
    let (backends, _servers) =
        mesh_tests::meshpod::backend_pods(&cluster, &node, "web-", 2, 80).unwrap();
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).unwrap();
    let config = work.join("mesh.yaml");
    let endpoints = backends
        .iter()
        .map(|p| {
            format!(
                "      - {{ ip: {}, node: a, pod: {} }}\n",
                p.ipv4(),
                p.name()
            )
        })
        .collect::<Vec<_>>()
        .concat();
    write_atomically(
        &config,
        &format!(
            "node: a\nservices:\n  - name: web\n    clusterIPs: [{}]\n    ports:\n      - {{ name: http, port: 80 }}\n    endpoints:\n{endpoints}pods: []\n",
            VIP.ip()
        ),
    )
    .unwrap();
    let pins = cluster.bpffs_dir().unwrap().join("a");
    let mut agent = AgentProcess::new(node.clone(), config, pins.clone(), work.join("admin.sock"));
    agent.start().unwrap();

    // The mesh translates the service address.
    let r = client.hit(VIP, 10, &[]).unwrap();
    assert_eq!(r.ok(), 10, "through the mesh before cleanup: {r:?}");
    let o = ours(&pins);
    assert_eq!(
        o.links.len(),
        mesh_agent::datapath::CGROUP_PROGRAMS.len() + mesh_agent::datapath::TRACEPOINTS.len(),
        "a link per cgroup program and tracepoint: {o:?}"
    );
    assert_eq!(
        o.maps.len(),
        mesh_agent::datapath::MAP_NAMES.len(),
        "every pinned map: {o:?}"
    );
    assert!(o.progs.len() >= 11, "every program incl. sk_msg: {o:?}");
    assert!(!attached(node.cgroup_dir()).is_empty());

    // Refused while the agent runs: one line, nothing removed.
    let out = cleanup(&agent, &node);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("refusing to clean up: an agent is running"),
        "{stderr}"
    );
    assert!(
        pins.join("maps").exists()
            && still_alive(&o).len() == o.links.len() + o.progs.len() + o.maps.len()
    );

    // Killed, the agent leaves the data path serving (pinned links).
    agent.kill();
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        client.hit(VIP, 5, &[]).unwrap().ok(),
        5,
        "pins keep serving"
    );

    // A link of ours that something else still holds open (here: this test) survives its unpin;
    // cleanup finds it on the cgroup and detaches it by force.
    let held = bpfsys::obj_get(&pins.join("links/mesh_connect4")).unwrap();
    let stdout = clean(&agent, &node);
    let detached = format!("detached from {}", node.cgroup_dir().display());
    assert!(stdout.contains(&detached), "{stdout}");
    assert!(!pins.exists(), "pin directory removed");
    assert!(
        !pins.join("maps/COUNTERS").exists(),
        "the kernel counter pins are gone"
    );
    let start = Instant::now();
    while !attached(node.cgroup_dir()).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still attached while a link fd is held: {:?}",
            attached(node.cgroup_dir())
        );
        thread::sleep(Duration::from_millis(50));
    }
    drop(held);

    assert_the_node_is_as_before(&o, &node, &client, &backends[0]);

    // Idempotent: a second run finds nothing and succeeds.
    let out = cleanup(&agent, &node);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("cleanup done: 0 objects removed"),
        "{stdout}"
    );
}

/// After cleanup: nothing of `o` in the kernel or on the cgroup, `backend` reachable directly, the
/// VIP untranslated.
fn assert_the_node_is_as_before(
    o: &Ours,
    node: &NodeHandle,
    client: &PodHandle,
    backend: &PodHandle,
) {
    // The kernel frees programs and maps after an RCU grace period: wait for it, bounded.
    let start = Instant::now();
    loop {
        let alive = still_alive(o);
        if alive.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still in the kernel after cleanup: {alive:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(attached(node.cgroup_dir()), vec![], "nothing on the cgroup");

    // Pod to pod works; the service address is plain unroutable again, as on a node without
    // the mesh (no translation: no backend answers, the connect fails fast or times out).
    let direct = SocketAddr::new(backend.ipv4().into(), 80);
    let r = client.hit(direct, 5, &[]).unwrap();
    assert_eq!(r.counts.get("web-0"), Some(&5), "{r:?}");
    let r = client.hit(VIP, 3, &["--timeout-ms", "1000"]).unwrap();
    eprintln!("connects to the VIP after cleanup: {:?}", r.errors);
    assert_eq!(r.ok(), 0, "the VIP is no longer translated: {r:?}");
    assert_eq!(r.failed(), 3, "{r:?}");
    for e in r.errors.keys() {
        assert!(
            [
                "ENETUNREACH",
                "EHOSTUNREACH",
                "ECONNREFUSED",
                "TIMEOUT",
                "ETIMEDOUT"
            ]
            .contains(&e.as_str()),
            "an untranslated connect's error, not the mesh's: {r:?}"
        );
    }
}

/// Runs cleanup after the agent is gone; checks it succeeded and named the objects. Its stdout.
fn clean(agent: &AgentProcess, node: &NodeHandle) -> String {
    let out = cleanup(agent, node);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "mesh_connect4",
        "mesh_sockops",
        "mesh_tcp_receive_reset",
        "mesh_sk_error_report",
    ] {
        assert!(
            stdout.contains(&format!("links/{name} (link id")),
            "{stdout}"
        );
    }
    for name in ["SERVICES", "COUNTERS", "BYPASS_SOCKS"] {
        assert!(stdout.contains(&format!("maps/{name} (map id")), "{stdout}");
    }
    assert!(stdout.contains("cleanup done: "), "{stdout}");
    eprintln!("{stdout}");
    stdout.into_owned()
}
