//! HBONE proxies: TCP carried as HTTP/2 `CONNECT` streams over mutual TLS between node agents
//! (outbound capture on 15001, the tunnel client and its pool, the inbound server on 15008).
//!
//! Wire format as Istio's ztunnel (`../shared/hbone.md`); where we differ, `ARCHITECTURE.md`
//! ("HBONE proxies") says so.

pub mod client;
pub mod connect;
pub mod inbound;
pub mod outbound;
pub mod splice;
pub mod stats;
pub mod testing;
pub mod tls;
pub mod transparent;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::identity::{CertProvider, SpiffeId};

pub use client::{ClientConfig, HboneClient, HboneStream};
pub use inbound::{InboundConfig, InboundServer};
pub use outbound::OutboundListener;
pub use stats::{ProxyStats, TunnelInfo};

/// Outbound capture port (ztunnel's).
pub const OUTBOUND_PORT: u16 = 15001;
/// HBONE port (ztunnel's).
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 stream window: ztunnel's 4 MiB.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 connection window: ztunnel's 16 MiB, larger than a stream's so one stream cannot starve
/// the others of the connection's window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// HTTP/2 maximum frame size: ztunnel's 1 MiB.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Read buffer in front of each tunnel's TLS: rustls asks the socket for about one record
/// (16 KiB) per read; with this buffer one `recvfrom` takes up to four records of a bulk stream
/// (measured: one read per record was the inbound's most frequent system call, BENCHMARKS.md).
/// Per tunnel, not per stream: a node has a few tunnels per peer node.
pub const TLS_READ_BUFFER: usize = 64 * 1024;
/// Streams per pooled connection before the pool opens another (ztunnel's
/// `POOL_MAX_STREAMS_PER_CONNECTION` default, 100).
pub const DEFAULT_MAX_STREAMS_PER_CONN: usize = 100;

/// Why the authorization hook refused a connection; logged and sent nowhere but the log (the
/// client sees a bare 401, as from ztunnel).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("denied: {reason}")]
pub struct Denied {
    pub reason: String,
}

/// The inbound side's authorization decision, asked once per `CONNECT` after mTLS. The policy
/// engine (issue 9's `AuthorizationPolicy`) implements it; `AllowAll` admits every mesh peer.
pub trait Authorizer: Send + Sync + 'static {
    /// May `source` (the verified client identity) reach `dst` (a pod on this node whose identity
    /// is `dst_id`)?
    fn authorize(
        &self,
        source: &SpiffeId,
        dst_id: &SpiffeId,
        dst: SocketAddr,
    ) -> Result<(), Denied>;

    /// Does the certificate fit the connection it came on? `node` is the calling node's
    /// address (the TLS peer), `claimed_src` the source pod the client named (`Forwarded`).
    /// The agent refuses an identity that runs on no pod of that node, and a claimed source
    /// pod that is not one of them (a stolen certificate used from elsewhere, or a node
    /// posing as another pod's address). Default: no check.
    fn check_peer(
        &self,
        _source: &SpiffeId,
        _node: std::net::IpAddr,
        _claimed_src: Option<std::net::IpAddr>,
    ) -> Result<(), Denied> {
        Ok(())
    }
}

/// Admits every peer that passed mTLS (Istio's behaviour with no `AuthorizationPolicy`).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn authorize(&self, _: &SpiffeId, _: &SpiffeId, _: SocketAddr) -> Result<(), Denied> {
        Ok(())
    }
}

impl<F> Authorizer for F
where
    F: Fn(&SpiffeId, &SpiffeId, SocketAddr) -> Result<(), Denied> + Send + Sync + 'static,
{
    fn authorize(
        &self,
        source: &SpiffeId,
        dst_id: &SpiffeId,
        dst: SocketAddr,
    ) -> Result<(), Denied> {
        self(source, dst_id, dst)
    }
}

/// One tunnelled stream as the telemetry sees it: which side reports, the two pods and their
/// proven identities.
#[derive(Debug, Clone)]
pub struct StreamEnds {
    /// `true` on the client's node (Istio's `reporter="source"`), `false` on the server's.
    pub outbound: bool,
    /// The client pod's address.
    pub src: std::net::IpAddr,
    /// The server pod's address and port.
    pub dst: SocketAddr,
    /// The service the client connected to, if it went through one.
    pub service: Option<SocketAddr>,
    pub src_id: SpiffeId,
    pub dst_id: SpiffeId,
}

/// Told when a tunnelled stream opens and when it ends, with its payload bytes each way (the
/// kernel does not see captured connections: their flows are the proxies' to report).
pub trait StreamObserver: Send + Sync + 'static {
    fn opened(&self, ends: &StreamEnds);
    fn closed(&self, ends: &StreamEnds, sent: u64, received: u64);
}

/// The agent's observer, set once at start (tests and benchmarks run the proxies without one).
static OBSERVER: std::sync::OnceLock<Arc<dyn StreamObserver>> = std::sync::OnceLock::new();

