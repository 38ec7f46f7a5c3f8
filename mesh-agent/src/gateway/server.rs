//! Workers and listeners: N single-threaded runtimes (thread per core), each with its own
//! `SO_REUSEPORT` listener per configured port and its own backend pools; TCP accept loops,
//! TLS (rustls, TLS 1.2 and 1.3, certificate by SNI from the current configuration, ALPN h2 /
//! http/1.1), and hyper's HTTP/1.1 or HTTP/2 connection (ALPN, or the h2c preface peeked on
//! plain ports), with the limits that bound hostile clients.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::{
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
};

use super::proxy::{ConnCtx, ConnInfo, Shared, Upstreams, handle};

/// One worker: a thread driving a `current_thread` runtime. Each worker accepts on its own
/// listening socket per port (the kernel spreads new connections over the `SO_REUSEPORT`
/// group by the 4-tuple hash) and serves them start to end on its thread with its own backend
/// pools, so a request never waits for a wake-up from another thread — nginx's worker
/// processes with `reuseport`, `HAProxy`'s threads with `shards`, Envoy's worker threads. State
/// that must hold across workers is shared: configuration and backends (`ArcSwap`), rate-limit
/// buckets and the retry budget (mutexes and atomics in them), outlier detection (atomics per
/// endpoint), the open-connection count and the drain signal.
#[derive(Debug)]
pub struct Worker {
    handle: tokio::runtime::Handle,
    upstreams: Arc<Upstreams>,
    /// Dropped (with the worker): the runtime stops and its thread ends.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Worker {
    /// Starts `n` workers.
    pub fn start(n: usize) -> io::Result<Vec<Self>> {
        (0..n).map(Self::start_one).collect()
    }

    fn start_one(i: usize) -> io::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, handle) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("gateway-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(rt.handle().clone()));
                rt.block_on(async move {
                    let _ = stopped.await;
                });
                // Connections still open (past the drain period) are dropped here.
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        let handle = handle
            .recv()
            .map_err(|_| io::Error::other("gateway worker thread ended at start"))??;
        Ok(Self {
            handle,
            upstreams: Arc::new(Upstreams::new()),
            _stop: stop,
        })
    }

    /// Serves `listener` on this worker until the returned task is aborted.
    pub fn serve(
        &self,
        shared: Arc<Shared>,
        listener: std::net::TcpListener,
        limits: ConnLimits,
    ) -> tokio::task::JoinHandle<()> {
        let upstreams = self.upstreams.clone();
        self.handle.spawn(async move {
            // Registered with this worker's reactor: its connections are polled here only.
            match TcpListener::from_std(listener) {
                Ok(l) => serve(shared, upstreams, l, limits).await,
                Err(e) => tracing::error!(error = %e, "listener not usable on a gateway worker"),
            }
        })
    }
}

/// Connection limits (Envoy's defaults where it has them).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ConnLimits {
    /// Time to receive a request's headers (HTTP/1.1) and to finish a TLS handshake: Envoy's
    /// `request_headers_timeout` is off by default; nginx's `client_header_timeout` is 60 s.
    pub header_read_timeout: Duration,
    /// A connection with no bytes either way for this long is closed (Envoy's
    /// `idle_timeout`, 1 h by default; nginx's `keepalive_timeout`, 75 s).
    pub idle_timeout: Duration,
    /// Bytes of request line + headers (431 past it). Envoy's `max_request_headers_kb`: 60 KiB.
    pub max_header_bytes: usize,
    /// Header lines per request (Envoy's `max_headers_count`: 100).
    pub max_headers: usize,
    /// HTTP/2 streams per connection (Envoy: 100 for the gateway's downstream in Istio).
    pub max_concurrent_streams: u32,
}

/// Serves the certificate the current configuration has for the SNI name on `port`.
#[derive(Debug)]
struct SniResolver {
    shared: Arc<Shared>,
    port: u16,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let cfg = self.shared.config.load();
        cfg.ports.get(&self.port)?.cert_for(hello.server_name())
    }
}

/// The TLS acceptor of `port`. Built once: the resolver reads the configuration at each
/// handshake, so certificates change without a restart and without dropping connections.
fn tls_acceptor(
    shared: &Arc<Shared>,
    port: u16,
) -> Result<tokio_rustls::TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver {
            shared: shared.clone(),
            port,
        }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Accepts connections on `listener` until the task is aborted.
