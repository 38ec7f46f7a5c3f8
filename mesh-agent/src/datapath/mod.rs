//! The only module that touches aya: loads the kernel object, pins and attaches its programs,
//! and offers typed operations on its maps (services, backends, circuits, counters, events).

pub mod bpfsys;
pub mod cleanup;
pub mod coexist;
pub mod error;
pub mod events;
mod legacy;
mod link;
pub mod mesh;
pub mod probe;
pub mod ranges;
pub mod sockets;
pub mod spec;
pub mod table;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, IterableMap as _, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    programs::{
        BtfTracePoint, CgroupAttachMode, RawTracePoint, RawTracePointRunOptions, SkMsg, TestRun,
        links::FdLink,
    },
};
use mesh_common::{
    AddrBe, FAMILY_V4, FAMILY_V6, PROTO_UDP,
    backend::{
        BACKEND_ADDRS_MAP, BACKEND_STATE_MAP, BACKENDS_CAPACITY, BackendAddr, BackendState,
        state_slot,
    },
    bypass::{
        BYPASS_BYTES_MAP, BYPASS_SOCKS_MAP, EndpointKey, LOCAL_ENDPOINTS_CAPACITY,
        LOCAL_ENDPOINTS_MAP, LocalEndpoint, SockKey,
    },
    counters::{COUNTER_NAMES, COUNTERS_MAP},
    event::EVENTS_MAP,
    ids::{ID_ALLOC_MAP, ID_BACKEND, ID_CONF, ID_SERVICE},
    logic::circuit,
    report::{
        REPORT_ARG_BACKEND, REPORT_ARG_CONF, REPORT_ARG_KIND, REPORT_ARG_NOW, REPORT_KIND_FAILURE,
        REPORT_KIND_SUCCESS, REPORT_PROGRAM, REPORT_R_BAD_KIND, REPORT_R_COUNTED, REPORT_R_EJECTED,
        REPORT_R_UNKNOWN_BACKEND, REPORT_R_UNKNOWN_SERVICE,
    },
    service::{
        AFFINITY_MAP, LB_CHUNK, LB_TABLE_MAX, LB_TABLE_MIN, LB_TABLES_CAPACITY, LB_TABLES_MAP,
        LbChunk, MAX_BACKENDS_PER_SERVICE, SERVICE_CONF_CAPACITY, SERVICE_CONF_MAP,
        SERVICE_STATE_MAP, SERVICES_CAPACITY, SERVICES_MAP, SLOTS_CAPACITY, SLOTS_MAP,
        SVC_F_AFFINITY, Service, ServiceKey, ServiceState, TableKey, service_slot,
    },
    sock::{REVNAT_MAP, RevNatKey, RevNatValue, SOCK_FIN_WAIT2_MAP, SOCK_STATE_MAP},
};
use tracing::{debug, info, warn};

pub use self::error::DatapathError;
use self::spec::{BackendSpec, EndpointAddr, Protocol, ServiceSpec};

/// The kernel object built by `cargo xtask build-ebpf`, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

/// Every map of the object, pinned under the pin directory so a restarted agent adopts them.
pub const MAP_NAMES: [&str; 23] = [
    SERVICES_MAP,
    SERVICE_CONF_MAP,
    SLOTS_MAP,
    LB_TABLES_MAP,
    SERVICE_STATE_MAP,
    AFFINITY_MAP,
    BACKEND_ADDRS_MAP,
    BACKEND_STATE_MAP,
    ID_ALLOC_MAP,
    SOCK_STATE_MAP,
    SOCK_FIN_WAIT2_MAP,
    REVNAT_MAP,
    LOCAL_ENDPOINTS_MAP,
    BYPASS_SOCKS_MAP,
    BYPASS_BYTES_MAP,
    COUNTERS_MAP,
    EVENTS_MAP,
    mesh_common::mesh::MESH_WORKLOADS_MAP,
    mesh_common::mesh::MESH_ENDPOINTS_MAP,
    mesh_common::mesh::IDENTITY_VERDICTS_MAP,
    mesh_common::mesh::CAPTURE_CONFIG_MAP,
    mesh_common::mesh::CAPTURE_PENDING_MAP,
    mesh_common::mesh::CAPTURED_MAP,
];

/// Programs attached to the cgroup through pinned links (function name = link pin name).
pub const CGROUP_PROGRAMS: [&str; 10] = [
    "mesh_connect4",
    "mesh_connect6",
    "mesh_sendmsg4",
    "mesh_sendmsg6",
    "mesh_recvmsg4",
    "mesh_recvmsg6",
    "mesh_getpeername4",
    "mesh_getpeername6",
    "mesh_sock_release",
    "mesh_sockops",
];
const SK_MSG_PROGRAM: &str = "mesh_sk_msg";
/// `tp_btf/tcp_receive_reset`: tells a backend's reset from the application's abortive close.
pub const RESET_PROGRAM: &str = "mesh_tcp_receive_reset";
/// `tp_btf/inet_sk_error_report`: tells a failed handshake from the client giving up.
pub const ERROR_REPORT_PROGRAM: &str = "mesh_sk_error_report";
/// The `tp_btf` programs (program name, kernel tracepoint), each through a pinned link.
pub const TRACEPOINTS: [(&str, &str); 2] = [
    (RESET_PROGRAM, "tcp_receive_reset"),
    (ERROR_REPORT_PROGRAM, "inet_sk_error_report"),
];

/// How long a removed backend's state slot is kept before it may serve another id, and then only
/// once no socket is counted on it: no kernel program can still hold a pointer from before the
/// removal (programs run for microseconds), and every counted socket has closed.
pub const STATE_QUARANTINE: Duration = Duration::from_mins(1);

/// Where to attach and pin.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// cgroup v2 directory whose processes (and descendants) the mesh serves.
    pub cgroup: PathBuf,
    /// bpffs directory for pinned maps (`maps/`) and links (`links/`).
    pub pin_dir: PathBuf,
}

/// A backend's counters and circuit, decoded from the kernel's [`BackendState`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounters {
    pub active: u64,
    pub total: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    /// One of `CIRCUIT_*`.
    pub circuit: u32,
    /// Monotonic end of the ejection (open) or of the probe's grace (half-open).
    pub ejected_until_ns: u64,
    pub closed_since_ns: u64,
    pub ejections: u32,
}

impl From<BackendState> for BackendCounters {
    fn from(s: BackendState) -> Self {
        Self {
            active: s.active,
            total: s.total,
            failures: s.failures,
            consecutive_failures: s.consecutive_failures,
            circuit: circuit::state(s.circuit),
            ejected_until_ns: circuit::deadline(s.circuit),
            closed_since_ns: s.closed_since_ns,
            ejections: s.ejections,
        }
    }
}

/// Circuit and counters of one backend, as the kernel sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStatus {
    pub id: u32,
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: BackendCounters,
}

/// A service as applied to the maps.
#[derive(Clone, Debug)]
struct Applied {
    id: u32,
    /// The configuration `SERVICES` points at.
    conf: Service,
    /// Chunks of that configuration's lookup table.
    chunks: u32,
    /// Backend ids in slot order.
    backends: Vec<u32>,
    /// The spec written, shared with the caller's record of it (the reconciler's): the
    /// backends' addresses and weights are read from it, not copied (how an update finds a
    /// backend's id again: same address and weight, same id). 4 bytes a backend here instead
    /// of 40 for a copied address and weight (issue 8).
    spec: Arc<ServiceSpec>,
    /// `spec.backends` index of each slot; empty when the slots are in the spec's order (a
    /// first write, and any update that moved no backend).
    order: Vec<u32>,
}

