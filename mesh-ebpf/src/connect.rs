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
    AddrBe, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP,
    backend::BackendAddr,
    counters::{
        CTR_AFFINITY_STALE, CTR_AFFINITY_UPDATE_FAILED, CTR_FAMILY_MISMATCH, CTR_PANIC,
        CTR_RANDOM_EXHAUSTED, CTR_REJECT_CIRCUIT_OPEN, CTR_REJECT_MAX_CONNECTIONS,
        CTR_REJECT_NO_BACKENDS, CTR_REVNAT_MISS, CTR_REVNAT_UPDATE_FAILED, CTR_SLOT_MISSING,
        CTR_SOCK_STORAGE_FAILED, CTR_TABLE_MISSING, CTR_TRANSLATED, CTR_V4_MAPPED,
    },
    event::{EV_OPEN, EV_REJECT},
    logic::{self, Reservoir, Verdict},
    service::{
        AffinityKey, AffinityValue, LB_CHUNK, LB_LEAST_CONN, LB_MAGLEV, LB_ROUND_ROBIN,
        LB_WEIGHTED, MAX_BACKENDS_PER_SERVICE, RANDOM_TRIES, SVC_F_AFFINITY, Service, ServiceKey,
        TableKey,
    },
    sock::{RevNatKey, RevNatValue, SOCK_F_MULTI, SOCK_F_V4_MAPPED, SockState},
};

