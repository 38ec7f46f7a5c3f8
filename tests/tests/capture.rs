//! Kernel capture of enrolled traffic, fail-closed, the same-node identity policy and `STRICT`
//! peer authentication — the real programs on two harness nodes, real TCP between namespaces.
//! A test listener in node a's namespace stands in for the agent's outbound listener on
//! `10.1.0.1:15001`.

use std::{
    io::{ErrorKind, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use mesh_agent::datapath::{
    Datapath, DatapathConfig, events,
    mesh::{
        IdentityVerdict, MeshEndpointSpec, MeshWorkloadSpec, OriginalDstTable, PeerAuthentication,
    },
    spec::ServiceSpec,
};
use mesh_common::{
    counters::{
        CTR_CAPTURE_MISS, CTR_CAPTURED, CTR_SAME_NODE_DENY, CTR_STRICT_REFUSE_LOCAL,
        CTR_STRICT_REFUSE_REMOTE,
    },
    event::EV_REJECT,
    mesh::CAPTURE_PORT,
};
use mesh_tests::connect::{connect_from, tcp_in_segs};
use mesh_tests::{Cluster, NodeHandle, PodChild, PodHandle};

/// Identity numbers the tests give the pods (the agent would assign them per SPIFFE id).
const ID_CLIENT: u32 = 11;
const ID_NEAR: u32 = 12;
const ID_FAR: u32 = 13;
const ID_STRICT: u32 = 14;

fn vip() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80))
}

/// Two nodes. Node a: `client` (enrolled), `plain` (not enrolled), `near` (enrolled); node b:
/// `far` (enrolled), `strict` (enrolled, `STRICT`), `bplain` (not enrolled). Every pod but
/// `client` serves on port 80. The data path runs on both nodes.
struct Two {
    // Field order is drop order: data paths and servers go before the cluster.
    dp_a: Datapath,
    dp_b: Datapath,
    _servers: Vec<PodChild>,
    a: NodeHandle,
    b: NodeHandle,
    client: PodHandle,
    plain: PodHandle,
    near: PodHandle,
    far: PodHandle,
    strict: PodHandle,
    bplain: PodHandle,
    cluster: Cluster,
}

fn cgroup_id(pod: &PodHandle) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(pod.cgroup_dir()).expect("cgroup"))
}

fn at(pod: &PodHandle) -> SocketAddr {
    SocketAddr::new(pod.ipv4().into(), 80)
}

fn at6(pod: &PodHandle) -> SocketAddr {
    SocketAddr::new(pod.ipv6().into(), 80)
}

impl Two {
    fn new(test: &str) -> Result<Self> {
        let cluster = Cluster::new(test)?;
        let a = cluster.add_node("a")?;
        let b = cluster.add_node("b")?;
        let client = cluster.add_pod(&a, "client")?;
        let plain = cluster.add_pod(&a, "plain")?;
        let near = cluster.add_pod(&a, "near")?;
        let far = cluster.add_pod(&b, "far")?;
        let strict = cluster.add_pod(&b, "strict")?;
        let bplain = cluster.add_pod(&b, "bplain")?;
        let mut servers = Vec::new();
        for p in [&plain, &near, &far, &strict, &bplain] {
            servers.push(p.serve(p.name(), &[at(p), at6(p)], &[])?);
        }
        let load = |node: &NodeHandle| -> Result<Datapath> {
            Datapath::load(&DatapathConfig {
                cgroup: node.cgroup_dir().to_path_buf(),
                pin_dir: cluster.bpffs_dir()?.join(node.name()),
            })
            .with_context(|| format!("loading the data path on node {}", node.name()))
        };
        let dp_a = load(&a)?;
        let dp_b = load(&b)?;
        let mut t = Self {
            dp_a,
            dp_b,
            _servers: servers,
            a,
            b,
            client,
            plain,
            near,
            far,
            strict,
            bplain,
            cluster,
        };
        t.program()?;
        Ok(t)
    }

