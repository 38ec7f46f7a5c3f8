//! The ingress gateway with real third-party clients (issue 10, "What must be shown"): h2load over
//! TLS, a tonic gRPC client against a tonic server (unary, server, client and bidirectional
//! streaming, an error status in the trailers) and a WebSocket client against a WebSocket server
//! (tokio-tungstenite on both ends), `CONNECT` tunnels over HTTP/1.1 and HTTP/2, WebSocket over
//! HTTP/2, `:authority` at h2c backends, and certificates changed under load. The real
//! `mesh-agent gateway` process; no kernel needed.
//! Build first: `cargo build -p mesh-agent --bins`; h2load comes from `nghttp2-client`
//! (`cargo xtask install-deps`).

use std::pin::Pin;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use futures::{SinkExt as _, Stream, StreamExt as _};
use mesh_tests::gateway::{Backend, GatewayProcess, services_yaml, tls_route_yaml, wait_for};
use tokio_tungstenite::tungstenite::Message;
use tonic::{Request, Response, Status, Streaming};

mod echo {
    #![allow(clippy::pedantic, clippy::nursery, missing_docs, unreachable_pub)]
    tonic::include_proto!("echo");
}

use echo::Msg;
use echo::echo_client::EchoClient;
use echo::echo_server::{Echo, EchoServer};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "mesh-gateway-clients-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating the test's directory");
    d
}

/// Waits until the gateway's TCP port accepts connections (routes are loaded before it binds).
async fn listening(gw: &GatewayProcess, port: u16) -> Result<()> {
    wait_for(
        &format!("the gateway to listen on {port}"),
        Duration::from_secs(20),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await
    .with_context(|| format!("gateway log: {}", gw.log_text()))
}

// ---------------------------------------------------------------------------------------------
// h2load over TLS

#[test]
fn h2load_over_tls_gets_only_2xx() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let port = 18_451;
        let backend = Backend::start("h2", "127.0.31.1:9031".parse()?).await?;
        let dir = tmpdir("h2load");
        let (routes, _) = tls_route_yaml(port, "h2.example.com", "h2")?;
        let services = services_yaml(&[("h2", 80, &["127.0.31.1"], 9031, "")]);
        let gw = GatewayProcess::start(&dir, &routes, &services, &[])?;
        listening(&gw, port).await?;
        // 2,000 requests on 4 connections × 10 concurrent streams, over TLS with ALPN h2.
        let out = Command::new("h2load")
            .arg(format!("https://h2.example.com:{port}/load"))
            .args(["--connect-to", &format!("127.0.0.1:{port}")])
            .args(["-n", "2000", "-c", "4", "-m", "10"])
            .output()
            .context("running h2load: install nghttp2-client (cargo xtask install-deps)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "h2load failed: {text}");
        ensure!(
            text.contains("Application protocol: h2"),
            "h2load did not negotiate h2: {text}"
        );
        ensure!(
            text.contains("requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored, 0 timeout"),
            "not every request succeeded: {text}\ngateway log: {}",
            gw.log_text()
        );
        ensure!(
            text.contains("status codes: 2000 2xx, 0 3xx, 0 4xx, 0 5xx"),
            "non-2xx answers: {text}"
        );
        let hits = backend.hits.load(std::sync::atomic::Ordering::Relaxed);
        ensure!(hits == 2000, "the backend saw {hits} requests, not 2000");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// tonic gRPC: the four kinds of call

/// The backend: names itself in every answer so the test sees the gateway did not answer.
struct EchoService;

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

fn msg(text: impl Into<String>, count: u32) -> Msg {
    Msg {
        text: text.into(),
        count,
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        let m = req.into_inner();
        if m.text == "fail" {
            // Travels in the trailers (`grpc-status: 5`, `grpc-message`): the gateway must pass them.
            return Err(Status::not_found("no such echo"));
        }
        Ok(Response::new(msg(format!("backend: {}", m.text), m.count)))
    }

    type ServerStreamStream = MsgStream;

    async fn server_stream(
        &self,
        req: Request<Msg>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let m = req.into_inner();
        let items = (0..m.count).map(move |i| Ok(msg(format!("{} #{i}", m.text), i)));
        Ok(Response::new(Box::pin(futures::stream::iter(items))))
    }

    async fn client_stream(&self, req: Request<Streaming<Msg>>) -> Result<Response<Msg>, Status> {
        let mut s = req.into_inner();
        let (mut texts, mut n) = (Vec::new(), 0);
        while let Some(m) = s.message().await? {
            texts.push(m.text);
            n += 1;
        }
        Ok(Response::new(msg(texts.join("+"), n)))
    }

    type BidiStream = MsgStream;

    async fn bidi(
        &self,
        req: Request<Streaming<Msg>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let s = req.into_inner();
        // One answer per message, as each arrives (not after the request stream ends).
        let out = s.map(|m| m.map(|m| msg(format!("echo {}", m.text), m.count)));
        Ok(Response::new(Box::pin(out)))
    }
}

#[test]
fn tonic_grpc_unary_and_streaming_through_the_gateway() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let port = 18_452;
        let backend_addr: std::net::SocketAddr = "127.0.31.2:9032".parse()?;
        let listener = tokio::net::TcpListener::bind(backend_addr).await?;
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(EchoService))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let dir = tmpdir("grpc");
        // A GRPCRoute matching the service (the gateway speaks h2c to gRPC backends).
        let routes = format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: gw, namespace: default }}