pub async fn serve(
    shared: Arc<Shared>,
    upstreams: Arc<Upstreams>,
    listener: TcpListener,
    limits: ConnLimits,
) {
    let port = listener.local_addr().map_or(0, |a| a.port());
    let acceptor = match tls_acceptor(&shared, port) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(port, error = %e, "TLS setup failed");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let tls = shared.config.load().ports.get(&port).is_some_and(|p| p.tls);
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let upstreams = upstreams.clone();
        let open = OpenConn::new(&shared.connections);
        tokio::spawn(async move {
            let _open = open;
            let info = ConnInfo {
                peer,
                local_port: port,
                tls,
            };
            let ctx = Arc::new(ConnCtx::new(shared, upstreams, info));
            if tls {
                let accepted =
                    tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await;
                let Ok(Ok(stream)) = accepted else {
                    tracing::debug!(%peer, "TLS handshake failed or timed out");
                    return;
                };
                // ALPN settles the protocol; without ALPN, HTTP/1.1.
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                serve_conn(ctx, IdleIo::new(stream, limits.idle_timeout), limits, h2).await;
            } else {
                // h2c by prior knowledge or HTTP/1.1, told apart by the preface — within the
                // time a request head has (a client that sends nothing is closed then, as
                // hyper would close it waiting for its first head).
                let h2 = tokio::time::timeout(limits.header_read_timeout, h2c_preface(&stream));
                let Ok(Ok(h2)) = h2.await else {
                    tracing::debug!(%peer, "no request before the header-read timeout");
                    return;
                };
                serve_conn(ctx, IdleIo::new(stream, limits.idle_timeout), limits, h2).await;
            }
        });
    }
}

/// Counts a client connection as open until dropped (the drain waits for the count to reach 0).
struct OpenConn(Arc<std::sync::atomic::AtomicUsize>);

impl OpenConn {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The HTTP/2 side of every client connection (h2c and ALPN h2), with its settings.
fn h2_builder(limits: &ConnLimits) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        // HPACK bombs and CONTINUATION floods: the decoded header list is bounded, and h2
        // (≥ 0.4.4) stops reading CONTINUATION frames past it.
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // Rapid reset (CVE-2023-44487): streams the client resets before we answer count
        // against this; past it the connection gets GOAWAY.
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(1024))
        // A 1 MiB connection window and BDP-sized windows after that (hyper's adaptive flow
        // control), so uploads over a long path are not held to 64 KiB per round trip;
        // Envoy's defaults are 1 MiB per connection and 256 MiB per stream.
        .initial_connection_window_size(1024 * 1024)
        .adaptive_window(true)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        // SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441): clients may open WebSockets over
        // HTTP/2 with an extended CONNECT (`proxy::upgrade_form`).
        .enable_connect_protocol();
    b
}

/// The HTTP/2 connection preface (RFC 9113 §3.4), what an h2c client by prior knowledge
/// sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's own limit of header lines per HTTP/1.1 request (`DEFAULT_MAX_HEADERS`, private to
/// it). Setting the same limit explicitly is not free: hyper then allocates and fills two
/// header arrays per request instead of using arrays on its stack (1.7k instructions, 3.6 %
/// of an HTTP/1.1 request here).
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Whether a plain connection starts with the HTTP/2 preface, read without consuming it
/// (`MSG_PEEK`): the chosen protocol's hyper connection then reads the socket itself, with
/// no replaying wrapper between them on every read (hyper-util's `auto` connection and its
/// `Rewind`, 2 % of an HTTP/1.1 request here). The first byte decides for HTTP/1.1 at once;
/// a preface split over segments is waited for in short sleeps (peeking again at once would
/// spin: the bytes already there keep the socket readable).
async fn h2c_preface(stream: &tokio::net::TcpStream) -> io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut wait = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            // Closed (hyper's HTTP/1.1 connection sees the end) or not the preface.
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(100));
    }
}

/// Serves one connection with hyper's HTTP/2 (`h2`: ALPN h2, or the h2c preface) or HTTP/1.1
/// connection (with upgrades: WebSocket, `CONNECT`).
async fn serve_conn<I>(ctx: Arc<ConnCtx>, io: I, limits: ConnLimits, h2: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = ctx.shared.drain.subscribe();
    let info = ctx.info;
    if h2 {
        // Each stream's service future is spawned as a task of its own; boxed, it is moved as
        // a pointer on the way into the task instead of being copied whole at each step
        // (`memcpy` was 13 % of the instructions per HTTP/2 request; BENCHMARKS.md, session
        // 22).
        let b = h2_builder(&limits);
        let svc = service_fn(move |req| Box::pin(handle(ctx.clone(), req)));
        let served = b.serve_connection(TokioIo::new(io), svc);
        serve_until_drained(
            served,
            http2::Connection::graceful_shutdown,
            drain,
            info,
            "http2",
        )
        .await;
        return;
    }
    let mut b = http1::Builder::new();
    b.timer(HeaderTimer::default())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    if limits.max_headers != HYPER_DEFAULT_MAX_HEADERS {
        b.max_headers(limits.max_headers);
    }
    let svc = service_fn(move |req| handle(ctx.clone(), req));
    let served = b.serve_connection(TokioIo::new(io), svc).with_upgrades();
    serve_until_drained(
        served,
        http1::UpgradeableConnection::graceful_shutdown,
        drain,
        info,
        "http1",
    )
    .await;
}

