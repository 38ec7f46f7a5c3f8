//! Same-node bypass: sockets between two pods of this node go into `BYPASS_SOCKS` at
//! established time, and `sk_msg` hands each send straight to the peer socket's receive queue.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_INGRESS, bpf_sock_ops, sk_action::SK_PASS, sk_msg_md},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    AddrBe, FAMILY_V4, FAMILY_V6,
    bypass::{EndpointKey, SockKey},
    counters::{CTR_BYPASS_ESTABLISHED, CTR_BYPASS_INSERT_FAILED, CTR_BYPASS_MISS},
};

use crate::maps::{BYPASS_SOCKS, LOCAL_ENDPOINTS, count};

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

/// At established (either side): both ends are pods of this node → put the socket in the map.
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
    // SAFETY: `ops` is the sockops context of a full, established socket.
    if BYPASS_SOCKS
        .update(&mut key, unsafe { &mut *ops }, u64::from(BPF_ANY))
        .is_ok()
    {
        count(CTR_BYPASS_ESTABLISHED);
    } else {
        count(CTR_BYPASS_INSERT_FAILED);
    }
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
        count(CTR_BYPASS_MISS);
    }
    SK_PASS
}
