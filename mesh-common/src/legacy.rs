//! Map names and layouts of the previous data-path generation, read only by the agent to migrate
//! a node where an older agent left them pinned (then it removes their pins).
//!
//! Session 17 replaced the `BACKEND_SLOTS` hash by ranges of `SERVICE_SLOTS`, the `BACKENDS` hash
//! by the `BACKEND_ADDRS` array, and added `slot_base` to the service configuration (hence
//! `SERVICE_CONF_V2`). New names, so a pin of an old layout is never adopted with a new one.

use crate::{AddrBe, assert_size, service::ServiceKey, user_pod};

/// Previous name of the configuration map (value [`Service`], no `slot_base`).
pub const SERVICE_CONF_MAP: &str = "SERVICE_CONF";
/// Previous slots map: ([`SlotKey`]) → backend id, slots `0..backend_count` of a service id.
pub const BACKEND_SLOTS_MAP: &str = "BACKEND_SLOTS";
/// Previous backends map: backend id → [`Backend`] (hash).
pub const BACKENDS_MAP: &str = "BACKENDS";
/// Every previous-generation map the agent migrates and then unpins.
pub const MAP_NAMES: [&str; 3] = [SERVICE_CONF_MAP, BACKEND_SLOTS_MAP, BACKENDS_MAP];

/// Value of the previous [`SERVICE_CONF_MAP`] (68 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    pub conf_id: u32,
    pub id: u32,
    pub backend_count: u32,
    pub algorithm: u8,
    pub flags: u8,
    pub _pad: u16,
    pub table_size: u32,
    pub affinity_timeout_s: u32,
    pub max_connections: u32,
    pub consecutive_failures: u32,
    pub base_ejection_ms: u32,
    pub max_ejection_ms: u32,
    pub max_ejection_pct: u32,
    pub panic_threshold_pct: u32,
}
assert_size!(Service, 68);

/// Key of the previous [`BACKEND_SLOTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}
assert_size!(SlotKey, 8);

/// Value of the previous [`BACKENDS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr_be: AddrBe,
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
    pub service_id: u32,
    pub weight: u32,
}
assert_size!(Backend, 28);

user_pod!(Service, SlotKey, Backend);