use crate::{
    atomic, capture,
    circuit::{self, Ineligible},
    events,
    maps::{
        AFFINITY, LB_TABLES, REVNAT, SCRATCH, SOCK_STATE, backend, count, service, service_state,
        slot_id,
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

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), in network order.
const V4_MAPPED_WORD: u32 = u32::from_be(0x0000_ffff);

/// An `AF_INET6` socket's destination as the service family sees it: an IPv4-mapped address is
/// the IPv4 service it names (Java and .NET connect to IPv4 services this way by default).
#[inline(always)]
fn unmap(family: u8, addr: AddrBe) -> (u8, AddrBe, bool) {
    if family == FAMILY_V6 && addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD {
        (FAMILY_V4, [addr[3], 0, 0, 0], true)
    } else {
        (family, addr, false)
    }
}

/// The address to write into a socket of `sock_family` for an address of the service family.
#[inline(always)]
fn remap(mapped: bool, addr: &AddrBe) -> AddrBe {
    if mapped {
        [0, 0, V4_MAPPED_WORD, addr[0]]
    } else {
        *addr
    }
}

/// A chosen backend: only what the connect writes and remembers (32 bytes: `translate`'s frame
/// and `select`'s share the verifier's 512-byte stack budget).
#[derive(Clone, Copy)]
struct Pick {
    addr_be: AddrBe,
    port_be: u16,
    family: u8,
    id: u32,
    /// Non-zero when this connect is the circuit's half-open probe.
    probe_word: u64,
}

impl Pick {
    #[inline(always)]
    fn new(b: &BackendAddr, probe_word: u64) -> Self {
        Self {
            addr_be: b.addr_be,
            port_be: b.port_be,
            family: b.family,
            id: b.id,
            probe_word,
        }
    }
}

/// `cgroup/connect{4,6}` and `cgroup/sendmsg{4,6}`. Returns 1 to let the call go on, 0 to fail it.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, sock_family: u8, hook: Hook) -> i32 {
    let (addr, port_be) = read_addr(ctx, sock_family);
    let proto = proto(ctx);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return 1;
    }
    let (family, addr, mapped) = unmap(sock_family, addr);
    let key = ServiceKey {
        addr_be: addr,
        port_be,
        proto,
        family,
    };
    let Some(svc) = service(&key) else {
        // Not a service: a connect straight to a pod may still be a mesh decision.
        if hook == Hook::Connect && proto == PROTO_TCP {
            // SAFETY: `ctx.sock_addr` is this connect program's context.
            return unsafe { capture::direct(ctx.sock_addr, u32::from(sock_family)) };
        }
        return 1;
    };
    // SAFETY: helpers valid in sock_addr programs.
    let (now, cookie, netns) = unsafe {
        (
            bpf_ktime_get_ns(),
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    // Every field spelled out (the backend's are set once one is chosen): leaving some to
    // `..default()` made LLVM zero them with a call to the BPF target's byte-at-a-time `memset`
    // on every connect.
    let mut st = SockState {
        start_ns: now,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        probe_word: 0,
        service_id: svc.id,
        backend_id: 0,
        svc_addr_be: addr,
        backend_addr_be: addr,
        svc_port_be: port_be,
        backend_port_be: 0,
        flags: if mapped { SOCK_F_V4_MAPPED } else { 0 },
        family,
        proto,
        flags2: 0,
    };
    match select(&svc, netns, bound_src_port(ctx), now) {
        Ok(pick) => {
            if pick.family != family {
                count(CTR_FAMILY_MISMATCH);
                return 1;
            }
            write_addr(
                ctx,
                sock_family,
                &remap(mapped, &pick.addr_be),
                pick.port_be,
            );
            if mapped {
                count(CTR_V4_MAPPED);
            }
            st.backend_id = pick.id;
            st.backend_addr_be = pick.addr_be;
            st.backend_port_be = pick.port_be;
            st.probe_word = pick.probe_word;
            if (hook == Hook::Connect || proto == PROTO_UDP) && remember_socket(ctx, &mut st) {
                // UDP has no sockops: its flow opens with the first translated datagram (or
                // connect) and closes at socket release (`sockops::on_release`).
                events::emit(cookie, &st, EV_OPEN, 0, |_| {});
            }
            remember_choice(&svc, &st, cookie, netns, now);
            count(CTR_TRANSLATED);
            if hook == Hook::Connect && proto == PROTO_TCP {
                // The pod is chosen: capture, identity policy, STRICT (`capture`).
                // SAFETY: this connect program's context and its initialised state.
                return unsafe {
                    capture::after_translate(ctx.sock_addr, &raw const st, u32::from(sock_family))
                };
            }
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
            // No backend: the event names none.
            st.backend_addr_be = [0; 4];
            events::emit(cookie, &st, EV_REJECT, reason as u8, |_| {});
            0
        }
    }
}

/// Records what a translation chose for later lookups: the UDP reverse translation (so replies
/// appear to come from the service) and the client's affinity entry. A function of its own (a
/// BPF-to-BPF call): its keys stay off `translate`'s frame, which shares the 512-byte stack
/// budget with the search callbacks.
#[inline(never)]
fn remember_choice(svc: &Service, st: &SockState, cookie: u64, netns: u64, now: u64) {
    if st.proto == PROTO_UDP {
        let k = RevNatKey {
            cookie,
            backend_addr_be: st.backend_addr_be,
            backend_port_be: st.backend_port_be,
            ..RevNatKey::default()
        };
        let v = RevNatValue {
            svc_addr_be: st.svc_addr_be,
            svc_port_be: st.svc_port_be,
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
            backend_id: st.backend_id,
            _pad: 0,
        };
        if AFFINITY.insert(k, v, 0).is_err() {
            count(CTR_AFFINITY_UPDATE_FAILED);
        }
    }
}

/// Stores the socket's service and backend for sockops accounting, getpeername and recvmsg.
/// Returns true when a UDP socket got its first translation (a new UDP flow).
#[inline(always)]
fn remember_socket(ctx: &SockAddrContext, st: &mut SockState) -> bool {
    if st.proto != PROTO_UDP {
        // TCP: one helper call; its flow events come from sockops.
        // SAFETY: `ctx` is a sock_addr context, as the helper requires.
        let p = unsafe { SOCK_STATE.get_or_insert_ptr_mut(ctx, None) };
        if p.is_null() {
            count(CTR_SOCK_STORAGE_FAILED);
        } else {
            // SAFETY: non-null storage owned by this socket.
            unsafe { *p = *st };
        }
        return false;
    }
    // SAFETY: `ctx` is a sock_addr context, as the helper requires; lookup only.
    let old = unsafe { SOCK_STATE.get_ptr_mut(ctx) };
    let existed = !old.is_null();
    if existed {
        // SAFETY: non-null storage of this socket.
        let (old_backend, old_flags) = unsafe { ((*old).backend_id, (*old).flags) };
        if old_flags & SOCK_F_MULTI != 0 || (old_backend != 0 && old_backend != st.backend_id) {
            st.flags |= SOCK_F_MULTI;
        }
    }
    // SAFETY: as above.
    let p = unsafe { SOCK_STATE.get_or_insert_ptr_mut(ctx, None) };
    if p.is_null() {
        count(CTR_SOCK_STORAGE_FAILED);
        return false;
    }
    // SAFETY: non-null storage owned by this socket.
    let first = !existed || unsafe { read_volatile(&raw const (*p).service_id) } == 0;
    // SAFETY: as above.
    unsafe { *p = *st };
    first && st.proto == PROTO_UDP
}

#[inline(always)]
fn random() -> u32 {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_prandom_u32() }
}

