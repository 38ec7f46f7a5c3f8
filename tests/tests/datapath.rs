//! Kernel data path with real traffic: socket LB algorithms, circuit breaking, fail fast, UDP,
//! IPv6, getpeername, same-node bypass and flow events — the real programs loaded and attached
//! in a cluster-in-a-box, TCP and UDP between network namespaces.

mod fixture;

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use fixture::{Mesh, vip4};
use mesh_agent::datapath::{
    events, service_key,
    spec::{Algorithm, CircuitSettings, Protocol, ServiceSpec},
};
use mesh_common::{
    backend::{CIRCUIT_CLOSED, CIRCUIT_OPEN},
    counters::{
        CTR_BYPASS_ESTABLISHED, CTR_EJECTION, CTR_PROBE, CTR_RECOVERED, CTR_REJECT_CIRCUIT_OPEN,
        CTR_REJECT_MAX_CONNECTIONS, CTR_REJECT_NO_BACKENDS, CTR_TRANSLATED,
    },
    event::{EV_CLOSE, EV_EJECT, EV_OPEN, EV_RECOVER, EV_REJECT},
};

/// Circuit settings that eject fast for tests: 3 failures, 2 s, any share of backends.
fn fast_circuit() -> CircuitSettings {
    CircuitSettings {
        max_connections: 0,
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(2),
        max_ejection: Duration::from_secs(10),
        max_ejection_percent: 100,
        panic_threshold_percent: 0,
    }
}

fn spec(vip: SocketAddr, backends: Vec<SocketAddr>, algorithm: Algorithm) -> ServiceSpec {
    ServiceSpec {
        algorithm,
        ..ServiceSpec::tcp(vip, backends)
    }
}

fn count(r: &mesh_tests::HitReport, name: &str) -> u64 {
    r.counts.get(name).copied().unwrap_or(0)
}

#[test]
fn smoke_every_program_loads_attaches_and_carries_tcp() {
    let Some(_k) = mesh_tests::kernel_test("datapath_smoke") else {
        return;
    };
    let mut m = Mesh::new("datapath_smoke", 3).expect("cluster");
    let vip = vip4(80);
    m.dp.apply_service(&ServiceSpec::tcp(vip, m.backend_addrs(80)))
        .expect("apply");
    let r = m.client.hit(vip, 30, &[]).expect("hit");
    assert_eq!(
        r.ok(),
        30,
        "all connections through the service address succeed: {r:?}"
    );
    assert_eq!(
        r.peer_mismatch, 0,
        "getpeername shows the service address: {r:?}"
    );
    assert_eq!(r.counts.len(), 3, "every backend got traffic: {r:?}");
    assert!(m.dp.counter(CTR_TRANSLATED).unwrap() >= 30);
    let attached = m.attached_programs();
    for p in mesh_agent::datapath::CGROUP_PROGRAMS {
        assert!(
            attached.iter().any(|a| a.contains(p)),
            "{p} attached to the node cgroup: {attached:?}"
        );
    }
}

#[test]
fn random_spreads_evenly_and_round_robin_is_exact() {
    let Some(_k) = mesh_tests::kernel_test("datapath_random_rr") else {
        return;
    };
    let mut m = Mesh::new("datapath_random_rr", 3).expect("cluster");
    let vip = vip4(80);
    m.dp.apply_service(&spec(vip, m.backend_addrs(80), Algorithm::Random))
        .unwrap();
    // 600 draws over 3: expected 200 each, σ ≈ 11.5; ±60 is beyond 5σ.
    let r = m.client.hit(vip, 600, &[]).unwrap();
    assert_eq!(r.ok(), 600, "{r:?}");
    for b in ["b0", "b1", "b2"] {
        assert!(
            (140..=260).contains(&count(&r, b)),
            "random share of {b}: {r:?}"
        );
    }
    m.dp.apply_service(&spec(vip, m.backend_addrs(80), Algorithm::RoundRobin))
        .unwrap();
    let r = m.client.hit(vip, 300, &[]).unwrap();
    for b in ["b0", "b1", "b2"] {
        assert!(
            (99..=101).contains(&count(&r, b)),
            "round robin gives each exactly a third: {r:?}"
        );
    }
    // Sequential connections rotate through the slots in order.
    let names: Vec<&str> = r.per_conn.iter().map(String::as_str).collect();
    assert!(
        names.windows(2).all(|w| w[0] != w[1]),
        "round robin never repeats a backend back to back"
    );
}

