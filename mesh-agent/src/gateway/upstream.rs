//! Backend connections of one gateway worker: HTTP/1.1 keep-alive connections kept idle per
//! endpoint and lent to one request at a time, and one shared h2c connection per endpoint
//! (gRPC).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{
    backends::EndpointState,
    proxy::{Body, BoxError},
};

/// Idle backend connections are closed after this (Envoy's upstream idle timeout is 1 h;
/// shorter here so a scaled-down backend's sockets go soon).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per endpoint and worker (past it, a returned connection is closed).
const MAX_IDLE_PER_ENDPOINT: usize = 1024;
/// Time to open a backend connection (Envoy's `connect_timeout` default: 5 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The backend connections of one worker (`super::server::Worker`). Used only on its worker's
/// single-threaded runtime, so a request, its backend connection's task and the response all
/// run on one thread: handing a request to the connection task is a local wake-up, not a futex
/// across threads (nginx's workers, `HAProxy`'s threads and Envoy's workers each keep their own
/// upstream pools for the same reason). The price: an endpoint gets up to one h2 connection
/// per worker instead of one per process (Envoy: one per worker too).
#[derive(Debug)]
pub struct Upstreams {
    http1: Arc<Http1Pool>,
    /// h2c to gRPC backends: multiplexed, one connection per endpoint shared by every stream.
    http2: Arc<Http2Pool>,
}

impl Upstreams {
    #[must_use]
    pub fn new() -> Self {
        Self {
            http1: Arc::new(Http1Pool::default()),
            http2: Arc::new(Http2Pool::default()),
        }
    }

    /// Sends `req` to `ep`: over h2c when `h2` (an absolute URI whose authority is the
    /// `:authority` sent, not the address dialled), else on an HTTP/1.1 connection of the pool
    /// (origin-form with `Host`, as `proxy::Template` builds both). The answer's [`Lease`]
    /// (HTTP/1.1) goes back to the pool when the response body has been read to its end.
    pub async fn send(
        &self,
        ep: &EndpointState,
        req: Request<Body>,
        h2: bool,
    ) -> Result<Answer, UpstreamError> {
        if h2 {
            return self.http2.send(ep.addr, req).await.map(|r| (r, None));
        }
        self.http1.send(ep.addr, req).await
    }
}

impl Default for Upstreams {
    fn default() -> Self {
        Self::new()
    }
}

/// Opens a TCP connection to a backend (`TCP_NODELAY`), bounded by [`CONNECT_TIMEOUT`]: the
/// HTTP/1.1 pool's new connections and `CONNECT` tunnels.
pub async fn dial(addr: SocketAddr) -> Result<tokio::net::TcpStream, UpstreamError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| {
            UpstreamError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        })?
        .map_err(UpstreamError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A backend's response, with the lease of its HTTP/1.1 connection.
pub type Answer = (Response<Incoming>, Option<Lease>);

/// Why a request did not get a response from its backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Connect(#[source] io::Error),
    #[error("handshake: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("{0}")]
    Http(#[source] hyper::Error),
}

impl UpstreamError {
    /// The connection could not be made (nothing was sent).
    #[must_use]
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Handshake(_) => true,
            Self::Http(_) => false,
        }
    }
}

/// An idle HTTP/1.1 connection: its sender and since when it waits.
struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// The idle HTTP/1.1 connections of one worker per endpoint, taken last-in first-out (the
/// warmest socket first; the ones left at the bottom age out), as Envoy's HTTP/1.1 pool.
#[derive(Default)]
pub struct Http1Pool {
    /// By endpoint; foldhash, not `SipHash` (looked up twice per request; endpoints come from
    /// the cluster, not from clients).
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>, foldhash::fast::RandomState>>,
    /// Whether this worker's sweep of aged connections runs (started with the first one).
    sweeping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Http1Pool")
            .field("endpoints", &idle.len())
            .field("idle", &idle.values().map(Vec::len).sum::<usize>())
            .field("sweeping", &self.sweeping)
            .finish()
    }
}

