//! `STRICT` peer authentication on the destination node: a `tc` (tcx) ingress program on the
//! node's uplink drops new TCP connections (SYN without ACK) addressed to a local enrolled pod
//! whose peer authentication is `STRICT`. Mesh traffic arrives at the agent's HBONE port on the
//! node address, never at the pod, so it is untouched; replies to the pod's own outbound
//! connections carry ACK and pass.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use mesh_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, counters::CTR_STRICT_REFUSE_REMOTE};

use crate::{capture, maps::count};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// `tc` ingress verdict: `TC_ACT_SHOT` for a refused SYN; otherwise `TC_ACT_UNSPEC` (tcx "next"),
/// so other programs on the interface (a CNI's) still see the packet.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    match refuse(ctx) {
        Some(true) => {
            count(CTR_STRICT_REFUSE_REMOTE);
            TC_ACT_SHOT
        }
        _ => TC_ACT_UNSPEC,
    }
}

/// `Some(true)` when the packet opens a TCP connection to a local `STRICT` pod. IPv6 extension
/// headers before TCP are not walked: such SYNs pass (none of the stacks we serve send them).
#[inline(always)]
fn refuse(ctx: &TcContext) -> Option<bool> {
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (family, addr, l4) = if proto == ETH_P_IP {
        let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
        if ctx.load::<u8>(ETH_HLEN + 9).ok()? != PROTO_TCP {
            return Some(false);
        }
        // A fragment other than the first carries no TCP header.
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
        if frag & 0x1fff != 0 {
            return Some(false);
        }
        let daddr: u32 = ctx.load(ETH_HLEN + 16).ok()?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        (FAMILY_V4, [daddr, 0, 0, 0], ETH_HLEN + ihl)
    } else if proto == ETH_P_IPV6 {
        if ctx.load::<u8>(ETH_HLEN + 6).ok()? != PROTO_TCP {
            return Some(false);
        }
        let a: [u32; 4] = ctx.load(ETH_HLEN + 24).ok()?;
        (FAMILY_V6, a, ETH_HLEN + IPV6_HLEN)
    } else {
        return Some(false);
    };
    let flags: u8 = ctx.load(l4 + TCP_FLAGS_OFFSET).ok()?;
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Some(false);
    }
    Some(capture::strict_local(addr, family))
}
