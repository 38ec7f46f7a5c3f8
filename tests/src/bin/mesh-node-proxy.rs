//! `mesh-node-proxy`: one harness node's HBONE proxies (inbound 15008 + outbound 15001) in their
//! own process, for the mtls benchmark, so that CPU and RSS are measured per node from `/proc`.
//!
//! Started in the node's network namespace by `mesh_tests::bench_mtls::start_node_proxies` with a
//! JSON config ([`mesh_tests::bench_mtls::NodeProxyConfig`]): this node's workload certificate
//! and root, its local pod, and the services its client pod reaches. The capture is stood in for
//! as `tests/src/hbone.rs` does: a connection from the client pod to listener `listen` is taken
//! to have been captured on its way to that service. Prints `ready` once listening; drains and
//! exits when stdin closes or on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use mesh_agent::drain::Drain;
use mesh_agent::identity::{SpiffeId, WorkloadCert};
use mesh_agent::proxy::testing::StaticCertProvider;
use mesh_agent::proxy::{
    self, AllowAll, ClientConfig, InboundConfig, ProxyParts, ProxyStats, Redirect,
};
use mesh_tests::bench_mtls::{NodeProxyConfig, raise_fd_limit};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The agent's allocator (`mesh-agent`'s `main.rs`): the benchmark's RSS and per-byte numbers
/// stand for the shipped binary only if the proxies allocate as it does.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: mesh-node-proxy CONFIG.json")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let config: NodeProxyConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;
    // 10,000 idle tunnelled connections are 10,000 sockets on each side.
    raise_fd_limit()?;
    // With workers the proxies run on their own threads (as in the agent, whose main runtime
    // does the rest); without, on this multi-thread runtime (the layout before workers).
    let runtime = if config.worker_threads == 0 {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(run(config))
}

async fn run(config: NodeProxyConfig) -> Result<()> {
    let id: SpiffeId = config.identity.parse().context("identity")?;
    let certs = StaticCertProvider::new(
        &config.trust_domain,
        mesh_agent::identity::root_store(&[CertificateDer::from(config.root.clone())]),
    );
    certs.insert(Arc::new(WorkloadCert {
        id: id.clone(),
        chain: vec![CertificateDer::from(config.cert.clone())],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(config.key.clone())),
        not_before: SystemTime::UNIX_EPOCH,
        not_after: SystemTime::now() + Duration::from_hours(24),
        serial: "bench".to_owned(),
    }));
    let local_pod = config.local_pod;
    let client_pod = config.client_pod;
    let redirect = |i: usize| -> Result<Redirect> {
        let s = &config.services[i];
        Ok(Redirect {
            dst_pod: s.dst_pod,
            service: None,
            dst_node: s.dst_node,
            dst_identity: s.dst_identity.parse().context("dst_identity")?,
            src_identity: id.clone(),
        })
    };
    let drain = Drain::new(Duration::from_secs(1));
    let stats = ProxyStats::new();
    let counters = stats.clone();
    let wildcard = |port| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let lid = id.clone();
    // One outbound listener per service (the capture stood in for), all sharing each worker's
    // tunnel pool: 15001 for the first, the service's own port for the others.
    let outbound = config
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let r = redirect(i)?;
            let lookup =
                move |c: SocketAddr| (c.ip().to_canonical() == client_pod).then(|| r.clone());
            Ok((
                wildcard(s.listen),
                Arc::new(lookup) as Arc<dyn proxy::OriginalDst>,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let proxies = proxy::start(
        ProxyParts {
            provider: certs,
            authorizer: Arc::new(AllowAll),
            workloads: Arc::new(move |pod| (pod == local_pod).then(|| lid.clone())),
            stats,
            outbound,
            inbound_addr: wildcard(proxy::HBONE_PORT),
            client: ClientConfig::default(),
            inbound: InboundConfig::default(),
            workers: config.worker_threads,
        },
        &drain,
    )?;
    println!("ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // stdin closing (the benchmark dropping its end) is the other stop signal.
    let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0_u8; 64];
        let mut stdin = std::io::stdin();
        while std::io::Read::read(&mut stdin, &mut buf).is_ok_and(|n| n > 0) {}
        let _ = closed_tx.send(());
    });
    tokio::select! {
        _ = term.recv() => {}
        _ = closed => {}
    }
    drain.drain().await;
    let _ = proxies.remove_routing();
    // Non-zero counters to stderr: the benchmark shows them (failed streams, resets).
    let nonzero: Vec<String> = counters
        .counters
        .snapshot()
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    eprintln!("counters: {}", nonzero.join(" "));
    Ok(())
}
