//! Copies one TCP connection to and from one HBONE stream with backpressure both ways: at most
//! one read buffer (64 KiB) waits for HTTP/2 send window, and received DATA is acknowledged
//! (window released) only after the pod's socket took it, so a slow reader stalls the sender
//! instead of filling our memory. `END_STREAM` ↔ TCP FIN (half-close), `RST_STREAM` ↔ TCP RST.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures::FutureExt as _;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::stats::TunnelStats;

/// One read from the local socket.
const CHUNK: usize = 64 * 1024;

/// How a spliced stream ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("local socket read: {0}")]
    LocalRead(std::io::Error),
    #[error("local socket write: {0}")]
    LocalWrite(std::io::Error),
    #[error("tunnel stream: {0}")]
    Tunnel(#[from] h2::Error),
    #[error("tunnel stream closed while sending")]
    TunnelClosed,
}

impl SpliceError {
    /// Whether the end was a reset (either side) rather than an orderly close.
    #[must_use]
    pub fn is_reset(&self) -> bool {
        match self {
            Self::Tunnel(e) => e.is_reset() || e.reason().is_some(),
            Self::LocalRead(e) | Self::LocalWrite(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            Self::TunnelClosed => true,
        }
    }
}

/// Payload bytes one stream carried each way (the tunnel's totals count them too).
#[derive(Debug, Default)]
pub struct StreamBytes {
    /// From the local socket into the tunnel.
    pub sent: AtomicU64,
    /// From the tunnel to the local socket.
    pub received: AtomicU64,
}

async fn tcp_to_tunnel(
    mut rd: OwnedReadHalf,
    mut send: SendStream<Bytes>,
    bytes: &AtomicU64,
    stream: &AtomicU64,
) -> Result<(), SpliceError> {
    let mut buf = BytesMut::new();
    loop {
        // No chunk is held while the socket is idle: the buffer is taken once data is there,
        // and what a read left unused is given back before the next wait (10,000 idle
        // tunnelled connections would otherwise each keep a chunk's pages).
        if buf.is_empty() {
            buf = BytesMut::new();
        }
        let ready = rd.readable().await;
        // Read through `AsyncRead` rather than `try_read_buf`: a read that leaves part of the
        // buffer empty has drained the socket, and tokio then clears the readiness itself (edge-
        // triggered epoll), so the next wait parks at once. `try_read_buf` keeps the readiness
        // until a read fails with `EAGAIN`: one more `recvfrom` per request, measured at 1,000
        // req/s (BENCHMARKS.md, session 20). Polled once: if the socket is not readable after
        // all, the read is given up (its buffer freed at the top) and the wait starts over.
        let n = match ready.and_then(|()| {
            buf.reserve(CHUNK);
            rd.read_buf(&mut buf)
                .now_or_never()
                .unwrap_or_else(|| Err(std::io::ErrorKind::WouldBlock.into()))
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // The pod's side was reset or failed: abort the stream too.
                send.send_reset(Reason::CANCEL);
                return Err(SpliceError::LocalRead(e));
            }
        };
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(cap)) => cap,
                Some(Err(e)) => {
                    let _ = rd.as_ref().set_zero_linger();
                    return Err(e.into());
                }
                None => {
                    let _ = rd.as_ref().set_zero_linger();
                    return Err(SpliceError::TunnelClosed);
                }
            };
            if cap == 0 {
                continue;
            }
            let part = chunk.split_to(cap.min(chunk.len()));
            send.send_data(part, false)?;
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        stream.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn tunnel_to_tcp(
    mut recv: RecvStream,
    mut wr: OwnedWriteHalf,
    bytes: &AtomicU64,
    stream: &AtomicU64,
) -> Result<(), SpliceError> {
    while let Some(data) = recv.data().await {
        let data = match data {
            Ok(d) => d,
            Err(e) => {
                // The peer reset the stream: reset the pod's connection, as ztunnel does.
                let _ = wr.as_ref().set_zero_linger();
                return Err(e.into());
            }
        };
        let n = data.len();
        if let Err(e) = wr.write_all(&data).await {
            return Err(SpliceError::LocalWrite(e));
        }
        // Only now is the window given back: the sender waits for our pod.
        let _ = recv.flow_control().release_capacity(n);
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        stream.fetch_add(n as u64, Ordering::Relaxed);
    }
    // END_STREAM: half-close towards the pod; the other direction goes on.
    wr.shutdown().await.map_err(SpliceError::LocalWrite)
}

/// Splices `tcp` with the stream (`send`, `recv`) until both directions have ended. The first
/// error aborts both: the stream is reset (dropping its handles sends `RST_STREAM` CANCEL) and the
/// socket closed with a TCP reset.
pub async fn splice(
    tcp: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    tunnel: &TunnelStats,
    stream: &StreamBytes,
) -> Result<(), SpliceError> {
    let _ = tcp.set_nodelay(true);
    let (rd, wr) = tcp.into_split();
    futures::future::try_join(
        tcp_to_tunnel(rd, send, &tunnel.bytes_sent, &stream.sent),
        tunnel_to_tcp(recv, wr, &tunnel.bytes_received, &stream.received),
    )
    .await
    .map(|_| ())
}