    /// What the agents would write from the model: workloads, mesh pods, capture address.
    fn program(&mut self) -> Result<()> {
        let ep = |pod: &PodHandle, identity: u32, node: &NodeHandle, strict: bool, v6: bool| {
            MeshEndpointSpec {
                addr: if v6 {
                    pod.ipv6().into()
                } else {
                    pod.ipv4().into()
                },
                identity,
                enrolled: identity != 0,
                local: pod.node() == node,
                peer_auth: if strict {
                    PeerAuthentication::Strict
                } else {
                    PeerAuthentication::Permissive
                },
                default_deny: false,
            }
        };
        for node in [self.a.clone(), self.b.clone()] {
            let mut endpoints = Vec::new();
            for v6 in [false, true] {
                endpoints.extend([
                    ep(&self.client, ID_CLIENT, &node, false, v6),
                    ep(&self.near, ID_NEAR, &node, false, v6),
                    ep(&self.far, ID_FAR, &node, false, v6),
                    ep(&self.strict, ID_STRICT, &node, true, v6),
                ]);
            }
            let wl = |pod: &PodHandle, identity: u32| MeshWorkloadSpec {
                cgroup_id: cgroup_id(pod),
                identity,
                enrolled: identity != 0,
            };
            let workloads: Vec<MeshWorkloadSpec> = if node == self.a {
                vec![
                    wl(&self.client, ID_CLIENT),
                    wl(&self.near, ID_NEAR),
                    wl(&self.plain, 0),
                ]
            } else {
                vec![
                    wl(&self.far, ID_FAR),
                    wl(&self.strict, ID_STRICT),
                    wl(&self.bplain, 0),
                ]
            };
            let dp = if node == self.a {
                &mut self.dp_a
            } else {
                &mut self.dp_b
            };
            dp.set_mesh_endpoints(&endpoints)?;
            dp.set_mesh_workloads(&workloads)?;
            dp.set_capture(
                Some(node.gateway_v4()),
                Some(node.gateway_v6()),
                CAPTURE_PORT,
            )?;
        }
        Ok(())
    }
}

