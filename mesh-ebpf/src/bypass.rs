//! Same-node bypass: sockets between two pods of this node go into `BYPASS_SOCKS` at
//! established time, and `sk_msg` hands each send straight to the peer socket's receive queue,
//! counting the bytes it moved in `BYPASS_BYTES` (TCP's own counters never see them).

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock_ops, sk_action::SK_PASS,
        sk_msg_md,
    },
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    AddrBe, FAMILY_V4, FAMILY_V6,
    bypass::{BypassBytes, EndpointKey, SockKey},
    counters::{
        CTR_BYPASS_ESTABLISHED, CTR_BYPASS_INSERT_FAILED, CTR_BYPASS_MISS, CTR_SOCK_STORAGE_FAILED,
    },
    sock::SOCK_F2_BYPASSED,
};

use crate::{
    atomic,
    maps::{BYPASS_BYTES, BYPASS_SOCKS, LOCAL_ENDPOINTS, count, sock_state},
};

#[inline(always)]
fn local(addr: AddrBe) -> bool {
    LOCAL_ENDPOINTS
        .get_ptr(EndpointKey { addr_be: addr })
        .is_some()
}

/// Builds a socket's key from fields laid out alike in `bpf_sock_ops` and `sk_msg_md`:
/// `remote_port` is network order in the upper 16 bits, `local_port` host order.
macro_rules! sock_key {
    ($p:expr) => {{
        let p = $p;
        let family = read_volatile(&raw const (*p).family) as u8;
        let (l, r) = if family == FAMILY_V4 {
            (
                [read_volatile(&raw const (*p).local_ip4), 0, 0, 0],
                [read_volatile(&raw const (*p).remote_ip4), 0, 0, 0],
            )
        } else {
            (
                [
                    read_volatile(&raw const (*p).local_ip6[0]),
                    read_volatile(&raw const (*p).local_ip6[1]),
                    read_volatile(&raw const (*p).local_ip6[2]),
                    read_volatile(&raw const (*p).local_ip6[3]),
                ],
                [
                    read_volatile(&raw const (*p).remote_ip6[0]),
                    read_volatile(&raw const (*p).remote_ip6[1]),
                    read_volatile(&raw const (*p).remote_ip6[2]),
                    read_volatile(&raw const (*p).remote_ip6[3]),
                ],
            )
        };
        SockKey {
            local_addr_be: l,
            remote_addr_be: r,
            local_port_be: (read_volatile(&raw const (*p).local_port) as u16).to_be(),
            remote_port_be: (read_volatile(&raw const (*p).remote_port) >> 16) as u16,
            family,
            _pad: [0; 3],
        }
    }};
}

/// At established (either side): both ends are pods of this node → put the socket in the map,
/// with a zeroed byte count, and ask for its state callbacks so its close removes that count.
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: permitted 4-byte context loads.
    let mut key = unsafe { sock_key!(ops) };
    if (key.family != FAMILY_V4 && key.family != FAMILY_V6)
        || !local(key.local_addr_be)
        || !local(key.remote_addr_be)
    {
        return;
    }
    // Before the socket enters the sockhash (only from then on can `sk_msg` count for it), and
    // zeroed even if an entry exists: a reused 4-tuple starts a new connection's count.
    let counted = BYPASS_BYTES
        .insert(key, BypassBytes::default(), u64::from(BPF_ANY))
        .is_ok();
    // SAFETY: `ops` is the sockops context of a full, established socket.
    if BYPASS_SOCKS
        .update(&mut key, unsafe { &mut *ops }, u64::from(BPF_ANY))
        .is_ok()
    {
        count(CTR_BYPASS_ESTABLISHED);
        if counted && mark(ops) {
            // SAFETY: a permitted 4-byte context load.
            let flags = unsafe { read_volatile(&raw const (*ops).bpf_sock_ops_cb_flags) };
            // Keep the flags `connect` asked for (a translated client has them already).
            let _ = ctx.set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG).cast_signed());
        } else if counted {
            // No storage for the mark: nothing would read or remove the count at close.
            count(CTR_SOCK_STORAGE_FAILED);
            let _ = BYPASS_BYTES.remove(key);
        }
    } else {
        count(CTR_BYPASS_INSERT_FAILED);
        if counted {
            let _ = BYPASS_BYTES.remove(key);
        }
    }
}

/// Marks a bypassed socket in its `SOCK_STATE` (made if it has none): only marked sockets read
/// `BYPASS_BYTES` at close. Without the mark (no memory for the storage, counted) nothing would
/// read the count, so the caller drops it: that connection's bypassed bytes go uncounted.
#[inline(always)]
fn mark(ops: *mut bpf_sock_ops) -> bool {
    // SAFETY: a permitted context load of the full socket's pointer (null-checked by the callee).
    let sk = unsafe { (*ops).__bindgen_anon_2.sk };
    let Some(st) = sock_state(sk.cast(), true) else {
        return false;
    };
    // SAFETY: this socket's own storage; sockops runs under the socket's lock.
    unsafe { (*st).flags2 |= SOCK_F2_BYPASSED };
    true
}

/// At close, for a socket [`mark`]ed at established: the payload bytes this socket sent and received
/// through the bypass, and its entry removed. Zero for a socket that was never bypassed.
#[inline(always)]
pub fn on_close(ctx: &SockOpsContext) -> BypassBytes {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: permitted 4-byte context loads.
    let key = unsafe { sock_key!(ops) };
    let Some(p) = BYPASS_BYTES.get_ptr_mut(key) else {
        return BypassBytes::default();
    };
    // SAFETY: a map value from a successful lookup; 8-byte volatile loads of counts other CPUs
    // add to (the peer's `sk_msg` may still run: what it adds after this read belongs to no flow
    // of ours any more, this socket is closed).
    let bytes = unsafe {
        BypassBytes {
            sent: atomic::load(&raw const (*p).sent),
            received: atomic::load(&raw const (*p).received),
        }
    };
    let _ = BYPASS_BYTES.remove(key);
    bytes
}

/// `sk_msg`: redirect the data to the peer's ingress; if the peer is not in the map, let it
/// take the normal path (never drop).
#[inline(always)]
pub fn on_msg(ctx: &SkMsgContext) -> u32 {
    let msg: *mut sk_msg_md = ctx.msg;
    // SAFETY: permitted 4-byte context loads.
    let me = unsafe { sock_key!(msg) };
    let mut peer = SockKey {
        local_addr_be: me.remote_addr_be,
        remote_addr_be: me.local_addr_be,
        local_port_be: me.remote_port_be,
        remote_port_be: me.local_port_be,
        family: me.family,
        _pad: [0; 3],
    };
    if BYPASS_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        // Not redirected: TCP carries it, and TCP's own counters count it.
        count(CTR_BYPASS_MISS);
        return SK_PASS;
    }
    // SAFETY: a permitted 4-byte context load: the bytes of this message, all redirected.
    let size = u64::from(unsafe { read_volatile(&raw const (*msg).size) });
    // Atomic adds: the two ends send on two CPUs at once, and each adds to both entries.
    if let Some(p) = BYPASS_BYTES.get_ptr_mut(me) {
        // SAFETY: an aligned field of a map value from a successful lookup.
        unsafe { atomic::add(&raw mut (*p).sent, size) };
    }
    if let Some(p) = BYPASS_BYTES.get_ptr_mut(peer) {
        // SAFETY: as above.
        unsafe { atomic::add(&raw mut (*p).received, size) };
    }
    SK_PASS
}
