//! Backends and their circuit state: `BACKENDS` (written by the agent) and `BACKEND_STATE`
//! (counters and circuit, written by the kernel's sockops callbacks).

use crate::{AddrBe, assert_size, user_pod};

/// Map name: backend id → [`Backend`]. A backend id names one endpoint *of one service*, so its
/// circuit state is per service, as Envoy keeps outlier state per cluster host.
pub const BACKENDS_MAP: &str = "BACKENDS";
/// Capacity of [`BACKENDS_MAP`] and [`BACKEND_STATE_MAP`].
pub const BACKENDS_CAPACITY: u32 = 262_144;
/// Map name: backend id → [`BackendState`].
pub const BACKEND_STATE_MAP: &str = "BACKEND_STATE";

/// Circuit closed: the backend takes connections.
pub const CIRCUIT_CLOSED: u32 = 0;
/// Circuit open: ejected until `ejected_until_ns`.
pub const CIRCUIT_OPEN: u32 = 1;
/// Half-open: one probe connection is in flight; its outcome closes or re-opens the circuit.
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

/// Value of [`BACKEND_STATE_MAP`]: counted by the kernel with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendState {
    /// Connections from SYN sent until fully closed (includes connecting and half-closed).
    pub active: u64,
    /// Connections established, ever.
    pub total: u64,
    /// Failures ever (refused, SYN retransmit timeout, reported L7 failures).
    pub failures: u64,
    /// Failures since the last success.
    pub consecutive_failures: u64,
    /// Monotonic (`bpf_ktime_get_ns`) end of the current ejection.
    pub ejected_until_ns: u64,
    /// When the circuit last closed (for resetting the ejection multiplier).
    pub closed_since_ns: u64,
    /// One of `CIRCUIT_*`.
    pub circuit: u32,
    /// Times ejected since the multiplier last reset; the next ejection lasts `ejections + 1`
    /// base ejection times.
    pub ejections: u32,
}
assert_size!(BackendState, 56);

user_pod!(Backend, BackendState);
