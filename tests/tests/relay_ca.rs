//! The relay's and the agents' flow-API certificates from the mesh CA, over real TLS 1.3 on
//! loopback with the real CA and `TokenReview` against the kmock API stand-in (no root needed):
//! - the CA's relay rule: a reviewed token of the relay's account gets exactly the relay's id;
//!   the same token asking for any other id, another account's token, and a node agent asking
//!   for the relay's id on behalf of a pod not on its node are refused, each with its reason;
//!   without the rule the relay's token is refused outright;
//! - the flow API's TLS (`relay::tls`) with CA certificates: the relay and the agent accept
//!   each other; a workload certificate of the same CA with another id is refused by the flow
//!   API; a relay that meets an "agent" with another id refuses it; a renewed agent certificate
//!   is presented from the next handshake on, by the same server configuration.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use mesh_agent::{
    discovery::kubernetes::{
        k8s_openapi::api::{
            authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
            core::v1::ServiceAccount,
        },
        kube::{Api, api::PostParams},
    },
    identity::{
        CertProvider as _, SpiffeId,
        auth::{self, CA_AUDIENCE, KubeAuth, NodeAuth},
        ca::{self, CaMaterial, CertificateAuthority, Lifetimes},
        client::{CaClient, CaClientError, CaEndpoint, TokenSource},
        csr,
        manager::{IdentityManager, ManagerConfig},
        server::CaServer,
    },
    model::ObjectName,
    relay::tls::{self, CaCredentials, Credentials},
};
use mesh_tests::kmock::Kmock;
use rustls_pki_types::{CertificateDer, ServerName};

const TD: &str = "cluster.local";

fn work_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-relay-ca-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// kmock with the agent of node-a, the relay (on node-b) and a workload (on node-a).
fn start_kmock(dir: &Path) -> Kmock {
    let preload = dir.join("objects.jsonl");
    let pod = |ns: &str, name: &str, node: &str, sa: &str| {
        serde_json::json!({"resource": "v1/pods", "object": {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []}
        }})
        .to_string()
    };
    std::fs::write(
        &preload,
        [
            pod("mesh-system", "mesh-agent-a", "node-a", "mesh-agent"),
            pod("mesh-system", "mesh-relay-0", "node-b", "mesh-relay"),
            pod("shop", "web-0", "node-a", "web"),
        ]
        .join("\n"),
    )
    .unwrap();
    Kmock::start(dir, Some(&preload)).unwrap()
}

/// A projected token of `sa` bound to pod `pod` of `ns`, as the kubelet mounts it.
async fn mint(
    client: &mesh_agent::discovery::kubernetes::kube::Client,
    ns: &str,
    sa: &str,
    pod: &str,
) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![CA_AUDIENCE.to_owned()],
            bound_object_ref: Some(BoundObjectReference {
                kind: Some("Pod".to_owned()),
                api_version: Some("v1".to_owned()),
                name: Some(pod.to_owned()),
                uid: None,
            }),
            expiration_seconds: Some(3600),
        },
        ..TokenRequest::default()
    };
    api.create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

async fn start_ca(m: &CaMaterial, lifetimes: Lifetimes, auth: NodeAuth) -> CaServer {
    let authority = Arc::new(CertificateAuthority::new(m, None, TD, lifetimes).unwrap());
    CaServer::start(
        "127.0.0.1:0".parse().unwrap(),
        authority,
        auth,
        &["localhost".to_owned()],
    )
    .await
    .unwrap()
}

fn endpoint(addr: SocketAddr, token: TokenSource) -> CaEndpoint {
    CaEndpoint {
        addr: addr.to_string(),
        server_name: "localhost".to_owned(),
        token,
    }
}

