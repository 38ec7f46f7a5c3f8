//! Services and how a connect picks a backend: `SERVICES`, `SERVICE_CONF_V2`, `SERVICE_SLOTS`,
//! `LB_TABLES`, `SERVICE_STATE` and `AFFINITY`.

use crate::{AddrBe, assert_size, user_pod};

/// Map name: service address ([`ServiceKey`]) → the id of its current [`Service`] configuration
/// in [`SERVICE_CONF_MAP`] (a `u32`: one aligned load, which cannot tear).
pub const SERVICES_MAP: &str = "SERVICES";
/// Capacity of [`SERVICES_MAP`] and [`SERVICE_STATE_MAP`]; a power of two (see [`service_slot`]).
pub const SERVICES_CAPACITY: u32 = 65_536;
/// Map name: configuration id → [`Service`]. Every change of a service is written under a new,
/// configuration id (not reused before its 32-bit counter wraps), then published by switching [`SERVICES_MAP`], then the old one
/// is deleted: entries are never updated in place, so a reader that still finds its key after
/// copying the value has an untorn copy.
///
/// `_V2`: the layout with [`Service::slot_base`]. A new name, so a pin of the previous layout
/// (`crate::legacy::SERVICE_CONF_MAP`) is never read with this one; the agent migrates it.
pub const SERVICE_CONF_MAP: &str = "SERVICE_CONF_V2";
/// Capacity of [`SERVICE_CONF_MAP`]: every service's current configuration plus the previous ones
/// of services being switched.
pub const SERVICE_CONF_CAPACITY: u32 = 2 * SERVICES_CAPACITY;
/// Map name: array of backend ids (`u32`). Each configuration owns the contiguous range
/// `slot_base..slot_base + backend_count`, written before the configuration is published and
/// never changed while it is: a connect reads `SERVICE_SLOTS[slot_base + i]`, one array element
/// (one cache line) instead of a hash bucket and element. The agent allocates the ranges
/// (first fit) and frees one only after its configuration is unpublished and a quarantine.
pub const SLOTS_MAP: &str = "SERVICE_SLOTS";
/// Capacity of [`SLOTS_MAP`]: a power of two (the kernel masks the index), twice the backend
/// capacity, because a service's new range is written before its old one is freed.
pub const SLOTS_CAPACITY: u32 = 524_288;
/// Map name: ([`TableKey`]) → [`LbChunk`]: the Maglev or weighted lookup table of one service
/// configuration, in chunks of [`LB_CHUNK`] entries (allocated on demand: only services that use
/// a table have one).
pub const LB_TABLES_MAP: &str = "LB_TABLES";
/// Capacity of [`LB_TABLES_MAP`] in chunks (4 KiB each, allocated on demand).
pub const LB_TABLES_CAPACITY: u32 = 16_384;
/// Map name: array of [`ServiceState`] (kernel-written), slot = [`service_slot`]`(id)`.
pub const SERVICE_STATE_MAP: &str = "SERVICE_STATE";
/// Map name: [`AffinityKey`] → [`AffinityValue`] (LRU).
pub const AFFINITY_MAP: &str = "AFFINITY";
/// Capacity of [`AFFINITY_MAP`].
pub const AFFINITY_CAPACITY: u32 = 65_536;

/// Entries per [`LbChunk`] (a power of two so the kernel can mask an index).
pub const LB_CHUNK: u32 = 1024;
/// Smallest lookup table (a prime, as Maglev requires).
pub const LB_TABLE_MIN: u32 = 1021;
/// Largest lookup table (a prime; 128 chunks).
pub const LB_TABLE_MAX: u32 = 131_071;
/// Random picks a connect tries before scanning every slot for an eligible backend.
pub const RANDOM_TRIES: u32 = 32;
/// Most slots a full scan visits (the endpoint limit of one service port).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 65_536;

/// The slot of service `id` in [`SERVICE_STATE_MAP`].
#[must_use]
pub const fn service_slot(id: u32) -> u32 {
    id & (SERVICES_CAPACITY - 1)
}

/// Pick uniformly at random.
pub const LB_RANDOM: u8 = 0;
/// Round robin over the slots (a per-service kernel counter).
pub const LB_ROUND_ROBIN: u8 = 1;
/// Random over a weight-proportional lookup table.
pub const LB_WEIGHTED: u8 = 2;
/// Maglev consistent hashing over a lookup table (client netns cookie + bound source port).
pub const LB_MAGLEV: u8 = 3;
/// Power of two choices, fewer active connections wins (kernel-counted).
pub const LB_LEAST_CONN: u8 = 4;

