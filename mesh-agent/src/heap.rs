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

/// `thread.tcache.flush`: the calling thread's cache of freed small objects.
const FLUSH_THREAD_CACHE: &std::ffi::CStr = c"thread.tcache.flush";

/// Hands the objects the calling thread freed and jemalloc still caches for it (its `tcache`,
/// up to a few hundred per size class) back to their arenas, so the pages they sit on can be
/// returned: a thread that just dropped a large model would otherwise keep them until it
/// allocates again or exits, and [`release_free`] cannot purge a page a cache still holds.
pub fn flush_thread_cache() {
    // SAFETY: as in `release_free`: a NUL-terminated name, no values; with jemalloc not the
    // global allocator it flushes jemalloc's own (unused) cache.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            FLUSH_THREAD_CACHE.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// Returns every free page of the heap to the kernel now, instead of after jemalloc's decay
/// time: called after a reconciliation, which frees far more than it keeps (the previous
/// model, the parse), and after a model that was built and not sent is dropped. Flushes the
/// calling thread's cache first ([`flush_thread_cache`]). Also trims glibc's heap, which C
/// code and binaries without jemalloc (the tests) still use.
pub fn release_free() {
    flush_thread_cache();
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
