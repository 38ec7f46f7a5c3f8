//! Wiring of the agent: the data-path owner thread, the read snapshots, the supervised discovery
//! source, the main loop (updates → reconciliation, health, rejections), the flow pump, kernel
//! logs, readiness, the admin API, and shutdown (SIGTERM/SIGINT → drain → stop).

use std::{
    collections::HashMap as StdHashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

pub use crate::config::{
    AgentConfig, DEFAULT_ADMIN_SOCKET, DEFAULT_PIN_DIR, DEFAULT_READINESS_ADDR, Source,
};
use crate::{
    datapath::{Datapath, DatapathConfig, mesh::OriginalDstTable, spec::Protocol},
    discovery::{self, DiscoveryError, Update},
    drain::{Drain, DrainOutcome},
    flows::{FlowHub, Names},
    identity::SpiffeId,
    model::{ClusterModel, ObjectName},
    owner::{self, DatapathHandle, OwnerError, ReconcileOutcome},
    state::{AgentStatus, SourceHealth, SourceState, Stores},
    supervisor::{self, Backoff, SourceEvent},
};

/// What every task shares: configuration, the snapshots (read without waiting), the way to the
/// data-path owner, the flow hub and the drain hook.
pub struct Shared {
    pub config: AgentConfig,
    pub started: Instant,
    pub stores: Arc<Stores>,
    pub datapath: DatapathHandle,
    pub flows: Arc<FlowHub>,
    /// Proxies subscribe here (`drain.watch()`) and finish within the drain period at shutdown.
    pub drain: Arc<Drain>,
    /// The HBONE proxies' counters and tunnel table (`meshctl tunnels`).
    pub proxy_stats: Arc<crate::proxy::ProxyStats>,
}

/// Resolves names for flows from the current snapshot's indexes, and cgroup ids through a
/// cache of the cgroup tree under the attach point (rebuilt at most once a second, on a miss).
struct SnapshotNames {
    shared: Arc<Shared>,
    cgroups: Mutex<(StdHashMap<u64, PathBuf>, Option<Instant>)>,
}

impl SnapshotNames {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            cgroups: Mutex::new((StdHashMap::new(), None)),
        }
    }

    fn cgroup_path(&self, id: u64) -> Option<PathBuf> {
        // Only the flow pump calls this: the lock is never contended.
        let mut guard = self.cgroups.lock().unwrap_or_else(PoisonError::into_inner);
        let (index, built) = &mut *guard;
        if !index.contains_key(&id) && built.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            index.clear();
            index_cgroups(&self.shared.config.datapath.cgroup, 0, index);
            *built = Some(Instant::now());
        }
        index.get(&id).cloned()
    }
}

/// Maps every cgroup directory's inode (its cgroup id) under `dir` to its path.
fn index_cgroups(dir: &Path, depth: usize, index: &mut StdHashMap<u64, PathBuf>) {
    if let Ok(md) = std::fs::metadata(dir) {
        index.insert(md.ino(), dir.to_owned());
    }
    if depth >= 8 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            index_cgroups(&e.path(), depth + 1, index);
        }
    }
}

impl Names for SnapshotNames {
    fn pod_by_cgroup(&self, cgroup_id: u64) -> Option<Arc<ObjectName>> {
        let Some(path) = self.cgroup_path(cgroup_id) else {
            debug!(cgroup_id, under = %self.shared.config.datapath.cgroup.display(), "cgroup id not found");
            return None;
        };
        let snap = self.shared.stores.snapshot.load();
        snap.pod_by_cgroup_path(&path).cloned()
    }

    fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<ObjectName>> {
        self.shared.stores.snapshot.load().pod_by_ip(ip)
    }

    fn service_by_addr(&self, addr: SocketAddr, udp: bool) -> Option<Arc<ObjectName>> {
        let proto = if udp { Protocol::Udp } else { Protocol::Tcp };
        let snap = self.shared.stores.snapshot.load();
        snap.service_by_addr(addr, proto)
            .map(|s| Arc::clone(&s.name))
    }
}

