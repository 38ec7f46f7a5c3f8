//! Backends and their circuit state: `BACKEND_ADDRS` (written by the agent) and `BACKEND_STATE`
//! (counters and circuit, written by the kernel's sockops callbacks), both arrays indexed by
//! [`state_slot`]`(id)`.

use crate::{AddrBe, assert_size, user_pod};

/// Map name: array of [`BackendAddr`], slot = [`state_slot`]`(id)`: what a connect needs of a
/// backend (address, service, weight), beside its state slot, so a pick reads one array element
/// instead of a hash bucket and element. A backend id names one endpoint *of one service*, so
/// its circuit state is per service, as Envoy keeps outlier state per cluster host.
///
/// Ids are not reused before the 32-bit counter wraps (the agent allocates them from a pinned
/// counter, [`crate::ids`]) and a slot passes to another id only after [`BACKEND_STATE_MAP`]'s
/// quarantine. The agent writes an element three times in its id's life: whole, when the id is
/// created (into a cleared slot); with `service_id` 0 when the backend is removed (new connects
/// stop picking it at once, as a deleted hash entry did); cleared (all zero) when the quarantine
/// ends. A kernel reader checks the `id` tag, copies, and checks the tag again: since a slot is
/// always cleared between two owners, a copy with any byte of a later owner cannot see the old
/// tag on the second look (see `ARCHITECTURE.md`, "No torn reads").
pub const BACKEND_ADDRS_MAP: &str = "BACKEND_ADDRS";
/// Capacity of [`BACKEND_ADDRS_MAP`] and [`BACKEND_STATE_MAP`] (and the most backends); a power
/// of two, so an id's slot is `id & (BACKENDS_CAPACITY - 1)`.
pub const BACKENDS_CAPACITY: u32 = 262_144;
/// Map name: array of [`BackendState`], slot = [`state_slot`]`(id)`. An array, not a hash: its
/// elements are never freed or recycled, so an atomic update through a pointer can only ever land
/// in the slot it was meant for; the [`BackendState::id`] tag says which id owns the slot now.
pub const BACKEND_STATE_MAP: &str = "BACKEND_STATE";

/// The slot of backend `id` in [`BACKEND_STATE_MAP`].
#[must_use]
pub const fn state_slot(id: u32) -> u32 {
    id & (BACKENDS_CAPACITY - 1)
}

/// Circuit closed: the backend takes connections.
pub const CIRCUIT_CLOSED: u32 = 0;
/// Circuit open: ejected until the word's deadline.
pub const CIRCUIT_OPEN: u32 = 1;
/// Half-open: one probe connection is in flight until the word's deadline; its outcome closes or
/// re-opens the circuit.
pub const CIRCUIT_HALF_OPEN: u32 = 2;

/// A half-open probe that reports nothing for this long is presumed lost and may be retried.
pub const PROBE_TIMEOUT_NS: u64 = 30_000_000_000;

/// Value of [`BACKEND_ADDRS_MAP`]: 32 bytes, so two share a cache line and none straddles one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendAddr {
    /// The backend id this slot serves (0: free); the same tag as [`BackendState::id`].
    pub id: u32,
    /// The service the backend belongs to; 0 once it was removed (in quarantine).
    pub service_id: u32,
    pub addr_be: AddrBe,
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
    pub weight: u32,
}
assert_size!(BackendAddr, 32);

/// Value of [`BACKEND_STATE_MAP`]: changed by the kernel with atomic operations only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendState {
    /// Connections from SYN sent until fully closed (includes connecting and half-closed).
    pub active: u64,
    /// Connections established, ever.
    pub total: u64,
    /// Failures ever (refused, SYN retransmit timeout, reset by the backend).
    pub failures: u64,
    /// Failures since the last success.
    pub consecutive_failures: u64,
    /// The circuit: state and deadline in one word ([`crate::logic::circuit`]), so every
    /// transition is one compare-and-swap.
    pub circuit: u64,
    /// When the circuit last closed (for resetting the ejection multiplier).
    pub closed_since_ns: u64,
    /// The backend id this slot serves (0: free). Written by the agent when it creates the id.
    pub id: u32,
    /// Times ejected since the multiplier last reset; the next ejection lasts `ejections + 1`
    /// base ejection times.
    pub ejections: u32,
}
assert_size!(BackendState, 56);
// The kernel changes `ejections` with 8-byte atomics on the word it shares with `id`.
const _: () = assert!(core::mem::offset_of!(BackendState, id) % 8 == 0);

user_pod!(BackendAddr, BackendState);