#[test]
fn weighted_shares_follow_weights() {
    let Some(_k) = mesh_tests::kernel_test("datapath_weighted") else {
        return;
    };
    let mut m = Mesh::new("datapath_weighted", 3).expect("cluster");
    let vip = vip4(80);
    let mut s = spec(vip, m.backend_addrs(80), Algorithm::Weighted);
    for (b, w) in s.backends.iter_mut().zip([1, 2, 5]) {
        b.weight = w;
    }
    m.dp.apply_service(&s).unwrap();
    let n = 800.0;
    let r = m.client.hit(vip, 800, &[]).unwrap();
    assert_eq!(r.ok(), 800, "{r:?}");
    // Expected shares 1/8, 2/8, 5/8; σ of a share ≤ 1.7 %; allow ±6 % (> 3.5σ).
    for (b, want) in [("b0", 0.125), ("b1", 0.25), ("b2", 0.625)] {
        let got = f64::from(u32::try_from(count(&r, b)).unwrap()) / n;
        assert!(
            (got - want).abs() < 0.06,
            "weighted share of {b}: {got:.3}, want {want}: {r:?}"
        );
    }
}

#[test]
fn least_connections_avoids_the_busy_backend() {
    let Some(_k) = mesh_tests::kernel_test("datapath_least_conn") else {
        return;
    };
    let mut m = Mesh::new("datapath_least_conn", 4).expect("cluster");
    let vip = vip4(80);
    let addrs = m.backend_addrs(80);
    // First only b0: 30 long-lived connections land on it.
    m.dp.apply_service(&spec(vip, addrs[..1].to_vec(), Algorithm::LeastConn))
        .unwrap();
    let mut cmd = m.client.meshpod().unwrap();
    cmd.args(["hit", "--addr", &vip.to_string(), "--count", "30", "--hold"]);
    let mut holder = m.client.spawn(cmd).unwrap();
    let key = service_key(vip, Protocol::Tcp);
    wait_until(Duration::from_secs(10), || {
        m.dp.backend_status(&key).unwrap()[0].state.active >= 30
    })
    .expect("30 held connections counted as active on b0");
    // Then all four: P2C only picks b0 when both random picks are b0 (1/16).
    m.dp.apply_service(&spec(vip, addrs, Algorithm::LeastConn))
        .unwrap();
    let r = m.client.hit(vip, 400, &[]).unwrap();
    assert_eq!(r.ok(), 400, "{r:?}");
    let busy = count(&r, "b0");
    assert!(
        busy <= 48,
        "busy backend got {busy} of 400 new connections (≈25 expected, 100 if ignored): {r:?}"
    );
    for b in ["b1", "b2", "b3"] {
        assert!(count(&r, b) >= 90, "idle backends share the rest: {r:?}");
    }
    holder.close_stdin();
    let _ = holder.wait_timeout(Duration::from_secs(5));
    wait_until(Duration::from_secs(5), || {
        m.dp.backend_status(&key).unwrap()[0].state.active == 0
    })
    .expect("active count returns to 0 when the held connections close");
}

#[test]
fn maglev_moves_few_flows_when_a_backend_leaves() {
    let Some(_k) = mesh_tests::kernel_test("datapath_maglev") else {
        return;
    };
    let mut m = Mesh::new("datapath_maglev", 5).expect("cluster");
    let vip = vip4(80);
    let addrs = m.backend_addrs(80);
    let mut s = spec(vip, addrs.clone(), Algorithm::Maglev);
    // The harness closes with RST to reuse source ports at once: not a backend failure, but keep
    // outlier detection out of this test entirely.
    s.circuit.consecutive_failures = 0;
    m.dp.apply_service(&s).unwrap();
    let flows = 500;
    let args = ["--bind-port-base", "20000"];
    let before = m.client.hit(vip, flows, &args).unwrap();
    let again = m.client.hit(vip, flows, &args).unwrap();
    assert_eq!(before.ok(), flows as u64, "{before:?}");
    assert_eq!(
        before.per_conn, again.per_conn,
        "the same flow always reaches the same backend"
    );
    s.backends.retain(|b| b.addr != addrs[4]);
    m.dp.apply_service(&s).unwrap();
    let after = m.client.hit(vip, flows, &args).unwrap();
    assert_eq!(after.ok(), flows as u64, "{after:?}");
    let mut moved_survivors = 0;
    let mut moved = 0;
    for (a, b) in before.per_conn.iter().zip(&after.per_conn) {
        if a != b {
            moved += 1;
            if a != "b4" {
                moved_survivors += 1;
            }
        }
    }
    // 1/N = 20 % must move (b4's flows); survivors may move by Maglev's small disruption only.
    let margin = flows / 20;
    assert!(
        moved_survivors <= margin,
        "{moved_survivors} flows of surviving backends moved (margin {margin})"
    );
    assert!(
        moved <= flows / 5 + margin,
        "{moved} of {flows} flows moved, at most 1/N + 5 %"
    );
    assert_eq!(count(&after, "b4"), 0);
}

