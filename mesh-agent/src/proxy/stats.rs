//! Counters of the proxies (every refusal has one) and the live tunnel table `meshctl tunnels`
//! shows.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::identity::SpiffeId;

macro_rules! counters {
    ($($name:ident: $doc:literal,)*) => {
        /// Proxy counters; each refusal reason has its own.
        #[derive(Debug, Default)]
        pub struct Counters { $(#[doc = $doc] pub $name: AtomicU64,)* }

        impl Counters {
            /// Every counter by name, in declaration order.
            #[must_use]
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    inbound_connections: "TCP connections accepted on 15008",
    inbound_tls_failed: "handshakes that failed: plaintext, unknown CA, expired, wrong trust domain, no workload",
    inbound_not_h2: "handshakes that did not agree on ALPN h2",
    inbound_streams: "CONNECT streams admitted and connected to the pod",
    inbound_bad_request: "400: malformed CONNECT",
    inbound_wrong_workload: "400: authority is not a pod on this node with the identity the client asked for",
    inbound_denied: "401: the authorization hook refused",
    inbound_wrong_node: "401: the client identity runs on no pod of the calling node, or the claimed source pod is not it",
    inbound_unreachable: "503: the pod refused or did not answer",
    outbound_connections: "captured connections accepted on 15001",
    outbound_no_original_dst: "captured connections with no recorded destination (closed)",
    outbound_streams: "tunnel streams opened",
    outbound_tls_failed: "tunnel handshakes that failed (server identity, CA, our certificate missing)",
    outbound_refused: "CONNECT answered with something other than 200",
    outbound_connect_failed: "the destination node could not be reached",
    stream_resets: "streams ended by a reset either way",
}

/// Which way a tunnel connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

/// One pooled (outbound) or accepted (inbound) HBONE connection.
#[derive(Debug)]
pub struct TunnelStats {
    pub direction: Direction,
    pub peer: SocketAddr,
    /// Outbound: our source workload; inbound: the verified client identity.
    pub source: SpiffeId,
    /// The server identity (outbound: expected and verified; inbound: the one we presented).
    pub destination: SpiffeId,
    pub opened: Instant,
    pub streams_open: AtomicU64,
    pub streams_total: AtomicU64,
    /// Bytes from the local pod into the tunnel (outbound) / from the tunnel to the pod (inbound).
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// A snapshot row of [`TunnelStats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelInfo {
    pub direction: Direction,
    pub peer: SocketAddr,
    pub source: SpiffeId,
    pub destination: SpiffeId,
    pub age: Duration,
    pub streams_open: u64,
    pub streams_total: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Shared by the proxies of one agent.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub counters: Counters,
    tunnels: Mutex<Vec<Weak<TunnelStats>>>,
}

impl ProxyStats {
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a connection; it leaves the table when its last holder drops it.
    pub fn tunnel(
        &self,
        direction: Direction,
        peer: SocketAddr,
        source: SpiffeId,
        destination: SpiffeId,
    ) -> Arc<TunnelStats> {
        let t = Arc::new(TunnelStats {
            direction,
            peer,
            source,
            destination,
            opened: Instant::now(),
            streams_open: AtomicU64::new(0),
            streams_total: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        });
        let mut list = self.tunnels.lock().unwrap_or_else(PoisonError::into_inner);
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(&t));
        t
    }

    /// The live connections.
    #[must_use]
    pub fn tunnels(&self) -> Vec<TunnelInfo> {
        let list = self.tunnels.lock().unwrap_or_else(PoisonError::into_inner);
        list.iter()
            .filter_map(Weak::upgrade)
            .map(|t| TunnelInfo {
                direction: t.direction,
                peer: t.peer,
                source: t.source.clone(),
                destination: t.destination.clone(),
                age: t.opened.elapsed(),
                streams_open: t.streams_open.load(Ordering::Relaxed),
                streams_total: t.streams_total.load(Ordering::Relaxed),
                bytes_sent: t.bytes_sent.load(Ordering::Relaxed),
                bytes_received: t.bytes_received.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Holds one open stream on a tunnel: counted open while it lives.
#[derive(Debug)]
pub struct StreamGuard(pub Arc<TunnelStats>);

impl StreamGuard {
    #[must_use]
    pub fn new(t: Arc<TunnelStats>) -> Self {
        t.streams_open.fetch_add(1, Ordering::Relaxed);
        t.streams_total.fetch_add(1, Ordering::Relaxed);
        Self(t)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams_open.fetch_sub(1, Ordering::Relaxed);
    }
}
