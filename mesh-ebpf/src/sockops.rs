//! `sockops`: the life of each translated connection — active-connection counts, failure and
//! success signals for the circuit breaker, open/close flow events — and same-node bypass setup.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK,
        BPF_TCP_SYN_SENT, bpf_sock_ops,
    },
    helpers::{bpf_get_socket_cookie, bpf_loop, bpf_sk_storage_get},
    programs::{BtfTracePointContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use mesh_common::{
    AddrBe, FAMILY_V4, PROTO_UDP,
    bypass::BypassBytes,
    counters::{
        CTR_BACKEND_FAILURE, CTR_CONNECT_ABANDONED, CTR_PEER_RESET, CTR_STATE_STALE,
        CTR_SYN_RETRY_RECOVERED,
    },
    event::{
        EV_CLOSE, EV_EJECT, EV_FAIL, EV_OPEN, EV_RECOVER, FAIL_REFUSED, FAIL_RESET,
        FAIL_SYN_TIMEOUT,
    },
    service::{Service, ServiceKey, slot_index},
    sock::{
        RevNatKey, SOCK_F_COUNTED, SOCK_F_ERROR, SOCK_F_ESTABLISHED, SOCK_F_FAILED, SOCK_F_MULTI,
        SOCK_F_PEER_RESET, SOCK_F2_BYPASSED, SockState,
    },
};

use crate::{
    atomic, bypass, circuit, events,
    maps::{REVNAT, SERVICE_SLOTS, SOCK_FIN_WAIT2, backend_state, count, service_state},
};

/// Entry for every sockops callback; always lets the socket go on. Every TCP socket of the node
/// passes here several times per connection, so callbacks that are not ours return before any
/// lookup, and a socket without `SOCK_STATE` (neither translated, captured nor bypassed) after one.
#[inline(always)]
pub fn handle(ctx: &SockOpsContext) -> u32 {
    let op = ctx.op();
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            bypass::on_established(ctx);
        }
        BPF_SOCK_OPS_TCP_CONNECT_CB | BPF_SOCK_OPS_RTO_CB => {}
        // Of the state changes only two are ours: into CLOSE (accounting, the close event) and
        // into FIN_WAIT2 (a FIN in the byte count).
        BPF_SOCK_OPS_STATE_CB if matches!(ctx.arg(1), BPF_TCP_CLOSE | BPF_TCP_FIN_WAIT2) => {}
        // Initial timeout and window, ECN, header options, the other state changes.
        _ => return 1,
    }
    let Some(st) = storage(ctx) else {
        return 1;
    };
    // SAFETY: non-null socket storage, owned by this socket for its whole life.
    let st = unsafe { &mut *st };
    let closing = op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE;
    // A bypassed socket's count goes with it, translated or not.
    let bypassed = if closing && st.flags2 & SOCK_F2_BYPASSED != 0 {
        bypass::on_close(ctx)
    } else {
        BypassBytes::default()
    };
    if crate::capture::on_sockops(ctx, op, st) || st.service_id == 0 {
        return 1;
    }
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx, st),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx, st),
        BPF_SOCK_OPS_RTO_CB => {
            // SAFETY: `ops` is the context.
            let state = unsafe { read_volatile(&raw const (*ctx.ops).state) };
            if state == BPF_TCP_SYN_SENT && st.flags & (SOCK_F_FAILED | SOCK_F_ESTABLISHED) == 0 {
                // The SYN went unanswered for an RTO (~1 s): a failure now, not after ~19 s.
                fail(ctx, st, FAIL_SYN_TIMEOUT);
            }
        }
        BPF_SOCK_OPS_STATE_CB if closing => on_close(ctx, st, ctx.arg(0), &bypassed),
        BPF_SOCK_OPS_STATE_CB => remember_fin_wait2(ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn storage(ctx: &SockOpsContext) -> Option<*mut SockState> {
    // SAFETY: `sk` is a socket pointer in the context (null-checked by `storage_of`).
    storage_of(unsafe { (*ctx.ops).__bindgen_anon_2.sk }.cast())
}

/// The socket's state, if `connect()` (or the bypass) recorded one: no create, other sockets
/// have none.
#[inline(always)]
fn storage_of(sk: *mut core::ffi::c_void) -> Option<*mut SockState> {
    crate::maps::sock_state(sk, false)
}

/// `tp_btf/tcp_receive_reset`: the peer sent a reset; marks translated sockets so that their
/// close counts as a backend failure.
#[inline(always)]
pub fn on_peer_reset(ctx: &BtfTracePointContext) {
    // The tracepoint's first argument is the `struct sock *` receiving the reset.
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    if let Some(st) = storage_of(sk) {
        // SAFETY: non-null storage owned by this socket (the socket lock is held).
        unsafe { (*st).flags |= SOCK_F_PEER_RESET };
        count(CTR_PEER_RESET);
    }
}

/// `tp_btf/inet_sk_error_report`: the kernel reported an error on a socket (reset, ICMP
/// unreachable, timeout); marks translated sockets so a handshake that ends without one is known
/// to be the application giving up, not the backend failing.
#[inline(always)]
pub fn on_error_report(ctx: &BtfTracePointContext) {
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    if let Some(st) = storage_of(sk) {
        // SAFETY: non-null storage owned by this socket.
        unsafe { (*st).flags |= SOCK_F_ERROR };
    }
}

/// `cgroup/sock_release`: a UDP socket that talked to a service is gone — its reverse translation
/// goes with it (so the LRU never has to evict a live socket's entry) and its flow closes.
#[inline(always)]
pub fn on_release(ctx: &SockContext) {
    // Every socket of the node is released through here; TCP's flows close in sockops, so only
    // UDP sockets pay the storage lookup. (`IPPROTO_UDP` and `PROTO_UDP` are the same number.)
    // SAFETY: a permitted 4-byte load of the context socket's protocol.
    if unsafe { read_volatile(&raw const (*ctx.sock).protocol) } != u32::from(PROTO_UDP) {
        return;
    }
    let Some(st) = storage_of(ctx.sock.cast()) else {
        return;
    };
    // SAFETY: non-null storage of the socket being released; copied out.
    let st = unsafe { core::ptr::read_volatile(st) };
    if st.proto != PROTO_UDP || st.service_id == 0 {
        return;
    }
    // SAFETY: the context is the socket, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    let key = RevNatKey {
        cookie,
        backend_addr_be: st.backend_addr_be,
        backend_port_be: st.backend_port_be,
        _pad: [0; 6],
    };
    let _ = REVNAT.remove(key);
    if st.flags & SOCK_F_MULTI != 0 {
        forget_all_backends(&st, cookie);
    }
    let now = events::now();
    events::emit(cookie, &st, EV_CLOSE, 0, |ev| {
        ev.duration_ns = now.saturating_sub(st.start_ns);
    });
}