impl Applied {
    /// The address and weight of each backend, in slot order (parallel to `backends`).
    fn addrs(&self) -> impl Iterator<Item = (EndpointAddr, u32)> + '_ {
        let spec = &self.spec.backends;
        (0..self.backends.len()).filter_map(move |slot| {
            let i = self.order.get(slot).map_or(slot, |&i| i as usize);
            spec.get(i).map(|b| (b.addr, b.weight))
        })
    }
}

/// Ids handed out, never twice (persisted in `ID_ALLOC`), and the array slots they occupy.
#[derive(Debug)]
struct Ids {
    next: [u64; 3],
    /// What `ID_ALLOC` holds.
    persisted: [u64; 3],
    /// Occupied slots of `BACKEND_STATE` (live and quarantined backends).
    backend_slots: Vec<bool>,
    /// Occupied slots of `SERVICE_STATE`.
    service_slots: Vec<bool>,
    /// Configuration ids in use (only consulted after the counter wraps).
    confs: std::collections::HashSet<u32>,
}

impl Ids {
    fn new() -> Self {
        Self {
            next: [1; 3],
            persisted: [0; 3],
            backend_slots: vec![false; BACKENDS_CAPACITY as usize],
            service_slots: vec![false; SERVICES_CAPACITY as usize],
            confs: std::collections::HashSet::new(),
        }
    }

    /// The next id of `kind` whose slot is free (`slot` maps an id to its slot, `used` marks
    /// slots); ids are 32 bits, skip 0, and wrap only after 2³² allocations.
    fn take(next: &mut u64, used: &mut [bool], slot: impl Fn(u32) -> u32) -> Option<u32> {
        for _ in 0..used.len() {
            let id = (*next & u64::from(u32::MAX)) as u32;
            *next += 1;
            if id == 0 {
                continue;
            }
            let s = slot(id) as usize;
            if !used[s] {
                used[s] = true;
                return Some(id);
            }
        }
        None
    }

    fn backend(&mut self) -> Option<u32> {
        Self::take(
            &mut self.next[ID_BACKEND as usize],
            &mut self.backend_slots,
            state_slot,
        )
    }

    fn service(&mut self) -> Option<u32> {
        Self::take(
            &mut self.next[ID_SERVICE as usize],
            &mut self.service_slots,
            service_slot,
        )
    }

    fn conf(&mut self) -> u32 {
        loop {
            let id = (self.next[ID_CONF as usize] & u64::from(u32::MAX)) as u32;
            self.next[ID_CONF as usize] += 1;
            if id != 0 && self.confs.insert(id) {
                return id;
            }
        }
    }
}

