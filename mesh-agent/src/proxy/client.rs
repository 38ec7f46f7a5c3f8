//! The HBONE client: pooled mTLS HTTP/2 connections to other nodes' agents, one `CONNECT` stream
//! per tunnelled TCP connection.
//!
//! Pool key = (source identity, destination node, destination identity). ztunnel keys its pool by
//! (source identity, destination, destination identity) too; the destination identity is part of
//! it here because the server picks its certificate from our SNI, so a connection only carries
//! streams to pods of that one identity (see `tls`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::StatusCode;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::connect::{SourceInfo, build_request};
use super::splice::{SpliceError, StreamBytes, splice};
use super::stats::{Direction, ProxyStats, StreamGuard, TunnelStats, bump};
use super::tls::{ALPN_H2, TlsError, client_config, sni_for};
use super::{CONNECTION_WINDOW, DEFAULT_MAX_STREAMS_PER_CONN, MAX_FRAME, STREAM_WINDOW};
use crate::identity::{CertProvider, SpiffeId};

/// Client settings; defaults as ztunnel's where it has one.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Streams one pooled connection carries before another is opened.
    pub max_streams_per_conn: usize,
    /// TCP connect plus TLS and HTTP/2 handshakes to a node.
    pub connect_timeout: Duration,
    /// From sending `CONNECT` to its response (the inbound side connects to the pod meanwhile).
    pub response_timeout: Duration,
    /// A pooled connection with no stream for this long is released (ztunnel releases unused
    /// pooled connections after a timeout too, `POOL_UNUSED_RELEASE_TIMEOUT`).
    pub idle_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            max_streams_per_conn: DEFAULT_MAX_STREAMS_PER_CONN,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_mins(5),
        }
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("connecting to node {node}: {source}")]
    Dial {
        node: SocketAddr,
        source: std::io::Error,
    },
    #[error("mTLS handshake with node {node}: {source}")]
    Handshake {
        node: SocketAddr,
        source: std::io::Error,
    },
    #[error("node {0} did not negotiate ALPN h2")]
    NotH2(SocketAddr),
    #[error("HTTP/2 with node {node}: {source}")]
    H2 { node: SocketAddr, source: h2::Error },
    #[error("node {node} answered CONNECT {dst} with {status}")]
    Refused {
        node: SocketAddr,
        dst: SocketAddr,
        status: StatusCode,
    },
    #[error("node {0} timed out")]
    Timeout(SocketAddr),
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    node: SocketAddr,
    destination: SpiffeId,
}

/// One pooled connection.
struct Conn {
    send: h2::client::SendRequest<Bytes>,
    tunnel: Arc<TunnelStats>,
    /// Streams open or being opened on it (checked against the cap).
    reserved: AtomicUsize,
    /// Set by its driver task when the connection ended, or by the idle reaper; it is then never
    /// picked again, and leaves the pool at the next pick.
    closed: Arc<AtomicBool>,
    /// When its last stream ended.
    last_used: Mutex<Instant>,
}

#[derive(Default)]
struct PoolEntry {
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Serializes dialling so that a burst of streams shares one new connection.
    dial: tokio::sync::Mutex<()>,
}

/// A slot on a pooled connection, given back on drop.
struct Reservation(Arc<Conn>);

impl Drop for Reservation {
    fn drop(&mut self) {
        *self
            .0
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Marks `conn` closed once it has had no stream for `idle`; dropping it from the pool drops its
/// `SendRequest`, and h2 then closes the connection (GOAWAY).
async fn reap_when_idle(conn: Weak<Conn>, idle: Duration) {
    let tick = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(tick).await;
        let Some(c) = conn.upgrade() else { return };
        if c.closed.load(Ordering::Acquire) {
            return;
        }
        let since = c
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        // One step takes `reserved` from 0 to a value no pick accepts, so a stream that took the
        // connection meanwhile makes the exchange fail and the connection stays.
        if since >= idle
            && c.reserved
                .compare_exchange(0, usize::MAX / 2, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            c.closed.store(true, Ordering::Release);
            debug!(peer = %c.tunnel.peer, "idle pooled HBONE connection released");
            return;
        }
    }
}

/// An open tunnel stream (the `CONNECT` was answered 200).
pub struct HboneStream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    guard: StreamGuard,
    _slot: Reservation,
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("peer", &self.guard.0.peer)
            .finish_non_exhaustive()
    }
}

impl HboneStream {
    /// Carries `tcp` over the stream until both directions end.
    pub async fn splice(self, tcp: TcpStream, bytes: &StreamBytes) -> Result<(), SpliceError> {
        let tunnel = self.guard.0.clone();
        let result = splice(tcp, self.send, self.recv, &tunnel, bytes).await;
        drop(self.guard);
        result
    }
}

/// The outbound side of HBONE. Cheap to share (`Arc`); connections live in its pool.
pub struct HboneClient {
    provider: Arc<dyn CertProvider>,
    stats: Arc<ProxyStats>,
    config: ClientConfig,
    pool: Mutex<HashMap<PoolKey, Arc<PoolEntry>>>,
}

