//! The inbound HBONE server (15008): mTLS with the destination workload's certificate, then per
//! `CONNECT`: parse (400), check the pod is ours and has the identity the client asked for (400),
//! authorize (401), connect to the pod with the caller's address (503), answer 200 and splice.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::connect::parse_request;
use super::splice::splice;
use super::stats::{Direction, ProxyStats, StreamGuard, TunnelStats, bump};
use super::tls::{ALPN_H2, TlsError, id_from_sni, server_config, spiffe_id_of};
use super::{Authorizer, CONNECTION_WINDOW, LocalWorkloads, MAX_FRAME, STREAM_WINDOW, transparent};
use crate::drain::DrainWatch;
use crate::identity::{CertProvider, SpiffeId};

/// Largest header block of one request we accept (h2 answers 431 above it).
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// Inbound settings.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// Connect to pods from the caller's address (needs `transparent::install` on the node and
    /// `CAP_NET_ADMIN`); off, pods see the node's address.
    pub transparent: bool,
    /// TLS handshake deadline: a peer that stalls is dropped.
    pub handshake_timeout: Duration,
    /// Deadline to connect to the pod before answering 503.
    pub pod_connect_timeout: Duration,
    /// Concurrent streams one client connection may open (HTTP/2 SETTINGS).
    pub max_concurrent_streams: u32,
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            transparent: true,
            handshake_timeout: Duration::from_secs(10),
            pod_connect_timeout: Duration::from_secs(5),
            max_concurrent_streams: 1_000,
        }
    }
}

/// The inbound side of HBONE.
pub struct InboundServer {
    acceptor: TlsAcceptor,
    authorizer: Arc<dyn Authorizer>,
    workloads: Arc<dyn LocalWorkloads>,
    stats: Arc<ProxyStats>,
    config: InboundConfig,
}

