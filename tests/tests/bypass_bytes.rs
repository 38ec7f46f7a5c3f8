//! Bypassed connections report their payload bytes (issue 7.11): a same-node connection whose
//! payload `sk_msg` carries socket to socket closes with the same byte counts as the same
//! connection through TCP — what flows and metrics show must not depend on the bypass.

mod fixture;

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use fixture::{Mesh, vip4};
use mesh_agent::datapath::{events, spec::ServiceSpec};
use mesh_common::{counters::CTR_BYPASS_ESTABLISHED, event::EV_CLOSE};
use mesh_tests::{
    Cluster,
    agent::{AgentProcess, write_atomically},
};

/// Client → server payload: `meshpod transfer` sends it, the server echoes it back after its
/// name line, so the server → client payload is `UP + BANNER` (directions differ: a swap fails).
const UP: u64 = 1 << 20;
/// The server's name line (`b0\n`), sent before the echo.
const BANNER: u64 = 3;
/// The service port (the fixture's `meshpod serve` listens on 80).
const PORT: u16 = 80;

/// One connection client → `vip` → the server pod: `UP` bytes up, echoed back, closed. Returns
/// (bytes sent, bytes received) as the client counted them.
fn exchange(m: &Mesh, vip: SocketAddr) -> (u64, u64) {
    let t = m.client.transfer(vip, UP).expect("transfer");
    assert_eq!(t.sha256_sent, t.sha256_received, "{t:?}");
    (t.sent, t.received + BANNER)
}

/// 50 connections that read the server's name line and close (the client closes first, so its
/// socket closes from `FIN_WAIT2` with or without the server's FIN, whichever comes first), then 20
/// that close with a reset (`SO_LINGER` 0): every close event shows 0 bytes sent and exactly the
/// name line received.
fn short_connections_count_exactly(
    m: &Mesh,
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    vip: SocketAddr,
    what: &str,
) {
    let r = m.client.hit(vip, 50, &[]).expect("hit");
    assert_eq!(r.ok(), 50, "{r:?}");
    let r = m
        .client
        .hit(vip, 20, &["--bind-port-base", "31000"])
        .expect("hit with resets");
    assert_eq!(r.ok(), 20, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut closes = Vec::new();
    while closes.len() < 70 && Instant::now() < deadline {
        closes.extend(close_events(ring, vip));
    }
    assert_eq!(closes.len(), 70, "{what}: one close event per connection");
    let wrong: Vec<_> = closes
        .iter()
        .filter(|e| (e.bytes_sent, e.bytes_received) != (0, BANNER))
        .collect();
    assert!(
        wrong.is_empty(),
        "{what}: connections that only read the name line report exactly it: {wrong:?}"
    );
}

/// The close events of connections to `vip`'s port among the ring's pending events (waits until
/// at least one arrived).
fn close_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    vip: SocketAddr,
) -> Vec<mesh_common::event::FlowEvent> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = Vec::new();
    while found.is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        found.extend(
            events::drain(ring)
                .into_iter()
                .filter(|e| e.kind == EV_CLOSE && u16::from_be(e.svc_port_be) == vip.port()),
        );
    }
    found
}

#[test]
fn a_bypassed_connection_closes_with_the_bytes_it_carried() {
    let Some(_k) = mesh_tests::kernel_test("bypass_bytes") else {
        return;
    };
    let mut m = Mesh::new("bypass_bytes", 1).expect("cluster");
    let mut ring = m.dp.take_events().expect("event ring");
    let vip = vip4(PORT);
    m.dp.apply_service(&ServiceSpec::tcp(vip, m.backend_addrs(PORT)))
        .expect("apply");
    let iface = m.client.host_ifname().to_owned();
    let wire = |m: &Mesh| {
        let s = m.node.iface_stats(&iface).expect("veth counters");
        s.rx_bytes + s.tx_bytes
    };

    // Bypass off (what `--bypass false` does: no local endpoints): TCP carries the payload.
    let bypassed0 = m.dp.counter(CTR_BYPASS_ESTABLISHED).unwrap();
    let w0 = wire(&m);
    assert_eq!(exchange(&m, vip), (UP, UP + BANNER), "the exchange itself");
    let stack_wire = wire(&m) - w0;
    assert_eq!(
        m.dp.counter(CTR_BYPASS_ESTABLISHED).unwrap(),
        bypassed0,
        "bypass off: no socket entered the bypass"
    );
    let off = close_events(&mut ring, vip);
    assert_eq!(off.len(), 1, "one close event without bypass: {off:?}");
    assert_eq!(
        (off[0].bytes_sent, off[0].bytes_received),
        (UP, UP + BANNER),
        "without bypass the close event counts the payload exactly: {:?}",
        off[0]
    );

    short_connections_count_exactly(&m, &mut ring, vip, "bypass off");

    // Bypass on: both pods are local endpoints; the payload never touches TCP.
    m.dp.set_local_endpoints(&[m.client.ipv4().into(), m.backends[0].ipv4().into()])
        .unwrap();
    let w1 = wire(&m);
    assert_eq!(exchange(&m, vip), (UP, UP + BANNER), "the exchange itself");
    let bypass_wire = wire(&m) - w1;
    assert_eq!(
        m.dp.counter(CTR_BYPASS_ESTABLISHED).unwrap() - bypassed0,
        2,
        "bypass on: both ends entered the bypass"
    );
    assert!(
        stack_wire > 2 * UP && bypass_wire < 64 << 10,
        "the payload crossed the veth without bypass ({stack_wire} B) and not with it \
         ({bypass_wire} B)"
    );
    let on = close_events(&mut ring, vip);
    assert_eq!(on.len(), 1, "one close event with bypass: {on:?}");
    assert_eq!(
        (on[0].bytes_sent, on[0].bytes_received),
        (off[0].bytes_sent, off[0].bytes_received),
        "a bypassed connection reports what the same connection reports through TCP: {:?}",
        on[0]
    );
    short_connections_count_exactly(&m, &mut ring, vip, "bypass on");
}