impl std::fmt::Debug for HboneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl HboneClient {
    #[must_use]
    pub fn new(
        provider: Arc<dyn CertProvider>,
        stats: Arc<ProxyStats>,
        config: ClientConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            provider,
            stats,
            config,
            pool: Mutex::new(HashMap::new()),
        })
    }

    /// Open pooled connections (tunnels) of this client.
    #[must_use]
    pub fn connections(&self) -> usize {
        let pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        pool.values()
            .map(|e| {
                let conns = e.conns.lock().unwrap_or_else(PoisonError::into_inner);
                conns
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Acquire))
                    .count()
            })
            .sum()
    }

    /// The counters and tunnel table this client reports to.
    #[must_use]
    pub fn stats(&self) -> &Arc<ProxyStats> {
        &self.stats
    }

    /// Opens a tunnel from workload `source` to pod `dst_pod` behind the agent at `dst_node`
    /// (its HBONE port), whose certificate must name `expected_peer`.
    pub async fn connect(
        &self,
        source: &SpiffeId,
        dst_pod: SocketAddr,
        dst_node: SocketAddr,
        expected_peer: &SpiffeId,
        info: &SourceInfo,
    ) -> Result<HboneStream, ConnectError> {
        let key = PoolKey {
            source: source.clone(),
            node: dst_node,
            destination: expected_peer.clone(),
        };
        let h2_err = |source| ConnectError::H2 {
            node: dst_node,
            source,
        };
        let mut retried = false;
        let (slot, response, send) = loop {
            let (slot, fresh) = self.checkout(&key).await?;
            let conn = slot.0.clone();
            let req = build_request(dst_pod, source, info)?;
            let open = async {
                let mut sender = conn.send.clone().ready().await.map_err(h2_err)?;
                let (response, send) = sender.send_request(req, false).map_err(h2_err)?;
                let response = response.await.map_err(h2_err)?;
                Ok::<_, ConnectError>((response, send))
            };
            match tokio::time::timeout(self.config.response_timeout, open).await {
                Ok(Ok((response, send))) => break (slot, response, send),
                // A pooled connection the server is closing (GOAWAY on drain) or that died under
                // us: take it out of the pool and try once more on another, as a client of any
                // HTTP/2 pool does. A freshly dialled one is not retried: its error is the answer.
                Ok(Err(ConnectError::H2 { source: e, .. })) if !fresh && !retried => {
                    debug!(node = %dst_node, error = %e, "pooled HBONE connection unusable; retrying on another");
                    conn.closed.store(true, Ordering::Release);
                    retried = true;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(ConnectError::Timeout(dst_node)),
            }
        };
        let conn = slot.0.clone();
        if response.status() != StatusCode::OK {
            bump(&self.stats.counters.outbound_refused);
            return Err(ConnectError::Refused {
                node: dst_node,
                dst: dst_pod,
                status: response.status(),
            });
        }
        bump(&self.stats.counters.outbound_streams);
        Ok(HboneStream {
            send,
            recv: response.into_body(),
            guard: StreamGuard::new(conn.tunnel.clone()),
            _slot: slot,
        })
    }

    fn entry(&self, key: &PoolKey) -> Arc<PoolEntry> {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        pool.retain(|_, e| {
            let conns = e.conns.lock().unwrap_or_else(PoisonError::into_inner);
            !conns.is_empty() || Arc::strong_count(e) > 1
        });
        pool.entry(key.clone()).or_default().clone()
    }

    fn pick(&self, entry: &PoolEntry) -> Option<Reservation> {
        let mut conns = entry.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        let max = self.config.max_streams_per_conn.max(1);
        conns.iter().find_map(|c| {
            c.reserved
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .ok()
                .map(|_| Reservation(c.clone()))
        })
    }

    /// A slot on a pooled connection, and whether that connection was dialled for it.
    async fn checkout(&self, key: &PoolKey) -> Result<(Reservation, bool), ConnectError> {
        let entry = self.entry(key);
        if let Some(slot) = self.pick(&entry) {
            return Ok((slot, false));
        }
        let _dialling = entry.dial.lock().await;
        if let Some(slot) = self.pick(&entry) {
            return Ok((slot, false));
        }
        let conn = tokio::time::timeout(self.config.connect_timeout, self.dial(key))
            .await
            .map_err(|_| {
                bump(&self.stats.counters.outbound_connect_failed);
                ConnectError::Timeout(key.node)
            })??;
        conn.reserved.store(1, Ordering::Release);
        let conn = Arc::new(conn);
        tokio::spawn(reap_when_idle(
            Arc::downgrade(&conn),
            self.config.idle_timeout,
        ));
        entry
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn.clone());
        Ok((Reservation(conn), true))
    }

    async fn dial(&self, key: &PoolKey) -> Result<Conn, ConnectError> {
        let node = key.node;
        let tls = match client_config(&*self.provider, &key.source, &key.destination) {
            Ok(c) => c,
            Err(e) => {
                bump(&self.stats.counters.outbound_tls_failed);
                return Err(e.into());
            }
        };
        let sni = sni_for(&key.destination)?;
        let tcp = TcpStream::connect(node).await.map_err(|source| {
            bump(&self.stats.counters.outbound_connect_failed);
            ConnectError::Dial { node, source }
        })?;
        let _ = tcp.set_nodelay(true);
        let tcp = tokio::io::BufReader::with_capacity(super::TLS_READ_BUFFER, tcp);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(sni, tcp)
            .await
            .map_err(|source| {
                bump(&self.stats.counters.outbound_tls_failed);
                warn!(%node, source = %key.source, expected = %key.destination, error = %source, "HBONE handshake failed");
                ConnectError::Handshake { node, source }
            })?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            bump(&self.stats.counters.outbound_tls_failed);
            return Err(ConnectError::NotH2(node));
        }
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(STREAM_WINDOW as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| ConnectError::H2 { node, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        let tunnel = self.stats.tunnel(
            Direction::Outbound,
            node,
            key.source.clone(),
            key.destination.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%node, error = %e, "pooled HBONE connection ended");
            }
            done.store(true, Ordering::Release);
        });
        Ok(Conn {
            send,
            tunnel,
            reserved: AtomicUsize::new(0),
            closed,
            last_used: Mutex::new(Instant::now()),
        })
    }
}