impl std::fmt::Debug for InboundServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundServer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl InboundServer {
    pub fn new(
        provider: Arc<dyn CertProvider>,
        authorizer: Arc<dyn Authorizer>,
        workloads: Arc<dyn LocalWorkloads>,
        stats: Arc<ProxyStats>,
        config: InboundConfig,
    ) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            acceptor: TlsAcceptor::from(Arc::new(server_config(provider)?)),
            authorizer,
            workloads,
            stats,
            config,
        }))
    }

    /// Accepts until the drain starts; each connection holds a drain watch until its streams end
    /// (on drain, HTTP/2 GOAWAY tells the client to open new streams elsewhere).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut drain: DrainWatch) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = drain.signaled() => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    bump(&self.stats.counters.inbound_connections);
                    let this = self.clone();
                    let watch = drain.clone();
                    tokio::spawn(
                        this.connection(tcp, peer, watch)
                            .instrument(info_span!("hbone_in", %peer)),
                    );
                }
                Err(e) => {
                    warn!(error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        debug!("HBONE inbound stopped accepting (drain)");
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, mut drain: DrainWatch) {
        let _ = tcp.set_nodelay(true);
        let tcp = tokio::io::BufReader::with_capacity(super::TLS_READ_BUFFER, tcp);
        let tls =
            match tokio::time::timeout(self.config.handshake_timeout, self.acceptor.accept(tcp))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    bump(&self.stats.counters.inbound_tls_failed);
                    warn!(error = %e, "HBONE handshake refused");
                    return;
                }
                Err(_) => {
                    bump(&self.stats.counters.inbound_tls_failed);
                    warn!("HBONE handshake timed out");
                    return;
                }
            };
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(ALPN_H2) {
            bump(&self.stats.counters.inbound_not_h2);
            warn!("HBONE peer did not negotiate ALPN h2");
            return;
        }
        // Both were checked during the handshake (verifier, resolver); read them back.
        let ids = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(spiffe_id_of)
            .zip(session.server_name().map(id_from_sni));
        let Some((Ok(source), Ok(local))) = ids else {
            bump(&self.stats.counters.inbound_tls_failed);
            warn!("HBONE session without a peer identity or SNI");
            return;
        };
        let tunnel = self
            .stats
            .tunnel(Direction::Inbound, peer, source.clone(), local.clone());
        let handshake = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(STREAM_WINDOW as usize)
            .max_concurrent_streams(self.config.max_concurrent_streams)
            // A CONNECT carries a few short headers; this bounds what a peer can make us hold.
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(tls);
        let mut conn = match tokio::time::timeout(self.config.handshake_timeout, handshake).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(%source, error = %e, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                warn!(%source, "HTTP/2 handshake timed out");
                return;
            }
        };
        let mut draining = false;
        loop {
            let next = tokio::select! {
                n = conn.accept() => n,
                () = drain.signaled(), if !draining => {
                    draining = true;
                    conn.graceful_shutdown();
                    continue;
                }
            };
            match next {
                Some(Ok((req, respond))) => {
                    let this = self.clone();
                    let ctx = Stream {
                        source: source.clone(),
                        local: local.clone(),
                        peer,
                        tunnel: tunnel.clone(),
                    };
                    let watch = drain.clone();
                    tokio::spawn(async move {
                        this.stream(ctx, req, respond).await;
                        drop(watch);
                    });
                }
                Some(Err(e)) => {
                    debug!(%source, error = %e, "HBONE connection error");
                    break;
                }
                None => break,
            }
        }
    }

    async fn stream(
        &self,
        ctx: Stream,
        req: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let counters = &self.stats.counters;
        let reply = |respond: &mut SendResponse<Bytes>, status: StatusCode| {
            let mut resp = Response::new(());
            *resp.status_mut() = status;
            let _ = respond.send_response(resp, true);
        };
        let parsed = match parse_request(&req) {
            Ok(p) => p,
            Err(e) => {
                bump(&counters.inbound_bad_request);
                warn!(source = %ctx.source, error = %e, "HBONE CONNECT refused: 400");
                reply(&mut respond, StatusCode::BAD_REQUEST);
                return;
            }
        };
        let dst = SocketAddr::new(
            parsed.authority.ip().to_canonical(),
            parsed.authority.port(),
        );
        match self.workloads.identity_of(dst.ip()) {
            Some(id) if id == ctx.local => {}
            other => {
                bump(&counters.inbound_wrong_workload);
                warn!(source = %ctx.source, %dst, asked = %ctx.local, found = ?other.map(|i| i.to_string()),
                    "HBONE CONNECT refused: 400 (not a pod of this node with the identity the client asked for)");
                reply(&mut respond, StatusCode::BAD_REQUEST);
                return;
            }
        }
        if let Err(denied) = self.authorizer.check_peer(
            &ctx.source,
            ctx.peer.ip().to_canonical(),
            parsed.forwarded_for.map(|a| a.ip().to_canonical()),
        ) {
            bump(&counters.inbound_wrong_node);
            warn!(source = %ctx.source, peer = %ctx.peer, reason = %denied.reason,
                "HBONE CONNECT refused: 401 (client identity does not fit the calling node)");
            reply(&mut respond, StatusCode::UNAUTHORIZED);
            return;
        }
        if let Err(denied) = self.authorizer.authorize(&ctx.source, &ctx.local, dst) {
            bump(&counters.inbound_denied);
            warn!(source = %ctx.source, destination = %ctx.local, %dst, reason = %denied.reason,
                "HBONE CONNECT denied by authorization policy: 401");
            reply(&mut respond, StatusCode::UNAUTHORIZED);
            return;
        }
        // The caller's pod address, as ztunnel takes it: `forwarded: for=` from an authenticated
        // peer, else the peer's own address.
        let src_ip = parsed
            .forwarded_for
            .map_or(ctx.peer.ip(), |a| a.ip())
            .to_canonical();
        let src = self.config.transparent.then_some(src_ip);
        let pod = match tokio::time::timeout(
            self.config.pod_connect_timeout,
            transparent::connect(src, dst),
        )
        .await
        {
            Ok(Ok(pod)) => pod,
            Ok(Err(e)) => {
                bump(&counters.inbound_unreachable);
                warn!(source = %ctx.source, %dst, error = %e, "HBONE CONNECT: pod unreachable: 503");
                reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                return;
            }
            Err(_) => {
                bump(&counters.inbound_unreachable);
                warn!(source = %ctx.source, %dst, "HBONE CONNECT: pod connect timed out: 503");
                reply(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                return;
            }
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "client gone before 200");
                return;
            }
        };
        bump(&counters.inbound_streams);
        info!(source = %ctx.source, destination = %ctx.local, %dst, from = %src_ip, "HBONE stream admitted");
        let guard = StreamGuard::new(ctx.tunnel.clone());
        // Bytes from the pod go into the tunnel: the server's "sent".
        let observed = super::ObservedStream::open(super::StreamEnds {
            outbound: false,
            src: src_ip,
            dst,
            service: None,
            src_id: ctx.source.clone(),
            dst_id: ctx.local.clone(),
        });
        if let Err(e) = splice(pod, send, req.into_body(), &ctx.tunnel, &observed.bytes).await {
            if e.is_reset() {
                bump(&counters.stream_resets);
            }
            debug!(source = %ctx.source, %dst, error = %e, "HBONE stream ended with an error");
        }
        drop(guard);
    }
}

struct Stream {
    source: SpiffeId,
    local: SpiffeId,
    peer: SocketAddr,
    tunnel: Arc<TunnelStats>,
}
