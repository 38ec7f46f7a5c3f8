//! Backends and their circuit state: `BACKENDS` (written by the agent) and `BACKEND_STATE`
//! (counters and circuit, written by the kernel's sockops callbacks).

use crate::{AddrBe, assert_size, user_pod};

/// Map name: backend id → [`Backend`] (hash). A backend id names one endpoint *of one service*,
/// so its circuit state is per service, as Envoy keeps outlier state per cluster host.
///
/// Ids are not reused before the 32-bit counter wraps (the agent allocates them from a pinned
/// counter, [`crate::ids`]; after a wrap it skips ids still in use) and an
/// entry is written once, when its id is created, and deleted once: so a kernel reader that still
/// finds the key after copying the value knows the copy came from that one entry, never from a
/// recycled element (see `ARCHITECTURE.md`, "No torn reads").
pub const BACKENDS_MAP: &str = "BACKENDS";
/// Capacity of [`BACKENDS_MAP`] and [`BACKEND_STATE_MAP`]; a power of two, so an id's slot in
/// [`BACKEND_STATE_MAP`] is `id & (BACKENDS_CAPACITY - 1)`.
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

/// Value of [`BACKENDS_MAP`].
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

user_pod!(Backend, BackendState);
