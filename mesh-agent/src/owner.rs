//! The one owner of the data path: a dedicated thread holds [`Datapath`] and the [`Reconciler`]
//! and takes [`Command`]s over a channel, so nothing else touches aya and no task waits on a
//! lock while a reconciliation runs. After each reconciliation it publishes a new [`Snapshot`];
//! about once a second (and after each command) it publishes the kernel counters.

use std::{
    path::PathBuf,
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant},
};

use mesh_common::service::ServiceKey;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::{
    datapath::{BackendStatus, Datapath, DatapathError},
    meshsync::{MeshSync, MeshSyncReport},
    model::ClusterModel,
    reconcile::{ReconcileError, Reconciler},
    state::{KernelStats, Snapshot, Stores},
};

/// How often the owner refreshes [`KernelStats`] when idle.
pub const KERNEL_STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Name of the owner's thread (seen in `top -H`, `/proc/<pid>/task/*/comm`).
pub const THREAD_NAME: &str = "mesh-datapath";

/// Backends of each service address asked for, in the order asked.
pub type ServiceBackends = Vec<(ServiceKey, Vec<BackendStatus>)>;

/// What the owner can be asked.
pub enum Command {
    /// Bring the kernel to this model, publish the snapshot, answer with what was done.
    Reconcile {
        model: ClusterModel,
        reply: oneshot::Sender<ReconcileOutcome>,
    },
    /// Live circuit state and counters of the backends of these service addresses.
    BackendStatus {
        keys: Vec<ServiceKey>,
        reply: oneshot::Sender<Result<ServiceBackends, DatapathError>>,
    },
    /// Reason counters, read now.
    Counters {
        reply: oneshot::Sender<Result<Vec<(&'static str, u64)>, DatapathError>>,
    },
    /// An L7 failure of one backend (a proxy saw a 5xx or a reset): feeds its circuit.
    ReportFailure {
        backend_id: u32,
        now_monotonic_ns: u64,
        reply: oneshot::Sender<Result<bool, DatapathError>>,
    },
    /// An L7 success of one backend after failures: resets its consecutive failures.
    ReportSuccess {
        backend_id: u32,
        now_monotonic_ns: u64,
        reply: oneshot::Sender<Result<bool, DatapathError>>,
    },
    /// Stop: the thread ends; programs and maps stay pinned.
    Shutdown,
}

/// What one reconciliation did, as the owner answers it.
#[derive(Debug)]
pub struct ReconcileOutcome {
    pub generation: u64,
    pub applied: usize,
    pub removed: usize,
    pub unchanged: usize,
    pub errors: Vec<ReconcileError>,
    pub took: Duration,
}

/// Why a command got no answer.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("the data-path owner thread has stopped")]
    Stopped,
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// The way to the owner; cheap to clone, one per task that needs the kernel.
#[derive(Clone, Debug)]
pub struct DatapathHandle {
    // std's unbounded sender never blocks an async caller; the queue stays short because every
    // caller waits for its answer (the main loop sends one model at a time).
    tx: mpsc::Sender<Command>,
}

impl DatapathHandle {
    fn send(&self, cmd: Command) -> Result<(), OwnerError> {
        self.tx.send(cmd).map_err(|_| OwnerError::Stopped)
    }

    /// Reconciles `model` into the kernel.
    pub async fn reconcile(&self, model: ClusterModel) -> Result<ReconcileOutcome, OwnerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Reconcile { model, reply })?;
        rx.await.map_err(|_| OwnerError::Stopped)
    }

    /// Backends of these service addresses with their live circuit state.
    pub async fn backend_status(
        &self,
        keys: Vec<ServiceKey>,
    ) -> Result<ServiceBackends, OwnerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::BackendStatus { keys, reply })?;
        Ok(rx.await.map_err(|_| OwnerError::Stopped)??)
    }

    /// Reason counters read now (status reads the published [`KernelStats`] instead).
    pub async fn counters(&self) -> Result<Vec<(&'static str, u64)>, OwnerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Counters { reply })?;
        Ok(rx.await.map_err(|_| OwnerError::Stopped)??)
    }

    /// Reports an L7 failure of `backend_id`; `true` when it ejected the backend.
    pub async fn report_failure(&self, backend_id: u32) -> Result<bool, OwnerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ReportFailure {
            backend_id,
            now_monotonic_ns: crate::flows::monotonic_ns(),
            reply,
        })?;
        Ok(rx.await.map_err(|_| OwnerError::Stopped)??)
    }

    /// Reports an L7 success of `backend_id`; `false` when it is not a current backend.
    pub async fn report_success(&self, backend_id: u32) -> Result<bool, OwnerError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ReportSuccess {
            backend_id,
            now_monotonic_ns: crate::flows::monotonic_ns(),
            reply,
        })?;
        Ok(rx.await.map_err(|_| OwnerError::Stopped)??)
    }

    /// Asks the owner to stop (it finishes the command in hand first).
    pub fn shutdown(&self) {
        let _ = self.send(Command::Shutdown);
    }
}

/// Starts the owner thread with `dp`; it publishes into `stores`.
pub fn spawn(
    dp: Datapath,
    stores: Arc<Stores>,
    bypass: bool,
    cgroup_root: std::path::PathBuf,
) -> std::io::Result<(DatapathHandle, thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let join = thread::Builder::new()
        .name(THREAD_NAME.to_owned())
        .spawn(move || Owner::new(dp, stores, bypass, cgroup_root).run(&rx))?;
    Ok((DatapathHandle { tx }, join))
}

