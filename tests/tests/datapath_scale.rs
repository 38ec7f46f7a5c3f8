//! The kernel data path at production scale, with real programs and real TCP: uniform choice over
//! hundreds to 10,000 endpoints with any pattern of ejected ones, ejection accounting across
//! endpoint removal, ids that never name another endpoint under rolling replacement, untorn reads
//! while the agent rewrites endpoints, single probes under contention, dual-stack sockets, honest
//! failure signals and the panic threshold. One `meshpod serve` process listening on many ports
//! stands in for many endpoints; each answers `NAME:PORT`.

#![expect(
    clippy::cast_precision_loss,
    reason = "connection counts are far below 2^52; shares are ratios"
)]

mod fixture;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use fixture::{Mesh, vip4};
use mesh_agent::datapath::{
    Datapath, service_key,
    spec::{Algorithm, CircuitSettings, Protocol, ServiceSpec},
};
use mesh_common::{
    backend::{CIRCUIT_CLOSED, CIRCUIT_OPEN},
    counters::{
        CTR_BACKEND_FAILURE, CTR_CONNECT_ABANDONED, CTR_EJECTION, CTR_PANIC, CTR_PROBE,
        CTR_RECOVERED, CTR_V4_MAPPED,
    },
    event::EV_OPEN,
};
use mesh_tests::HitReport;

/// Ejects on the first failure, for a minute, any share of the backends, never panics.
fn eject_at_once() -> CircuitSettings {
    CircuitSettings {
        max_connections: 0,
        consecutive_failures: 1,
        base_ejection: Duration::from_mins(1),
        max_ejection: Duration::from_mins(1),
        max_ejection_percent: 100,
        panic_threshold_percent: 0,
    }
}

/// Taken by the tests that keep both CPUs busy for seconds (the 8-thread probe race, the
/// 10,000 updates/s rewrite): the rewrite's rate is part of what its test must show (issue 7.8),
/// and in a debug build it fell to 6,265/s while the probe race ran beside it in the same test
/// binary (8,284/s in a loaded CI run; ≈ 13,000/s alone on a busy machine).
static CPU_HEAVY: Mutex<()> = Mutex::new(());

fn ports(ip: Ipv4Addr, first: u16, n: u16) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::new(ip.into(), first + i))
        .collect()
}

/// Opens the circuits of the backends at `slots` of the service (an L7 failure report each).
fn eject_slots(dp: &mut Datapath, vip: SocketAddr, slots: impl IntoIterator<Item = usize>) {
    let key = service_key(vip, Protocol::Tcp);
    let status = dp.backend_status(&key).unwrap();
    let now = mesh_tests::monotonic_ns();
    for s in slots {
        assert!(
            dp.report_failure(status[s].id, now).unwrap(),
            "slot {s} was ejected"
        );
    }
}

