//! The per-event path of `istio_tcp_*` (`telemetry::tcp::TcpMetrics::observe`) allocates nothing
//! once a series exists: a binary of its own, so its counting allocator sees only this path.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::Arc,
};

use mesh_agent::{flows::FlowRecord, model::ObjectName, telemetry::tcp::TcpMetrics};
use mesh_common::{
    FAMILY_V4, PROTO_TCP,
    event::{EV_CLOSE, EV_OPEN, FlowEvent},
};

/// Counts this thread's allocations (other test threads do not disturb the count).
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn allocations() -> u64 {
    ALLOCATIONS.try_with(Cell::get).unwrap_or(0)
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn counting_a_flow_in_an_existing_series_allocates_nothing() {
    let m = TcpMetrics::new(100);
    let client = Arc::new(ObjectName::new("shop", "client"));
    let web = Arc::new(ObjectName::new("shop", "web"));
    let backend = Arc::new(ObjectName::new("shop", "web-0"));
    let flow = |kind| FlowRecord {
        event: FlowEvent {
            kind,
            family: FAMILY_V4,
            proto: PROTO_TCP,
            backend_id: 1,
            bytes_sent: 10,
            bytes_received: 20,
            ..FlowEvent::default()
        },
        time_unix_nano: 0,
        source: Some(Arc::clone(&client)),
        service: Some(Arc::clone(&web)),
    };
    let (open, close) = (flow(EV_OPEN), flow(EV_CLOSE));
    // The first event makes the series (one allocation is allowed there).
    m.observe(&open, Some(&backend));
    let before = allocations();
    for _ in 0..10_000 {
        m.observe(&open, Some(&backend));
        m.observe(&close, Some(&backend));
    }
    assert_eq!(allocations() - before, 0, "observe allocated");
    assert_eq!(m.len(), 1);
}