/// Runs the agent until SIGINT/SIGTERM, then drains. Programs and maps stay pinned when it
/// exits, so traffic keeps flowing and the next agent adopts them.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    if !cfg!(feature = "datapath") {
        bail!(
            "this mesh-agent was built without the `datapath` feature, so it holds no kernel \
             object: build it with default features"
        );
    }
    // Installed first, so a signal during start-up is not lost.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut dp = Datapath::load(&DatapathConfig {
        cgroup: config.datapath.cgroup.clone(),
        pin_dir: config.datapath.pin_dir.clone(),
    })?;
    let ring = dp.take_events();
    if let Some(logger) = dp.take_logger() {
        tokio::spawn(crate::logging::forward_kernel_logs(logger));
    }
    info!(adopted = dp.service_keys().count(), "kernel state adopted");
    let original_dst = prepare_mesh(&mut dp, &config)?;
    let stores = Arc::new(Stores::default());
    let (datapath, _owner_thread) = owner::spawn(
        dp,
        Arc::clone(&stores),
        config.datapath.bypass,
        config.datapath.cgroup.clone(),
    )
    .context("starting the data-path owner thread")?;
    let shared = Arc::new(Shared {
        drain: Arc::new(Drain::new(config.proxy.drain_period)),
        config,
        started: Instant::now(),
        stores,
        datapath,
        flows: Arc::new(FlowHub::new()),
        proxy_stats: crate::proxy::ProxyStats::new(),
    });
    // Workload certificates follow this node's pods (only when a CA is configured).
    if let Some(identities) = crate::identity::manager::global() {
        tokio::spawn(identities.clone().follow(Arc::clone(&shared.stores)));
    }
    let proxies = match original_dst {
        Some(table) => Some(start_proxies(&shared, table)?),
        None => None,
    };
    // Telemetry observes the flows from the first one the ring reader drains.
    crate::telemetry::start(&shared);
    if let Some(ring) = ring {
        tokio::spawn(
            Arc::clone(&shared.flows).pump(ring, Arc::new(SnapshotNames::new(Arc::clone(&shared)))),
        );
    }
    if let Some(addr) = shared.config.admin.readiness_addr {
        tokio::spawn(crate::health::serve_readiness(addr, Arc::clone(&shared)));
    }
    tokio::spawn(crate::admin::serve(
        shared.config.admin.socket.clone(),
        Arc::clone(&shared),
    ));
    crate::relay::flow_api::spawn(&shared);
    let (events_tx, events) = mpsc::channel(64);
    let source = start_source(&shared, events_tx);
    let mut main = MainLoop::new(Arc::clone(&shared), source);
    let result = tokio::select! {
        r = main.run(events) => r,
        _ = term.recv() => { info!("SIGTERM"); Ok(()) }
        _ = int.recv() => { info!("SIGINT"); Ok(()) }
    };
    info!(period = ?shared.drain.period(), "draining");
    tokio::select! {
        outcome = shared.drain.drain() => match outcome {
            DrainOutcome::Complete => info!("drained"),
            DrainOutcome::TimedOut { remaining } => {
                warn!(remaining, "drain period over; stopping with subscribers still busy");
            }
        },
        _ = term.recv() => warn!("second SIGTERM: stopping without waiting for the drain"),
        _ = int.recv() => warn!("second SIGINT: stopping without waiting for the drain"),
    }
    if let Some(p) = &proxies {
        for line in p.remove_routing() {
            debug!(removed = %line, "HBONE reply routing");
        }
    }
    shared.datapath.shutdown();
    // Connection lines still in the flow task's buffer (exit would write them too).
    crate::logging::flush_access_log();
    let _ = std::fs::remove_file(&shared.config.admin.socket);
    info!("stopped; programs stay attached through their pinned links");
    result
}