#[inline(always)]
fn random64() -> u64 {
    (u64::from(random()) << 32) | u64::from(random())
}

/// The backend id in slot `slot` of the configuration (one element of its `SERVICE_SLOTS`
/// range; the id is validated by [`backend`] before use).
#[inline(always)]
fn slot(svc: &Service, slot: u32) -> Option<u32> {
    let id = slot_id(svc, slot);
    if id == 0 {
        count(CTR_SLOT_MISSING);
        return None;
    }
    Some(id)
}

/// The backend id at position `pos` of the configuration's lookup table.
#[inline(always)]
fn table_entry(svc: &Service, pos: u32) -> Option<u32> {
    let k = TableKey {
        conf_id: svc.conf_id,
        chunk: pos / LB_CHUNK,
    };
    let Some(t) = LB_TABLES.get_ptr(k) else {
        count(CTR_TABLE_MISSING);
        return None;
    };
    // The volatile read hides `pos`'s origin from LLVM so the mask survives for the verifier.
    // SAFETY: the masked index is within the chunk.
    let idx = unsafe { read_volatile(&raw const pos) } & (LB_CHUNK - 1);
    // SAFETY: `t` came from a successful lookup; `idx` < LB_CHUNK.
    Some(unsafe { read_volatile((*t).backend_ids.as_ptr().add(idx as usize)) })
}

/// The algorithm's own choice for a connect, before any fallback.
#[inline(always)]
fn first_candidate(svc: &Service, hash: u64) -> Option<u32> {
    let n = svc.backend_count;
    match svc.algorithm {
        LB_ROUND_ROBIN => {
            let cursor = service_state(svc.id).map_or_else(
                || u64::from(random()),
                // SAFETY: field of an array element.
                |ss| unsafe { atomic::add(&raw mut (*ss).rr_next, 1) },
            );
            slot(svc, (cursor % u64::from(n)) as u32)
        }
        LB_WEIGHTED => table_entry(svc, logic::below(random(), svc.table_size)),
        LB_MAGLEV => table_entry(svc, logic::table_pos(hash, 0, svc.table_size)),
        _ => slot(svc, logic::below(random(), n)),
    }
}

/// One of the retries after an ineligible first choice: an independent position drawn as the
/// algorithm draws (uniform over the slots; weight-proportional or flow-stable over the table).
#[inline(always)]
fn retry_candidate(svc: &Service, hash: u64, k: u32) -> Option<u32> {
    match svc.algorithm {
        LB_WEIGHTED => table_entry(svc, logic::below(random(), svc.table_size)),
        LB_MAGLEV => table_entry(svc, logic::table_pos(hash, k + 1, svc.table_size)),
        _ => slot(svc, logic::below(random(), svc.backend_count)),
    }
}

/// Tries backend `id` for this connect (claiming the probe if it is one).
#[inline(always)]
fn try_id(svc: &Service, id: u32, now: u64, panic: bool, saw_full: &mut bool) -> Option<Pick> {
    let backend = backend(id, svc.id)?;
    match circuit::admit(svc, id, now, panic) {
        Ok(probe_word) => Some(Pick::new(&backend, probe_word)),
        Err(Ineligible::Full) => {
            *saw_full = true;
            None
        }
        Err(Ineligible::Open) => None,
    }
}

/// Power of two choices: of two uniform slots, the eligible one with fewer active connections.
#[inline(always)]
fn least_conn(svc: &Service, now: u64, panic: bool, saw_full: &mut bool) -> Option<Pick> {
    let count = svc.backend_count;
    let one = slot(svc, logic::below(random(), count))?;
    let two = slot(svc, logic::below(random(), count))?;
    let eligible = |v: Option<(Verdict, u64)>| match v {
        Some((Verdict::Take | Verdict::Probe(_), active)) => Some(active),
        _ => None,
    };
    let first = match (
        eligible(circuit::peek(svc, one, now, panic)),
        eligible(circuit::peek(svc, two, now, panic)),
    ) {
        (Some(active_one), Some(active_two)) if active_two < active_one => two,
        (None, Some(_)) => two,
        // `one` eligible (and not busier), or neither: then `try_id` refuses it and the retries
        // go on.
        _ => one,
    };
    try_id(svc, first, now, panic, saw_full)
}