/// Most slots a released socket's cleanup visits; beyond that, entries age out of the LRU.
const RELEASE_SCAN: u32 = 1024;

/// What the release scan needs in its `bpf_loop` callback.
#[repr(C)]
struct Release {
    service_id: u32,
    /// The configuration's range in `SERVICE_SLOTS`.
    slot_base: u32,
    cookie: u64,
}

/// Removes the reverse translation of every backend of the socket's service (an unconnected
/// socket may have sent to any of them).
#[inline(always)]
fn forget_all_backends(st: &SockState, cookie: u64) {
    let Some(svc) = service(st) else {
        return;
    };
    let mut r = Release {
        service_id: svc.id,
        slot_base: svc.slot_base,
        cookie,
    };
    // SAFETY: `forget_slot` has the callback signature `bpf_loop` expects; `r` outlives it.
    unsafe {
        bpf_loop(
            svc.backend_count.min(RELEASE_SCAN),
            forget_slot as *mut core::ffi::c_void,
            (&raw mut r).cast(),
            0,
        );
    }
}

#[inline(never)]
extern "C" fn forget_slot(i: u32, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `Release` passed to `bpf_loop` by `forget_all_backends`.
    let r = unsafe { &*ctx.cast::<Release>() };
    // `i` is below the configuration's backend count (the loop's bound).
    // SAFETY: array element; a u32 value: one load.
    let Some(id) = SERVICE_SLOTS
        .get_ptr(slot_index(r.slot_base, i))
        .map(|p| unsafe { core::ptr::read_volatile(p) })
    else {
        return 0;
    };
    if let Some(b) = crate::maps::backend(id, r.service_id) {
        let _ = REVNAT.remove(RevNatKey {
            cookie: r.cookie,
            backend_addr_be: b.addr_be,
            backend_port_be: b.port_be,
            _pad: [0; 6],
        });
    }
    0
}

/// Whether the service the socket connected to still exists (its id's state slot is still
/// tagged with it): a removed service's sockets move no circuit. One array read — the
/// configuration itself ([`service`]) is read only where its settings are needed.
#[inline(always)]
fn service_live(st: &SockState) -> bool {
    service_state(st.service_id).is_some()
}

/// The service the socket connected to, if it still is the same service (same id): a service
/// removed and re-added at the same address is another service, whose circuits this socket's fate
/// must not move.
#[inline(always)]
fn service(st: &SockState) -> Option<Service> {
    let key = ServiceKey {
        addr_be: st.svc_addr_be,
        port_be: st.svc_port_be,
        proto: st.proto,
        family: st.family,
    };
    crate::maps::service(&key).filter(|s| s.id == st.service_id)
}

