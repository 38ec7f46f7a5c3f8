//! L7 failure reports run the kernel's own circuit code (issue 8, "one owner of the data path"):
//! `Datapath::report_failure` runs `mesh_l7_report` with `BPF_PROG_TEST_RUN`, which calls the same
//! `circuit::on_failure` as sockops — so reports alone eject on schedule, and reports racing with
//! real failing connects never open a circuit twice or admit a second probe.

mod fixture;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use fixture::{Mesh, vip4};
use mesh_agent::datapath::{
    events, service_key,
    spec::{CircuitSettings, Protocol, ServiceSpec},
};
use mesh_common::{
    backend::{CIRCUIT_CLOSED, CIRCUIT_OPEN},
    counters::{CTR_BACKEND_FAILURE, CTR_EJECTION, CTR_PROBE, CTR_RECOVERED},
    event::{EV_EJECT, FAIL_L7},
};

#[test]
fn reports_alone_eject_after_consecutive_failures() {
    let Some(_k) = mesh_tests::kernel_test("l7_reports_eject") else {
        return;
    };
    let mut m = Mesh::new("l7_reports_eject", 2).expect("cluster");
    let mut ring = m.dp.take_events().expect("event ring");
    let vip = vip4(80);
    let key = service_key(vip, Protocol::Tcp);
    let mut spec = ServiceSpec::tcp(vip, m.backend_addrs(80));
    spec.circuit = CircuitSettings {
        max_connections: 0,
        consecutive_failures: 4,
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(30),
        max_ejection_percent: 100,
        panic_threshold_percent: 0,
    };
    m.dp.apply_service(&spec).unwrap();
    let b1 = m.dp.backend_status(&key).unwrap()[1].id;
    let ejections0 = m.dp.counter(CTR_EJECTION).unwrap();

    // Three failures, a success (resets the run, as Envoy's non-5xx does), three more: no eject.
    for _ in 0..3 {
        assert!(!m.dp.report_failure(b1, 0).unwrap());
    }
    assert!(m.dp.report_success(b1, 0).unwrap());
    for _ in 0..3 {
        assert!(!m.dp.report_failure(b1, 0).unwrap());
    }
    let st = m.dp.backend_status(&key).unwrap()[1].state;
    assert_eq!(
        (st.failures, st.consecutive_failures, st.circuit),
        (6, 3, CIRCUIT_CLOSED),
        "counted by the kernel, not ejected: {st:?}"
    );
    // The fourth in a row ejects, once.
    assert!(
        m.dp.report_failure(b1, 0).unwrap(),
        "4th consecutive ejects"
    );
    assert!(
        !m.dp.report_failure(b1, 0).unwrap(),
        "an open circuit is not opened again"
    );
    let st = m.dp.backend_status(&key).unwrap()[1].state;
    assert_eq!((st.circuit, st.ejections), (CIRCUIT_OPEN, 1), "{st:?}");
    assert!(
        st.ejected_until_ns > mesh_tests::monotonic_ns() + 25_000_000_000,
        "ejected for the base ejection time: {st:?}"
    );
    assert_eq!(m.dp.counter(CTR_EJECTION).unwrap() - ejections0, 1);
    assert_eq!(
        m.dp.ejected_count(&key).unwrap(),
        1,
        "the service's ejected count was reserved by the kernel's CAS"
    );
    thread::sleep(Duration::from_millis(200));
    let ejects: Vec<_> = events::drain(&mut ring)
        .into_iter()
        .filter(|e| e.kind == EV_EJECT)
        .collect();
    assert_eq!(ejects.len(), 1, "one eject event: {ejects:?}");
    assert_eq!(
        (ejects[0].backend_id, ejects[0].reason),
        (b1, FAIL_L7),
        "{ejects:?}"
    );
    assert_eq!(
        mesh_agent::datapath::ip_from_be(ejects[0].backend_addr_be, ejects[0].family),
        std::net::IpAddr::from(m.backends[1].ipv4())
    );
    // The kernel skips it from now on.
    let r = m.client.hit(vip, 40, &[]).unwrap();
    assert_eq!(r.ok(), 40, "{r:?}");
    assert_eq!(r.counts.get("b0").copied(), Some(40), "{r:?}");
    // Unknown backends are not a failure of anyone.
    assert!(!m.dp.report_failure(u32::MAX - 7, 0).unwrap());
    assert!(!m.dp.report_success(u32::MAX - 7, 0).unwrap());
}