/// Installs the process's stream observer; `false` if one was installed already.
pub fn set_stream_observer(o: Arc<dyn StreamObserver>) -> bool {
    OBSERVER.set(o).is_ok()
}

/// Reports a stream's open now and its close (with the bytes in `bytes`) when dropped.
pub(crate) struct ObservedStream {
    ends: Option<StreamEnds>,
    pub(crate) bytes: splice::StreamBytes,
}

impl ObservedStream {
    pub(crate) fn open(ends: StreamEnds) -> Self {
        let ends = OBSERVER.get().map(|o| {
            o.opened(&ends);
            ends
        });
        Self {
            ends,
            bytes: splice::StreamBytes::default(),
        }
    }
}

impl Drop for ObservedStream {
    fn drop(&mut self) {
        if let (Some(o), Some(ends)) = (OBSERVER.get(), &self.ends) {
            use std::sync::atomic::Ordering::Relaxed;
            o.closed(
                ends,
                self.bytes.sent.load(Relaxed),
                self.bytes.received.load(Relaxed),
            );
        }
    }
}

/// The pods of this node the inbound side may connect to, with their identities: a `CONNECT` to
/// an address that is not one of them, or whose identity is not the one the client asked for in
/// its handshake, is refused (400) so a certificate for one workload never opens another.
pub trait LocalWorkloads: Send + Sync + 'static {
    fn identity_of(&self, pod: std::net::IpAddr) -> Option<SpiffeId>;
}

/// Any `Fn(pod ip) -> Option<SpiffeId>` (e.g. a closure over the model's snapshot).
impl<F> LocalWorkloads for F
where
    F: Fn(std::net::IpAddr) -> Option<SpiffeId> + Send + Sync + 'static,
{
    fn identity_of(&self, pod: std::net::IpAddr) -> Option<SpiffeId> {
        self(pod)
    }
}

/// What the kernel recorded for a captured connection: where the pod meant to go and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The pod address the application connected to (after service translation).
    pub dst_pod: SocketAddr,
    /// The service address it connected to, if any.
    pub service: Option<SocketAddr>,
    /// The agent of the node that runs it (its HBONE port).
    pub dst_node: SocketAddr,
    /// The identity the destination must prove.
    pub dst_identity: SpiffeId,
    /// The source pod's identity (its certificate is the client certificate).
    pub src_identity: SpiffeId,
}

/// The capture side's lookup: the kernel records the original destination keyed by the client's
/// (source address, source port) as the agent's accepted socket sees it. Kept to one call so the
/// kernel helper and tests can implement it without knowing the proxy.
pub trait OriginalDst: Send + Sync + 'static {
    /// `None` if nothing was recorded for `client` (the connection is closed, counted
    /// `no_original_dst`).
    fn lookup(&self, client: SocketAddr) -> Option<Redirect>;
}

/// Any `Fn(client) -> Option<Redirect>`: the agent's glue over the capture's `CAPTURED` table
/// (`datapath::OriginalDstTable::original_dst`: destination pod and identity numbers) and the
/// model (the pod's node, the numbers' SPIFFE ids) is one closure.
impl<F> OriginalDst for F
where
    F: Fn(SocketAddr) -> Option<Redirect> + Send + Sync + 'static,
{
    fn lookup(&self, client: SocketAddr) -> Option<Redirect> {
        self(client)
    }
}

/// Everything [`start`] needs; the agent's wiring fills it from the identity side (certificates),
/// the policy engine (authorization), the model (local workloads) and the capture (original
/// destinations).
pub struct ProxyParts {
    pub provider: Arc<dyn CertProvider>,
    pub authorizer: Arc<dyn Authorizer>,
    pub workloads: Arc<dyn LocalWorkloads>,
    pub stats: Arc<ProxyStats>,
    /// The outbound listeners and where each one's connections meant to go: the agent has one,
    /// usually `[::]:15001` with the capture's record; the benchmark stands one in per service.
    pub outbound: Vec<(SocketAddr, Arc<dyn OriginalDst>)>,
    /// Usually `0.0.0.0:15008` / `[::]:15008`.
    pub inbound_addr: SocketAddr,
    pub client: ClientConfig,
    pub inbound: InboundConfig,
    /// Worker threads, each a single-threaded runtime with its own `SO_REUSEPORT` copy of every
    /// listener and its own tunnel pool, so a connection and the tunnel carrying it run on one
    /// thread (Envoy's workers, nginx's worker processes). `0`: serve on the caller's runtime
    /// with one pool (tests).
    pub workers: usize,
}

/// Why the proxies did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {what} listener {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("installing the reply routing for transparent pod connections: {0}")]
    Routing(#[from] transparent::RoutingError),
}

/// The running proxies. Dropping it stops the worker threads (after the drain: streams still
/// open then are cut).
#[derive(Debug)]
pub struct Proxies {
    /// One tunnel client (pool) per worker.
    pub clients: Vec<Arc<HboneClient>>,
    routing: bool,
    /// Dropped with `Proxies`: each worker's runtime ends when its receiver sees that.
    _stop: Option<tokio::sync::watch::Sender<()>>,
}