/// Runs `f` with the calling thread in `node`'s network namespace, then returns to ours.
fn in_netns<T>(node: &NodeHandle, f: impl FnOnce() -> T) -> T {
    let ours = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
    let theirs = std::fs::File::open(node.netns_path()).expect("node netns");
    nix::sched::setns(theirs.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns node");
    let out = f();
    nix::sched::setns(ours.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns back");
    out
}

/// The stand-in for the agent's outbound listener, bound in node a's namespace.
fn capture_listener(node: &NodeHandle) -> TcpListener {
    listener_at(
        node,
        SocketAddr::new(node.gateway_v4().into(), CAPTURE_PORT),
    )
}

fn listener_at(node: &NodeHandle, addr: SocketAddr) -> TcpListener {
    let l = in_netns(node, || TcpListener::bind(addr)).expect("bind the capture listener");
    l.set_nonblocking(true).expect("nonblocking");
    l
}

/// Accepts one connection within `limit`.
fn accept_within(l: &TcpListener, limit: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok(c) => return Some(c),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    }
}

/// TCP segments received in `pod`'s namespace so far (`/proc/net/snmp`, `Tcp: InSegs`).
#[test]
fn enrolled_cross_node_connects_are_captured_with_their_original_destination() {
    let Some(_k) = mesh_tests::kernel_test("capture_lookup") else {
        return;
    };
    let mut t = Two::new("capture_lookup").expect("cluster");
    t.dp_a
        .apply_service(&ServiceSpec::tcp(vip(), vec![at(&t.far)]))
        .expect("service");
    let listener = capture_listener(&t.a);
    let table = OriginalDstTable::open(&t.cluster.bpffs_dir().unwrap().join("a")).expect("table");

    // Through the service: captured; the lookup names the pod, the VIP and the client.
    let client = t.client.clone();
    let pending = thread::spawn(move || connect_from(&client, vip(), Duration::from_secs(2)));
    let (mut conn, peer) =
        accept_within(&listener, Duration::from_secs(3)).expect("the capture listener accepts");
    let got = table
        .original_dst(peer)
        .expect("the accepted peer has a capture record");
    assert_eq!(got.dst, at(&t.far), "original destination pod: {got:?}");
    assert_eq!(got.service, Some(vip()), "service VIP recorded: {got:?}");
    assert_eq!(got.src_cgroup_id, cgroup_id(&t.client), "source workload");
    assert_eq!((got.src_identity, got.dst_identity), (ID_CLIENT, ID_FAR));
    assert_eq!(peer.ip(), IpAddr::from(t.client.ipv4()), "client address");
    conn.write_all(b"agent\n").unwrap();
    drop(conn);
    let c = pending.join().unwrap();
    assert_eq!(c.line.as_deref(), Some("agent"), "{c:?}");
    assert_eq!(
        c.peer,
        Some(vip()),
        "getpeername shows the service address: {c:?}"
    );

    // Straight to the pod: captured too, no service.
    let client = t.client.clone();
    let far = at(&t.far);
    let pending = thread::spawn(move || connect_from(&client, far, Duration::from_secs(2)));
    let (mut conn, peer) = accept_within(&listener, Duration::from_secs(3)).expect("accepts");
    let got = table.original_dst(peer).expect("record");
    assert_eq!((got.dst, got.service), (far, None), "{got:?}");
    conn.write_all(b"agent\n").unwrap();
    drop(conn);
    let c = pending.join().unwrap();
    assert_eq!(c.peer, Some(far), "getpeername shows the pod: {c:?}");
    assert_eq!(t.dp_a.counter(CTR_CAPTURED).unwrap(), 2);

    // From a container cgroup below the pod's (the kubelet's layout; the agent lists only the
    // pod's cgroup): the pod's workload all the same.
    let ctr = t.client.cgroup_dir().join("ctr");
    std::fs::create_dir_all(&ctr).unwrap();
    let ctr_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&ctr).unwrap());
    let (client, procs) = (t.client.clone(), ctr.join("cgroup.procs"));
    let pending = thread::spawn(move || {
        client
            .run(move || {
                std::fs::write(&procs, "0").expect("join the container cgroup");
                // Open until the test has looked the record up and answered.
                let mut s = TcpStream::connect_timeout(&far, Duration::from_secs(2)).ok()?;
                let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                let mut b = [0_u8; 6];
                std::io::Read::read_exact(&mut s, &mut b).ok().map(|()| b)
            })
            .unwrap()
    });
    let (conn, ctr_peer) = accept_within(&listener, Duration::from_secs(3)).expect("accepts");
    let got = table.original_dst(ctr_peer).expect("record");
    assert_eq!(got.src_cgroup_id, ctr_id, "{got:?}");
    assert_eq!(got.src_identity, ID_CLIENT, "the pod's identity: {got:?}");
    let mut conn = conn;
    conn.write_all(b"agent\n").unwrap();
    drop(conn);
    assert_eq!(pending.join().unwrap(), Some(*b"agent\n"));
    std::fs::remove_dir(&ctr).expect("the container cgroup is empty again");
    assert_eq!(t.dp_a.counter(CTR_CAPTURED).unwrap(), 3);
    // The record goes when the client socket closes.
    thread::sleep(Duration::from_millis(100));
    assert!(
        table.original_dst(peer).is_none(),
        "closed connections leave no record"
    );

    // Not captured: a non-enrolled pod (to the service and to the pod), an enrolled pod to a
    // pod of its own node.
    for (from, to, want) in [
        (&t.plain, vip(), "far"),
        (&t.plain, far, "far"),
        (&t.client, at(&t.near), "near"),
    ] {
        let c = connect_from(from, to, Duration::from_secs(2));
        assert_eq!(
            c.line.as_deref(),
            Some(want),
            "{} → {to} goes straight to the pod: {c:?}",
            from.name()
        );
    }
    assert!(
        accept_within(&listener, Duration::from_millis(50)).is_none(),
        "nothing else reached the capture listener"
    );
    assert_eq!(t.dp_a.counter(CTR_CAPTURED).unwrap(), 3);
}

