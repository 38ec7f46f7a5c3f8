//! The outbound listener (15001): accepts connections the kernel redirected, asks [`OriginalDst`]
//! where each meant to go and who sent it, and carries it through an HBONE tunnel. Fail closed:
//! a connection that cannot be tunnelled is reset, never sent in plaintext.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument as _, debug, info_span, warn};

use super::OriginalDst;
use super::client::HboneClient;
use super::connect::SourceInfo;
use super::stats::bump;
use crate::drain::DrainWatch;

/// The outbound capture side.
pub struct OutboundListener {
    client: Arc<HboneClient>,
    original_dst: Arc<dyn OriginalDst>,
}

impl std::fmt::Debug for OutboundListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundListener").finish_non_exhaustive()
    }
}

impl OutboundListener {
    #[must_use]
    pub fn new(client: Arc<HboneClient>, original_dst: Arc<dyn OriginalDst>) -> Arc<Self> {
        Arc::new(Self {
            client,
            original_dst,
        })
    }

    /// Accepts until the drain starts; tunnels in flight hold a drain watch until they end.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut drain: DrainWatch) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = drain.signaled() => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    bump(&self.client.stats().counters.outbound_connections);
                    let this = self.clone();
                    let watch = drain.clone();
                    tokio::spawn(
                        async move {
                            this.handle(tcp, peer).await;
                            drop(watch);
                        }
                        .instrument(info_span!("hbone_out", %peer)),
                    );
                }
                Err(e) => {
                    warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        debug!("outbound listener stopped accepting (drain)");
    }

    async fn handle(&self, tcp: TcpStream, peer: SocketAddr) {
        // A dual-stack listener shows IPv4 clients as `::ffff:a.b.c.d`; the capture recorded,
        // and the pod has, the IPv4 address.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let counters = &self.client.stats().counters;
        let Some(redirect) = self.original_dst.lookup(peer) else {
            bump(&counters.outbound_no_original_dst);
            warn!("captured connection with no recorded destination: reset");
            let _ = tcp.set_zero_linger();
            return;
        };
        let info = SourceInfo {
            addr: Some(peer),
            ..SourceInfo::default()
        };
        let stream = match self
            .client
            .connect(
                &redirect.src_identity,
                redirect.dst_pod,
                redirect.dst_node,
                &redirect.dst_identity,
                &info,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                warn!(source = %redirect.src_identity, dst = %redirect.dst_pod, node = %redirect.dst_node, error = %e,
                    "tunnel refused: resetting the captured connection (fail closed)");
                let _ = tcp.set_zero_linger();
                return;
            }
        };
        let observed = super::ObservedStream::open(super::StreamEnds {
            outbound: true,
            src: peer.ip(),
            dst: redirect.dst_pod,
            service: redirect.service,
            src_id: redirect.src_identity.clone(),
            dst_id: redirect.dst_identity.clone(),
        });
        if let Err(e) = stream.splice(tcp, &observed.bytes).await {
            if e.is_reset() {
                bump(&counters.stream_resets);
            }
            debug!(dst = %redirect.dst_pod, error = %e, "tunnelled connection ended with an error");
        }
    }
}