#[test]
fn affinity_holds_within_timeout_and_expires_after() {
    let Some(_k) = mesh_tests::kernel_test("datapath_affinity") else {
        return;
    };
    let mut m = Mesh::new("datapath_affinity", 3).expect("cluster");
    let vip = vip4(80);
    let mut s = spec(vip, m.backend_addrs(80), Algorithm::RoundRobin);
    s.affinity_timeout = Some(Duration::from_secs(1));
    m.dp.apply_service(&s).unwrap();
    let first = m.client.hit(vip, 1, &[]).unwrap().per_conn[0].clone();
    let r = m.client.hit(vip, 20, &[]).unwrap();
    assert_eq!(
        count(&r, &first),
        20,
        "round robin would rotate; affinity keeps {first}: {r:?}"
    );
    thread::sleep(Duration::from_millis(2200));
    let next = m.client.hit(vip, 1, &[]).unwrap().per_conn[0].clone();
    assert_ne!(next, first, "after the idle timeout round robin moves on");
}

#[test]
fn killed_backend_is_ejected_then_probed_back() {
    let Some(_k) = mesh_tests::kernel_test("datapath_circuit_refused") else {
        return;
    };
    let mut m = Mesh::new("datapath_circuit_refused", 3).expect("cluster");
    let mut ring = m.dp.take_events().unwrap();
    let vip = vip4(80);
    let mut s = spec(vip, m.backend_addrs(80), Algorithm::Random);
    s.circuit = fast_circuit();
    m.dp.apply_service(&s).unwrap();
    let key = service_key(vip, Protocol::Tcp);
    // Kill b2: its connects are refused (RST).
    drop(m.servers.remove(2));
    let r = m.client.hit(vip, 90, &[]).unwrap();
    assert_eq!(
        r.errors.get("ECONNREFUSED").copied(),
        Some(3),
        "exactly the 3 failures that open the circuit: {r:?}"
    );
    assert_eq!(r.ok(), 87);
    let st = &m.dp.backend_status(&key).unwrap()[2];
    assert_eq!(st.state.circuit, CIRCUIT_OPEN, "{st:?}");
    assert!(m.dp.counter(CTR_EJECTION).unwrap() >= 1);
    let ejected_at = Instant::now();
    // Bring b2 back. While ejected it must get nothing even though it would answer now.
    let b2 = m.backends[2].clone();
    m.servers.push(
        b2.serve("b2", &[SocketAddr::new(b2.ipv4().into(), 80)], &[])
            .unwrap(),
    );
    let r = m.client.hit(vip, 30, &[]).unwrap();
    assert_eq!(r.ok(), 30);
    assert_eq!(
        count(&r, "b2"),
        0,
        "no connection reaches an ejected backend: {r:?}"
    );
    // After the ejection time one probe goes through; its success closes the circuit.
    thread::sleep(
        Duration::from_secs(2).saturating_sub(ejected_at.elapsed()) + Duration::from_millis(200),
    );
    let r = m.client.hit(vip, 60, &[]).unwrap();
    assert_eq!(r.ok(), 60, "{r:?}");
    assert!(
        count(&r, "b2") >= 1,
        "the probe and later connections reach b2 again: {r:?}"
    );
    let st = &m.dp.backend_status(&key).unwrap()[2];
    assert_eq!(st.state.circuit, CIRCUIT_CLOSED, "{st:?}");
    assert_eq!(
        m.dp.counter(CTR_PROBE).unwrap(),
        1,
        "exactly one half-open probe"
    );
    assert_eq!(m.dp.counter(CTR_RECOVERED).unwrap(), 1);
    let evs = events::drain(&mut ring);
    let b2_id = st.id;
    assert!(
        evs.iter()
            .any(|e| e.kind == EV_EJECT && e.backend_id == b2_id),
        "eject event for b2"
    );
    assert!(
        evs.iter()
            .any(|e| e.kind == EV_RECOVER && e.backend_id == b2_id),
        "recover event for b2"
    );
}

