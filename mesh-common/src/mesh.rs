//! Mesh enrollment, capture and in-kernel identity policy: which local workloads (by cgroup) and
//! which pod addresses are in the mesh, under which identity number and peer-authentication mode,
//! the identity verdicts `connect()` enforces on the same node, and the original destination of
//! each captured connection, which the agent looks up by the client's address on `accept()`.
//!
//! Identity numbers are small integers the agent assigns to SPIFFE ids from a counter persisted in
//! `ID_ALLOC[ID_IDENTITY]`: a number is not handed out twice (before its 32-bit counter wraps),
//! so a verdict or endpoint entry written for one identity can never be read as another's.

use crate::{AddrBe, assert_size, user_pod};

/// Map name: cgroup id of a local workload → [`MeshWorkload`] (hash).
pub const MESH_WORKLOADS_MAP: &str = "MESH_WORKLOADS";
/// Capacity of [`MESH_WORKLOADS_MAP`] (pods of one node).
pub const MESH_WORKLOADS_CAPACITY: u32 = 4096;
/// Map name: [`MeshEndpointKey`] (pod address) → [`MeshEndpoint`] (hash), every pod of the
/// cluster that is enrolled (or whose peer authentication matters), local or not.
pub const MESH_ENDPOINTS_MAP: &str = "MESH_ENDPOINTS";
/// Capacity of [`MESH_ENDPOINTS_MAP`].
pub const MESH_ENDPOINTS_CAPACITY: u32 = 65_536;
/// Map name: [`VerdictKey`] → verdict (`u32`, one of `VERDICT_*`), filled by the agent from the
/// authorization policy for same-node enrolled pairs.
pub const IDENTITY_VERDICTS_MAP: &str = "IDENTITY_VERDICTS";
/// Capacity of [`IDENTITY_VERDICTS_MAP`].
pub const IDENTITY_VERDICTS_CAPACITY: u32 = 65_536;
/// Map name: array of one [`CaptureConfig`]: where captured connections go.
pub const CAPTURE_CONFIG_MAP: &str = "CAPTURE_CONFIG";
/// Map name: socket cookie → [`Captured`] (LRU), written by `connect()` for a captured socket and
/// moved to [`CAPTURED_MAP`] by sockops once the source port is known.
pub const CAPTURE_PENDING_MAP: &str = "CAPTURE_PENDING";
/// Map name: [`CaptureKey`] (client address and port) → [`Captured`] (LRU), what the agent looks
/// up for an accepted connection; deleted when the client socket closes.
pub const CAPTURED_MAP: &str = "CAPTURED";
/// Capacity of [`CAPTURE_PENDING_MAP`] and [`CAPTURED_MAP`].
pub const CAPTURED_CAPACITY: u32 = 65_536;

/// [`MeshWorkload::flags`] and [`MeshEndpoint::flags`]: the pod is enrolled in the mesh.
pub const MESH_F_ENROLLED: u32 = 1;
/// [`MeshEndpoint::flags`]: the pod runs on this node.
pub const MESH_F_LOCAL: u32 = 2;
/// [`MeshEndpoint::flags`]: peer authentication `STRICT` (plaintext from outside the mesh is
/// refused); absent = `PERMISSIVE`, Istio's default.
pub const MESH_F_STRICT: u32 = 4;
/// [`MeshEndpoint::flags`]: an `ALLOW` authorization policy selects the pod, so a same-node
/// connection without an allowing verdict is denied (Istio's evaluation order).
pub const MESH_F_DEFAULT_DENY: u32 = 8;

/// Verdict of [`IDENTITY_VERDICTS_MAP`]: allowed.
pub const VERDICT_ALLOW: u32 = 1;
/// Verdict of [`IDENTITY_VERDICTS_MAP`]: denied (`connect()` fails with `EACCES`).
pub const VERDICT_DENY: u32 = 2;
/// [`VerdictKey::port_be`] for a verdict that holds on every destination port (looked up after
/// the exact port).
pub const VERDICT_ANY_PORT: u16 = 0;

/// Identity number of a source outside the mesh (plaintext, unauthenticated).
pub const UNAUTHENTICATED: u32 = 0;

/// [`Captured::flags`]: the application connected to a service address (`svc_*` is the VIP).
pub const CAPTURED_F_SERVICE: u8 = 1;

/// The outbound capture port (ztunnel's 15001).
pub const CAPTURE_PORT: u16 = 15001;

/// Value of [`MESH_WORKLOADS_MAP`]: a local workload (pod) by its cgroup id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshWorkload {
    /// The pod's identity number (0 = none: not enrolled).
    pub identity: u32,
    /// `MESH_F_*` bits.
    pub flags: u32,
}
assert_size!(MeshWorkload, 8);

/// Key of [`MESH_ENDPOINTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeshEndpointKey {
    pub addr_be: AddrBe,
    pub family: u8,
    pub _pad: [u8; 3],
}
assert_size!(MeshEndpointKey, 20);

/// Value of [`MESH_ENDPOINTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshEndpoint {
    /// The pod's identity number (0 when not enrolled).
    pub identity: u32,
    /// `MESH_F_*` bits.
    pub flags: u32,
}
assert_size!(MeshEndpoint, 8);

/// Key of [`IDENTITY_VERDICTS_MAP`]: (source identity, destination identity, destination port).
/// Source identity [`UNAUTHENTICATED`] stands for every local source outside the mesh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The destination pod's port, or [`VERDICT_ANY_PORT`].
    pub port_be: u16,
    pub _pad: u16,
}
assert_size!(VerdictKey, 12);

/// Value of [`CAPTURE_CONFIG_MAP`]: the agent's outbound listener. `port_be == 0` means capture
/// is not configured: enrolled cross-node connects are then refused (fail closed), never sent in
/// plaintext.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// IPv6 listener address (all zero: IPv6 enrolled connects are refused).
    pub addr6_be: AddrBe,
    /// IPv4 listener address (the pods' gateway on this node).
    pub addr4_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
assert_size!(CaptureConfig, 24);

/// Key of [`CAPTURED_MAP`]: the client socket's own address and port, as the agent's `accept()`
/// reports the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CaptureKey {
    pub addr_be: AddrBe,
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
}
assert_size!(CaptureKey, 20);

/// Value of [`CAPTURE_PENDING_MAP`] and [`CAPTURED_MAP`]: where a captured connection was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// cgroup id of the connecting workload.
    pub cgroup_id: u64,
    /// The destination pod (after load balancing).
    pub dst_addr_be: AddrBe,
    /// The address the application connected to: the service VIP (with [`CAPTURED_F_SERVICE`]) or
    /// the pod itself.
    pub svc_addr_be: AddrBe,
    pub dst_port_be: u16,
    pub svc_port_be: u16,
    /// Family of the destination ([`crate::FAMILY_V4`] also for a v4-mapped `AF_INET6` socket).
    pub family: u8,
    /// `CAPTURED_F_*` bits.
    pub flags: u8,
    pub _pad: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
}
assert_size!(Captured, 56);

user_pod!(
    MeshWorkload,
    MeshEndpointKey,
    MeshEndpoint,
    VerdictKey,
    CaptureConfig,
    CaptureKey,
    Captured,
);
