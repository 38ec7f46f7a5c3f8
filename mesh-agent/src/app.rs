//! Wiring of the agent: configuration, the shared state every task sees, and the tasks —
//! discovery → reconciliation, the flow pump, kernel logs, readiness, the admin API.

use std::{
    collections::HashMap as StdHashMap,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    datapath::{Datapath, DatapathConfig},
    discovery::{self, Update},
    flows::{FlowHub, Names},
    model::ClusterModel,
    reconcile::Reconciler,
};

/// Default readiness address (ztunnel's port).
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/mesh/admin.sock";
/// Default bpffs directory for pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mesh";

/// Where the cluster model comes from.
#[derive(Clone, Debug, Serialize)]
pub enum Source {
    /// A static YAML file, reloaded on change.
    File(PathBuf),
    /// The Kubernetes API (in-cluster or kubeconfig).
    Kubernetes,
}

/// The agent's configuration, after parsing and validation; served by `ConfigDump`.
#[derive(Clone, Debug, Serialize)]
pub struct AgentConfig {
    pub node: String,
    pub source: Source,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub readiness_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
}

/// Mutable state behind one lock; every operation on it is short.
pub struct AgentState {
    pub dp: Datapath,
    pub reconciler: Reconciler,
    pub model: ClusterModel,
    /// The last rejected input (file or object), if any since the last good one.
    pub last_rejection: Option<String>,
    /// True once the first model has been reconciled into the kernel.
    pub ready: bool,
}

/// What every task shares.
pub struct Shared {
    pub config: AgentConfig,
    pub started: Instant,
    state: Mutex<AgentState>,
    pub flows: Arc<FlowHub>,
}

impl Shared {
    /// Locks the state (a panic elsewhere does not make it unusable).
    pub fn state(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resolves names for flows from the current model, and cgroup ids through a cache of the
/// cgroup tree under the attach point (rebuilt at most once a second, on a miss).
struct ModelNames {
    shared: Arc<Shared>,
    cgroups: Mutex<(StdHashMap<u64, PathBuf>, Option<Instant>)>,
}

impl ModelNames {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            cgroups: Mutex::new((StdHashMap::new(), None)),
        }
    }

    fn cgroup_path(&self, id: u64) -> Option<PathBuf> {
        let mut guard = self.cgroups.lock().unwrap_or_else(PoisonError::into_inner);
        let (index, built) = &mut *guard;
        if !index.contains_key(&id) && built.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            index.clear();
            index_cgroups(&self.shared.config.cgroup, 0, index);
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

impl Names for ModelNames {
    fn pod_by_cgroup(&self, cgroup_id: u64) -> Option<(String, String)> {
        let Some(path) = self.cgroup_path(cgroup_id) else {
            tracing::debug!(cgroup_id, under = %self.shared.config.cgroup.display(), "cgroup id not found");
            return None;
        };
        let st = self.shared.state();
        // The deepest path component that names a pod: the kubelet's `pod<uid>` (systemd driver:
        // `…-pod<uid with _>.slice`), or the pod's name (static setups, the test harness).
        path.components()
            .rev()
            .find_map(|c| {
                let c = c.as_os_str().to_string_lossy();
                st.model.pods.values().find(|p| {
                    (!p.uid.is_empty()
                        && (c.contains(&p.uid) || c.contains(&p.uid.replace('-', "_"))))
                        || c == p.name.name
                })
            })
            .map(|p| (p.name.namespace.clone(), p.name.name.clone()))
    }

    fn pod_by_ip(&self, ip: IpAddr) -> Option<(String, String)> {
        let st = self.shared.state();
        st.model
            .pods
            .values()
            .find(|p| p.ips.contains(&ip))
            .map(|p| (p.name.namespace.clone(), p.name.name.clone()))
    }

    fn service_by_addr(&self, addr: SocketAddr, udp: bool) -> Option<String> {
        let proto = if udp {
            crate::datapath::spec::Protocol::Udp
        } else {
            crate::datapath::spec::Protocol::Tcp
        };
        let st = self.shared.state();
        st.reconciler
            .owner(&crate::datapath::service_key(addr, proto))
            .map(|(n, _)| n.to_string())
    }
}

/// Runs the agent until SIGINT/SIGTERM. Programs and maps stay pinned when it exits, so
/// traffic keeps flowing and the next agent adopts them.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let mut dp = Datapath::load(&DatapathConfig {
        cgroup: config.cgroup.clone(),
        pin_dir: config.pin_dir.clone(),
    })?;
    let ring = dp.take_events();
    if let Some(logger) = dp.take_logger() {
        tokio::spawn(crate::logging::forward_kernel_logs(logger));
    }
    let reconciler = Reconciler::new(&dp);
    info!(adopted = dp.service_keys().count(), "kernel state adopted");
    let shared = Arc::new(Shared {
        config: config.clone(),
        started: Instant::now(),
        state: Mutex::new(AgentState {
            dp,
            reconciler,
            model: ClusterModel::default(),
            last_rejection: None,
            ready: false,
        }),
        flows: Arc::new(FlowHub::new()),
    });
    if let Some(ring) = ring {
        tokio::spawn(
            Arc::clone(&shared.flows).pump(ring, Arc::new(ModelNames::new(Arc::clone(&shared)))),
        );
    }
    if let Some(addr) = config.readiness_addr {
        tokio::spawn(crate::health::serve_readiness(addr, Arc::clone(&shared)));
    }
    tokio::spawn(crate::admin::serve(
        config.admin_socket.clone(),
        Arc::clone(&shared),
    ));
    let (tx, mut rx) = mpsc::channel(16);
    match &config.source {
        Source::File(path) => {
            tokio::spawn(discovery::file::watch(
                path.clone(),
                Some(config.node.clone()),
                discovery::file::DEFAULT_POLL_INTERVAL,
                tx,
            ));
        }
        Source::Kubernetes => {
            let client = kube::Client::try_default().await?;
            let node = config.node.clone();
            tokio::spawn(async move {
                if let Err(e) = discovery::kubernetes::run(client, node, tx).await {
                    error!(error = %e, "Kubernetes discovery stopped");
                }
            });
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            update = rx.recv() => match update {
                Some(Update::Model(model)) => apply(&shared, model),
                Some(Update::Rejected(why)) => shared.state().last_rejection = Some(why),
                None => {
                    warn!("discovery source ended");
                    tokio::time::sleep(Duration::from_hours(1)).await;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("stopping; programs stay attached through their pinned links");
    let _ = std::fs::remove_file(&config.admin_socket);
    Ok(())
}

/// Reconciles the kernel to a new model.
fn apply(shared: &Shared, model: ClusterModel) {
    let mut guard = shared.state();
    let st = &mut *guard;
    let started = Instant::now();
    let report = st.reconciler.reconcile(&mut st.dp, &model);
    st.model = model;
    st.last_rejection = None;
    st.ready = true;
    // Parsing and diffing a large model frees far more than it keeps; hand the freed heap back
    // to the kernel so the agent's resident size reflects what it holds (glibc keeps it
    // otherwise).
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
    info!(
        applied = report.applied,
        removed = report.removed,
        unchanged = report.unchanged,
        errors = report.errors.len(),
        took_ms = started.elapsed().as_millis() as u64,
        "reconciled"
    );
}