#[test]
fn blackholed_backend_is_ejected_after_the_first_syn_timeout() {
    let Some(_k) = mesh_tests::kernel_test("datapath_circuit_blackhole") else {
        return;
    };
    let mut m = Mesh::new("datapath_circuit_blackhole", 2).expect("cluster");
    let vip = vip4(80);
    let mut s = spec(vip, m.backend_addrs(80), Algorithm::RoundRobin);
    s.circuit = fast_circuit();
    m.dp.apply_service(&s).unwrap();
    let key = service_key(vip, Protocol::Tcp);
    // The node silently drops everything routed to b1: SYNs go unanswered.
    let b1 = m.backends[1].ipv4().to_string();
    m.node
        .exec("ip", ["route", "replace", "blackhole", &format!("{b1}/32")])
        .unwrap();
    let client = m.client.clone();
    let start = Instant::now();
    let load = thread::spawn(move || {
        client
            .hit(vip, 6, &["--concurrency", "6", "--timeout-ms", "4000"])
            .unwrap()
    });
    wait_until(Duration::from_secs(10), || {
        m.dp.backend_status(&key).unwrap()[1].state.circuit == CIRCUIT_OPEN
    })
    .expect("black-holed backend ejected");
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "ejected after {took:?}: about the first SYN RTO (≈1 s), not the ≈19 s ETIMEDOUT"
    );
    let r = m.client.hit(vip, 10, &["--timeout-ms", "2000"]).unwrap();
    assert_eq!(
        count(&r, "b0"),
        10,
        "new connections avoid the ejected backend at once: {r:?}"
    );
    let first = load.join().unwrap();
    assert_eq!(
        count(&first, "b0"),
        3,
        "round robin sent 3 of the first 6 to the healthy backend: {first:?}"
    );
}

#[test]
fn max_connections_and_fail_fast() {
    let Some(_k) = mesh_tests::kernel_test("datapath_max_conn") else {
        return;
    };
    let mut m = Mesh::new("datapath_max_conn", 2).expect("cluster");
    let vip = vip4(80);
    let addrs = m.backend_addrs(80);
    let mut s = spec(vip, addrs[..1].to_vec(), Algorithm::Random);
    s.circuit = CircuitSettings {
        max_connections: 2,
        ..fast_circuit()
    };
    m.dp.apply_service(&s).unwrap();
    let key = service_key(vip, Protocol::Tcp);
    let mut cmd = m.client.meshpod().unwrap();
    cmd.args(["hit", "--addr", &vip.to_string(), "--count", "2", "--hold"]);
    let mut holder = m.client.spawn(cmd).unwrap();
    wait_until(Duration::from_secs(10), || {
        m.dp.backend_status(&key).unwrap()[0].state.active >= 2
    })
    .unwrap();
    let r = m.client.hit(vip, 20, &[]).unwrap();
    assert_eq!(
        r.errors.get("ECONNREFUSED").copied(),
        Some(20),
        "the third connection is refused: {r:?}"
    );
    assert!(
        r.connect_us.p50 < 1000,
        "refused in the kernel at once: {r:?}"
    );
    assert!(m.dp.counter(CTR_REJECT_MAX_CONNECTIONS).unwrap() >= 20);
    holder.close_stdin();
    let _ = holder.wait_timeout(Duration::from_secs(5));
    wait_until(Duration::from_secs(5), || {
        m.dp.backend_status(&key).unwrap()[0].state.active == 0
    })
    .unwrap();
    assert_eq!(
        m.client.hit(vip, 2, &[]).unwrap().ok(),
        2,
        "capacity is back after they close"
    );

    // Every backend ejected: connect() fails immediately with ECONNREFUSED.
    m.servers.clear();
    let mut s = spec(vip, addrs, Algorithm::Random);
    s.circuit = CircuitSettings {
        consecutive_failures: 1,
        base_ejection: Duration::from_mins(1),
        ..fast_circuit()
    };
    m.dp.apply_service(&s).unwrap();
    let _ = m.client.hit(vip, 10, &[]).unwrap();
    let r = m.client.hit(vip, 200, &[]).unwrap();
    assert_eq!(r.errors.get("ECONNREFUSED").copied(), Some(200), "{r:?}");
    assert!(
        r.connect_us.p50 < 200,
        "fail fast, p50 {} µs",
        r.connect_us.p50
    );
    assert!(m.dp.counter(CTR_REJECT_CIRCUIT_OPEN).unwrap() >= 200);

    // No endpoints at all: EHOSTUNREACH, as Cilium does.
    m.dp.apply_service(&spec(vip, vec![], Algorithm::Random))
        .unwrap();
    let r = m.client.hit(vip, 5, &[]).unwrap();
    assert_eq!(r.errors.get("EHOSTUNREACH").copied(), Some(5), "{r:?}");
    assert!(m.dp.counter(CTR_REJECT_NO_BACKENDS).unwrap() >= 5);
}

