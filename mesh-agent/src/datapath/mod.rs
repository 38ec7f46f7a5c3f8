//! The only module that touches aya: loads the kernel object, pins and attaches its programs,
//! and offers typed operations on its maps (services, backends, circuits, counters, events).

pub mod bpfsys;
pub mod cleanup;
pub mod coexist;
pub mod error;
pub mod events;
mod link;
pub mod probe;
pub mod spec;
pub mod table;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    programs::{BtfTracePoint, CgroupAttachMode, SkMsg, links::FdLink},
};
use mesh_common::{
    AddrBe, FAMILY_V4, FAMILY_V6,
    backend::{
        BACKEND_STATE_MAP, BACKENDS_CAPACITY, BACKENDS_MAP, Backend, BackendState, CIRCUIT_CLOSED,
        CIRCUIT_OPEN,
    },
    bypass::{
        BYPASS_SOCKS_MAP, EndpointKey, LOCAL_ENDPOINTS_CAPACITY, LOCAL_ENDPOINTS_MAP,
        LocalEndpoint, SockKey,
    },
    counters::{COUNTER_NAMES, COUNTERS_MAP},
    event::EVENTS_MAP,
    service::{
        AFFINITY_MAP, BACKEND_SLOTS_CAPACITY, BACKEND_SLOTS_MAP, LB_TABLE_SIZE, LB_TABLE_SLOTS,
        LB_TABLES_MAP, LbTable, SERVICE_STATE_MAP, SERVICES_CAPACITY, SERVICES_MAP, SVC_F_AFFINITY,
        Service, ServiceKey, ServiceState, SlotKey,
    },
    sock::{REVNAT_MAP, SOCK_STATE_MAP},
};
use tracing::{debug, info};

pub use self::error::DatapathError;
use self::spec::{Protocol, ServiceSpec};

/// The kernel object built by `cargo xtask build-ebpf`, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

/// Every map of the object, pinned under the pin directory so a restarted agent adopts them.
pub const MAP_NAMES: [&str; 13] = [
    SERVICES_MAP,
    BACKEND_SLOTS_MAP,
    LB_TABLES_MAP,
    SERVICE_STATE_MAP,
    AFFINITY_MAP,
    BACKENDS_MAP,
    BACKEND_STATE_MAP,
    SOCK_STATE_MAP,
    REVNAT_MAP,
    LOCAL_ENDPOINTS_MAP,
    BYPASS_SOCKS_MAP,
    COUNTERS_MAP,
    EVENTS_MAP,
];

/// Programs attached to the cgroup through pinned links (function name = link pin name).
pub const CGROUP_PROGRAMS: [&str; 9] = [
    "mesh_connect4",
    "mesh_connect6",
    "mesh_sendmsg4",
    "mesh_sendmsg6",
    "mesh_recvmsg4",
    "mesh_recvmsg6",
    "mesh_getpeername4",
    "mesh_getpeername6",
    "mesh_sockops",
];
const SK_MSG_PROGRAM: &str = "mesh_sk_msg";
/// `tp_btf/tcp_receive_reset`: tells a backend's reset from the application's abortive close.
pub const RESET_PROGRAM: &str = "mesh_tcp_receive_reset";

/// Where to attach and pin.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// cgroup v2 directory whose processes (and descendants) the mesh serves.
    pub cgroup: PathBuf,
    /// bpffs directory for pinned maps (`maps/`) and links (`links/`).
    pub pin_dir: PathBuf,
}

/// Circuit and counters of one backend, as the kernel sees it now.
#[derive(Clone, Debug)]
pub struct BackendStatus {
    pub id: u32,
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: BackendState,
}

/// The service's ids as applied to the maps.
#[derive(Clone, Debug, Default)]
struct Applied {
    id: u32,
    /// Backend ids in slot order.
    backends: Vec<u32>,
    /// Their addresses, parallel to `backends` (how an update finds a backend's id again).
    addrs: Vec<SocketAddr>,
}

