//! The ingress gateway (`mesh-agent gateway`): a stateless HTTP/1.1, HTTP/2 and gRPC reverse
//! proxy configured with Gateway API objects, whose backends come from the agent's own
//! discovery sources and model.
//!
//! Tasks: `--workers` single-threaded runtimes (thread per core), each with an accept loop per
//! listener port on its own `SO_REUSEPORT` socket (a task per connection, hyper-util's auto
//! server) and its own backend pools; on the main runtime, one task that turns cluster models
//! into the backends snapshot and one that reloads the routes. The routing table and the backends are immutable snapshots behind `arc-swap`, so a
//! reload never blocks or drops a request in flight.

pub mod backends;
pub mod config;
pub mod jwt;
pub mod kernel;
pub mod kube_source;
pub mod limits;
pub mod observe;
pub mod proxy;
pub mod route_policy;
pub mod routes;
pub mod server;
pub mod status;
pub mod status_writer;
pub mod upstream;

use std::{
    collections::BTreeSet,
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle};

use self::{
    backends::{Backends, CircuitView, HealthFeedback, LogFeedback, NoKernelCircuits},
    config::{GatewayConfig, ServiceRef},
    observe::GatewayTelemetry,
    proxy::{RequestLimits, Shared},
    server::ConnLimits,
};
use crate::{
    config::parse_duration,
    discovery::{self, Update},
    model::ClusterModel,
};

/// How often the routes file is checked for changes.
pub const ROUTES_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Default request body limit: 10 MiB (Envoy Gateway's `ClientTrafficPolicy` has none; nginx's
/// default 1 MiB is too small for API uploads).
pub const DEFAULT_MAX_BODY: u64 = 10 * 1024 * 1024;
/// Default header-read (and TLS handshake) timeout.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle timeout (nginx's `keepalive_timeout` 75 s; Envoy's 1 h is generous for an
/// edge that faces the internet).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_mins(5);
/// Default limit of request head bytes (Envoy's 60 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 60 * 1024;

/// `mesh-agent gateway` options.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Gateway API objects (`Gateway`, `HTTPRoute`, `GRPCRoute`, TLS `Secret`s, `RoutePolicy`) as a
    /// multi-document YAML file, reloaded on change. Without it (and with `--kubernetes`) they
    /// are watched from the Kubernetes API, and route status is written.
    #[arg(long)]
    pub routes: Option<PathBuf>,
    /// `GatewayClass.spec.controllerName` served: only Gateways of such classes are ours.
    #[arg(long, default_value = status::DEFAULT_CONTROLLER_NAME)]
    pub controller_name: String,
    /// The Lease (in `--pod-namespace`) electing the one instance that writes status.
    #[arg(long, default_value = status_writer::DEFAULT_LEASE)]
    pub status_lease: String,
    /// Addresses written to our Gateways' `status.addresses` (IPs or hostnames: the
    /// load balancer's), repeatable; none: not written.
    #[arg(long)]
    pub status_address: Vec<String>,
    /// Services and endpoints from this static model file (the agent's `--config-file` schema).
    #[arg(long, conflicts_with = "kubernetes")]
    pub config_file: Option<PathBuf>,
    /// Services and endpoints from the Kubernetes API (`EndpointSlices`), as the agent reads them.
    #[arg(long)]
    pub kubernetes: bool,
    /// Node name for topology-aware endpoint choice (downward API).
    #[arg(long, env = "NODE_NAME", default_value = "gateway")]
    pub node_name: String,
    /// Address the listeners bind (each on its Gateway listener's port).
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_address: IpAddr,
    /// Largest request body accepted (bytes).
    #[arg(long, default_value_t = DEFAULT_MAX_BODY)]
    pub max_body: u64,
    /// Time allowed to send request headers (and to finish a TLS handshake).
    #[arg(long, default_value = "10s")]
    pub header_read_timeout: String,
    /// Connections idle this long are closed.
    #[arg(long, default_value = "300s")]
    pub idle_timeout: String,
    /// Largest request head (request line + headers), bytes: 431 past it.
    #[arg(long, default_value_t = DEFAULT_MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// Prometheus endpoint of the gateway's request metrics (`/metrics`, `/stats/prometheus`);
    /// `none`: off.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: String,
    /// One JSON line per request on stdout (target `mesh_access`); on by default, as Envoy
    /// Gateway's default access log.
    #[arg(long, env = "MESH_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
    /// Longest time an access line waits in its worker's buffer before it is written (above
    /// zero; default 200ms; Envoy's `--file-flush-interval-msec`).
    #[arg(long, env = "MESH_ACCESS_LOG_FLUSH_INTERVAL")]
    pub access_log_flush_interval: Option<String>,
    /// OTLP/gRPC collector for spans (`http://collector:4317`); none: spans only propagate.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled (0..=1); a sampled incoming parent is always followed.
    #[arg(long, env = "MESH_TRACE_SAMPLING", default_value_t = 0.01)]
    pub trace_sampling: f64,
    /// This gateway's pod (downward API), the `source_workload` of its request metrics.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The node agent's pin directory (its `--pin-dir`, mounted read-only): backends whose
    /// kernel circuit is open are skipped. Unset: gateway-local outlier detection only. (Not
    /// `--pin-dir`: that global flag of the agent always has a value.)
    #[arg(long)]
    pub node_pin_dir: Option<PathBuf>,
    /// The node agent's admin socket: 5xx, resets and gRPC UNAVAILABLE are reported to the
    /// kernel's outlier detection (`ReportBackendResult`). Unset: they stay in the gateway.
    #[arg(long)]
    pub agent_socket: Option<PathBuf>,
    /// At SIGTERM/SIGINT: stop accepting, let requests in flight finish for at most this long,
    /// then exit (within Kubernetes' default 30 s grace period).
    #[arg(long, default_value = "25s")]
    pub drain_period: String,
    /// This gateway's namespace (downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub pod_namespace: String,
    /// Worker threads, each serving its share of connections start to end with its own
    /// listening sockets and backend pools (nginx's `worker_processes auto`). Default: the CPUs
    /// this process may use.
    #[arg(long, env = "MESH_GATEWAY_WORKERS")]
    pub workers: Option<usize>,
}

