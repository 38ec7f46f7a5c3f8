//! Mesh decisions at `connect()`: capture of enrolled cross-node connections to the agent's
//! outbound listener (fail closed), the same-node identity policy and `STRICT` refusal of local
//! plaintext; and the sockops half that files a captured connection under the client's address.
//!
//! The maps of this module are declared here (not in `maps`) because only this module and the
//! agent's `datapath::mesh` use them.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock_addr, bpf_sock_ops,
    },
    btf_maps::{Array, HashMap, LruHashMap},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_set_retval,
    },
    macros::btf_map,
    programs::{SockAddrContext, SockOpsContext},
};
use mesh_common::{
    AddrBe, FAMILY_V4, FAMILY_V6, PROTO_TCP,
    counters::{
        CTR_CAPTURE_MISS, CTR_CAPTURED, CTR_SAME_NODE_DENY, CTR_SOCK_STORAGE_FAILED,
        CTR_STRICT_REFUSE_LOCAL,
    },
    event::EV_REJECT,
    mesh::{
        CAPTURED_CAPACITY, CAPTURED_F_SERVICE, CaptureConfig, CaptureKey, Captured,
        IDENTITY_VERDICTS_CAPACITY, MESH_ENDPOINTS_CAPACITY, MESH_F_DEFAULT_DENY, MESH_F_ENROLLED,
        MESH_F_LOCAL, MESH_F_STRICT, MESH_WORKLOADS_CAPACITY, MeshEndpoint, MeshEndpointKey,
        MeshWorkload, VERDICT_ALLOW, VERDICT_ANY_PORT, VERDICT_DENY, VerdictKey,
    },
    sock::{SOCK_F_CAPTURED, SOCK_F_V4_MAPPED, SockState},
};

use crate::maps::{SOCK_STATE, count};

/// Local workloads by cgroup id (agent).
#[btf_map]
pub static MESH_WORKLOADS: HashMap<u64, MeshWorkload, { MESH_WORKLOADS_CAPACITY as usize }> =
    HashMap::new();

/// Mesh pods by address, local or not (agent).
#[btf_map]
pub static MESH_ENDPOINTS: HashMap<
    MeshEndpointKey,
    MeshEndpoint,
    { MESH_ENDPOINTS_CAPACITY as usize },
> = HashMap::new();

/// Same-node identity verdicts (agent, from the authorization policy).
#[btf_map]
pub static IDENTITY_VERDICTS: HashMap<VerdictKey, u32, { IDENTITY_VERDICTS_CAPACITY as usize }> =
    HashMap::new();

/// The agent's outbound listener (agent).
#[btf_map]
pub static CAPTURE_CONFIG: Array<CaptureConfig, 1> = Array::new();

/// Captured sockets by cookie until sockops knows their source port (kernel).
#[btf_map]
pub static CAPTURE_PENDING: LruHashMap<u64, Captured, { CAPTURED_CAPACITY as usize }> =
    LruHashMap::new();

/// Captured connections by client address and port (kernel; the agent reads).
#[btf_map]
pub static CAPTURED: LruHashMap<CaptureKey, Captured, { CAPTURED_CAPACITY as usize }> =
    LruHashMap::new();

/// `connect()` fails with this when the identity policy or `STRICT` refuses it.
pub const ERRNO_DENIED: i32 = 13; // EACCES
/// `connect()` fails with this when an enrolled connection cannot be captured (as from a closed
/// port: the agent is not there).
pub const ERRNO_NO_CAPTURE: i32 = 111; // ECONNREFUSED

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), in network order.
const V4_MAPPED_WORD: u32 = u32::from_be(0x0000_ffff);