#[test]
fn reports_racing_failing_connects_give_one_probe_per_ejection() {
    let Some(_k) = mesh_tests::kernel_test("l7_reports_race") else {
        return;
    };
    let mut m = Mesh::new("l7_reports_race", 2).expect("cluster");
    let vip = vip4(80);
    let key = service_key(vip, Protocol::Tcp);
    let mut spec = ServiceSpec::tcp(vip, m.backend_addrs(80));
    spec.circuit = CircuitSettings {
        max_connections: 0,
        consecutive_failures: 2,
        base_ejection: Duration::from_millis(150),
        max_ejection: Duration::from_millis(150),
        max_ejection_percent: 100,
        panic_threshold_percent: 0,
    };
    m.dp.apply_service(&spec).unwrap();
    let b1_id = m.dp.backend_status(&key).unwrap()[1].id;
    let c = |m: &Mesh, i| m.dp.counter(i).unwrap();
    let (probes0, ejections0, recovered0, failures0) = (
        c(&m, CTR_PROBE),
        c(&m, CTR_EJECTION),
        c(&m, CTR_RECOVERED),
        c(&m, CTR_BACKEND_FAILURE),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let clients = connect_until(&m, vip, 4, &stop);
    // b1 flaps every 400 ms for 6 s; this thread reports L7 failures of b1 all along, racing the
    // clients' refused connects (and their probes) for every transition of b1's circuit.
    let b1 = m.backends[1].clone();
    let mut server = Some(m.servers.remove(1));
    let start = Instant::now();
    let mut flip = start;
    let (mut reports, mut report_ejections) = (0u64, 0u64);
    while start.elapsed() < Duration::from_secs(6) {
        if flip.elapsed() >= Duration::from_millis(400) {
            flip = Instant::now();
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
        reports += 1;
        if m.dp.report_failure(b1_id, 0).unwrap() {
            report_ejections += 1;
        }
        thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let ok: u64 = clients.into_iter().map(|t| t.join().unwrap()).sum();
    drop(server);
    thread::sleep(Duration::from_millis(300));
    let probes = c(&m, CTR_PROBE) - probes0;
    let ejections = c(&m, CTR_EJECTION) - ejections0;
    let recovered = c(&m, CTR_RECOVERED) - recovered0;
    let l4_failures = c(&m, CTR_BACKEND_FAILURE) - failures0;
    let status = m.dp.backend_status(&key).unwrap();
    let open = status
        .iter()
        .filter(|b| b.state.circuit == CIRCUIT_OPEN)
        .count() as u64;
    let not_closed = status
        .iter()
        .filter(|b| b.state.circuit != CIRCUIT_CLOSED)
        .count() as u64;
    println!(
        "{ok} connections, {reports} reports ({report_ejections} ejected), {l4_failures} L4 \
         failures, {ejections} ejections, {probes} probes, {recovered} recovered; {status:?}"
    );
    assert!(
        report_ejections >= 2 && ejections > report_ejections,
        "both reports and failing connects ejected b1: {report_ejections} of {ejections}"
    );
    // Every ejection admits exactly one probe; each probe either recovers the circuit or re-opens
    // it (another ejection). So ejections = probes + circuits open right now, and no recovery
    // without its probe.
    assert_eq!(
        ejections,
        probes + open,
        "{probes} probes for {ejections} ejections, {open} open now"
    );
    assert!(
        recovered <= probes,
        "{recovered} recoveries, {probes} probes"
    );
    // The kernel counted every L4 failure and every report, none lost to a race.
    let failures: u64 = status.iter().map(|b| b.state.failures).sum();
    assert_eq!(failures, l4_failures + reports, "{status:?}");
    assert_eq!(
        m.dp.ejected_count(&key).unwrap(),
        not_closed,
        "the service's ejected count matches its open circuits"
    );
    for b in &status {
        assert_eq!(b.state.active, 0, "{b:?}");
    }
}

/// `threads` clients connecting to `vip` in batches of 100 until `stop`; each returns how many
/// connections were answered.
fn connect_until(
    m: &Mesh,
    vip: SocketAddr,
    threads: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<u64>> {
    (0..threads)
        .map(|_| {
            let (client, stop) = (m.client.clone(), Arc::clone(stop));
            thread::spawn(move || {
                let mut ok = 0;
                while !stop.load(Ordering::Relaxed) {
                    ok += client.hit(vip, 100, &["--timeout-ms", "500"]).unwrap().ok();
                }
                ok
            })
        })
        .collect()
}