/// One request with `token` for `for_id` on behalf of `pod`.
async fn ask(
    addr: SocketAddr,
    token: &str,
    trust: &[CertificateDer<'static>],
    pod: (&str, &str),
    for_id: &SpiffeId,
) -> Result<(), CaClientError> {
    let client = CaClient::new(endpoint(addr, TokenSource::Static(token.to_owned())));
    let key = csr::KeyPair::generate().unwrap();
    let der = csr::request(for_id, &key).unwrap();
    client
        .create_certificate(&ObjectName::new(pod.0, pod.1), for_id, der, None, trust)
        .await
        .map(|_| ())
}

#[test]
fn the_ca_gives_the_relay_account_its_own_id_and_nothing_else() {
    runtime().block_on(async {
        let dir = work_dir("rule");
        let kmock = start_kmock(&dir);
        let client = auth::kube_client(Some(&kmock.kubeconfig(&dir).unwrap()))
            .await
            .unwrap();
        let relay_token = mint(&client, "mesh-system", "mesh-relay", "mesh-relay-0").await;
        let agent_token = mint(&client, "mesh-system", "mesh-agent", "mesh-agent-a").await;
        let other_token = mint(&client, "mesh-system", "default", "mesh-relay-0").await;
        let (m, _) = CaMaterial::load_or_generate(&dir.join("ca"), TD).unwrap();
        let trust = ca::parse_certs("root", &m.cert_pem).unwrap();
        let agents = ObjectName::new("mesh-system", "mesh-agent");
        let relay_account = ObjectName::new("mesh-system", "mesh-relay");
        let server = start_ca(
            &m,
            Lifetimes::default(),
            NodeAuth::Kubernetes(KubeAuth::new(client.clone(), &agents).with_relay(&relay_account)),
        )
        .await;
        let relay = id("mesh-system", "mesh-relay");
        let relay_pod = ("mesh-system", "mesh-relay-0");

        // The relay's own id: signed.
        ask(server.addr, &relay_token, &trust, relay_pod, &relay)
            .await
            .unwrap();
        // The relay's token for anything else: refused, saying what it may get.
        for (what, want, pod) in [
            ("the agents' id", id("mesh-system", "mesh-agent"), relay_pod),
            ("a workload's id", id("shop", "web"), ("shop", "web-0")),
            (
                "another account of its namespace",
                id("mesh-system", "default"),
                relay_pod,
            ),
        ] {
            let e = ask(server.addr, &relay_token, &trust, pod, &want).await;
            let expected = format!(
                "the relay's service account mesh-system/mesh-relay may get only {relay}, not {want}"
            );
            assert!(
                matches!(&e, Err(CaClientError::Denied(m)) if m.contains(&expected)),
                "{what}: {e:?}"
            );
        }
        // Another account's valid token: not a node agent, not the relay.
        let e = ask(server.addr, &other_token, &trust, relay_pod, &relay).await;
        assert!(
            matches!(&e, Err(CaClientError::Unauthenticated(m))
                if m.contains("system:serviceaccount:mesh-system:default")
                && m.contains("neither the node agents'")
                && m.contains("nor the relay's system:serviceaccount:mesh-system:mesh-relay")),
            "{e:?}"
        );
        // A node agent asking for the relay's id: the ordinary pod check, and the relay's pod is
        // not on its node.
        let e = ask(server.addr, &agent_token, &trust, relay_pod, &relay).await;
        assert!(
            matches!(&e, Err(CaClientError::Denied(m)) if m.contains("node-b") && m.contains("node-a")),
            "{e:?}"
        );
        // The agent's own pod: the ordinary workload path gives it its flow-API id.
        ask(
            server.addr,
            &agent_token,
            &trust,
            ("mesh-system", "mesh-agent-a"),
            &id("mesh-system", "mesh-agent"),
        )
        .await
        .unwrap();
        assert_eq!(server.counters.signed.load(Ordering::Relaxed), 2);
        assert_eq!(server.counters.denied.load(Ordering::Relaxed), 4);
        assert_eq!(server.counters.unauthenticated.load(Ordering::Relaxed), 1);
        server.shutdown().await;

        // Without the rule (`--relay-service-account none`) the relay's token is no credential.
        let plain = start_ca(
            &m,
            Lifetimes::default(),
            NodeAuth::Kubernetes(KubeAuth::new(client.clone(), &agents)),
        )
        .await;
        let e = ask(plain.addr, &relay_token, &trust, relay_pod, &relay).await;
        assert!(
            matches!(&e, Err(CaClientError::Unauthenticated(m))
                if m.contains("not the node agents' system:serviceaccount:mesh-system:mesh-agent")),
            "{e:?}"
        );
        plain.shutdown().await;
        drop(kmock);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// A manager for exactly `who` on behalf of `pod`, with `token`.
fn manager(
    ca: SocketAddr,
    trust: &[CertificateDer<'static>],
    token: &str,
    pod: (&str, &str),
    who: &SpiffeId,
) -> IdentityManager {
    let m = IdentityManager::new(
        ManagerConfig::new(TD, trust.to_vec()),
        endpoint(ca, TokenSource::Static(token.to_owned())),
    );
    m.set_workloads(&BTreeMap::from([(
        ObjectName::new(pod.0, pod.1),
        who.clone(),
    )]));
    m
}

/// What one side of a handshake saw of the other: its SPIFFE id and certificate serial.
#[derive(Debug, PartialEq, Eq)]
struct Peer {
    id: SpiffeId,
    serial: String,
}

fn peer(certs: Option<&[CertificateDer<'static>]>) -> Result<Peer, String> {
    let leaf = certs
        .and_then(<[_]>::first)
        .ok_or_else(|| "no peer certificate".to_owned())?;
    Ok(Peer {
        id: mesh_agent::proxy::tls::spiffe_id_of(leaf).map_err(|e| e.to_string())?,
        serial: ca::cert_facts(leaf)?.2,
    })
}

/// Accepts one connection with `config`, answers `ping` with `pong`; the client it saw.
fn serve_once(
    listener: &TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> std::thread::JoinHandle<Result<Peer, String>> {
    let listener = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
        tls.write_all(b"pong").map_err(|e| e.to_string())?;
        tls.flush().map_err(|e| e.to_string())?;
        peer(tls.conn.peer_certificates())
    })
}

/// Connects with `config`, sends `ping`, reads `pong`; the server it saw.
fn call(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Peer, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from(tls::DEFAULT_SERVER_NAME).unwrap();
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"ping").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
    peer(tls.conn.peer_certificates())
}

/// One exchange: the client's view and the server's.
async fn exchange(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
) -> (Result<Peer, String>, Result<Peer, String>) {
    tokio::task::spawn_blocking(move || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = serve_once(&listener, server_config);
        let called = call(addr, client_config);
        (called, accepted.join().unwrap())
    })
    .await
    .unwrap()
}

async fn until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one story: the CA, three identities, four handshakes, a renewal"
)]
fn flow_api_tls_checks_both_ids_and_presents_the_renewed_certificate() {
    runtime().block_on(async {
        let dir = work_dir("tls");
        let kmock = start_kmock(&dir);
        let client = auth::kube_client(Some(&kmock.kubeconfig(&dir).unwrap()))
            .await
            .unwrap();
        let relay_token = mint(&client, "mesh-system", "mesh-relay", "mesh-relay-0").await;
        let agent_token = mint(&client, "mesh-system", "mesh-agent", "mesh-agent-a").await;
        let (m, _) = CaMaterial::load_or_generate(&dir.join("ca"), TD).unwrap();
        let trust = ca::parse_certs("root", &m.cert_pem).unwrap();
        // Six-second certificates: renewed about every three seconds.
        let ttl = Duration::from_secs(6);
        let server = start_ca(
            &m,
            Lifetimes {
                default: ttl,
                max: ttl,
            },
            NodeAuth::Kubernetes(
                KubeAuth::new(
                    client.clone(),
                    &ObjectName::new("mesh-system", "mesh-agent"),
                )
                .with_relay(&ObjectName::new("mesh-system", "mesh-relay")),
            ),
        )
        .await;
        let agent_id = id("mesh-system", "mesh-agent");
        let relay_id = id("mesh-system", "mesh-relay");
        let web_id = id("shop", "web");
        let agent = manager(
            server.addr,
            &trust,
            &agent_token,
            ("mesh-system", "mesh-agent-a"),
            &agent_id,
        );
        let relay = manager(
            server.addr,
            &trust,
            &relay_token,
            ("mesh-system", "mesh-relay-0"),
            &relay_id,
        );
        // A workload of the same CA (what a compromised pod or node could present).
        let web = manager(
            server.addr,
            &trust,
            &agent_token,
            ("shop", "web-0"),
            &web_id,
        );
        for (m, who) in [(&agent, &agent_id), (&relay, &relay_id), (&web, &web_id)] {
            until("the three certificates", Duration::from_secs(20), || {
                m.workload(who)
            })
            .await;
        }
        let creds = |m: &IdentityManager, who: &SpiffeId| -> Arc<dyn Credentials> {
            Arc::new(CaCredentials::new(m.clone(), who.clone()))
        };
        // The agent's flow API and the relay's client, as `mesh-agent` and `mesh-agent relay`
        // build them in mesh CA mode.
        let flow_api =
            Arc::new(tls::server_config(creds(&agent, &agent_id), Some(relay_id.clone())).unwrap());
        let relay_client =
            Arc::new(tls::client_config(creds(&relay, &relay_id), Some(agent_id.clone())).unwrap());

        let (seen_by_relay, seen_by_agent) =
            exchange(Arc::clone(&flow_api), Arc::clone(&relay_client)).await;
        let first = seen_by_relay.unwrap();
        assert_eq!(first.id, agent_id);
        assert_eq!(seen_by_agent.unwrap().id, relay_id);

        // A workload certificate of the same CA is not the relay's: the flow API refuses it.
        let web_client =
            Arc::new(tls::client_config(creds(&web, &web_id), Some(agent_id.clone())).unwrap());
        let (called, accepted) = exchange(Arc::clone(&flow_api), web_client).await;
        let e = accepted.unwrap_err();
        assert!(
            e.contains(&format!(
                "client identity {web_id} is not the expected {relay_id}"
            )),
            "{e}"
        );
        assert!(called.is_err(), "the workload got an answer: {called:?}");

        // A relay meeting an "agent" with another id (a workload serving on 4244) refuses it.
        let fake_agent =
            Arc::new(tls::server_config(creds(&web, &web_id), Some(relay_id.clone())).unwrap());
        let (called, _) = exchange(fake_agent, Arc::clone(&relay_client)).await;
        let e = called.unwrap_err();
        assert!(
            e.contains(&format!(
                "agent identity {web_id} is not the expected {agent_id}"
            )),
            "{e}"
        );

        // Rotation without restart: once the agent's certificate is renewed, the same flow API
        // configuration presents the new one at the next handshake.
        until(
            "the agent's certificate renewed",
            Duration::from_secs(20),
            || {
                agent
                    .workload(&agent_id)
                    .filter(|c| c.serial != first.serial)
            },
        )
        .await;
        let (seen_by_relay, seen_by_agent) = exchange(flow_api, relay_client).await;
        let second = seen_by_relay.unwrap();
        assert_eq!(second.id, agent_id);
        assert_ne!(
            second.serial, first.serial,
            "the old certificate was presented"
        );
        assert_eq!(seen_by_agent.unwrap().id, relay_id);
        drop((agent, relay, web));
        server.shutdown().await;
        drop(kmock);
        let _ = std::fs::remove_dir_all(&dir);
    });
}