spec:
  gatewayClassName: mesh
  listeners:
    - {{ name: http, port: {port}, protocol: HTTP }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{ name: echo, namespace: default }}
spec:
  parentRefs: [{{ name: gw }}]
  rules:
    - matches: [{{ method: {{ service: echo.Echo }} }}]
      backendRefs: [{{ name: echo, port: 80 }}]
"
        );
        let services = services_yaml(&[("echo", 80, &["127.0.31.2"], 9032, "")]);
        let gw = GatewayProcess::start(&dir, &routes, &services, &[])?;
        listening(&gw, port).await?;
        let result = grpc_calls(port).await;
        server.abort();
        result.with_context(|| format!("gateway log: {}", gw.log_text()))
    })
}

async fn grpc_calls(port: u16) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let mut c = EchoClient::new(channel);

    // Unary.
    let r = c.unary(msg("hi", 7)).await?.into_inner();
    ensure!(r == msg("backend: hi", 7), "unary answer: {r:?}");

    // An error status from the backend arrives intact (trailers-only response through the gateway).
    let err = c
        .unary(msg("fail", 0))
        .await
        .expect_err("the backend answers NOT_FOUND");
    ensure!(
        err.code() == tonic::Code::NotFound && err.message() == "no such echo",
        "status through the gateway: {err:?}"
    );

    // Server streaming: 50 messages in order, then the stream ends with OK.
    let mut s = c.server_stream(msg("item", 50)).await?.into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await? {
        got.push(m);
    }
    let want: Vec<Msg> = (0..50).map(|i| msg(format!("item #{i}"), i)).collect();
    ensure!(got == want, "server stream: {got:?}");

    // Client streaming: 20 messages, one answer after the stream ends.
    let items: Vec<Msg> = (0..20).map(|i| msg(i.to_string(), i)).collect();
    let r = c
        .client_stream(futures::stream::iter(items))
        .await?
        .into_inner();
    let want = (0..20).map(|i| i.to_string()).collect::<Vec<_>>().join("+");
    ensure!(r == msg(want, 20), "client stream answer: {r:?}");

    // Bidirectional: each answer is read before the next message is sent, so neither direction
    // can be buffered until the end of the call by the gateway.
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let mut answers = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    for i in 0..10 {
        tx.send(msg(format!("ping {i}"), i)).await?;
        let a = tokio::time::timeout(Duration::from_secs(5), answers.message())
            .await
            .with_context(|| format!("no answer to ping {i} within 5 s: a direction is buffered"))??
            .context("the answer stream ended early")?;
        ensure!(
            a == msg(format!("echo ping {i}"), i),
            "bidi answer {i}: {a:?}"
        );
    }
    drop(tx);
    ensure!(
        answers.message().await?.is_none(),
        "the answer stream must end (OK) after the request stream ends"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// WebSocket

#[test]
fn websocket_client_exchanges_messages_through_the_gateway() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let port = 18_453;
        let server = websocket_echo_server("127.0.31.3:9033").await?;
        let dir = tmpdir("ws");
        let services = services_yaml(&[("ws", 80, &["127.0.31.3"], 9033, "")]);
        let gw = GatewayProcess::start(
            &dir,
            &mesh_tests::gateway::http_route_yaml(port, "ws", ""),
            &services,
            &[],
        )?;
        listening(&gw, port).await?;
        let result = websocket_exchange(port).await;
        server.abort();
        result.with_context(|| format!("gateway log: {}", gw.log_text()))
    })
}

