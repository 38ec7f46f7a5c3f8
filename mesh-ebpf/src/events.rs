//! Emits flow events to the `EVENTS` ring buffer; a full ring is counted, never silent.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use mesh_common::{counters::CTR_EVENT_DROPPED, event::FlowEvent, sock::SockState};

use crate::maps::{BACKENDS, EVENTS, count};

/// Sends one event built from a socket's state; `fill` sets the kind-specific fields.
#[inline(always)]
pub fn emit(cookie: u64, st: &SockState, kind: u8, reason: u8, fill: impl FnOnce(&mut FlowEvent)) {
    let Some(mut entry) = EVENTS.reserve(0) else {
        count(CTR_EVENT_DROPPED);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable ring slot of the right size.
    unsafe {
        let ev = &mut *ev;
        *ev = FlowEvent {
            ts_ns: bpf_ktime_get_ns(),
            cookie,
            cgroup_id: st.cgroup_id,
            service_id: st.service_id,
            backend_id: st.backend_id,
            svc_addr_be: st.svc_addr_be,
            svc_port_be: st.svc_port_be,
            kind,
            reason,
            family: st.family,
            proto: st.proto,
            ..FlowEvent::default()
        };
        if let Some(b) = BACKENDS.get_ptr(st.backend_id) {
            ev.backend_addr_be = (*b).addr_be;
            ev.backend_port_be = (*b).port_be;
        }
        fill(ev);
    }
    entry.submit(0);
}
