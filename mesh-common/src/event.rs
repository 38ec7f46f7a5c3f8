//! Flow events sent from the kernel to the agent through the `EVENTS` ring buffer.

use crate::{AddrBe, assert_size, user_pod};

/// Map name: ring buffer of [`FlowEvent`].
pub const EVENTS_MAP: &str = "EVENTS";
/// Ring size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;
/// Pending bytes past which a submit wakes the reader at once; below it the reader's timer
/// (`mesh-agent`, 100 ms) collects events, so the connect path pays no wakeup.
pub const EVENTS_WAKEUP_BYTES: u64 = 64 << 10;

/// The connection was established.
pub const EV_OPEN: u8 = 1;
/// The connection closed (bytes and duration filled in).
pub const EV_CLOSE: u8 = 2;
/// `connect()` was rejected in the kernel (`reason` = a `CTR_REJECT_*` counter index).
pub const EV_REJECT: u8 = 3;
/// The connect to the backend failed (`reason` = one of the `FAIL_*` values).
pub const EV_FAIL: u8 = 4;
/// The backend's circuit opened.
pub const EV_EJECT: u8 = 5;
/// The backend's circuit closed after a successful probe.
pub const EV_RECOVER: u8 = 6;

/// [`EV_FAIL`] reason: the SYN was answered with a reset or the connect errored.
pub const FAIL_REFUSED: u8 = 1;
/// [`EV_FAIL`] reason: the SYN was retransmitted (no answer within the RTO).
pub const FAIL_SYN_TIMEOUT: u8 = 2;
/// [`EV_CLOSE`] reason: the connection ended with a reset (either side).
pub const FAIL_RESET: u8 = 3;
/// [`EV_EJECT`] reason: L7 failures reported by a proxy (HTTP 5xx, gRPC `UNAVAILABLE`) ejected
/// the backend (`crate::report`).
pub const FAIL_L7: u8 = 4;

/// One flow event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// Monotonic time (`bpf_ktime_get_ns`).
    pub ts_ns: u64,
    pub cookie: u64,
    /// cgroup v2 id of the client pod.
    pub cgroup_id: u64,
    /// Open to close, for [`EV_CLOSE`].
    pub duration_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub service_id: u32,
    pub backend_id: u32,
    pub svc_addr_be: AddrBe,
    pub backend_addr_be: AddrBe,
    /// The client socket's own address (zero in [`EV_REJECT`]: not bound yet at connect time).
    pub client_addr_be: AddrBe,
    pub svc_port_be: u16,
    pub backend_port_be: u16,
    /// One of `EV_*`.
    pub kind: u8,
    pub reason: u8,
    pub family: u8,
    pub proto: u8,
}
assert_size!(FlowEvent, 112);

user_pod!(FlowEvent);