/// Drives a hyper connection to its end; when the gateway drains, `graceful_shutdown` asks it
/// to finish — HTTP/1.1: close after the response in flight; HTTP/2: GOAWAY, streams in
/// flight finish (what Envoy does when it drains a listener).
///
/// The drain signal's future is polled once to register this task's waker, and again only
/// when the signal's version has moved (one atomic load per wake): polling it on every wake
/// of the connection took the signal's lock each time (tokio's `Notified` updates its waker
/// under the waiters' mutex) — about 1 % of an HTTP/1.1 request. The registered waker stays
/// valid: the connection is served in this one task from start to end.
async fn serve_until_drained<C>(
    served: C,
    graceful_shutdown: fn(Pin<&mut C>),
    drain: tokio::sync::watch::Receiver<bool>,
    conn: ConnInfo,
    protocol: &'static str,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(served);
    let flag = drain.clone();
    let mut drain = drain;
    let wait = async move { drop(drain.wait_for(|d| *d).await) };
    tokio::pin!(wait);
    let mut registered = false;
    let ended = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = served.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if !registered || flag.has_changed().unwrap_or(true) {
            registered = true;
            if wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    })
    .await;
    let result = if let Some(r) = ended {
        r
    } else {
        graceful_shutdown(served.as_mut());
        served.await
    };
    if let Err(e) = result {
        tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
        super::observe::connection_error(protocol, &e);
    }
}

/// hyper's HTTP/1.1 timer (its only use there: the header-read timeout), one per connection.
/// hyper starts a new timeout each time it waits for a request head — once per keep-alive
/// request — and drops it when the head is in. With `TokioTimer` each of those registered a
/// timer entry whose deadline was the runtime's earliest, and tokio wakes its own driver for
/// that through the eventfd (a `write` system call and an extra `epoll_wait` round for about
/// every second request). Here every sleep of the connection shares one tokio timer, moved only
/// when a sleep needs an earlier deadline than the one armed (or the armed one has fired); as
/// keep-alive deadlines grow, it is re-armed about once per timeout period, when it fires (a
/// spurious wake of the connection task then, harmless), not per request. The timer keeps the
/// waker of the last poll: hyper polls these sleeps from the connection future, which
/// `serve_conn` drives in one task, so that waker is the connection's.
#[derive(Clone, Default)]
struct HeaderTimer {
    armed: Arc<std::sync::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl hyper::rt::Timer for HeaderTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeaderSleep {
            deadline,
            armed: self.armed.clone(),
        })
    }
}

