//! The CA and the agents' identity manager over real TLS 1.3 gRPC on loopback sockets: a node gets
//! certificates for its own pods' identities and is refused (`PERMISSION_DENIED`, counted) for
//! others; unauthenticated nodes are refused (static bootstrap tokens, and Kubernetes
//! `TokenReview` against the kmock API stand-in); certificates renew at half-life across a CA
//! restart; a root rotation's overlap keeps old and new certificates verifying; an intermediate
//! under the user's own root chains to that root. Not kernel tests (no root needed), except
//! `agent_binary_gets_renews_and_lists_certificates`, which runs the binaries on a harness node.

// Each test is one scenario told in order; splitting it would hide the story.
#![allow(clippy::too_many_lines)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use mesh_agent::{
    discovery::{
        file,
        kubernetes::{
            k8s_openapi::api::{
                authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
                core::v1::ServiceAccount,
            },
            kube::{Api, api::PostParams},
        },
    },
    identity::{
        CertProvider as _, SpiffeId,
        auth::{self, CA_AUDIENCE, KubeAuth, NodeAuth, StaticAuth},
        ca::{self, CaMaterial, CertificateAuthority, Lifetimes},
        client::{CaClient, CaClientError, CaEndpoint, TokenSource},
        csr,
        manager::{CertState, IdentityManager, ManagerConfig, local_workloads},
        root_store,
        server::CaServer,
        verify_workload_chain,
    },
    model::ObjectName,
};
use mesh_tests::kmock::Kmock;
use rustls_pki_types::CertificateDer;
use std::os::unix::fs::PermissionsExt as _;

const TD: &str = "cluster.local";

fn work_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-identity-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn roots_of(m: &CaMaterial) -> Vec<CertificateDer<'static>> {
    ca::parse_certs("root", &m.cert_pem).unwrap()
}

/// The static cluster file: node-a runs web-0, web-1 (service account web) and db-0; node-b other-0.
fn write_pods(dir: &Path) -> PathBuf {
    let path = dir.join("cluster.yaml");
    std::fs::write(
        &path,
        "node: node-a\npods:\n\
         - { name: web-0, namespace: shop, node: node-a, serviceAccount: web, ips: [10.1.0.3] }\n\
         - { name: web-1, namespace: shop, node: node-a, serviceAccount: web, ips: [10.1.0.4] }\n\
         - { name: db-0, namespace: shop, node: node-a, serviceAccount: db, ips: [10.1.0.5] }\n\
         - { name: other-0, namespace: shop, node: node-b, serviceAccount: other, ips: [10.2.0.3] }\n",
    )
    .unwrap();
    path
}

fn static_auth(dir: &Path, pods: &Path) -> NodeAuth {
    NodeAuth::Static(StaticAuth::new(
        dir.join(auth::BOOTSTRAP_TOKENS),
        pods.to_owned(),
    ))
}