#[test]
fn without_the_agent_enrolled_connects_fail_at_once_never_in_plaintext() {
    let Some(_k) = mesh_tests::kernel_test("capture_fail_closed") else {
        return;
    };
    let mut t = Two::new("capture_fail_closed").expect("cluster");
    t.dp_a
        .apply_service(&ServiceSpec::tcp(vip(), vec![at(&t.far)]))
        .expect("service");
    let before = tcp_in_segs(&t.far);
    // Nothing listens on 15001: the node answers the SYN with a reset.
    for to in [vip(), at(&t.far)] {
        let c = connect_from(&t.client, to, Duration::from_secs(2));
        assert_eq!(c.errno, Some(libc::ECONNREFUSED), "{to}: {c:?}");
        assert!(c.elapsed_us < 100_000, "{to} refused at once: {c:?}");
    }
    // Capture not configured at all: refused in the kernel, counted.
    t.dp_a.set_capture(None, None, 0).unwrap();
    let c = connect_from(&t.client, at(&t.far), Duration::from_secs(2));
    assert_eq!(c.errno, Some(libc::ECONNREFUSED), "{c:?}");
    assert!(c.elapsed_us < 100_000, "{c:?}");
    assert_eq!(t.dp_a.counter(CTR_CAPTURE_MISS).unwrap(), 1);
    assert_eq!(
        tcp_in_segs(&t.far),
        before,
        "the server pod received no TCP segment"
    );
    // The non-enrolled pod still reaches it in plaintext (PERMISSIVE).
    let c = connect_from(&t.plain, at(&t.far), Duration::from_secs(2));
    assert_eq!(c.line.as_deref(), Some("far"), "{c:?}");
}