/// After the service translation of a TCP `connect()` picked pod `st.backend_*`: the mesh
/// decision for it. Returns 1 to let the connect go on (perhaps rewritten to the agent), 0 when it
/// was refused (errno set).
///
/// # Safety
/// `ctx` must be the running `cgroup/connect{4,6}` program's context and `st` point at an
/// initialised [`SockState`].
#[inline(never)]
pub unsafe fn after_translate(
    ctx: *mut bpf_sock_addr,
    st: *const SockState,
    sock_family: u32,
) -> i32 {
    // SAFETY: `st` points at the caller's initialised state (the contract above).
    let st = unsafe { &*st };
    let mut c = Captured {
        dst_addr_be: st.backend_addr_be,
        dst_port_be: st.backend_port_be,
        svc_addr_be: st.svc_addr_be,
        svc_port_be: st.svc_port_be,
        family: st.family,
        flags: CAPTURED_F_SERVICE,
        ..Captured::default()
    };
    decide(ctx, &mut c, sock_family, st.flags & SOCK_F_V4_MAPPED != 0)
}

/// A TCP `connect()` to an address that is not a service: the mesh decision for the pod (if it
/// is one). Same return as [`after_translate`].
///
/// # Safety
/// `ctx` must be the running `cgroup/connect{4,6}` program's context.
#[inline(never)]
pub unsafe fn direct(ctx: *mut bpf_sock_addr, sock_family: u32) -> i32 {
    // SAFETY: `ctx` is the program's context; permitted 4-byte loads.
    let (addr, port) = unsafe {
        let addr = if sock_family == u32::from(FAMILY_V4) {
            [read_volatile(&raw const (*ctx).user_ip4), 0, 0, 0]
        } else {
            [
                read_volatile(&raw const (*ctx).user_ip6[0]),
                read_volatile(&raw const (*ctx).user_ip6[1]),
                read_volatile(&raw const (*ctx).user_ip6[2]),
                read_volatile(&raw const (*ctx).user_ip6[3]),
            ]
        };
        (addr, read_volatile(&raw const (*ctx).user_port) as u16)
    };
    let mapped = sock_family == u32::from(FAMILY_V6)
        && addr[0] == 0
        && addr[1] == 0
        && addr[2] == V4_MAPPED_WORD;
    let (family, addr) = if mapped {
        (FAMILY_V4, [addr[3], 0, 0, 0])
    } else if sock_family == u32::from(FAMILY_V4) {
        (FAMILY_V4, addr)
    } else {
        (FAMILY_V6, addr)
    };
    let mut c = Captured {
        dst_addr_be: addr,
        dst_port_be: port,
        svc_addr_be: addr,
        svc_port_be: port,
        family,
        ..Captured::default()
    };
    decide(ctx, &mut c, sock_family, mapped)
}

/// The mesh decision for a connect from the current cgroup to pod `c.dst_*`:
/// - destination not an enrolled mesh pod → untouched (plain L4, as today);
/// - destination on this node: a non-enrolled source is refused (`EACCES`) if the pod is
///   `STRICT`; otherwise the identity verdicts judge the pair (a non-enrolled source as identity
///   0, unauthenticated), deny → `EACCES`;
/// - destination on another node, enrolled source → captured: rewritten to the agent's
///   outbound listener and recorded; if that is impossible → `ECONNREFUSED` (fail closed);
/// - destination on another node, source not enrolled → untouched: plaintext, which the
///   destination node's ingress program drops if the pod is `STRICT`.
#[inline(always)]
fn decide(ctx: *mut bpf_sock_addr, c: &mut Captured, sock_family: u32, mapped: bool) -> i32 {
    let key = MeshEndpointKey {
        addr_be: c.dst_addr_be,
        family: c.family,
        _pad: [0; 3],
    };
    let Some(dst) = MESH_ENDPOINTS.get_ptr(key) else {
        return 1;
    };
    // SAFETY: copied out (8 bytes, two words; an agent update rewrites both).
    let dst = unsafe { read_volatile(dst) };
    if dst.flags & MESH_F_ENROLLED == 0 {
        return 1;
    }
    // SAFETY: helper without arguments.
    c.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    c.dst_identity = dst.identity;
    let src = current_workload(c.cgroup_id);
    let src_enrolled = src.flags & MESH_F_ENROLLED != 0 && src.identity != 0;
    c.src_identity = if src_enrolled { src.identity } else { 0 };
    if dst.flags & MESH_F_LOCAL != 0 {
        if !src_enrolled && dst.flags & MESH_F_STRICT != 0 {
            return reject(ctx, c, CTR_STRICT_REFUSE_LOCAL, ERRNO_DENIED);
        }
        // A source outside the mesh is judged as identity 0 (unauthenticated), as ztunnel
        // judges plaintext it intercepted: an ALLOW policy that names principals refuses it.
        if !allowed(c.src_identity, &dst, c.dst_port_be) {
            return reject(ctx, c, CTR_SAME_NODE_DENY, ERRNO_DENIED);
        }
        return 1;
    }
    if !src_enrolled {
        return 1;
    }
    capture(ctx, c, sock_family, mapped)
}

