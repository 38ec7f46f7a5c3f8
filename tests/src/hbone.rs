//! HBONE between two harness nodes, for the tests and the mtls benchmark: each node's proxy runs
//! on a thread that joined the node's network namespace (sockets belong to the namespace they were
//! made in) with its own runtime; certificates come from an rcgen CA
//! (`mesh_agent::proxy::testing`). The capture is stood in for by [`CapturedFrom`].

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use mesh_agent::drain::Drain;
use mesh_agent::identity::SpiffeId;
use mesh_agent::proxy::testing::{StaticCertProvider, TestCa};
use mesh_agent::proxy::{
    AllowAll, ClientConfig, HboneClient, InboundConfig, InboundServer, LocalWorkloads, OriginalDst,
    OutboundListener, ProxyStats, Redirect, transparent,
};
use nix::sched::CloneFlags;
use tokio::sync::oneshot;

use crate::{NodeHandle, PodHandle};

/// The trust domain of the test identities.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Runs `f` on a new thread inside the network namespace at `netns`, on its own runtime.
pub fn spawn_in<F, Fut>(netns: &Path, f: F) -> JoinHandle<Result<()>>
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
pub fn enter(netns: &Path) -> Result<()> {
    let ns = File::open(netns)?;
    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).context("setns")?;
    Ok(())
}

/// The one pod a node serves, and its identity.
pub struct PodIdentities(pub IpAddr, pub SpiffeId);
impl LocalWorkloads for PodIdentities {
    fn identity_of(&self, pod: IpAddr) -> Option<SpiffeId> {
        (pod == self.0).then(|| self.1.clone())
    }
}

/// What the kernel would have recorded for the client pod's connections.
pub struct CapturedFrom(pub IpAddr, pub Redirect);
impl OriginalDst for CapturedFrom {
    fn lookup(&self, client: SocketAddr) -> Option<Redirect> {
        (client.ip().to_canonical() == self.0).then(|| self.1.clone())
    }
}

/// A node's proxy thread: stopped (drained) by [`NodeProxy::finish`].
pub struct NodeProxy {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<Result<()>>,
}

impl NodeProxy {
    pub fn finish(self) -> Result<()> {
        let _ = self.stop.send(());
        self.thread.join().expect("node proxy thread")
    }
}

/// The server's node: reply routing + inbound on 15008 (dual-stack), serving `workloads`.
pub fn start_inbound(
    node: &NodeHandle,
    certs: Arc<StaticCertProvider>,
    stats: Arc<ProxyStats>,
    workloads: PodIdentities,
) -> Result<NodeProxy> {
    let (stop, stopped) = oneshot::channel::<()>();
    let (up_tx, up) = std::sync::mpsc::channel();
    let thread = spawn_in(node.netns_path(), move || async move {
        transparent::install()?;
        let drain = Drain::new(Duration::from_secs(1));
        let server = InboundServer::new(
            certs,
            Arc::new(AllowAll),
            Arc::new(workloads),
            stats,
            InboundConfig::default(),
        )?;
        let listener = tokio::net::TcpListener::bind(("::", 15008)).await?;
        tokio::spawn(server.serve(listener, drain.watch()));
        up_tx.send(())?;
        let _ = stopped.await;
        drain.drain().await;
        let _ = transparent::uninstall();
        Ok(())
    });
    up.recv_timeout(Duration::from_secs(10))
        .context("inbound did not start")?;
    Ok(NodeProxy { stop, thread })
}

/// The client's node: the outbound listener on 15001 (dual-stack), with what the capture would record.
pub fn start_outbound(
    node: &NodeHandle,
    client: Arc<HboneClient>,
    captured: CapturedFrom,
) -> Result<NodeProxy> {
    let (stop, stopped) = oneshot::channel::<()>();
    let (up_tx, up) = std::sync::mpsc::channel();
    let thread = spawn_in(node.netns_path(), move || async move {
        let drain = Drain::new(Duration::from_secs(1));
        let listener = tokio::net::TcpListener::bind(("::", 15001)).await?;
        tokio::spawn(
            OutboundListener::new(client, Arc::new(captured)).serve(listener, drain.watch()),
        );
        up_tx.send(())?;
        let _ = stopped.await;
        drain.drain().await;
        Ok(())
    });
    up.recv_timeout(Duration::from_secs(10))
        .context("outbound did not start")?;
    Ok(NodeProxy { stop, thread })
}

/// A tunnel from `client_pod` (on its node) to `server_pod:port` (on another node): outbound
/// listener on the client's node, inbound with reply routing on the server's.
pub struct Tunnel {
    pub src: SpiffeId,
    pub dst: SpiffeId,
    pub client: Arc<HboneClient>,
    pub inbound_stats: Arc<ProxyStats>,
    /// Where the client pod connects (its node's gateway address, port 15001).
    pub outbound_addr: SocketAddr,
    outbound: NodeProxy,
    inbound: NodeProxy,
}