/// Points the kernel's capture at this agent's outbound listener and, when the proxies run,
/// attaches the `STRICT` ingress program to the uplinks; returns the captured-connection table
/// the outbound proxy reads (`None` when the proxies are off).
fn prepare_mesh(
    dp: &mut Datapath,
    config: &AgentConfig,
) -> anyhow::Result<Option<OriginalDstTable>> {
    let p = &config.proxy;
    if !p.enabled {
        // No CA, no certificates: enrolled cross-node connects fail at once (never plaintext).
        dp.set_capture(None, None, 0)?;
        return Ok(None);
    }
    let v4 = p.capture_addresses.iter().find_map(|a| match a {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    });
    let v6 = p.capture_addresses.iter().find_map(|a| match a {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    });
    if v4.is_none() && v6.is_none() {
        warn!(
            key = crate::config::KEY_CAPTURE_ADDRESS,
            "no capture address: enrolled connects to other nodes will be refused"
        );
    }
    dp.set_capture(v4, v6, p.outbound_port)?;
    let uplinks = p.uplinks.clone().unwrap_or_else(default_route_interfaces);
    if uplinks.is_empty() {
        warn!(
            key = crate::config::KEY_UPLINKS,
            "no uplink: plaintext from other nodes to STRICT pods is not dropped in the kernel"
        );
    }
    for ifname in &uplinks {
        dp.attach_uplink(ifname)
            .with_context(|| format!("attaching the STRICT ingress program to {ifname}"))?;
        info!(interface = %ifname, "STRICT ingress attached");
    }
    Ok(Some(dp.original_dst_table()?))
}

