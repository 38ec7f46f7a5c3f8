//! The circuit breaker kept in the kernel: eligibility of a backend at connect time, and the
//! failure/success accounting that ejects and restores it, with no userspace round trip.
//!
//! States: closed → (`consecutive_failures` in a row) → open for `base × (ejections+1)` (capped)
//! → the first connect after that becomes the one half-open probe → its success closes the
//! circuit, its failure re-opens it for longer.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use mesh_common::{
    backend::{BackendState, CIRCUIT_CLOSED, CIRCUIT_HALF_OPEN, CIRCUIT_OPEN, PROBE_TIMEOUT_NS},
    counters::{CTR_EJECTION, CTR_EJECTION_SKIPPED_MAX_PCT, CTR_PROBE, CTR_RECOVERED},
    service::Service,
};

use crate::{
    atomic,
    maps::{BACKEND_STATE, SERVICE_STATE, count},
};

/// Why a backend cannot take a connection now.
pub enum Ineligible {
    /// Its circuit is open (or another probe is in flight).
    Open,
    /// It has `max_connections` already.
    Full,
}

/// Whether `backend_id` may take a new connection; `Ok(true)` means it is the half-open probe.
#[inline(always)]
pub fn admit(svc: &Service, backend_id: u32, now: u64) -> Result<bool, Ineligible> {
    let Some(st) = BACKEND_STATE.get_ptr_mut(backend_id) else {
        // No state yet (agent mid-update): nothing known against it.
        return Ok(false);
    };
    // SAFETY: pointer from a successful lookup; fields are read/written with atomics or
    // single aligned stores, races only blur counts.
    let st = unsafe { &mut *st };
    match st.circuit {
        CIRCUIT_CLOSED => {
            if svc.max_connections != 0 && st.active >= u64::from(svc.max_connections) {
                Err(Ineligible::Full)
            } else {
                Ok(false)
            }
        }
        CIRCUIT_OPEN if now >= st.ejected_until_ns => {
            // SAFETY: field of a looked-up map value.
            if unsafe { atomic::cas_u32(&raw mut st.circuit, CIRCUIT_OPEN, CIRCUIT_HALF_OPEN) } {
                count(CTR_PROBE);
                Ok(true)
            } else {
                Err(Ineligible::Open)
            }
        }
        CIRCUIT_HALF_OPEN if now >= st.ejected_until_ns.saturating_add(PROBE_TIMEOUT_NS) => {
            // The last probe never reported back: allow another.
            st.ejected_until_ns = now;
            count(CTR_PROBE);
            Ok(true)
        }
        _ => Err(Ineligible::Open),
    }
}

/// Records a failed connection; returns true when it ejected the backend.
#[inline(always)]
pub fn on_failure(svc: &Service, backend_id: u32, is_probe: bool) -> bool {
    let Some(st) = BACKEND_STATE.get_ptr_mut(backend_id) else {
        return false;
    };
    // SAFETY: as in `admit`.
    let st = unsafe { &mut *st };
    // SAFETY: fields of a looked-up map value.
    let consecutive = unsafe {
        atomic::add(&raw mut st.failures, 1);
        atomic::add(&raw mut st.consecutive_failures, 1) + 1
    };
    if svc.consecutive_failures == 0 {
        return false;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if is_probe && st.circuit == CIRCUIT_HALF_OPEN {
        // The probe failed: open again, for longer. Still counted in `ejected`.
        open(svc, st, now);
        return true;
    }
    if st.circuit != CIRCUIT_CLOSED || consecutive < u64::from(svc.consecutive_failures) {
        return false;
    }
    let Some(ss) = SERVICE_STATE.get_ptr_mut(svc.id) else {
        return false;
    };
    // SAFETY: pointer from a successful lookup.
    let ss = unsafe { &mut *ss };
    // Envoy's rule: at least one host may always be ejected, more only within the percentage.
    let ejected = ss.ejected;
    if ejected > 0
        && (ejected + 1) * 100 > u64::from(svc.max_ejection_pct) * u64::from(svc.backend_count)
    {
        count(CTR_EJECTION_SKIPPED_MAX_PCT);
        return false;
    }
    // SAFETY: fields of looked-up map values.
    if !unsafe { atomic::cas_u32(&raw mut st.circuit, CIRCUIT_CLOSED, CIRCUIT_OPEN) } {
        return false;
    }
    // SAFETY: as above.
    unsafe { atomic::add(&raw mut ss.ejected, 1) };
    open(svc, st, now);
    count(CTR_EJECTION);
    true
}

#[inline(always)]
fn open(svc: &Service, st: &mut BackendState, now: u64) {
    let n = u64::from(st.ejections) + 1;
    let cap = u64::from(svc.max_ejection_ms.max(svc.base_ejection_ms));
    let ms = (u64::from(svc.base_ejection_ms) * n).min(cap);
    st.ejected_until_ns = now + ms * 1_000_000;
    st.ejections = st.ejections.saturating_add(1);
    st.circuit = CIRCUIT_OPEN;
}

/// Records an established connection; returns true when it closed a half-open circuit (the
/// probe's handshake is its success). Other connections only count as successes when they end
/// cleanly ([`on_clean_close`]): a backend that accepts and then resets must still be ejected.
#[inline(always)]
pub fn on_success(svc: &Service, backend_id: u32, is_probe: bool, now: u64) -> bool {
    let Some(st) = BACKEND_STATE.get_ptr_mut(backend_id) else {
        return false;
    };
    // SAFETY: as in `admit`.
    let st = unsafe { &mut *st };
    // SAFETY: field of a looked-up map value.
    unsafe { atomic::add(&raw mut st.total, 1) };
    // SAFETY: field of a looked-up map value.
    if is_probe
        && unsafe { atomic::cas_u32(&raw mut st.circuit, CIRCUIT_HALF_OPEN, CIRCUIT_CLOSED) }
    {
        st.closed_since_ns = now;
        if let Some(ss) = SERVICE_STATE.get_ptr_mut(svc.id) {
            // SAFETY: pointer from a successful lookup.
            unsafe { atomic::dec(&raw mut (*ss).ejected) };
        }
        st.consecutive_failures = 0;
        count(CTR_RECOVERED);
        return true;
    }
    false
}

/// Records a connection that ended without a reset: a success.
#[inline(always)]
pub fn on_clean_close(svc: &Service, backend_id: u32, now: u64) {
    let Some(st) = BACKEND_STATE.get_ptr_mut(backend_id) else {
        return;
    };
    // SAFETY: as in `admit`.
    let st = unsafe { &mut *st };
    st.consecutive_failures = 0;
    // Healthy for as long as the last ejection multiplier would last: forget past ejections.
    if st.ejections != 0
        && st.circuit == CIRCUIT_CLOSED
        && now.saturating_sub(st.closed_since_ns)
            > u64::from(svc.base_ejection_ms) * u64::from(st.ejections) * 1_000_000
    {
        st.ejections = 0;
    }
}