struct Owner {
    dp: Datapath,
    reconciler: Reconciler,
    mesh: MeshSync,
    stores: Arc<Stores>,
    generation: u64,
}

impl Owner {
    fn new(dp: Datapath, stores: Arc<Stores>, bypass: bool, cgroup_root: PathBuf) -> Self {
        Self {
            reconciler: Reconciler::new(&dp).with_bypass(bypass),
            mesh: MeshSync::new(cgroup_root, Arc::clone(&stores)),
            dp,
            stores,
            generation: 0,
        }
    }

    fn run(mut self, rx: &mpsc::Receiver<Command>) {
        self.publish_kernel_stats();
        let mut stats_at = Instant::now();
        loop {
            match rx.recv_timeout(KERNEL_STATS_INTERVAL) {
                Ok(Command::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(cmd) => self.handle(cmd),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if stats_at.elapsed() >= KERNEL_STATS_INTERVAL {
                // Pods whose cgroup appeared since the last reconciliation join the mesh now.
                let snap = self.stores.snapshot.load_full();
                if let Err(e) = self.mesh.rescan(&mut self.dp, &snap) {
                    warn!(error = %e, "writing the mesh workloads");
                }
                self.publish_kernel_stats();
                stats_at = Instant::now();
            }
        }
        info!("data-path owner stopped; programs stay attached through their pinned links");
    }

    fn handle(&mut self, cmd: Command) {
        // A caller that went away (a cancelled admin call) does not care for the answer.
        match cmd {
            Command::Reconcile { model, reply } => {
                let _ = reply.send(self.reconcile(model));
            }
            Command::BackendStatus { keys, reply } => {
                let _ = reply.send(Ok(self.dp.backend_status_many(keys)));
            }
            Command::Counters { reply } => {
                let _ = reply.send(self.dp.counters());
            }
            Command::ReportFailure {
                backend_id,
                now_monotonic_ns,
                reply,
            } => {
                let _ = reply.send(self.dp.report_failure(backend_id, now_monotonic_ns));
            }
            Command::ReportSuccess {
                backend_id,
                now_monotonic_ns,
                reply,
            } => {
                let _ = reply.send(self.dp.report_success(backend_id, now_monotonic_ns));
            }
            Command::Shutdown => {}
        }
    }

    fn reconcile(&mut self, model: ClusterModel) -> ReconcileOutcome {
        let started = Instant::now();
        let report = self.reconciler.reconcile(&mut self.dp, &model);
        // Connected UDP sockets still sending to a backend this reconciliation removed end now,
        // so their applications reconnect to a current one (kube-proxy's conntrack flush).
        let _ = self.dp.end_stale_udp_sockets();
        self.generation += 1;
        let snapshot = Arc::new(Snapshot::build(
            self.generation,
            model,
            self.reconciler.applied().clone(),
        ));
        let mut errors = report.errors;
        // Before the snapshot is published: the proxies name identities from the numbers this
        // writes, and authorize from the snapshot's view.
        match self.mesh.sync(&mut self.dp, &snapshot) {
            Ok(r) if r != MeshSyncReport::default() => debug!(
                endpoints = r.endpoints,
                workloads = r.workloads,
                verdicts = r.verdicts,
                "mesh maps written"
            ),
            Ok(_) => {}
            Err(source) => errors.push(ReconcileError::Mesh { source }),
        }
        // The previous snapshot is freed here, or by its last reader.
        self.stores.snapshot.store(snapshot);
        // Parsing and diffing a large model frees far more than it keeps; hand the freed heap
        // back to the kernel so the agent's resident size reflects what it holds.
        crate::heap::release_free();
        let took = started.elapsed();
        info!(
            generation = self.generation,
            applied = report.applied,
            removed = report.removed,
            unchanged = report.unchanged,
            errors = errors.len(),
            took_ms = took.as_millis() as u64,
            "reconciled"
        );
        self.publish_kernel_stats();
        ReconcileOutcome {
            generation: self.generation,
            applied: report.applied,
            removed: report.removed,
            unchanged: report.unchanged,
            errors,
            took,
        }
    }

    fn publish_kernel_stats(&self) {
        let (counters, error) = match self.dp.counters() {
            Ok(mut c) => {
                // Counted by the agent, not the kernel; shown beside the kernel's reasons.
                c.push(("udp_sockets_destroyed", self.dp.udp_sockets_destroyed()));
                c.push((
                    "udp_socket_destroy_failed",
                    self.dp.udp_socket_destroy_failures(),
                ));
                (c, None)
            }
            Err(e) => {
                warn!(error = %e, "reading the kernel counters");
                (
                    self.stores.kernel.load().counters.clone(),
                    Some(e.to_string()),
                )
            }
        };
        self.stores.kernel.store(Arc::new(KernelStats {
            counters,
            map_full_total: self.dp.map_full_total(),
            lb_table_bytes: self.dp.table_bytes() as u64,
            retired_backends: self.dp.retired_backends() as u64,
            read_at: Some(Instant::now()),
            error,
        }));
    }
}