impl Proxies {
    /// Removes the reply routing [`start`] installed; call it after the drain (earlier, replies
    /// to streams still open would be forwarded away instead of reaching their sockets).
    #[must_use = "says what was removed"]
    pub fn remove_routing(&self) -> Vec<String> {
        if self.routing {
            transparent::uninstall()
        } else {
            Vec::new()
        }
    }
}

/// Binds `addr` with `SO_REUSEPORT` (when `shared`), so each worker can hold its own listener
/// on the same port and the kernel spreads connections over them by their 4-tuple's hash.
fn bind(
    what: &'static str,
    addr: SocketAddr,
    shared: bool,
) -> Result<tokio::net::TcpListener, StartError> {
    let err = |source| StartError::Bind { what, addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    if shared {
        socket.set_reuseport(true).map_err(err)?;
    }
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// What one worker serves: its copy of each listener.
struct WorkerListeners {
    inbound: std::net::TcpListener,
    outbound: Vec<(std::net::TcpListener, Arc<dyn OriginalDst>)>,
}

/// Installs the reply routing (when `inbound.transparent`), binds 15001 and 15008 and serves
/// both until the drain starts. Must run in the node's network namespace (worker threads
/// inherit it: they are spawned from here). Call it on a Tokio runtime.
pub fn start(parts: ProxyParts, drain: &crate::drain::Drain) -> Result<Proxies, StartError> {
    let shared = parts.workers > 0;
    // Every listener of every worker is bound before anything starts, so a port in use fails
    // the start as a whole.
    let mut per_worker = Vec::new();
    for _ in 0..parts.workers.max(1) {
        let inbound = bind("HBONE inbound", parts.inbound_addr, shared)?;
        let mut outbound = Vec::new();
        for (addr, dst) in &parts.outbound {
            outbound.push((bind("outbound capture", *addr, shared)?, dst.clone()));
        }
        per_worker.push((inbound, outbound));
    }
    let inbound = InboundServer::new(
        parts.provider.clone(),
        parts.authorizer,
        parts.workloads,
        parts.stats.clone(),
        parts.inbound.clone(),
    )?;
    // Last, so a port in use or a bad TLS setup leaves no routing behind.
    let routing = parts.inbound.transparent;
    if routing {
        transparent::install()?;
    }
    let new_client = || {
        HboneClient::new(
            parts.provider.clone(),
            parts.stats.clone(),
            parts.client.clone(),
        )
    };
    if !shared {
        let client = new_client();
        for (l_in, outbound) in per_worker {
            tokio::spawn(inbound.clone().serve(l_in, drain.watch()));
            for (l, dst) in outbound {
                tokio::spawn(OutboundListener::new(client.clone(), dst).serve(l, drain.watch()));
            }
        }
        return Ok(Proxies {
            clients: vec![client],
            routing,
            _stop: None,
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let mut clients = Vec::new();
    for (i, (l_in, outbound)) in per_worker.into_iter().enumerate() {
        let std_listener = |l: tokio::net::TcpListener| {
            let addr = l.local_addr().unwrap_or(parts.inbound_addr);
            l.into_std().map_err(|source| StartError::Bind {
                what: "worker listener",
                addr,
                source,
            })
        };
        let listeners = WorkerListeners {
            inbound: std_listener(l_in)?,
            outbound: outbound
                .into_iter()
                .map(|(l, dst)| Ok((std_listener(l)?, dst)))
                .collect::<Result<_, StartError>>()?,
        };
        let client = new_client();
        clients.push(client.clone());
        let inbound = inbound.clone();
        let drain = drain.watch();
        let mut stop = stop_rx.clone();
        std::thread::Builder::new()
            .name(format!("hbone-{i}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(worker = i, error = %e, "HBONE worker runtime failed");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let served = serve_worker(listeners, &inbound, &client, &drain);
                    // The accept loops hold clones; this one must not outlive them, or the drain
                    // would wait for it.
                    drop(drain);
                    if let Err(e) = served {
                        tracing::error!(worker = i, error = %e, "HBONE worker cannot listen");
                        return;
                    }
                    // Until `Proxies` is dropped (after the drain): streams keep running here.
                    let _ = stop.changed().await;
                });
            })
            .map_err(|source| StartError::Bind {
                what: "worker thread",
                addr: parts.inbound_addr,
                source,
            })?;
    }
    Ok(Proxies {
        clients,
        routing,
        _stop: Some(stop_tx),
    })
}

/// One worker's accept loops, on the worker's own runtime.
fn serve_worker(
    listeners: WorkerListeners,
    inbound: &Arc<InboundServer>,
    client: &Arc<HboneClient>,
    drain: &crate::drain::DrainWatch,
) -> std::io::Result<()> {
    let l_in = tokio::net::TcpListener::from_std(listeners.inbound)?;
    tokio::spawn(inbound.clone().serve(l_in, drain.clone()));
    for (l, dst) in listeners.outbound {
        let l = tokio::net::TcpListener::from_std(l)?;
        tokio::spawn(OutboundListener::new(client.clone(), dst).serve(l, drain.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
