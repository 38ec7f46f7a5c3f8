//! L7 outcome reports (`mesh_l7_report`): a program the agent runs with `BPF_PROG_TEST_RUN` and
//! never attaches, so a proxy's report moves a circuit through the same `circuit` functions — the
//! same compare-and-swap transitions, the same ejection cap — as sockops' L4 signals, racing with
//! them on other CPUs as safely as they race with each other.

use aya_ebpf::programs::RawTracePointContext;
use mesh_common::{
    event::{EV_EJECT, FAIL_L7},
    report::{
        REPORT_ARG_BACKEND, REPORT_ARG_CONF, REPORT_ARG_KIND, REPORT_ARG_NOW, REPORT_KIND_FAILURE,
        REPORT_KIND_SUCCESS, REPORT_R_BAD_KIND, REPORT_R_COUNTED, REPORT_R_EJECTED,
        REPORT_R_UNKNOWN_BACKEND, REPORT_R_UNKNOWN_SERVICE,
    },
    sock::SockState,
};

use crate::{circuit, events, maps};

/// Applies one report (arguments: `mesh_common::report`); returns a `REPORT_R_*` value.
#[inline(always)]
pub fn run(ctx: &RawTracePointContext) -> u32 {
    let id: u64 = ctx.arg(REPORT_ARG_BACKEND);
    let conf_id: u64 = ctx.arg(REPORT_ARG_CONF);
    let kind: u64 = ctx.arg(REPORT_ARG_KIND);
    let now: u64 = ctx.arg(REPORT_ARG_NOW);
    if kind != REPORT_KIND_FAILURE && kind != REPORT_KIND_SUCCESS {
        return REPORT_R_BAD_KIND;
    }
    let (Ok(id), Ok(conf_id)) = (u32::try_from(id), u32::try_from(conf_id)) else {
        return REPORT_R_UNKNOWN_BACKEND;
    };
    // The configuration names the service; its current configuration (settings may have
    // changed since the caller looked) decides, as for a socket's close.
    let Some(conf) = maps::service_conf(conf_id) else {
        return REPORT_R_UNKNOWN_SERVICE;
    };
    let Some(svc) = maps::service(&conf.key).filter(|s| s.id == conf.id) else {
        return REPORT_R_UNKNOWN_SERVICE;
    };
    // A removed backend is marked removed in `BACKEND_ADDRS` at once (its state slot stays quarantined): a late
    // report about it moves nothing.
    let Some(backend) = maps::backend(id, svc.id) else {
        return REPORT_R_UNKNOWN_BACKEND;
    };
    if maps::backend_state(id).is_none() {
        return REPORT_R_UNKNOWN_BACKEND;
    }
    let now = if now == 0 { events::now() } else { now };
    if kind == REPORT_KIND_SUCCESS {
        circuit::on_clean_close(id, now, || Some(svc.base_ejection_ms));
        return REPORT_R_COUNTED;
    }
    // Not a probe: a report never holds a half-open circuit's probe word, so it can open a closed
    // circuit but never settle a probe (the probe's own connection does that).
    if !circuit::on_failure(&svc, id, 0, now) {
        return REPORT_R_COUNTED;
    }
    // The same eject event a socket's failure sends, with no socket: cookie and client are 0.
    let st = SockState {
        start_ns: now,
        cgroup_id: 0,
        probe_word: 0,
        service_id: svc.id,
        backend_id: id,
        svc_addr_be: svc.key.addr_be,
        backend_addr_be: backend.addr_be,
        svc_port_be: svc.key.port_be,
        backend_port_be: backend.port_be,
        flags: 0,
        family: svc.key.family,
        proto: svc.key.proto,
        flags2: 0,
    };
    events::emit(0, &st, EV_EJECT, FAIL_L7, |_| {});
    REPORT_R_EJECTED
}