/// `NAME:PORT` → port.
fn port_of(name: &str) -> u16 {
    name.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn no_backend_inherits_the_share_of_an_ejected_run() {
    let Some(_k) = mesh_tests::kernel_test("scale_uniform") else {
        return;
    };
    let mut m = Mesh::new("scale_uniform", 1).expect("cluster");
    let ip = m.backends[0].ipv4();
    let _srv = m.backends[0]
        .serve_ports("s", SocketAddr::new(ip.into(), 20_000), 200)
        .unwrap();
    let vip = vip4(80);
    let endpoints = ports(ip, 20_000, 200);
    for algorithm in [
        Algorithm::Random,
        Algorithm::RoundRobin,
        Algorithm::LeastConn,
    ] {
        let mut spec = ServiceSpec::tcp(vip, endpoints.clone());
        spec.algorithm = algorithm;
        spec.circuit = eject_at_once();
        m.dp.remove_service(&service_key(vip, Protocol::Tcp))
            .unwrap();
        m.dp.apply_service(&spec).unwrap();
        // A contiguous run of 20 (a whole node's endpoints): before, the backend after the run
        // took the run's whole share.
        eject_slots(&mut m.dp, vip, 50..70);
        let r = m.client.hit(vip, 20_000, &["--concurrency", "8"]).unwrap();
        assert_eq!(r.ok(), 20_000, "{algorithm:?}: {:?}", r.errors);
        let fair = 20_000.0 / 180.0;
        let mut busiest = 0;
        for (name, n) in &r.counts {
            let slot = usize::from(port_of(name) - 20_000);
            assert!(
                !(50..70).contains(&slot),
                "{algorithm:?}: ejected slot {slot} got {n}"
            );
            busiest = busiest.max(*n);
        }
        assert_eq!(
            r.counts.len(),
            180,
            "{algorithm:?}: every eligible backend chosen"
        );
        let ratio = busiest as f64 / fair;
        let neighbour = r.counts.get("s:20070").copied().unwrap_or(0) as f64 / fair;
        println!("{algorithm:?}: busiest {ratio:.2}× fair, the run's neighbour {neighbour:.2}×");
        assert!(
            ratio <= 1.5,
            "{algorithm:?}: busiest backend {ratio:.2}× its fair share"
        );
        assert!(neighbour <= 1.5, "{algorithm:?}: neighbour {neighbour:.2}×");
    }
}

#[test]
fn ten_thousand_endpoints_refused_only_when_none_is_eligible() {
    let Some(_k) = mesh_tests::kernel_test("scale_10k") else {
        return;
    };
    let mut m = Mesh::new("scale_10k", 1).expect("cluster");
    let ip = m.backends[0].ipv4();
    let _srv = m.backends[0]
        .serve_ports("s", SocketAddr::new(ip.into(), 20_000), 10_000)
        .unwrap();
    let vip = vip4(80);
    let key = service_key(vip, Protocol::Tcp);
    for algorithm in [Algorithm::Random, Algorithm::Maglev] {
        let mut spec = ServiceSpec::tcp(vip, ports(ip, 20_000, 10_000));
        spec.algorithm = algorithm;
        spec.circuit = eject_at_once();
        m.dp.remove_service(&key).unwrap();
        m.dp.apply_service(&spec).unwrap();
        if algorithm == Algorithm::Maglev {
            assert_eq!(
                m.dp.table_size(&key),
                131_071,
                "a prime ≥ 100 × endpoints, capped"
            );
            assert_eq!(
                m.dp.table_bytes(),
                128 * 4096,
                "its memory: 128 chunks of 4 KiB"
            );
        } else {
            assert_eq!(
                m.dp.table_bytes(),
                0,
                "no table for a service that needs none"
            );
        }
        // Every endpoint but the last three ejected (the old scan gave up after 64 slots, the
        // old table held 1,021 entries).
        eject_slots(&mut m.dp, vip, 0..9_997);
        let r = m.client.hit(vip, 60, &["--concurrency", "4"]).unwrap();
        assert_eq!(r.ok(), 60, "{algorithm:?}: {:?}", r.errors);
        let chosen: BTreeSet<u16> = r.counts.keys().map(|n| port_of(n)).collect();
        assert_eq!(
            chosen,
            BTreeSet::from([29_997, 29_998, 29_999]),
            "{algorithm:?}: only the eligible tail, all of it"
        );
        eject_slots(&mut m.dp, vip, 9_997..10_000);
        let r = m.client.hit(vip, 5, &[]).unwrap();
        assert_eq!(
            r.errors.get("ECONNREFUSED").copied(),
            Some(5),
            "{algorithm:?}: refused once none is eligible: {r:?}"
        );
    }
}

#[test]
fn a_removed_ejected_backend_releases_its_share() {
    let Some(_k) = mesh_tests::kernel_test("scale_eject_release") else {
        return;
    };
    let mut m = Mesh::new("scale_eject_release", 3).expect("cluster");
    let vip = vip4(80);
    let key = service_key(vip, Protocol::Tcp);
    let mut spec = ServiceSpec::tcp(vip, m.backend_addrs(80));
    spec.algorithm = Algorithm::RoundRobin;
    // One of three may be ejected at a time.
    spec.circuit = CircuitSettings {
        max_ejection_percent: 34,
        ..eject_at_once()
    };
    m.dp.apply_service(&spec).unwrap();
    // b1 fails: ejected.
    m.servers.remove(1);
    let _ = m.client.hit(vip, 6, &[]).unwrap();
    assert_eq!(m.dp.ejected_count(&key).unwrap(), 1);
    assert_eq!(
        m.dp.backend_status(&key).unwrap()[1].state.circuit,
        CIRCUIT_OPEN
    );
    // The ejected endpoint goes away: its share of max_ejection_percent goes with it.
    spec.backends.remove(1);
    m.dp.apply_service(&spec).unwrap();
    assert_eq!(
        m.dp.ejected_count(&key).unwrap(),
        0,
        "removal released the share"
    );
    // Now b2 fails: it is ejected on schedule (before, the leaked count blocked it forever).
    m.servers.remove(1);
    let ejections = m.dp.counter(CTR_EJECTION).unwrap();
    let _ = m.client.hit(vip, 6, &[]).unwrap();
    assert_eq!(m.dp.counter(CTR_EJECTION).unwrap(), ejections + 1);
    assert_eq!(
        m.dp.backend_status(&key).unwrap()[1].state.circuit,
        CIRCUIT_OPEN
    );
    let r = m.client.hit(vip, 10, &[]).unwrap();
    assert_eq!(r.counts.get("b0").copied(), Some(10), "{r:?}");
}

#[test]
fn rolling_replacement_never_crosses_services_and_counts_return_to_zero() {
    let Some(_k) = mesh_tests::kernel_test("scale_rolling") else {
        return;
    };
    let mut m = Mesh::new("scale_rolling", 2).expect("cluster");
    let (ip_a, ip_b) = (m.backends[0].ipv4(), m.backends[1].ipv4());
    let _a = m.backends[0]
        .serve_ports("A", SocketAddr::new(ip_a.into(), 20_000), 40)
        .unwrap();
    let _b = m.backends[1]
        .serve_ports("B", SocketAddr::new(ip_b.into(), 30_000), 40)
        .unwrap();
    let (vip_a, vip_b) = (vip4(80), vip4(81));
    let spec = |vip, ip, first: u16, step: u16| {
        let mut s = ServiceSpec::tcp(vip, ports(ip, first + step, 4));
        s.affinity_timeout = Some(Duration::from_hours(3));
        s.circuit = CircuitSettings::default();
        s
    };
    let mut ids = BTreeSet::new();
    let mut holders = Vec::new();
    let mut seen = Vec::<HitReport>::new();
    for step in 0..30 {
        // Interleaved: A loses an endpoint and gains one, then B, so a freed id handed to the
        // other service (the old free list) would send A's affine clients to B.
        for (vip, ip, first) in [(vip_a, ip_a, 20_000), (vip_b, ip_b, 30_000)] {
            m.dp.apply_service(&spec(vip, ip, first, step)).unwrap();
            for b in
                m.dp.backend_status(&service_key(vip, Protocol::Tcp))
                    .unwrap()
            {
                ids.insert(b.id);
            }
        }
        for vip in [vip_a, vip_b] {
            seen.push(m.client.hit(vip, 5, &[]).unwrap());
        }
        if step % 10 == 0 {
            for vip in [vip_a, vip_b] {
                let mut cmd = m.client.meshpod().unwrap();
                cmd.args(["hit", "--addr", &vip.to_string(), "--count", "3", "--hold"]);
                holders.push((vip, m.client.spawn(cmd).unwrap()));
            }
        }
    }
    for (i, r) in seen.iter().enumerate() {
        let want = if i % 2 == 0 { "A:" } else { "B:" };
        assert_eq!(r.ok(), 5, "{r:?}");
        assert!(
            r.counts.keys().all(|n| n.starts_with(want)),
            "round {i}: a connection reached the other service: {r:?}"
        );
    }
    for (vip, h) in &mut holders {
        let line = h.next_line(Duration::from_secs(10)).unwrap();
        let r: HitReport = serde_json::from_str(&line).unwrap();
        let want = if *vip == vip_a { "A:" } else { "B:" };
        assert!(r.counts.keys().all(|n| n.starts_with(want)), "{r:?}");
    }
    drop(holders);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let busy: Vec<(u32, u64)> = ids
            .iter()
            .filter_map(|id| m.dp.backend_counters(*id).map(|c| (*id, c.active)))
            .filter(|(_, a)| *a != 0)
            .collect();
        if busy.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "active counts did not return to 0 after every client closed: {busy:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        m.dp.retired_backends() > 0,
        "replaced backends are quarantined"
    );
    assert_eq!(
        ids.iter()
            .filter(|id| m.dp.backend_counters(**id).is_none())
            .count(),
        0,
        "no id's state slot was handed to another id"
    );
}

