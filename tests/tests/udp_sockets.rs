//! Connected UDP follows its backend: a socket our connect program translated to a backend that
//! leaves the service is destroyed (`sock_diag` `SOCK_DESTROY`) so the application reconnects to a
//! current one, as kube-proxy's conntrack flush and Cilium's socket termination do; a socket
//! connected to the pod address directly is left alone; the destroyed socket's flow closes; a
//! reply without its reverse translation is counted.

mod fixture;

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use fixture::{Mesh, vip4};
use mesh_agent::datapath::spec::{Protocol, ServiceSpec};
use mesh_common::{
    PROTO_UDP,
    counters::CTR_REVNAT_MISS,
    event::{EV_CLOSE, EV_OPEN},
    sock::{RevNatKey, RevNatValue},
};
use serde::{Deserialize, Serialize};

fn udp_service(vip: SocketAddr, backends: Vec<SocketAddr>) -> ServiceSpec {
    ServiceSpec {
        protocol: Protocol::Udp,
        ..ServiceSpec::tcp(vip, backends)
    }
}

/// Datagrams that reached UDP port 53 of the pod (an iptables counter in its namespace).
fn datagrams_to_53(pod: &mesh_tests::PodHandle) -> u64 {
    let out = pod
        .exec("iptables", ["-nvxL", "INPUT"])
        .expect("iptables -L in the pod");
    out.lines()
        .find(|l| l.contains("udp dpt:53"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counting rule in {out}"))
}

fn count_datagrams_to_53(pod: &mesh_tests::PodHandle) {
    pod.exec(
        "iptables",
        ["-I", "INPUT", "-p", "udp", "--dport", "53", "-j", "ACCEPT"],
    )
    .expect("iptables in the pod");
}

fn wait_for(path: &Path) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if path.exists() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    false
}

/// One request/reply on a connected socket: the name of the server that answered, or the errno
/// of the first call that failed.
fn ask(s: &UdpSocket) -> Result<String, i32> {
    s.send(b"q\n").map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let mut buf = [0u8; 64];
    let n = s
        .recv(&mut buf)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

fn cookie(s: &UdpSocket) -> u64 {
    let mut v = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_COOKIE writes a u64 into `v`, whose size is `len`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "SO_COOKIE");
    v
}

/// What the client pod saw.
#[derive(Debug, Serialize, Deserialize)]
struct Seen {
    /// Through the service, before the removal.
    before: Result<String, i32>,
    /// The same socket right after: `send` then `recv` separately.
    send_after: Option<i32>,
    recv_after: Option<i32>,
    /// Later sends on the old socket (each must fail).
    later_sends_ok: u32,
    /// The direct socket (to A's pod address), before and after.
    direct_before: Result<String, i32>,
    direct_after: Result<String, i32>,
    /// A new socket to the service.
    fresh: Result<String, i32>,
    cookie: u64,
    /// An `AF_INET6` socket connected to the service's IPv4-mapped address (Java's and .NET's
    /// default), before the removal and the errno of its first `send` after.
    mapped_before: Result<String, i32>,
    mapped_send_after: Option<i32>,
}

/// In the client pod: a socket connected through the service (to A) and one connected to A's
/// pod address; after the test removed A, what each of them and a new socket see.
fn hold_sockets(dns: SocketAddr, a: SocketAddr, connected: &Path, removed: &Path) -> Seen {
    let open = |to: SocketAddr| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s.connect(to).unwrap();
        s
    };
    let old = open(dns);
    let direct = open(a);
    let mapped = UdpSocket::bind("[::]:0").unwrap();
    mapped
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let IpAddr::V4(vip) = dns.ip() else {
        unreachable!("an IPv4 service")
    };
    mapped
        .connect(SocketAddr::new(vip.to_ipv6_mapped().into(), dns.port()))
        .unwrap();
    let before = ask(&old);
    let direct_before = ask(&direct);
    let mapped_before = ask(&mapped);
    std::fs::write(connected, b"").unwrap();
    assert!(wait_for(removed), "the test never removed A");
    let send_after = old.send(b"q\n").err().and_then(|e| e.raw_os_error());
    let mut buf = [0u8; 64];
    let recv_after = old.recv(&mut buf).err().and_then(|e| e.raw_os_error());
    let later_sends_ok = (0..5).filter(|_| old.send(b"q\n").is_ok()).count() as u32;
    let mapped_send_after = mapped.send(b"q\n").err().and_then(|e| e.raw_os_error());
    let direct_after = ask(&direct);
    let fresh = ask(&open(dns));
    Seen {
        before,
        send_after,
        recv_after,
        later_sends_ok,
        direct_before,
        direct_after,
        fresh,
        cookie: cookie(&old),
        mapped_before,
        mapped_send_after,
    }
}

