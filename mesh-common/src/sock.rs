//! Per-socket state carried from `connect()` to sockops and `getpeername()` (`SOCK_STATE`,
//! socket-local storage), and UDP reverse translation (`REVNAT`).

use crate::{AddrBe, assert_size, user_pod};

/// Map name: socket-local storage of [`SockState`] (dies with the socket, so nothing leaks).
pub const SOCK_STATE_MAP: &str = "SOCK_STATE";
/// Map name: socket-local storage of a `u32`: a translated connection's `rcv_nxt` when it entered
/// `FIN_WAIT2`. If `rcv_nxt` moved by the time the socket closes from there, the peer's FIN came
/// (one sequence number TCP counts as received that is not payload); if not, the application
/// closed first and no FIN came. A map of its own, not a [`SockState`] field: a pinned storage
/// map keeps its value size across agent upgrades, so [`SockState`]'s layout must not grow.
pub const SOCK_FIN_WAIT2_MAP: &str = "SOCK_FIN_WAIT2";
/// Map name: [`RevNatKey`] → [`RevNatValue`] (LRU), for UDP replies.
pub const REVNAT_MAP: &str = "REVNAT";
/// Capacity of [`REVNAT_MAP`].
pub const REVNAT_CAPACITY: u32 = 65_536;

/// [`SockState::flags`]: the connection is counted in its backend's `active`.
pub const SOCK_F_COUNTED: u8 = 1;
/// [`SockState::flags`]: the connection was captured (sent to the agent's outbound listener,
/// `mesh::CAPTURE_PORT`): `getpeername` shows the original destination, and sockops does not
/// account it against the backend (its peer is the agent).
pub const SOCK_F_CAPTURED: u8 = 2;
/// [`SockState::flags`]: a failure was already counted for this connection.
pub const SOCK_F_FAILED: u8 = 4;
/// [`SockState::flags`]: the connection was established.
pub const SOCK_F_ESTABLISHED: u8 = 8;
/// [`SockState::flags`]: the peer reset the connection (seen by the `tcp_receive_reset`
/// tracepoint, so a reset is told apart from the application's own abortive close).
pub const SOCK_F_PEER_RESET: u8 = 16;
/// [`SockState::flags`]: an `AF_INET6` socket reached an IPv4 service through its IPv4-mapped
/// address (`::ffff:a.b.c.d`); the socket's own addresses stay mapped.
pub const SOCK_F_V4_MAPPED: u8 = 32;
/// [`SockState::flags`]: the kernel reported a socket error (`inet_sk_error_report`: a reset, an
/// ICMP unreachable, a timeout) — what tells a failed handshake from the application giving up.
pub const SOCK_F_ERROR: u8 = 64;
/// [`SockState::flags`]: an unconnected UDP socket sent to more than one backend (its release
/// removes the reverse translations of every backend of the service, not just the last one).
pub const SOCK_F_MULTI: u8 = 128;

/// [`SockState::flags2`]: the socket was put on the same-node bypass (`BYPASS_SOCKS`); its close
/// reads and removes its `BYPASS_BYTES` entry. Sockets without the mark never look there.
pub const SOCK_F2_BYPASSED: u8 = 1;

/// Value of [`SOCK_STATE_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// When `connect()` chose the backend.
    pub start_ns: u64,
    /// cgroup v2 id of the connecting process (the pod).
    pub cgroup_id: u64,
    /// For the half-open probe: the circuit word its admission wrote, so only this probe's
    /// outcome moves that circuit (0 for other connections).
    pub probe_word: u64,
    pub service_id: u32,
    pub backend_id: u32,
    /// The address the application asked for (the service), in the service's family.
    pub svc_addr_be: AddrBe,
    /// The backend the connection really went to (close events name it even after the backend
    /// was removed or its id's entry is gone).
    pub backend_addr_be: AddrBe,
    pub svc_port_be: u16,
    pub backend_port_be: u16,
    /// `SOCK_F_*` bits.
    pub flags: u8,
    /// The service's family ([`crate::FAMILY_V4`] also for a v4-mapped `AF_INET6` socket).
    pub family: u8,
    pub proto: u8,
    /// `SOCK_F2_*` bits (the byte was padding before: sockets from older programs hold 0).
    pub flags2: u8,
}
assert_size!(SockState, 72);

/// Key of [`REVNAT_MAP`]: a socket and the backend it sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub backend_addr_be: AddrBe,
    pub backend_port_be: u16,
    pub _pad: [u8; 6],
}
assert_size!(RevNatKey, 32);

/// Value of [`REVNAT_MAP`]: the service address the reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValue {
    pub svc_addr_be: AddrBe,
    pub svc_port_be: u16,
    pub _pad: [u8; 2],
}
assert_size!(RevNatValue, 20);

user_pod!(SockState, RevNatKey, RevNatValue);