/// Interfaces of this network namespace's IPv4 default routes (`/proc/net/route`).
fn default_route_interfaces() -> Vec<String> {
    let Ok(table) = std::fs::read_to_string("/proc/net/route") else {
        return Vec::new();
    };
    let mut out: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let ifname = f.next()?;
            (f.next()? == "00000000").then(|| ifname.to_owned())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Starts the HBONE proxies: certificates from the identity manager, authorization from the
/// snapshot's mesh view, local workloads and captured destinations from the snapshot and the
/// kernel's record.
fn start_proxies(
    shared: &Arc<Shared>,
    table: OriginalDstTable,
) -> anyhow::Result<crate::proxy::Proxies> {
    use crate::proxy::{ClientConfig, InboundConfig, ProxyParts, Redirect};
    let Some(manager) = crate::identity::manager::global() else {
        bail!("the proxies need the identity manager (--ca-address)");
    };
    let authorizer = SnapshotAuthorizer(Arc::clone(&shared.stores));
    let stores = Arc::clone(&shared.stores);
    let workloads = move |ip: IpAddr| {
        let snap = stores.snapshot.load();
        let (name, pod) = snap.mesh.pod_at(ip)?;
        let local = snap
            .model
            .pods
            .get(name)
            .is_some_and(|p| p.node == snap.model.node);
        local.then(|| pod.identity.clone())
    };
    let stores = Arc::clone(&shared.stores);
    let hbone_port = shared.config.proxy.hbone_port;
    let original_dst = move |client: SocketAddr| {
        let c = table.original_dst(client)?;
        let numbers = stores.identity_numbers.load();
        let snap = stores.snapshot.load();
        let pod = snap.pod_by_ip(c.dst.ip())?;
        let node = &snap.model.pods.get(&*pod)?.node;
        let node_ip = crate::meshsync::node_address(&snap, node, c.dst.ip());
        if node_ip.is_none() {
            warn!(pod = %pod, node = %node, "no address for the destination's node");
        }
        Some(Redirect {
            dst_pod: c.dst,
            service: c.service,
            dst_node: SocketAddr::new(node_ip?, hbone_port),
            dst_identity: numbers.id(c.dst_identity)?.clone(),
            src_identity: numbers.id(c.src_identity)?.clone(),
        })
    };
    let unspecified = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
    let parts = ProxyParts {
        provider: Arc::new(manager.clone()),
        authorizer: Arc::new(authorizer),
        workloads: Arc::new(workloads),
        stats: Arc::clone(&shared.proxy_stats),
        outbound: vec![(
            SocketAddr::new(unspecified, shared.config.proxy.outbound_port),
            Arc::new(original_dst),
        )],
        inbound_addr: SocketAddr::new(unspecified, hbone_port),
        client: ClientConfig::default(),
        inbound: InboundConfig::default(),
        workers: shared.config.proxy.workers,
    };
    crate::proxy::set_stream_observer(Arc::new(TunnelTelemetry(Arc::clone(&shared.stores))));
    let proxies = crate::proxy::start(parts, &shared.drain)?;
    info!(
        outbound = shared.config.proxy.outbound_port,
        hbone = hbone_port,
        workers = shared.config.proxy.workers,
        "HBONE proxies serving"
    );
    Ok(proxies)
}

/// Tunnelled streams into Istio's TCP metrics (`mutual_tls`), named from the snapshot: the
/// kernel's flows do not cover captured connections.
struct TunnelTelemetry(Arc<Stores>);

impl TunnelTelemetry {
    fn count(&self, ends: &crate::proxy::StreamEnds, event: crate::telemetry::tcp::TunnelEvent) {
        let snap = self.0.snapshot.load();
        let service = ends.service.and_then(|a| {
            snap.service_by_addr(a, Protocol::Tcp)
                .map(|s| Arc::clone(&s.name))
        });
        crate::telemetry::global().tcp.observe_tunnel(
            if ends.outbound {
                crate::telemetry::labels::Reporter::Source
            } else {
                crate::telemetry::labels::Reporter::Destination
            },
            snap.pod_by_ip(ends.src),
            service,
            snap.pod_by_ip(ends.dst.ip()),
            &ends.src_id,
            &ends.dst_id,
            event,
        );
    }
}

impl crate::proxy::StreamObserver for TunnelTelemetry {
    fn opened(&self, ends: &crate::proxy::StreamEnds) {
        self.count(ends, crate::telemetry::tcp::TunnelEvent::Open);
    }

    fn closed(&self, ends: &crate::proxy::StreamEnds, sent: u64, received: u64) {
        // `sent`/`received` here are the proxy's local socket's view (into / out of the
        // tunnel); Istio's `sent` is the response (server → client), `received` the request.
        let (sent, received) = if ends.outbound {
            (received, sent)
        } else {
            (sent, received)
        };
        self.count(
            ends,
            crate::telemetry::tcp::TunnelEvent::Close { sent, received },
        );
    }
}

/// The inbound proxy's authorization, from the current snapshot: the policy view decides, and a
/// client identity must run on the calling node (the CA signs a node only its own pods, so a
/// certificate used from another node is stolen or misissued).
struct SnapshotAuthorizer(Arc<Stores>);

impl crate::proxy::Authorizer for SnapshotAuthorizer {
    fn authorize(
        &self,
        source: &SpiffeId,
        dst_id: &SpiffeId,
        dst: SocketAddr,
    ) -> Result<(), crate::proxy::Denied> {
        let d = self
            .0
            .snapshot
            .load()
            .mesh
            .authorize_inbound(source, dst_id, dst);
        if d.allowed {
            Ok(())
        } else {
            Err(crate::proxy::Denied {
                reason: d.reason.as_str().to_owned(),
            })
        }
    }

    fn check_peer(
        &self,
        source: &SpiffeId,
        node: IpAddr,
        claimed_src: Option<IpAddr>,
    ) -> Result<(), crate::proxy::Denied> {
        let snap = self.0.snapshot.load();
        let deny = |reason: String| Err(crate::proxy::Denied { reason });
        let node_names: Vec<&String> = snap
            .model
            .nodes
            .iter()
            .filter(|(_, addrs)| addrs.contains(&node))
            .map(|(n, _)| n)
            .collect();
        if node_names.is_empty() {
            return deny(format!("{node} is not a node of the cluster"));
        }
        let on_node = |name: &ObjectName| {
            snap.model
                .pods
                .get(name)
                .is_some_and(|p| node_names.contains(&&p.node))
                && snap
                    .mesh
                    .enrolled
                    .get(name)
                    .is_some_and(|p| &p.identity == source)
        };
        match claimed_src {
            Some(ip) => match snap.pod_by_ip(ip) {
                Some(pod) if on_node(&pod) => Ok(()),
                _ => deny(format!(
                    "source {ip} is no pod of node {node} with identity {source}"
                )),
            },
            None if snap.mesh.enrolled.keys().any(on_node) => Ok(()),
            None => deny(format!("no pod of node {node} has identity {source}")),
        }
    }
}

/// Spawns the configured discovery source under supervision; returns its name.
fn start_source(shared: &Arc<Shared>, events: mpsc::Sender<SourceEvent>) -> &'static str {
    let cfg = &shared.config;
    let name = cfg.discovery.source.name();
    let backoff = Backoff {
        initial: cfg.discovery.restart_backoff,
        max: cfg.discovery.restart_backoff_max,
    };
    let drain = shared.drain.watch();
    let node = cfg.node.clone();
    match cfg.discovery.source.clone() {
        Source::File(path) => {
            let interval = cfg.discovery.file_poll_interval;
            tokio::spawn(supervisor::supervise(
                name,
                backoff,
                events,
                drain,
                move |tx| {
                    let (path, node) = (path.clone(), node.clone());
                    async move {
                        discovery::file::watch(path, Some(node), interval, tx).await;
                        Ok::<_, DiscoveryError>(())
                    }
                },
            ));
        }
        Source::Kubernetes => {
            let list_mode = cfg.discovery.list_mode;
            tokio::spawn(supervisor::supervise(
                name,
                backoff,
                events,
                drain,
                move |tx| {
                    let node = node.clone();
                    async move {
                        // Built per run, so an API server that was unreachable is retried.
                        let client = kube::Client::try_default()
                            .await
                            .map_err(DiscoveryError::KubernetesClient)?;
                        Ok::<_, DiscoveryError>(
                            discovery::kubernetes::run_with_mode(client, node, list_mode, tx)
                                .await?,
                        )
                    }
                },
            ));
        }
    }
    name
}