/// A real WebSocket server on `addr` (HTTP/1.1 handshake with `Sec-WebSocket-Accept`,
/// framing, close) that echoes text as `echo: …` and binary unchanged.
async fn websocket_echo_server(addr: &str) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    let reply = match m {
                        Message::Text(t) => Message::text(format!("echo: {}", t.as_str())),
                        Message::Binary(b) => Message::Binary(b),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        return;
                    }
                }
                let _ = ws.close(None).await;
            });
        }
    }))
}

async fn websocket_exchange(port: u16) -> Result<()> {
    let (ws, resp) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/chat")).await?;
    ensure!(resp.status() == 101, "handshake answer: {}", resp.status());
    websocket_messages(ws).await
}

/// Text and binary messages echoed by `websocket_echo_server`, then the close handshake.
async fn websocket_messages<S>(mut ws: tokio_tungstenite::WebSocketStream<S>) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for i in 0..20 {
        ws.send(Message::text(format!("message {i}"))).await?;
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .with_context(|| format!("no echo of message {i} within 5 s"))?
            .context("the connection closed")??;
        ensure!(
            m == Message::text(format!("echo: message {i}")),
            "echo {i}: {m:?}"
        );
    }
    // A 200 KiB binary message: several frames' worth of bytes spliced both ways.
    let big: Vec<u8> = (0u8..=250).cycle().take(200 * 1024).collect();
    ws.send(Message::binary(big.clone())).await?;
    let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .context("no echo of the binary message within 5 s")?
        .context("the connection closed")??;
    ensure!(m == Message::binary(big), "binary echo differs");
    ws.close(None).await?;
    // The close handshake completes through the gateway: the server's Close arrives, then EOF.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = ws.next().await {
            if matches!(m, Ok(Message::Close(_)) | Err(_)) {
                break;
            }
        }
    })
    .await;
    ensure!(end.is_ok(), "the close handshake did not finish within 5 s");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CONNECT: HTTP/1.1 and HTTP/2 tunnels, WebSocket over HTTP/2 (RFC 8441)

/// Plain port, TLS port (ALPN h2); the rule with `method: CONNECT` for `tunnel.example` goes
/// to Service `tcp` (one endpoint refuses connections, one echoes bytes), for
/// `web-tunnel.example` to an HTTP backend, for `dead.example` to endpoints that all refuse;
/// `ws.example` is an ordinary route to a WebSocket server; `plain.example` has no `CONNECT`
/// rule.
fn connect_routes(port: u16, tls_port: u16) -> Result<(String, rcgen::Certificate)> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["tunnel.example".into(), "ws.example".into()])?
        .self_signed(&key)?;
    let tunnel = |name: &str, host: &str, svc: &str| {
        format!(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: {name} }}
spec:
  parentRefs: [{{ name: gw }}]
  hostnames: [{host}]
  rules:
    - matches: [{{ method: CONNECT }}]
      backendRefs: [{{ name: {svc}, port: 80 }}]
"
        )
    };
    let routes = format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: gw }}
spec:
  gatewayClassName: mesh
  listeners:
    - {{ name: http, port: {port}, protocol: HTTP }}
    - {{ name: tls, port: {tls_port}, protocol: HTTPS, tls: {{ certificateRefs: [{{ name: certs }}] }} }}
{}{}{}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: ws }}
spec:
  parentRefs: [{{ name: gw }}]
  hostnames: [ws.example]
  rules: [{{ backendRefs: [{{ name: ws, port: 80 }}] }}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: plain }}
spec:
  parentRefs: [{{ name: gw }}]
  hostnames: [plain.example]
  rules: [{{ backendRefs: [{{ name: web, port: 80 }}] }}]
---
{}",
        tunnel("tunnel", "tunnel.example", "tcp"),
        tunnel("web-tunnel", "web-tunnel.example", "web"),
        tunnel("dead", "dead.example", "dead"),
        mesh_tests::gateway::tls_secret_yaml("certs", &cert, &key)
    );
    Ok((routes, cert))
}