#[test]
fn connects_land_on_their_own_service_while_endpoints_are_rewritten() {
    let Some(_k) = mesh_tests::kernel_test("scale_torn") else {
        return;
    };
    let _cpu = CPU_HEAVY.lock().unwrap_or_else(PoisonError::into_inner);
    let mut m = Mesh::new("scale_torn", 2).expect("cluster");
    let (ip_a, ip_b) = (m.backends[0].ipv4(), m.backends[1].ipv4());
    let _a = m.backends[0]
        .serve_ports("A", SocketAddr::new(ip_a.into(), 20_000), 100)
        .unwrap();
    let _b = m.backends[1]
        .serve_ports("B", SocketAddr::new(ip_b.into(), 30_000), 100)
        .unwrap();
    let (vip_a, vip_b) = (vip4(80), vip4(81));
    let spec =
        |vip, ip, first: u16, step: u16| ServiceSpec::tcp(vip, ports(ip, first + step % 90, 10));
    m.dp.apply_service(&spec(vip_a, ip_a, 20_000, 0)).unwrap();
    m.dp.apply_service(&spec(vip_b, ip_b, 30_000, 0)).unwrap();
    let mut clients = Vec::new();
    for (vip, _) in [(vip_a, 0), (vip_b, 1), (vip_a, 2), (vip_b, 3)] {
        let mut cmd = m.client.meshpod().unwrap();
        cmd.args(["hit", "--addr", &vip.to_string(), "--count", "6000"]);
        clients.push((vip, m.client.spawn(cmd).unwrap()));
    }
    // The agent side: both services' endpoints replaced one at a time, ≥ 10,000 updates/s.
    let start = Instant::now();
    let mut updates = 0u64;
    let mut step = 1u16;
    while start.elapsed() < Duration::from_secs(4) {
        m.dp.apply_service(&spec(vip_a, ip_a, 20_000, step))
            .unwrap();
        m.dp.apply_service(&spec(vip_b, ip_b, 30_000, step))
            .unwrap();
        // Each step removes one endpoint and adds one per service.
        updates += 4;
        step += 1;
    }
    let rate = updates as f64 / start.elapsed().as_secs_f64();
    println!("{updates} endpoint updates, {rate:.0}/s");
    assert!(rate >= 10_000.0, "agent rewrote {rate:.0} endpoints/s");
    let mut total = 0;
    for (vip, mut c) in clients {
        let line = c.next_line(Duration::from_mins(1)).unwrap();
        let r: HitReport = serde_json::from_str(&line).unwrap();
        let want = if vip == vip_a { "A:" } else { "B:" };
        total += r.ok();
        assert!(
            r.counts.keys().all(|n| n.starts_with(want)),
            "a connection to {vip} landed on another service: {:?}",
            r.counts
        );
    }
    assert!(total > 10_000, "{total} connections during the rewrites");
}