async fn start_ca(
    listen: SocketAddr,
    m: &CaMaterial,
    extra_roots: Option<&str>,
    lifetimes: Lifetimes,
    auth: NodeAuth,
) -> CaServer {
    let authority = Arc::new(CertificateAuthority::new(m, extra_roots, TD, lifetimes).unwrap());
    // A restart binds the port the agents know; the previous server released it at shutdown.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match CaServer::start(
            listen,
            Arc::clone(&authority),
            auth.clone(),
            &["localhost".to_owned()],
        )
        .await
        {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("CA start retry: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn endpoint(addr: SocketAddr, token: TokenSource) -> CaEndpoint {
    CaEndpoint {
        addr: addr.to_string(),
        server_name: "localhost".to_owned(),
        token,
    }
}

fn short(ttl: Duration) -> Lifetimes {
    Lifetimes {
        default: ttl,
        max: ttl,
    }
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

/// A one-off request as a node would send it (what a compromised or confused agent could try).
async fn ask(
    addr: SocketAddr,
    token: &str,
    trust: &[CertificateDer<'static>],
    pod: (&str, &str),
    for_id: &SpiffeId,
    csr_id: &SpiffeId,
) -> Result<(), CaClientError> {
    let client = CaClient::new(endpoint(addr, TokenSource::Static(token.to_owned())));
    let key = rcgen_key();
    let der = csr::request(csr_id, &key).unwrap();
    client
        .create_certificate(&ObjectName::new(pod.0, pod.1), for_id, der, None, trust)
        .await
        .map(|_| ())
}

fn rcgen_key() -> mesh_agent::identity::csr::KeyPair {
    mesh_agent::identity::csr::KeyPair::generate().unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn static_node_gets_certificates_for_its_own_pods_only() {
    runtime().block_on(async {
        let dir = work_dir("static");
        let pods = write_pods(&dir);
        let (m, generated) = CaMaterial::load_or_generate(&dir.join("ca"), TD).unwrap();
        assert!(generated);
        let mode = std::fs::metadata(dir.join("ca").join(ca::CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key is private");
        let token_a = auth::bootstrap(&dir.join(auth::BOOTSTRAP_TOKENS), "node-a").unwrap();
        let token_b = auth::bootstrap(&dir.join(auth::BOOTSTRAP_TOKENS), "node-b").unwrap();
        assert!(
            !std::fs::read_to_string(dir.join(auth::BOOTSTRAP_TOKENS))
                .unwrap()
                .contains(&token_a),
            "tokens are stored hashed"
        );
        let server = start_ca(
            "127.0.0.1:0".parse().unwrap(),
            &m,
            None,
            Lifetimes::default(),
            static_auth(&dir, &pods),
        )
        .await;
        let anchors = roots_of(&m);

        let manager = IdentityManager::new(
            ManagerConfig::new(TD, anchors.clone()),
            endpoint(server.addr, TokenSource::Static(token_a.clone())),
        );
        let model = file::load(&pods, Some("node-a")).unwrap();
        let workloads = local_workloads(&model, TD);
        assert_eq!(workloads.len(), 3, "node-a's three pods: {workloads:?}");
        manager.set_workloads(&workloads);
        until(
            "both identities' certificates",
            Duration::from_secs(20),
            || {
                let s = manager.status();
                (s.len() == 2 && s.iter().all(|c| c.state == CertState::Valid)).then_some(())
            },
        )
        .await;
        for want in [id("shop", "web"), id("shop", "db")] {
            let cert = manager.workload(&want).expect("certificate");
            let got =
                verify_workload_chain(manager.roots(), &cert.chain, SystemTime::now()).unwrap();
            assert_eq!(got, want);
            let life = cert.not_after.duration_since(cert.not_before).unwrap();
            assert!(
                life >= Duration::from_hours(24)
                    && life <= Duration::from_hours(24) + Duration::from_secs(61),
                "default lifetime is 24 h: {life:?}"
            );
            assert_eq!(cert.chain.len(), 1, "a root CA sends no intermediates");
        }
        let status = manager.status();
        let web = status.iter().find(|s| s.id == id("shop", "web")).unwrap();
        assert_eq!(
            web.pods.len(),
            2,
            "pods sharing a service account share a certificate"
        );
        assert_eq!(server.counters.signed.load(Ordering::Relaxed), 2);

        // The last db pod leaves: its certificate and key are dropped.
        let mut fewer = workloads.clone();
        fewer.remove(&ObjectName::new("shop", "db-0"));
        manager.set_workloads(&fewer);
        assert!(manager.workload(&id("shop", "db")).is_none());
        assert!(manager.workload(&id("shop", "web")).is_some());

        // node-a asking for a pod scheduled on node-b.
        let other = id("shop", "other");
        let e = ask(
            server.addr,
            &token_a,
            &anchors,
            ("shop", "other-0"),
            &other,
            &other,
        )
        .await;
        match e {
            Err(CaClientError::Denied(m)) => {
                assert!(m.contains("node-b") && m.contains("node-a"), "{m}");
            }
            other => panic!("expected PERMISSION_DENIED, got {other:?}"),
        }
        // node-a naming its own pod but another service account.
        let db = id("shop", "db");
        let e = ask(server.addr, &token_a, &anchors, ("shop", "web-0"), &db, &db).await;
        assert!(
            matches!(&e, Err(CaClientError::Denied(m)) if m.contains("service account")),
            "{e:?}"
        );
        // node-b's genuine token for node-a's pod.
        let web_id = id("shop", "web");
        let e = ask(
            server.addr,
            &token_b,
            &anchors,
            ("shop", "web-0"),
            &web_id,
            &web_id,
        )
        .await;
        assert!(matches!(e, Err(CaClientError::Denied(_))), "{e:?}");
        assert_eq!(server.counters.denied.load(Ordering::Relaxed), 3);

        // No token, a forged token.
        let e = ask(
            server.addr,
            "",
            &anchors,
            ("shop", "web-0"),
            &web_id,
            &web_id,
        )
        .await;
        assert!(matches!(e, Err(CaClientError::Unauthenticated(_))), "{e:?}");
        let forged = format!("kmbt.{}", "0".repeat(64));
        let e = ask(
            server.addr,
            &forged,
            &anchors,
            ("shop", "web-0"),
            &web_id,
            &web_id,
        )
        .await;
        assert!(matches!(e, Err(CaClientError::Unauthenticated(_))), "{e:?}");
        assert_eq!(server.counters.unauthenticated.load(Ordering::Relaxed), 2);

        // A CSR naming another identity than the request.
        let e = ask(
            server.addr,
            &token_a,
            &anchors,
            ("shop", "web-0"),
            &web_id,
            &db,
        )
        .await;
        assert!(
            matches!(&e, Err(CaClientError::Invalid(m)) if m.contains("URI SAN")),
            "{e:?}"
        );
        assert_eq!(server.counters.invalid.load(Ordering::Relaxed), 1);
        assert_eq!(
            server.counters.signed.load(Ordering::Relaxed),
            2,
            "no refusal signed anything"
        );

        // A client that does not trust this CA's root does not talk to it.
        let stranger = roots_of(&CaMaterial::generate_root(TD).unwrap());
        let e = ask(
            server.addr,
            &token_a,
            &stranger,
            ("shop", "web-0"),
            &web_id,
            &web_id,
        )
        .await;
        assert!(matches!(e, Err(CaClientError::Unavailable(_))), "{e:?}");
        drop(manager);
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn kubernetes_nodes_are_authenticated_by_token_review() {
    runtime().block_on(async {
        let dir = work_dir("kubernetes");
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
                pod("mesh-system", "agent-a", "node-a", "mesh-agent"),
                pod("mesh-system", "agent-b", "node-b", "mesh-agent"),
                pod("shop", "web-0", "node-a", "web"),
                pod("shop", "other-0", "node-b", "other"),
            ]
            .join("\n"),
        )
        .unwrap();
        let kmock = Kmock::start(&dir, Some(&preload)).unwrap();
        let kubeconfig = kmock.kubeconfig(&dir).unwrap();
        let client = auth::kube_client(Some(&kubeconfig)).await.unwrap();
        let mint = |sa: &'static str, pod: &'static str, audience: &'static str| {
            let client = client.clone();
            async move {
                let api: Api<ServiceAccount> = Api::namespaced(client, "mesh-system");
                let req = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: vec![audience.to_owned()],
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
        };
        let token_a = mint("mesh-agent", "agent-a", CA_AUDIENCE).await;
        let wrong_sa = mint("default", "agent-a", CA_AUDIENCE).await;
        let wrong_audience = mint("mesh-agent", "agent-a", "https://kubernetes.default.svc").await;

        let (m, _) = CaMaterial::load_or_generate(&dir.join("ca"), TD).unwrap();
        let auth = NodeAuth::Kubernetes(KubeAuth::new(
            client.clone(),
            &ObjectName::new("mesh-system", "mesh-agent"),
        ));
        let server = start_ca(
            "127.0.0.1:0".parse().unwrap(),
            &m,
            None,
            Lifetimes::default(),
            auth,
        )
        .await;
        let anchors = roots_of(&m);

        // The agent reads its projected token from a file, as mounted by the kubelet.
        let token_file = dir.join("ca-token");
        std::fs::write(&token_file, format!("{token_a}\n")).unwrap();
        let manager = IdentityManager::new(
            ManagerConfig::new(TD, anchors.clone()),
            endpoint(server.addr, TokenSource::File(token_file)),
        );
        let web = id("shop", "web");
        manager.set_workloads(&BTreeMap::from([(
            ObjectName::new("shop", "web-0"),
            web.clone(),
        )]));
        until("web's certificate", Duration::from_secs(20), || {
            manager.workload(&web)
        })
        .await;
        let cert = manager.workload(&web).unwrap();
        assert_eq!(
            verify_workload_chain(manager.roots(), &cert.chain, SystemTime::now()).unwrap(),
            web
        );

        let other = id("shop", "other");
        let e = ask(
            server.addr,
            &token_a,
            &anchors,
            ("shop", "other-0"),
            &other,
            &other,
        )
        .await;
        assert!(
            matches!(&e, Err(CaClientError::Denied(m)) if m.contains("node-b")),
            "{e:?}"
        );
        let e = ask(
            server.addr,
            &token_a,
            &anchors,
            ("shop", "gone-0"),
            &other,
            &other,
        )
        .await;
        assert!(
            matches!(&e, Err(CaClientError::Denied(m)) if m.contains("does not exist")),
            "{e:?}"
        );
        assert_eq!(server.counters.denied.load(Ordering::Relaxed), 2);
        for (what, token) in [
            ("another service account", wrong_sa.as_str()),
            ("another audience", wrong_audience.as_str()),
            ("a forged token", "kmock-token.forged"),
        ] {
            let e = ask(server.addr, token, &anchors, ("shop", "web-0"), &web, &web).await;
            assert!(
                matches!(e, Err(CaClientError::Unauthenticated(_))),
                "{what}: {e:?}"
            );
        }
        assert_eq!(server.counters.unauthenticated.load(Ordering::Relaxed), 3);
        let reviews = kmock
            .requests()
            .iter()
            .filter(|r| {
                r["phase"] == "request"
                    && r["path"] == "/apis/authentication.k8s.io/v1/tokenreviews"
            })
            .count();
        assert!(reviews >= 6, "every request was reviewed: {reviews}");
        drop(manager);
        server.shutdown().await;
        drop(kmock);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Certificates received by `manager` for `who`, in order: (serial, received at, certificate).
fn record(
    manager: &IdentityManager,
    who: &SpiffeId,
    seen: &mut Vec<(String, Instant)>,
    certs: &mut Vec<Arc<mesh_agent::identity::WorkloadCert>>,
) {
    if let Some(c) = manager.workload(who) {
        assert!(
            c.not_after > SystemTime::now(),
            "an expired certificate was being served"
        );
        if seen.last().is_none_or(|(s, _)| *s != c.serial) {
            // Each certificate verifies against the bundle at the time it arrives.
            assert_eq!(
                &verify_workload_chain(manager.roots(), &c.chain, SystemTime::now()).unwrap(),
                who
            );
            seen.push((c.serial.clone(), Instant::now()));
            certs.push(c);
        }
    }
}

#[test]
fn certificates_renew_at_half_life_across_a_ca_restart() {
    runtime().block_on(async {
        let dir = work_dir("rotation");
        let pods = write_pods(&dir);
        let ca_dir = dir.join("ca");
        let (m, _) = CaMaterial::load_or_generate(&ca_dir, TD).unwrap();
        let token = auth::bootstrap(&dir.join(auth::BOOTSTRAP_TOKENS), "node-a").unwrap();
        let ttl = Duration::from_secs(6);
        let mut server = start_ca(
            "127.0.0.1:0".parse().unwrap(),
            &m,
            None,
            short(ttl),
            static_auth(&dir, &pods),
        )
        .await;
        let addr = server.addr;
        let manager = IdentityManager::new(
            ManagerConfig::new(TD, roots_of(&m)),
            endpoint(addr, TokenSource::Static(token)),
        );
        let web = id("shop", "web");
        manager.set_workloads(&BTreeMap::from([(
            ObjectName::new("shop", "web-0"),
            web.clone(),
        )]));
        let (mut seen, mut certs) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut restarted = false;
        while seen.len() < 4 {
            assert!(
                Instant::now() < deadline,
                "only {} certificates in 40 s",
                seen.len()
            );
            record(&manager, &web, &mut seen, &mut certs);
            if seen.len() == 2 && !restarted {
                // Restart: same persisted root, read back from the directory.
                server.shutdown().await;
                let (again, generated) = CaMaterial::load_or_generate(&ca_dir, TD).unwrap();
                assert!(!generated, "the persisted root is reused");
                assert_eq!(again.cert_pem, m.cert_pem);
                tokio::time::sleep(Duration::from_millis(300)).await;
                server = start_ca(addr, &again, None, short(ttl), static_auth(&dir, &pods)).await;
                restarted = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Renewed at half-life (a 6 s certificate backdated 0.6 s: ~2.3-2.7 s after issue),
        // never close to expiry; the renewal after the restart is the third certificate.
        for w in seen.windows(2) {
            let gap = w[1].1 - w[0].1;
            assert!(
                gap > Duration::from_millis(1500) && gap < Duration::from_millis(4500),
                "renewal gap {gap:?}"
            );
        }
        let serials: BTreeSet<_> = seen.iter().map(|(s, _)| s.clone()).collect();
        assert_eq!(serials.len(), 4, "each renewal is a new certificate");
        assert!(
            server.counters.signed.load(Ordering::Relaxed) >= 2,
            "the restarted CA signed renewals"
        );
        assert!(
            manager.status()[0].state == CertState::Valid
                || manager.status()[0].state == CertState::Renewing
        );
        drop(manager);
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn root_rotation_overlap_keeps_old_and_new_certificates_valid() {
    runtime().block_on(async {
        let dir = work_dir("root-rotation");
        let pods = write_pods(&dir);
        let (old, _) = CaMaterial::load_or_generate(&dir.join("old"), TD).unwrap();
        let (new, _) = CaMaterial::load_or_generate(&dir.join("new"), TD).unwrap();
        let token = auth::bootstrap(&dir.join(auth::BOOTSTRAP_TOKENS), "node-a").unwrap();
        let ttl = Duration::from_secs(4);
        let (old_root, new_root) = (roots_of(&old), roots_of(&new));
        let web = id("shop", "web");
        let issued_by = |c: &mesh_agent::identity::WorkloadCert,
                         root: &[CertificateDer<'static>]| {
            verify_workload_chain(root_store(root), &c.chain, SystemTime::now()).is_ok()
        };

        // Step 1: the old root signs; the new root is added to the bundle.
        let server = start_ca(
            "127.0.0.1:0".parse().unwrap(),
            &old,
            Some(&new.cert_pem),
            short(ttl),
            static_auth(&dir, &pods),
        )
        .await;
        let addr = server.addr;
        let manager = IdentityManager::new(
            ManagerConfig::new(TD, old_root.clone()),
            endpoint(addr, TokenSource::Static(token)),
        );
        manager.set_workloads(&BTreeMap::from([(
            ObjectName::new("shop", "web-0"),
            web.clone(),
        )]));
        let c1 = until(
            "a certificate from the old root",
            Duration::from_secs(20),
            || manager.workload(&web),
        )
        .await;
        assert!(issued_by(&c1, &old_root) && !issued_by(&c1, &new_root));
        assert_eq!(manager.bundle().len(), 2, "the bundle carries both roots");

        // Step 2: the new root signs, the old stays in the bundle (overlap). The agent reaches
        // the CA's new serving certificate because it learnt the new root in step 1.
        server.shutdown().await;
        let server = start_ca(
            addr,
            &new,
            Some(&old.cert_pem),
            short(ttl),
            static_auth(&dir, &pods),
        )
        .await;
        let c2 = until(
            "a certificate from the new root",
            Duration::from_secs(20),
            || manager.workload(&web).filter(|c| issued_by(c, &new_root)),
        )
        .await;
        let roots = manager.roots();
        assert_eq!(
            verify_workload_chain(Arc::clone(&roots), &c1.chain, SystemTime::now()).unwrap(),
            web,
            "old-root certificate valid during overlap"
        );
        assert_eq!(
            verify_workload_chain(roots, &c2.chain, SystemTime::now()).unwrap(),
            web,
            "new-root certificate valid during overlap"
        );

        // Step 3 (after the longest certificate lifetime): the old root leaves the bundle.
        tokio::time::sleep(
            c1.not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
        .await;
        server.shutdown().await;
        let server = start_ca(addr, &new, None, short(ttl), static_auth(&dir, &pods)).await;
        until(
            "a bundle without the old root",
            Duration::from_secs(20),
            || (manager.bundle().len() == 1).then_some(()),
        )
        .await;
        assert_eq!(manager.bundle().as_slice(), new_root.as_slice());
        assert!(
            verify_workload_chain(root_store(&manager.bundle()), &c1.chain, SystemTime::now())
                .is_err()
        );
        let c3 = manager.workload(&web).unwrap();
        assert!(issued_by(&c3, &new_root));
        drop(manager);
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn intermediate_ca_under_the_users_own_root() {
    runtime().block_on(async {
        let dir = work_dir("intermediate");
        let pods = write_pods(&dir);
        let user_root = CaMaterial::generate_root("example.org").unwrap();
        user_root.write_dir(&dir.join("root")).unwrap();
        let inter = user_root.issue_intermediate(TD).unwrap();
        inter.write_dir(&dir.join("inter")).unwrap();
        // As `mesh-agent ca --ca-cert --ca-key --ca-chain` reads it.
        let given = CaMaterial::read_files(
            &dir.join("inter").join(ca::CA_CERT),
            &dir.join("inter").join(ca::CA_KEY),
            Some(&dir.join("inter").join(ca::CERT_CHAIN)),
        )
        .unwrap();
        let token = auth::bootstrap(&dir.join(auth::BOOTSTRAP_TOKENS), "node-a").unwrap();
        let server = start_ca(
            "127.0.0.1:0".parse().unwrap(),
            &given,
            None,
            Lifetimes::default(),
            static_auth(&dir, &pods),
        )
        .await;
        let anchors = roots_of(&user_root);
        let manager = IdentityManager::new(
            ManagerConfig::new(TD, anchors.clone()),
            endpoint(server.addr, TokenSource::Static(token)),
        );
        let web = id("shop", "web");
        manager.set_workloads(&BTreeMap::from([(
            ObjectName::new("shop", "web-0"),
            web.clone(),
        )]));
        let c = until("a certificate", Duration::from_secs(20), || {
            manager.workload(&web)
        })
        .await;
        assert_eq!(c.chain.len(), 2, "leaf and intermediate");
        assert_eq!(
            manager.bundle().as_slice(),
            anchors.as_slice(),
            "the user's root is the bundle"
        );
        assert_eq!(
            verify_workload_chain(root_store(&anchors), &c.chain, SystemTime::now()).unwrap(),
            web
        );
        drop(manager);
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// The real binaries on a harness node: `mesh-agent ca` (static mode, 6 s certificates) and an
/// agent pointed at it. `meshctl identities` shows each pod's certificate (serial, validity,
/// state) and the serial changes as it renews; the CA refuses, logs (node and identity) and counts
/// the request for a pod its own file places on another node.
#[test]
fn agent_binary_gets_renews_and_lists_certificates() {
    use mesh_tests::{Cluster, agent::AgentProcess, agent::workspace_binary};
    let Some(_k) = mesh_tests::kernel_test("identity_agent") else {
        return;
    };
    let cluster = Cluster::new("identity_agent").unwrap();
    let node = cluster.add_node("a").unwrap();
    let work = std::env::temp_dir().join(cluster.prefix());
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let pods =
        "  - { name: web-0, namespace: shop, node: a, serviceAccount: web, ips: [10.1.0.3] }\n";
    // The agent believes rogue-0 runs on it; the CA's file (the truth) says node b.
    let agent_file = work.join("mesh.yaml");
    std::fs::write(
        &agent_file,
        format!("node: a\nnamespaces:\n  - {{ name: shop, dataplaneMode: mesh }}\npods:\n{pods}  - {{ name: rogue-0, namespace: shop, node: a, serviceAccount: rogue, ips: [10.1.0.9] }}\n"),
    )
    .unwrap();
    let ca_file = work.join("ca-cluster.yaml");
    std::fs::write(
        &ca_file,
        format!("pods:\n{pods}  - {{ name: rogue-0, namespace: shop, node: b, serviceAccount: rogue, ips: [10.2.0.9] }}\n"),
    )
    .unwrap();
    let agent_bin = workspace_binary("mesh-agent").unwrap();
    let ca_dir = work.join("ca");
    let out = std::process::Command::new(&agent_bin)
        .args(["ca", "bootstrap", "--node", "a", "--dir"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token_file = work.join("token");
    std::fs::write(&token_file, &out.stdout).unwrap();

    let mut cmd = node.command(&agent_bin);
    cmd.args([
        "ca",
        "--listen",
        "127.0.0.1:15012",
        "--metrics-addr",
        "none",
        "--workload-ttl",
        "6s",
        "--dir",
    ])
    .arg(&ca_dir)
    .arg("--static-pods")
    .arg(&ca_file)
    .env("RUST_LOG", "info");
    let mut ca = node.spawn(cmd).unwrap();
    ca.wait_for_line(|l| l.starts_with("listening"), Duration::from_secs(20))
        .unwrap();

    let pins = cluster.bpffs_dir().unwrap();
    let mut agent = AgentProcess::new(
        node.clone(),
        agent_file,
        pins.join("a"),
        work.join("admin.sock"),
    );
    agent.env = vec![
        ("MESH_CA_ADDRESS".into(), "127.0.0.1:15012".into()),
        ("MESH_CA_SERVER_NAME".into(), "localhost".into()),
        (
            "MESH_CA_ROOT_FILE".into(),
            ca_dir.join(ca::CA_CERT).display().to_string(),
        ),
        (
            "MESH_CA_TOKEN_FILE".into(),
            token_file.display().to_string(),
        ),
    ];
    agent.start().unwrap();

    let row = |v: &serde_json::Value, pod: &str| -> serde_json::Value {
        v.as_array()
            .unwrap()
            .iter()
            .find(|i| i["pod"] == pod)
            .cloned()
            .unwrap_or_default()
    };
    let mut serials = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while serials.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "serials seen: {serials:?}; agent: {}",
            agent.stderr()
        );
        let v = agent.meshctl_json(&["identities"]).unwrap();
        let web = row(&v, "web-0");
        if web["cert_state"] == "valid" || web["cert_state"] == "renewing" {
            assert_eq!(web["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/web");
            assert!(!web["not_before"].as_str().unwrap().is_empty());
            assert!(!web["not_after"].as_str().unwrap().is_empty());
            serials.insert(web["serial"].as_str().unwrap().to_owned());
        }
        assert_eq!(
            row(&v, "rogue-0")["cert_state"],
            "pending",
            "the CA never signs rogue"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The table form has the columns.
    let table = String::from_utf8(agent.meshctl(&["identities"]).unwrap().stdout).unwrap();
    assert!(
        table.contains("SERIAL") && table.contains("NOT-AFTER") && table.contains("STATE"),
        "{table}"
    );
    let log = ca.stderr_text();
    assert!(
        log.lines().any(|l| l.contains("certificate refused")
            && l.contains("node=\"a\"")
            && l.contains("spiffe://cluster.local/ns/shop/sa/rogue")
            && l.contains("node \\\"b\\\"")),
        "CA log: {log}"
    );
    let _ = agent.terminate(Duration::from_secs(10));
    ca.kill();
    let _ = std::fs::remove_dir_all(&work);
}

/// `mesh-agent ca --kubernetes --ca-secret …`: the first start generates the root and stores it
/// in the Secret; a restart (another replica) reads the same root; the bundle is published in a
/// `ConfigMap` for agents to mount.
#[test]
fn kubernetes_ca_keeps_its_root_in_a_secret_and_publishes_the_bundle() {
    use clap::Parser;
    use mesh_agent::discovery::kubernetes::k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use mesh_agent::identity::cli::{ServeArgs, build};
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }
    runtime().block_on(async {
        let dir = work_dir("ca-secret");
        let kmock = Kmock::start(&dir, None).unwrap();
        let kubeconfig = kmock.kubeconfig(&dir).unwrap();
        let args = || {
            Cli::parse_from([
                "ca",
                "--kubernetes",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--ca-secret",
                "mesh-system/mesh-ca",
                "--root-configmap",
                "mesh-system/mesh-ca-root",
            ])
            .serve
        };
        let (first, _) = build(&args()).await.unwrap();
        let (second, _) = build(&args()).await.unwrap();
        assert_eq!(
            first.roots(),
            second.roots(),
            "the restarted CA has the same root"
        );
        let client = auth::kube_client(Some(&kubeconfig)).await.unwrap();
        let secret = Api::<Secret>::namespaced(client.clone(), "mesh-system")
            .get("mesh-ca")
            .await
            .unwrap();
        let data = secret.data.unwrap();
        assert!(data.contains_key(ca::CA_KEY) && data.contains_key(ca::CA_CERT));
        let cm = Api::<ConfigMap>::namespaced(client, "mesh-system")
            .get("mesh-ca-root")
            .await
            .unwrap();
        let pem = &cm.data.unwrap()["root-cert.pem"];
        assert_eq!(ca::parse_certs("configmap", pem).unwrap(), first.roots());
        assert!(!pem.contains("PRIVATE"), "only certificates are published");
        drop(kmock);
        let _ = std::fs::remove_dir_all(&dir);
    });
}