/// A TCP server on `addr` that sends back every byte it reads.
async fn tcp_echo_server(addr: &str) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    }))
}

/// Writes `size` patterned bytes into `io` while reading them back; fails if any differ.
async fn echoed<S>(io: S, size: usize) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(io);
    let sent = data.clone();
    let writer = async move {
        w.write_all(&sent).await?;
        w.flush().await?;
        anyhow::Ok(w)
    };
    let reader = async {
        let mut got = vec![0u8; size];
        r.read_exact(&mut got).await?;
        anyhow::Ok(got)
    };
    let (w, got) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::try_join!(writer, reader)
    })
    .await
    .context("the echo did not come back within 10 s")??;
    drop(w);
    ensure!(got == data, "the tunnel changed the bytes");
    Ok(())
}

/// Sends an HTTP/1.1 `CONNECT` for `target` on a new connection; returns the status line and
/// the connection (positioned after the answer's head).
async fn h1_connect(port: u16, target: &str) -> Result<(String, tokio::net::TcpStream)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    // Byte by byte up to the head's end, so no tunnelled byte is read here.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .context("no answer to CONNECT within 10 s")??;
        ensure!(n == 1, "the gateway closed before answering: {head:?}");
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    Ok((status, s))
}

/// An HTTP/2 connection over TLS (ALPN h2) to the gateway, trusting `cert`.
async fn h2_over_tls(
    port: u16,
    name: &str,
    cert: &rcgen::Certificate,
) -> Result<hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>> {
    let tls = mesh_tests::gateway::tls_client(port, name, &[cert], b"h2").await?;
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await?;
    tokio::spawn(conn);
    Ok(sender)
}

#[test]
fn connect_tunnels_over_http1_and_http2_and_websocket_over_http2() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (port, tls_port) = (18_454, 18_455);
        // Service tcp: 127.0.31.4 refuses (nothing listens), 127.0.31.5 echoes.
        let echo = tcp_echo_server("127.0.31.5:9035").await?;
        let web = Backend::start("web", "127.0.31.6:9035".parse()?).await?;
        let ws = websocket_echo_server("127.0.31.7:9035").await?;
        let dir = tmpdir("connect");
        let (routes, cert) = connect_routes(port, tls_port)?;
        let services = services_yaml(&[
            ("tcp", 80, &["127.0.31.4", "127.0.31.5"], 9035, ""),
            ("web", 80, &["127.0.31.6"], 9035, ""),
            ("ws", 80, &["127.0.31.7"], 9035, ""),
            ("dead", 80, &["127.0.31.8", "127.0.31.9"], 9035, ""),
        ]);
        let gw = GatewayProcess::start(&dir, &routes, &services, &[])?;
        listening(&gw, port).await?;
        listening(&gw, tls_port).await?;
        let result = connect_checks(port, tls_port, &cert, &web).await;
        echo.abort();
        ws.abort();
        result.with_context(|| format!("gateway log: {}", gw.log_text()))
    })
}