/// Picks a backend for a new connection, or the reason counter of the rejection.
///
/// Every eligible backend can be chosen and none inherits another's share: the algorithm's own
/// choice first; if that backend is ineligible, [`RANDOM_TRIES`] independent draws (so the
/// rejected share spreads over all eligible backends in proportion to their own); if all of those
/// miss (most backends ineligible), one pass over every slot with reservoir sampling. A connect is
/// refused only when that pass found no eligible backend.
///
/// A function of its own (a BPF-to-BPF call), so its locals and `translate`'s do not add up in
/// one frame next to the search callbacks' (the verifier's 512-byte budget is per call chain).
#[inline(never)]
fn select(svc: &Service, netns: u64, sport: u32, now: u64) -> Result<Pick, u32> {
    let n = svc.backend_count;
    if n == 0 {
        return Err(CTR_REJECT_NO_BACKENDS);
    }
    let ejected = service_state(svc.id)
        // SAFETY: field of an array element.
        .map_or(0, |ss| unsafe { atomic::load(&raw const (*ss).ejected) });
    let panic = logic::in_panic(n, ejected, u32::from(svc.panic_threshold_pct));
    if panic {
        count(CTR_PANIC);
    }
    let mut saw_full = false;
    if svc.flags & SVC_F_AFFINITY != 0 {
        let k = AffinityKey {
            netns_cookie: netns,
            service_id: svc.id,
            _pad: 0,
        };
        if let Some(a) = AFFINITY.get_ptr(k) {
            // SAFETY: copied out; the backend id is validated against this service below.
            let a = unsafe { read_volatile(a) };
            let timeout = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
            if now.saturating_sub(a.last_used_ns) <= timeout {
                if let Some(hit) = try_id(svc, a.backend_id, now, panic, &mut saw_full) {
                    return Ok(hit);
                }
                count(CTR_AFFINITY_STALE);
            }
        }
    }
    let hash = logic::mix(netns ^ (u64::from(sport) << 32) ^ u64::from(svc.id));
    let first = if svc.algorithm == LB_LEAST_CONN {
        least_conn(svc, now, panic, &mut saw_full)
    } else {
        first_candidate(svc, hash).and_then(|id| try_id(svc, id, now, panic, &mut saw_full))
    };
    if let Some(hit) = first {
        return Ok(hit);
    }
    // Every circuit open or half-open (and no panic): random draws cannot find a closed one, so
    // go straight to the pass over the slots, which finds a probe if one is due (fail fast stays
    // fast).
    let all_ejected = u64::from(n) <= ejected;
    // Retries and the scan run in `bpf_loop`, so the verifier checks each body once; their state
    // lives in a per-CPU scratch slot (the stack is 512 bytes). Everything read back from it is
    // validated again (`backend`, `try_id`), so even a preempting connect on this CPU that reused
    // the slot could not make this one pick another service's backend.
    let Some(search) = SCRATCH.get_ptr_mut(0) else {
        return Err(CTR_REJECT_CIRCUIT_OPEN);
    };
    // SAFETY: the per-CPU slot, every field set before use (field by field: a whole-struct
    // literal would be built on the stack first).
    unsafe {
        (*search).svc = *svc;
        (*search).now = now;
        (*search).hash = hash;
        (*search).panic = u32::from(panic);
        (*search).saw_full = u32::from(saw_full);
        (*search).found = 0;
        (*search).pick_id = 0;
        (*search).probe_word = 0;
        (*search).any = Reservoir::default();
        (*search).take = Reservoir::default();
    }
    // `bpf_loop` takes its callback context on the stack only; the callbacks find the search in
    // the scratch slot themselves.
    let mut stack_ctx = 0u64;
    // SAFETY: `retry_step` has the callback signature `bpf_loop` expects; `search` outlives it.
    unsafe {
        bpf_loop(
            if all_ejected { 0 } else { RANDOM_TRIES },
            retry_step as *mut c_void,
            (&raw mut stack_ctx).cast(),
            0,
        );
    }
    // SAFETY: the per-CPU slot.
    let (found, pick_id, probe_word) =
        unsafe { ((*search).found, (*search).pick_id, (*search).probe_word) };
    if found != 0
        && let Some(b) = backend(pick_id, svc.id)
    {
        return Ok(Pick::new(&b, probe_word));
    }
    count(CTR_RANDOM_EXHAUSTED);
    // SAFETY: as above, with `scan_step`.
    unsafe {
        bpf_loop(
            n.min(MAX_BACKENDS_PER_SERVICE),
            scan_step as *mut c_void,
            (&raw mut stack_ctx).cast(),
            0,
        );
    }
    // SAFETY: the per-CPU slot.
    let (any, take, full) = unsafe { ((*search).any, (*search).take, (*search).saw_full) };
    let mut saw_full = full != 0;
    // The scan only looked; now claim the choice (a probe is claimed by swapping its circuit). If
    // another CPU claimed that probe meanwhile, take the choice among plainly eligible backends.
    if any.found() {
        if let Some(hit) = try_id(svc, any.chosen, now, panic, &mut saw_full) {
            return Ok(hit);
        }
        if take.found()
            && let Some(hit) = try_id(svc, take.chosen, now, panic, &mut saw_full)
        {
            return Ok(hit);
        }
    }
    Err(if saw_full {
        CTR_REJECT_MAX_CONNECTIONS
    } else {
        CTR_REJECT_CIRCUIT_OPEN
    })
}