/// Deepest cgroup level searched for a listed ancestor (the kubelet's pod cgroups sit at 3–4:
/// `kubepods.slice/kubepods-burstable.slice/…-pod<uid>.slice`, containers one below).
const MAX_CGROUP_LEVEL: i32 = 12;

/// The workload of the calling cgroup `leaf`: its own entry, else that of its deepest listed
/// ancestor. The agent lists each pod's cgroup, and the pod's processes run in the container
/// cgroups below it, which appear (container restarts) without the agent knowing their ids.
#[inline(always)]
fn current_workload(leaf: u64) -> MeshWorkload {
    if let Some(p) = MESH_WORKLOADS.get_ptr(leaf) {
        // SAFETY: copied out.
        return unsafe { read_volatile(p) };
    }
    let mut found = MeshWorkload::default();
    for level in 1..MAX_CGROUP_LEVEL {
        // SAFETY: helper taking a plain integer; 0 past the current cgroup's depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == leaf {
            break;
        }
        if let Some(p) = MESH_WORKLOADS.get_ptr(id) {
            // SAFETY: copied out.
            found = unsafe { read_volatile(p) };
        }
    }
    found
}

/// The identity policy for an enrolled same-node pair: the verdict for the exact port, else for
/// any port, else the destination's default (deny if an `ALLOW` policy selects it).
#[inline(always)]
fn allowed(src_identity: u32, dst: &MeshEndpoint, port_be: u16) -> bool {
    let mut k = VerdictKey {
        src_identity,
        dst_identity: dst.identity,
        port_be,
        _pad: 0,
    };
    let mut verdict = IDENTITY_VERDICTS
        .get_ptr(k)
        // SAFETY: a u32 value: one load.
        .map_or(0, |p| unsafe { read_volatile(p) });
    if verdict == 0 {
        k.port_be = VERDICT_ANY_PORT;
        verdict = IDENTITY_VERDICTS
            .get_ptr(k)
            // SAFETY: as above.
            .map_or(0, |p| unsafe { read_volatile(p) });
    }
    match verdict {
        VERDICT_DENY => false,
        VERDICT_ALLOW => true,
        _ => dst.flags & MESH_F_DEFAULT_DENY == 0,
    }
}