#[test]
fn established_connections_survive_endpoint_removal_and_updates() {
    let Some(_k) = mesh_tests::kernel_test("datapath_survive_updates") else {
        return;
    };
    let mut m = Mesh::new("datapath_survive_updates", 2).expect("cluster");
    let vip = vip4(80);
    let addrs = m.backend_addrs(80);
    m.dp.apply_service(&spec(vip, addrs[..1].to_vec(), Algorithm::Random))
        .unwrap();
    let client = m.client.clone();
    let conn = thread::spawn(move || {
        client
            .run(move || -> Result<(String, String), String> {
                use std::io::{BufRead as _, BufReader, Write as _};
                let s = std::net::TcpStream::connect(vip).map_err(|e| e.to_string())?;
                let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
                let mut name = String::new();
                r.read_line(&mut name).map_err(|e| e.to_string())?;
                // Meanwhile the service loses this backend, changes algorithm, and is deleted.
                thread::sleep(Duration::from_millis(1500));
                (&s).write_all(b"still here\n").map_err(|e| e.to_string())?;
                let mut echo = String::new();
                r.read_line(&mut echo).map_err(|e| e.to_string())?;
                Ok((name.trim().to_owned(), echo.trim().to_owned()))
            })
            .unwrap()
    });
    thread::sleep(Duration::from_millis(400));
    m.dp.apply_service(&spec(vip, addrs[1..].to_vec(), Algorithm::Maglev))
        .unwrap();
    m.dp.apply_service(&spec(vip, addrs.clone(), Algorithm::RoundRobin))
        .unwrap();
    m.dp.remove_service(&service_key(vip, Protocol::Tcp))
        .unwrap();
    let (name, echo) = conn.join().unwrap().expect("connection kept working");
    assert_eq!((name.as_str(), echo.as_str()), ("b0", "still here"));
}