/// State of the retries and the scan, shared with the `bpf_loop` callbacks.
#[repr(C)]
pub struct Search {
    svc: Service,
    now: u64,
    hash: u64,
    panic: u32,
    saw_full: u32,
    found: u32,
    pick_id: u32,
    probe_word: u64,
    /// Reservoir over every eligible backend (plain or probe).
    any: Reservoir,
    /// Reservoir over plainly eligible backends (the fallback if a probe is lost to another CPU).
    take: Reservoir,
}

/// Retry `k`: one independent draw; returns 1 (stop) at the first eligible backend.
#[inline(never)]
extern "C" fn retry_step(k: u32, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch slot, set up by `select` before the loop.
    let s = unsafe { &mut *s };
    if s.svc.backend_count == 0 {
        return 1;
    }
    let Some(id) = retry_candidate(&s.svc, s.hash, k) else {
        return 0;
    };
    let mut full = false;
    let hit = try_id(&s.svc, id, s.now, s.panic != 0, &mut full);
    if full {
        s.saw_full = 1;
    }
    match hit {
        Some(p) => {
            s.found = 1;
            s.pick_id = p.id;
            s.probe_word = p.probe_word;
            1
        }
        None => 0,
    }
}

/// Scan step `i`: offers slot `i`'s backend to the reservoirs if it is eligible (no claim yet).
#[inline(never)]
extern "C" fn scan_step(i: u32, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch slot, set up by `select` before the loop.
    let s = unsafe { &mut *s };
    let Some(id) = slot(&s.svc, i) else {
        return 0;
    };
    let Some(b) = backend(id, s.svc.id) else {
        return 0;
    };
    let weight = if s.svc.algorithm == LB_WEIGHTED {
        b.weight
    } else {
        1
    };
    match circuit::peek(&s.svc, id, s.now, s.panic != 0) {
        Some((Verdict::Take, _)) => {
            s.any.offer(id, weight, 0, random64());
            s.take.offer(id, weight, 0, random64());
        }
        Some((Verdict::Probe(w), _)) => {
            s.any.offer(id, weight, w, random64());
        }
        Some((Verdict::Full, _)) => s.saw_full = 1,
        _ => {}
    }
    0
}

/// `cgroup/getpeername{4,6}`: the application sees the service address it connected to.
#[inline(always)]
pub fn getpeername(ctx: &SockAddrContext, sock_family: u8) -> i32 {
    // SAFETY: sock_addr context, as the helper requires; lookup only (no create).
    let p = unsafe { SOCK_STATE.get_ptr_mut(ctx) };
    if !p.is_null() {
        // SAFETY: non-null storage of this socket.
        let st = unsafe { *p };
        let mapped = st.flags & SOCK_F_V4_MAPPED != 0;
        let family = if mapped { FAMILY_V6 } else { st.family };
        if family == sock_family && (st.service_id != 0 || capture::is_captured(&st)) {
            write_addr(
                ctx,
                sock_family,
                &remap(mapped, &st.svc_addr_be),
                st.svc_port_be,
            );
        }
    }
    1
}

/// `cgroup/recvmsg{4,6}`: a UDP reply from a backend appears to come from the service.
#[inline(always)]
pub fn recvmsg(ctx: &SockAddrContext, sock_family: u8) -> i32 {
    let (addr, port_be) = read_addr(ctx, sock_family);
    let (_, addr, mapped) = unmap(sock_family, addr);
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
        let v = unsafe { read_volatile(v) };
        write_addr(
            ctx,
            sock_family,
            &remap(mapped, &v.svc_addr_be),
            v.svc_port_be,
        );
    } else {
        // Only a socket that sent to a service can miss: other UDP sockets have no state.
        // SAFETY: sock_addr context; lookup only.
        let p = unsafe { SOCK_STATE.get_ptr_mut(ctx) };
        // SAFETY: non-null storage of this socket; u32 field.
        if !p.is_null() && unsafe { read_volatile(&raw const (*p).service_id) } != 0 {
            count(CTR_REVNAT_MISS);
        }
    }
    1
}