/// The loaded, attached data path and typed access to its maps.
pub struct Datapath {
    _ebpf: Ebpf,
    pin_dir: PathBuf,
    services: HashMap<MapData, ServiceKey, Service>,
    slots: HashMap<MapData, SlotKey, u32>,
    tables: HashMap<MapData, u32, LbTable>,
    service_state: HashMap<MapData, u32, ServiceState>,
    backends: HashMap<MapData, u32, Backend>,
    backend_state: HashMap<MapData, u32, BackendState>,
    local_endpoints: HashMap<MapData, EndpointKey, LocalEndpoint>,
    counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    applied: BTreeMap<ServiceKey, Applied>,
    /// Writes refused because a map would overflow (exported as a metric).
    map_full_total: u64,
    /// Backends in `BACKENDS` (ids are per service, so this is the sum over `applied`).
    backend_total: usize,
    /// Slots in use over all services (kept, not summed, so updates stay O(backends)).
    used_slots: usize,
    next_service_id: u32,
    next_backend_id: u32,
    free_service_ids: Vec<u32>,
    free_backend_ids: Vec<u32>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(map_err("open", name))
}

/// The map key of a service address.
#[must_use]
pub fn service_key(vip: SocketAddr, protocol: Protocol) -> ServiceKey {
    let (addr_be, family) = addr_be(vip.ip());
    ServiceKey {
        addr_be,
        port_be: vip.port().to_be(),
        proto: protocol.number(),
        family,
    }
}

