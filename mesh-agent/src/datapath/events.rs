//! Reads flow events from the kernel's ring buffer, typed.

use aya::maps::{MapData, RingBuf};
use mesh_common::event::FlowEvent;

/// Everything in the ring right now (non-blocking), typed. A short record (never expected:
/// the kernel writes whole events) is skipped.
pub fn drain(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<FlowEvent>() {
            // SAFETY: the kernel wrote a whole `FlowEvent` (the contract's layout, checked
            // against the object's BTF); the ring gives no alignment guarantee, so read unaligned.
            out.push(unsafe { item.as_ptr().cast::<FlowEvent>().read_unaligned() });
        }
    }
    out
}