/// The loaded, attached data path and typed access to its maps.
pub struct Datapath {
    /// The object; owns the programs, among them the L7 report program this type runs.
    ebpf: Ebpf,
    pin_dir: PathBuf,
    services: HashMap<MapData, ServiceKey, u32>,
    confs: HashMap<MapData, u32, Service>,
    /// `SERVICE_SLOTS`: each configuration's backend ids in a range of its own.
    slots: Array<MapData, u32>,
    tables: HashMap<MapData, TableKey, LbChunk>,
    service_state: Array<MapData, ServiceState>,
    /// `BACKEND_ADDRS`: what a connect needs of a backend, by state slot.
    backend_addrs: Array<MapData, BackendAddr>,
    backend_state: Array<MapData, BackendState>,
    id_alloc: Array<MapData, u64>,
    local_endpoints: HashMap<MapData, EndpointKey, LocalEndpoint>,
    revnat: HashMap<MapData, RevNatKey, RevNatValue>,
    counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    /// Enrollment, identity verdicts and capture (`mesh`).
    mesh: mesh::MeshMaps,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    applied: BTreeMap<ServiceKey, Applied>,
    ids: Ids,
    /// Removed backends whose state slot is quarantined, with when they were removed.
    retired: Vec<(u32, Instant)>,
    /// Writes refused because a map would overflow (exported as a metric).
    map_full_total: u64,
    /// Live backends (ids are per service, so this is the sum over `applied`).
    backend_total: usize,
    /// Ranges of `SERVICE_SLOTS` held by configurations (and in quarantine).
    ranges: ranges::Ranges,
    /// Lookup-table chunks in `LB_TABLES` over all services.
    table_chunks: usize,
    /// The cgroup the programs serve (whose processes' network namespaces hold its sockets).
    cgroup: PathBuf,
    /// Backends removed from UDP services since the last [`Datapath::end_stale_udp_sockets`].
    stale_udp: Vec<sockets::Stale>,
    /// Connected UDP sockets destroyed because their backend left the service, and failures.
    udp_destroyed: u64,
    udp_destroy_failed: u64,
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

/// Fewest backends for which [`Datapath::backend_status_many`] reads `BACKEND_STATE` in batches.
const BATCH_STATUS_MIN: usize = 256;
/// Slots per `BPF_MAP_LOOKUP_BATCH` call (56 bytes each: about 450 KiB per call).
const BATCH_SLOTS: u32 = 8192;

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands (`include/uapi/linux/bpf.h`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `BPF_MAP_LOOKUP_BATCH` (Linux 5.6).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `BPF_MAP_UPDATE_BATCH` (Linux 5.6).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Slots `0..n` of the array `fd` whose values are `V` (`BACKEND_STATE`), read [`BATCH_SLOTS`]
/// at a time with `BPF_MAP_LOOKUP_BATCH`.
pub(crate) fn lookup_batch<V: aya::Pod + Default>(fd: i32, n: u32) -> std::io::Result<Vec<V>> {
    let map_fd = u32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    let mut values = vec![V::default(); n as usize];
    let mut keys = vec![0u32; n as usize];
    let (mut done, mut token, mut next) = (0u32, 0u32, 0u32);
    while done < n {
        let chunk = BATCH_SLOTS.min(n - done);
        let mut attr = BatchAttr {
            // The first call starts at slot 0; each later one after the slot the last ended at.
            in_batch: if done == 0 {
                0
            } else {
                (&raw const token) as u64
            },
            out_batch: (&raw mut next) as u64,
            keys: keys[done as usize..].as_mut_ptr() as u64,
            values: values[done as usize..].as_mut_ptr() as u64,
            count: chunk,
            map_fd,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `chunk` keys (4 bytes, the array's key size) and
        // `chunk` values (`V`, the map's value type and size) that outlive the call;
        // the kernel writes at most `count` of each, and `next`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        done += attr.count.min(chunk);
        match err {
            // ENOENT: the end of the map (the array is shorter than asked); what was read stands.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Some(e) => return Err(e),
            None if attr.count == 0 => break,
            None => token = next,
        }
    }
    values.truncate(done as usize);
    Ok(values)
}

/// Writes `values[i]` at index `keys[i]` of the array `fd` (values of type `V`) with
/// `BPF_MAP_UPDATE_BATCH`, [`BATCH_SLOTS`] per call: a 10,000-backend configuration's range is
/// a handful of `bpf(2)` calls instead of 10,000. `Err` leaves a prefix written; the caller
/// writes the rest one by one (a kernel without batch support refuses the first call).
fn update_batch<V: aya::Pod>(fd: i32, keys: &[u32], values: &[V]) -> std::io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let map_fd = u32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    for (k, v) in keys
        .chunks(BATCH_SLOTS as usize)
        .zip(values.chunks(BATCH_SLOTS as usize))
    {
        let mut attr = BatchAttr {
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at `count` keys (4 bytes, the array's key size) and `count`
        // values (`V`, the map's value type and size) that outlive the call; the kernel only
        // reads them (and writes `count`).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes `values[i]` at `keys[i]` of `map` (named `name`): in batches, or one by one where the
/// kernel refuses batches.
fn write_array<V: aya::Pod>(
    map: &mut Array<MapData, V>,
    name: &'static str,
    keys: &[u32],
    values: &[V],
) -> Result<(), DatapathError> {
    if keys.is_empty() {
        return Ok(());
    }
    let fd = map.map().fd().as_fd().as_raw_fd();
    if let Err(e) = update_batch(fd, keys, values) {
        debug!(error = %e, map = name, "BPF_MAP_UPDATE_BATCH refused: writing one by one");
        for (k, v) in keys.iter().zip(values) {
            map.set(*k, *v, 0).map_err(map_err("write", name))?;
        }
    }
    Ok(())
}

/// Maps a failed map operation to an error naming the operation and the map.
fn map_err(op: &'static str, name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { op, name, source }
}

/// The slot order of a service's new backends, as indices into `backends`: a backend that
/// stays keeps its slot (so an update rewrites only the slots that really change, and round
/// robin's order barely moves), new ones fill the vacated slots, then the end.
fn slot_order(backends: &[BackendSpec], old: Option<&Applied>) -> Vec<u32> {
    let n = backends.len();
    let Some(old) = old else {
        return (0..n as u32).collect();
    };
    let was: StdHashMap<(EndpointAddr, u32), usize> =
        old.addrs().enumerate().map(|(i, a)| (a, i)).collect();
    let mut slots: Vec<Option<u32>> = vec![None; n];
    let mut rest = Vec::new();
    for (j, b) in backends.iter().enumerate() {
        match was.get(&(b.addr, b.weight)) {
            Some(&i) if i < n && slots[i].is_none() => slots[i] = Some(j as u32),
            _ => rest.push(j as u32),
        }
    }
    let mut rest = rest.into_iter();
    slots
        .into_iter()
        .map(|s| {
            s.or_else(|| rest.next())
                .expect("as many backends as slots")
        })
        .collect()
}

/// The kernel's view of one configuration of a service.
fn service_value(
    key: ServiceKey,
    id: u32,
    conf_id: u32,
    spec: &ServiceSpec,
    backend_count: usize,
    table_size: u32,
    slot_base: u32,
) -> Service {
    let c = &spec.circuit;
    Service {
        key,
        conf_id,
        id,
        backend_count: backend_count as u32,
        algorithm: spec.algorithm.code(),
        flags: if spec.affinity_timeout.is_some() {
            SVC_F_AFFINITY
        } else {
            0
        },
        _pad: 0,
        table_size,
        affinity_timeout_s: spec
            .affinity_timeout
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
        max_connections: c.max_connections,
        consecutive_failures: c.consecutive_failures,
        base_ejection_ms: ms(c.base_ejection),
        max_ejection_ms: ms(c.max_ejection),
        max_ejection_pct: percent(c.max_ejection_percent),
        panic_threshold_pct: percent(c.panic_threshold_percent),
        _pad2: 0,
        slot_base,
    }
}

/// A percentage as the kernel keeps it: above 100 means what 100 means (every backend may be
/// ejected; panic whenever not all are eligible — and with all eligible, panic changes nothing).
fn percent(p: u32) -> u8 {
    p.min(100) as u8
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
        // The maps first: a node left with the previous generation's maps pinned has them
        // copied into this generation's before any program is swapped (`legacy`), so the new
        // programs never run on empty maps.
        let mut dp = Self {
            services: take(&mut ebpf, SERVICES_MAP)?,
            confs: take(&mut ebpf, SERVICE_CONF_MAP)?,
            slots: take(&mut ebpf, SLOTS_MAP)?,
            tables: take(&mut ebpf, LB_TABLES_MAP)?,
            service_state: take(&mut ebpf, SERVICE_STATE_MAP)?,
            backend_addrs: take(&mut ebpf, BACKEND_ADDRS_MAP)?,
            backend_state: take(&mut ebpf, BACKEND_STATE_MAP)?,
            id_alloc: take(&mut ebpf, ID_ALLOC_MAP)?,
            local_endpoints: take(&mut ebpf, LOCAL_ENDPOINTS_MAP)?,
            revnat: take(&mut ebpf, REVNAT_MAP)?,
            counters: take(&mut ebpf, COUNTERS_MAP)?,
            cgroup: cfg.cgroup.clone(),
            stale_udp: Vec::new(),
            udp_destroyed: 0,
            udp_destroy_failed: 0,
            events: Some(take(&mut ebpf, EVENTS_MAP)?),
            mesh: mesh::MeshMaps::take(&mut ebpf)?,
            logger,
            ebpf,
            pin_dir: cfg.pin_dir.clone(),
            applied: BTreeMap::new(),
            ids: Ids::new(),
            retired: Vec::new(),
            map_full_total: 0,
            backend_total: 0,
            ranges: ranges::Ranges::new(SLOTS_CAPACITY),
            table_chunks: 0,
        };
        let legacy = legacy::migrate(&mut dp, &maps_dir)?;
        dp.adopt()?;
        dp.attach(cfg, kernel.reset_tracepoint, &links_dir)?;
        // Every program now runs on this generation's maps: the old pins go (a map lives on
        // while an old program still holds it, e.g. an existing socket's `sk_msg`).
        legacy::unpin(&maps_dir, &legacy);
        info!(cgroup = %cfg.cgroup.display(), pins = %cfg.pin_dir.display(), services = dp.applied.len(), "data path attached");
        Ok(dp)
    }

    /// Attaches (or, through the pinned links, swaps in place) every program of the object.
    fn attach(
        &mut self,
        cfg: &DatapathConfig,
        reset_tracepoint: bool,
        links_dir: &Path,
    ) -> Result<(), DatapathError> {
        let cgroup = std::fs::File::open(&cfg.cgroup).map_err(|source| DatapathError::Io {
            op: "open cgroup",
            path: cfg.cgroup.clone(),
            source,
        })?;
        for name in CGROUP_PROGRAMS {
            attach_cgroup_program(&mut self.ebpf, name, &cgroup, &links_dir.join(name))?;
        }
        // Without kernel BTF the reset and error tracepoints cannot attach (the probe said so
        // once): resets then do not count as failures and every abandoned handshake is a refusal.
        if reset_tracepoint {
            for (name, function) in TRACEPOINTS {
                attach_tracepoint(&mut self.ebpf, name, function, &links_dir.join(name))?;
            }
        }
        {
            let name = SK_MSG_PROGRAM;
            let socks: SockHash<MapData, SockKey> = take(&mut self.ebpf, BYPASS_SOCKS_MAP)?;
            let prog: &mut SkMsg = program(&mut self.ebpf, name)?;
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
        // Never attached: `report` runs it with `BPF_PROG_TEST_RUN`.
        program::<RawTracePoint>(&mut self.ebpf, REPORT_PROGRAM)?
            .load()
            .map_err(|source| DatapathError::Program {
                op: "load",
                name: REPORT_PROGRAM,
                source,
            })?;
        Ok(())
    }

    /// The mirror of service `key` as configuration `conf` left it in the maps (its backends
    /// that still name it), noting their ids in `referenced`. What a previous agent wrote is
    /// known only from the maps: the adopted spec holds the address, the protocol and the
    /// backends (all the mirror reads of a spec); the first reconciliation rewrites or removes
    /// the service.
    fn adopted_service(
        &self,
        key: &ServiceKey,
        conf: Service,
        referenced: &mut std::collections::HashSet<u32>,
    ) -> Applied {
        let mut spec = ServiceSpec::tcp(
            SocketAddr::new(
                ip_from_be(key.addr_be, key.family),
                u16::from_be(key.port_be),
            ),
            [],
        );
        if key.proto == PROTO_UDP {
            spec.protocol = Protocol::Udp;
        }
        let mut backends = Vec::new();
        for slot in 0..conf.backend_count {
            let Ok(id) = self.slots.get(&(conf.slot_base + slot), 0) else {
                continue;
            };
            if let Ok(b) = self.backend_addrs.get(&state_slot(id), 0)
                && id != 0
                && b.id == id
                && b.service_id == conf.id
            {
                backends.push(id);
                spec.backends.push(BackendSpec {
                    addr: EndpointAddr::new(
                        ip_from_be(b.addr_be, b.family),
                        u16::from_be(b.port_be),
                    ),
                    weight: b.weight,
                });
                referenced.insert(id);
            }
        }
        Applied {
            id: conf.id,
            conf,
            chunks: conf.table_size.div_ceil(LB_CHUNK),
            backends,
            spec: Arc::new(spec),
            order: Vec::new(),
        }
    }

    /// Rebuilds the bookkeeping from maps a previous agent left pinned: services and their
    /// configurations, backends, occupied state slots (quarantined ones included), the id
    /// counters; removes what nothing points at (an agent killed mid-update) and repairs every
    /// service's ejected count.
    fn adopt(&mut self) -> Result<(), DatapathError> {
        for (i, next) in self.ids.next.iter_mut().enumerate() {
            if let Ok(v) = self.id_alloc.get(&(i as u32), 0) {
                *next = (*next).max(v);
            }
        }
        let services: Vec<(ServiceKey, u32)> = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("read", SERVICES_MAP))?;
        let confs: StdHashMap<u32, Service> = self
            .confs
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("read", SERVICE_CONF_MAP))?;
        let mut max_seen = [0u64; 3];
        let mut referenced = std::collections::HashSet::new();
        let mut live_confs = std::collections::HashSet::new();
        let now = Instant::now();
        for (key, conf_id) in services {
            let Some(conf) = confs.get(&conf_id).copied() else {
                let _ = self.services.remove(&key);
                continue;
            };
            if !self.ranges.reserve(conf.slot_base, conf.backend_count) {
                // Two configurations claiming one range cannot come from an agent (ranges are
                // allocated before use and freed after unpublishing): refuse to guess.
                return Err(DatapathError::Adopt {
                    reason: format!(
                        "configuration {conf_id} of service {} claims slots {}..{} of {SLOTS_MAP}, outside the map or overlapping another's",
                        conf.id,
                        conf.slot_base,
                        u64::from(conf.slot_base) + u64::from(conf.backend_count)
                    ),
                });
            }
            live_confs.insert(conf_id);
            let applied = self.adopted_service(&key, conf, &mut referenced);
            if applied.backends.len() != conf.backend_count as usize {
                // Cannot happen between agents (a published configuration's backends are retired
                // only after the next one is published); a map edited by hand. The kernel skips
                // such slots (`backend_missing`); the next update writes a clean configuration.
                warn!(
                    service = conf.id,
                    slots = conf.backend_count,
                    backends = applied.backends.len(),
                    "adopted service has slots naming missing backends"
                );
            }
            max_seen[ID_SERVICE as usize] = max_seen[ID_SERVICE as usize].max(u64::from(conf.id));
            max_seen[ID_CONF as usize] = max_seen[ID_CONF as usize].max(u64::from(conf_id));
            self.ids.service_slots[service_slot(conf.id) as usize] = true;
            self.ids.confs.insert(conf_id);
            self.backend_total += applied.backends.len();
            self.table_chunks += applied.chunks as usize;
            self.applied.insert(key, applied);
        }
        // Configurations nothing points at (a switch interrupted), and their tables; their
        // ranges stay free (only a configuration points at its range).
        for conf_id in confs.keys().filter(|c| !live_confs.contains(*c)) {
            let _ = self.confs.remove(conf_id);
        }
        let stale_chunks: Vec<TableKey> = self
            .tables
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live_confs.contains(&k.conf_id))
            .collect();
        for k in stale_chunks {
            let _ = self.tables.remove(&k);
        }
        // Backends no slot points at are retired (their state quarantined, not reused at once).
        let max_state_id = self.adopt_state_slots(&referenced, now);
        max_seen[ID_BACKEND as usize] = max_seen[ID_BACKEND as usize].max(max_state_id);
        for (next, seen) in self.ids.next.iter_mut().zip(max_seen) {
            *next = (*next).max(seen + 1);
        }
        self.persist_ids()?;
        let keys: Vec<ServiceKey> = self.applied.keys().copied().collect();
        for key in keys {
            self.repair_ejected(&key)?;
        }
        Ok(())
    }

    /// Marks every tagged `BACKEND_STATE` slot occupied and quarantines those of backends no
    /// slot refers to any more (marking them removed in `BACKEND_ADDRS`, so a stale affinity
    /// entry cannot pick them); returns the largest id seen.
    fn adopt_state_slots(
        &mut self,
        referenced: &std::collections::HashSet<u32>,
        now: Instant,
    ) -> u64 {
        let mut max_id = 0;
        for slot in 0..BACKENDS_CAPACITY {
            if let Ok(st) = self.backend_state.get(&slot, 0)
                && st.id != 0
            {
                self.ids.backend_slots[slot as usize] = true;
                max_id = max_id.max(u64::from(st.id));
                if !referenced.contains(&st.id) {
                    self.mark_removed(st.id);
                    self.retired.push((st.id, now));
                }
            }
        }
        max_id
    }

    /// Writes the id counters that moved since the last write (before any id they handed out
    /// can be referenced by a socket for long: a restart resumes past them).
    fn persist_ids(&mut self) -> Result<(), DatapathError> {
        for (i, v) in self.ids.next.iter().enumerate() {
            if self.ids.persisted[i] == *v {
                continue;
            }
            self.id_alloc
                .set(i as u32, *v, 0)
                .map_err(map_err("write", ID_ALLOC_MAP))?;
            self.ids.persisted[i] = *v;
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

    /// Rejects a spec the kernel could not serve, and one that would overflow a map, before any
    /// map is touched.
    fn check(&self, spec: &ServiceSpec, key: &ServiceKey) -> Result<(), DatapathError> {
        let name = || format!("{}/{:?}", spec.vip, spec.protocol);
        let invalid = |reason: String| DatapathError::InvalidService {
            service: name(),
            reason,
        };
        for b in &spec.backends {
            if b.addr.is_ipv4() != spec.vip.is_ipv4() {
                return Err(invalid(format!(
                    "backend {} is not of the service's address family",
                    b.addr
                )));
            }
            if b.weight == 0 {
                return Err(invalid(format!("backend {} has weight 0", b.addr)));
            }
        }
        if spec.backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
            return Err(invalid(format!(
                "{} endpoints; one service port takes at most {MAX_BACKENDS_PER_SERVICE}",
                spec.backends.len()
            )));
        }
        if let Some(size) = spec.table_size
            && !table::valid_size(size)
        {
            return Err(invalid(format!(
                "table size {size} is not a prime in {LB_TABLE_MIN}..={LB_TABLE_MAX}"
            )));
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
        // A set, not `addrs.contains` per backend: that was quadratic.
        let known: std::collections::HashSet<(EndpointAddr, u32)> =
            old.map(|a| a.addrs().collect()).unwrap_or_default();
        let new_backends = spec
            .backends
            .iter()
            .filter(|b| !known.contains(&(b.addr, b.weight)))
            .count();
        // New entries are written before stale ones go, and retired ones keep their state
        // slots: the peak is what must fit.
        if self.backend_total + self.retired.len() + new_backends > BACKENDS_CAPACITY as usize {
            return Err(full(BACKEND_ADDRS_MAP, BACKENDS_CAPACITY, name()));
        }
        // The range itself is allocated (first fit, `SLOTS_MAP` full if none is long enough) by
        // `apply_service` before any map is written.
        if spec.algorithm.uses_table() {
            let chunks = table::size_for(spec.backends.len(), spec.table_size).div_ceil(LB_CHUNK);
            if self.table_chunks + chunks as usize > LB_TABLES_CAPACITY as usize {
                return Err(full(LB_TABLES_MAP, LB_TABLES_CAPACITY, name()));
            }
        }
        if self.ids.confs.len() >= SERVICE_CONF_CAPACITY as usize {
            return Err(full(SERVICE_CONF_MAP, SERVICE_CONF_CAPACITY, name()));
        }
        Ok(())
    }

    /// Writes a service, its backends and settings. Existing connections are never touched:
    /// the kernel translated them at connect time. Backends keep their ids (and circuit state)
    /// across updates while their address and weight stay; every change is written as a new
    /// configuration (new id, own lookup table) that one 4-byte update of `SERVICES` publishes,
    /// and removed backends are marked removed in `BACKEND_ADDRS` at once but keep their state
    /// slot in quarantine.
    pub fn apply_service(&mut self, spec: &ServiceSpec) -> Result<u32, DatapathError> {
        self.apply_shared_service(&Arc::new(spec.clone()))
    }

    /// [`Self::apply_service`] of a spec the caller keeps too (the reconciler): the mirror of
    /// what was written holds this `Arc` and reads the backends' addresses from it.
    pub fn apply_shared_service(&mut self, spec: &Arc<ServiceSpec>) -> Result<u32, DatapathError> {
        let key = service_key(spec.vip, spec.protocol);
        self.check(spec, &key).inspect_err(|e| self.note_full(e))?;
        // The new configuration's range of `SERVICE_SLOTS`, before any map is touched.
        let now = Instant::now();
        let Some(base) = self.ranges.alloc(spec.backends.len() as u32, now) else {
            let e = DatapathError::MapFull {
                name: SLOTS_MAP,
                capacity: SLOTS_CAPACITY,
                what: format!(
                    "{}/{:?} (no free range of {} slots)",
                    spec.vip,
                    spec.protocol,
                    spec.backends.len()
                ),
            };
            self.note_full(&e);
            return Err(e);
        };
        let svc_id = self.apply_in_range(spec, key, base, now).inspect_err(|_| {
            // Nothing published points at the range: it may be reused (after the quarantine,
            // as any freed range; a failed write may have left ids in it).
            self.ranges
                .free(base, spec.backends.len() as u32, Instant::now());
        })?;
        self.persist_ids()?;
        self.repair_ejected(&key)?;
        self.collect_retired();
        Ok(svc_id)
    }

    /// [`Self::apply_service`] into the allocated range at `base`; an error leaves the previous
    /// configuration published (and the range unused).
    fn apply_in_range(
        &mut self,
        spec: &Arc<ServiceSpec>,
        key: ServiceKey,
        base: u32,
        now: Instant,
    ) -> Result<u32, DatapathError> {
        let old = self.applied.get(&key).cloned();
        let svc_id = match &old {
            Some(a) => a.id,
            None => self.new_service_id(spec)?,
        };
        // 1. New backends (state slot first, so a backend is never visible without its state),
        //    then the configuration's range and table.
        let order = slot_order(&spec.backends, old.as_ref());
        let ordered: Vec<BackendSpec> = order.iter().map(|&i| spec.backends[i as usize]).collect();
        let ids = self.write_backends(svc_id, &ordered, old.as_ref())?;
        self.write_slots(base, &ids)?;
        let conf_id = self.ids.conf();
        let (table_size, chunks) = self.write_table(conf_id, spec, &ordered, &ids)?;
        let conf = service_value(key, svc_id, conf_id, spec, ids.len(), table_size, base);
        self.confs
            .insert(conf_id, conf, 0)
            .map_err(map_err("write", SERVICE_CONF_MAP))?;
        // 2. Publish: from here on the kernel uses the new configuration.
        self.services
            .insert(key, conf_id, 0)
            .map_err(map_err("write", SERVICES_MAP))?;
        // 3. Remove what the service no longer uses.
        if let Some(old) = &old {
            self.drop_conf(&old.conf, old.chunks, now);
            // A set, not `ids.contains`: that was quadratic (a minute per update of a
            // 65,536-endpoint service in a debug build).
            let kept: std::collections::HashSet<u32> = ids.iter().copied().collect();
            for id in old.backends.iter().filter(|id| !kept.contains(id)) {
                self.retire_backend(*id, &key);
            }
        }
        self.table_chunks += chunks as usize;
        self.applied.insert(
            key,
            Applied {
                id: svc_id,
                conf,
                chunks,
                backends: ids,
                spec: Arc::clone(spec),
                order: if order.iter().enumerate().all(|(i, &j)| i == j as usize) {
                    Vec::new()
                } else {
                    order
                },
            },
        );
        Ok(svc_id)
    }

    /// A fresh service id, its state slot initialised.
    fn new_service_id(&mut self, spec: &ServiceSpec) -> Result<u32, DatapathError> {
        let id = self.ids.service().ok_or_else(|| DatapathError::MapFull {
            name: SERVICE_STATE_MAP,
            capacity: SERVICES_CAPACITY,
            what: format!("{}/{:?}", spec.vip, spec.protocol),
        })?;
        self.service_state
            .set(
                service_slot(id),
                ServiceState {
                    id,
                    ..ServiceState::default()
                },
                0,
            )
            .map_err(map_err("write", SERVICE_STATE_MAP))?;
        Ok(id)
    }

    fn write_backends(
        &mut self,
        svc_id: u32,
        backends: &[BackendSpec],
        old: Option<&Applied>,
    ) -> Result<Vec<u32>, DatapathError> {
        let known: StdHashMap<(EndpointAddr, u32), u32> = old
            .map(|a| a.addrs().zip(a.backends.iter().copied()).collect())
            .unwrap_or_default();
        let mut ids = Vec::with_capacity(backends.len());
        let (mut slots, mut states, mut addrs) = (Vec::new(), Vec::new(), Vec::new());
        for b in backends {
            if let Some(id) = known.get(&(b.addr, b.weight)) {
                ids.push(*id);
                continue;
            }
            let id = self.ids.backend().ok_or_else(|| DatapathError::MapFull {
                name: BACKEND_STATE_MAP,
                capacity: BACKENDS_CAPACITY,
                what: b.addr.to_string(),
            })?;
            let (addr_be, family) = addr_be(b.addr.ip());
            slots.push(state_slot(id));
            states.push(BackendState {
                id,
                ..BackendState::default()
            });
            addrs.push(BackendAddr {
                id,
                service_id: svc_id,
                addr_be,
                port_be: b.addr.port().to_be(),
                family,
                _pad: 0,
                weight: b.weight,
            });
            ids.push(id);
        }
        // State slots first, so a backend is never visible without its state. Its address slot
        // is cleared first: the kernel's torn-read check relies on a slot passing through 0
        // between two owners (`mesh_common::backend::BACKEND_ADDRS_MAP`), whatever state an
        // earlier agent left it in.
        write_array(&mut self.backend_state, BACKEND_STATE_MAP, &slots, &states)?;
        let cleared = vec![BackendAddr::default(); slots.len()];
        write_array(&mut self.backend_addrs, BACKEND_ADDRS_MAP, &slots, &cleared)?;
        write_array(&mut self.backend_addrs, BACKEND_ADDRS_MAP, &slots, &addrs)?;
        self.backend_total += slots.len();
        Ok(ids)
    }

    /// Writes a configuration's backend ids into its range `base..base + ids.len()` (before the
    /// configuration is published; the range is never written again while it is).
    fn write_slots(&mut self, base: u32, ids: &[u32]) -> Result<(), DatapathError> {
        let keys: Vec<u32> = (base..base + ids.len() as u32).collect();
        write_array(&mut self.slots, SLOTS_MAP, &keys, ids)
    }

    /// Writes configuration `conf_id`'s lookup table if its algorithm uses one: (size, chunks).
    fn write_table(
        &mut self,
        conf_id: u32,
        spec: &ServiceSpec,
        backends: &[BackendSpec],
        ids: &[u32],
    ) -> Result<(u32, u32), DatapathError> {
        if !spec.algorithm.uses_table() || ids.is_empty() {
            return Ok((0, 0));
        }
        let size = table::size_for(ids.len(), spec.table_size);
        let entries = if spec.algorithm == spec::Algorithm::Maglev {
            let names: Vec<Vec<u8>> = backends
                .iter()
                .map(|b| b.addr.to_string().into_bytes())
                .collect();
            table::maglev(&names, ids, size)
        } else {
            let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
            table::weighted(&weights, ids, size)
        };
        let chunks = size.div_ceil(LB_CHUNK);
        for (chunk, part) in entries.chunks(LB_CHUNK as usize).enumerate() {
            let mut value = LbChunk::default();
            value.backend_ids[..part.len()].copy_from_slice(part);
            self.tables
                .insert(
                    TableKey {
                        conf_id,
                        chunk: chunk as u32,
                    },
                    value,
                    0,
                )
                .map_err(map_err("write", LB_TABLES_MAP))?;
        }
        Ok((size, chunks))
    }

    /// How long a freed `SERVICE_SLOTS` range waits before reuse ([`ranges::RANGE_QUARANTINE`]
    /// by default); see [`ranges::Ranges::set_quarantine`].
    pub fn set_range_quarantine(&mut self, quarantine: Duration) {
        self.ranges.set_quarantine(quarantine);
    }

    /// Deletes a configuration that is no longer published, and its table; its range goes into
    /// quarantine ([`ranges::RANGE_QUARANTINE`]).
    fn drop_conf(&mut self, conf: &Service, chunks: u32, now: Instant) {
        let conf_id = conf.conf_id;
        let _ = self.confs.remove(&conf_id);
        self.ranges.free(conf.slot_base, conf.backend_count, now);
        for chunk in 0..chunks {
            let _ = self.tables.remove(&TableKey { conf_id, chunk });
        }
        self.table_chunks -= chunks as usize;
        self.ids.confs.remove(&conf_id);
    }

    /// Marks a backend removed in `BACKEND_ADDRS` (no new connection can pick it, not even
    /// through an affinity entry) and quarantines its state slot (see [`STATE_QUARANTINE`]). A
    /// UDP service's backend is remembered so that [`Self::end_stale_udp_sockets`] ends the
    /// connected sockets still sending to it.
    fn retire_backend(&mut self, id: u32, key: &ServiceKey) {
        if let Some(b) = self.mark_removed(id)
            && key.proto == PROTO_UDP
        {
            self.stale_udp.push(sockets::Stale {
                backend_id: id,
                addr_be: b.addr_be,
                port_be: b.port_be,
                family: b.family,
                svc_addr_be: key.addr_be,
                svc_port_be: key.port_be,
            });
        }
        self.backend_total -= 1;
        self.retired.push((id, Instant::now()));
    }

    /// Sets `service_id` 0 in backend `id`'s address slot if the slot is still its own; returns
    /// what the slot held. Only that word changes (the other bytes are written with the values
    /// they have), so the kernel's copy cannot mix two backends.
    fn mark_removed(&mut self, id: u32) -> Option<BackendAddr> {
        let slot = state_slot(id);
        let b = self
            .backend_addrs
            .get(&slot, 0)
            .ok()
            .filter(|b| b.id == id)?;
        let _ = self
            .backend_addrs
            .set(slot, BackendAddr { service_id: 0, ..b }, 0);
        Some(b)
    }

    /// Frees quarantined state slots that are past [`STATE_QUARANTINE`] with no socket counted.
    /// `retired` is in removal order, so only its head can be due: the cost is the due entries,
    /// not the whole quarantine. One still counted goes to the back for a later look.
    fn collect_retired(&mut self) {
        let due = self
            .retired
            .iter()
            .take_while(|(_, since)| since.elapsed() >= STATE_QUARANTINE)
            .count();
        for (id, since) in self.retired.drain(..due).collect::<Vec<_>>() {
            let slot = state_slot(id);
            let st = self.backend_state.get(&slot, 0).unwrap_or_default();
            if st.id == id && st.active != 0 {
                // Re-queued with a fresh start so the list stays ordered.
                let _ = since;
                self.retired.push((id, Instant::now()));
                continue;
            }
            // Address first: a slot whose state tag is 0 has a cleared address too.
            if self.backend_addrs.get(&slot, 0).is_ok_and(|b| b.id == id) || st.id == id {
                let _ = self.backend_addrs.set(slot, BackendAddr::default(), 0);
            }
            if st.id == id {
                let _ = self.backend_state.set(slot, BackendState::default(), 0);
            }
            self.ids.backend_slots[slot as usize] = false;
        }
    }

    /// The counters and circuit of backend `id`, removed ones in quarantine included (`None`
    /// once its slot serves another id or was freed).
    pub fn backend_counters(&self, id: u32) -> Option<BackendCounters> {
        self.backend_state
            .get(&state_slot(id), 0)
            .ok()
            .filter(|st| st.id == id)
            .map(BackendCounters::from)
    }

    /// Entries in the UDP reverse-translation map (one per live UDP socket and backend it sent to).
    #[must_use]
    pub fn revnat_entries(&self) -> usize {
        self.revnat.keys().flatten().count()
    }

    /// Destroys every connected UDP socket that the connect program translated to a backend
    /// removed (from its service, or with its service) since the last call, in every network
    /// namespace of the node ([`sockets`]): kube-proxy clears such a backend's conntrack entries,
    /// Cilium destroys such sockets. The owner calls it after each reconciliation, once for all
    /// the removals: one pass over the namespaces however many backends left.
    pub fn end_stale_udp_sockets(&mut self) -> sockets::SweepReport {
        if self.stale_udp.is_empty() {
            return sockets::SweepReport::default();
        }
        let mut stale = std::mem::take(&mut self.stale_udp);
        // An address that is (again) a backend of the same service keeps its sockets: only its
        // id changed (a new weight), or it came back before this sweep.
        stale.retain(|s| {
            let key = ServiceKey {
                addr_be: s.svc_addr_be,
                port_be: s.svc_port_be,
                proto: PROTO_UDP,
                family: s.family,
            };
            let ip = ip_from_be(s.addr_be, s.family);
            let addr = SocketAddr::new(ip, u16::from_be(s.port_be));
            !self
                .applied
                .get(&key)
                .is_some_and(|a| a.addrs().any(|(x, _)| x == addr))
        });
        if stale.is_empty() {
            return sockets::SweepReport::default();
        }
        let started = Instant::now();
        let namespaces = sockets::namespaces(&self.cgroup, Path::new(sockets::NETNS_DIR));
        if namespaces.is_empty() {
            // A containerised agent without the host's process ids and without /run/netns.
            warn!(
                cgroup = %self.cgroup.display(),
                netns_dir = sockets::NETNS_DIR,
                "no pod network namespace is visible (run with hostPID or mount the host's /run/netns): connected UDP sockets of removed backends are not ended"
            );
            self.udp_destroy_failed += 1;
        }
        let revnat = &self.revnat;
        let lookup = move |cookie, backend_addr_be, backend_port_be| {
            let k = RevNatKey {
                cookie,
                backend_addr_be,
                backend_port_be,
                ..RevNatKey::default()
            };
            revnat
                .get(&k, 0)
                .ok()
                .map(|v| (v.svc_addr_be, v.svc_port_be))
        };
        let report = sockets::sweep(&lookup, &stale, &namespaces);
        self.udp_destroyed += report.destroyed;
        self.udp_destroy_failed += report.failed;
        for e in &report.errors {
            warn!(error = %e, "ending UDP sockets of removed backends");
        }
        info!(
            backends = stale.len(),
            namespaces = report.namespaces,
            destroyed = report.destroyed,
            failed = report.failed,
            took_ms = started.elapsed().as_millis() as u64,
            "ended connected UDP sockets of removed backends"
        );
        report
    }

    /// Connected UDP sockets destroyed because their backend left its service (since start).
    #[must_use]
    pub fn udp_sockets_destroyed(&self) -> u64 {
        self.udp_destroyed
    }

    /// Such sockets that could not be destroyed, and namespaces that could not be searched.
    #[must_use]
    pub fn udp_socket_destroy_failures(&self) -> u64 {
        self.udp_destroy_failed
    }

    /// Removed backends still in quarantine (their state slots are not reused yet).
    #[must_use]
    pub fn retired_backends(&self) -> usize {
        self.retired.len()
    }

    /// Sets the service's ejected count to the number of its current backends whose circuit is
    /// open or half-open: releases the share of removed backends and of any reservation the
    /// kernel could not give back (it keeps the count with compare-and-swap between repairs).
    fn repair_ejected(&mut self, key: &ServiceKey) -> Result<(), DatapathError> {
        let Some(a) = self.applied.get(key) else {
            return Ok(());
        };
        let slot = service_slot(a.id);
        let mut ss = self
            .service_state
            .get(&slot, 0)
            .map_err(map_err("read", SERVICE_STATE_MAP))?;
        // The count that never lets a service eject again is one too high; a zero count has
        // nothing to release (one lost to contention only loosens the cap until the next repair).
        if ss.id != a.id || ss.ejected == 0 {
            return Ok(());
        }
        let mut ejected = 0u64;
        for id in &a.backends {
            if let Ok(st) = self.backend_state.get(&state_slot(*id), 0)
                && st.id == *id
                && !circuit::is_closed(st.circuit)
            {
                ejected += 1;
            }
        }
        if ss.ejected != ejected {
            debug!(
                service = a.id,
                was = ss.ejected,
                now = ejected,
                "ejected count repaired"
            );
            ss.ejected = ejected;
            self.service_state
                .set(slot, ss, 0)
                .map_err(map_err("write", SERVICE_STATE_MAP))?;
        }
        Ok(())
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

    /// Kernel memory held by lookup tables (Maglev/weighted services only), in bytes.
    #[must_use]
    pub fn table_bytes(&self) -> usize {
        self.table_chunks * size_of::<LbChunk>()
    }

    /// The lookup-table size of the service at `key` (0: its algorithm uses none).
    #[must_use]
    pub fn table_size(&self, key: &ServiceKey) -> u32 {
        self.applied.get(key).map_or(0, |a| a.conf.table_size)
    }

    /// The service's ejected count as the kernel holds it.
    pub fn ejected_count(&self, key: &ServiceKey) -> Result<u64, DatapathError> {
        let Some(a) = self.applied.get(key) else {
            return Ok(0);
        };
        let ss = self
            .service_state
            .get(&service_slot(a.id), 0)
            .map_err(map_err("read", SERVICE_STATE_MAP))?;
        Ok(if ss.id == a.id { ss.ejected } else { 0 })
    }

    /// Removes a service; its existing connections go on undisturbed.
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<bool, DatapathError> {
        let Some(applied) = self.applied.remove(key) else {
            return Ok(false);
        };
        self.services
            .remove(key)
            .map_err(map_err("delete", SERVICES_MAP))?;
        self.drop_conf(&applied.conf, applied.chunks, Instant::now());
        for id in applied.backends {
            self.retire_backend(id, key);
        }
        let slot = service_slot(applied.id);
        let _ = self.service_state.set(slot, ServiceState::default(), 0);
        self.ids.service_slots[slot as usize] = false;
        self.collect_retired();
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
        Ok(self.status_of(key, |id| {
            self.backend_state
                .get(&state_slot(id), 0)
                .unwrap_or_default()
        }))
    }

    /// [`Self::backend_status`] of many services at once (a metrics scrape asks for all of
    /// them). Past [`BATCH_STATUS_MIN`] backends the `BACKEND_STATE` slots are read with
    /// `BPF_MAP_LOOKUP_BATCH`, a few thousand per `bpf(2)` call, instead of one call per backend:
    /// at 100,000 backends the per-backend reads kept the owner thread busy for over a second
    /// per scrape (`cargo xtask bench telemetry`). Where the kernel refuses the batch call, the
    /// slots are read one by one as before.
    pub fn backend_status_many(
        &self,
        keys: Vec<ServiceKey>,
    ) -> Vec<(ServiceKey, Vec<BackendStatus>)> {
        let ids = keys
            .iter()
            .filter_map(|k| self.applied.get(k))
            .flat_map(|a| a.backends.iter().copied());
        let (count, last) = ids.fold((0usize, 0u32), |(n, m), id| (n + 1, m.max(state_slot(id))));
        let slots = if count >= BATCH_STATUS_MIN {
            match lookup_batch(self.backend_state.map().fd().as_fd().as_raw_fd(), last + 1) {
                Ok(v) => Some(v),
                Err(e) => {
                    debug!(error = %e, "BPF_MAP_LOOKUP_BATCH refused: reading BACKEND_STATE slot by slot");
                    None
                }
            }
        } else {
            None
        };
        keys.into_iter()
            .map(|k| {
                let status = self.status_of(&k, |id| match &slots {
                    Some(v) => v.get(state_slot(id) as usize).copied().unwrap_or_default(),
                    None => self
                        .backend_state
                        .get(&state_slot(id), 0)
                        .unwrap_or_default(),
                });
                (k, status)
            })
            .collect()
    }

    /// A service's backends with the state `state(id)` reads; addresses and weights from what
    /// this agent wrote to `BACKEND_ADDRS` (kept in `applied`, so no read of that map).
    fn status_of(
        &self,
        key: &ServiceKey,
        state: impl Fn(u32) -> BackendState,
    ) -> Vec<BackendStatus> {
        let Some(applied) = self.applied.get(key) else {
            return Vec::new();
        };
        applied
            .backends
            .iter()
            .zip(applied.addrs())
            .map(|(id, (addr, weight))| {
                let st = state(*id);
                let state = if st.id == *id {
                    BackendCounters::from(st)
                } else {
                    BackendCounters::default()
                };
                BackendStatus {
                    id: *id,
                    addr: addr.socket_addr(),
                    weight,
                    state,
                }
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

    /// The kernel's run statistics of this object's program `name`: (total run time, runs). Both
    /// stay 0 unless statistics are on (`aya::sys::enable_stats` or `kernel.bpf_stats_enabled`);
    /// `None` if the object has no such program or the kernel refuses the query.
    #[must_use]
    pub fn program_run_stats(&self, name: &str) -> Option<(Duration, u64)> {
        let info = self.ebpf.program(name)?.info().ok()?;
        Some((info.run_time(), info.run_count()))
    }

    /// One counter by its `CTR_*` index.
    pub fn counter(&self, idx: u32) -> Result<u64, DatapathError> {
        let v = self
            .counters
            .get(&idx, 0)
            .map_err(map_err("read", COUNTERS_MAP))?;
        Ok(v.iter().sum())
    }

    /// An L7 failure seen by a proxy (HTTP 5xx, gRPC UNAVAILABLE…) at `now_monotonic_ns`
    /// (`CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`; 0 = the kernel's now): counted against
    /// the backend's circuit by the kernel's own code — `mesh_l7_report` runs `circuit::on_failure`,
    /// the function sockops calls for a refused connect, with its compare-and-swap transitions and
    /// the atomic ejection cap — so a report racing with connections on other CPUs can neither
    /// lose a count nor open a circuit twice. Envoy counts a 5xx toward `consecutive_5xx` the
    /// same way it counts a connect failure toward `consecutive_gateway_failure`.
    ///
    /// Returns true when this report ejected the backend; false when it was only counted, or when
    /// `backend_id` is not a current backend (a report about an endpoint just removed is moot).
    pub fn report_failure(
        &mut self,
        backend_id: u32,
        now_monotonic_ns: u64,
    ) -> Result<bool, DatapathError> {
        self.report(backend_id, REPORT_KIND_FAILURE, now_monotonic_ns)
            .map(|r| r == REPORT_R_EJECTED)
    }

    /// An L7 success (a response that is not a failure): resets the backend's consecutive
    /// failures, as a cleanly closed connection does (Envoy resets `consecutive_5xx` on any
    /// non-5xx). Returns false when `backend_id` is not a current backend.
    pub fn report_success(
        &mut self,
        backend_id: u32,
        now_monotonic_ns: u64,
    ) -> Result<bool, DatapathError> {
        self.report(backend_id, REPORT_KIND_SUCCESS, now_monotonic_ns)
            .map(|r| r == REPORT_R_COUNTED)
    }

    /// Runs `mesh_l7_report` once with (backend, configuration of its service, kind, now);
    /// returns its `REPORT_R_*` verdict.
    fn report(&self, backend_id: u32, kind: u64, now_ns: u64) -> Result<u32, DatapathError> {
        let Some(conf_id) = self
            .applied
            .values()
            .find(|a| a.backends.contains(&backend_id))
            .map(|a| a.conf.conf_id)
        else {
            return Ok(REPORT_R_UNKNOWN_BACKEND);
        };
        let run_err = |source| DatapathError::Program {
            op: "run (BPF_PROG_TEST_RUN)",
            name: REPORT_PROGRAM,
            source,
        };
        let prog: &RawTracePoint = self
            .ebpf
            .program(REPORT_PROGRAM)
            .ok_or(DatapathError::MissingProgram {
                name: REPORT_PROGRAM,
            })?
            .try_into()
            .map_err(run_err)?;
        let mut opts = RawTracePointRunOptions::new();
        opts.args[REPORT_ARG_BACKEND] = u64::from(backend_id);
        opts.args[REPORT_ARG_CONF] = u64::from(conf_id);
        opts.args[REPORT_ARG_KIND] = kind;
        opts.args[REPORT_ARG_NOW] = now_ns;
        let verdict = prog.test_run(opts).map_err(run_err)?.return_value;
        match verdict {
            REPORT_R_COUNTED
            | REPORT_R_EJECTED
            | REPORT_R_UNKNOWN_BACKEND
            | REPORT_R_UNKNOWN_SERVICE => Ok(verdict),
            other => Err(DatapathError::Report {
                backend_id,
                verdict: other,
                reason: if other == REPORT_R_BAD_KIND {
                    "the kernel object does not know this report kind (built from an older mesh-ebpf?)"
                } else {
                    "unknown verdict"
                },
            }),
        }
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
        aya::programs::Program::CgroupSock(p) => attach!(p),
        _ => return Err(DatapathError::MissingProgram { name }),
    };
    pin_link(fd_link, name, pin)
}

/// Attaches a `tp_btf` program through a pinned link. Tracing links cannot swap programs in
/// place, so on a restart the new link is attached first and then takes over the pin (the old
/// link detaches when its pin, its last reference, goes): for a moment both run, harmlessly.
fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    function: &str,
    pin: &Path,
) -> Result<(), DatapathError> {
    let prog_err = |op| move |source| DatapathError::Program { op, name, source };
    let btf = aya::Btf::from_sys_fs().map_err(|e| DatapathError::Io {
        op: "read kernel BTF",
        path: PathBuf::from("/sys/kernel/btf/vmlinux"),
        source: std::io::Error::other(e.to_string()),
    })?;
    let prog: &mut BtfTracePoint = program(ebpf, name)?;
    prog.load(function, &btf).map_err(prog_err("load"))?;
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
