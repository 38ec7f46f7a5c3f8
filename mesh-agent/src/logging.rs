//! `tracing` set-up: human or JSON output, `RUST_LOG`-style filters, and the `log` bridge that
//! carries kernel-side aya-log messages into the same output.

use tracing_subscriber::{EnvFilter, fmt, fmt::MakeWriter};

/// Installs the global subscriber once, writing to stderr; later calls are ignored. Connection
/// access logs (target [`ACCESS_TARGET`]) go to stdout as JSON lines instead.
pub fn init(json: bool) {
    init_with_writer(json, std::io::stderr);
}

/// The `tracing` target of connection access logs (`telemetry::access_log`): written as one JSON
/// object per line to stdout, what a fluent-bit/EFK pipeline collects, and never mixed into
/// the agent's own log (ztunnel logs its connections under the target `access` the same way).
pub const ACCESS_TARGET: &str = "mesh_access";

/// [`init`] with another destination for the agent's own log (tests capture the output this way).
pub fn init_with_writer<W>(json: bool, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    use tracing_subscriber::{
        Layer as _, filter::filter_fn, layer::SubscriberExt as _, util::SubscriberInitExt as _,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let own = filter_fn(|m| m.target() != ACCESS_TARGET);
    let main = if json {
        fmt::layer()
            .json()
            .with_writer(writer)
            .with_ansi(false)
            .with_filter(own)
            .boxed()
    } else {
        fmt::layer()
            .with_writer(writer)
            .with_ansi(false)
            .with_filter(own)
            .boxed()
    };
    // Access lines are emitted only when `telemetry.accessLog` is on, so no level filter here:
    // `RUST_LOG` tunes the agent's own log without silencing them.
    let access = fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(std::io::stdout)
        .with_ansi(false)
        .with_filter(filter_fn(|m| m.target() == ACCESS_TARGET));
    // `try_init` also installs the `log` → `tracing` bridge used by aya-log.
    let _ = tracing_subscriber::registry()
        .with(main.with_filter(filter))
        .with(access)
        .try_init();
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
