//! Socket-level load balancing: `connect4/6` and `sendmsg4/6` translate a service address to a
//! backend (skipping open circuits, failing fast when none is eligible), `recvmsg4/6` and
//! `getpeername4/6` translate back so the application only ever sees the service address.

use core::{
    ffi::c_void,
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_loop, bpf_set_retval,
    },
    programs::SockAddrContext,
};
use mesh_common::{
    AddrBe, FAMILY_V4, PROTO_TCP, PROTO_UDP,
    backend::Backend,
    counters::{
        CTR_AFFINITY_UPDATE_FAILED, CTR_BACKEND_MISSING, CTR_FAMILY_MISMATCH,
        CTR_REJECT_CIRCUIT_OPEN, CTR_REJECT_MAX_CONNECTIONS, CTR_REJECT_NO_BACKENDS,
        CTR_REVNAT_UPDATE_FAILED, CTR_SOCK_STORAGE_FAILED, CTR_TRANSLATED,
    },
    event::EV_REJECT,
    service::{
        AffinityKey, AffinityValue, LB_LEAST_CONN, LB_MAGLEV, LB_ROUND_ROBIN, LB_TABLE_SIZE,
        LB_TABLE_SLOTS, LB_WEIGHTED, MAX_SCAN, SVC_F_AFFINITY, Service, ServiceKey, SlotKey,
    },
    sock::{RevNatKey, RevNatValue, SOCK_F_PROBE, SockState},
};

use crate::{
    atomic,
    circuit::{self, Ineligible},
    events,
    maps::{
        AFFINITY, BACKEND_SLOTS, BACKEND_STATE, BACKENDS, LB_TABLES, REVNAT, SERVICE_STATE,
        SERVICES, SOCK_STATE, count,
    },
};

/// `connect()` fails with this when every backend is ejected or full: an immediate, retriable
/// refusal, as from a closed port.
pub const ERRNO_NO_ELIGIBLE: i32 = 111; // ECONNREFUSED
/// `connect()` fails with this when the service has no backends at all (as Cilium does).
pub const ERRNO_NO_BACKENDS: i32 = 113; // EHOSTUNREACH

/// What a hook does: `connect`/`sendmsg` translate forward; they differ only in bookkeeping.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Sendmsg,
}

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// Reads the destination (or, in recvmsg, the source) address of the call.
/// Volatile single-word loads: the verifier rejects merged 8-byte context loads.
#[inline(always)]
fn read_addr(ctx: &SockAddrContext, family: u8) -> (AddrBe, u16) {
    let p = sa(ctx);
    // SAFETY: `p` is the program's context; each field is a permitted 4-byte context load.
    unsafe {
        let addr = if family == FAMILY_V4 {
            [read_volatile(&raw const (*p).user_ip4), 0, 0, 0]
        } else {
            [
                read_volatile(&raw const (*p).user_ip6[0]),
                read_volatile(&raw const (*p).user_ip6[1]),
                read_volatile(&raw const (*p).user_ip6[2]),
                read_volatile(&raw const (*p).user_ip6[3]),
            ]
        };
        (addr, read_volatile(&raw const (*p).user_port) as u16)
    }
}

#[inline(always)]
fn write_addr(ctx: &SockAddrContext, family: u8, addr: &AddrBe, port_be: u16) {
    let p = sa(ctx);
    // SAFETY: as in `read_addr`; 4-byte stores to writable context fields.
    unsafe {
        if family == FAMILY_V4 {
            write_volatile(&raw mut (*p).user_ip4, addr[0]);
        } else {
            write_volatile(&raw mut (*p).user_ip6[0], addr[0]);
            write_volatile(&raw mut (*p).user_ip6[1], addr[1]);
            write_volatile(&raw mut (*p).user_ip6[2], addr[2]);
            write_volatile(&raw mut (*p).user_ip6[3], addr[3]);
        }
        write_volatile(&raw mut (*p).user_port, u32::from(port_be));
    }
}