/// Issue 7.7's stress test: 8 threads connect for 30 s to a service whose backend flaps. The one
/// kernel test allowed over 10 s (the issue asks for 30 s: long enough for ~40 ejections, each a
/// race of up to 8 CPUs for the probe). Every ejection admits exactly one probe and the counters
/// agree with each other.
#[test]
fn one_probe_per_ejection_under_contention() {
    let Some(_k) = mesh_tests::kernel_test("scale_probes") else {
        return;
    };
    let _cpu = CPU_HEAVY.lock().unwrap_or_else(PoisonError::into_inner);
    let mut m = Mesh::new("scale_probes", 2).expect("cluster");
    let vip = vip4(80);
    let key = service_key(vip, Protocol::Tcp);
    let mut spec = ServiceSpec::tcp(vip, m.backend_addrs(80));
    spec.circuit = CircuitSettings {
        base_ejection: Duration::from_millis(200),
        max_ejection: Duration::from_millis(200),
        ..eject_at_once()
    };
    m.dp.apply_service(&spec).unwrap();
    let c = |m: &Mesh, i| m.dp.counter(i).unwrap();
    let (probes0, ejections0, recovered0, failures0) = (
        c(&m, CTR_PROBE),
        c(&m, CTR_EJECTION),
        c(&m, CTR_RECOVERED),
        c(&m, CTR_BACKEND_FAILURE),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..8 {
        let (client, stop) = (m.client.clone(), Arc::clone(&stop));
        threads.push(thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let r = client.hit(vip, 200, &["--timeout-ms", "500"]).unwrap();
                ok += r.ok();
                failed += r.failed();
            }
            (ok, failed)
        }));
    }
    // b1 flaps: down and up every 700 ms for 30 s.
    let b1 = m.backends[1].clone();
    let mut server = Some(m.servers.remove(1));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        thread::sleep(Duration::from_millis(700));
        server = match server.take() {
            Some(s) => {
                drop(s);
                None
            }
            None => Some(
                b1.serve("b1", &[SocketAddr::new(b1.ipv4().into(), 80)], &[])
                    .unwrap(),
            ),
        };
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    drop(server);
    thread::sleep(Duration::from_millis(500));
    let probes = c(&m, CTR_PROBE) - probes0;
    let ejections = c(&m, CTR_EJECTION) - ejections0;
    let recovered = c(&m, CTR_RECOVERED) - recovered0;
    let l4_failures = c(&m, CTR_BACKEND_FAILURE) - failures0;
    let status = m.dp.backend_status(&key).unwrap();
    let all: Vec<(&str, u64)> =
        m.dp.counters()
            .unwrap()
            .into_iter()
            .filter(|(_, v)| *v != 0)
            .collect();
    println!(
        "{ok} connections ({failed} failed), {ejections} ejections, {probes} probes, {recovered} \
         recovered; {status:?}; {all:?}"
    );
    assert!(
        ejections >= 20,
        "b1 flapped for 30 s: {ejections} ejections"
    );
    // Each ejection (first or re-opened after a failed probe) admits exactly one probe, and each
    // probe either closes the circuit or re-opens it (the next ejection): so ejections = probes +
    // circuits still open and waiting for their probe. (A probe whose client gave up would be
    // replaced only after 30 s of silence, PROBE_TIMEOUT_NS: later than any probe of this run.)
    let open = status
        .iter()
        .filter(|b| b.state.circuit == CIRCUIT_OPEN)
        .count() as u64;
    assert_eq!(
        ejections,
        probes + open,
        "{probes} probes for {ejections} ejections, {open} circuits open now"
    );
    assert!(
        recovered <= probes,
        "{recovered} recoveries, {probes} probes"
    );
    assert!(recovered >= 5, "b1 came back often: {recovered} recoveries");
    assert_counts_consistent(&m.dp, &key, l4_failures, ok);
}

