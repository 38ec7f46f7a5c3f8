//! Same-node bypass: pod addresses on this node (`LOCAL_ENDPOINTS`), the sockhash of their
//! established sockets (`BYPASS_SOCKS`) that `sk_msg` redirects between, and the payload bytes
//! each bypassed socket sent and received that way (`BYPASS_BYTES`).

use crate::{AddrBe, assert_size, user_pod};

/// Map name: pod address on this node → [`LocalEndpoint`].
pub const LOCAL_ENDPOINTS_MAP: &str = "LOCAL_ENDPOINTS";
/// Capacity of [`LOCAL_ENDPOINTS_MAP`].
pub const LOCAL_ENDPOINTS_CAPACITY: u32 = 4096;
/// Map name: [`SockKey`] → socket (sockhash).
pub const BYPASS_SOCKS_MAP: &str = "BYPASS_SOCKS";
/// Capacity of [`BYPASS_SOCKS_MAP`].
pub const BYPASS_SOCKS_CAPACITY: u32 = 65_536;

/// Key of [`LOCAL_ENDPOINTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub addr_be: AddrBe,
}
assert_size!(EndpointKey, 16);

/// Value of [`LOCAL_ENDPOINTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// Reserved for policy (e.g. "needs mTLS"); 0 today.
    pub flags: u32,
}
assert_size!(LocalEndpoint, 4);

/// Key of [`BYPASS_SOCKS_MAP`]: a socket's 4-tuple as seen from that socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local_addr_be: AddrBe,
    pub remote_addr_be: AddrBe,
    pub local_port_be: u16,
    pub remote_port_be: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}
assert_size!(SockKey, 40);

/// Map name: [`SockKey`] (a bypassed socket, as seen from itself) → [`BypassBytes`] (LRU).
///
/// Payload redirected by `sk_msg` never passes through TCP, so the socket's own `bytes_acked` and
/// `bytes_received` miss it; the close event adds these counts. An entry is created (zeroed) when
/// its socket enters [`BYPASS_SOCKS_MAP`] and removed when the socket closes; LRU, so an entry
/// whose close was never seen cannot fill the map.
pub const BYPASS_BYTES_MAP: &str = "BYPASS_BYTES";
/// Capacity of [`BYPASS_BYTES_MAP`]: one entry per socket [`BYPASS_SOCKS_MAP`] can hold.
pub const BYPASS_BYTES_CAPACITY: u32 = BYPASS_SOCKS_CAPACITY;

/// Value of [`BYPASS_BYTES_MAP`]: payload bytes that went socket to socket, changed only with
/// atomic adds (the two ends of a connection send on two CPUs at once, and each adds to both
/// entries).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BypassBytes {
    /// Bytes this socket sent that `sk_msg` redirected to its peer.
    pub sent: u64,
    /// Bytes its peer sent that `sk_msg` redirected into this socket.
    pub received: u64,
}
assert_size!(BypassBytes, 16);

user_pod!(EndpointKey, LocalEndpoint, SockKey, BypassBytes);
