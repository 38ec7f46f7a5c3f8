//! In-process HBONE tests: real TLS and HTTP/2 over real loopback TCP, certificates from an rcgen
//! CA. The transparent (original source) path needs namespaces: `tests/tests/hbone.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::client::ConnectError;
use super::connect::SourceInfo;
use super::stats::Direction;
use super::testing::{StaticCertProvider, TestCa, Validity};
use super::tls::{client_config, sni_for};
use super::*;
use crate::drain::Drain;

const TD: &str = "cluster.local";

fn id(s: &str) -> SpiffeId {
    format!("spiffe://{TD}/{s}").parse().unwrap()
}

/// A "pod" on loopback: reads to EOF, answers `echo:<what it read>`, closes. Counts accepts.
async fn echo_pod() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    let mut reply = b"echo:".to_vec();
                    reply.extend_from_slice(&buf);
                    let _ = s.write_all(&reply).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    (addr, accepted)
}

struct OneWorkload(SpiffeId);
impl LocalWorkloads for OneWorkload {
    fn identity_of(&self, pod: std::net::IpAddr) -> Option<SpiffeId> {
        pod.is_loopback().then(|| self.0.clone())
    }
}

struct Env {
    ca: TestCa,
    client_certs: Arc<StaticCertProvider>,
    server_certs: Arc<StaticCertProvider>,
    client: Arc<HboneClient>,
    server_stats: Arc<ProxyStats>,
    hbone: SocketAddr,
    pod: SocketAddr,
    pod_accepts: Arc<AtomicUsize>,
    src: SpiffeId,
    dst: SpiffeId,
    _drain: Drain,
}