/// The socket's own address (the client pod's), for flow events.
#[inline(always)]
fn local_addr(ctx: &SockOpsContext, family: u8) -> AddrBe {
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: permitted 4-byte context loads.
    unsafe {
        if family == FAMILY_V4 {
            [read_volatile(&raw const (*ops).local_ip4), 0, 0, 0]
        } else {
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ]
        }
    }
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: sockops context, as the helper requires.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// SYN about to be sent: count the connection and ask for the callbacks that tell its fate.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext, st: &mut SockState) {
    // RTO: a SYN unanswered; STATE: the close. (Not RETRANS: nothing here reads it.)
    let flags = BPF_SOCK_OPS_RTO_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG;
    let _ = ctx.set_cb_flags(flags.cast_signed());
    if st.flags & SOCK_F_COUNTED == 0 {
        if let Some(b) = backend_state(st.backend_id) {
            // SAFETY: array element owned by this backend id (tag checked).
            unsafe { atomic::add(&raw mut (*b).active, 1) };
            st.flags |= SOCK_F_COUNTED;
        } else {
            count(CTR_STATE_STALE);
        }
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext, st: &mut SockState) {
    let client = local_addr(ctx, st.family);
    st.flags |= SOCK_F_ESTABLISHED;
    // A SYN retransmit was counted as a failure, but the backend did answer: that is a success
    // (and the connection's close is judged on its own again).
    let recovered_syn = st.flags & SOCK_F_FAILED != 0;
    if recovered_syn {
        st.flags &= !SOCK_F_FAILED;
        count(CTR_SYN_RETRY_RECOVERED);
    }
    let now = events::now();
    let cookie = cookie(ctx);
    if service_live(st)
        && circuit::on_success(
            st.service_id,
            st.backend_id,
            st.probe_word,
            recovered_syn,
            now,
        )
    {
        events::emit(cookie, st, EV_RECOVER, 0, |ev| {
            ev.client_addr_be = client;
        });
    }
    events::emit(cookie, st, EV_OPEN, 0, |ev| ev.client_addr_be = client);
}

#[inline(always)]
fn fail(ctx: &SockOpsContext, st: &mut SockState, reason: u8) {
    let client = local_addr(ctx, st.family);
    st.flags |= SOCK_F_FAILED;
    count(CTR_BACKEND_FAILURE);
    let cookie = cookie(ctx);
    let now = events::now();
    events::emit(cookie, st, EV_FAIL, reason, |ev| {
        ev.client_addr_be = client;
    });
    let probe_word = st.probe_word;
    // A probe's outcome is reported once.
    st.probe_word = 0;
    if let Some(svc) = service(st)
        && circuit::on_failure(&svc, st.backend_id, probe_word, now)
    {
        // Rare (one per ejection), so logging here stays off the per-connection path.
        debug!(
            ctx,
            "circuit opened: service {} backend {}", svc.id, st.backend_id
        );
        events::emit(cookie, st, EV_EJECT, reason, |ev| {
            ev.client_addr_be = client;
        });
    }
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext, st: &mut SockState, old_state: u32, bypassed: &BypassBytes) {
    if st.flags & SOCK_F_COUNTED != 0 {
        st.flags &= !SOCK_F_COUNTED;
        // The agent keeps a removed backend's slot until its active count is back to 0, so the
        // slot is still this backend's; and this socket's own increment precedes this decrement.
        if let Some(b) = backend_state(st.backend_id) {
            // SAFETY: array element owned by this backend id (tag checked).
            unsafe { atomic::sub_own(&raw mut (*b).active) };
        } else {
            count(CTR_STATE_STALE);
        }
    }
    if old_state == BPF_TCP_SYN_SENT && st.flags & SOCK_F_FAILED == 0 {
        if st.flags & (SOCK_F_PEER_RESET | SOCK_F_ERROR) != 0 {
            fail(ctx, st, FAIL_REFUSED);
        } else {
            // No reset, no error: the client closed (or timed out) its own connect.
            count(CTR_CONNECT_ABANDONED);
        }
    } else if st.flags & (SOCK_F_PEER_RESET | SOCK_F_FAILED) == SOCK_F_PEER_RESET {
        // The backend reset an established connection: a failure. The application's own
        // abortive close (`SO_LINGER` 0) also jumps to CLOSE but never sets the flag.
        fail(ctx, st, FAIL_RESET);
    }
    let reason = if st.flags & SOCK_F_PEER_RESET != 0 {
        FAIL_RESET
    } else {
        0
    };
    let now = events::now();
    if st.flags & (SOCK_F_ESTABLISHED | SOCK_F_FAILED) == SOCK_F_ESTABLISHED && service_live(st) {
        circuit::on_clean_close(st.backend_id, now, || {
            service(st).map(|svc| svc.base_ejection_ms)
        });
    }
    if st.flags & SOCK_F_ESTABLISHED != 0 {
        let ops: *const bpf_sock_ops = ctx.ops;
        // SAFETY: permitted context loads.
        let (acked, received, rcv_nxt) = unsafe {
            (
                read_volatile(&raw const (*ops).bytes_acked),
                read_volatile(&raw const (*ops).bytes_received),
                read_volatile(&raw const (*ops).rcv_nxt),
            )
        };
        let fin_wait2 = if old_state == BPF_TCP_FIN_WAIT2 {
            rcv_nxt_at_fin_wait2(ctx)
        } else {
            None
        };
        let (fin_acked, fin_received) = fins(st, old_state, rcv_nxt, fin_wait2);
        // Payload only, as Envoy's and Cilium's byte counts: TCP's counters also hold the SYN
        // (always acked once established) and each FIN, one sequence number apiece. Plus what
        // `sk_msg` moved socket to socket, which TCP never saw: the same totals with bypass on
        // or off.
        let sent = acked.saturating_sub(1 + u64::from(fin_acked)) + bypassed.sent;
        let received = received.saturating_sub(u64::from(fin_received)) + bypassed.received;
        let start = st.start_ns;
        let client = local_addr(ctx, st.family);
        events::emit(cookie(ctx), st, EV_CLOSE, reason, |ev| {
            ev.client_addr_be = client;
            ev.bytes_sent = sent;
            ev.bytes_received = received;
            ev.duration_ns = now.saturating_sub(start);
        });
    }
}