/// A sleep of [`HeaderTimer`]: ready once its deadline has passed.
struct HeaderSleep {
    deadline: Instant,
    armed: Arc<std::sync::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl hyper::rt::Sleep for HeaderSleep {}

impl Future for HeaderSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let mut armed = self
            .armed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let timer = armed.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            // Past the deadline by tokio's clock: its timer fires at or after its deadline
            // (rounded up to its millisecond tick), so a timer that fired at or past this
            // sleep's deadline means the deadline has passed — no clock read of our own on
            // each poll (hyper polls this sleep whenever it waits for a request head).
            if timer.is_elapsed() && timer.deadline() >= deadline {
                return Poll::Ready(());
            }
            // Armed later than this sleep needs, or already fired: move it here.
            if timer.deadline() > deadline || timer.is_elapsed() {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// Quiet ticks, each `idle / QUIET_TICKS` long, after which [`IdleIo`] closes its stream.
const QUIET_TICKS: u32 = 4;

/// A stream closed after `idle` without a byte read or written: slow or silent clients
/// (slowloris) cannot hold a connection forever. The ready path reads no clock: each read or
/// write that completes only sets a flag. A timer ticks every `idle / 4`; when it fires the
/// flag says whether the stream moved since the last tick (cleared, the count of quiet ticks
/// starts over from the current time) or not (one more quiet tick). After 4 quiet ticks in a
/// row the stream's pending read or write fails with `TimedOut`: a stream is closed between
/// `idle` and `idle × 1.25` after its last byte (plus tokio's millisecond timer granularity),
/// never earlier. Ticks are seen only while a read or write is pending, which is when the
/// connection waits on the client.
///
/// Envoy's `idle_timeout` (HTTP connection manager) counts time without an active request
/// instead: armed when the last stream ends, disarmed when one starts, exact to its deadline;
/// bytes of a request in progress are bounded by its other timeouts (`request_headers_timeout`,
/// `stream_idle_timeout`). This one counts bytes either way, as `stream_idle_timeout` does per
/// stream.
pub struct IdleIo<S> {
    inner: S,
    tick: Duration,
    /// A read or write completed since the last tick.
    moved: bool,
    /// Ticks in a row without I/O.
    quiet: u32,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> IdleIo<S> {
    pub fn new(inner: S, idle: Duration) -> Self {
        // At most a year per tick, so that adding one to an instant cannot overflow.
        let tick = (idle / QUIET_TICKS).min(Duration::from_hours(365 * 24));
        Self {
            inner,
            tick,
            moved: false,
            quiet: 0,
            timer: Box::pin(tokio::time::sleep(tick)),
        }
    }

    /// Pending I/O: has the connection been idle too long?
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            let next = if std::mem::take(&mut self.moved) {
                // The only clock read, at most once per tick: counting starts over from now, so
                // a tick that fired long ago (the stream was busy, nobody polled the timer) is
                // not taken for quiet time.
                self.quiet = 0;
                tokio::time::Instant::now()
            } else {
                self.quiet += 1;
                if self.quiet >= QUIET_TICKS {
                    return true;
                }
                // No I/O since the last tick, which was observed at or after its deadline: a
                // later tick from that deadline still spans only quiet time.
                self.timer.deadline()
            };
            self.timer.as_mut().reset(next + self.tick);
        }
        false
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "idle timeout")
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.moved = true;
                Poll::Ready(r)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                self.moved = true;
                Poll::Ready(r)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                self.moved = true;
                Poll::Ready(r)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Binds `addr` (`SO_REUSEADDR`, a deep backlog for connection bursts) once per worker:
/// `SO_REUSEPORT` makes the sockets one group the kernel balances new connections over. Like
/// nginx's `reuseport`, another process of the same user could join the group; the gateway's
/// container runs alone in its network namespace. Call within a Tokio runtime (the sockets are
/// handed over as std listeners, for each worker to register with its own reactor).
pub fn bind(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    (0..workers.max(1))
        .map(|_| {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.set_nodelay(true)?;
            socket.bind(addr)?;
            socket.listen(4096)?.into_std()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
        time::Instant,
    };

    use super::*;

    const IDLE: Duration = Duration::from_millis(400);

    /// Reads until the idle timeout ends the stream; returns when that happened.
    async fn timed_out_at(io: &mut IdleIo<DuplexStream>) -> Instant {
        let mut buf = [0u8; 16];
        loop {
            match io.read(&mut buf).await {
                Ok(n) => assert!(n > 0, "the peer closed"),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                    return Instant::now();
                }
            }
        }
    }

    /// Within [idle, idle × 1.25] of `last`, plus the timer's millisecond.
    fn assert_bound(last: Instant, closed: Instant) {
        let quiet = closed - last;
        assert!(
            quiet >= IDLE && quiet <= IDLE * 5 / 4 + Duration::from_millis(1),
            "closed after {quiet:?} of quiet"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_closes_between_idle_and_a_quarter_more() {
        let (_client, server) = tokio::io::duplex(64);
        let start = Instant::now();
        let mut io = IdleIo::new(server, IDLE);
        assert_bound(start, timed_out_at(&mut io).await);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_keep_a_stream_open_and_the_bound_counts_from_the_last() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = IdleIo::new(server, IDLE);
        let writer = tokio::spawn(async move {
            // A byte every 0.3 s (under the 0.4 s idle timeout) for 3 s, then silence.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                client.write_all(b"x").await.unwrap();
            }
            let last = Instant::now();
            (client, last)
        });
        let closed = timed_out_at(&mut io).await;
        let (_client, last) = writer.await.unwrap();
        assert_bound(last, closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_stream_is_not_taken_for_idle_when_it_pauses() {
        // Reads that complete at once never poll the timer: its ticks pass unseen. The quiet
        // count must start from the I/O, not from those old ticks.
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = IdleIo::new(server, IDLE);
        let mut buf = [0u8; 1];
        for _ in 0..5 {
            client.write_all(b"x").await.unwrap();
            tokio::time::advance(Duration::from_millis(300)).await;
            io.read_exact(&mut buf).await.unwrap();
        }
        let last = Instant::now();
        assert_bound(last, timed_out_at(&mut io).await);
    }
}
