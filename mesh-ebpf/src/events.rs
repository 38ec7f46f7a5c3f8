//! Emits flow events to the `EVENTS` ring buffer; a full ring is counted, never silent.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_ktime_get_ns, bpf_ringbuf_query},
};
use mesh_common::{
    counters::CTR_EVENT_DROPPED,
    event::{EVENTS_WAKEUP_BYTES, FlowEvent},
    sock::SockState,
};

use crate::maps::{EVENTS, count};

/// Monotonic time in nanoseconds, the clock of every event and socket timestamp.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Sends one event built from a socket's state; `fill` sets the kind-specific fields.
#[inline(always)]
pub fn emit(cookie: u64, st: &SockState, kind: u8, reason: u8, fill: impl FnOnce(&mut FlowEvent)) {
    emit_with(|ev| {
        ev.cookie = cookie;
        ev.cgroup_id = st.cgroup_id;
        ev.service_id = st.service_id;
        ev.backend_id = st.backend_id;
        ev.svc_addr_be = st.svc_addr_be;
        ev.svc_port_be = st.svc_port_be;
        ev.kind = kind;
        ev.reason = reason;
        ev.family = st.family;
        ev.proto = st.proto;
        // The backend this socket really went to, recorded at connect: right even after the
        // backend was removed.
        ev.backend_addr_be = st.backend_addr_be;
        ev.backend_port_be = st.backend_port_be;
        fill(ev);
    });
}

/// Zeroes `*p` with one 8-byte store per word. `write_bytes` would become a call to the BPF
/// target's `memset`, a byte-at-a-time loop (112 iterations for a flow event, several per
/// connection); volatile stores keep LLVM from turning these back into that call.
///
/// # Safety
/// `p` must be valid for writes and 8-byte aligned (ring records are); `T`'s size is a
/// multiple of 8 (checked at compile time).
#[inline(always)]
unsafe fn zero_words<T>(p: *mut T) {
    const { assert!(size_of::<T>().is_multiple_of(8)) };
    let words = p.cast::<u64>();
    for i in 0..size_of::<T>() / 8 {
        // SAFETY: within `*p` (the caller's contract), aligned.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// The one writer of the ring: reserves a slot, zeroes it, stamps the time, lets `fill` set the
/// fields and submits. Each event reads the clock itself: two events of one callback (a failure
/// and the ejection it caused) get distinct, ordered times, which readers resuming a stream by
/// time rely on. Fields are written straight into the ring slot: a whole-struct literal
/// would first be built on the stack, which the connect path cannot spare.
#[inline(always)]
pub fn emit_with(fill: impl FnOnce(&mut FlowEvent)) {
    let Some(mut entry) = EVENTS.reserve(0) else {
        count(CTR_EVENT_DROPPED);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable ring slot of the right size.
    unsafe {
        zero_words(ev);
        let ev = &mut *ev;
        ev.ts_ns = now();
        fill(ev);
    }
    // Waking the reader costs ~10 µs per event (an IRQ-work and a futex/epoll wakeup on the
    // connect path), so submit quietly; the reader polls on a short timer, and a filling ring
    // still wakes it at once.
    let map = (&raw const EVENTS).cast_mut().cast();
    // SAFETY: `map` is the ring buffer map; query has no side effects.
    let pending = unsafe { bpf_ringbuf_query(map, u64::from(BPF_RB_AVAIL_DATA)) };
    let flags = if pending >= EVENTS_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(flags));
}