#[test]
fn udp_ipv6_and_getpeername() {
    let Some(_k) = mesh_tests::kernel_test("datapath_udp_v6") else {
        return;
    };
    let mut m = Mesh::new("datapath_udp_v6", 3).expect("cluster");
    // UDP, connected sockets (connect4 + getpeername4).
    let dns = vip4(53);
    let udp = ServiceSpec {
        protocol: Protocol::Udp,
        ..spec(dns, m.backend_addrs(53), Algorithm::RoundRobin)
    };
    m.dp.apply_service(&udp).unwrap();
    let r = m.client.hit(dns, 30, &["--udp"]).unwrap();
    assert_eq!(r.ok(), 30, "{r:?}");
    assert_eq!(r.peer_mismatch, 0, "{r:?}");
    assert_eq!(r.counts.len(), 3, "{r:?}");
    // UDP, unconnected DNS-style sendto/recvfrom (sendmsg4 + recvmsg4).
    let replies: Vec<(String, String)> = m
        .client
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            (0..6)
                .map(|_| {
                    s.send_to(b"q\n", dns).unwrap();
                    let mut buf = [0u8; 64];
                    let (n, from) = s.recv_from(&mut buf).unwrap();
                    (
                        String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
                        from.to_string(),
                    )
                })
                .collect()
        })
        .unwrap();
    assert!(
        replies.iter().all(|(_, from)| *from == dns.to_string()),
        "replies come from the service address: {replies:?}"
    );
    let names: std::collections::BTreeSet<_> = replies.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names.len(), 3, "round robin over sendmsg: {replies:?}");
    // IPv6 TCP (connect6 + getpeername6).
    let vip6 = SocketAddr::new("fd00:96::10".parse::<Ipv6Addr>().unwrap().into(), 80);
    m.dp.apply_service(&ServiceSpec::tcp(vip6, m.backend_addrs6(80)))
        .unwrap();
    let r = m.client.hit(vip6, 30, &[]).unwrap();
    assert_eq!(r.ok(), 30, "{r:?}");
    assert_eq!(r.peer_mismatch, 0, "{r:?}");
    assert_eq!(r.counts.len(), 3, "{r:?}");
}

#[test]
fn same_node_bypass_is_correct_and_skips_the_stack() {
    let Some(_k) = mesh_tests::kernel_test("datapath_bypass") else {
        return;
    };
    let mut m = Mesh::new("datapath_bypass", 1).expect("cluster");
    let vip = vip4(80);
    m.dp.apply_service(&ServiceSpec::tcp(vip, m.backend_addrs(80)))
        .unwrap();
    let iface = m.client.host_ifname().to_owned();
    // (packets, bytes) that crossed the client pod's veth.
    let wire = |m: &Mesh| {
        let s = m.node.iface_stats(&iface).unwrap();
        (s.rx_packets + s.tx_packets, s.rx_bytes + s.tx_bytes)
    };
    let delta = |a: (u64, u64), b: (u64, u64)| (b.0 - a.0, b.1 - a.1);
    // Baseline through the stack: 8 MiB each way and 1000 round trips.
    let w0 = wire(&m);
    let t = m.client.transfer(vip, 8 << 20).unwrap();
    assert_eq!(t.sha256_sent, t.sha256_received);
    let stack_transfer = delta(w0, wire(&m));
    let w0 = wire(&m);
    assert_eq!(m.client.rr(vip, 1000, 64).unwrap().ok, 1000);
    let stack_rr = delta(w0, wire(&m));
    // Bypass on: both pods are local endpoints.
    m.dp.set_local_endpoints(&[m.client.ipv4().into(), m.backends[0].ipv4().into()])
        .unwrap();
    let w1 = wire(&m);
    let t = m.client.transfer(vip, 8 << 20).unwrap();
    assert_eq!(t.received, 8 << 20, "{t:?}");
    assert_eq!(
        t.sha256_sent, t.sha256_received,
        "8 MiB arrive intact through sk_msg redirect"
    );
    let bypass_transfer = delta(w1, wire(&m));
    let w1 = wire(&m);
    let rr = m.client.rr(vip, 1000, 64).unwrap();
    assert_eq!(rr.ok, 1000, "{rr:?}");
    let bypass_rr = delta(w1, wire(&m));
    // Handshake and FIN still cross the veth; payload does not.
    assert!(
        stack_transfer.1 > 16 << 20,
        "baseline carried both directions: {stack_transfer:?}"
    );
    assert!(
        bypass_transfer.1 < 64 << 10,
        "8 MiB echoed with bypass put {bypass_transfer:?} (packets, bytes) on the veth, vs {stack_transfer:?} without"
    );
    assert!(stack_rr.0 >= 2000, "baseline round trips: {stack_rr:?}");
    assert!(
        bypass_rr.0 < 50,
        "1000 round trips with bypass put {bypass_rr:?} on the veth, vs {stack_rr:?} without"
    );
    let r = m.client.hit(vip, 200, &["--concurrency", "8"]).unwrap();
    assert_eq!(r.ok(), 200, "many bypassed connections: {r:?}");
    assert!(m.dp.counter(CTR_BYPASS_ESTABLISHED).unwrap() >= 2 * 202);
}