#[test]
fn same_node_identity_verdicts_deny_with_eacces_and_allow_again() {
    let Some(_k) = mesh_tests::kernel_test("capture_same_node") else {
        return;
    };
    let mut t = Two::new("capture_same_node").expect("cluster");
    let mut ring = t.dp_a.take_events().expect("ring");
    let near = at(&t.near);
    let c = connect_from(&t.client, near, Duration::from_secs(2));
    assert_eq!(c.line.as_deref(), Some("near"), "allowed by default: {c:?}");

    let deny = IdentityVerdict {
        src_identity: ID_CLIENT,
        dst_identity: ID_NEAR,
        port: Some(80),
        allow: false,
    };
    t.dp_a.set_identity_verdicts(&[deny]).unwrap();
    let c = connect_from(&t.client, near, Duration::from_secs(2));
    assert_eq!(c.errno, Some(libc::EACCES), "denied: {c:?}");
    assert!(c.elapsed_us < 100_000, "{c:?}");
    assert_eq!(t.dp_a.counter(CTR_SAME_NODE_DENY).unwrap(), 1);
    thread::sleep(Duration::from_millis(150));
    let evs = events::drain(&mut ring);
    let reject = evs
        .iter()
        .find(|e| e.kind == EV_REJECT && u32::from(e.reason) == CTR_SAME_NODE_DENY)
        .expect("a reject event for the denial");
    assert_eq!(
        reject.cgroup_id,
        cgroup_id(&t.client),
        "names the source pod"
    );
    assert_eq!(
        mesh_agent::datapath::ip_from_be(reject.backend_addr_be, reject.family),
        IpAddr::from(t.near.ipv4()),
        "names the destination pod"
    );
    assert_eq!(u16::from_be(reject.backend_port_be), 80);
    // Another source on the node is not affected.
    let c = connect_from(&t.plain, near, Duration::from_secs(2));
    assert_eq!(c.line.as_deref(), Some("near"), "{c:?}");
    // Sources outside the mesh are judged as identity 0 (unauthenticated).
    let unauthenticated = IdentityVerdict {
        src_identity: mesh_common::mesh::UNAUTHENTICATED,
        ..deny
    };
    t.dp_a
        .set_identity_verdicts(&[deny, unauthenticated])
        .unwrap();
    let c = connect_from(&t.plain, near, Duration::from_secs(2));
    assert_eq!(
        c.errno,
        Some(libc::EACCES),
        "plaintext source denied: {c:?}"
    );
    assert_eq!(t.dp_a.counter(CTR_SAME_NODE_DENY).unwrap(), 2);

    t.dp_a.set_identity_verdicts(&[]).unwrap();
    let c = connect_from(&t.client, near, Duration::from_secs(2));
    assert_eq!(c.line.as_deref(), Some("near"), "works again: {c:?}");

    // An ALLOW policy selecting `near` denies what it does not allow; an any-port allow lets
    // the client in again.
    let mut eps: Vec<MeshEndpointSpec> = t.dp_a_endpoints();
    for e in &mut eps {
        if e.addr == IpAddr::from(t.near.ipv4()) {
            e.default_deny = true;
        }
    }
    t.dp_a.set_mesh_endpoints(&eps).unwrap();
    let c = connect_from(&t.client, near, Duration::from_secs(2));
    assert_eq!(c.errno, Some(libc::EACCES), "default deny: {c:?}");
    t.dp_a
        .set_identity_verdicts(&[IdentityVerdict {
            port: None,
            allow: true,
            ..deny
        }])
        .unwrap();
    let c = connect_from(&t.client, near, Duration::from_secs(2));
    assert_eq!(
        c.line.as_deref(),
        Some("near"),
        "allowed on any port: {c:?}"
    );
    assert_eq!(t.dp_a.counter(CTR_SAME_NODE_DENY).unwrap(), 3);
}

impl Two {
    /// Node a's mesh endpoints as [`Two::program`] wrote them.
    fn dp_a_endpoints(&self) -> Vec<MeshEndpointSpec> {
        self.dp_a
            .mesh_endpoints()
            .into_iter()
            .map(|(addr, v)| MeshEndpointSpec {
                addr,
                identity: v.identity,
                enrolled: v.flags & mesh_common::mesh::MESH_F_ENROLLED != 0,
                local: v.flags & mesh_common::mesh::MESH_F_LOCAL != 0,
                peer_auth: if v.flags & mesh_common::mesh::MESH_F_STRICT != 0 {
                    PeerAuthentication::Strict
                } else {
                    PeerAuthentication::Permissive
                },
                default_deny: v.flags & mesh_common::mesh::MESH_F_DEFAULT_DENY != 0,
            })
            .collect()
    }
}

