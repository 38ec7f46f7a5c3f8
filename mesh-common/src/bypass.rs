//! Same-node bypass: pod addresses on this node (`LOCAL_ENDPOINTS`) and the sockhash of their
//! established sockets (`BYPASS_SOCKS`) that `sk_msg` redirects between.

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

user_pod!(EndpointKey, LocalEndpoint, SockKey);
