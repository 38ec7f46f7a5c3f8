//! Proves the cluster-in-a-box harness: pod-to-pod traffic over IPv4 and IPv6, closures and
//! commands inside pods, teardown on drop and on panic, concurrent clusters, leftover cleaning.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use mesh_tests::{Cluster, PodHandle, kernel_test};

fn v4(pod: &PodHandle, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(pod.ipv4()), port)
}

fn v6(pod: &PodHandle, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(pod.ipv6()), port)
}

/// Everything a cluster made that must be gone after teardown.
#[derive(Debug, Default, Clone)]
struct Footprint {
    netns: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Footprint {
    fn of(cluster: &Cluster) -> Self {
        let mut f = Self {
            netns: cluster
                .netns_names()
                .iter()
                .map(|n| Path::new("/run/netns").join(n))
                .collect(),
            dirs: vec![cluster.root_cgroup(), cluster.host_cgroup_root()],
        };
        for node in cluster.nodes() {
            f.dirs.push(node.cgroup_dir().to_path_buf());
        }
        for pod in cluster.pods() {
            f.dirs.push(pod.cgroup_dir().to_path_buf());
        }
        f
    }

    fn assert_present(&self) {
        for p in self.netns.iter().chain(&self.dirs) {
            assert!(p.exists(), "{} should exist", p.display());
        }
    }

    fn assert_gone(&self) {
        for p in self.netns.iter().chain(&self.dirs) {
            assert!(!p.exists(), "{} should be gone", p.display());
        }
    }
}

fn host_sysctl(key: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys").join(key)).unwrap_or_default()
}

#[test]
fn meshpod_path_finds_the_built_binary() {
    let found = mesh_tests::meshpod_path().expect("meshpod_path");
    assert_eq!(
        found.canonicalize().unwrap(),
        Path::new(env!("CARGO_BIN_EXE_meshpod"))
            .canonicalize()
            .unwrap()
    );
}

#[test]
fn pod_to_pod_tcp_and_udp_over_ipv4_and_ipv6() -> Result<()> {
    let Some(_k) = kernel_test("harness_pod_to_pod") else {
        return Ok(());
    };
    let host_dad = host_sysctl("net/ipv6/conf/default/accept_dad");
    let host_fwd = host_sysctl("net/ipv4/ip_forward");

    let cluster = Cluster::new("pod_to_pod")?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let a1 = cluster.add_pod(&a, "a1")?;
    let a2 = cluster.add_pod(&a, "a2")?;
    let b1 = cluster.add_pod(&b, "b1")?;

    let _a2 = a2.serve(
        "a2",
        &[v4(&a2, 8080), v6(&a2, 8080)],
        &[v4(&a2, 8081), v6(&a2, 8081)],
    )?;
    let _b1 = b1.serve(
        "b1",
        &[v4(&b1, 8080), v6(&b1, 8080)],
        &[v4(&b1, 8081), v6(&b1, 8081)],
    )?;
    let before = a.iface_stats(a2.host_ifname())?;

    // Same node (a1 → a2) and across nodes (a1 → b1, b1 → a2), TCP and UDP, v4 and v6.
    for (client, server) in [(&a1, &a2), (&a1, &b1), (&b1, &a2)] {
        for addr in [v4(server, 8080), v6(server, 8080)] {
            let r = client.hit(addr, 20, &["--concurrency", "4"])?;
            assert_eq!(r.counts.get(server.name()), Some(&20), "{addr}: {r:?}");
            assert!(r.errors.is_empty(), "{addr}: {r:?}");
            assert_eq!(r.peer_mismatch, 0, "{addr}: {r:?}");
            assert_eq!(r.per_conn.len(), 20);
        }
        for addr in [v4(server, 8081), v6(server, 8081)] {
            let r = client.hit(addr, 3, &["--udp"])?;
            assert_eq!(r.counts.get(server.name()), Some(&3), "{addr}: {r:?}");
        }
    }
    let after = a.iface_stats(a2.host_ifname())?;
    assert!(
        after.tx_packets > before.tx_packets + 100,
        "{before:?} → {after:?}"
    );

    // Byte-exact echo and request/response across nodes.
    let t = a1.transfer(v6(&b1, 8080), 1 << 20)?;
    assert_eq!((t.name.as_str(), t.received), ("b1", 1 << 20), "{t:?}");
    assert_eq!(t.sha256_sent, t.sha256_received);
    let rr = a1.rr(v4(&a2, 8080), 50, 512)?;
    assert_eq!((rr.ok, rr.error.as_deref()), (50, None), "{rr:?}");

    // Consistent source ports: the same ports work again at once (RST close, no TIME_WAIT).
    // The base is below the ephemeral range (32768–60999): a1's earlier connects close first
    // and leave TIME_WAIT sockets on ephemeral ports, and the kernel refuses to bind a port
    // held by a TIME_WAIT socket of a connect() without SO_REUSEADDR (EADDRINUSE) even when
    // the new socket sets SO_REUSEADDR — a port inside the range failed ~1 run in 100.
    for _ in 0..2 {
        let r = a1.hit(v4(&b1, 8080), 5, &["--bind-port-base", "21000"])?;
        assert_eq!(r.ok(), 5, "{r:?}");
    }

    // --hold reports, keeps the connections, and exits when stdin closes.
    let mut cmd = a1.meshpod()?;
    cmd.args([
        "hit",
        "--addr",
        &v4(&a2, 8080).to_string(),
        "--count",
        "10",
        "--hold",
    ]);
    let mut held = a1.spawn(cmd)?;
    let line = held.next_line(Duration::from_secs(10))?;
    let report: mesh_tests::HitReport = serde_json::from_str(&line)?;
    assert_eq!(report.ok(), 10);
    assert!(held.try_status()?.is_none(), "exited while holding");
    held.close_stdin();
    assert!(held.wait_timeout(Duration::from_secs(5))?.success());

    // Nothing routes out of the cluster.
    let r = a1.hit("192.0.2.1:80".parse()?, 1, &["--timeout-ms", "500"])?;
    assert_eq!(r.failed(), 1, "{r:?}");

    // The host's own settings were not touched.
    assert_eq!(host_sysctl("net/ipv6/conf/default/accept_dad"), host_dad);
    assert_eq!(host_sysctl("net/ipv4/ip_forward"), host_fwd);
    Ok(())
}

#[test]
fn commands_and_closures_run_inside_the_pod() -> Result<()> {
    let Some(_k) = kernel_test("harness_closures") else {
        return Ok(());
    };
    let cluster = Cluster::new("closures")?;
    let a = cluster.add_node("a")?;
    let a1 = cluster.add_pod(&a, "a1")?;
    let mine = std::fs::read_link("/proc/self/ns/net")?;

    let (netns, cgroup, bound) = a1.run(|| {
        let netns = std::fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string());
        let cgroup = std::fs::read_to_string("/proc/self/cgroup");
        // Binding the pod's own address only works inside its namespace.
        let bound = std::net::TcpListener::bind((std::net::Ipv4Addr::new(10, 1, 0, 2), 0)).is_ok();
        (netns.unwrap_or_default(), cgroup.unwrap_or_default(), bound)
    })?;
    assert_ne!(netns, mine.display().to_string());
    assert!(netns.starts_with("net:["), "{netns}");
    let suffix = format!("/{}/a/a1", cluster.prefix());
    let v2 = cgroup
        .lines()
        .find(|l| l.starts_with("0::"))
        .unwrap_or_default();
    assert!(v2.ends_with(&suffix), "{v2:?} should end with {suffix}");
    assert!(bound);