/// Counts consistent: every failure the kernel saw is in its backend's count, the service's
/// ejected count is its circuits that are not closed, every answered connection was established,
/// every connection is closed.
fn assert_counts_consistent(
    dp: &Datapath,
    key: &mesh_common::service::ServiceKey,
    l4_failures: u64,
    ok: u64,
) {
    let status = dp.backend_status(key).unwrap();
    let failures: u64 = status.iter().map(|b| b.state.failures).sum();
    assert_eq!(failures, l4_failures, "{status:?}");
    assert_eq!(
        dp.ejected_count(key).unwrap(),
        status
            .iter()
            .filter(|b| b.state.circuit != CIRCUIT_CLOSED)
            .count() as u64,
        "{status:?}"
    );
    let established: u64 = status.iter().map(|b| b.state.total).sum();
    assert!(
        established >= ok,
        "{ok} connections answered, {established} established"
    );
    for b in &status {
        assert_eq!(b.state.active, 0, "{b:?}");
    }
}

#[test]
fn dual_stack_sockets_reach_ipv4_services_through_mapped_addresses() {
    let Some(_k) = mesh_tests::kernel_test("scale_dualstack") else {
        return;
    };
    let mut m = Mesh::new("scale_dualstack", 3).expect("cluster");
    let vip = vip4(80);
    let mapped = SocketAddr::new(
        IpAddr::V6(Ipv4Addr::new(10, 96, 0, 10).to_ipv6_mapped()),
        80,
    );
    let mut spec = ServiceSpec::tcp(vip, m.backend_addrs(80));
    spec.algorithm = Algorithm::RoundRobin;
    spec.circuit = eject_at_once();
    m.dp.apply_service(&spec).unwrap();
    let mut ring = m.dp.take_events().unwrap();
    let before = m.dp.counter(CTR_V4_MAPPED).unwrap();
    // An AF_INET6 socket (what Java and .NET open) to ::ffff:10.96.0.10.
    let r = m.client.hit(mapped, 30, &[]).unwrap();
    assert_eq!(r.ok(), 30, "{r:?}");
    assert_eq!(
        r.peer_mismatch, 0,
        "getpeername shows the mapped service address"
    );
    assert_eq!(r.counts.len(), 3, "load balanced: {r:?}");
    assert!(m.dp.counter(CTR_V4_MAPPED).unwrap() >= before + 30);
    // In flows as the IPv4 service, from the client pod's address, to the backend it reached.
    thread::sleep(Duration::from_millis(200));
    let opens: Vec<_> = mesh_agent::datapath::events::drain(&mut ring)
        .into_iter()
        .filter(|e| e.kind == EV_OPEN)
        .collect();
    assert_eq!(opens.len(), 30, "an open event per connection");
    let client = u32::from_ne_bytes(m.client.ipv4().octets());
    let svc = u32::from_ne_bytes([10, 96, 0, 10]);
    let backends: Vec<u32> = m
        .backends
        .iter()
        .map(|b| u32::from_ne_bytes(b.ipv4().octets()))
        .collect();
    for e in &opens {
        assert_eq!(e.family, mesh_common::FAMILY_V4);
        assert_eq!(e.svc_addr_be[0], svc, "{e:?}");
        assert_eq!(e.client_addr_be[0], client, "{e:?}");
        assert!(backends.contains(&e.backend_addr_be[0]), "{e:?}");
    }
    // UDP too (connect6 + getpeername6 on a connected socket).
    let dns = vip4(53);
    let udp = ServiceSpec {
        protocol: Protocol::Udp,
        ..ServiceSpec::tcp(dns, m.backend_addrs(53))
    };
    m.dp.apply_service(&udp).unwrap();
    let dns_mapped = SocketAddr::new(mapped.ip(), 53);
    let r = m.client.hit(dns_mapped, 12, &["--udp"]).unwrap();
    assert_eq!(r.ok(), 12, "{r:?}");
    assert_eq!(r.peer_mismatch, 0, "{r:?}");
    // Circuit-broken like any other connect: b2 dies, one refusal ejects it.
    m.servers.remove(2);
    let _ = m.client.hit(mapped, 6, &[]).unwrap();
    let key = service_key(vip, Protocol::Tcp);
    assert_eq!(
        m.dp.backend_status(&key).unwrap()[2].state.circuit,
        CIRCUIT_OPEN
    );
    let r = m.client.hit(mapped, 20, &[]).unwrap();
    assert_eq!(r.ok(), 20, "{r:?}");
    assert!(!r.counts.contains_key("b2"), "{r:?}");
    // And an IPv6 service is untouched by the mapping.
    let vip6 = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 10)),
        80,
    );
    m.dp.apply_service(&ServiceSpec::tcp(vip6, m.backend_addrs6(80)[..2].to_vec()))
        .unwrap();
    assert_eq!(m.client.hit(vip6, 6, &[]).unwrap().ok(), 6);
}