#[inline(always)]
fn proto(ctx: &SockAddrContext) -> u8 {
    // SAFETY: permitted context load.
    unsafe { read_volatile(&raw const (*sa(ctx)).protocol) as u8 }
}

/// The bound source port, if the application bound one (for Maglev's per-flow hash).
#[inline(always)]
fn bound_src_port(ctx: &SockAddrContext) -> u32 {
    // SAFETY: `sk` is a valid socket pointer in sock_addr programs; `src_port` is readable.
    unsafe {
        let sk = (*sa(ctx)).__bindgen_anon_1.sk;
        if sk.is_null() {
            0
        } else {
            read_volatile(&raw const (*sk).src_port)
        }
    }
}

/// `cgroup/connect{4,6}` and `cgroup/sendmsg{4,6}`. Returns 1 to let the call go on, 0 to fail it.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, family: u8, hook: Hook) -> i32 {
    let (addr, port_be) = read_addr(ctx, family);
    let proto = proto(ctx);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return 1;
    }
    let key = ServiceKey {
        addr_be: addr,
        port_be,
        proto,
        family,
    };
    let Some(svc) = SERVICES.get_ptr(key) else {
        return 1;
    };
    // SAFETY: copy out of the map so a concurrent agent update cannot tear what we use.
    let svc = unsafe { *svc };
    // SAFETY: helpers valid in sock_addr programs.
    let (now, cookie, netns) = unsafe {
        (
            bpf_ktime_get_ns(),
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    let mut st = SockState {
        start_ns: now,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        service_id: svc.id,
        svc_addr_be: addr,
        svc_port_be: port_be,
        family,
        proto,
        ..SockState::default()
    };
    match select(&svc, netns, bound_src_port(ctx), now) {
        Ok((backend_id, backend, probe)) => {
            if backend.family != family {
                count(CTR_FAMILY_MISMATCH);
                return 1;
            }
            write_addr(ctx, family, &backend.addr_be, backend.port_be);
            st.backend_id = backend_id;
            if probe {
                st.flags |= SOCK_F_PROBE;
            }
            if hook == Hook::Connect {
                remember_socket(ctx, &st);
            }
            if proto == PROTO_UDP {
                let k = RevNatKey {
                    cookie,
                    backend_addr_be: backend.addr_be,
                    backend_port_be: backend.port_be,
                    ..RevNatKey::default()
                };
                let v = RevNatValue {
                    svc_addr_be: addr,
                    svc_port_be: port_be,
                    ..Default::default()
                };
                if REVNAT.insert(k, v, 0).is_err() {
                    count(CTR_REVNAT_UPDATE_FAILED);
                }
            }
            if svc.flags & SVC_F_AFFINITY != 0 {
                let k = AffinityKey {
                    netns_cookie: netns,
                    service_id: svc.id,
                    _pad: 0,
                };
                let v = AffinityValue {
                    last_used_ns: now,
                    backend_id,
                    _pad: 0,
                };
                if AFFINITY.insert(k, v, 0).is_err() {
                    count(CTR_AFFINITY_UPDATE_FAILED);
                }
            }
            count(CTR_TRANSLATED);
            1
        }
        Err(reason) => {
            let errno = if reason == CTR_REJECT_NO_BACKENDS {
                ERRNO_NO_BACKENDS
            } else {
                ERRNO_NO_ELIGIBLE
            };
            // SAFETY: helper valid in cgroup sock_addr programs; sets the syscall's errno.
            unsafe { bpf_set_retval(-errno) };
            count(reason);
            events::emit(cookie, &st, EV_REJECT, reason as u8, |_| {});
            0
        }
    }
}

/// Stores the socket's service and backend for sockops accounting and getpeername.
#[inline(always)]
fn remember_socket(ctx: &SockAddrContext, st: &SockState) {
    // SAFETY: `ctx` is a sock_addr context, as the helper requires.
    let p = unsafe { SOCK_STATE.get_or_insert_ptr_mut(ctx, None) };
    if p.is_null() {
        count(CTR_SOCK_STORAGE_FAILED);
        return;
    }
    // SAFETY: non-null storage owned by this socket.
    unsafe { *p = *st };
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_prandom_u32() }
}

