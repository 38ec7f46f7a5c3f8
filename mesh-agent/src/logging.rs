//! `tracing` set-up: human or JSON output, `RUST_LOG`-style filters, and the `log` bridge that
//! carries kernel-side aya-log messages into the same output.

use tracing_subscriber::{EnvFilter, fmt, fmt::MakeWriter};

/// Installs the global subscriber once, writing to stderr; later calls are ignored.
pub fn init(json: bool) {
    init_with_writer(json, std::io::stderr);
}

/// [`init`] with another destination (tests capture the output this way).
pub fn init_with_writer<W>(json: bool, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    // `try_init` also installs the `log` → `tracing` bridge used by aya-log.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Drains kernel-side aya-log records into `log` (hence `tracing`) whenever the ring has data;
/// runs as its own task, so logging never blocks the data path or the control loop.
pub async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    on_readable("kernel log ring", logger, aya_log::EbpfLogger::flush).await;
}

/// Calls `on_ready` each time the fd of `inner` (a ring buffer) becomes readable, until the
/// runtime stops. The one place that registers a ring with tokio.
pub async fn on_readable<T: std::os::fd::AsRawFd>(
    what: &str,
    inner: T,
    mut on_ready: impl FnMut(&mut T),
) {
    // SAFETY: the `AsyncFd` owns `inner`, hence its fd, for as long as it is registered, so the
    // fd cannot close (or be reused) while tokio watches it.
    let Ok(mut fd) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }) else {
        tracing::warn!("cannot poll the {what}: its events are not read");
        return;
    };
    // The kernel submits quietly (no wakeup) until the ring fills past a threshold, so also
    // drain on a timer.
    let mut tick = tokio::time::interval(RING_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = fd.readable_mut() => {
                let Ok(mut guard) = ready else { return };
                on_ready(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = tick.tick() => on_ready(fd.get_mut()),
        }
    }
}

/// How often rings are drained when the kernel did not wake the reader.
pub const RING_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
