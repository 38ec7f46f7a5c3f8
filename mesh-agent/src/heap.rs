//! The agent's heap: jemalloc (the `mesh-agent` binary's global allocator) and handing freed
//! memory back to the kernel after a large model was processed.
//!
//! Why jemalloc: a 10,000-service model is parsed, diffed and replaced on several threads (the
//! Kubernetes source's blocking build, the data-path owner, tokio workers). glibc gives threads
//! their own arenas and returns a freed page to the kernel only when nothing live sits above it
//! in its arena (`malloc_trim` helps only partly), so the agent kept the high-water mark of the
//! initial sync resident. jemalloc returns unused dirty pages on its own (`background_thread`,
//! decaying over `dirty_decay_ms`, 10 s by default) and at once when asked ([`release_free`]).
//! Envoy and ztunnel's istio-proxy build with tcmalloc/jemalloc for the same reason; measured in
//! BENCHMARKS.md ("Session 16").

/// `arena.<i>.purge` for `MALLCTL_ARENAS_ALL` (4096): every arena.
const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";

/// Returns every free page of the heap to the kernel now, instead of after jemalloc's decay
/// time: called after a reconciliation, which frees far more than it keeps (the previous
/// model, the parse). Also trims glibc's heap, which C code and binaries without jemalloc (the
/// tests) still use.
pub fn release_free() {
    // SAFETY: `mallctl` with a NUL-terminated name and no old/new values only runs the purge;
    // with jemalloc not the global allocator it purges jemalloc's own (near-empty) arenas.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
}
