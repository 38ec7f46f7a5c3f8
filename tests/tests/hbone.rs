//! HBONE across two harness nodes: client pod on node 1 → outbound listener → mTLS HTTP/2 tunnel →
//! inbound on node 2 → server pod, with the client pod's address preserved (transparent socket
//! and the reply routing the agent installs). The proxies run in this process, each node's on a
//! thread that joined the node's network namespace (sockets belong to the namespace they were
//! made in), with certificates from an rcgen CA.

use std::fs::File;
use std::future::Future;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use mesh_agent::drain::Drain;
use mesh_agent::identity::SpiffeId;
use mesh_agent::proxy::stats::Direction;
use mesh_agent::proxy::testing::{StaticCertProvider, TestCa};
use mesh_agent::proxy::{
    AllowAll, ClientConfig, HboneClient, InboundConfig, InboundServer, LocalWorkloads, OriginalDst,
    OutboundListener, ProxyStats, Redirect, transparent,
};
use mesh_tests::{Cluster, kernel_test};
use nix::sched::CloneFlags;
use tokio::sync::oneshot;

const TD: &str = "cluster.local";
const APP_PORT: u16 = 8080;

/// Runs `f` on a new thread inside the network namespace at `netns`, on its own runtime.
fn spawn_in<F, Fut>(netns: &Path, f: F) -> JoinHandle<Result<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>>,
{
    let path = netns.to_owned();
    std::thread::spawn(move || {
        let ns = File::open(&path).with_context(|| format!("open {}", path.display()))?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).context("setns")?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f())
    })
}

/// Joins this thread to `netns` (for the blocking pod workloads).
fn enter(netns: &Path) -> Result<()> {
    let ns = File::open(netns)?;
    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).context("setns")?;
    Ok(())
}

struct PodIdentities(IpAddr, SpiffeId);
impl LocalWorkloads for PodIdentities {
    fn identity_of(&self, pod: IpAddr) -> Option<SpiffeId> {
        (pod == self.0).then(|| self.1.clone())
    }
}

/// What the kernel would have recorded for the client pod's connections.
struct CapturedFrom(IpAddr, Redirect);
impl OriginalDst for CapturedFrom {
    fn lookup(&self, client: SocketAddr) -> Option<Redirect> {
        (client.ip() == self.0).then(|| self.1.clone())
    }
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

    let ca = TestCa::new("hbone test root")?;
    let src: SpiffeId = format!("spiffe://{TD}/ns/a/sa/client").parse()?;
    let dst: SpiffeId = format!("spiffe://{TD}/ns/b/sa/server").parse()?;
    let n1_certs = StaticCertProvider::new(TD, ca.roots()?);
    n1_certs.insert(ca.issue(&src)?);
    let n2_certs = StaticCertProvider::new(TD, ca.roots()?);
    n2_certs.insert(ca.issue(&dst)?);

    // Server pod: reads to EOF (the client's half-close), then answers with the peer it saw.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<SocketAddr>::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let (stop, seen, netns) = (
            stop.clone(),
            seen.clone(),
            server_pod.netns_path().to_owned(),
        );
        std::thread::spawn(move || -> Result<()> {
            enter(&netns)?;
            let listener = StdListener::bind(("0.0.0.0", APP_PORT))?;
            listener.set_nonblocking(true)?;
            ready_tx.send(())?;
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        seen.lock().unwrap().push(peer);
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
        })
    };
    ready_rx.recv_timeout(Duration::from_secs(5))?;

    // Node 2: reply routing + inbound on 15008.
    let n2_stats = ProxyStats::new();
    let (stop2, stopped2) = oneshot::channel::<()>();
    let (up2_tx, up2) = std::sync::mpsc::channel();
    let node2 = {
        let (certs, stats) = (n2_certs.clone(), n2_stats.clone());
        let workloads = PodIdentities(IpAddr::V4(server_pod.ipv4()), dst.clone());
        spawn_in(n2.netns_path(), move || async move {
            transparent::install()?;
            let drain = Drain::new(Duration::from_secs(1));
            let server = InboundServer::new(
                certs,
                Arc::new(AllowAll),
                Arc::new(workloads),
                stats,
                InboundConfig::default(),
            )?;
            let listener = tokio::net::TcpListener::bind(("0.0.0.0", 15008)).await?;
            tokio::spawn(server.serve(listener, drain.watch()));
            up2_tx.send(())?;
            let _ = stopped2.await;
            drain.drain().await;
            transparent::uninstall();
            Ok(())
        })
    };
    up2.recv_timeout(Duration::from_secs(10))
        .context("node 2 inbound did not start")?;
    let rules = n2.exec("ip", ["rule"])?;
    ensure!(
        rules.contains("lookup 15008"),
        "reply rule missing: {rules}"
    );

    // Node 1: outbound listener on 15001 with the capture's answer for the client pod.
    let client = HboneClient::new(n1_certs.clone(), ProxyStats::new(), ClientConfig::default());
    let (stop1, stopped1) = oneshot::channel::<()>();
    let (up1_tx, up1) = std::sync::mpsc::channel();
    let node1 = {
        let client = client.clone();
        let redirect = Redirect {
            dst_pod: SocketAddr::new(server_pod.ipv4().into(), APP_PORT),
            dst_node: SocketAddr::new(n2.ipv4().into(), 15008),
            dst_identity: dst.clone(),
            src_identity: src.clone(),
        };
        let captured = CapturedFrom(IpAddr::V4(client_pod.ipv4()), redirect);
        spawn_in(n1.netns_path(), move || async move {
            let drain = Drain::new(Duration::from_secs(1));
            let listener = tokio::net::TcpListener::bind(("0.0.0.0", 15001)).await?;
            tokio::spawn(
                OutboundListener::new(client, Arc::new(captured)).serve(listener, drain.watch()),
            );
            up1_tx.send(())?;
            let _ = stopped1.await;
            drain.drain().await;
            Ok(())
        })
    };
    up1.recv_timeout(Duration::from_secs(10))
        .context("node 1 outbound did not start")?;

    // Client pod: 20 concurrent connections, each writes, half-closes, reads the answer.
    let outbound = SocketAddr::new(n1.gateway_v4().into(), 15001);
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let netns = client_pod.netns_path().to_owned();
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
    let client_ip = client_pod.ipv4().to_string();
    for c in clients {
        let (me, payload, answer) = c.join().expect("client thread")?;
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
    ensure!(seen.lock().unwrap().len() == 20);

    let out: Vec<_> = client
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
    let inbound: u64 = n2_stats
        .counters
        .snapshot()
        .into_iter()
        .find(|(n, _)| *n == "inbound_streams")
        .map_or(0, |(_, v)| v);
    ensure!(inbound == 20, "inbound streams {inbound}");

    let _ = stop1.send(());
    let _ = stop2.send(());
    node1.join().expect("node 1 thread")?;
    node2.join().expect("node 2 thread")?;
    stop.store(true, Ordering::Relaxed);
    server.join().expect("server thread")?;
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