/// Finalizer of a 64-bit mixer (splitmix64): a flow's stable position in the Maglev table.
#[inline(always)]
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[inline(always)]
fn slot(svc: &Service, slot: u32) -> Option<u32> {
    let k = SlotKey {
        service_id: svc.id,
        slot,
    };
    // SAFETY: plain u32 copied out.
    BACKEND_SLOTS.get_ptr(k).map(|p| unsafe { *p })
}

#[inline(always)]
fn backend(id: u32) -> Option<Backend> {
    // SAFETY: copied out of the map.
    let b = BACKENDS.get_ptr(id).map(|p| unsafe { *p });
    if b.is_none() {
        count(CTR_BACKEND_MISSING);
    }
    b
}

#[inline(always)]
fn active(id: u32) -> u64 {
    // SAFETY: read of a counter; a stale value only skews one choice.
    BACKEND_STATE
        .get_ptr(id)
        .map_or(0, |p| unsafe { (*p).active })
}

/// Tries one backend: eligible → `Some((id, backend, probe))`.
#[inline(always)]
fn try_backend(
    svc: &Service,
    id: u32,
    now: u64,
    saw_full: &mut bool,
) -> Option<(u32, Backend, bool)> {
    match circuit::admit(svc, id, now) {
        Ok(probe) => backend(id).map(|b| (id, b, probe)),
        Err(Ineligible::Full) => {
            *saw_full = true;
            None
        }
        Err(Ineligible::Open) => None,
    }
}

/// Picks a backend for a new connection, or the reason counter of the rejection.
#[inline(always)]
fn select(svc: &Service, netns: u64, sport: u32, now: u64) -> Result<(u32, Backend, bool), u32> {
    let n = svc.backend_count;
    if n == 0 {
        return Err(CTR_REJECT_NO_BACKENDS);
    }
    let mut saw_full = false;
    if svc.flags & SVC_F_AFFINITY != 0 {
        let k = AffinityKey {
            netns_cookie: netns,
            service_id: svc.id,
            _pad: 0,
        };
        if let Some(a) = AFFINITY.get_ptr(k) {
            // SAFETY: copied out.
            let a = unsafe { *a };
            let timeout = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
            if now.saturating_sub(a.last_used_ns) <= timeout
                && let Some(hit) = try_backend(svc, a.backend_id, now, &mut saw_full)
            {
                return Ok(hit);
            }
        }
    }
    let start = match svc.algorithm {
        LB_ROUND_ROBIN => SERVICE_STATE
            .get_ptr_mut(svc.id)
            .map_or_else(random, |ss| unsafe {
                atomic::add(&raw mut (*ss).rr_next, 1) as u32
            }),
        LB_WEIGHTED | LB_MAGLEV => {
            let pos = if svc.algorithm == LB_MAGLEV {
                (mix(netns ^ (u64::from(sport) << 32) ^ u64::from(svc.id)) % LB_TABLE_SIZE as u64)
                    as u32
            } else {
                random() % LB_TABLE_SIZE as u32
            };
            if let Some(t) = LB_TABLES.get_ptr(svc.id) {
                // The volatile read hides `pos`'s range from LLVM so the mask survives for the
                // verifier; `pos` < LB_TABLE_SIZE ≤ LB_TABLE_SLOTS already.
                // SAFETY: the masked index is within the table; the agent replaces it whole.
                let idx = unsafe { read_volatile(&raw const pos) } as usize & (LB_TABLE_SLOTS - 1);
                let id = unsafe { *(*t).backend_ids.as_ptr().add(idx) };
                if let Some(hit) = try_backend(svc, id, now, &mut saw_full) {
                    return Ok(hit);
                }
            }
            // Chosen backend ineligible: fall through to the scan from a stable point.
            pos
        }
        LB_LEAST_CONN => {
            let (a, b) = (random() % n, random() % n);
            if let (Some(ia), Some(ib)) = (slot(svc, a), slot(svc, b)) {
                let first = if active(ib) < active(ia) { ib } else { ia };
                if let Some(hit) = try_backend(svc, first, now, &mut saw_full) {
                    return Ok(hit);
                }
            }
            a
        }
        _ => random(),
    };
    // The scan runs in `bpf_loop` so the verifier checks its body once, not once per slot.
    let mut scan = Scan {
        svc: *svc,
        start,
        found_id: 0,
        now,
        found: 0,
        probe: 0,
        saw_full: u32::from(saw_full),
        _pad: 0,
    };
    // SAFETY: `scan_slot` has the callback signature `bpf_loop` expects; `scan` outlives the call.
    unsafe {
        bpf_loop(
            n.min(MAX_SCAN),
            scan_slot as *mut c_void,
            (&raw mut scan).cast(),
            0,
        );
    }
    if scan.found != 0
        && let Some(b) = backend(scan.found_id)
    {
        return Ok((scan.found_id, b, scan.probe != 0));
    }
    Err(if scan.saw_full != 0 {
        CTR_REJECT_MAX_CONNECTIONS
    } else {
        CTR_REJECT_CIRCUIT_OPEN
    })
}