#[test]
fn a_client_giving_up_on_its_connect_is_not_held_against_the_backend() {
    let Some(_k) = mesh_tests::kernel_test("scale_abandon") else {
        return;
    };
    let mut m = Mesh::new("scale_abandon", 1).expect("cluster");
    let vip = vip4(80);
    let key = service_key(vip, Protocol::Tcp);
    let mut spec = ServiceSpec::tcp(vip, m.backend_addrs(80));
    spec.circuit = CircuitSettings {
        consecutive_failures: 3,
        ..eject_at_once()
    };
    m.dp.apply_service(&spec).unwrap();
    // The backend's SYNs vanish; each client gives up after 300 ms, before the first RTO (1 s).
    m.backends[0]
        .exec(
            "iptables",
            ["-A", "INPUT", "-p", "tcp", "--dport", "80", "-j", "DROP"],
        )
        .expect("iptables in the backend pod");
    let before = m.dp.counter(CTR_CONNECT_ABANDONED).unwrap();
    let r = m.client.hit(vip, 5, &["--timeout-ms", "300"]).unwrap();
    assert_eq!(r.failed(), 5, "{r:?}");
    thread::sleep(Duration::from_millis(200));
    let b = &m.dp.backend_status(&key).unwrap()[0];
    assert_eq!(
        b.state.failures, 0,
        "the client's own give-up is no failure: {b:?}"
    );
    assert_eq!(b.state.circuit, CIRCUIT_CLOSED);
    assert_eq!(m.dp.counter(CTR_CONNECT_ABANDONED).unwrap(), before + 5);
}