/// [`Service::flags`]: `ClientIP` session affinity (client = the pod's network namespace).
pub const SVC_F_AFFINITY: u8 = 1;

/// Key of [`SERVICES_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr_be: AddrBe,
    pub port_be: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`].
    pub family: u8,
}
assert_size!(ServiceKey, 20);

/// Value of [`SERVICE_CONF_MAP`]: one configuration of a service — identity, algorithm, table and
/// circuit-breaker settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// The address this configuration belongs to (checked by the kernel after the lookup).
    pub key: ServiceKey,
    /// This configuration's own id (its key in [`SERVICE_CONF_MAP`]; its table's key).
    pub conf_id: u32,
    /// The service's id: stable across configurations (slots, state, affinity, backends).
    pub id: u32,
    /// Slots `slot_base..slot_base + backend_count` of [`SLOTS_MAP`] are this configuration's.
    pub backend_count: u32,
    /// One of the `LB_*` constants.
    pub algorithm: u8,
    /// `SVC_F_*` bits.
    pub flags: u8,
    pub _pad: u16,
    /// Entries of this configuration's lookup table (0: none).
    pub table_size: u32,
    pub affinity_timeout_s: u32,
    /// Per backend; 0 = unlimited.
    pub max_connections: u32,
    /// Consecutive failures that eject a backend; 0 = outlier detection off.
    pub consecutive_failures: u32,
    /// First ejection lasts this long; the n-th lasts n times as long (capped).
    pub base_ejection_ms: u32,
    /// Cap of one ejection's length.
    pub max_ejection_ms: u32,
    /// At most this percentage of backends ejected at once (at least one may always be ejected);
    /// 0..=100.
    pub max_ejection_pct: u8,
    /// Below this percentage of eligible backends, balance over all of them (Envoy's panic
    /// threshold); 0 = never; 0..=100.
    pub panic_threshold_pct: u8,
    pub _pad2: u16,
    /// First element of this configuration's range in [`SLOTS_MAP`].
    pub slot_base: u32,
}
// 68 bytes, as before `slot_base` (the percentages shrank to make room): `translate`'s frame,
// which holds a copy, and the callee frames share the verifier's 512-byte stack budget.
assert_size!(Service, 68);

/// The index in [`SLOTS_MAP`] of slot `i` of a configuration whose range starts at `base`
/// (masked so the kernel's verifier sees it in bounds; the agent keeps ranges inside).
#[must_use]
pub const fn slot_index(base: u32, i: u32) -> u32 {
    base.wrapping_add(i) & (SLOTS_CAPACITY - 1)
}

/// Key of [`LB_TABLES_MAP`]: chunk `chunk` of configuration `conf_id`'s table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TableKey {
    pub conf_id: u32,
    pub chunk: u32,
}
assert_size!(TableKey, 8);

/// Value of [`LB_TABLES_MAP`]: backend ids, each appearing in proportion to its weight (weighted)
/// or in Maglev permutation order (Maglev).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbChunk {
    pub backend_ids: [u32; LB_CHUNK as usize],
}
assert_size!(LbChunk, 4096);

impl Default for LbChunk {
    fn default() -> Self {
        Self {
            backend_ids: [0; LB_CHUNK as usize],
        }
    }
}

/// Value of [`SERVICE_STATE_MAP`]; written by the kernel with atomics (and by the agent when it
/// creates a service, or repairs `ejected`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceState {
    /// Round-robin cursor.
    pub rr_next: u64,
    /// Backends currently ejected (open or half-open), for `max_ejection_pct` and the panic
    /// threshold.
    pub ejected: u64,
    /// The service id this slot serves (0: free).
    pub id: u32,
    pub _pad: u32,
}
assert_size!(ServiceState, 24);

/// Key of [`AFFINITY_MAP`]: one client (a pod's network namespace) of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}
assert_size!(AffinityKey, 16);

/// Value of [`AFFINITY_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
assert_size!(AffinityValue, 16);

user_pod!(
    ServiceKey,
    Service,
    TableKey,
    LbChunk,
    ServiceState,
    AffinityKey,
    AffinityValue
);
