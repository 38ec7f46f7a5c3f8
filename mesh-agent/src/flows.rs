//! Flow events from the kernel ring, enriched with pod and service names, kept in a bounded
//! recent-history buffer and broadcast live to `meshctl flows --follow` watchers.

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use mesh_common::{
    PROTO_UDP,
    counters::COUNTER_NAMES,
    event::{
        EV_CLOSE, EV_EJECT, EV_FAIL, EV_OPEN, EV_RECOVER, EV_REJECT, FAIL_L7, FAIL_REFUSED,
        FAIL_RESET, FAIL_SYN_TIMEOUT, FlowEvent,
    },
};
use tokio::sync::broadcast;

use crate::{admin::proto::Flow, datapath::events, datapath::ip_from_be};

/// Flows kept for `meshctl flows` without `--follow`.
pub const RECENT_CAPACITY: usize = 10_000;
/// Live subscribers that fall this far behind lose the oldest flows (and are told how many).
pub const BROADCAST_CAPACITY: usize = 4096;

/// Names for what the kernel reports by address or cgroup; filled from the cluster model.
pub trait Names {
    /// `(namespace, pod)` of a pod address.
    fn pod_by_ip(&self, ip: IpAddr) -> Option<(String, String)>;
    /// `namespace/name` of the service owning an address and protocol.
    fn service_by_addr(&self, addr: SocketAddr, udp: bool) -> Option<String>;
    /// `(namespace, pod)` of a cgroup v2 id (for rejects, where no address is bound yet).
    fn pod_by_cgroup(&self, cgroup_id: u64) -> Option<(String, String)>;
}

/// Recent flows and live subscribers.
pub struct FlowHub {
    recent: Mutex<VecDeque<Flow>>,
    live: broadcast::Sender<Flow>,
    /// Wall-clock minus monotonic, to stamp kernel times (`bpf_ktime_get_ns`) as Unix time.
    wall_offset_ns: u64,
    /// Flows a live watcher missed because it fell behind (the agent's own drops; the kernel
    /// counts the ring's in `event_dropped`).
    lagged_total: AtomicU64,
    /// Flows read from the kernel ring.
    received_total: AtomicU64,
}

impl Default for FlowHub {
    fn default() -> Self {
        Self::new()
    }
}

impl FlowHub {
    #[must_use]
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            recent: Mutex::new(VecDeque::with_capacity(RECENT_CAPACITY)),
            live: broadcast::channel(BROADCAST_CAPACITY).0,
            wall_offset_ns: wall.saturating_sub(monotonic_ns()),
            lagged_total: AtomicU64::new(0),
            received_total: AtomicU64::new(0),
        }
    }

    /// Turns a kernel event into a named flow.
    pub fn enrich(&self, e: &FlowEvent, names: &dyn Names) -> Flow {
        let svc = SocketAddr::new(
            ip_from_be(e.svc_addr_be, e.family),
            u16::from_be(e.svc_port_be),
        );
        let backend = SocketAddr::new(
            ip_from_be(e.backend_addr_be, e.family),
            u16::from_be(e.backend_port_be),
        );
        let client = ip_from_be(e.client_addr_be, e.family);
        let known_client = !client.is_unspecified();
        let (ns, pod) = known_client
            .then(|| names.pod_by_ip(client))
            .flatten()
            .or_else(|| names.pod_by_cgroup(e.cgroup_id))
            .unwrap_or_default();
        Flow {
            time_unix_nano: e.ts_ns + self.wall_offset_ns,
            verdict: verdict(e.kind).to_owned(),
            reason: reason(e.kind, e.reason),
            source_namespace: ns,
            source_pod: pod,
            source_address: if known_client {
                client.to_string()
            } else {
                String::new()
            },
            service: names
                .service_by_addr(svc, e.proto == PROTO_UDP)
                .unwrap_or_default(),
            service_address: svc.to_string(),
            backend_address: if e.backend_id != 0 {
                backend.to_string()
            } else {
                String::new()
            },
            protocol: if e.proto == PROTO_UDP { "UDP" } else { "TCP" }.to_owned(),
            bytes_sent: e.bytes_sent,
            bytes_received: e.bytes_received,
            duration_us: e.duration_ns / 1000,
            cgroup_id: e.cgroup_id,
        }
    }

    /// Records a flow and sends it to live watchers.
    pub fn publish(&self, flow: Flow) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            if recent.len() == RECENT_CAPACITY {
                recent.pop_front();
            }
            recent.push_back(flow.clone());
        }
        let _ = self.live.send(flow);
    }

    /// A copy of the recent flows, oldest first.
    #[must_use]
    pub fn recent(&self) -> Vec<Flow> {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Notes flows a live watcher missed.
    pub fn note_lagged(&self, missed: u64) {
        self.lagged_total.fetch_add(missed, Ordering::Relaxed);
    }

    /// Flows live watchers missed so far.
    #[must_use]
    pub fn lagged_total(&self) -> u64 {
        self.lagged_total.load(Ordering::Relaxed)
    }

    /// Flows read from the kernel so far.
    #[must_use]
    pub fn received_total(&self) -> u64 {
        self.received_total.load(Ordering::Relaxed)
    }

    /// A live subscription.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Flow> {
        self.live.subscribe()
    }

    /// Reads the kernel ring whenever it has data, until the process ends. The ring has exactly
    /// one reader: this task. Names come from `names` without waiting for a reconciliation (the
    /// agent's come from the published snapshot), so the ring is drained while one runs.
    pub async fn pump(
        self: Arc<Self>,
        ring: RingBuf<MapData>,
        names: Arc<dyn Names + Send + Sync>,
    ) {
        crate::logging::on_readable("flow event ring", ring, |ring| {
            for e in events::drain(ring) {
                self.received_total.fetch_add(1, Ordering::Relaxed);
                self.publish(self.enrich(&e, names.as_ref()));
            }
        })
        .await;
    }
}

fn verdict(kind: u8) -> &'static str {
    match kind {
        EV_OPEN => "open",
        EV_CLOSE => "close",
        EV_REJECT => "reject",
        EV_FAIL => "fail",
        EV_EJECT => "eject",
        EV_RECOVER => "recover",
        _ => "unknown",
    }
}

fn reason(kind: u8, reason: u8) -> String {
    match (kind, reason) {
        (_, 0) => String::new(),
        (EV_REJECT, r) => COUNTER_NAMES
            .get(usize::from(r))
            .map_or_else(|| r.to_string(), |s| (*s).to_owned()),
        (_, FAIL_REFUSED) => "refused".to_owned(),
        (_, FAIL_SYN_TIMEOUT) => "syn-timeout".to_owned(),
        (_, FAIL_RESET) => "reset".to_owned(),
        (_, FAIL_L7) => "l7".to_owned(),
        (_, r) => r.to_string(),
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec.cast_unsigned() * 1_000_000_000 + ts.tv_nsec.cast_unsigned()
}
