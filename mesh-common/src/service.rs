//! Services and how a connect picks a backend: `SERVICES`, `BACKEND_SLOTS`, `LB_TABLES`,
//! `SERVICE_STATE` and `AFFINITY`.

use crate::{AddrBe, assert_size, user_pod};

/// Map name: service address → [`Service`].
pub const SERVICES_MAP: &str = "SERVICES";
/// Capacity of [`SERVICES_MAP`].
pub const SERVICES_CAPACITY: u32 = 65_536;
/// Map name: ([`SlotKey`]) → backend id; slots `0..backend_count` of a service.
pub const BACKEND_SLOTS_MAP: &str = "BACKEND_SLOTS";
/// Capacity of [`BACKEND_SLOTS_MAP`].
pub const BACKEND_SLOTS_CAPACITY: u32 = 262_144;
/// Map name: service id → [`LbTable`] (Maglev or weighted lookup table).
pub const LB_TABLES_MAP: &str = "LB_TABLES";
/// Capacity of [`LB_TABLES_MAP`] (allocated on demand: only Maglev/weighted services use it).
pub const LB_TABLES_CAPACITY: u32 = 65_536;
/// Map name: service id → [`ServiceState`] (kernel-written).
pub const SERVICE_STATE_MAP: &str = "SERVICE_STATE";
/// Map name: [`AffinityKey`] → [`AffinityValue`] (LRU).
pub const AFFINITY_MAP: &str = "AFFINITY";
/// Capacity of [`AFFINITY_MAP`].
pub const AFFINITY_CAPACITY: u32 = 65_536;

/// Size of a Maglev/weighted lookup table: a prime, as Maglev requires, ≥ 100 × typical backends.
pub const LB_TABLE_SIZE: usize = 1021;
/// Storage of a table: the next power of two, so the kernel can bound an index with a mask the
/// verifier understands. Entries past [`LB_TABLE_SIZE`] are never chosen.
pub const LB_TABLE_SLOTS: usize = 1024;
/// How many slots a connect scans at most for an eligible backend (bounded loop for the verifier).
pub const MAX_SCAN: u32 = 64;

/// Pick uniformly at random.
pub const LB_RANDOM: u8 = 0;
/// Round robin over the slots (a per-service kernel counter).
pub const LB_ROUND_ROBIN: u8 = 1;
/// Random over a weight-proportional [`LbTable`].
pub const LB_WEIGHTED: u8 = 2;
/// Maglev consistent hashing over [`LbTable`] (client netns cookie + bound source port).
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

/// Value of [`SERVICES_MAP`]: the service's identity, algorithm and circuit-breaker settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub id: u32,
    /// Slots `0..backend_count` in [`BACKEND_SLOTS_MAP`] are valid.
    pub backend_count: u32,
    /// One of the `LB_*` constants.
    pub algorithm: u8,
    /// `SVC_F_*` bits.
    pub flags: u8,
    pub _pad: u16,
    pub affinity_timeout_s: u32,
    /// Per backend; 0 = unlimited.
    pub max_connections: u32,
    /// Consecutive failures that eject a backend; 0 = outlier detection off.
    pub consecutive_failures: u32,
    /// First ejection lasts this long; the n-th lasts n times as long (capped).
    pub base_ejection_ms: u32,
    /// Cap of one ejection's length.
    pub max_ejection_ms: u32,
    /// At most this percentage of backends ejected at once (at least one may always be ejected).
    pub max_ejection_pct: u32,
}
assert_size!(Service, 36);

/// Key of [`BACKEND_SLOTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}
assert_size!(SlotKey, 8);

/// Value of [`LB_TABLES_MAP`]: backend ids, each appearing in proportion to its weight (weighted)
/// or in Maglev permutation order (Maglev). Replaced whole in one update, so a lookup never sees
/// a half-written table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbTable {
    pub backend_ids: [u32; LB_TABLE_SLOTS],
}
assert_size!(LbTable, 4096);

impl Default for LbTable {
    fn default() -> Self {
        Self {
            backend_ids: [0; LB_TABLE_SLOTS],
        }
    }
}

/// Value of [`SERVICE_STATE_MAP`]; written by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceState {
    /// Round-robin cursor.
    pub rr_next: u64,
    /// Backends currently ejected (open or half-open), for `max_ejection_pct`.
    pub ejected: u64,
}
assert_size!(ServiceState, 16);

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
    SlotKey,
    LbTable,
    ServiceState,
    AffinityKey,
    AffinityValue
);