#[test]
fn flow_events_report_open_close_and_reject() {
    let Some(_k) = mesh_tests::kernel_test("datapath_events") else {
        return;
    };
    let mut m = Mesh::new("datapath_events", 1).expect("cluster");
    let mut ring = m.dp.take_events().unwrap();
    let vip = vip4(80);
    m.dp.apply_service(&ServiceSpec::tcp(vip, m.backend_addrs(80)))
        .unwrap();
    let t = m.client.transfer(vip, 100_000).unwrap();
    assert_eq!(t.received, 100_000);
    let empty = vip4(81);
    m.dp.apply_service(&ServiceSpec::tcp(empty, vec![]))
        .unwrap();
    let _ = m.client.hit(empty, 1, &[]).unwrap();
    thread::sleep(Duration::from_millis(200));
    let evs = events::drain(&mut ring);
    let by_kind: BTreeMap<u8, usize> = evs.iter().fold(BTreeMap::new(), |mut acc, e| {
        *acc.entry(e.kind).or_default() += 1;
        acc
    });
    let cgroup_id = std::fs::metadata(m.client.cgroup_dir())
        .map(|md| std::os::unix::fs::MetadataExt::ino(&md))
        .unwrap();
    let open = evs.iter().find(|e| e.kind == EV_OPEN).expect("open event");
    assert_eq!(
        open.cgroup_id, cgroup_id,
        "events name the client pod by cgroup id"
    );
    assert_eq!(u16::from_be(open.svc_port_be), 80);
    let close = evs
        .iter()
        .find(|e| e.kind == EV_CLOSE)
        .expect("close event");
    assert!(
        close.bytes_received >= 100_000 && close.bytes_sent >= 100_000,
        "{close:?}"
    );
    assert!(close.duration_ns > 0);
    let reject = evs
        .iter()
        .find(|e| e.kind == EV_REJECT)
        .expect("reject event");
    assert_eq!(u32::from(reject.reason), CTR_REJECT_NO_BACKENDS);
    assert_eq!(u16::from_be(reject.svc_port_be), 81, "{by_kind:?}");
    assert_eq!(
        mesh_agent::datapath::ip_from_be(open.client_addr_be, open.family),
        std::net::IpAddr::from(m.client.ipv4()),
        "sockops events carry the client's own address"
    );
    assert_eq!(
        reject.client_addr_be, [0; 4],
        "no address is bound yet at connect()"
    );
}

#[test]
fn l7_failures_reported_by_the_agent_eject_too() {
    let Some(_k) = mesh_tests::kernel_test("datapath_l7_report") else {
        return;
    };
    let mut m = Mesh::new("datapath_l7_report", 2).expect("cluster");
    let vip = vip4(80);
    let mut s = spec(vip, m.backend_addrs(80), Algorithm::Random);
    s.circuit = fast_circuit();
    m.dp.apply_service(&s).unwrap();
    let key = service_key(vip, Protocol::Tcp);
    let b1 = m.dp.backend_status(&key).unwrap()[1].id;
    // E.g. three HTTP 503s seen by a proxy: the third ejects, exactly as L4 failures would.
    let now = mesh_tests::monotonic_ns();
    let ejected: Vec<bool> = (0..3)
        .map(|_| m.dp.report_failure(b1, now).unwrap())
        .collect();
    assert_eq!(ejected, [false, false, true]);
    assert_eq!(
        m.dp.backend_status(&key).unwrap()[1].state.circuit,
        CIRCUIT_OPEN
    );
    let r = m.client.hit(vip, 40, &[]).unwrap();
    assert_eq!(
        count(&r, "b0"),
        40,
        "the kernel skips a backend ejected by L7 reports: {r:?}"
    );
}

