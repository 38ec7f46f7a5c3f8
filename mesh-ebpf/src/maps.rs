//! Every map of the data path, declared once with its contract type from `mesh-common`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, SkStorage, SockHash},
    macros::btf_map,
};
use mesh_common::{
    backend::{BACKENDS_CAPACITY, Backend, BackendState},
    bypass::{
        BYPASS_SOCKS_CAPACITY, EndpointKey, LOCAL_ENDPOINTS_CAPACITY, LocalEndpoint, SockKey,
    },
    counters::COUNTERS_CAPACITY,
    event::{EVENTS_BYTES, FlowEvent},
    service::{
        AFFINITY_CAPACITY, AffinityKey, AffinityValue, BACKEND_SLOTS_CAPACITY, LB_TABLES_CAPACITY,
        LbTable, SERVICES_CAPACITY, Service, ServiceKey, ServiceState, SlotKey,
    },
    sock::{REVNAT_CAPACITY, RevNatKey, RevNatValue, SockState},
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, Service, { SERVICES_CAPACITY as usize }> = HashMap::new();

#[btf_map]
pub static BACKEND_SLOTS: HashMap<SlotKey, u32, { BACKEND_SLOTS_CAPACITY as usize }> =
    HashMap::new();

#[btf_map]
pub static LB_TABLES: HashMap<u32, LbTable, { LB_TABLES_CAPACITY as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static SERVICE_STATE: HashMap<u32, ServiceState, { SERVICES_CAPACITY as usize }> =
    HashMap::new();

#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_CAPACITY as usize }> =
    LruHashMap::new();

#[btf_map]
pub static BACKENDS: HashMap<u32, Backend, { BACKENDS_CAPACITY as usize }> = HashMap::new();

#[btf_map]
pub static BACKEND_STATE: HashMap<u32, BackendState, { BACKENDS_CAPACITY as usize }> =
    HashMap::new();

#[btf_map]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

#[btf_map]
pub static REVNAT: LruHashMap<RevNatKey, RevNatValue, { REVNAT_CAPACITY as usize }> =
    LruHashMap::new();

#[btf_map]
pub static LOCAL_ENDPOINTS: HashMap<
    EndpointKey,
    LocalEndpoint,
    { LOCAL_ENDPOINTS_CAPACITY as usize },
> = HashMap::new();

#[btf_map]
pub static BYPASS_SOCKS: SockHash<SockKey, { BYPASS_SOCKS_CAPACITY as usize }> = SockHash::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { COUNTERS_CAPACITY as usize }> = PerCpuArray::new();

#[btf_map]
pub static EVENTS: RingBuf<FlowEvent, { EVENTS_BYTES as usize }> = RingBuf::new();

/// Increments reason counter `idx` on this CPU.
#[inline(always)]
pub fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}
