//! The ingress gateway with real third-party clients (issue 10, "What must be shown"): h2load over
//! TLS, a tonic gRPC client against a tonic server (unary, server, client and bidirectional
//! streaming, an error status in the trailers) and a WebSocket client against a WebSocket server
//! (tokio-tungstenite on both ends). The real `mesh-agent gateway` process; no kernel needed.
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
        let listener = tokio::net::TcpListener::bind("127.0.31.3:9033").await?;
        // A real WebSocket server (handshake with Sec-WebSocket-Accept, framing, close) that
        // echoes text as `echo: …` and binary unchanged.
        let server = tokio::spawn(async move {
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
        });
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

async fn websocket_exchange(port: u16) -> Result<()> {
    let (mut ws, resp) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/chat")).await?;
    ensure!(resp.status() == 101, "handshake answer: {}", resp.status());
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