async fn connect_checks(
    port: u16,
    tls_port: u16,
    cert: &rcgen::Certificate,
    web: &Backend,
) -> Result<()> {
    // HTTP/1.1 CONNECT: 200, then bytes both ways. Half the picks hit the refusing endpoint
    // first; the connect failure is tried on the other one, so none of these fails.
    for i in 0..20 {
        let (status, s) = h1_connect(port, "tunnel.example:5432").await?;
        ensure!(status.starts_with("HTTP/1.1 200"), "tunnel {i}: {status}");
        echoed(s, if i == 0 { 1 << 20 } else { 4096 }).await?;
    }
    // A real client through the tunnel: curl's proxy tunnel (`-p`) to an HTTP backend.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-p", "-x"])
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("http://web-tunnel.example:8080/through")
        .output()
        .context("running curl")?;
    let body = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && body == "web GET /through",
        "curl through the tunnel: {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        web.hits.load(std::sync::atomic::Ordering::Relaxed) == 1,
        "web backend hits"
    );
    // No rule names CONNECT for this host: 404, and the connection is not a tunnel.
    let (status, _) = h1_connect(port, "plain.example:80").await?;
    ensure!(
        status.starts_with("HTTP/1.1 404"),
        "CONNECT without a CONNECT rule: {status}"
    );
    // Every endpoint refuses: 503 after the retries.
    let (status, _) = h1_connect(port, "dead.example:80").await?;
    ensure!(
        status.starts_with("HTTP/1.1 503"),
        "CONNECT to refusing endpoints: {status}"
    );

    // HTTP/2 CONNECT (no :protocol) over TLS: a stream becomes the tunnel; two at once on
    // one connection.
    let mut h2 = h2_over_tls(tls_port, "tunnel.example", cert).await?;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("tunnel.example:5432")
            .body(http_body_util::Empty::new())?;
        let resp = h2.send_request(req).await?;
        ensure!(resp.status() == 200, "HTTP/2 CONNECT: {}", resp.status());
        streams.push(hyper::upgrade::on(resp).await?);
    }
    for s in streams {
        echoed(hyper_util::rt::TokioIo::new(s), 256 * 1024).await?;
    }
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("plain.example:443")
        .body(http_body_util::Empty::new())?;
    let resp = h2.send_request(req).await?;
    ensure!(
        resp.status() == 404,
        "HTTP/2 CONNECT without a CONNECT rule: {}",
        resp.status()
    );

    // WebSocket over HTTP/2 (extended CONNECT, RFC 8441): the gateway advertises
    // SETTINGS_ENABLE_CONNECT_PROTOCOL (hyper's client refuses to send one otherwise) and
    // turns it into an HTTP/1.1 upgrade to the backend, a real WebSocket server.
    let mut h2 = h2_over_tls(tls_port, "ws.example", cert).await?;
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("https://ws.example/chat")
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::new())?;
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let resp = h2.send_request(req).await?;
    ensure!(resp.status() == 200, "extended CONNECT: {}", resp.status());
    ensure!(
        !resp.headers().contains_key("sec-websocket-accept")
            && !resp.headers().contains_key("upgrade"),
        "HTTP/1.1 handshake headers reached the HTTP/2 client: {:?}",
        resp.headers()
    );
    let stream = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await?);
    let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        stream,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    websocket_messages(ws).await
}

// ---------------------------------------------------------------------------------------------
// h2c backends: `:authority`

#[test]
fn h2c_backends_get_the_clients_authority_or_the_rewritten_one() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let port = 18_456;
        // The harness's echo backend serves h2c too and names the URI it got: over HTTP/2
        // that is `http://{:authority}{:path}`.
        let _g = Backend::start("g", "127.0.31.10:9036".parse()?).await?;
        let routes = format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: gw }}
spec:
  gatewayClassName: mesh
  listeners:
    - {{ name: http, port: {port}, protocol: HTTP }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{ name: g }}
spec:
  parentRefs: [{{ name: gw }}]
  hostnames: [grpc.example]
  rules:
    - matches: [{{ method: {{ service: x.Y }} }}]
      backendRefs: [{{ name: g, port: 80 }}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: rw }}
spec:
  parentRefs: [{{ name: gw }}]
  hostnames: [rw.example]
  rules:
    - filters: [{{ type: URLRewrite, urlRewrite: {{ hostname: internal.example }} }}]
      backendRefs: [{{ name: g, port: 80 }}]