#[test]
fn a_connected_udp_socket_to_a_removed_backend_is_ended_and_a_direct_one_is_not() {
    let Some(_k) = mesh_tests::kernel_test("udp_sockets_end") else {
        return;
    };
    let mut m = Mesh::new("udp_sockets_end", 2).expect("cluster");
    let dns = vip4(53);
    let [a, b] = [m.backend_addrs(53)[0], m.backend_addrs(53)[1]];
    count_datagrams_to_53(&m.backends[0]);
    // Only A first, so the held socket is translated to A; then B joins.
    m.dp.apply_service(&udp_service(dns, vec![a])).unwrap();
    let mut ring = m.dp.take_events().unwrap();
    let marks = PathBuf::from(format!(
        "/tmp/mesh-test-udp_sockets_end-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&marks);
    std::fs::create_dir_all(&marks).unwrap();
    let (connected, removed) = (marks.join("connected"), marks.join("removed"));
    let client = m.client.clone();
    let child = {
        let (connected, removed) = (connected.clone(), removed.clone());
        thread::spawn(move || {
            client
                .run(move || hold_sockets(dns, a, &connected, &removed))
                .unwrap()
        })
    };
    assert!(wait_for(&connected), "the client never connected");
    m.dp.apply_service(&udp_service(dns, vec![a, b])).unwrap();
    assert_eq!(
        m.dp.end_stale_udp_sockets().destroyed,
        0,
        "nothing removed yet"
    );
    // A leaves the service.
    let started = Instant::now();
    m.dp.apply_service(&udp_service(dns, vec![b])).unwrap();
    let report = m.dp.end_stale_udp_sockets();
    let took = started.elapsed();
    let at_a = datagrams_to_53(&m.backends[0]);
    std::fs::write(&removed, b"").unwrap();
    let seen = child.join().unwrap();
    let _ = std::fs::remove_dir_all(&marks);
    println!("{seen:?}; sweep {report:?} in {took:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        (report.destroyed, report.failed),
        (2, 0),
        "exactly the two translated sockets (AF_INET and dual-stack AF_INET6)"
    );
    assert!(took < Duration::from_secs(1), "ended within 1 s: {took:?}");
    assert_eq!(m.dp.udp_sockets_destroyed(), 2);
    assert_eq!(m.dp.udp_socket_destroy_failures(), 0);
    assert_eq!(seen.before.as_deref(), Ok("b0"), "{seen:?}");
    // udp_abort disconnected the socket and left ECONNABORTED pending: the next send finds no
    // destination, the next receive reports the abort.
    assert_eq!(seen.send_after, Some(libc::EDESTADDRREQ), "{seen:?}");
    assert_eq!(seen.recv_after, Some(libc::ECONNABORTED), "{seen:?}");
    assert_eq!(seen.later_sends_ok, 0, "{seen:?}");
    assert_eq!(seen.mapped_before.as_deref(), Ok("b0"), "{seen:?}");
    assert_eq!(seen.mapped_send_after, Some(libc::EDESTADDRREQ), "{seen:?}");
    assert_eq!(
        seen.fresh.as_deref(),
        Ok("b1"),
        "a new socket reaches B: {seen:?}"
    );
    // The direct socket to A's pod address is not ours to end.
    assert_eq!(seen.direct_before.as_deref(), Ok("b0"), "{seen:?}");
    assert_eq!(seen.direct_after.as_deref(), Ok("b0"), "{seen:?}");
    // A received nothing more than the direct socket's datagram after the removal.
    assert_eq!(
        datagrams_to_53(&m.backends[0]),
        at_a + 1,
        "the old sockets never again delivered to A"
    );
    // The destroyed socket's flow: opened at connect to A, closed when the application closed it.
    thread::sleep(Duration::from_millis(300));
    let evs: Vec<_> = mesh_agent::datapath::events::drain(&mut ring)
        .into_iter()
        .filter(|e| e.cookie == seen.cookie && e.proto == PROTO_UDP)
        .collect();
    let a_be = u32::from_ne_bytes(m.backends[0].ipv4().octets());
    let kinds: Vec<u8> = evs.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, vec![EV_OPEN, EV_CLOSE], "{evs:?}");
    assert!(evs.iter().all(|e| e.backend_addr_be[0] == a_be), "{evs:?}");
    assert_eq!(
        m.dp.revnat_entries(),
        0,
        "reverse translations left with the sockets"
    );
}

#[test]
fn a_reply_without_its_reverse_translation_is_counted() {
    let Some(_k) = mesh_tests::kernel_test("udp_sockets_revnat_miss") else {
        return;
    };
    let mut m = Mesh::new("udp_sockets_revnat_miss", 1).expect("cluster");
    let dns = vip4(53);
    m.dp.apply_service(&udp_service(dns, m.backend_addrs(53)))
        .unwrap();
    let pins = m.cluster.bpffs_dir().unwrap().join("a").join("maps");
    let before = m.dp.counter(CTR_REVNAT_MISS).unwrap();
    let froms: Vec<String> = m
        .client
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            // Two queries; both replies wait in the socket (recvmsg4 runs at receive time).
            s.send_to(b"q\n", dns).unwrap();
            s.send_to(b"q\n", dns).unwrap();
            thread::sleep(Duration::from_millis(200));
            let mut buf = [0u8; 64];
            let mut froms = vec![s.recv_from(&mut buf).unwrap().1.to_string()];
            // What the LRU evicting a live socket's entry would leave.
            let mut revnat: aya::maps::HashMap<_, RevNatKey, RevNatValue> =
                aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(
                    aya::maps::MapData::from_pin(pins.join("REVNAT")).unwrap(),
                ))
                .unwrap();
            let keys: Vec<_> = revnat.keys().flatten().collect();
            assert_eq!(keys.len(), 1, "one socket, one backend");
            for k in keys {
                revnat.remove(&k).unwrap();
            }
            froms.push(s.recv_from(&mut buf).unwrap().1.to_string());
            froms
        })
        .unwrap();
    assert_eq!(froms[0], dns.to_string(), "translated back: {froms:?}");
    assert_eq!(
        froms[1],
        m.backend_addrs(53)[0].to_string(),
        "without its entry the reply shows the backend: {froms:?}"
    );
    assert_eq!(m.dp.counter(CTR_REVNAT_MISS).unwrap(), before + 1);
}

