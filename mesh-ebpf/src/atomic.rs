//! Atomic read-modify-write on map values (BPF `atomic` instructions; needs `-C target-cpu=v3`).

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

/// Subtracts one from `*p` unless it is already zero (a close seen twice must not wrap).
///
/// # Safety
/// As [`add`].
#[inline(always)]
pub unsafe fn dec(p: *mut u64) {
    // SAFETY: the caller's contract.
    unsafe {
        if core::ptr::read_volatile(p) > 0 {
            add(p, u64::MAX);
        }
    }
}

/// Sets `*p` to `new` if it holds `old`; returns whether it did.
///
/// # Safety
/// As [`add`].
#[inline(always)]
pub unsafe fn cas_u32(p: *mut u32, old: u32, new: u32) -> bool {
    // SAFETY: the caller's contract.
    unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
    }
}