#[test]
fn a_single_replica_is_not_made_unreachable_by_its_own_restart() {
    let Some(_k) = mesh_tests::kernel_test("scale_panic") else {
        return;
    };
    let mut m = Mesh::new("scale_panic", 1).expect("cluster");
    let vip = vip4(80);
    let key = service_key(vip, Protocol::Tcp);
    // Envoy's defaults with fast ejection: panic threshold 50 %.
    let mut spec = ServiceSpec::tcp(vip, m.backend_addrs(80));
    spec.circuit = CircuitSettings {
        consecutive_failures: 1,
        base_ejection: Duration::from_mins(5),
        max_ejection: Duration::from_mins(5),
        ..CircuitSettings::default()
    };
    assert_eq!(spec.circuit.panic_threshold_percent, 50);
    assert_eq!(
        spec.circuit.max_connections, 0,
        "no connection limit by default"
    );
    m.dp.apply_service(&spec).unwrap();
    // The only replica restarts: the refused connect ejects it...
    m.servers.clear();
    let r = m.client.hit(vip, 1, &[]).unwrap();
    assert_eq!(r.errors.get("ECONNREFUSED").copied(), Some(1), "{r:?}");
    assert_eq!(
        m.dp.backend_status(&key).unwrap()[0].state.circuit,
        CIRCUIT_OPEN
    );
    // ...and once it is back, connects reach it at once (panic: below 50 % healthy, balance
    // over all), not after the 5-minute ejection.
    let b0 = m.backends[0].clone();
    let _srv = b0
        .serve("b0", &[SocketAddr::new(b0.ipv4().into(), 80)], &[])
        .unwrap();
    let panics = m.dp.counter(CTR_PANIC).unwrap();
    let r = m.client.hit(vip, 10, &[]).unwrap();
    assert_eq!(r.ok(), 10, "{r:?}");
    assert!(m.dp.counter(CTR_PANIC).unwrap() >= panics + 10);
    // With the panic threshold at 0 (a policy's choice) the same outage fails fast.
    spec.circuit.panic_threshold_percent = 0;
    m.dp.apply_service(&spec).unwrap();
    let r = m.client.hit(vip, 3, &[]).unwrap();
    assert_eq!(r.errors.get("ECONNREFUSED").copied(), Some(3), "{r:?}");
}

