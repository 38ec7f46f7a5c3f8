//! `hyper-floor`: the smallest reverse proxy on hyper 1 + hyper-util + tokio-rustls, the gateway
//! benchmark's "floor": what the mandated libraries cost per request with nothing of ours on top.
//!
//! Laid out as nginx and the gateway are in the benchmark: `--workers` threads, each a Tokio
//! `current_thread` runtime with its own `SO_REUSEPORT` listeners (plain HTTP/1.1, and TLS with
//! ALPN h2 / http/1.1), every request forwarded to one backend over keep-alive HTTP/1.1, and
//! requests whose path starts with `--grpc-prefix` to an h2c backend. No routing table, no logs,
//! no metrics, no retries, no timeouts: a floor, not a product.
//!
//! Backend connections, the cheapest hyper offers for each side:
//! - an HTTP/1.1 client connection serves one request at a time, so it gets its own backend
//!   connection (`hyper::client::conn::http1`), opened at its first request and closed with it:
//!   no pool lookup, no lock contention, no checkout;
//! - an HTTP/2 client connection multiplexes, so its requests go through the worker's pooled
//!   clients (hyper-util's `legacy::Client`: HTTP/1.1 keep-alive to the web backend, one
//!   multiplexed h2c connection to the gRPC backend), whose connection tasks run on the worker.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use clap::Parser;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client_http1;
use hyper::server::conn::{http1 as server_http1, http2 as server_http2};
use hyper::service::service_fn;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The gateway's allocator (`mesh-agent`'s `main.rs`), so the two differ in code, not malloc.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(about = "The smallest hyper reverse proxy: the gateway benchmark's floor")]
struct Args {
    /// Plain HTTP/1.1 listener.
    #[arg(long)]
    http: SocketAddr,
    /// TLS listener (ALPN h2, http/1.1).
    #[arg(long)]
    tls: SocketAddr,
    /// PEM certificate chain and PKCS#8 key for the TLS listener.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// The HTTP/1.1 backend every request goes to, except gRPC's.
    #[arg(long)]
    backend: SocketAddr,
    /// The h2c backend of requests whose path starts with `--grpc-prefix`.
    #[arg(long)]
    grpc_backend: SocketAddr,
    #[arg(long, default_value = "/bench.Bench/")]
    grpc_prefix: String,
    /// Threads, each with its own runtime and listeners.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

/// What every worker reads.
struct Shared {
    args: Args,
    tls: tokio_rustls::TlsAcceptor,
    web_authority: Authority,
    grpc_authority: Authority,
}

/// One worker's pooled clients (for HTTP/2 client connections and gRPC).
struct Worker {
    shared: Arc<Shared>,
    web: Client<HttpConnector, Incoming>,
    grpc: Client<HttpConnector, Incoming>,
}

type Body = Either<Incoming, Empty<Bytes>>;

fn main() -> Result<()> {
    let args = Args::parse();
    let certs = CertificateDer::pem_file_iter(&args.cert)
        .with_context(|| format!("reading {}", args.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", args.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&args.key)
        .with_context(|| format!("reading {}", args.key.display()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the certificate and key do not match")?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let shared = Arc::new(Shared {
        web_authority: args.backend.to_string().parse()?,
        grpc_authority: args.grpc_backend.to_string().parse()?,
        tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        args,
    });
    // Each worker binds its listeners on its own runtime and says so; "ready" once all have.
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let threads: Vec<_> = (0..shared.args.workers.max(1))
        .map(|i| {
            let shared = shared.clone();
            let bound = bound_tx.clone();
            std::thread::Builder::new()
                .name(format!("floor-{i}"))
                .spawn(move || worker(&shared, &bound))
        })
        .collect::<Result<_, _>>()?;
    drop(bound_tx);
    for bound in bound_rx {
        bound?;
    }
    println!("ready");
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    Ok(())
}

/// A listening socket of a `SO_REUSEPORT` group (the kernel spreads connections over workers).
fn reuseport_listener(addr: SocketAddr) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket.listen(4096)?)
}

fn worker(shared: &Arc<Shared>, bound: &std::sync::mpsc::Sender<Result<()>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listeners = reuseport_listener(shared.args.http)
            .and_then(|http| Ok((http, reuseport_listener(shared.args.tls)?)));
        let (http, tls) = match listeners {
            Ok(l) => {
                let _ = bound.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = bound.send(Err(e));
                return Ok(());
            }
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let w = Arc::new(Worker {
            shared: shared.clone(),
            web: Client::builder(TokioExecutor::new()).build(connector.clone()),
            grpc: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        });
        let plain = tokio::spawn(accept_plain(http, w.clone()));
        accept_tls(tls, w).await;
        plain.await?;
        Ok(())
    })
}