impl Http1Pool {
    /// An idle connection to `addr` that is not past the idle timeout.
    fn take(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&addr)?;
        while let Some(i) = list.pop() {
            if i.since.elapsed() < POOL_IDLE_TIMEOUT && !i.sender.is_closed() {
                return Some(i.sender);
            }
        }
        None
    }

    fn put(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops the connections idle past the timeout or closed by the backend (dropping a
    /// sender ends its connection task, which closes the socket), and forgets endpoints
    /// without any.
    fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|_, list| {
            list.retain(|i| i.since.elapsed() < POOL_IDLE_TIMEOUT && !i.sender.is_closed());
            !list.is_empty()
        });
    }

    /// Starts this worker's sweep (once; it ends with the pool).
    fn start_sweep(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POOL_IDLE_TIMEOUT / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    async fn connect(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<Body>, UpstreamError> {
        self.start_sweep();
        let stream = dial(addr).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        // The connection's task, on this worker: it ends when the backend closes, on an
        // error, or when the sender is dropped and no request is in flight. Upgrades
        // (WebSocket, CONNECT) take its socket over after a 101.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, error = %e, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` on an idle connection to `addr`, or a new one. A request a reused
    /// connection could not take (the backend closed it while it was idle: nothing was
    /// written) goes on another, as hyper-util's client retries them.
    async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Answer, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.take(addr) {
                Some(s) => (s, true),
                None => (self.connect(addr).await?, false),
            };
            // Ready once the connection's previous response has been read to its end.
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                // A new connection closed before its first request.
                return Err(UpstreamError::Http(e));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease {
                        pool: self.clone(),
                        addr,
                        sender,
                    };
                    return Ok((resp, Some(lease)));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => req = back,
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }
}

/// The h2c connections of one worker: one per endpoint, shared by every stream to it (Envoy's
/// HTTP/2 pool). Ours rather than hyper-util's legacy client, which takes the URI's authority
/// both as the address it dials and as the `:authority` it sends: a backend then saw the
/// endpoint's address instead of the client's host (Envoy passes the client's, or a rewritten
/// one), and every stream paid the client's checkout (a hashed pool key, a lock, a waiter).
#[derive(Default)]
pub struct Http2Pool {
    /// By endpoint (foldhash, as the HTTP/1.1 pool).
    conns: Mutex<HashMap<SocketAddr, Shared2, foldhash::fast::RandomState>>,
    /// One connect at a time per endpoint: the streams that find no connection wait for the
    /// one being made instead of each opening their own (Envoy's pool queues them on its
    /// pending connection). Dropped by the sweep when nobody holds them.
    dialing: Mutex<HashMap<SocketAddr, Arc<Gate>, foldhash::fast::RandomState>>,
    /// Whether this worker's sweep of unused connections runs (started with the first one).
    sweeping: std::sync::atomic::AtomicBool,
}

/// Who connects to one endpoint, and how many of those connects failed.
#[derive(Default)]
struct Gate {
    one_at_a_time: tokio::sync::Mutex<()>,
    failed: std::sync::atomic::AtomicU64,
}

/// One endpoint's h2c connection.
struct Shared2 {
    sender: http2::SendRequest<Body>,
    /// Whether a stream was sent since the last sweep (no clock read per request).
    used: bool,
}

impl std::fmt::Debug for Http2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Http2Pool")
            .field("endpoints", &conns.len())
            .finish_non_exhaustive()
    }
}