"
        );
        let services = services_yaml(&[("g", 80, &["127.0.31.10"], 9036, "")]);
        let gw = GatewayProcess::start(&tmpdir("authority"), &routes, &services, &[])?;
        listening(&gw, port).await?;
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (mut h2, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await?;
        tokio::spawn(conn);
        for (uri, seen) in [
            // A gRPC route: h2c to the backend with the client's authority.
            (
                "http://grpc.example/x.Y/Call",
                "g POST http://grpc.example/x.Y/Call",
            ),
            // A gRPC body on an HTTPRoute with a hostname rewrite: the rewritten authority.
            (
                "http://rw.example/x.Y/Call",
                "g POST http://internal.example/x.Y/Call",
            ),
        ] {
            let req = http::Request::builder()
                .method(http::Method::POST)
                .uri(uri)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(http_body_util::Empty::<bytes::Bytes>::new())?;
            let resp = h2.send_request(req).await?;
            ensure!(resp.status() == 200, "{uri}: {}", resp.status());
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await?
                .to_bytes();
            ensure!(
                body == seen.as_bytes(),
                "{uri}: the backend saw {:?}, not {seen:?}\ngateway log: {}",
                String::from_utf8_lossy(&body),
                gw.log_text()
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Certificates changed under load

/// A TLS connection (ALPN http/1.1) to `certs.example` on `port`, trusting `roots`; with the
/// certificate the gateway presented.
async fn tls_to(
    port: u16,
    roots: &[rcgen::Certificate],
) -> Result<(
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    Vec<u8>,
)> {
    let roots: Vec<&rcgen::Certificate> = roots.iter().collect();
    let tls = mesh_tests::gateway::tls_client(port, "certs.example", &roots, b"http/1.1").await?;
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate presented")?
        .to_vec();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok((sender, presented))
}

/// One GET on `sender`: its status.
async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) -> Result<u16> {
    sender.ready().await?;
    let req = http::Request::builder()
        .uri("/cert")
        .header("host", "certs.example")
        .body(http_body_util::Empty::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    http_body_util::BodyExt::collect(resp.into_body()).await?;
    Ok(status)
}

#[test]
fn certificates_changed_under_load_fail_no_request() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let port = 18_457;
        let _c = Backend::start("c", "127.0.31.11:9037".parse()?).await?;
        // Three certificates for the same name, each its own self-signed root.
        let mut certs = Vec::new();
        for _ in 0..3 {
            let key = rcgen::KeyPair::generate()?;
            let cert =
                rcgen::CertificateParams::new(vec!["certs.example".into()])?.self_signed(&key)?;
            certs.push((cert, key));
        }
        let roots: Vec<rcgen::Certificate> = certs.iter().map(|(c, _)| c.clone()).collect();
        let services = services_yaml(&[("c", 80, &["127.0.31.11"], 9037, "")]);
        let gw = GatewayProcess::start(
            &tmpdir("certs"),
            &mesh_tests::gateway::tls_route_yaml_with(
                port,
                "certs.example",
                "c",
                &certs[0].0,
                &certs[0].1,
            ),
            &services,
            &["--metrics-addr", "none"],
        )?;
        listening(&gw, port).await?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // One kept-alive connection asking all along: a reload must not cut it.
        let kept = {
            let (stop, roots) = (stop.clone(), roots.clone());
            tokio::spawn(async move {
                let (mut sender, _) = tls_to(port, &roots).await?;
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let st = get_on(&mut sender).await.context("kept-alive request")?;
                    ensure!(st == 200, "kept-alive request {n}: {st}");
                    n += 1;
                }
                anyhow::Ok(n)
            })
        };
        // New connections, each a full handshake: which certificate each got.
        let fresh = {
            let (stop, roots) = (stop.clone(), roots.clone());
            tokio::spawn(async move {
                let mut seen = Vec::<Vec<u8>>::new();
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (mut sender, presented) =
                        tls_to(port, &roots).await.context("new connection")?;
                    let st = get_on(&mut sender)
                        .await
                        .context("request on a new connection")?;
                    ensure!(st == 200, "new connection {n}: {st}");
                    if !seen.contains(&presented) {
                        seen.push(presented);
                    }
                    n += 1;
                }
                anyhow::Ok((n, seen))
            })
        };
        for (cert, key) in &certs[1..] {
            tokio::time::sleep(Duration::from_millis(500)).await;
            gw.set_routes(&mesh_tests::gateway::tls_route_yaml_with(
                port,
                "certs.example",
                "c",
                cert,
                key,
            ))?;
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let kept = kept.await?.with_context(|| gw.log_text())?;
        let (handshakes, seen) = fresh.await?.with_context(|| gw.log_text())?;
        println!(
            "certificates changed twice: {kept} requests on one kept-alive connection and \
             {handshakes} new connections, all 200; {} certificates presented",
            seen.len()
        );
        // The last certificate is what a new connection gets now.
        let (_, now) = tls_to(port, &roots).await?;
        ensure!(
            now == certs[2].0.der().to_vec(),
            "a new handshake after the last change did not present the last certificate"
        );
        ensure!(
            seen.first() == Some(&certs[0].0.der().to_vec()),
            "the first certificate was not presented first"
        );
        ensure!(
            kept > 10 && handshakes > 10,
            "too little load: {kept} / {handshakes}"
        );
        Ok(())
    })
}