/// The real agent and `meshctl flows`: one connection echoing 1 MiB through the service, once with
/// the agent's bypass on (`MESH_BYPASS=true`) and once with it restarted with `MESH_BYPASS=false`;
/// both flows show exactly the payload.
#[test]
fn the_agent_shows_the_same_flow_bytes_with_bypass_on_and_off() {
    let Some(_k) = mesh_tests::kernel_test("bypass_bytes_agent") else {
        return;
    };
    let cluster = Cluster::new("bypass_bytes_agent").expect("cluster");
    let node = cluster.add_node("a").expect("node");
    let client = cluster.add_pod(&node, "client").expect("client pod");
    let (backends, _servers) =
        mesh_tests::meshpod::backend_pods(&cluster, &node, "web-", 1, PORT).expect("backend");
    let vip = vip4(PORT);
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).expect("work dir");
    let config = work.join("mesh.yaml");
    write_atomically(
        &config,
        &format!(
            "node: a\nservices:\n  - name: web\n    clusterIPs: [{}]\n    ports:\n      - {{ name: \
             http, port: {PORT} }}\n    endpoints:\n      - {{ ip: {}, node: a, pod: {} }}\npods:\n  \
             - {{ name: client, node: a, serviceAccount: frontend, ips: [{}] }}\n  - {{ name: {}, \
             node: a, serviceAccount: web, ips: [{}] }}\n",
            vip.ip(),
            backends[0].ipv4(),
            backends[0].name(),
            client.ipv4(),
            backends[0].name(),
            backends[0].ipv4()
        ),
    )
    .expect("model");
    let pins = cluster.bpffs_dir().expect("bpffs").join("a");
    let mut agent = AgentProcess::new(node.clone(), config, pins, work.join("admin.sock"));
    let iface = client.host_ifname().to_owned();
    for bypass in [true, false] {
        agent.env.retain(|(k, _)| k != "MESH_BYPASS");
        agent.env.push(("MESH_BYPASS".into(), bypass.to_string()));
        agent.start().expect("agent starts");
        let w0 = node.iface_stats(&iface).expect("veth counters");
        let t = client.transfer(vip, UP).expect("transfer");
        assert_eq!((t.sent, t.received), (UP, UP), "{t:?}");
        let w1 = node.iface_stats(&iface).expect("veth counters");
        let wire = (w1.rx_bytes + w1.tx_bytes) - (w0.rx_bytes + w0.tx_bytes);
        assert_eq!(
            wire < 64 << 10,
            bypass,
            "bypass {bypass}: {wire} bytes crossed the client's veth"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let flows = loop {
            let out = agent
                .meshctl(&["flows", "--since", "1m", "--verdict", "close", "-o", "json"])
                .expect("meshctl flows");
            let flows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|f: &serde_json::Value| f["service_address"] == vip.to_string())
                .collect();
            if !flows.is_empty() || Instant::now() > deadline {
                break flows;
            }
            thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(flows.len(), 1, "bypass {bypass}: {flows:?}");
        assert_eq!(
            (&flows[0]["bytes_sent"], &flows[0]["bytes_received"]),
            (
                &serde_json::Value::from(UP),
                &serde_json::Value::from(UP + t.name.len() as u64 + 1)
            ),
            "bypass {bypass}: the flow shows the payload each way: {}",
            flows[0]
        );
        agent
            .terminate(Duration::from_secs(10))
            .expect("agent stops");
    }
}