/// Sends the connect to the agent's outbound listener and records where it was going.
#[inline(always)]
fn capture(ctx: *mut bpf_sock_addr, c: &Captured, sock_family: u32, mapped: bool) -> i32 {
    let Some(conf) = CAPTURE_CONFIG.get_ptr(0) else {
        return reject(ctx, c, CTR_CAPTURE_MISS, ERRNO_NO_CAPTURE);
    };
    // Fields read one by one from the (array, never freed) element: no copy on this stack,
    // which shares the 512-byte budget with `translate`'s frame.
    // SAFETY: a valid array element; aligned loads.
    let (port_be, addr4_be) = unsafe {
        (
            u32::from(read_volatile(&raw const (*conf).port_be)),
            read_volatile(&raw const (*conf).addr4_be),
        )
    };
    let v4 = sock_family == u32::from(FAMILY_V4) || mapped;
    // SAFETY: as above.
    let no_v6 = unsafe {
        read_volatile(&raw const (*conf).addr6_be[0]) == 0
            && read_volatile(&raw const (*conf).addr6_be[1]) == 0
            && read_volatile(&raw const (*conf).addr6_be[2]) == 0
            && read_volatile(&raw const (*conf).addr6_be[3]) == 0
    };
    if port_be == 0 || (v4 && addr4_be == 0) || (!v4 && no_v6) {
        return reject(ctx, c, CTR_CAPTURE_MISS, ERRNO_NO_CAPTURE);
    }
    // getpeername must keep showing what the application asked for (the service or the pod),
    // sockops must not account the agent's listener as the backend, and the mark is what sends
    // sockops to the pending record: without storage the capture cannot work, so it fails closed.
    let sctx = SockAddrContext::new(ctx);
    // SAFETY: sock_addr context, as the helper requires.
    let p = unsafe { SOCK_STATE.get_or_insert_ptr_mut(&sctx, None) };
    if p.is_null() {
        count(CTR_SOCK_STORAGE_FAILED);
        return reject(ctx, c, CTR_CAPTURE_MISS, ERRNO_NO_CAPTURE);
    }
    // SAFETY: sock_addr context, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.cast()) };
    if CAPTURE_PENDING.insert(cookie, c, 0).is_err() {
        return reject(ctx, c, CTR_CAPTURE_MISS, ERRNO_NO_CAPTURE);
    }
    // SAFETY: non-null storage owned by this socket.
    unsafe {
        (*p).svc_addr_be = c.svc_addr_be;
        (*p).svc_port_be = c.svc_port_be;
        (*p).family = c.family;
        (*p).proto = PROTO_TCP;
        (*p).cgroup_id = c.cgroup_id;
        (*p).flags |= SOCK_F_CAPTURED | if mapped { SOCK_F_V4_MAPPED } else { 0 };
    }
    if sock_family == u32::from(FAMILY_V4) {
        rewrite4(ctx, addr4_be, port_be);
    } else if mapped {
        let a = [0, 0, V4_MAPPED_WORD, addr4_be];
        rewrite6(ctx, &raw const a, port_be);
    } else {
        // SAFETY: the array element, as above (never freed).
        rewrite6(ctx, unsafe { &raw const (*conf).addr6_be }, port_be);
    }
    count(CTR_CAPTURED);
    1
}

/// Points an IPv4 connect at the agent's listener. Functions of their own (BPF-to-BPF calls),
/// one per family with a single path each: otherwise LLVM merges the branches into one store
/// through a computed `ctx + offset`, which the verifier rejects as a modified context pointer.
#[inline(never)]
fn rewrite4(ctx: *mut bpf_sock_addr, addr_be: u32, port_be: u32) {
    // SAFETY: the program's context; 4-byte stores to writable fields.
    unsafe {
        write_volatile(&raw mut (*ctx).user_ip4, addr_be);
        write_volatile(&raw mut (*ctx).user_port, port_be);
    }
}

/// As [`rewrite4`], for an `AF_INET6` socket (`addr` may be IPv4-mapped).
#[inline(never)]
fn rewrite6(ctx: *mut bpf_sock_addr, addr: *const AddrBe, port_be: u32) {
    // SAFETY: `addr` points at the caller's array; `ctx` as in `rewrite4`.
    unsafe {
        let a = &*addr;
        write_volatile(&raw mut (*ctx).user_ip6[0], a[0]);
        write_volatile(&raw mut (*ctx).user_ip6[1], a[1]);
        write_volatile(&raw mut (*ctx).user_ip6[2], a[2]);
        write_volatile(&raw mut (*ctx).user_ip6[3], a[3]);
        write_volatile(&raw mut (*ctx).user_port, port_be);
    }
}

/// Refuses the connect with `errno`, counts `reason` and emits a reject event naming both ends
/// (the source pod by cgroup id, the destination pod and, if any, the service).
#[inline(always)]
fn reject(ctx: *mut bpf_sock_addr, c: &Captured, reason: u32, errno: i32) -> i32 {
    // SAFETY: helper valid in cgroup sock_addr programs; sets the syscall's errno.
    unsafe { bpf_set_retval(-errno) };
    count(reason);
    // SAFETY: sock_addr context, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.cast()) };
    emit_reject(cookie, c, reason as u8);
    0
}