/// The worker count: `--workers`, else the CPUs this process may run on (its affinity mask
/// and cgroup quota, as `available_parallelism` reads them).
fn worker_count(flag: Option<usize>) -> Result<usize, GatewayError> {
    match flag {
        Some(0) => Err(GatewayError::Flag {
            flag: "workers",
            value: "0".into(),
            reason: "at least one worker".into(),
        }),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism().map_or(1, std::num::NonZero::get)),
    }
}

/// Why the gateway cannot start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("routes: {0}")]
    Config(#[from] config::GatewayConfigError),
    #[error("--{flag} {value:?}: {reason}")]
    Flag {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("choose where Services come from: --config-file FILE or --kubernetes")]
    NoSource,
    #[error("choose where routes come from: --routes FILE, or --kubernetes without --routes")]
    NoRoutes,
    #[error("starting the gateway's worker threads: {0}")]
    Workers(std::io::Error),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--node-pin-dir: {0}")]
    Kernel(#[from] kernel::KernelViewError),
    #[error("building the Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
}

fn duration_flag(flag: &'static str, v: &str) -> Result<Duration, GatewayError> {
    parse_duration(v).map_err(|e| GatewayError::Flag {
        flag,
        value: v.to_owned(),
        reason: e.to_string(),
    })
}

/// Runs the gateway until SIGINT/SIGTERM.
pub async fn run(args: GatewayArgs) -> Result<(), GatewayError> {
    let mut serving = Serving::start(&args)?;
    let drain_period = duration_flag("drain-period", &args.drain_period)?;
    let limits = RequestLimits {
        max_body: args.max_body,
    };
    let config = match &args.routes {
        Some(path) => config::load(path)?,
        None if args.kubernetes => GatewayConfig::default(),
        None => return Err(GatewayError::NoRoutes),
    };
    let telemetry = start_telemetry(&args)?;
    let kernel: Arc<dyn CircuitView> = match &args.node_pin_dir {
        Some(dir) => Arc::new(kernel::PinnedCircuits::start(dir)?),
        None => Arc::new(NoKernelCircuits),
    };
    let feedback: Arc<dyn HealthFeedback> = match &args.agent_socket {
        Some(socket) => Arc::new(kernel::AdminFeedback::start(socket.clone())),
        None => Arc::new(LogFeedback),
    };
    tracing::info!(circuits = kernel.describe(), "kernel circuit view");
    log_config(&config);
    let shared = Arc::new(Shared::new(config, limits, kernel, feedback, telemetry));
    let (updates, models) = mpsc::channel(16);
    let client = if args.kubernetes {
        Some(kube::Client::try_default().await?)
    } else {
        None
    };
    let mut kube_configs = start_kube_routes(&args, client.as_ref());
    start_discovery(&args, client.as_ref(), updates)?;
    let (reloaded_tx, reloaded_rx) = mpsc::channel(4);
    let (known_tx, known_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(backends_loop(shared.clone(), models, reloaded_rx, known_tx));
    let configs_tx = start_status(
        &args,
        &shared,
        kube_configs.as_ref(),
        client.as_ref(),
        known_rx,
    );
    serving.sync_listeners(&shared)?;
    let mut last = args
        .routes
        .as_deref()
        .and_then(|p| digest(p, &shared.config.load()));
    let mut tick = tokio::time::interval(ROUTES_POLL_INTERVAL);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| GatewayError::Flag {
            flag: "signal",
            value: "SIGTERM".into(),
            reason: e.to_string(),
        })?;
    loop {
        let next = tokio::select! {
            _ = tick.tick() => match &args.routes {
                Some(path) => reload_file(path, &shared, &mut last).await,
                None => None,
            },
            Some(cfg) = recv_config(&mut kube_configs) => Some(cfg),
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let Some(cfg) = next else { continue };
        log_config(&cfg);
        // The backends loop installs it: backends for its Services first, then the table.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        if reloaded_tx.send((Arc::new(cfg), done_tx)).await.is_err() {
            break;
        }
        let _ = done_rx.await;
        configs_tx.send_replace(shared.config.load_full());
        if let Err(e) = serving.sync_listeners(&shared) {
            tracing::error!(error = %e, "a new listener could not be opened");
        }
    }
    drain(&shared, serving.listeners, drain_period).await;
    // Stops the workers' runtimes (connections left past the drain period are dropped).
    drop(serving.workers);
    // Every request finished or dropped above has written its access line into a worker's
    // buffer: out with them before the process ends (exit flushes too; this says where).
    crate::logging::flush_access_log();
    Ok(())
}

/// The workers and the listening sockets they accept on.
struct Serving {
    workers: Vec<server::Worker>,
    listeners: Listeners,
    ip: IpAddr,
    limits: ConnLimits,
}

impl Serving {
    fn start(args: &GatewayArgs) -> Result<Self, GatewayError> {
        let limits = ConnLimits {
            header_read_timeout: duration_flag("header-read-timeout", &args.header_read_timeout)?,
            idle_timeout: duration_flag("idle-timeout", &args.idle_timeout)?,
            max_header_bytes: args.max_header_bytes,
            max_headers: 100,
            max_concurrent_streams: 100,
        };
        let workers =
            server::Worker::start(worker_count(args.workers)?).map_err(GatewayError::Workers)?;
        tracing::info!(workers = workers.len(), "gateway workers started");
        Ok(Self {
            workers,
            listeners: Listeners::new(),
            ip: args.listen_address,
            limits,
        })
    }

    fn sync_listeners(&mut self, shared: &Arc<Shared>) -> Result<(), GatewayError> {
        sync_listeners(
            shared,
            &self.workers,
            &mut self.listeners,
            self.ip,
            self.limits,
        )
    }
}

/// The accept tasks of each listening port: one per worker.
type Listeners = std::collections::BTreeMap<u16, Vec<JoinHandle<()>>>;

/// Rereads the routes file when it (or a file it names) changed: the new configuration, or
/// `None` when unchanged or rejected (the last good one keeps serving).
async fn reload_file(
    path: &std::path::Path,
    shared: &Arc<Shared>,
    last: &mut Option<u64>,
) -> Option<GatewayConfig> {
    let now = digest(path, &shared.config.load());
    if now == *last {
        return None;
    }
    *last = now;
    let path = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || config::load(&path))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    match loaded {
        Ok(cfg) => Some(cfg),
        Err(e) => {
            tracing::warn!(error = %e, "routes rejected; the last good configuration keeps serving");
            None
        }
    }
}

