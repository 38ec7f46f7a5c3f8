//! Shared kernel-side modules of the mesh data path; `main.rs` holds only the thin entry points.
#![no_std]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd/atomic_cxchg: the BPF target has no AtomicU64"
)]
#![expect(
    clippy::inline_always,
    reason = "BPF: inlining keeps the verifier's view of pointers and bounds across helpers"
)]
#![expect(
    clippy::must_use_candidate,
    reason = "kernel helpers return verdicts, not values to keep"
)]

pub mod atomic;
pub mod bypass;
pub mod capture;
pub mod circuit;
pub mod connect;
pub mod events;
pub mod maps;
pub mod report;
pub mod sockops;
pub mod strict;
