//! `mesh-demo`: the README's first command. Builds a two-node cluster in a box, attaches the
//! mesh's kernel data path on each node, sends real traffic to a service and narrates what the
//! kernel did: load balancing, flow events, a backend killed (circuit opens, fail-fast), its
//! recovery through a half-open probe, and same-node bypass.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::{MapData, RingBuf};
use mesh_agent::datapath::{
    BackendStatus, Datapath, DatapathConfig, events, ip_from_be, service_key,
    spec::{Algorithm, CircuitSettings, Protocol, ServiceSpec},
};
use mesh_common::{
    backend::{CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN},
    counters::COUNTER_NAMES,
    event::{EV_CLOSE, EV_EJECT, EV_FAIL, EV_OPEN, EV_RECOVER, EV_REJECT, FlowEvent},
};
use mesh_tests::{Cluster, PodChild, PodHandle};

const VIP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);

fn main() -> Result<()> {
    ensure!(
        mesh_tests::is_root(),
        "mesh-demo needs root: it creates namespaces and loads eBPF"
    );
    let started = Instant::now();
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: single-threaded here, before anything reads the environment.
        unsafe { std::env::set_var("RUST_LOG", "warn,mesh_ebpf=debug") };
    }
    mesh_agent::logging::init(false);
    step(
        1,
        "Build a cluster in a box: 2 nodes, 4 pods (network namespaces + veth + cgroups)",
    );
    let cluster = Cluster::new("mesh-demo")?;
    let node_a = cluster.add_node("node-a")?;
    let node_b = cluster.add_node("node-b")?;
    let client = cluster.add_pod(&node_a, "client")?;
    let web: Vec<PodHandle> = vec![
        cluster.add_pod(&node_a, "web-0")?,
        cluster.add_pod(&node_a, "web-1")?,
        cluster.add_pod(&node_b, "web-2")?,
    ];
    for p in std::iter::once(&client).chain(&web) {
        say(&format!(
            "pod {:<7} on {:<7} {:<12} {}",
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

    step(
        2,
        "Attach the mesh's kernel programs to each node's cgroup (maps and links pinned)",
    );
    let mut dp = Datapath::load(&DatapathConfig {
        cgroup: node_a.cgroup_dir().to_path_buf(),
        pin_dir: cluster.bpffs_dir()?.join("node-a"),
    })
    .context("attaching the data path on node-a")?;
    let _dp_b = Datapath::load(&DatapathConfig {
        cgroup: node_b.cgroup_dir().to_path_buf(),
        pin_dir: cluster.bpffs_dir()?.join("node-b"),
    })
    .context("attaching the data path on node-b")?;
    let mut ring = dp.take_events().context("event ring")?;
    let mut kernel_log = dp.take_logger();
    say(&format!("node-a cgroup {}", node_a.cgroup_dir().display()));
    let spec = ServiceSpec {
        algorithm: Algorithm::RoundRobin,
        circuit: CircuitSettings {
            max_connections: 100,
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(3),
            max_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
        },
        ..ServiceSpec::tcp(
            VIP,
            web.iter().map(|p| SocketAddr::new(p.ipv4().into(), 80)),
        )
    };
    dp.apply_service(&spec)?;
    say(&format!(
        "service web {VIP} → web-0, web-1 (node-a), web-2 (node-b); round robin; eject after 3 failures for 3 s"
    ));

    step(
        3,
        "client connects to the service address 30 times (connect() rewritten in the kernel)",
    );
    let r = client.hit(VIP, 30, &[])?;
    say(&format!(
        "answers by backend: {:?}; errors: {:?}; getpeername showed the VIP: {}",
        r.counts,
        r.errors,
        r.peer_mismatch == 0
    ));
    say(&format!(
        "connect latency p50 {} µs, p99 {} µs",
        r.connect_us.p50, r.connect_us.p99
    ));
    let names = pod_names(&cluster);
    show_events(&mut ring, &names, 4);

    step(
        4,
        "Kill web-1: its connects are refused; the kernel counts them and opens its circuit",
    );
    servers[1] = None;
    let r = client.hit(VIP, 30, &[])?;
    say(&format!(
        "answers: {:?}; errors seen by the client: {:?}",
        r.counts, r.errors
    ));
    show_backends(&dp)?;
    show_events(&mut ring, &names, 3);
    say("kernel log (aya-log, debug level, forwarded into the agent's tracing output):");
    if let Some(l) = kernel_log.as_mut() {
        l.flush();
    }
    let ejected = Instant::now();

    step(
        5,
        "web-1 is back, but its circuit is open: no connection reaches it until the ejection ends",
    );
    servers[1] = Some(web[1].serve("web-1", &[SocketAddr::new(web[1].ipv4().into(), 80)], &[])?);
    let r = client.hit(VIP, 12, &[])?;
    say(&format!("answers: {:?}", r.counts));
    std::thread::sleep(
        Duration::from_secs(3).saturating_sub(ejected.elapsed()) + Duration::from_millis(300),
    );
    say("ejection time over: the next connection to web-1 is the one half-open probe");
    let r = client.hit(VIP, 12, &[])?;
    say(&format!("answers: {:?}", r.counts));
    show_backends(&dp)?;
    show_events(&mut ring, &names, 3);

    step(
        6,
        "Fail fast: a service with no endpoints fails connect() at once (EHOSTUNREACH)",
    );
    let empty = SocketAddr::new(VIP.ip(), 81);
    dp.apply_service(&ServiceSpec::tcp(empty, []))?;
    let r = client.hit(empty, 100, &[])?;
    say(&format!(
        "{empty}: errors {:?}, connect p50 {} µs",
        r.errors, r.connect_us.p50
    ));

    step(
        7,
        "Same-node bypass: client ↔ web-0 sockets are spliced by sk_msg, skipping TCP/IP",
    );
    let iface = client.host_ifname().to_owned();
    let bytes = || -> Result<u64> {
        let s = node_a.iface_stats(&iface)?;
        Ok(s.rx_bytes + s.tx_bytes)
    };
    let web0 = SocketAddr::new(web[0].ipv4().into(), 80);
    let b0 = bytes()?;
    let t = client.transfer(web0, 8 << 20)?;
    let through_stack = bytes()? - b0;
    dp.set_local_endpoints(&[client.ipv4().into(), web[0].ipv4().into()])?;
    let b1 = bytes()?;
    let t2 = client.transfer(web0, 8 << 20)?;
    let bypassed = bytes()? - b1;
    say(&format!(
        "8 MiB echoed: through the stack {through_stack} bytes crossed the veth (sha256 ok: {}); with bypass {bypassed} bytes (sha256 ok: {})",
        t.sha256_sent == t.sha256_received,
        t2.sha256_sent == t2.sha256_received
    ));

    step(8, "Kernel reason counters on node-a");
    for (name, v) in dp.counters()? {
        if v > 0 {
            say(&format!("{name:<26} {v}"));
        }
    }
    let _ = COUNTER_NAMES;
    println!(
        "\ndemo finished in {:.1?}; tearing the cluster down",
        started.elapsed()
    );
    Ok(())
}

fn step(n: u32, what: &str) {
    println!("\n[{n}] {what}");
}

fn say(line: &str) {
    println!("    {line}");
}

/// cgroup inode (what flow events carry) → pod name.
fn pod_names(cluster: &Cluster) -> BTreeMap<u64, String> {
    cluster
        .pods()
        .iter()
        .filter_map(|p| {
            Some((
                std::fs::metadata(p.cgroup_dir()).ok()?.ino(),
                p.name().to_owned(),
            ))
        })
        .collect()
}

fn show_backends(dp: &Datapath) -> Result<()> {
    let rows: Vec<BackendStatus> = dp.backend_status(&service_key(VIP, Protocol::Tcp))?;
    say("backend            circuit    active  total  failures  ejections");
    for b in rows {
        let circuit = match b.state.circuit {
            CIRCUIT_CLOSED => "closed",
            CIRCUIT_OPEN => "OPEN",
            CIRCUIT_HALF_OPEN => "half-open",
            _ => "?",
        };
        say(&format!(
            "{:<18} {:<10} {:>6} {:>6} {:>9} {:>10}",
            b.addr.to_string(),
            circuit,
            b.state.active,
            b.state.total,
            b.state.failures,
            b.state.ejections
        ));
    }
    Ok(())
}

fn show_events(ring: &mut RingBuf<MapData>, names: &BTreeMap<u64, String>, max_per_kind: usize) {
    let evs: Vec<FlowEvent> = events::drain(ring);
    let mut shown: BTreeMap<u8, usize> = BTreeMap::new();
    let mut hidden = 0;
    for e in &evs {
        let n = shown.entry(e.kind).or_default();
        if *n >= max_per_kind {
            hidden += 1;
            continue;
        }
        *n += 1;
        let kind = match e.kind {
            EV_OPEN => "open",
            EV_CLOSE => "close",
            EV_REJECT => "reject",
            EV_FAIL => "fail",
            EV_EJECT => "EJECT",
            EV_RECOVER => "RECOVER",
            _ => "?",
        };
        let pod = names.get(&e.cgroup_id).map_or("?", String::as_str);
        let svc = SocketAddr::new(
            ip_from_be(e.svc_addr_be, e.family),
            u16::from_be(e.svc_port_be),
        );
        let backend = SocketAddr::new(
            ip_from_be(e.backend_addr_be, e.family),
            u16::from_be(e.backend_port_be),
        );
        let extra = if e.kind == EV_CLOSE {
            format!(
                " sent {} B, received {} B, {} µs",
                e.bytes_sent,
                e.bytes_received,
                e.duration_ns / 1000
            )
        } else if e.reason != 0 {
            format!(" reason {}", e.reason)
        } else {
            String::new()
        };
        say(&format!(
            "flow {kind:<7} {pod} → {svc} via {backend}{extra}"
        ));
    }
    if hidden > 0 {
        say(&format!("… and {hidden} more flow events"));
    }
}