#[test]
fn strict_pods_refuse_plaintext_locally_and_from_other_nodes() {
    let Some(_k) = mesh_tests::kernel_test("capture_strict") else {
        return;
    };
    let mut t = Two::new("capture_strict").expect("cluster");
    let b = t.b.clone();
    in_netns(&b, || t.dp_b.attach_uplink("eth0")).expect("attach the ingress program");
    let strict = at(&t.strict);

    // Same node, not enrolled: refused at connect().
    let c = connect_from(&t.bplain, strict, Duration::from_secs(2));
    assert_eq!(c.errno, Some(libc::EACCES), "{c:?}");
    assert!(c.elapsed_us < 100_000, "{c:?}");
    assert_eq!(t.dp_b.counter(CTR_STRICT_REFUSE_LOCAL).unwrap(), 1);

    // Other node, not enrolled: the SYN is dropped at node b's uplink.
    let before = tcp_in_segs(&t.strict);
    let c = connect_from(&t.plain, strict, Duration::from_millis(1500));
    assert_eq!(c.errno, Some(libc::ETIMEDOUT), "{c:?}");
    assert!(t.dp_b.counter(CTR_STRICT_REFUSE_REMOTE).unwrap() >= 1);
    assert_eq!(tcp_in_segs(&t.strict), before, "the STRICT pod saw nothing");

    // Enrolled, same node: allowed (mesh traffic, judged by identity).
    let c = connect_from(&t.far, strict, Duration::from_secs(2));
    assert_eq!(c.line.as_deref(), Some("strict"), "{c:?}");

    // PERMISSIVE `far` is reachable by everyone, from both nodes.
    for from in [&t.plain, &t.bplain] {
        let c = connect_from(from, at(&t.far), Duration::from_secs(2));
        assert_eq!(
            c.line.as_deref(),
            Some("far"),
            "{} → far: {c:?}",
            from.name()
        );
    }
    // The STRICT pod's own outbound connections get their replies through the uplink.
    let c = connect_from(&t.strict, at(&t.plain), Duration::from_secs(2));
    assert_eq!(c.line.as_deref(), Some("plain"), "{c:?}");
    let drops = t.dp_b.counter(CTR_STRICT_REFUSE_REMOTE).unwrap();

    // Back to PERMISSIVE: plaintext from the other node reaches it again.
    let mut eps = Vec::new();
    for (addr, v) in t.dp_b.mesh_endpoints() {
        eps.push(MeshEndpointSpec {
            addr,
            identity: v.identity,
            enrolled: true,
            local: v.flags & mesh_common::mesh::MESH_F_LOCAL != 0,
            peer_auth: PeerAuthentication::Permissive,
            default_deny: false,
        });
    }
    t.dp_b.set_mesh_endpoints(&eps).unwrap();
    let c = connect_from(&t.plain, strict, Duration::from_secs(2));
    assert_eq!(c.line.as_deref(), Some("strict"), "{c:?}");
    assert_eq!(t.dp_b.counter(CTR_STRICT_REFUSE_REMOTE).unwrap(), drops);
}

#[test]
fn ipv6_enrolled_connects_are_captured_too() {
    let Some(_k) = mesh_tests::kernel_test("capture_ipv6") else {
        return;
    };
    let t = Two::new("capture_ipv6").expect("cluster");
    let listener = listener_at(&t.a, SocketAddr::new(t.a.gateway_v6().into(), CAPTURE_PORT));
    let table = t.dp_a.original_dst_table().expect("table");
    let client = t.client.clone();
    let far = at6(&t.far);
    let pending = thread::spawn(move || connect_from(&client, far, Duration::from_secs(2)));
    let (mut conn, peer) =
        accept_within(&listener, Duration::from_secs(3)).expect("the IPv6 listener accepts");
    assert_eq!(peer.ip(), IpAddr::from(t.client.ipv6()), "client address");
    let got = table.original_dst(peer).expect("record");
    assert_eq!((got.dst, got.service), (far, None), "{got:?}");
    assert_eq!((got.src_identity, got.dst_identity), (ID_CLIENT, ID_FAR));
    conn.write_all(b"agent\n").unwrap();
    drop(conn);
    let c = pending.join().unwrap();
    assert_eq!(c.line.as_deref(), Some("agent"), "{c:?}");
    assert_eq!(c.peer, Some(far), "getpeername shows the pod: {c:?}");
    // Same node over IPv6 is not captured.
    let c = connect_from(&t.client, at6(&t.near), Duration::from_secs(2));
    assert_eq!(c.line.as_deref(), Some("near"), "{c:?}");
    assert_eq!(t.dp_a.counter(CTR_CAPTURED).unwrap(), 1);
}
