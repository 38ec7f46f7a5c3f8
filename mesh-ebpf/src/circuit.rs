//! The circuit breaker kept in the kernel: admission of a backend at connect time, and the
//! failure/success accounting that ejects and restores it, with no userspace round trip.
//!
//! States: closed → (`consecutive_failures` in a row) → open for `base × (ejections+1)` (capped)
//! → the first connect after that becomes the one half-open probe → its success closes the
//! circuit, its failure re-opens it for longer. Every transition is one compare-and-swap of the
//! circuit word (`mesh_common::logic::circuit`); the decisions are `mesh_common::logic`'s.

use mesh_common::{
    counters::{
        CTR_EJECTION, CTR_EJECTION_CONTENDED, CTR_EJECTION_SKIPPED_MAX_PCT, CTR_PROBE,
        CTR_RECOVERED,
    },
    logic::{self, Verdict, circuit},
    service::Service,
};

use crate::{
    atomic,
    maps::{backend_state, count, service_state},
};

/// Why a backend cannot take a connection now.
pub enum Ineligible {
    /// Its circuit is open (or another probe is in flight), or it has no state.
    Open,
    /// It has `max_connections` already.
    Full,
}

/// The verdict for backend `id` without changing anything (a scan's look).
#[inline(always)]
pub fn peek(svc: &Service, id: u32, now: u64, panic: bool) -> Option<(Verdict, u64)> {
    let st = backend_state(id)?;
    // SAFETY: array element; volatile loads of values other CPUs change.
    let (w, active) = unsafe {
        (
            atomic::load(&raw const (*st).circuit),
            atomic::load(&raw const (*st).active),
        )
    };
    Some((
        logic::verdict(w, active, svc.max_connections, now, panic),
        active,
    ))
}

/// Whether backend `id` may take a new connection; `Ok(word)` with a non-zero word means it is the
/// half-open probe (exactly one connect wins the swap per ejection, however many CPUs try).
#[inline(always)]
pub fn admit(svc: &Service, id: u32, now: u64, panic: bool) -> Result<u64, Ineligible> {
    let Some(st) = backend_state(id) else {
        return Err(Ineligible::Open);
    };
    // SAFETY: array element; volatile loads of values other CPUs change.
    let (w, active) = unsafe {
        (
            atomic::load(&raw const (*st).circuit),
            atomic::load(&raw const (*st).active),
        )
    };
    match logic::verdict(w, active, svc.max_connections, now, panic) {
        Verdict::Take => Ok(0),
        Verdict::Probe(next) => {
            // SAFETY: field of an array element.
            if unsafe { atomic::cas(&raw mut (*st).circuit, w, next) } {
                count(CTR_PROBE);
                Ok(next)
            } else if panic {
                Ok(0)
            } else {
                Err(Ineligible::Open)
            }
        }
        Verdict::Full => Err(Ineligible::Full),
        Verdict::Open => Err(Ineligible::Open),
    }
}

/// Records a failed connection; `probe_word` is the socket's probe word (0 if not a probe).
/// Returns true when it ejected the backend (or re-opened it after a failed probe).
#[inline(always)]
pub fn on_failure(svc: &Service, id: u32, probe_word: u64, now: u64) -> bool {
    let Some(st) = backend_state(id) else {
        return false;
    };
    // SAFETY: fields of an array element, changed atomically only.
    let consecutive = unsafe {
        atomic::add(&raw mut (*st).failures, 1);
        atomic::add(&raw mut (*st).consecutive_failures, 1) + 1
    };
    if svc.consecutive_failures == 0 {
        return false;
    }
    // SAFETY: as above.
    let ejections = unsafe { core::ptr::read_volatile(&raw const (*st).ejections) };
    let until = logic::ejection_ms(svc.base_ejection_ms, svc.max_ejection_ms, ejections);
    if probe_word != 0 {
        // The probe failed: open again, for longer — only if the circuit is still this probe's
        // (it stays counted in `ejected`).
        // SAFETY: as above.
        if unsafe {
            atomic::cas(
                &raw mut (*st).circuit,
                probe_word,
                circuit::open(now, until),
            )
        } {
            bump_ejections(st);
            count(CTR_EJECTION);
            return true;
        }
        return false;
    }
    // SAFETY: as above.
    let w = unsafe { atomic::load(&raw const (*st).circuit) };
    if !circuit::is_closed(w) || consecutive < u64::from(svc.consecutive_failures) {
        return false;
    }
    let Some(ss) = service_state(svc.id) else {
        return false;
    };
    // Envoy's cap, checked and reserved in one step: a CAS on the service's ejected count.
    let mut reserved = false;
    for _ in 0..4 {
        // SAFETY: field of an array element.
        let e = unsafe { atomic::load(&raw const (*ss).ejected) };
        if !logic::may_eject(e, svc.backend_count, u32::from(svc.max_ejection_pct)) {
            count(CTR_EJECTION_SKIPPED_MAX_PCT);
            return false;
        }
        // SAFETY: as above.
        if unsafe { atomic::cas(&raw mut (*ss).ejected, e, e + 1) } {
            reserved = true;
            break;
        }
    }
    if !reserved {
        count(CTR_EJECTION_CONTENDED);
        return false;
    }
    // SAFETY: as above.
    if !unsafe {
        atomic::cas(
            &raw mut (*st).circuit,
            circuit::CLOSED,
            circuit::open(now, until),
        )
    } {
        // Another CPU ejected it first: give the reservation back.
        // SAFETY: as above.
        unsafe { atomic::dec_if_positive(&raw mut (*ss).ejected) };
        return false;
    }
    bump_ejections(st);
    count(CTR_EJECTION);
    true
}