impl Http2Pool {
    /// The open connection to `addr`, if there is one.
    fn get(&self, addr: SocketAddr) -> Option<http2::SendRequest<Body>> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let c = conns.get_mut(&addr)?;
        if c.sender.is_closed() {
            conns.remove(&addr);
            return None;
        }
        c.used = true;
        Some(c.sender.clone())
    }

    /// Forgets `addr`'s connection (it could not take a stream); a newer one stays.
    fn forget(&self, addr: SocketAddr) {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        if conns.get(&addr).is_some_and(|c| !c.sender.is_ready()) {
            conns.remove(&addr);
        }
    }

    /// `addr`'s pooled connection (`true`), or a new one made by this stream (`false`); while
    /// one stream connects, the others to `addr` wait for its connection.
    async fn connection(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<(http2::SendRequest<Body>, bool), UpstreamError> {
        if let Some(s) = self.get(addr) {
            return Ok((s, true));
        }
        let gate = self
            .dialing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(addr)
            .or_default()
            .clone();
        let failed_before = gate.failed.load(std::sync::atomic::Ordering::Relaxed);
        let _held = gate.one_at_a_time.lock().await;
        // Made by the stream that held the gate before.
        if let Some(s) = self.get(addr) {
            return Ok((s, true));
        }
        // Its connect failed while this stream waited: fail too rather than try again in
        // turn (streams waiting on a dead endpoint would each wait out a connect timeout);
        // the request's retry goes to another endpoint.
        if gate.failed.load(std::sync::atomic::Ordering::Relaxed) != failed_before {
            return Err(UpstreamError::Connect(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection being made for this stream failed",
            )));
        }
        match self.connect(addr).await {
            Ok(s) => Ok((s, false)),
            Err(e) => {
                gate.failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// A new connection to `addr`, kept for the streams after this one.
    async fn connect(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        self.start_sweep();
        let stream = dial(addr).await?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "backend h2 connection ended with an error");
            }
        });
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.insert(
            addr,
            Shared2 {
                sender: sender.clone(),
                used: true,
            },
        );
        Ok(sender)
    }

    /// Starts this worker's sweep (once): every third of [`POOL_IDLE_TIMEOUT`], connections
    /// no stream used since the previous sweep are dropped (closed once their streams end),
    /// so an idle one goes within 1/3 to 2/3 of the timeout.
    fn start_sweep(self: &Arc<Self>) {
        if self
            .sweeping
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POOL_IDLE_TIMEOUT / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let mut conns = pool.conns.lock().unwrap_or_else(PoisonError::into_inner);
                conns.retain(|_, c| std::mem::take(&mut c.used) && !c.sender.is_closed());
                drop(conns);
                pool.dialing
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|_, gate| Arc::strong_count(gate) > 1);
            }
        });
    }

    /// Sends `req` (absolute URI) on `addr`'s connection, or a new one. A stream a pooled
    /// connection could not take (it closed, or went away before the request was written)
    /// goes on a new connection, as hyper-util's client retries those.
    async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        loop {
            let (mut sender, pooled) = self.connection(addr).await?;
            if let Err(e) = sender.ready().await {
                self.forget(addr);
                if pooled {
                    continue;
                }
                return Err(UpstreamError::Http(e));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(back) if pooled => {
                        self.forget(addr);
                        req = back;
                    }
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }
}

/// A backend HTTP/1.1 connection lent to one request, given back to its worker's pool when
/// the response body has been read to its end (only then can the connection carry the next
/// request); dropped earlier — the client went away mid-body, an upgrade took the socket, a
/// retry discarded the answer — it closes with its sender, as hyper cannot reuse a connection
/// with a response half read.
pub struct Lease {
    pool: Arc<Http1Pool>,
    addr: SocketAddr,
    sender: http1::SendRequest<Body>,
}

impl Lease {
    fn give_back(self) {
        self.pool.put(self.addr, self.sender);
    }
}

/// A backend's response body that gives its connection back when it ends.
pub struct Returning {
    inner: Incoming,
    lease: Option<Lease>,
}

impl Returning {
    #[must_use]
    pub fn new(inner: Incoming, lease: Lease) -> Self {
        let mut r = Self {
            inner,
            lease: Some(lease),
        };
        r.ended_check();
        r
    }

    /// A body with nothing (more) to read: the connection is free.
    fn ended_check(&mut self) {
        if http_body::Body::is_end_stream(&self.inner) {
            self.release();
        }
    }

    fn release(&mut self) {
        if let Some(l) = self.lease.take() {
            l.give_back();
        }
    }
}