#[test]
fn udp_flows_open_and_close_and_reverse_translation_goes_with_the_socket() {
    let Some(_k) = mesh_tests::kernel_test("scale_udp_flows") else {
        return;
    };
    let mut m = Mesh::new("scale_udp_flows", 2).expect("cluster");
    let dns = vip4(53);
    let udp = ServiceSpec {
        protocol: Protocol::Udp,
        ..ServiceSpec::tcp(dns, m.backend_addrs(53))
    };
    m.dp.apply_service(&udp).unwrap();
    let mut ring = m.dp.take_events().unwrap();
    assert_eq!(m.dp.revnat_entries(), 0);
    // Connected sockets (one per datagram; each closes when meshpod exits)...
    let r = m.client.hit(dns, 12, &["--udp"]).unwrap();
    assert_eq!(r.ok(), 12, "{r:?}");
    // ...and one unconnected socket sending to the service six times (one flow).
    let replies: Vec<String> = m
        .client
        .run(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            (0..6)
                .map(|_| {
                    s.send_to(b"q\n", dns).unwrap();
                    let mut buf = [0u8; 64];
                    let (_, from) = s.recv_from(&mut buf).unwrap();
                    from.to_string()
                })
                .collect()
        })
        .unwrap();
    assert!(replies.iter().all(|f| *f == dns.to_string()), "{replies:?}");
    thread::sleep(Duration::from_millis(300));
    let evs: Vec<_> = mesh_agent::datapath::events::drain(&mut ring)
        .into_iter()
        .filter(|e| e.proto == mesh_common::PROTO_UDP)
        .collect();
    let opens = evs.iter().filter(|e| e.kind == EV_OPEN).count();
    let closes = evs
        .iter()
        .filter(|e| e.kind == mesh_common::event::EV_CLOSE)
        .count();
    assert_eq!((opens, closes), (13, 13), "a UDP flow per socket: {evs:?}");
    assert_eq!(
        m.dp.revnat_entries(),
        0,
        "every socket's reverse translation left with the socket"
    );
}

/// The metrics scrape's batched read (`backend_status_many`: `BPF_MAP_LOOKUP_BATCH` past 256
/// backends) gives exactly what the per-backend reads give: ids, addresses, weights, circuits
/// and counters of every backend of several services, some ejected, some carrying traffic.
#[test]
fn batched_backend_status_equals_per_backend_reads() {
    let Some(_k) = mesh_tests::kernel_test("scale_batch_status") else {
        return;
    };
    let mut m = Mesh::new("scale_batch_status", 1).expect("cluster");
    let ip = m.backends[0].ipv4();
    let _srv = m.backends[0]
        .serve_ports("s", SocketAddr::new(ip.into(), 21_000), 300)
        .unwrap();
    let vips = [vip4(81), vip4(82)];
    for (i, vip) in vips.iter().enumerate() {
        let first = 21_000 + 150 * u16::try_from(i).unwrap();
        let mut spec = ServiceSpec::tcp(*vip, ports(ip, first, 150));
        spec.circuit = eject_at_once();
        m.dp.apply_service(&spec).unwrap();
    }
    eject_slots(&mut m.dp, vips[0], [3, 77, 149]);
    eject_slots(&mut m.dp, vips[1], [0, 42]);
    for vip in vips {
        let r = m.client.hit(vip, 600, &["--concurrency", "4"]).unwrap();
        assert_eq!(r.ok(), 600, "{:?}", r.errors);
    }
    let keys: Vec<_> = vips
        .iter()
        .map(|v| service_key(*v, Protocol::Tcp))
        .collect();
    let one_by_one: Vec<_> = keys
        .iter()
        .map(|k| (*k, m.dp.backend_status(k).unwrap()))
        .collect();
    let batched = m.dp.backend_status_many(keys);
    assert_eq!(batched.len(), 2);
    let total: u64 = batched
        .iter()
        .flat_map(|(_, s)| s.iter().map(|b| b.state.total))
        .sum();
    assert_eq!(total, 1_200, "every connection counted in the batched read");
    let open = batched
        .iter()
        .flat_map(|(_, s)| s.iter())
        .filter(|b| b.state.circuit == CIRCUIT_OPEN)
        .count();
    assert_eq!(open, 5, "the five ejected backends");
    assert_eq!(batched, one_by_one);
}
