//! Atomic operations on map values (BPF `atomic` instructions; needs `-C target-cpu=v3`): every
//! value another CPU may change is read with a volatile load and changed with one of these.
//!
//! # Safety
//! Every function takes a pointer that must be valid and aligned for its type: callers pass
//! fields of map values returned by a successful lookup.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

/// Adds `v` to `*p` and returns the previous value.
///
/// # Safety
/// `p` must be valid and aligned (see the module docs).
#[inline(always)]
pub unsafe fn add(p: *mut u64, v: u64) -> u64 {
    // SAFETY: the caller's contract.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) }
}

/// Subtracts one from a count the caller itself incremented earlier (so it is at least one on
/// every interleaving, and the subtraction cannot wrap).
///
/// # Safety
/// As [`add`].
#[inline(always)]
pub unsafe fn sub_own(p: *mut u64) {
    // SAFETY: the caller's contract.
    unsafe { add(p, u64::MAX) };
}

/// Subtracts one unless the value is zero, by compare-and-swap (a shared count that the agent may
/// also rewrite). Returns false if the value was zero, or if it kept changing under four tries
/// (the agent's recount repairs that).
///
/// # Safety
/// As [`add`].
#[inline(always)]
pub unsafe fn dec_if_positive(p: *mut u64) -> bool {
    for _ in 0..4 {
        // SAFETY: the caller's contract.
        let v = unsafe { load(p) };
        if v == 0 {
            return false;
        }
        // SAFETY: the caller's contract.
        if unsafe { cas(p, v, v - 1) } {
            return true;
        }
    }
    false
}

/// Sets `*p` to `new` if it holds `old`; returns whether it did.
///
/// # Safety
/// As [`add`].
#[inline(always)]
pub unsafe fn cas(p: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: the caller's contract.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
}

/// One volatile load: the compiler neither tears it nor re-reads it later.
///
/// # Safety
/// As [`add`].
#[inline(always)]
pub unsafe fn load(p: *const u64) -> u64 {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::read_volatile(p) }
}

/// One volatile 8-byte store (an aligned store is single-copy atomic).
///
/// # Safety
/// As [`add`].
#[inline(always)]
pub unsafe fn store(p: *mut u64, v: u64) {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::write_volatile(p, v) };
}