async fn accept_plain(listener: TcpListener, w: Arc<Worker>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_http1(TokioIo::new(stream), w.clone()));
    }
}

async fn accept_tls(listener: TcpListener, w: Arc<Worker>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let w = w.clone();
        tokio::spawn(async move {
            let Ok(tls) = w.shared.tls.accept(stream).await else {
                return;
            };
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                let svc = service_fn(move |req| forward_pooled(w.clone(), req));
                let _ = server_http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            } else {
                serve_http1(TokioIo::new(tls), w).await;
            }
        });
    }
}

/// One HTTP/1.1 client connection with its own backend connection: hyper serves its requests
/// one at a time, so the backend connection is never wanted by two requests at once.
async fn serve_http1<I>(io: TokioIo<I>, w: Arc<Worker>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let backend: Arc<Mutex<Option<client_http1::SendRequest<Incoming>>>> = Arc::default();
    let svc = service_fn(move |req: Request<Incoming>| {
        let w = w.clone();
        let backend = backend.clone();
        async move {
            if req.uri().path().starts_with(&w.shared.args.grpc_prefix) {
                return forward_pooled(w, req).await;
            }
            // Taken out for the request and put back once it is sent: no lock across an await.
            let taken = backend.lock().map_or(None, |mut b| b.take());
            let Some(mut sender) = (match taken {
                Some(s) if !s.is_closed() => Some(s),
                _ => connect_backend(w.shared.args.backend).await,
            }) else {
                return Ok(bad_gateway());
            };
            // Ready once the previous response's body has been read to its end.
            if sender.ready().await.is_err() {
                return Ok(bad_gateway());
            }
            let mut req = req;
            strip_hop_by_hop(req.headers_mut());
            let answer = sender.send_request(req);
            if let Ok(mut b) = backend.lock() {
                *b = Some(sender);
            }
            Ok::<_, Infallible>(answer.await.map_or_else(|_| bad_gateway(), respond))
        }
    });
    let _ = server_http1::Builder::new().serve_connection(io, svc).await;
}

async fn connect_backend(addr: SocketAddr) -> Option<client_http1::SendRequest<Incoming>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = client_http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// A request through the worker's pooled clients (HTTP/2 clients, and gRPC from any client).
async fn forward_pooled(
    w: Arc<Worker>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let grpc = req.uri().path().starts_with(&w.shared.args.grpc_prefix);
    if !grpc && !req.headers().contains_key(header::HOST) {
        // HTTP/2 carries the host in `:authority`; the HTTP/1.1 backend gets it as `Host`.
        if let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    if !grpc {
        // hyper-util's client refuses an HTTP/2 request on an HTTP/1.1 connection.
        *req.version_mut() = http::Version::HTTP_11;
    }
    strip_hop_by_hop(req.headers_mut());
    // The pooled client wants an absolute URI (its pool key): the backend's, the same path.
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(if grpc {
        w.shared.grpc_authority.clone()
    } else {
        w.shared.web_authority.clone()
    });
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    let Ok(uri) = Uri::from_parts(parts) else {
        return Ok(bad_gateway());
    };
    *req.uri_mut() = uri;
    let client = if grpc { &w.grpc } else { &w.web };
    Ok(client
        .request(req)
        .await
        .map_or_else(|_| bad_gateway(), respond))
}

fn respond(mut resp: Response<Incoming>) -> Response<Body> {
    strip_hop_by_hop(resp.headers_mut());
    resp.map(Either::Left)
}

fn bad_gateway() -> Response<Body> {
    let mut resp = Response::new(Either::Right(Empty::new()));
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}

/// RFC 9110 §7.6.1: the connection's own headers, and those `Connection` names, are not
/// forwarded; `te: trailers` is (gRPC needs it on HTTP/2).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(named) = headers.remove(header::CONNECTION)
        && let Ok(named) = named.to_str()
    {
        for name in named.split(',').map(str::trim) {
            headers.remove(name);
        }
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        header::TRANSFER_ENCODING.as_str(),
        header::UPGRADE.as_str(),
    ] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}