/// The Kubernetes source of Gateway API objects (`--kubernetes` without `--routes`): its
/// compiled configurations, and the objects' current status for the status writer.
type KubeRoutes = (
    mpsc::Receiver<GatewayConfig>,
    tokio::sync::watch::Receiver<Arc<kube_source::Observed>>,
);

fn start_kube_routes(args: &GatewayArgs, client: Option<&kube::Client>) -> Option<KubeRoutes> {
    if args.routes.is_some() {
        return None;
    }
    let client = client?.clone();
    let (tx, rx) = mpsc::channel(4);
    let (observed_tx, observed_rx) = tokio::sync::watch::channel(Arc::default());
    let controller = args.controller_name.clone();
    tokio::spawn(async move {
        if let Err(e) = kube_source::run(client, controller, tx, observed_tx).await {
            tracing::error!(error = %e, "Gateway API watch ended");
        }
    });
    Some((rx, observed_rx))
}

/// The next configuration from the Kubernetes source (never, without one).
async fn recv_config(source: &mut Option<KubeRoutes>) -> Option<GatewayConfig> {
    match source {
        Some((rx, _)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Services and endpoints: the agent's file or Kubernetes source, sending models to `updates`.
fn start_discovery(
    args: &GatewayArgs,
    client: Option<&kube::Client>,
    updates: mpsc::Sender<Update>,
) -> Result<(), GatewayError> {
    match (&args.config_file, args.kubernetes) {
        (Some(path), false) => {
            tokio::spawn(discovery::file::watch(
                path.clone(),
                Some(args.node_name.clone()),
                discovery::file::DEFAULT_POLL_INTERVAL,
                updates,
            ));
        }
        (None, true) => {
            let client = client.cloned().ok_or(GatewayError::NoSource)?;
            let node = args.node_name.clone();
            tokio::spawn(async move {
                // No TrafficPolicy status from gateways (`None`): the node agents elect that
                // writer; the gateway's POD_NAMESPACE must not make it a candidate.
                if let Err(e) = discovery::kubernetes::run_with_status(
                    client,
                    node,
                    discovery::kubernetes::ListMode::Auto,
                    None,
                    updates,
                )
                .await
                {
                    tracing::error!(error = %e, "Kubernetes discovery ended");
                }
            });
        }
        _ => return Err(GatewayError::NoSource),
    }
    Ok(())
}

/// The routes report (`/routes`) and, with Gateway API objects from Kubernetes, the elected
/// status writer. Returns where each newly installed table goes.
fn start_status(
    args: &GatewayArgs,
    shared: &Arc<Shared>,
    kube: Option<&KubeRoutes>,
    client: Option<&kube::Client>,
    known: tokio::sync::watch::Receiver<Option<Arc<status::KnownServices>>>,
) -> tokio::sync::watch::Sender<Arc<GatewayConfig>> {
    let (configs_tx, configs_rx) = tokio::sync::watch::channel(shared.config.load_full());
    let (reports_tx, _) = tokio::sync::watch::channel(Arc::default());
    let source = if kube.is_some() { "kubernetes" } else { "file" };
    tokio::spawn(status::report_loop(
        source,
        configs_rx,
        known,
        reports_tx.clone(),
    ));
    if let (Some((_, observed)), Some(client)) = (kube, client) {
        tokio::spawn(status_writer::run(
            client.clone(),
            status_writer::WriterConfig {
                namespace: args.pod_namespace.clone(),
                identity: args
                    .pod_name
                    .clone()
                    .unwrap_or_else(|| args.node_name.clone()),
                lease: args.status_lease.clone(),
                controller: args.controller_name.clone(),
                addresses: args.status_address.clone(),
            },
            reports_tx.subscribe(),
            observed.clone(),
        ));
    }
    configs_tx
}

/// Graceful drain: the listening sockets close (new connections are refused, so a load
/// balancer fails over at once), open connections finish the request in flight and close,
/// and the process waits for them at most `period`. Spliced upgrades (WebSocket) are not
/// waited for. Envoy Gateway drains the same way (its `shutdown.drainTimeout`, 60 s by default,
/// under a longer termination grace period).
async fn drain(shared: &Arc<Shared>, listeners: Listeners, period: Duration) {
    for task in listeners.values().flatten() {
        task.abort();
    }
    // Every worker's listening socket is closed once its aborted task is gone.
    for task in listeners.into_values().flatten() {
        let _ = task.await;
    }
    shared.drain.send_replace(true);
    let open = || {
        shared
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    tracing::info!(connections = open(), period = ?period, "draining: not accepting; finishing requests in flight");
    let deadline = tokio::time::Instant::now() + period;
    while open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match open() {
        0 => tracing::info!("drained; stopping"),
        n => tracing::warn!(
            connections = n,
            "drain period over; stopping with connections open"
        ),
    }
}

/// The metrics endpoint and the span exporter, as the agent's `telemetry::start` does for it.
fn start_telemetry(args: &GatewayArgs) -> Result<GatewayTelemetry, GatewayError> {
    let flag = |flag, value: &str, reason: String| GatewayError::Flag {
        flag,
        value: value.to_owned(),
        reason,
    };
    if args.metrics_addr != "none" {
        let addr: SocketAddr =
            args.metrics_addr
                .parse()
                .map_err(|e: std::net::AddrParseError| {
                    flag("metrics-addr", &args.metrics_addr, e.to_string())
                })?;
        tokio::spawn(observe::serve_metrics(addr));
    }
    if let Some(v) = &args.access_log_flush_interval {
        let interval = crate::config::parse_positive_duration(v)
            .map_err(|e| flag("access-log-flush-interval", v, e.to_string()))?;
        crate::logging::set_access_flush_interval(interval);
    }
    if !(0.0..=1.0).contains(&args.trace_sampling) {
        return Err(flag(
            "trace-sampling",
            &args.trace_sampling.to_string(),
            "a share between 0 and 1".into(),
        ));
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        let stats = Arc::clone(&crate::telemetry::global().otlp);
        match crate::telemetry::traces::Tracer::start(
            endpoint,
            &args.node_name,
            args.trace_sampling,
            stats,
        ) {
            Ok(t) => {
                t.install();
            }
            Err(e) => return Err(flag("otlp-endpoint", endpoint, e.to_string())),
        }
    }
    Ok(GatewayTelemetry {
        // Leaked on purpose: one small name per gateway start, referenced by every request.
        source: args.pod_name.as_ref().map(|n| {
            &*Box::leak(Box::new(Arc::new(crate::model::ObjectName::new(
                &args.pod_namespace,
                n,
            ))))
        }),
        access_log: args.access_log,
    })
}

fn log_config(cfg: &GatewayConfig) {
    let routes: usize = cfg
        .ports
        .values()
        .flat_map(|p| &p.hosts.vhosts)
        .map(|v| v.entries.len())
        .sum();
    tracing::info!(
        listeners = %serde_json::to_string(&cfg.listeners).unwrap_or_default(),
        matches = routes,
        services = cfg.services.len(),
        "gateway configuration loaded"
    );
    for u in &cfg.unattached {
        tracing::warn!("{u}");
    }
}

/// A digest of the routes file and the files it names (JWKS).
fn digest(path: &std::path::Path, cfg: &GatewayConfig) -> Option<u64> {
    let mut h = DefaultHasher::new();
    std::fs::read(path).ok()?.hash(&mut h);
    for f in &cfg.extra_files {
        std::fs::read(f).ok().hash(&mut h);
    }
    Some(h.finish())
}

/// Opens a listener for every configured port not served yet, and stops the ones no longer
/// configured (their open connections finish on their own).
fn sync_listeners(
    shared: &Arc<Shared>,
    workers: &[server::Worker],
    listeners: &mut Listeners,
    ip: IpAddr,
    limits: ConnLimits,
) -> Result<(), GatewayError> {
    let ports: BTreeSet<u16> = shared.config.load().ports.keys().copied().collect();
    listeners.retain(|port, tasks| {
        let keep = ports.contains(port);
        if !keep {
            for t in tasks.iter() {
                t.abort();
            }
        }
        keep
    });
    for port in ports {
        if listeners.contains_key(&port) {
            continue;
        }
        let addr = SocketAddr::new(ip, port);
        let sockets = server::bind(addr, workers.len())
            .map_err(|source| GatewayError::Bind { addr, source })?;
        tracing::info!(%addr, workers = workers.len(), "listening");
        let tasks = workers
            .iter()
            .zip(sockets)
            .map(|(w, l)| w.serve(shared.clone(), l, limits))
            .collect();
        listeners.insert(port, tasks);
    }
    Ok(())
}

/// A new routing table to install, and who waits for it.
type Reload = (Arc<GatewayConfig>, tokio::sync::oneshot::Sender<()>);

/// How long the Service ports of a replaced routing table keep their backends. A request
/// reads the routing table, then (after reading a small body) the backends: one that read the
/// old table just before a reload must still find the old table's Service there.
const RETIRED_SERVICES_GRACE: Duration = Duration::from_secs(30);

/// Keeps the backends snapshot in step with the newest model and the routes' Service ports.
/// A new table is installed here, after the backends of its Service ports: a request never
/// meets a route whose new Service has no backends yet (that would be a spurious 503). The
/// old table's Service ports stay in the snapshot for [`RETIRED_SERVICES_GRACE`], so a request
/// that read the old table just before the switch finds its backends too.
async fn backends_loop(
    shared: Arc<Shared>,
    mut models: mpsc::Receiver<Update>,
    mut reloaded: mpsc::Receiver<Reload>,
    known: tokio::sync::watch::Sender<Option<Arc<status::KnownServices>>>,
) {
    let mut model: Option<ClusterModel> = None;
    // Service ports of replaced tables, kept until the deadline.
    let mut retired: BTreeSet<ServiceRef> = BTreeSet::new();
    let mut prune_at: Option<tokio::time::Instant> = None;
    loop {
        let mut reload: Option<Reload> = None;
        tokio::select! {
            u = models.recv() => match u {
                Some(Update::Model(m)) => model = Some(m),
                Some(Update::Rejected(r)) => {
                    tracing::warn!(error = %r, "discovery input rejected; the last good Services stay");
                    continue;
                }
                Some(Update::Resolved(_)) => continue,
                None => return,
            },
            r = reloaded.recv() => match r {
                Some(r) => reload = Some(r),
                None => return,
            },
            () = async {
                match prune_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                retired.clear();
                prune_at = None;
            }
        }
        if let Some((cfg, _)) = &reload {
            let current = shared.config.load();
            retired.extend(
                current
                    .services
                    .iter()
                    .filter(|s| !cfg.services.contains(*s))
                    .cloned(),
            );
            if !retired.is_empty() {
                prune_at = Some(tokio::time::Instant::now() + RETIRED_SERVICES_GRACE);
            }
        }
        let Some(m) = &model else {
            if let Some((cfg, done)) = reload {
                shared.config.store(cfg);
                let _ = done.send(());
            }
            continue;
        };
        let k = status::KnownServices::of(m);
        known.send_if_modified(|old| {
            let changed = old.as_deref() != Some(&k);
            if changed {
                *old = Some(Arc::new(k));
            }
            changed
        });
        let routed = match &reload {
            Some((cfg, _)) => cfg.services.clone(),
            None => shared.config.load().services.clone(),
        };
        let mut wanted = routed.clone();
        wanted.extend(retired.iter().cloned());
        let next = Backends::build(m, &wanted, &shared.backends.load());
        let missing: Vec<String> = routed
            .iter()
            .filter(|s| !next.services.contains_key(*s))
            .map(|s| format!("{}:{}", s.service, s.port))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                ?missing,
                "Service ports without endpoints (requests to them get 503)"
            );
        }
        shared.backends.store(Arc::new(next));
        if let Some((cfg, done)) = reload {
            shared.config.store(cfg);
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectName;

    fn refs(names: &[&str]) -> BTreeSet<ServiceRef> {
        names
            .iter()
            .map(|n| ServiceRef {
                service: ObjectName::new("default", *n),
                port: 80,
            })
            .collect()
    }

    fn has(shared: &Shared, name: &str) -> bool {
        shared
            .backends
            .load()
            .services
            .contains_key(&refs(&[name]).pop_first().unwrap())
    }

    /// A request that read the old routing table just before a reload still finds the old
    /// table's Service in the backends snapshot (CI saw a 503 from exactly that window); the
    /// retired Service leaves after the grace period.
    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_the_old_tables_services_for_a_grace_period() {
        let model = discovery::file::parse(
            std::path::Path::new("services.yaml"),
            "node: gateway\nservices:\n  - name: one\n    clusterIPs: [10.96.9.1]\n    ports: [{ name: http, port: 80, targetPort: 9005 }]\n    endpoints: [{ ip: 127.0.5.1, ready: true }]\n  - name: two\n    clusterIPs: [10.96.9.2]\n    ports: [{ name: http, port: 80, targetPort: 9005 }]\n    endpoints: [{ ip: 127.0.5.2, ready: true }]\n",
            Some("gateway"),
        )
        .unwrap();
        let config = |names: &[&str]| GatewayConfig {
            services: refs(names),
            ..GatewayConfig::default()
        };
        let shared = Arc::new(Shared::new(
            config(&["one"]),
            RequestLimits { max_body: 1 << 20 },
            Arc::new(backends::NoKernelCircuits),
            Arc::new(backends::LogFeedback),
            GatewayTelemetry::default(),
        ));
        let (models_tx, models) = mpsc::channel(4);
        let (reload_tx, reloads) = mpsc::channel(4);
        let (known, _known_rx) = tokio::sync::watch::channel(None);
        tokio::spawn(backends_loop(shared.clone(), models, reloads, known));
        models_tx.send(Update::Model(model)).await.unwrap();
        let reload = |names: &[&str]| {
            let (done, wait) = tokio::sync::oneshot::channel();
            (Arc::new(config(names)), done, wait)
        };
        let (cfg, done, wait) = reload(&["one"]);
        reload_tx.send((cfg, done)).await.unwrap();
        wait.await.unwrap();
        assert!(has(&shared, "one") && !has(&shared, "two"));

        let (cfg, done, wait) = reload(&["two"]);
        reload_tx.send((cfg, done)).await.unwrap();
        wait.await.unwrap();
        assert!(has(&shared, "two"), "the new table's Service is there");
        assert!(
            has(&shared, "one"),
            "and the old one's, for the grace period"
        );

        tokio::time::sleep(RETIRED_SERVICES_GRACE + Duration::from_secs(1)).await;
        assert!(has(&shared, "two"));
        assert!(!has(&shared, "one"), "then it is gone");
    }
}