    // A command joins the same cgroup and namespace.
    let out = a1.exec("cat", ["/proc/self/cgroup"])?;
    assert!(
        out.lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&suffix)),
        "{out}"
    );
    let addrs = a1.exec("ip", ["-o", "addr", "show", "dev", "eth0"])?;
    assert!(
        addrs.contains("10.1.0.2/32") && addrs.contains("fd00:1::2/128"),
        "{addrs}"
    );

    // Node processes run in the node's namespace, outside the pods' cgroup tree.
    let node_cg = a.run(|| std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default())?;
    let host_suffix = format!("/{}-host/a", cluster.prefix());
    assert!(
        node_cg
            .lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&host_suffix)),
        "{node_cg}"
    );

    // Panics and timeouts come back as errors.
    let err = a1
        .run(|| -> u32 { panic!("boom inside the pod") })
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("boom inside the pod"),
        "{err:#}"
    );
    let err = a1
        .run_timeout(Duration::from_millis(200), || {
            std::thread::sleep(Duration::from_secs(30));
        })
        .unwrap_err();
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");
    let big = a1.run(|| vec![7u8; 300_000])?;
    assert_eq!(big.len(), 300_000);
    Ok(())
}

#[test]
fn drop_tears_everything_down() -> Result<()> {
    let Some(_k) = kernel_test("harness_drop") else {
        return Ok(());
    };
    let cluster = Cluster::new("drop")?;
    let a = cluster.add_node("a")?;
    let a1 = cluster.add_pod(&a, "a1")?;
    let bpf = cluster.bpffs_dir()?;
    std::fs::create_dir(bpf.join("sub"))?;
    // A process the test started itself and never stopped.
    let mut sleeper = a1.command("sleep").arg("1000").spawn()?;
    let footprint = Footprint::of(&cluster);
    footprint.assert_present();
    drop(cluster);
    footprint.assert_gone();
    assert!(!bpf.exists(), "{} should be gone", bpf.display());
    let status = sleeper.wait()?;
    assert!(!status.success(), "the pod's process was killed: {status}");
    Ok(())
}

