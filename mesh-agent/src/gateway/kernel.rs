//! The gateway's two links to the node's kernel data path, for one health picture: it skips
//! backends whose kernel circuit is open, read from the agent's pinned maps (`--pin-dir`), and
//! it reports its L7 outcomes to the node agent's admin API (`--agent-socket`,
//! `ReportBackendResult`), whose data-path owner feeds them to the kernel's outlier detection.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{Array, IterableMap as _, Map, MapData};
use mesh_common::{
    backend::{
        BACKEND_ADDRS_MAP, BACKEND_STATE_MAP, BACKENDS_CAPACITY, BackendAddr, BackendState,
        CIRCUIT_OPEN,
    },
    logic::circuit,
};
use tokio::sync::mpsc;

use super::backends::{CircuitView, HealthFeedback, ServiceBackends};
use crate::{admin::proto::ReportBackendResultRequest, datapath::ip_from_be};

/// How often the open circuits are read from the pinned maps. The kernel ejects for 30 s by
/// default, so half a second of lag costs a handful of requests at most; each read copies
/// `BACKEND_STATE` with `BPF_MAP_LOOKUP_BATCH` (a few dozen syscalls) and reads the address of
/// each open circuit only.
pub const CIRCUIT_REFRESH: Duration = Duration::from_millis(500);
/// Reports waiting for the admin socket; past it they are dropped (counted): the gateway's own
/// outlier detection still acts on them.
pub const REPORT_QUEUE: usize = 1024;

/// Why the pinned maps could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum KernelViewError {
    #[error("opening pinned map {path}: {reason}")]
    Open { path: PathBuf, reason: String },
}

fn open_map(pin_dir: &Path, name: &str) -> Result<MapData, KernelViewError> {
    let path = pin_dir.join("maps").join(name);
    MapData::from_pin(&path).map_err(|e| KernelViewError::Open {
        path: path.clone(),
        reason: e.to_string(),
    })
}

/// Open kernel circuits of the node, read from the agent's pinned `BACKEND_STATE` and
/// `BACKEND_ADDRS` (never written here). The kernel keeps a circuit per service and backend;
/// an address is skipped when any of its circuits is open (the gateway's endpoints are pods,
/// whose failures are the pod's, whichever Service dialled them).
#[derive(Debug)]
pub struct PinnedCircuits {
    open: Arc<ArcSwap<HashSet<SocketAddr>>>,
}

struct Maps {
    addrs: Array<MapData, BackendAddr>,
    state: Array<MapData, BackendState>,
}

impl Maps {
    fn open(pin_dir: &Path) -> Result<Self, KernelViewError> {
        let err = |name: &str, e: aya::maps::MapError| KernelViewError::Open {
            path: pin_dir.join("maps").join(name),
            reason: e.to_string(),
        };
        let addrs = Array::try_from(Map::Array(open_map(pin_dir, BACKEND_ADDRS_MAP)?))
            .map_err(|e| err(BACKEND_ADDRS_MAP, e))?;
        let state = Array::try_from(Map::Array(open_map(pin_dir, BACKEND_STATE_MAP)?))
            .map_err(|e| err(BACKEND_STATE_MAP, e))?;
        Ok(Self { addrs, state })
    }

    /// Addresses with an open circuit whose ejection has not ended (past its deadline the
    /// kernel admits a probe: so may the gateway).
    fn open_circuits(&self, now_ns: u64) -> HashSet<SocketAddr> {
        let mut open = HashSet::new();
        let fd = self.state.map().fd().as_fd().as_raw_fd();
        let states: Vec<BackendState> = crate::datapath::lookup_batch(fd, BACKENDS_CAPACITY)
            .unwrap_or_else(|_| {
                // A kernel without batch lookups: slot by slot.
                (0..BACKENDS_CAPACITY)
                    .map(|s| self.state.get(&s, 0).unwrap_or_default())
                    .collect()
            });
        for (slot, st) in states.iter().enumerate() {
            if st.id == 0
                || circuit::state(st.circuit) != CIRCUIT_OPEN
                || circuit::deadline(st.circuit) <= now_ns
            {
                continue;
            }
            // The address slot must be this id's and not removed from its service.
            let Ok(b) = self.addrs.get(&(slot as u32), 0) else {
                continue;
            };
            if b.id == st.id && b.service_id != 0 {
                open.insert(SocketAddr::new(
                    ip_from_be(b.addr_be, b.family),
                    u16::from_be(b.port_be),
                ));
            }
        }
        open
    }
}