type Reconciling =
    Pin<Box<dyn Future<Output = Result<ReconcileOutcome, OwnerError>> + Send + 'static>>;

/// The one writer of [`AgentStatus`]: takes the sources' events, sends models to the owner one
/// at a time (a newer model replaces one still waiting, as kube-proxy's bounded-frequency runner
/// coalesces syncs), and publishes health after every change.
struct MainLoop {
    shared: Arc<Shared>,
    status: AgentStatus,
    waiting: Option<(&'static str, ClusterModel)>,
    reconciling: Option<(&'static str, Reconciling)>,
}

impl MainLoop {
    fn new(shared: Arc<Shared>, source: &'static str) -> Self {
        let mut status = AgentStatus::default();
        status
            .sources
            .insert(source.to_owned(), SourceHealth::starting());
        status.update_readiness();
        shared.stores.status.store(Arc::new(status.clone()));
        Self {
            shared,
            status,
            waiting: None,
            reconciling: None,
        }
    }

    async fn run(&mut self, mut events: mpsc::Receiver<SourceEvent>) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.on_event(event),
                    None => bail!("every discovery supervisor stopped"),
                },
                outcome = async {
                    match self.reconciling.as_mut() {
                        Some((_, fut)) => fut.await,
                        None => std::future::pending().await,
                    }
                } => {
                    let (source, _) = self.reconciling.take().expect("polled only when set");
                    self.on_reconciled(source, &outcome?);
                }
            }
            if self.reconciling.is_none()
                && let Some((source, model)) = self.waiting.take()
            {
                let dp = self.shared.datapath.clone();
                self.reconciling =
                    Some((source, Box::pin(async move { dp.reconcile(model).await })));
            }
        }
    }

    fn publish(&mut self) {
        self.status.update_readiness();
        self.shared
            .stores
            .status
            .store(Arc::new(self.status.clone()));
    }

    fn on_event(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Started { source, restarts } => {
                self.health(source).state = SourceState::Starting { restarts };
            }
            SourceEvent::Down {
                source,
                restarts,
                reason,
                retry_in,
            } => {
                let h = self.health(source);
                h.last_error = Some(reason.clone());
                h.state = SourceState::Down {
                    restarts,
                    reason,
                    retry_at: SystemTime::now() + retry_in,
                };
            }
            SourceEvent::Update { source, update } => {
                let h = self.health(source);
                if let SourceState::Starting { restarts } = h.state {
                    h.state = SourceState::Running { restarts };
                }
                self.on_update(source, update);
            }
        }
        self.publish();
    }

    fn health(&mut self, source: &'static str) -> &mut SourceHealth {
        self.status
            .sources
            .entry(source.to_owned())
            .or_insert_with(SourceHealth::starting)
    }

    fn on_update(&mut self, source: &'static str, update: Update) {
        match update {
            Update::Model(mut model) => {
                // The lens the snapshot's mesh view reads the model through (issue 9).
                model.mesh.settings = self.shared.config.mesh.clone();
                self.status.accept_model(source, &model);
                if self.waiting.is_some() {
                    debug!(source, "a newer model supersedes one still waiting");
                }
                self.waiting = Some((source, model));
            }
            Update::Rejected(rejection) => self.status.reject(source, rejection),
            Update::Resolved(object) => self.status.resolve(&object),
        }
    }

    fn on_reconciled(&mut self, source: &'static str, outcome: &ReconcileOutcome) {
        let now = SystemTime::now();
        self.health(source).last_sync = Some(now);
        self.status.first_sync.get_or_insert(now);
        self.status.reconcile_errors = outcome.errors.iter().map(ToString::to_string).collect();
        crate::telemetry::reconciled(outcome);
        for e in &outcome.errors {
            error!(kind = e.kind(), error = %e, "reconciliation error; the rest converged");
        }
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{authz::DataplaneMode, model::Pod, proxy::Authorizer as _, state::Snapshot};

    /// Two nodes; `client` (sa client) on a, `server` (sa web) on b, both in the mesh.
    fn stores() -> Arc<Stores> {
        let mut m = ClusterModel {
            node: "b".into(),
            ..ClusterModel::default()
        };
        m.nodes
            .insert("a".into(), vec!["192.0.2.1".parse().unwrap()]);
        m.nodes
            .insert("b".into(), vec!["192.0.2.2".parse().unwrap()]);
        for (name, node, sa, ip) in [
            ("client", "a", "client", "10.1.0.2"),
            ("server", "b", "web", "10.2.0.2"),
        ] {
            let name = ObjectName::new("shop", name);
            m.pods.insert(
                name.clone(),
                Arc::new(Pod {
                    name,
                    node: node.into(),
                    service_account: sa.into(),
                    ips: vec![ip.parse().unwrap()],
                    uid: String::new(),
                    host_network: false,
                }),
            );
        }
        m.mesh
            .namespace_modes
            .insert("shop".into(), DataplaneMode::Mesh);
        let stores = Arc::new(Stores::default());
        stores.snapshot.store(Arc::new(Snapshot::build(
            1,
            m,
            crate::reconcile::AppliedServices::default(),
        )));
        stores
    }

    #[test]
    fn a_client_identity_must_run_on_the_calling_node() {
        let auth = SnapshotAuthorizer(stores());
        let client: SpiffeId = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
        let web: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let client_pod = Some("10.1.0.2".parse().unwrap());
        assert!(auth.check_peer(&client, a, client_pod).is_ok());
        assert!(auth.check_peer(&client, a, None).is_ok());
        // The same certificate used from node b, or naming a pod that is not the client.
        assert!(auth.check_peer(&client, b, client_pod).is_err());
        assert!(auth.check_peer(&client, b, None).is_err());
        assert!(
            auth.check_peer(&client, a, Some("10.2.0.2".parse().unwrap()))
                .is_err()
        );
        // web runs only on b; a node that is not in the cluster is refused outright.
        assert!(auth.check_peer(&web, a, None).is_err());
        assert!(
            auth.check_peer(&client, "198.51.100.1".parse().unwrap(), None)
                .is_err()
        );
    }
}