impl http_body::Body for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) => self.ended_check(),
            Poll::Ready(Some(Err(_))) => {
                // The connection failed mid-body: never reused.
                self.lease = None;
            }
            Poll::Pending => {}
        }
        polled.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::header;
    use http_body_util::{BodyExt, Empty};
    use hyper::service::service_fn;

    use super::*;

    /// An HTTP/1.1 backend on loopback answering `body_len` bytes; counts the connections it
    /// accepted. `keep_alive: false` answers `connection: close` and closes after each.
    async fn backend(body_len: usize, keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| async move {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from(vec![b'x'; body_len]),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get(addr: SocketAddr) -> Request<Body> {
        Request::builder()
            .uri("/")
            .header(header::HOST, addr.to_string())
            .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
            .unwrap()
    }

    /// Sends and reads the whole answer through the body that gives the connection back.
    async fn fetch(pool: &Arc<Http1Pool>, addr: SocketAddr) -> usize {
        let (resp, lease) = pool.send(addr, get(addr)).await.unwrap();
        let body = Returning::new(resp.into_body(), lease.unwrap());
        body.collect().await.unwrap().to_bytes().len()
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_carries_the_next_request() {
        let (addr, accepted) = backend(100_000, true).await;
        let pool = Arc::new(Http1Pool::default());
        for _ in 0..5 {
            assert_eq!(fetch(&pool, addr).await, 100_000);
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_closes_its_connection() {
        let (addr, accepted) = backend(1_000_000, true).await;
        let pool = Arc::new(Http1Pool::default());
        let (resp, lease) = pool.send(addr, get(addr)).await.unwrap();
        let mut body = Returning::new(resp.into_body(), lease.unwrap());
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        // The half-read connection was not given back: the next request gets a new one.
        assert_eq!(fetch(&pool, addr).await, 1_000_000);
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
        assert_eq!(fetch(&pool, addr).await, 1_000_000);
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn connections_the_backend_closes_are_not_reused() {
        let (addr, accepted) = backend(10, false).await;
        let pool = Arc::new(Http1Pool::default());
        for _ in 0..3 {
            assert_eq!(fetch(&pool, addr).await, 10);
            // Let the connection task see the close.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 3);
    }

    /// An h2c backend on loopback answering "ok"; counts the connections it accepted and
    /// keeps their tasks, so a test can cut them.
    async fn h2_backend() -> (
        SocketAddr,
        Arc<AtomicUsize>,
        Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let (count, held) = (accepted.clone(), tasks.clone());
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
                let task = tokio::spawn(async move {
                    let svc = service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
                held.lock().unwrap().push(task);
            }
        });
        (addr, accepted, tasks)
    }

    async fn h2_fetch(pool: &Arc<Http2Pool>, addr: SocketAddr) -> Bytes {
        let req = Request::builder()
            .uri(format!("http://{addr}/"))
            .version(http::Version::HTTP_2)
            .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
            .unwrap();
        let resp = pool.send(addr, req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn concurrent_streams_share_one_h2_connection() {
        let (addr, accepted, _) = h2_backend().await;
        let pool = Arc::new(Http2Pool::default());
        // 50 first streams at once: one connects, the others wait for its connection.
        let all = futures::future::join_all((0..50).map(|_| h2_fetch(&pool, addr))).await;
        assert!(all.iter().all(|b| b == "ok"));
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        assert_eq!(h2_fetch(&pool, addr).await, "ok");
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_cut_h2_connection_is_replaced() {
        let (addr, accepted, tasks) = h2_backend().await;
        let pool = Arc::new(Http2Pool::default());
        assert_eq!(h2_fetch(&pool, addr).await, "ok");
        // The backend drops the connection (its socket closes).
        for t in tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(h2_fetch(&pool, addr).await, "ok");
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let pool = Arc::new(Http1Pool::default());
        let err = pool.send(addr, get(addr)).await.err().unwrap();
        assert!(err.is_connect(), "{err}");
    }
}