/// Whether this socket's own FIN was acked, and whether the peer's FIN arrived, for a socket
/// closing from `old_state` (each is one sequence number in TCP's byte counters, not payload).
#[inline(always)]
fn fins(st: &SockState, old_state: u32, rcv_nxt: u32, fin_wait2: Option<u32>) -> (bool, bool) {
    let reset = st.flags & (SOCK_F_PEER_RESET | SOCK_F_ERROR) != 0;
    match old_state {
        // Only an ACK of our FIN leads to FIN_WAIT2; from there the peer's FIN (→ TIME_WAIT)
        // moves `rcv_nxt`, while the application closing first (an orphaned FIN_WAIT2 goes
        // straight to TIME_WAIT) does not. Data that arrived in FIN_WAIT2 before such a close is
        // taken for a FIN (one byte short): only when the peer sent data and no FIN after our
        // shutdown and the application closed before it did.
        // (No record: its storage could not be made; count the FIN as the common case.)
        BPF_TCP_FIN_WAIT2 => (true, !reset && fin_wait2 != Some(rcv_nxt)),
        // Both sides' FINs were exchanged; CLOSE follows the ACK of ours unless reset.
        BPF_TCP_LAST_ACK | BPF_TCP_CLOSING => (!reset, true),
        // The peer's FIN came; ours was never sent (reset or abortive close).
        BPF_TCP_CLOSE_WAIT => (false, true),
        _ => (false, false),
    }
}

/// Entering `FIN_WAIT2` (our FIN was acked): records `rcv_nxt` in `SOCK_FIN_WAIT2`.
#[inline(always)]
fn remember_fin_wait2(ctx: &SockOpsContext) {
    // SAFETY: permitted context loads; `sk` is null-checked.
    let (mut rcv_nxt, sk) = unsafe {
        (
            read_volatile(&raw const (*ctx.ops).rcv_nxt),
            (*ctx.ops).__bindgen_anon_2.sk,
        )
    };
    if sk.is_null() {
        return;
    }
    let map = (&raw const SOCK_FIN_WAIT2).cast_mut().cast();
    // SAFETY: a socket pointer from the context; `rcv_nxt` is the (4-byte) initial value.
    let p = unsafe {
        bpf_sk_storage_get(
            map,
            sk.cast(),
            (&raw mut rcv_nxt).cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    };
    if !p.is_null() {
        // SAFETY: the socket's own 4-byte storage (existing storage is not overwritten by the
        // helper's initial value).
        unsafe { core::ptr::write_volatile(p.cast::<u32>(), rcv_nxt) };
    }
}

/// What [`remember_fin_wait2`] recorded for this socket, if anything.
#[inline(always)]
fn rcv_nxt_at_fin_wait2(ctx: &SockOpsContext) -> Option<u32> {
    // SAFETY: a permitted context load.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let map = (&raw const SOCK_FIN_WAIT2).cast_mut().cast();
    // SAFETY: a socket pointer from the context; no create flag.
    let p = unsafe { bpf_sk_storage_get(map, sk.cast(), core::ptr::null_mut(), 0) };
    // SAFETY: non-null: the socket's own 4-byte storage.
    (!p.is_null()).then(|| unsafe { core::ptr::read_volatile(p.cast::<u32>()) })
}
