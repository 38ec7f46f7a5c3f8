//! The id allocator's persistent state (`ID_ALLOC`): ids of services, backends and service
//! configurations are not handed out twice — across agent restarts included — until the 32-bit
//! counter wraps (2³² allocations), after which ids still in use are skipped.

/// Map name: array of `u64` counters, indexed by the `ID_*` constants; the next id of each kind.
/// Pinned with the other maps, so a restarted agent continues where the last one stopped instead of
/// reusing ids that sockets, affinity entries or close accounting may still name.
pub const ID_ALLOC_MAP: &str = "ID_ALLOC";
/// Capacity of [`ID_ALLOC_MAP`].
pub const ID_ALLOC_CAPACITY: u32 = 4;
/// [`ID_ALLOC_MAP`] index: next service id.
pub const ID_SERVICE: u32 = 0;
/// [`ID_ALLOC_MAP`] index: next backend id.
pub const ID_BACKEND: u32 = 1;
/// [`ID_ALLOC_MAP`] index: next service-configuration id.
pub const ID_CONF: u32 = 2;
/// [`ID_ALLOC_MAP`] index: next identity number (`mesh::MeshWorkload::identity`); starts at 1
/// (0 = no identity).
pub const ID_IDENTITY: u32 = 3;
