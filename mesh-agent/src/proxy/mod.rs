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
    pub original_dst: Arc<dyn OriginalDst>,
    pub stats: Arc<ProxyStats>,
    /// Usually `0.0.0.0:15001` / `[::]:15001`.
    pub outbound_addr: SocketAddr,
    /// Usually `0.0.0.0:15008` / `[::]:15008`.
    pub inbound_addr: SocketAddr,
    pub client: ClientConfig,
    pub inbound: InboundConfig,
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

/// The running proxies.
#[derive(Debug)]
pub struct Proxies {
    pub client: Arc<HboneClient>,
    routing: bool,
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

/// Installs the reply routing (when `inbound.transparent`), binds 15001 and 15008 and serves
/// both until the drain starts. Must run in the node's network namespace.
pub async fn start(parts: ProxyParts, drain: &crate::drain::Drain) -> Result<Proxies, StartError> {
    let bind = |what, addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let inbound_listener = bind("HBONE inbound", parts.inbound_addr).await?;
    let outbound_listener = bind("outbound capture", parts.outbound_addr).await?;
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
    let client = HboneClient::new(parts.provider, parts.stats, parts.client);
    tokio::spawn(inbound.serve(inbound_listener, drain.watch()));
    tokio::spawn(
        OutboundListener::new(client.clone(), parts.original_dst)
            .serve(outbound_listener, drain.watch()),
    );
    Ok(Proxies { client, routing })
}

#[cfg(test)]
mod tests;
