//! HBONE across two harness nodes: client pod on node 1 → outbound listener → mTLS HTTP/2 tunnel →
//! inbound on node 2 → server pod, with the client pod's address preserved (transparent socket
//! and the reply routing the agent installs). The proxies run in this process
//! (`mesh_tests::hbone`), with certificates from an rcgen CA.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use mesh_agent::proxy::stats::Direction;
use mesh_agent::proxy::{ProxyStats, transparent};
use mesh_tests::hbone::{Capture, Tunnel, contains, enter};
use mesh_tests::{Cluster, PodHandle, kernel_test};

const APP_PORT: u16 = 8080;

/// A server pod that reads to EOF (the client's half-close), then answers with the peer it saw
/// and what it read. Records every peer.
struct ServerPod {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<SocketAddr>>>,
    thread: JoinHandle<Result<()>>,
}

impl ServerPod {
    fn start(pod: &PodHandle, v6: bool) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::<SocketAddr>::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (flag, peers, netns) = (stop.clone(), seen.clone(), pod.netns_path().to_owned());
        let thread = std::thread::spawn(move || -> Result<()> {
            enter(&netns)?;
            let listener = if v6 {
                StdListener::bind(("::", APP_PORT))?
            } else {
                StdListener::bind(("0.0.0.0", APP_PORT))?
            };
            listener.set_nonblocking(true)?;
            ready_tx.send(())?;
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        peers.lock().unwrap().push(peer);
                        std::thread::spawn(move || {
                            s.set_nonblocking(false).ok();
                            let mut buf = Vec::new();
                            if s.read_to_end(&mut buf).is_ok() {
                                let _ = write!(s, "peer={peer} echo:");
                                let _ = s.write_all(&buf);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            Ok(())
        });
        ready_rx.recv_timeout(Duration::from_secs(5))?;
        Ok(Self { stop, seen, thread })
    }

    fn finish(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("server thread")
    }
}

/// From the client pod: `n` concurrent connections to `outbound`; each writes, half-closes and
/// reads the answer. Returns (local address, payload, answer) per connection.
fn run_clients(
    pod: &PodHandle,
    outbound: SocketAddr,
    n: usize,
) -> Result<Vec<(SocketAddr, String, String)>> {
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let netns = pod.netns_path().to_owned();
            std::thread::spawn(move || -> Result<(SocketAddr, String, String)> {
                enter(&netns)?;
                let mut s = StdStream::connect_timeout(&outbound, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let me = s.local_addr()?;
                let payload = format!("request {i} ").repeat(2_000);
                s.write_all(payload.as_bytes())?;
                s.shutdown(Shutdown::Write)?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok((me, payload, answer))
            })
        })
        .collect();
    clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect()
}

fn counter(stats: &ProxyStats, name: &str) -> u64 {
    stats
        .counters
        .snapshot()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map_or(0, |(_, v)| v)
}

/// The link between the nodes carried TLS 1.3 (`ServerHello`'s `supported_versions` = 0x0304),
/// application data records, and none of the payload.
fn assert_encrypted(frames: &[Vec<u8>]) -> Result<()> {
    let wire: usize = frames.iter().map(Vec::len).sum();
    ensure!(
        wire > 20 * 20_000,
        "captured only {wire} bytes on node 1's link"
    );
    ensure!(
        frames
            .iter()
            .any(|f| contains(f, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04])),
        "no TLS 1.3 ServerHello on the link"
    );
    ensure!(
        frames.iter().any(|f| contains(f, &[0x17, 0x03, 0x03])),
        "no TLS application data on the link"
    );
    ensure!(
        !frames.iter().any(|f| contains(f, b"request 1")),
        "payload visible on the link"
    );

    Ok(())
}

