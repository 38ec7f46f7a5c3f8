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
    // SAFETY: the `AsyncFd` owns the logger, hence the ring's fd, for as long as it is
    // registered, so the fd cannot close (or be reused) while tokio watches it.
    let Ok(mut fd) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }) else {
        tracing::warn!("kernel log forwarding unavailable: cannot poll the log ring");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