/// An IP address in the contract's layout, with its family.
#[must_use]
pub fn addr_be(ip: IpAddr) -> (AddrBe, u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// The inverse of [`addr_be`].
#[must_use]
pub fn ip_from_be(addr: AddrBe, family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from(addr[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

/// Maps a failed map operation to an error naming the operation and the map.
fn map_err(op: &'static str, name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { op, name, source }
}

/// The kernel's view of a service's settings.
fn service_value(id: u32, spec: &ServiceSpec, backend_count: usize) -> Service {
    let c = &spec.circuit;
    Service {
        id,
        backend_count: backend_count as u32,
        algorithm: spec.algorithm.code(),
        flags: if spec.affinity_timeout.is_some() {
            SVC_F_AFFINITY
        } else {
            0
        },
        _pad: 0,
        affinity_timeout_s: spec
            .affinity_timeout
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
        max_connections: c.max_connections,
        consecutive_failures: c.consecutive_failures,
        base_ejection_ms: ms(c.base_ejection),
        max_ejection_ms: ms(c.max_ejection),
        max_ejection_pct: c.max_ejection_percent,
    }
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Datapath {
    /// Loads the embedded object, adopting maps and links already pinned under
    /// `cfg.pin_dir` (a restart), attaching what is not attached yet.
    pub fn load(cfg: &DatapathConfig) -> Result<Self, DatapathError> {
        let kernel = probe::probe()?;
        let maps_dir = cfg.pin_dir.join("maps");
        let links_dir = cfg.pin_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::Io {
                op: "create pin directory",
                path: dir.clone(),
                source,
            })?;
        }
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|n| (*n, maps_dir.join(n))).collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(aya_log::Error::MapNotFound) => None,
            Err(e) => return Err(DatapathError::Log(e.to_string())),
        };
        let cgroup = std::fs::File::open(&cfg.cgroup).map_err(|source| DatapathError::Io {
            op: "open cgroup",
            path: cfg.cgroup.clone(),
            source,
        })?;
        for name in CGROUP_PROGRAMS {
            attach_cgroup_program(&mut ebpf, name, &cgroup, &links_dir.join(name))?;
        }
        if kernel.reset_tracepoint {
            attach_reset_tracepoint(&mut ebpf, &links_dir.join(RESET_PROGRAM))?;
        }
        {
            let name = SK_MSG_PROGRAM;
            let socks: SockHash<MapData, SockKey> = take(&mut ebpf, BYPASS_SOCKS_MAP)?;
            let prog: &mut SkMsg = program(&mut ebpf, name)?;
            prog.load().map_err(|source| DatapathError::Program {
                op: "load",
                name,
                source,
            })?;
            // Attaching replaces a previous agent's program; the attachment belongs to the pinned
            // map, so it must outlive this process: forget the link instead of detaching on drop.
            let id = prog
                .attach(socks.fd())
                .map_err(|source| DatapathError::Program {
                    op: "attach",
                    name,
                    source,
                })?;
            let link = prog
                .take_link(id)
                .map_err(|source| DatapathError::Program {
                    op: "take link of",
                    name,
                    source,
                })?;
            std::mem::forget(link);
        }
        let mut dp = Self {
            services: take(&mut ebpf, SERVICES_MAP)?,
            slots: take(&mut ebpf, BACKEND_SLOTS_MAP)?,
            tables: take(&mut ebpf, LB_TABLES_MAP)?,
            service_state: take(&mut ebpf, SERVICE_STATE_MAP)?,
            backends: take(&mut ebpf, BACKENDS_MAP)?,
            backend_state: take(&mut ebpf, BACKEND_STATE_MAP)?,
            local_endpoints: take(&mut ebpf, LOCAL_ENDPOINTS_MAP)?,
            counters: take(&mut ebpf, COUNTERS_MAP)?,
            events: Some(take(&mut ebpf, EVENTS_MAP)?),
            logger,
            _ebpf: ebpf,
            pin_dir: cfg.pin_dir.clone(),
            applied: BTreeMap::new(),
            map_full_total: 0,
            backend_total: 0,
            used_slots: 0,
            next_service_id: 1,
            next_backend_id: 1,
            free_service_ids: Vec::new(),
            free_backend_ids: Vec::new(),
        };
        dp.adopt()?;
        info!(cgroup = %cfg.cgroup.display(), pins = %cfg.pin_dir.display(), services = dp.applied.len(), "data path attached");
        Ok(dp)
    }

    /// Rebuilds the id bookkeeping from maps a previous agent left pinned.
    fn adopt(&mut self) -> Result<(), DatapathError> {
        let services: Vec<(ServiceKey, Service)> = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("read", SERVICES_MAP))?;
        let all: StdHashMap<u32, Backend> = self
            .backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("read", BACKENDS_MAP))?;
        for id in all.keys() {
            self.next_backend_id = self.next_backend_id.max(id + 1);
        }
        let mut referenced = std::collections::HashSet::new();
        for (key, svc) in services {
            let mut applied = Applied {
                id: svc.id,
                ..Applied::default()
            };
            for slot in 0..svc.backend_count {
                let Ok(id) = self.slots.get(
                    &SlotKey {
                        service_id: svc.id,
                        slot,
                    },
                    0,
                ) else {
                    continue;
                };
                if let Some(b) = all.get(&id) {
                    applied.backends.push(id);
                    applied.addrs.push(SocketAddr::new(
                        ip_from_be(b.addr_be, b.family),
                        u16::from_be(b.port_be),
                    ));
                    referenced.insert(id);
                }
            }
            self.next_service_id = self.next_service_id.max(svc.id + 1);
            self.used_slots += applied.backends.len();
            self.backend_total += applied.backends.len();
            self.applied.insert(key, applied);
        }
        // Backends no slot points at (an agent killed mid-update) are stale.
        for id in all.keys().filter(|id| !referenced.contains(*id)) {
            let _ = self.backends.remove(id);
            let _ = self.backend_state.remove(id);
        }
        Ok(())
    }

    /// The pin directory (maps and links).
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Services currently in the kernel, by key.
    pub fn service_keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.applied.keys()
    }

    fn alloc_service_id(&mut self) -> u32 {
        self.free_service_ids.pop().unwrap_or_else(|| {
            self.next_service_id += 1;
            self.next_service_id - 1
        })
    }

    fn alloc_backend_id(&mut self) -> u32 {
        self.free_backend_ids.pop().unwrap_or_else(|| {
            self.next_backend_id += 1;
            self.next_backend_id - 1
        })
    }

    /// Rejects a spec the kernel could not serve, and one that would overflow a map, before any
    /// map is touched.
    fn check(&self, spec: &ServiceSpec, key: &ServiceKey) -> Result<(), DatapathError> {
        let name = || format!("{}/{:?}", spec.vip, spec.protocol);
        for b in &spec.backends {
            let reason = if b.addr.is_ipv4() != spec.vip.is_ipv4() {
                format!("backend {} is not of the service's address family", b.addr)
            } else if b.weight == 0 {
                format!("backend {} has weight 0", b.addr)
            } else {
                continue;
            };
            return Err(DatapathError::InvalidService {
                service: name(),
                reason,
            });
        }
        let old = self.applied.get(key);
        let full = |name: &'static str, capacity: u32, what: String| DatapathError::MapFull {
            name,
            capacity,
            what,
        };
        if old.is_none() && self.applied.len() >= SERVICES_CAPACITY as usize {
            return Err(full(SERVICES_MAP, SERVICES_CAPACITY, name()));
        }
        let new_backends = spec
            .backends
            .iter()
            .filter(|b| old.is_none_or(|a| !a.addrs.contains(&b.addr)))
            .count();
        // New entries are written before stale ones go: the peak is what must fit.
        if self.backend_total + new_backends > BACKENDS_CAPACITY as usize {
            return Err(full(BACKENDS_MAP, BACKENDS_CAPACITY, name()));
        }
        let used_slots = self.used_slots - old.map_or(0, |a| a.backends.len());
        if used_slots + spec.backends.len() > BACKEND_SLOTS_CAPACITY as usize {
            return Err(full(BACKEND_SLOTS_MAP, BACKEND_SLOTS_CAPACITY, name()));
        }
        Ok(())
    }

    /// Writes a service, its backends and settings. Existing connections are never touched:
    /// the kernel translated them at connect time. Backends keep their ids (and circuit state)
    /// across updates; new entries are written before the service points at them, and stale
    /// ones removed after.
    pub fn apply_service(&mut self, spec: &ServiceSpec) -> Result<u32, DatapathError> {
        let key = service_key(spec.vip, spec.protocol);
        self.check(spec, &key).inspect_err(|e| self.note_full(e))?;
        let old = self.applied.get(&key).cloned();
        let old_len = old.as_ref().map_or(0, |a| a.backends.len());
        let svc_id = old
            .as_ref()
            .map_or_else(|| self.alloc_service_id(), |a| a.id);
        // 1. Backends (and fresh state for new ones), slots, the lookup table.
        let ids = self.write_backends(svc_id, spec, old.as_ref())?;
        self.write_slots_and_table(svc_id, spec, &ids)?;
        if old.is_none() {
            self.service_state
                .insert(svc_id, ServiceState::default(), 0)
                .map_err(map_err("write", SERVICE_STATE_MAP))?;
        }
        // 2. The service itself: from here on the kernel uses the new backends.
        self.services
            .insert(key, service_value(svc_id, spec, ids.len()), 0)
            .map_err(map_err("write", SERVICES_MAP))?;
        // 3. Remove what the service no longer uses.
        if let Some(old) = old {
            for slot in ids.len()..old.backends.len() {
                let _ = self.slots.remove(&SlotKey {
                    service_id: svc_id,
                    slot: slot as u32,
                });
            }
            for id in old.backends.iter().filter(|id| !ids.contains(id)) {
                self.drop_backend(*id);
            }
            if !spec.algorithm.uses_table() {
                let _ = self.tables.remove(&svc_id);
            }
        }
        self.used_slots = self.used_slots + ids.len() - old_len;
        self.applied.insert(
            key,
            Applied {
                id: svc_id,
                backends: ids,
                addrs: spec.backends.iter().map(|b| b.addr).collect(),
            },
        );
        Ok(svc_id)
    }

    fn write_backends(
        &mut self,
        svc_id: u32,
        spec: &ServiceSpec,
        old: Option<&Applied>,
    ) -> Result<Vec<u32>, DatapathError> {
        let known: StdHashMap<SocketAddr, u32> = old
            .map(|a| {
                a.addrs
                    .iter()
                    .copied()
                    .zip(a.backends.iter().copied())
                    .collect()
            })
            .unwrap_or_default();
        let mut ids = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let (id, fresh) = match known.get(&b.addr) {
                Some(id) => (*id, false),
                None => (self.alloc_backend_id(), true),
            };
            let (addr_be, family) = addr_be(b.addr.ip());
            let value = Backend {
                addr_be,
                port_be: b.addr.port().to_be(),
                family,
                _pad: 0,
                service_id: svc_id,
                weight: b.weight,
            };
            self.backends
                .insert(id, value, 0)
                .map_err(map_err("write", BACKENDS_MAP))?;
            if fresh {
                self.backend_state
                    .insert(id, BackendState::default(), 0)
                    .map_err(map_err("write", BACKEND_STATE_MAP))?;
                self.backend_total += 1;
            }
            ids.push(id);
        }
        Ok(ids)
    }

    fn write_slots_and_table(
        &mut self,
        svc_id: u32,
        spec: &ServiceSpec,
        ids: &[u32],
    ) -> Result<(), DatapathError> {
        for (slot, id) in ids.iter().enumerate() {
            let k = SlotKey {
                service_id: svc_id,
                slot: slot as u32,
            };
            self.slots
                .insert(k, id, 0)
                .map_err(map_err("write", BACKEND_SLOTS_MAP))?;
        }
        if !spec.algorithm.uses_table() || ids.is_empty() {
            return Ok(());
        }
        let backend_ids = if spec.algorithm == spec::Algorithm::Maglev {
            let names: Vec<Vec<u8>> = spec
                .backends
                .iter()
                .map(|b| b.addr.to_string().into_bytes())
                .collect();
            table::maglev(&names, ids)
        } else {
            let weights: Vec<u32> = spec.backends.iter().map(|b| b.weight).collect();
            table::weighted(&weights, ids)
        };
        let mut table = LbTable::default();
        table.backend_ids[..LB_TABLE_SIZE].copy_from_slice(&backend_ids);
        // Storage past the modulus is never indexed; keep it valid anyway.
        table.backend_ids[LB_TABLE_SIZE..]
            .copy_from_slice(&backend_ids[..LB_TABLE_SLOTS - LB_TABLE_SIZE]);
        self.tables
            .insert(svc_id, table, 0)
            .map_err(map_err("write", LB_TABLES_MAP))
    }

    fn note_full(&mut self, e: &DatapathError) {
        if matches!(e, DatapathError::MapFull { .. }) {
            self.map_full_total += 1;
        }
    }

    /// How many writes were refused because a map would have overflowed.
    #[must_use]
    pub fn map_full_total(&self) -> u64 {
        self.map_full_total
    }

    fn drop_backend(&mut self, id: u32) {
        let _ = self.backends.remove(&id);
        let _ = self.backend_state.remove(&id);
        self.backend_total -= 1;
        self.free_backend_ids.push(id);
    }

    /// Removes a service; its existing connections go on undisturbed.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<bool, DatapathError> {
        let Some(applied) = self.applied.remove(key) else {
            return Ok(false);
        };
        self.used_slots -= applied.backends.len();
        self.services
            .remove(key)
            .map_err(map_err("delete", SERVICES_MAP))?;
        for slot in 0..applied.backends.len() {
            let _ = self.slots.remove(&SlotKey {
                service_id: applied.id,
                slot: slot as u32,
            });
        }
        for id in applied.backends {
            self.drop_backend(id);
        }
        let _ = self.tables.remove(&applied.id);
        let _ = self.service_state.remove(&applied.id);
        self.free_service_ids.push(applied.id);
        Ok(true)
    }

    /// Sets the pod addresses of this node (for same-node bypass), adding and removing the
    /// difference only.
    pub fn set_local_endpoints(&mut self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        if addrs.len() > LOCAL_ENDPOINTS_CAPACITY as usize {
            self.map_full_total += 1;
            return Err(DatapathError::MapFull {
                name: LOCAL_ENDPOINTS_MAP,
                capacity: LOCAL_ENDPOINTS_CAPACITY,
                what: format!("{} local pod addresses", addrs.len()),
            });
        }
        let want: Vec<EndpointKey> = addrs
            .iter()
            .map(|ip| EndpointKey {
                addr_be: addr_be(*ip).0,
            })
            .collect();
        let have: Vec<EndpointKey> = self.local_endpoints.keys().filter_map(Result::ok).collect();
        for k in have.iter().filter(|k| !want.contains(k)) {
            let _ = self.local_endpoints.remove(k);
        }
        for k in want.iter().filter(|k| !have.contains(k)) {
            self.local_endpoints
                .insert(k, LocalEndpoint::default(), 0)
                .map_err(map_err("write", LOCAL_ENDPOINTS_MAP))?;
        }
        Ok(())
    }

    /// The backends of a service with their circuit state and counters, in slot order.
    pub fn backend_status(&self, key: &ServiceKey) -> Result<Vec<BackendStatus>, DatapathError> {
        let Some(applied) = self.applied.get(key) else {
            return Ok(Vec::new());
        };
        applied
            .backends
            .iter()
            .map(|id| {
                let b = self
                    .backends
                    .get(id, 0)
                    .map_err(map_err("read", BACKENDS_MAP))?;
                let state = self.backend_state.get(id, 0).unwrap_or_default();
                let addr =
                    SocketAddr::new(ip_from_be(b.addr_be, b.family), u16::from_be(b.port_be));
                Ok(BackendStatus {
                    id: *id,
                    addr,
                    weight: b.weight,
                    state,
                })
            })
            .collect()
    }

    /// Reason counters summed over CPUs, named.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        COUNTER_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let v = self
                    .counters
                    .get(&(i as u32), 0)
                    .map_err(map_err("read", COUNTERS_MAP))?;
                Ok((*name, v.iter().sum()))
            })
            .collect()
    }

    /// One counter by its `CTR_*` index.
    pub fn counter(&self, idx: u32) -> Result<u64, DatapathError> {
        let v = self
            .counters
            .get(&idx, 0)
            .map_err(map_err("read", COUNTERS_MAP))?;
        Ok(v.iter().sum())
    }

    /// An L7 failure seen by a proxy (HTTP 5xx, gRPC UNAVAILABLE…) feeds the same circuit as the
    /// kernel's L4 signals. Read-modify-write from userspace: a race with a kernel update can
    /// lose one count, never corrupt the state.
    pub fn report_failure(
        &mut self,
        backend_id: u32,
        now_monotonic_ns: u64,
    ) -> Result<bool, DatapathError> {
        let Ok(mut st) = self.backend_state.get(&backend_id, 0) else {
            return Ok(false);
        };
        let Some((key, applied)) = self
            .applied
            .iter()
            .find(|(_, a)| a.backends.contains(&backend_id))
        else {
            return Ok(false);
        };
        let svc = self
            .services
            .get(key, 0)
            .map_err(map_err("read", SERVICES_MAP))?;
        let _ = applied;
        st.failures += 1;
        st.consecutive_failures += 1;
        let eject = svc.consecutive_failures != 0
            && st.circuit == CIRCUIT_CLOSED
            && st.consecutive_failures >= u64::from(svc.consecutive_failures);
        if eject {
            let n = u64::from(st.ejections) + 1;
            let cap = u64::from(svc.max_ejection_ms.max(svc.base_ejection_ms));
            st.ejected_until_ns =
                now_monotonic_ns + (u64::from(svc.base_ejection_ms) * n).min(cap) * 1_000_000;
            st.ejections += 1;
            st.circuit = CIRCUIT_OPEN;
            if let Ok(mut ss) = self.service_state.get(&svc.id, 0) {
                ss.ejected += 1;
                let _ = self.service_state.insert(svc.id, ss, 0);
            }
        }
        self.backend_state
            .insert(backend_id, st, 0)
            .map_err(map_err("write", BACKEND_STATE_MAP))?;
        Ok(eject)
    }

    /// Takes the flow-event ring (exactly one reader may own it: two readers break it).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Takes the kernel log reader, to be driven by the runtime (`logging::forward_kernel_logs`).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }
}