/// The 8-byte word holding `id` (low half) and `ejections` (high half) of a state slot.
#[inline(always)]
#[expect(
    clippy::cast_ptr_alignment,
    reason = "`id` sits at offset 48 of an 8-aligned struct (asserted in mesh-common)"
)]
fn id_word(st: *mut mesh_common::backend::BackendState) -> *mut u64 {
    // SAFETY: `st` is a state slot from a successful array lookup; only its address is taken.
    unsafe { (&raw mut (*st).id).cast::<u64>() }
}

#[inline(always)]
fn bump_ejections(st: *mut mesh_common::backend::BackendState) {
    // SAFETY: `ejections` is a u32 in an array element; the winner of a transition bumps it.
    // The 8-byte word it shares with `id` is changed with one atomic add of `1 << 32`
    // (little-endian: `ejections` is the high half), so `id` can never be disturbed.
    unsafe { atomic::add(id_word(st), 1 << 32) };
}

/// Records an established connection: a success for its handshake. Returns true when it closed
/// the half-open circuit it was the probe of. Other connections count as successes again when
/// they end cleanly ([`on_clean_close`]): a backend that accepts and then resets is still ejected.
#[inline(always)]
pub fn on_success(
    service_id: u32,
    id: u32,
    probe_word: u64,
    recovered_syn: bool,
    now: u64,
) -> bool {
    let Some(st) = backend_state(id) else {
        return false;
    };
    // SAFETY: fields of an array element, changed atomically only.
    unsafe { atomic::add(&raw mut (*st).total, 1) };
    if recovered_syn {
        // Established after a SYN retransmit counted as a failure: the backend answered.
        // SAFETY: as above.
        unsafe { atomic::store(&raw mut (*st).consecutive_failures, 0) };
    }
    // SAFETY: as above.
    if probe_word != 0
        && unsafe { atomic::cas(&raw mut (*st).circuit, probe_word, circuit::CLOSED) }
    {
        // SAFETY: as above.
        unsafe {
            atomic::store(&raw mut (*st).closed_since_ns, now);
            atomic::store(&raw mut (*st).consecutive_failures, 0);
        }
        if let Some(ss) = service_state(service_id) {
            // SAFETY: field of an array element.
            unsafe { atomic::dec_if_positive(&raw mut (*ss).ejected) };
        }
        count(CTR_RECOVERED);
        return true;
    }
    false
}

/// Records a connection that ended without a reset: a success. `base_ejection_ms` reads the
/// service's setting, only when the backend has past ejections to forget (rarely: the common
/// close reads no configuration).
#[inline(always)]
pub fn on_clean_close(id: u32, now: u64, base_ejection_ms: impl FnOnce() -> Option<u32>) {
    let Some(st) = backend_state(id) else {
        return;
    };
    // SAFETY: fields of an array element.
    unsafe {
        atomic::store(&raw mut (*st).consecutive_failures, 0);
        // Healthy for as long as the last ejection multiplier would last: forget past ejections
        // (Envoy decrements its multiplier each healthy interval instead).
        let ejections = core::ptr::read_volatile(&raw const (*st).ejections);
        if ejections == 0 || !circuit::is_closed(atomic::load(&raw const (*st).circuit)) {
            return;
        }
        let Some(base_ms) = base_ejection_ms() else {
            return;
        };
        if now.saturating_sub(atomic::load(&raw const (*st).closed_since_ns))
            > u64::from(base_ms) * u64::from(ejections) * 1_000_000
        {
            // Reset by subtracting what was read: a concurrent bump is kept, and `id` (the other
            // half of the word) is never touched.
            atomic::add(id_word(st), (u64::from(ejections) << 32).wrapping_neg());
        }
    }
}