#[test]
fn client_pod_reaches_server_pod_through_the_tunnel_with_its_own_address() -> Result<()> {
    let Some(_k) = kernel_test("hbone_tunnel") else {
        return Ok(());
    };
    let cluster = Cluster::new("hbone_tunnel")?;
    let n1 = cluster.add_node("n1")?;
    let n2 = cluster.add_node("n2")?;
    let client_pod = cluster.add_pod(&n1, "client")?;
    let server_pod = cluster.add_pod(&n2, "server")?;

    let server = ServerPod::start(&server_pod, false)?;
    let tunnel = Tunnel::start(&client_pod, &server_pod, APP_PORT)?;
    let rules = n2.exec("ip", ["rule"])?;
    ensure!(
        rules.contains("lookup 15008"),
        "reply rule missing: {rules}"
    );

    let capture = Capture::start(n1.netns_path())?;
    let results = run_clients(
        &client_pod,
        SocketAddr::new(n1.gateway_v4().into(), 15001),
        20,
    )?;
    let frames = capture.finish()?;
    let client_ip = client_pod.ipv4().to_string();
    for (me, payload, answer) in &results {
        ensure!(me.ip().to_string() == client_ip, "client bound {me}");
        let (peer, echoed) = answer
            .split_once(" echo:")
            .with_context(|| format!("bad answer {:?}", &answer[..answer.len().min(80)]))?;
        ensure!(
            peer.starts_with(&format!("peer={client_ip}:")),
            "the server pod saw {peer}, not the client pod {client_ip}"
        );
        ensure!(
            echoed == payload,
            "payload corrupted ({} vs {} bytes)",
            echoed.len(),
            payload.len()
        );
    }
    ensure!(server.seen.lock().unwrap().len() == 20);

    assert_encrypted(&frames)?;

    let out: Vec<_> = tunnel
        .client
        .stats()
        .tunnels()
        .into_iter()
        .filter(|t| t.direction == Direction::Outbound)
        .collect();
    ensure!(
        out.len() == 1,
        "streams must share one pooled connection: {out:?}"
    );
    ensure!(out[0].streams_total == 20, "{out:?}");
    ensure!(out[0].peer == SocketAddr::new(n2.ipv4().into(), 15008));
    ensure!(counter(&tunnel.inbound_stats, "inbound_streams") == 20);

    tunnel.finish()?;
    server.finish()?;
    let rules = n2.exec("ip", ["rule"])?;
    ensure!(
        !rules.contains("lookup 15008"),
        "reply rule left behind: {rules}"
    );
    let mangle = n2.exec("iptables", ["-t", "mangle", "-S"])?;
    ensure!(
        !mangle.contains(transparent::CHAIN),
        "chain left behind: {mangle}"
    );
    cluster.teardown()
}

/// The same over IPv6: pod and node addresses v6, the server pod sees the client pod's v6
/// address (the reply routing's IPv6 half).
#[test]
fn the_tunnel_preserves_the_client_address_over_ipv6() -> Result<()> {
    let Some(_k) = kernel_test("hbone_tunnel_v6") else {
        return Ok(());
    };
    let cluster = Cluster::new("hbone_tunnel_v6")?;
    let n1 = cluster.add_node("n1")?;
    let n2 = cluster.add_node("n2")?;
    let client_pod = cluster.add_pod(&n1, "client")?;
    let server_pod = cluster.add_pod(&n2, "server")?;
    let server = ServerPod::start(&server_pod, true)?;
    let tunnel = Tunnel::start_v6(&client_pod, &server_pod, APP_PORT)?;
    let results = run_clients(&client_pod, tunnel.outbound_addr, 5)?;
    let want = format!("peer=[{}]:", client_pod.ipv6());
    for (_, payload, answer) in &results {
        ensure!(
            answer.starts_with(&want),
            "server saw {:?}",
            &answer[..answer.len().min(60)]
        );
        ensure!(answer.ends_with(payload.as_str()), "payload corrupted");
    }
    ensure!(tunnel.client.stats().tunnels()[0].peer.is_ipv6());
    tunnel.finish()?;
    server.finish()?;
    cluster.teardown()
}

/// `meshctl tunnels` reaches the agent's `ListTunnels`: the table's columns and every proxy
/// counter by name in JSON (no tunnel yet: the agent's wiring of the proxies comes with the CA).
#[test]
fn meshctl_tunnels_lists_connections_and_counters() -> Result<()> {
    let Some(_k) = kernel_test("hbone_meshctl_tunnels") else {
        return Ok(());
    };
    let cluster = Cluster::new("hbone_meshctl_tunnels")?;
    let node = cluster.add_node("a")?;
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work)?;
    let config = work.join("mesh.yaml");
    mesh_tests::agent::write_atomically(&config, "node: a\nservices: []\n")?;
    let mut agent = mesh_tests::agent::AgentProcess::new(
        node,
        config,
        cluster.bpffs_dir()?.join("a"),
        work.join("admin.sock"),
    );
    agent.start()?;
    let json = agent.meshctl_json(&["tunnels"])?;
    ensure!(
        json["tunnels"].as_array().is_some_and(Vec::is_empty),
        "{json}"
    );
    for name in [
        "inbound_tls_failed",
        "inbound_denied",
        "outbound_streams",
        "stream_resets",
    ] {
        ensure!(
            json["counters"][name] == 0,
            "counter {name} missing: {json}"
        );
    }
    let table = String::from_utf8_lossy(&agent.meshctl(&["tunnels"])?.stdout).into_owned();
    ensure!(
        table.contains("DIRECTION") && table.contains("RECEIVED"),
        "{table}"
    );
    agent.terminate(Duration::from_secs(10))?;
    cluster.teardown()
}