/// Loads a cgroup program and attaches it through a pinned link at `pin`; when the pin exists (a
/// restart or upgrade) the pinned link is kept and only its program swapped, atomically.
fn attach_cgroup_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &std::fs::File,
    pin: &Path,
) -> Result<(), DatapathError> {
    let prog_err = |op| move |source| DatapathError::Program { op, name, source };
    macro_rules! attach {
        ($prog:expr) => {{
            let prog = $prog;
            prog.load().map_err(prog_err("load"))?;
            if pin.exists() {
                let fd = prog.fd().map_err(prog_err("get fd of"))?;
                link::update_pinned(pin, fd.as_fd().as_raw_fd()).map_err(|source| {
                    DatapathError::Io {
                        op: "update pinned link",
                        path: pin.to_owned(),
                        source,
                    }
                })?;
                debug!(
                    program = name,
                    "adopted pinned link, program replaced in place"
                );
                return Ok(());
            }
            let id = prog
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(prog_err("attach"))?;
            let link = prog.take_link(id).map_err(prog_err("take link of"))?;
            FdLink::try_from(link).map_err(|e| DatapathError::Io {
                op: "convert link",
                path: pin.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?
        }};
    }
    let fd_link = match ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
    {
        aya::programs::Program::CgroupSockAddr(p) => attach!(p),
        aya::programs::Program::SockOps(p) => attach!(p),
        _ => return Err(DatapathError::MissingProgram { name }),
    };
    pin_link(fd_link, name, pin)
}

/// Attaches the reset tracepoint through a pinned link. Tracing links cannot swap programs in
/// place, so on a restart the new link is attached first and then takes over the pin (the old
/// link detaches when its pin, its last reference, goes): for a moment both run, harmlessly.
fn attach_reset_tracepoint(ebpf: &mut Ebpf, pin: &Path) -> Result<(), DatapathError> {
    let name = RESET_PROGRAM;
    let prog_err = |op| move |source| DatapathError::Program { op, name, source };
    let btf = aya::Btf::from_sys_fs().map_err(|e| DatapathError::Io {
        op: "read kernel BTF",
        path: PathBuf::from("/sys/kernel/btf/vmlinux"),
        source: std::io::Error::other(e.to_string()),
    })?;
    let prog: &mut BtfTracePoint = program(ebpf, name)?;
    prog.load("tcp_receive_reset", &btf)
        .map_err(prog_err("load"))?;
    let id = prog.attach().map_err(prog_err("attach"))?;
    let link = prog.take_link(id).map_err(prog_err("take link of"))?;
    let fd_link = FdLink::from(link);
    if pin.exists() {
        std::fs::remove_file(pin).map_err(|source| DatapathError::Io {
            op: "replace pinned link",
            path: pin.to_owned(),
            source,
        })?;
    }
    pin_link(fd_link, name, pin)
}

/// Pins a link so it outlives this process (the next agent adopts it).
fn pin_link(link: FdLink, name: &'static str, pin: &Path) -> Result<(), DatapathError> {
    link.pin(pin).map_err(|source| DatapathError::Pin {
        name,
        path: pin.to_owned(),
        source,
    })?;
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?;
    prog.try_into().map_err(|source| DatapathError::Program {
        op: "open",
        name,
        source,
    })
}

/// Removes the pinned links and maps under `pin_dir`: detaches the data path for good.
pub fn unpin_all(pin_dir: &Path) -> std::io::Result<()> {
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)?;
    }
    Ok(())
}