/// What the reader of [`half_closed_reader`] saw: the bytes, or the error kind, and when.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ReadOutcome {
    got: Result<String, String>,
    after_ms: u64,
}

/// A client of `to` with two threads, as full-duplex applications are written: one blocks in
/// `read` until end of stream (5 s timeout) while the other half-closes its side (`shutdown(SHUT_WR)`)
/// 200 ms after connect. The server answers only after a second.
fn half_closed_reader(to: SocketAddr) -> ReadOutcome {
    use std::io::Read;
    let start = Instant::now();
    let mut s = loop {
        match std::net::TcpStream::connect(to) {
            Ok(s) => break s,
            // The server thread may not be listening yet.
            Err(e) if start.elapsed() < Duration::from_secs(3) => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return ReadOutcome {
                    got: Err(format!("connect: {e}")),
                    after_ms: 0,
                };
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let writer = s.try_clone().expect("clone");
    let closer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    });
    let t0 = Instant::now();
    let mut out = Vec::new();
    let got = s
        .read_to_end(&mut out)
        .map(|_| String::from_utf8_lossy(&out).into_owned())
        .map_err(|e| format!("{:?}", e.kind()));
    let after_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    let _ = closer.join();
    ReadOutcome { got, after_ms }
}

/// The slow server for [`half_closed_reader`]: accepts one connection on `at`, answers `late\n`
/// after a second, reads to end of stream and closes.
fn slow_server(at: SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind(at).map_err(|e| format!("bind {at}: {e}"))?;
    let (mut c, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
    thread::sleep(Duration::from_secs(1));
    c.write_all(b"late\n").map_err(|e| format!("write: {e}"))?;
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    Ok(())
}

/// Why same-node bypass is off by default (`mesh_agent::config::DEFAULT_BYPASS`): a socket in a
/// sockmap reads through `tcp_bpf_recvmsg`, which waits for data once (`tcp_msg_wait_data`: one
/// `sk_wait_event`) and returns `EAGAIN` to a *blocking* read after any wake-up that brought no
/// data — such as the state change of the socket's own half-close. Through TCP the same reader
/// sleeps on until the answer comes (`tcp_recvmsg` loops). Shown here with the real programs:
/// bypass off → the answer after a second; bypass on → `WouldBlock` at the half-close. If this
/// test fails because the bypass read the answer too, the kernel got fixed: the default can be
/// reconsidered.
#[test]
fn a_blocked_reader_gets_eagain_from_the_bypass_at_its_own_half_close() {
    let Some(_k) = mesh_tests::kernel_test("bypass_eagain") else {
        return;
    };
    const {
        assert!(
            !mesh_agent::config::DEFAULT_BYPASS,
            "the bypass must stay off by default while the kernel does this"
        );
    }
    let mut m = Mesh::new("bypass_eagain", 1).expect("cluster");
    let server = m.backends[0].clone();
    let at = SocketAddr::new(server.ipv4().into(), 9000);
    let run = |m: &Mesh| -> ReadOutcome {
        let srv = server.clone();
        let s = thread::spawn(move || srv.run(move || slow_server(at)));
        let r = m
            .client
            .run(move || half_closed_reader(at))
            .expect("client closure");
        let outcome = s.join().expect("server thread").expect("server closure");
        assert_eq!(outcome, Ok(()), "the server side");
        r
    };

    // Bypass off (the default): the reader sleeps through its own half-close and gets the answer.
    let through_tcp = run(&m);
    assert_eq!(
        through_tcp.got,
        Ok("late\n".to_owned()),
        "through TCP: {through_tcp:?}"
    );
    assert!(through_tcp.after_ms >= 900, "{through_tcp:?}");

    // Bypass on: the same reader is woken by its own half-close and gets EAGAIN.
    let bypassed0 = m.dp.counter(CTR_BYPASS_ESTABLISHED).unwrap();
    m.dp.set_local_endpoints(&[m.client.ipv4().into(), server.ipv4().into()])
        .unwrap();
    let bypassed = run(&m);
    assert_eq!(
        m.dp.counter(CTR_BYPASS_ESTABLISHED).unwrap() - bypassed0,
        2,
        "both ends entered the bypass"
    );
    assert_eq!(
        bypassed.got,
        Err("WouldBlock".to_owned()),
        "bypass on: {bypassed:?}"
    );
    assert!(
        bypassed.after_ms < 900,
        "woken at the half-close: {bypassed:?}"
    );
}