/// The static model: UDP service `dns` at 10.96.0.10:53 with `backends`.
fn dns_model(backends: &[&mesh_tests::PodHandle]) -> String {
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
        "node: a\nservices:\n  - name: dns\n    clusterIPs: [10.96.0.10]\n    ports:\n      - {{ name: dns, port: 53, protocol: UDP }}\n    endpoints:\n{}",
        endpoints.concat()
    )
}

/// The same through the agent binary: the owner sweeps after the reconciliation that removed the
/// endpoint from the static file, and `meshctl status` counts the destroyed socket.
#[test]
fn the_agent_ends_the_socket_when_the_endpoint_leaves_and_counts_it() {
    let Some(_k) = mesh_tests::kernel_test("udp_sockets_agent") else {
        return;
    };
    let cluster = mesh_tests::Cluster::new("udp_sockets_agent").unwrap();
    let node = cluster.add_node("a").unwrap();
    let client = cluster.add_pod(&node, "client").unwrap();
    let mut pods = Vec::new();
    let mut servers = Vec::new();
    for name in ["b0", "b1"] {
        let pod = cluster.add_pod(&node, name).unwrap();
        servers.push(
            pod.serve(name, &[], &[SocketAddr::new(pod.ipv4().into(), 53)])
                .unwrap(),
        );
        pods.push(pod);
    }
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).unwrap();
    let config = work.join("mesh.yaml");
    mesh_tests::agent::write_atomically(&config, &dns_model(&[&pods[0]])).unwrap();
    let mut agent = mesh_tests::agent::AgentProcess::new(
        node.clone(),
        config.clone(),
        cluster.bpffs_dir().unwrap().join("a"),
        work.join("admin.sock"),
    );
    agent.start().unwrap();
    let dns = vip4(53);
    let (connected, removed) = (work.join("connected"), work.join("removed"));
    let child = {
        let (client, connected, removed) = (client.clone(), connected.clone(), removed.clone());
        thread::spawn(move || {
            client
                .run(move || {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    s.connect(dns).unwrap();
                    let before = ask(&s);
                    std::fs::write(&connected, b"").unwrap();
                    assert!(wait_for(&removed), "the test never removed b0");
                    let start = Instant::now();
                    // The file is polled every 500 ms; until the agent acts, b0 still answers.
                    let mut failed = None;
                    while start.elapsed() < Duration::from_secs(5) {
                        match ask(&s) {
                            Err(e) if e != libc::EAGAIN => {
                                failed = Some((e, start.elapsed().as_millis() as u64));
                                break;
                            }
                            _ => thread::sleep(Duration::from_millis(20)),
                        }
                    }
                    let fresh = UdpSocket::bind("0.0.0.0:0").unwrap();
                    fresh
                        .set_read_timeout(Some(Duration::from_secs(1)))
                        .unwrap();
                    fresh.connect(dns).unwrap();
                    (before, failed, ask(&fresh))
                })
                .unwrap()
        })
    };
    assert!(wait_for(&connected), "the client never connected");
    mesh_tests::agent::write_atomically(&config, &dns_model(&[&pods[1]])).unwrap();
    std::fs::write(&removed, b"").unwrap();
    let (before, failed, fresh) = child.join().unwrap();
    println!("before {before:?}, failed {failed:?}, fresh {fresh:?}");
    assert_eq!(before.as_deref(), Ok("b0"));
    let (errno, after_ms) = failed.expect("the old socket failed");
    // Ended (`udp_abort`): a `send` after it fails with EDESTADDRREQ (disconnected); if the abort
    // lands between `ask`'s send and its `recv`, the `recv` reports it as ECONNABORTED.
    assert!(
        errno == libc::EDESTADDRREQ || errno == libc::ECONNABORTED,
        "the socket was not ended: errno {errno}"
    );
    assert!(
        after_ms < 2_000,
        "file poll (500 ms) + reconcile + sweep: {after_ms} ms"
    );
    assert_eq!(fresh.as_deref(), Ok("b1"));
    // Agent-side counters reach `meshctl status` with the kernel's (about once a second).
    let start = Instant::now();
    loop {
        let s = agent.meshctl_json(&["status"]).unwrap();
        if s["counters"]["udp_sockets_destroyed"] == 1 {
            assert!(
                s["counters"]["udp_socket_destroy_failed"]
                    .as_u64()
                    .unwrap_or(0)
                    == 0,
                "{s}"
            );
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{s}");
        thread::sleep(Duration::from_millis(100));
    }
    drop(agent);
    drop(servers);
}