impl Tunnel {
    /// Starts both sides (IPv4); the client pod's connections to [`Self::outbound_addr`] go to
    /// `server_pod:port`.
    pub fn start(client_pod: &PodHandle, server_pod: &PodHandle, port: u16) -> Result<Self> {
        Self::start_family(client_pod, server_pod, port, false)
    }

    /// [`Self::start`] with IPv6 pod and node addresses (the listeners are dual-stack either way).
    pub fn start_v6(client_pod: &PodHandle, server_pod: &PodHandle, port: u16) -> Result<Self> {
        Self::start_family(client_pod, server_pod, port, true)
    }

    fn start_family(
        client_pod: &PodHandle,
        server_pod: &PodHandle,
        port: u16,
        v6: bool,
    ) -> Result<Self> {
        let ip = |p: &PodHandle| -> IpAddr { if v6 { p.ipv6().into() } else { p.ipv4().into() } };
        let node_ip = |p: &PodHandle| -> IpAddr {
            if v6 {
                p.node_ipv6().into()
            } else {
                p.node_ipv4().into()
            }
        };
        let gateway = if v6 {
            IpAddr::from(client_pod.node().gateway_v6())
        } else {
            IpAddr::from(client_pod.node().gateway_v4())
        };
        let ca = TestCa::new("hbone test root")?;
        let src: SpiffeId = format!("spiffe://{TRUST_DOMAIN}/ns/a/sa/client").parse()?;
        let dst: SpiffeId = format!("spiffe://{TRUST_DOMAIN}/ns/b/sa/server").parse()?;
        let client_certs = StaticCertProvider::new(TRUST_DOMAIN, ca.roots()?);
        client_certs.insert(ca.issue(&src)?);
        let server_certs = StaticCertProvider::new(TRUST_DOMAIN, ca.roots()?);
        server_certs.insert(ca.issue(&dst)?);
        let inbound_stats = ProxyStats::new();
        let inbound = start_inbound(
            server_pod.node(),
            server_certs,
            inbound_stats.clone(),
            PodIdentities(ip(server_pod), dst.clone()),
        )?;
        let client = HboneClient::new(client_certs, ProxyStats::new(), ClientConfig::default());
        let redirect = Redirect {
            dst_pod: SocketAddr::new(ip(server_pod), port),
            service: None,
            dst_node: SocketAddr::new(node_ip(server_pod), mesh_agent::proxy::HBONE_PORT),
            dst_identity: dst.clone(),
            src_identity: src.clone(),
        };
        let outbound = start_outbound(
            client_pod.node(),
            client.clone(),
            CapturedFrom(ip(client_pod), redirect),
        )?;
        Ok(Self {
            src,
            dst,
            client,
            inbound_stats,
            outbound_addr: SocketAddr::new(gateway, mesh_agent::proxy::OUTBOUND_PORT),
            outbound,
            inbound,
        })
    }

    /// Drains both sides and removes the reply routing.
    pub fn finish(self) -> Result<()> {
        self.outbound.finish()?;
        self.inbound.finish()
    }
}

/// Frames seen on a node's fabric interface (`eth0`) while a capture runs.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<Vec<u8>>>>,
}

impl Capture {
    /// Starts an `AF_PACKET` capture of every frame on `eth0` in `netns`.
    pub fn start(netns: &Path) -> Result<Self> {
        let netns = netns.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<Vec<Vec<u8>>> {
            enter(&netns)?;
            let proto = u16::try_from(libc::ETH_P_ALL)?.to_be();
            // SAFETY: plain socket(2); the fd is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            ensure!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
            ensure!(ifindex > 0, "no eth0");
            // SAFETY: zeroed sockaddr_ll is valid; fields set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = u16::try_from(libc::AF_PACKET)?;
            sll.sll_protocol = proto;
            sll.sll_ifindex = i32::try_from(ifindex)?;
            // SAFETY: bind with a sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    u32::try_from(std::mem::size_of::<libc::sockaddr_ll>())?,
                )
            };
            ensure!(rc == 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            // SAFETY: SO_RCVTIMEO with a timeval.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    u32::try_from(std::mem::size_of::<libc::timeval>())?,
                );
            }
            ready_tx.send(())?;
            let mut frames = Vec::new();
            let mut buf = vec![0_u8; 65_536];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: recv into a buffer of the length given.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if let Ok(n) = usize::try_from(n) {
                    frames.push(buf[..n].to_vec());
                }
            }
            Ok(frames)
        });
        ready_rx.recv_timeout(Duration::from_secs(5))?;
        Ok(Self { stop, thread })
    }

    pub fn finish(self) -> Result<Vec<Vec<u8>>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("capture thread")
    }
}

/// Whether `needle` occurs in `hay`.
#[must_use]
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