/// State of the slot scan shared with the `bpf_loop` callback.
#[repr(C)]
struct Scan {
    svc: Service,
    start: u32,
    now: u64,
    found_id: u32,
    found: u32,
    probe: u32,
    saw_full: u32,
    _pad: u32,
}

/// One step of the scan: slot `start + i`; returns 1 (stop) at the first eligible backend.
#[inline(never)]
extern "C" fn scan_slot(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Scan` passed to `bpf_loop` by `select`.
    let s = unsafe { &mut *ctx.cast::<Scan>() };
    let n = s.svc.backend_count;
    if n == 0 {
        return 1;
    }
    let Some(id) = slot(&s.svc, s.start.wrapping_add(i) % n) else {
        return 0;
    };
    match circuit::admit(&s.svc, id, s.now) {
        Ok(probe) => {
            s.found_id = id;
            s.found = 1;
            s.probe = u32::from(probe);
            1
        }
        Err(Ineligible::Full) => {
            s.saw_full = 1;
            0
        }
        Err(Ineligible::Open) => 0,
    }
}

/// `cgroup/getpeername{4,6}`: the application sees the service address it connected to.
#[inline(always)]
pub fn getpeername(ctx: &SockAddrContext, family: u8) -> i32 {
    // SAFETY: sock_addr context, as the helper requires; lookup only (no create).
    let p = unsafe { SOCK_STATE.get_ptr_mut(ctx) };
    if !p.is_null() {
        // SAFETY: non-null storage of this socket.
        let st = unsafe { *p };
        if st.family == family && st.service_id != 0 {
            write_addr(ctx, family, &st.svc_addr_be, st.svc_port_be);
        }
    }
    1
}

/// `cgroup/recvmsg{4,6}`: a UDP reply from a backend appears to come from the service.
#[inline(always)]
pub fn recvmsg(ctx: &SockAddrContext, family: u8) -> i32 {
    let (addr, port_be) = read_addr(ctx, family);
    // SAFETY: helper valid in sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let k = RevNatKey {
        cookie,
        backend_addr_be: addr,
        backend_port_be: port_be,
        _pad: [0; 6],
    };
    if let Some(v) = REVNAT.get_ptr(k) {
        // SAFETY: copied out.
        let v = unsafe { *v };
        write_addr(ctx, family, &v.svc_addr_be, v.svc_port_be);
    }
    1
}