#[test]
fn panic_inside_a_test_still_tears_down() {
    let Some(_k) = kernel_test("harness_panic") else {
        return;
    };
    let seen = Mutex::new(Footprint::default());
    let result = std::panic::catch_unwind(|| {
        let cluster = Cluster::new("panic").expect("cluster");
        let a = cluster.add_node("a").expect("node");
        cluster.add_pod(&a, "a1").expect("pod");
        *seen.lock().unwrap() = Footprint::of(&cluster);
        panic!("the test failed");
    });
    assert!(result.is_err());
    let footprint = seen.into_inner().unwrap();
    assert!(!footprint.netns.is_empty());
    footprint.assert_gone();
}

#[test]
fn concurrent_clusters_do_not_collide() {
    let Some(_k) = kernel_test("harness_concurrent") else {
        return;
    };
    let build = |name: &'static str| {
        move || -> Result<(String, u64)> {
            let cluster = Cluster::new(name)?;
            let a = cluster.add_node("a")?;
            let b = cluster.add_node("b")?;
            let client = cluster.add_pod(&a, "client")?;
            let server = cluster.add_pod(&b, "server")?;
            let _srv = server.serve(name, &[v4(&server, 9000)], &[])?;
            let r = client.hit(v4(&server, 9000), 10, &[])?;
            Ok((
                cluster.prefix().to_owned(),
                r.counts.get(name).copied().unwrap_or(0),
            ))
        }
    };
    let (one, two) = std::thread::scope(|s| {
        let one = s.spawn(build("concurrent_one"));
        let two = s.spawn(build("concurrent_two"));
        (one.join().unwrap(), two.join().unwrap())
    });
    let (one, two) = (one.unwrap(), two.unwrap());
    assert_ne!(one.0, two.0);
    assert_eq!((one.1, two.1), (10, 10));
}

#[test]
fn leftovers_of_a_leaked_cluster_are_removed() -> Result<()> {
    let Some(_k) = kernel_test("harness_leftovers") else {
        return Ok(());
    };
    let cluster = Cluster::new("leftovers")?;
    let old = cluster.add_node("old")?;
    let pod = cluster.add_pod(&old, "oldpod")?;
    let mut sleeper = pod.command("sleep").arg("1000").spawn()?;
    let footprint = Footprint::of(&cluster);
    let prefix = cluster.prefix().to_owned();
    std::mem::forget(cluster);

    let again = Cluster::new("leftovers")?;
    assert_eq!(again.prefix(), prefix);
    for p in &footprint.netns {
        // The fabric is made anew under the same name; the rest must be gone.
        if !p.ends_with(again.fabric_netns()) {
            assert!(!p.exists(), "{} should be gone", p.display());
        }
    }
    assert!(!pod.cgroup_dir().exists());
    assert!(!sleeper.wait()?.success());
    // The names are free again.
    let old = again.add_node("old")?;
    again.add_pod(&old, "oldpod")?;
    again.teardown()?;
    Ok(())
}
