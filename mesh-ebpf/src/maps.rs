//! Every map of the data path, declared once with its contract type from `mesh-common`, and the
//! validated reads that make recycled map elements harmless.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SkStorage, SockHash},
    macros::btf_map,
};
use mesh_common::{
    backend::{BACKENDS_CAPACITY, BackendAddr, BackendState, state_slot},
    bypass::{
        BYPASS_BYTES_CAPACITY, BYPASS_SOCKS_CAPACITY, BypassBytes, EndpointKey,
        LOCAL_ENDPOINTS_CAPACITY, LocalEndpoint, SockKey,
    },
    counters::{COUNTERS_CAPACITY, CTR_BACKEND_MISSING, CTR_CONF_STALE},
    event::{EVENTS_BYTES, FlowEvent},
    ids::ID_ALLOC_CAPACITY,
    service::{
        AFFINITY_CAPACITY, AffinityKey, AffinityValue, LB_TABLES_CAPACITY, LbChunk,
        SERVICE_CONF_CAPACITY, SERVICES_CAPACITY, SLOTS_CAPACITY, Service, ServiceKey,
        ServiceState, TableKey, service_slot, slot_index,
    },
    sock::{REVNAT_CAPACITY, RevNatKey, RevNatValue, SockState},
};

use core::ptr::read_volatile;

use crate::atomic;

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, u32, { SERVICES_CAPACITY as usize }> = HashMap::new();

/// `mesh_common::service::SERVICE_CONF_MAP`: a static's name is its map's name, `SERVICE_CONF_V2`.
#[btf_map]
pub static SERVICE_CONF_V2: HashMap<u32, Service, { SERVICE_CONF_CAPACITY as usize }> =
    HashMap::new();

#[btf_map]
pub static SERVICE_SLOTS: Array<u32, { SLOTS_CAPACITY as usize }> = Array::new();

#[btf_map]
pub static LB_TABLES: HashMap<TableKey, LbChunk, { LB_TABLES_CAPACITY as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map]
pub static SERVICE_STATE: Array<ServiceState, { SERVICES_CAPACITY as usize }> = Array::new();

#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { AFFINITY_CAPACITY as usize }> =
    LruHashMap::new();

#[btf_map]
pub static BACKEND_ADDRS: Array<BackendAddr, { BACKENDS_CAPACITY as usize }> = Array::new();

#[btf_map]
pub static BACKEND_STATE: Array<BackendState, { BACKENDS_CAPACITY as usize }> = Array::new();

#[btf_map]
pub static ID_ALLOC: Array<u64, { ID_ALLOC_CAPACITY as usize }> = Array::new();

#[btf_map]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

#[btf_map]
pub static SOCK_FIN_WAIT2: SkStorage<u32> = SkStorage::new();

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
pub static BYPASS_BYTES: LruHashMap<SockKey, BypassBytes, { BYPASS_BYTES_CAPACITY as usize }> =
    LruHashMap::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { COUNTERS_CAPACITY as usize }> = PerCpuArray::new();

/// Per-CPU scratch for a connect's backend search (too large for the 512-byte stack).
#[btf_map]
pub static SCRATCH: PerCpuArray<crate::connect::Search, 1> = PerCpuArray::new();

#[btf_map]
pub static EVENTS: RingBuf<FlowEvent, { EVENTS_BYTES as usize }> = RingBuf::new();

/// Increments reason counter `idx` on this CPU. Atomic even though the slot is per-CPU: a program
/// that preempts this one on the same CPU (a tracepoint in softirq) must not lose its count.
#[inline(always)]
pub fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: a valid, aligned slot of the per-CPU array.
        unsafe { atomic::add(p, 1) };
    }
}

/// The current configuration of the service at `key`, copied out and validated: the copy is used
/// only if its entry still exists after the copy (configuration ids are not reused before their 32-bit counter wraps, and entries
/// never rewritten, so the copy is not torn) and belongs to `key`. One retry covers an agent
/// switch in between. A function of its own (a BPF-to-BPF call) so its copies stay off the
/// callers' frames.
#[inline(never)]
pub fn service(key: &ServiceKey) -> Option<Service> {
    for _ in 0..2 {
        // SAFETY: a u32 value: one aligned load.
        let conf_id = unsafe { core::ptr::read_volatile(SERVICES.get_ptr(key)?) };
        let Some(p) = SERVICE_CONF_V2.get_ptr(conf_id) else {
            count(CTR_CONF_STALE);
            continue;
        };
        // SAFETY: `p` came from a successful lookup; a volatile copy is taken exactly once.
        let svc = unsafe { core::ptr::read_volatile(p) };
        if SERVICE_CONF_V2.get_ptr(conf_id).is_some() && svc.conf_id == conf_id && svc.key == *key {
            return Some(svc);
        }
        count(CTR_CONF_STALE);
    }
    None
}