#[test]
fn backend_resets_count_as_failures_but_client_aborts_do_not() {
    let Some(_k) = mesh_tests::kernel_test("datapath_resets") else {
        return;
    };
    let mut m = Mesh::new("datapath_resets", 1).expect("cluster");
    // The client's own abortive closes (RST from its side, SO_LINGER 0): not the backend's fault.
    let vip = vip4(80);
    let mut s = spec(vip, m.backend_addrs(80), Algorithm::Random);
    s.circuit = fast_circuit();
    m.dp.apply_service(&s).unwrap();
    let report = m
        .client
        .hit(vip, 10, &["--bind-port-base", "30000"])
        .unwrap();
    assert_eq!(report.ok(), 10, "{report:?}");
    let st =
        m.dp.backend_status(&service_key(vip, Protocol::Tcp))
            .unwrap()[0]
            .state;
    assert_eq!(
        (st.failures, st.circuit),
        (0, CIRCUIT_CLOSED),
        "client aborts are not failures: {st:?}"
    );
    // A backend that accepts and then resets every connection: three resets open its circuit.
    let backend = m.backends[0].clone();
    let listen = std::net::SocketAddr::new(backend.ipv4().into(), 81);
    let server = thread::spawn(move || {
        backend
            .run(move || {
                let listener = std::net::TcpListener::bind(listen).unwrap();
                for _ in 0..3 {
                    let (conn, _) = listener.accept().unwrap();
                    let linger = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    // SAFETY: valid socket and option value for SO_LINGER.
                    unsafe {
                        libc::setsockopt(
                            std::os::fd::AsRawFd::as_raw_fd(&conn),
                            libc::SOL_SOCKET,
                            libc::SO_LINGER,
                            (&raw const linger).cast(),
                            u32::try_from(size_of::<libc::linger>()).unwrap(),
                        );
                    }
                    thread::sleep(Duration::from_millis(50));
                    drop(conn);
                }
            })
            .unwrap();
    });
    thread::sleep(Duration::from_millis(300));
    let vip81 = vip4(81);
    let mut s = spec(vip81, vec![listen], Algorithm::Random);
    s.circuit = fast_circuit();
    m.dp.apply_service(&s).unwrap();
    let report = m.client.hit(vip81, 3, &["--timeout-ms", "2000"]).unwrap();
    server.join().unwrap();
    assert_eq!(
        report.errors.get("ECONNRESET").copied(),
        Some(3),
        "{report:?}"
    );
    let st =
        m.dp.backend_status(&service_key(vip81, Protocol::Tcp))
            .unwrap()[0]
            .state;
    assert_eq!(st.failures, 3, "{st:?}");
    assert_eq!(
        st.circuit, CIRCUIT_OPEN,
        "three backend resets eject it: {st:?}"
    );
}

#[test]
fn a_full_map_is_a_clear_error_and_keeps_the_last_state() {
    let Some(_k) = mesh_tests::kernel_test("datapath_map_full") else {
        return;
    };
    let mut m = Mesh::new("datapath_map_full", 1).expect("cluster");
    let vip = vip4(80);
    m.dp.apply_service(&ServiceSpec::tcp(vip, m.backend_addrs(80)))
        .unwrap();
    m.dp.set_local_endpoints(&[m.client.ipv4().into()]).unwrap();
    let too_many: Vec<std::net::IpAddr> = (0..=u32::from(u16::MAX) / 8)
        .map(|i| std::net::Ipv4Addr::from(0x0a64_0000 + i).into())
        .collect();
    let err = m.dp.set_local_endpoints(&too_many).unwrap_err().to_string();
    assert!(
        err.contains("LOCAL_ENDPOINTS") && err.contains("full") && err.contains("4096"),
        "{err}"
    );
    assert_eq!(m.dp.map_full_total(), 1);
    // Nothing was half-written: the map that refused still holds exactly its last state.
    let pin =
        m.dp.pin_dir()
            .join("maps")
            .join(mesh_common::bypass::LOCAL_ENDPOINTS_MAP);
    let local: aya::maps::HashMap<
        _,
        mesh_common::bypass::EndpointKey,
        mesh_common::bypass::LocalEndpoint,
    > = aya::maps::HashMap::try_from(aya::maps::Map::HashMap(
        aya::maps::MapData::from_pin(&pin).expect("pinned LOCAL_ENDPOINTS"),
    ))
    .expect("a hash map");
    let keys: Vec<_> = local.keys().map(Result::unwrap).collect();
    assert_eq!(
        keys,
        [mesh_common::bypass::EndpointKey {
            addr_be: mesh_agent::datapath::addr_be(m.client.ipv4().into()).0
        }],
        "LOCAL_ENDPOINTS keeps the client's address only"
    );
    assert_eq!(m.client.hit(vip, 5, &[]).unwrap().ok(), 5);
}

/// Polls `f` every 20 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(format!("condition not met within {limit:?}"))
}
