//! The mesh's kernel object: thin entry points, one per attach point, over `mesh_ebpf`'s modules.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_pass_by_value,
    reason = "the aya program macros hand each entry point its context by value"
)]

use aya_ebpf::{
    macros::{btf_tracepoint, cgroup_sock, cgroup_sock_addr, classifier, sk_msg, sock_ops},
    programs::{
        BtfTracePointContext, RawTracePointContext, SkMsgContext, SockAddrContext, SockContext,
        SockOpsContext, TcContext,
    },
};
use mesh_common::{FAMILY_V4, FAMILY_V6};
use mesh_ebpf::{
    bypass,
    connect::{self, Hook},
    report, sockops, strict,
};

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    connect::translate(&ctx, FAMILY_V4, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    connect::translate(&ctx, FAMILY_V6, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    connect::translate(&ctx, FAMILY_V4, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    connect::translate(&ctx, FAMILY_V6, Hook::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    connect::recvmsg(&ctx, FAMILY_V4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    connect::recvmsg(&ctx, FAMILY_V6)
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    connect::getpeername(&ctx, FAMILY_V4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    connect::getpeername(&ctx, FAMILY_V6)
}

#[cgroup_sock(sock_release)]
pub fn mesh_sock_release(ctx: SockContext) -> i32 {
    sockops::on_release(&ctx);
    1
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    sockops::handle(&ctx)
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn mesh_tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    sockops::on_peer_reset(&ctx);
    0
}

#[btf_tracepoint(function = "inet_sk_error_report")]
pub fn mesh_sk_error_report(ctx: BtfTracePointContext) -> i32 {
    sockops::on_error_report(&ctx);
    0
}

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    bypass::on_msg(&ctx)
}

/// An L7 outcome report (`mesh_common::report`): never attached; the agent runs it with
/// `BPF_PROG_TEST_RUN`. Written without aya's `raw_tracepoint` macro, which discards the return
/// value that carries the outcome back.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp")]
pub extern "C" fn mesh_l7_report(ctx: *mut core::ffi::c_void) -> u32 {
    report::run(&RawTracePointContext::new(ctx))
}

/// `tc` (tcx) ingress on the node's uplink: `STRICT` pods refuse plaintext from off the node.
#[classifier]
pub fn mesh_strict_ingress(ctx: TcContext) -> i32 {
    strict::ingress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
