//! The kernel/userspace contract: every map's key, value, name and capacity, the flow event and the
//! reason codes, shared byte-for-byte by `mesh-ebpf` and `mesh-agent`.
//!
//! Rules (see `ARCHITECTURE.md`): `#[repr(C)]` with explicit padding, integers and named constants
//! instead of `bool`/`enum`/`Option`, byte order in the field name (`_be` = network order), and a
//! compile-time size assertion per type. The BTF layout test (`tests/btf_layout.rs`) compares every
//! type here with the built object's BTF so the two sides cannot drift apart.
#![no_std]

pub mod backend;
pub mod bypass;
pub mod counters;
pub mod event;
pub mod ids;
pub mod legacy;
pub mod logic;
pub mod mesh;
pub mod report;
pub mod service;
pub mod sock;

/// Address family values used in the contract (`AF_INET`, `AF_INET6`).
pub const FAMILY_V4: u8 = 2;
/// See [`FAMILY_V4`].
pub const FAMILY_V6: u8 = 10;

/// IP protocol numbers used in service keys.
pub const PROTO_TCP: u8 = 6;
/// See [`PROTO_TCP`].
pub const PROTO_UDP: u8 = 17;

/// Implements `aya::Pod` for contract types in userspace builds only (the kernel side has no aya).
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, `Copy`, made only of integers with explicit padding,
            // so every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use user_pod;

/// Asserts a contract type's size at compile time, so a change is a deliberate contract change.
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
pub(crate) use assert_size;

/// An IP address as four big-endian words: IPv4 uses `[addr, 0, 0, 0]`, IPv6 all four.
pub type AddrBe = [u32; 4];