/// A reject event straight into the ring (no `SockState` on this stack).
#[inline(always)]
fn emit_reject(cookie: u64, c: &Captured, reason: u8) {
    crate::events::emit_with(|ev| {
        ev.cookie = cookie;
        ev.cgroup_id = c.cgroup_id;
        ev.svc_addr_be = c.svc_addr_be;
        ev.svc_port_be = c.svc_port_be;
        ev.backend_addr_be = c.dst_addr_be;
        ev.backend_port_be = c.dst_port_be;
        ev.kind = EV_REJECT;
        ev.reason = reason;
        ev.family = c.family;
        ev.proto = PROTO_TCP;
    });
}

/// sockops: a captured socket's SYN is about to leave (its source port is now known), so its
/// record moves from the cookie to the client address the agent sees on `accept()`; at close the
/// record goes. Returns true for captured sockets (which the load-balancing accounting skips):
/// those whose storage `capture` marked, so no other socket pays a lookup here.
#[inline(always)]
pub fn on_sockops(ctx: &SockOpsContext, op: u32, st: &SockState) -> bool {
    if !is_captured(st) {
        return false;
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: sockops context, as the helper requires.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        if let Some(p) = CAPTURE_PENDING.get_ptr(cookie) {
            // SAFETY: copied out; the entry is this socket's own (written by its connect).
            let c = unsafe { read_volatile(p) };
            let _ = CAPTURE_PENDING.remove(cookie);
            if CAPTURED.insert(client_key(ctx), c, 0).is_err() {
                count(CTR_CAPTURE_MISS);
            }
        } else {
            count(CTR_CAPTURE_MISS);
        }
        // Only the close callback is needed (the LB accounting does not run for this socket).
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG.cast_signed());
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        // Only a captured socket deletes: another socket may share its source port (Linux reuses
        // an ephemeral port towards a different destination), and its close must not drop this
        // record.
        let _ = CAPTURED.remove(client_key(ctx));
    }
    true
}

/// The socket's own address and port as the peer (the agent) sees them: an IPv4-mapped IPv6
/// address is the IPv4 address it names.
#[inline(always)]
fn client_key(ctx: &SockOpsContext) -> CaptureKey {
    let ops: *const bpf_sock_ops = ctx.ops;
    // SAFETY: permitted 4-byte context loads.
    unsafe {
        let family = read_volatile(&raw const (*ops).family);
        // `local_port` is in host byte order.
        let port_be = (read_volatile(&raw const (*ops).local_port) as u16).to_be();
        let (addr_be, fam): (AddrBe, u8) = if family == u32::from(FAMILY_V4) {
            (
                [read_volatile(&raw const (*ops).local_ip4), 0, 0, 0],
                FAMILY_V4,
            )
        } else {
            let a = [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ];
            if a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD {
                ([a[3], 0, 0, 0], FAMILY_V4)
            } else {
                (a, FAMILY_V6)
            }
        };
        CaptureKey {
            addr_be,
            port_be,
            family: fam,
            _pad: 0,
        }
    }
}

/// Whether sockops' load-balancing accounting must skip this socket: it was captured (its peer is
/// the agent, whose fate says nothing about the backend).
#[inline(always)]
pub fn is_captured(st: &SockState) -> bool {
    st.flags & SOCK_F_CAPTURED != 0
}

/// Whether a local enrolled pod's identity is `STRICT` (used by the ingress program).
#[inline(always)]
pub fn strict_local(addr_be: AddrBe, family: u8) -> bool {
    let key = MeshEndpointKey {
        addr_be,
        family,
        _pad: [0; 3],
    };
    MESH_ENDPOINTS.get_ptr(key).is_some_and(|p| {
        // SAFETY: a u32 field: one load.
        let flags = unsafe { read_volatile(&raw const (*p).flags) };
        flags & (MESH_F_ENROLLED | MESH_F_LOCAL | MESH_F_STRICT)
            == MESH_F_ENROLLED | MESH_F_LOCAL | MESH_F_STRICT
    })
}