async fn env_with(authorizer: Arc<dyn Authorizer>) -> Env {
    let ca = TestCa::new("mesh root").unwrap();
    let (src, dst) = (id("ns/a/sa/client"), id("ns/b/sa/server"));
    let client_certs = StaticCertProvider::new(TD, ca.roots().unwrap());
    client_certs.insert(ca.issue(&src).unwrap());
    let server_certs = StaticCertProvider::new(TD, ca.roots().unwrap());
    server_certs.insert(ca.issue(&dst).unwrap());
    let (pod, pod_accepts) = echo_pod().await;
    let server_stats = ProxyStats::new();
    let server = InboundServer::new(
        server_certs.clone(),
        authorizer,
        Arc::new(OneWorkload(dst.clone())),
        server_stats.clone(),
        InboundConfig {
            transparent: false,
            ..InboundConfig::default()
        },
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone = listener.local_addr().unwrap();
    let drain = Drain::new(Duration::from_secs(1));
    tokio::spawn(server.serve(listener, drain.watch()));
    let client = HboneClient::new(
        client_certs.clone(),
        ProxyStats::new(),
        ClientConfig {
            max_streams_per_conn: 100,
            ..ClientConfig::default()
        },
    );
    Env {
        ca,
        client_certs,
        server_certs,
        client,
        server_stats,
        hbone,
        pod,
        pod_accepts,
        src,
        dst,
        _drain: drain,
    }
}

async fn env() -> Env {
    env_with(Arc::new(AllowAll)).await
}

impl Env {
    async fn open(&self) -> Result<HboneStream, ConnectError> {
        self.client
            .connect(
                &self.src,
                self.pod,
                self.hbone,
                &self.dst,
                &SourceInfo::default(),
            )
            .await
    }
}

/// Sends `data`, half-closes, reads everything back until the peer's `END_STREAM`.
async fn exchange(mut s: HboneStream, data: &[u8]) -> Vec<u8> {
    s.send.reserve_capacity(data.len());
    s.send
        .send_data(Bytes::copy_from_slice(data), true)
        .unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = s.recv.data().await {
        let chunk = chunk.unwrap();
        let _ = s.recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    out
}

fn counter(stats: &ProxyStats, name: &str) -> u64 {
    stats
        .counters
        .snapshot()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap()
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_share_one_pooled_connection_with_half_close() {
    let env = env().await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let stream = env.open();
        let payload = format!("hello {i}").repeat(1_000);
        tasks.push(async move {
            (
                exchange(stream.await.unwrap(), payload.as_bytes()).await,
                payload,
            )
        });
    }
    for (got, sent) in futures::future::join_all(tasks).await {
        assert_eq!(got, format!("echo:{sent}").into_bytes());
    }
    let out: Vec<_> = env
        .client
        .stats()
        .tunnels()
        .into_iter()
        .filter(|t| t.direction == Direction::Outbound)
        .collect();
    assert_eq!(out.len(), 1, "one pooled connection: {out:?}");
    assert_eq!(out[0].streams_total, 40);
    assert_eq!(out[0].source, env.src);
    assert_eq!(out[0].destination, env.dst);
    assert_eq!(env.pod_accepts.load(Ordering::SeqCst), 40);
    assert_eq!(counter(&env.server_stats, "inbound_streams"), 40);
    assert_eq!(counter(&env.server_stats, "inbound_connections"), 1);
}

#[tokio::test]
async fn the_stream_cap_opens_another_connection() {
    let env = env().await;
    let client = HboneClient::new(
        env.client_certs.clone(),
        ProxyStats::new(),
        ClientConfig {
            max_streams_per_conn: 2,
            ..ClientConfig::default()
        },
    );
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(
            client
                .connect(
                    &env.src,
                    env.pod,
                    env.hbone,
                    &env.dst,
                    &SourceInfo::default(),
                )
                .await
                .unwrap(),
        );
    }
    assert_eq!(client.stats().tunnels().len(), 3);
    for s in open {
        assert_eq!(exchange(s, b"x").await, b"echo:x");
    }
}

#[tokio::test]
async fn an_idle_pooled_connection_is_released() {
    let env = env().await;
    let client = HboneClient::new(
        env.client_certs.clone(),
        ProxyStats::new(),
        ClientConfig {
            idle_timeout: Duration::from_millis(200),
            ..ClientConfig::default()
        },
    );
    let info = SourceInfo::default();
    let s = client
        .connect(&env.src, env.pod, env.hbone, &env.dst, &info)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // In use: kept however long it has been open.
    assert_eq!(exchange(s, b"a").await, b"echo:a");
    assert_eq!(client.stats().tunnels().len(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Idle: released; the next stream dials a new connection.
    let s = client
        .connect(&env.src, env.pod, env.hbone, &env.dst, &info)
        .await
        .unwrap();
    assert_eq!(exchange(s, b"b").await, b"echo:b");
    assert_eq!(counter(&env.server_stats, "inbound_connections"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_does_not_read_stalls_the_sender() {
    let env = env().await;
    // A pod that reads nothing until told, then counts everything to EOF.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pod = listener.local_addr().unwrap();
    let go = Arc::new(tokio::sync::Notify::new());
    let (total_tx, total_rx) = tokio::sync::oneshot::channel();
    let start = go.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        start.notified().await;
        let mut n = 0_usize;
        let mut buf = vec![0; 1 << 16];
        loop {
            match s.read(&mut buf).await.unwrap() {
                0 => break,
                k => n += k,
            }
        }
        let _ = total_tx.send(n);
    });
    let mut s = env
        .client
        .connect(&env.src, pod, env.hbone, &env.dst, &SourceInfo::default())
        .await
        .unwrap();
    let chunk = Bytes::from(vec![1_u8; 64 * 1024]);
    let mut sent = 0_usize;
    loop {
        s.send.reserve_capacity(chunk.len());
        let cap = tokio::time::timeout(
            Duration::from_secs(1),
            std::future::poll_fn(|cx| s.send.poll_capacity(cx)),
        )
        .await;
        let Ok(Some(Ok(cap))) = cap else { break };
        if cap == 0 {
            continue;
        }
        s.send
            .send_data(chunk.slice(..cap.min(chunk.len())), false)
            .unwrap();
        sent += cap.min(chunk.len());
        assert!(
            sent < 64 << 20,
            "64 MiB accepted by a tunnel whose pod reads nothing"
        );
    }
    // Held somewhere: our send window (4 MiB), the inbound side's unreleased DATA (at most one
    // window) and the kernel's socket buffers; nothing grows without bound.
    assert!(sent >= 1 << 20, "stalled too early: {sent}");
    assert!(
        sent < 32 << 20,
        "{sent} bytes accepted while the pod reads nothing"
    );
    go.notify_one();
    s.send.send_data(Bytes::new(), true).unwrap();
    assert_eq!(total_rx.await.unwrap(), sent);
}

/// The server of the first pooled connection sends GOAWAY (it drains); the next stream must not
/// fail on it but go over a new connection.
#[tokio::test]
async fn a_stream_on_a_connection_going_away_is_retried_on_a_new_one() {
    let env = env().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(
        super::tls::server_config(env.server_certs.clone()).unwrap(),
    ));
    let real = InboundServer::new(
        env.server_certs.clone(),
        Arc::new(AllowAll),
        Arc::new(OneWorkload(env.dst.clone())),
        env.server_stats.clone(),
        InboundConfig {
            transparent: false,
            ..InboundConfig::default()
        },
    )
    .unwrap();
    let drain = Drain::new(Duration::from_secs(1));
    let watch = drain.watch();
    tokio::spawn(async move {
        // First connection: answer one CONNECT, then GOAWAY (keeping that stream).
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(tls.accept(tcp).await.unwrap())
            .await
            .unwrap();
        let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
        let open_stream = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        conn.graceful_shutdown();
        tokio::spawn(async move {
            while conn.accept().await.is_some() {}
            drop(open_stream);
        });
        // Every later connection: the real inbound server.
        real.serve(listener, watch).await;
    });
    let info = SourceInfo::default();
    let first = env
        .client
        .connect(&env.src, env.pod, addr, &env.dst, &info)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = env
        .client
        .connect(&env.src, env.pod, addr, &env.dst, &info)
        .await
        .unwrap();
    assert_eq!(exchange(second, b"again").await, b"echo:again");
    assert_eq!(counter(&env.server_stats, "inbound_streams"), 1);
    drop(first);
}

struct FixedDst(Redirect);
impl OriginalDst for FixedDst {
    fn lookup(&self, _: SocketAddr) -> Option<Redirect> {
        Some(self.0.clone())
    }
}

#[tokio::test]
async fn the_outbound_listener_tunnels_a_captured_connection() {
    let env = env().await;
    let redirect = Redirect {
        dst_pod: env.pod,
        service: None,
        dst_node: env.hbone,
        dst_identity: env.dst.clone(),
        src_identity: env.src.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let drain = Drain::new(Duration::from_secs(1));
    tokio::spawn(
        OutboundListener::new(env.client.clone(), Arc::new(FixedDst(redirect)))
            .serve(listener, drain.watch()),
    );
    let mut app = TcpStream::connect(addr).await.unwrap();
    let big = vec![7_u8; 3 * 1024 * 1024];
    app.write_all(&big).await.unwrap();
    app.shutdown().await.unwrap();
    let mut back = Vec::new();
    app.read_to_end(&mut back).await.unwrap();
    assert_eq!(&back[..5], b"echo:");
    assert_eq!(back.len(), 5 + big.len());
    let t = &env.client.stats().tunnels()[0];
    assert_eq!(t.bytes_sent, big.len() as u64);
    assert_eq!(t.bytes_received, 5 + big.len() as u64);
}

#[tokio::test]
async fn a_pod_reset_resets_the_stream() {
    let env = env().await;
    // A pod that resets every connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pod = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            // After the first bytes, so the inbound side has connected and answered 200.
            let _ = s.read(&mut [0; 16]).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let mut s = env
        .client
        .connect(&env.src, pod, env.hbone, &env.dst, &SourceInfo::default())
        .await
        .unwrap();
    s.send.send_data(Bytes::from_static(b"hi"), false).unwrap();
    let err = loop {
        match s.recv.data().await {
            Some(Ok(_)) => {}
            Some(Err(e)) => break e,
            None => panic!("orderly end instead of a reset"),
        }
    };
    assert!(err.is_reset(), "{err}");
}

#[tokio::test]
async fn plaintext_to_the_hbone_port_is_refused() {
    let env = env().await;
    let mut tcp = TcpStream::connect(env.hbone).await.unwrap();
    tcp.write_all(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    assert!(!buf.windows(4).any(|w| w == b"echo"));
    assert_eq!(counter(&env.server_stats, "inbound_tls_failed"), 1);
    assert_eq!(env.pod_accepts.load(Ordering::SeqCst), 0);
}

async fn refused_client_cert(
    make: impl FnOnce(&TestCa, &SpiffeId) -> Arc<crate::identity::WorkloadCert>,
) {
    let env = env().await;
    env.client_certs.insert(make(&env.ca, &env.src));
    let err = match env.open().await {
        Err(e) => e,
        Ok(s) => panic!("accepted: {s:?}"),
    };
    // TLS 1.3: the client may learn of the refusal only after its own handshake finished.
    assert!(
        matches!(
            err,
            ConnectError::Handshake { .. } | ConnectError::H2 { .. }
        ),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(counter(&env.server_stats, "inbound_tls_failed"), 1);
    assert_eq!(counter(&env.server_stats, "inbound_streams"), 0);
    assert_eq!(env.pod_accepts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    refused_client_cert(|_, src| {
        TestCa::new("someone else's root")
            .unwrap()
            .issue(src)
            .unwrap()
    })
    .await;
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    refused_client_cert(|ca, src| {
        ca.issue_with_uri(src, &src.to_string(), Validity::Expired)
            .unwrap()
    })
    .await;
}

#[tokio::test]
async fn a_client_certificate_of_another_trust_domain_is_refused() {
    refused_client_cert(|ca, _| {
        let foreign: SpiffeId = "spiffe://evil.example/ns/a/sa/client".parse().unwrap();
        let mut cert = ca.issue(&foreign).unwrap();
        // The provider files it under the id the client will ask for.
        let c = Arc::get_mut(&mut cert).unwrap();
        c.id = id("ns/a/sa/client");
        cert
    })
    .await;
}

#[tokio::test]
async fn a_server_certificate_with_the_wrong_san_is_refused_by_the_client() {
    let env = env().await;
    let dst = env.dst.clone();
    env.server_certs.insert(
        env.ca
            .issue_with_uri(
                &dst,
                "spiffe://cluster.local/ns/b/sa/impostor",
                Validity::Long,
            )
            .unwrap(),
    );
    let err = env.open().await.unwrap_err();
    assert!(matches!(err, ConnectError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("is not the expected"), "{err}");
    assert_eq!(counter(env.client.stats(), "outbound_tls_failed"), 1);
    assert_eq!(env.pod_accepts.load(Ordering::SeqCst), 0);
}

/// Opens TLS + HTTP/2 by hand and sends a CONNECT with an arbitrary authority.
async fn raw_connect(env: &Env, authority: &str) -> StatusCode {
    let tls = client_config(&*env.client_certs, &env.src, &env.dst).unwrap();
    let tcp = TcpStream::connect(env.hbone).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(sni_for(&env.dst).unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap();
    let (resp, _body) = send.send_request(req, false).unwrap();
    resp.await.unwrap().status()
}

#[tokio::test]
async fn a_malformed_authority_gets_400_and_reaches_no_pod() {
    let env = env().await;
    assert_eq!(
        raw_connect(&env, "example.com:80").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        raw_connect(&env, "127.0.0.1:0").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(counter(&env.server_stats, "inbound_bad_request"), 2);
    // A well-formed address that is not a pod of this node with the asked identity.
    assert_eq!(
        raw_connect(&env, "10.9.9.9:80").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(counter(&env.server_stats, "inbound_wrong_workload"), 1);
    assert_eq!(env.pod_accepts.load(Ordering::SeqCst), 0);
    let ok = raw_connect(&env, &env.pod.to_string()).await;
    assert_eq!(ok, StatusCode::OK);
}

#[tokio::test]
async fn an_authorization_denial_gets_401_and_reaches_no_pod() {
    let deny_client = |src: &SpiffeId, _: &SpiffeId, _: SocketAddr| {
        if src.service_account() == "client" {
            Err(Denied {
                reason: "DENY policy test/deny-client".to_owned(),
            })
        } else {
            Ok(())
        }
    };
    let env = env_with(Arc::new(deny_client)).await;
    match env.open().await.unwrap_err() {
        ConnectError::Refused { status, .. } => assert_eq!(status, StatusCode::UNAUTHORIZED),
        e => panic!("{e}"),
    }
    assert_eq!(counter(&env.server_stats, "inbound_denied"), 1);
    assert_eq!(counter(env.client.stats(), "outbound_refused"), 1);
    assert_eq!(env.pod_accepts.load(Ordering::SeqCst), 0);
}

/// Denies every connection that does not come from `node` (the agent's check: the client
/// identity must run on the calling node).
struct OnlyFrom(std::net::IpAddr);

impl Authorizer for OnlyFrom {
    fn authorize(&self, _: &SpiffeId, _: &SpiffeId, _: SocketAddr) -> Result<(), Denied> {
        Ok(())
    }

    fn check_peer(
        &self,
        source: &SpiffeId,
        node: std::net::IpAddr,
        _: Option<std::net::IpAddr>,
    ) -> Result<(), Denied> {
        if node == self.0 {
            Ok(())
        } else {
            Err(Denied {
                reason: format!("no pod of {node} has identity {source}"),
            })
        }
    }
}

#[tokio::test]
async fn a_certificate_used_from_another_node_gets_401_and_reaches_no_pod() {
    let env = env_with(Arc::new(OnlyFrom("192.0.2.1".parse().unwrap()))).await;
    match env.open().await.unwrap_err() {
        ConnectError::Refused { status, .. } => assert_eq!(status, StatusCode::UNAUTHORIZED),
        e => panic!("{e}"),
    }
    assert_eq!(counter(&env.server_stats, "inbound_wrong_node"), 1);
    assert_eq!(counter(&env.server_stats, "inbound_denied"), 0);
    assert_eq!(env.pod_accepts.load(Ordering::SeqCst), 0);
    // From the node the identity runs on (the test's loopback), admitted.
    let env = env_with(Arc::new(OnlyFrom("127.0.0.1".parse().unwrap()))).await;
    env.open().await.expect("admitted from its own node");
}

#[tokio::test]
async fn an_unreachable_pod_gets_503() {
    let env = env().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    match env
        .client
        .connect(
            &env.src,
            closed,
            env.hbone,
            &env.dst,
            &SourceInfo::default(),
        )
        .await
        .unwrap_err()
    {
        ConnectError::Refused { status, .. } => {
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        }
        e => panic!("{e}"),
    }
    assert_eq!(counter(&env.server_stats, "inbound_unreachable"), 1);
}

#[tokio::test]
async fn drain_stops_accepting_but_lets_open_streams_finish() {
    let env = env().await;
    // A second server we can drain.
    let drain = Drain::new(Duration::from_secs(5));
    let server = InboundServer::new(
        env.server_certs.clone(),
        Arc::new(AllowAll),
        Arc::new(OneWorkload(env.dst.clone())),
        ProxyStats::new(),
        InboundConfig {
            transparent: false,
            ..InboundConfig::default()
        },
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, drain.watch()));
    let mut open = env
        .client
        .connect(&env.src, env.pod, addr, &env.dst, &SourceInfo::default())
        .await
        .unwrap();
    let drained = tokio::spawn(async move { drain.drain().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!drained.is_finished(), "the open stream holds the drain");
    open.send
        .send_data(Bytes::from_static(b"late"), true)
        .unwrap();
    let mut got = Vec::new();
    while let Some(c) = open.recv.data().await {
        got.extend_from_slice(&c.unwrap());
    }
    assert_eq!(got, b"echo:late");
    drop(open);
    assert_eq!(drained.await.unwrap(), crate::drain::DrainOutcome::Complete);
    // No longer accepting: a new connection is refused or never served.
    let info = SourceInfo::default();
    let fresh = env.client.connect(&env.src, env.pod, addr, &env.dst, &info);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), fresh)
            .await
            .map_or(true, |r| r.is_err())
    );
}

/// A loopback port free at the time of asking (workers bind it several times with
/// `SO_REUSEPORT`, so it cannot be port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `start` with two workers: connections spread over both workers' listeners and pools, each
/// carried end to end; the drain waits for a stream open on either worker and completes when it
/// ends (a worker's own handle on the drain must not hold it up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_the_ports_keep_their_own_pools_and_drain_together() {
    let ca = TestCa::new("mesh root").unwrap();
    let (src, dst) = (id("ns/a/sa/client"), id("ns/b/sa/server"));
    let certs = StaticCertProvider::new(TD, ca.roots().unwrap());
    certs.insert(ca.issue(&src).unwrap());
    certs.insert(ca.issue(&dst).unwrap());
    let (pod, pod_accepts) = echo_pod().await;
    let (out_port, in_port) = (free_port(), free_port());
    let hbone = SocketAddr::from(([127, 0, 0, 1], in_port));
    let redirect = Redirect {
        dst_pod: pod,
        service: None,
        dst_node: hbone,
        dst_identity: dst.clone(),
        src_identity: src,
    };
    let drain = Drain::new(Duration::from_secs(10));
    let proxies = start(
        ProxyParts {
            provider: certs,
            authorizer: Arc::new(AllowAll),
            workloads: Arc::new(OneWorkload(dst)),
            stats: ProxyStats::new(),
            outbound: vec![(
                SocketAddr::from(([127, 0, 0, 1], out_port)),
                Arc::new(move |_| Some(redirect.clone())),
            )],
            inbound_addr: hbone,
            client: ClientConfig::default(),
            inbound: InboundConfig {
                transparent: false,
                ..InboundConfig::default()
            },
            workers: 2,
        },
        &drain,
    )
    .unwrap();
    assert_eq!(proxies.clients.len(), 2);
    let outbound = SocketAddr::from(([127, 0, 0, 1], out_port));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..32 {
        calls.spawn(async move {
            let mut s = TcpStream::connect(outbound).await.unwrap();
            s.write_all(format!("hi {i}").as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).await.unwrap();
            assert_eq!(reply, format!("echo:hi {i}"));
        });
    }
    while let Some(r) = calls.join_next().await {
        r.unwrap();
    }
    // 32 connections hashed over two listeners all on one: odds 2^-31.
    for (i, c) in proxies.clients.iter().enumerate() {
        assert!(c.connections() >= 1, "worker {i} carried no connection");
    }
    // A stream held open across the drain signal.
    let mut held = TcpStream::connect(outbound).await.unwrap();
    held.write_all(b"late").await.unwrap();
    // Carried through to the pod before the drain starts.
    while pod_accepts.load(Ordering::SeqCst) < 33 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let draining = tokio::spawn(async move { drain.drain().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !draining.is_finished(),
        "the drain did not wait for the open stream"
    );
    held.shutdown().await.unwrap();
    let mut reply = String::new();
    held.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "echo:late");
    drop(held);
    let outcome = tokio::time::timeout(Duration::from_secs(5), draining)
        .await
        .expect("the drain ends once the stream has")
        .unwrap();
    assert_eq!(outcome, crate::drain::DrainOutcome::Complete);
    drop(proxies);
}