/// Configuration `conf_id` as written by the agent, copied out and validated as in [`service`]
/// (its entry still exists after the copy, and names itself).
#[inline(never)]
pub fn service_conf(conf_id: u32) -> Option<Service> {
    let p = SERVICE_CONF_V2.get_ptr(conf_id)?;
    // SAFETY: `p` came from a successful lookup; a volatile copy is taken exactly once.
    let svc = unsafe { core::ptr::read_volatile(p) };
    (SERVICE_CONF_V2.get_ptr(conf_id).is_some() && svc.conf_id == conf_id).then_some(svc)
}

/// Backend `id` if its slot of `BACKEND_ADDRS` is tagged with it, the copy is untorn and it
/// belongs to service `service_id` (not removed); otherwise counts `backend_missing`. Untorn: the
/// tag is read before and after the copy, and the agent clears a slot between two owners, so a
/// copy holding any byte of a later owner finds the tag changed (`mesh_common::backend`).
#[inline(always)]
pub fn backend(id: u32, service_id: u32) -> Option<BackendAddr> {
    if let Some(p) = BACKEND_ADDRS.get_ptr(state_slot(id)) {
        // SAFETY: array element (never freed); volatile loads: the tag, the copy, the tag again.
        let ok = unsafe {
            if read_volatile(&raw const (*p).id) == id {
                let b = read_volatile(p);
                (read_volatile(&raw const (*p).id) == id && b.service_id == service_id).then_some(b)
            } else {
                None
            }
        };
        if ok.is_some() && service_id != 0 {
            return ok;
        }
    }
    count(CTR_BACKEND_MISSING);
    None
}

/// The backend id in slot `i` of configuration `svc` (`SERVICE_SLOTS[slot_base + i]`, a `u32`:
/// one aligned load); 0 when out of range or empty. Validated by [`backend`] before use.
#[inline(always)]
pub fn slot_id(svc: &Service, i: u32) -> u32 {
    if i >= svc.backend_count {
        return 0;
    }
    // SAFETY: array element; a u32 value: one aligned load.
    SERVICE_SLOTS
        .get_ptr(slot_index(svc.slot_base, i))
        .map_or(0, |p| unsafe { read_volatile(p) })
}

/// The state slot of backend `id`, if the slot belongs to it now.
#[inline(always)]
pub fn backend_state(id: u32) -> Option<*mut BackendState> {
    let p = BACKEND_STATE.get_ptr_mut(state_slot(id))?;
    // SAFETY: array element (never freed); a volatile 4-byte load of the tag.
    (unsafe { core::ptr::read_volatile(&raw const (*p).id) } == id).then_some(p)
}

/// The state slot of service `id`, if the slot belongs to it now.
#[inline(always)]
pub fn service_state(id: u32) -> Option<*mut ServiceState> {
    let p = SERVICE_STATE.get_ptr_mut(service_slot(id))?;
    // SAFETY: array element (never freed); a volatile 4-byte load of the tag.
    (unsafe { core::ptr::read_volatile(&raw const (*p).id) } == id).then_some(p)
}

/// Socket `sk`'s `SOCK_STATE`, made zeroed first if `create` (and memory allows); `None` for a
/// null socket or a socket without one. The one raw accessor for contexts holding a socket
/// pointer (sockops, tracepoints, `sock_release`); `sock_addr` programs use the map's methods.
#[inline(always)]
#[expect(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "`sk` is only handed to the helper, whose argument the verifier checks"
)]
pub fn sock_state(sk: *mut core::ffi::c_void, create: bool) -> Option<*mut SockState> {
    if sk.is_null() {
        return None;
    }
    let map = (&raw const SOCK_STATE).cast_mut().cast();
    let flags = if create {
        u64::from(aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: the helper takes a (null-checked) socket pointer; a created value starts zeroed.
    let p = unsafe { aya_ebpf::helpers::bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags) };
    (!p.is_null()).then_some(p.cast())
}