impl PinnedCircuits {
    /// Opens the maps under `pin_dir` (the agent's `--pin-dir`) and starts a thread that reads
    /// them every [`CIRCUIT_REFRESH`] (blocking syscalls stay off the async workers).
    pub fn start(pin_dir: &Path) -> Result<Self, KernelViewError> {
        let maps = Maps::open(pin_dir)?;
        let open = Arc::new(ArcSwap::from_pointee(HashSet::new()));
        let out = open.clone();
        std::thread::Builder::new()
            .name("gw-circuits".into())
            .spawn(move || {
                loop {
                    let now = crate::flows::monotonic_ns();
                    out.store(Arc::new(maps.open_circuits(now)));
                    std::thread::sleep(CIRCUIT_REFRESH);
                }
            })
            .map_err(|e| KernelViewError::Open {
                path: pin_dir.to_owned(),
                reason: format!("starting the reader thread: {e}"),
            })?;
        Ok(Self { open })
    }
}

impl CircuitView for PinnedCircuits {
    fn is_open(&self, addr: SocketAddr) -> bool {
        self.open.load().contains(&addr)
    }
    fn any_open(&self) -> bool {
        !self.open.load().is_empty()
    }
    fn describe(&self) -> &'static str {
        "kernel circuits read from the node agent's pinned maps, plus gateway-local outlier detection"
    }
}

#[derive(Debug)]
struct Report {
    vip: SocketAddr,
    backend: SocketAddr,
    success: bool,
}

/// Sends L7 outcomes to the node agent (`ReportBackendResult` on its admin socket): every
/// failure, and the first success after failures (what resets the kernel's consecutive count,
/// as Envoy resets `consecutive_5xx` on a non-5xx; the successes in between change nothing
/// there, so they cost no call).
#[derive(Debug)]
pub struct AdminFeedback {
    tx: mpsc::Sender<Report>,
    /// (service VIP, backend) with a failure reported and no success since.
    failed: Mutex<HashSet<(SocketAddr, SocketAddr)>>,
    failed_len: AtomicUsize,
    dropped: Arc<AtomicU64>,
}

impl AdminFeedback {
    /// Starts the reporting task towards `socket`; it connects (and reconnects) on demand.
    #[must_use]
    pub fn start(socket: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(report_loop(socket, rx, dropped.clone()));
        Self {
            tx,
            failed: Mutex::new(HashSet::new()),
            failed_len: AtomicUsize::new(0),
            dropped,
        }
    }

    fn send(&self, r: Report) {
        if self.tx.try_send(r).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "L7 reports to the node agent dropped (queue full)"
                );
            }
        }
    }
}

impl HealthFeedback for AdminFeedback {
    fn failure(&self, service: &ServiceBackends, addr: SocketAddr, why: &str) {
        let Some(vip) = service.vip_for(addr) else {
            return;
        };
        tracing::debug!(service = %service.name, %addr, why, "L7 failure reported to the node agent");
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        failed.insert((vip, addr));
        self.failed_len.store(failed.len(), Ordering::Relaxed);
        drop(failed);
        self.send(Report {
            vip,
            backend: addr,
            success: false,
        });
    }

    fn success(&self, service: &ServiceBackends, addr: SocketAddr) {
        // The common case (no failure outstanding) takes no lock.
        if self.failed_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let Some(vip) = service.vip_for(addr) else {
            return;
        };
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        let was = failed.remove(&(vip, addr));
        self.failed_len.store(failed.len(), Ordering::Relaxed);
        drop(failed);
        if was {
            self.send(Report {
                vip,
                backend: addr,
                success: true,
            });
        }
    }
}

async fn report_loop(socket: PathBuf, mut rx: mpsc::Receiver<Report>, dropped: Arc<AtomicU64>) {
    let mut client = None;
    let mut warned = false;
    while let Some(r) = rx.recv().await {
        if client.is_none() {
            match crate::admin::connect(&socket).await {
                Ok(c) => {
                    tracing::info!(socket = %socket.display(), "reporting L7 outcomes to the node agent");
                    client = Some(c);
                    warned = false;
                }
                Err(e) => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    if !warned {
                        tracing::warn!(socket = %socket.display(), error = %e, "node agent not reachable: L7 reports dropped until it is");
                        warned = true;
                    }
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let req = ReportBackendResultRequest {
            service_address: r.vip.to_string(),
            backend_address: r.backend.to_string(),
            success: r.success,
        };
        match c.report_backend_result(req).await {
            Ok(resp) => {
                if resp.get_ref().ejected {
                    tracing::info!(service = %r.vip, backend = %r.backend, "the kernel ejected the backend on the gateway's reports");
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                // A backend the kernel does not have (yet, or any more): nothing to count.
                tracing::debug!(service = %r.vip, backend = %r.backend, "{}", s.message());
            }
            Err(s) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %s, "L7 report to the node agent failed");
                if s.code() == tonic::Code::Unavailable {
                    client = None;
                }
            }
        }
    }
}
