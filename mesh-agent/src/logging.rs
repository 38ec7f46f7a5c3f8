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

// ---------------------------------------------------------------------------------------------
// Access lines: formatted on the caller's thread into a buffer of its own, written by a flush
// thread (Envoy's access-log file: workers append to a buffer, a flush thread writes it every
// `--file-flush-interval-msec` or when it passes 64 KiB).

/// A buffer is handed to the flush thread once it holds this much. Envoy's `min_flush_size` is
/// 64 KiB; at the gateway's 20,000+ lines/s (~9 MB/s) that woke the flush thread 140 times a
/// second, each wake-up preempting a worker on a busy machine; 256 KiB is ~35 a second.
pub const ACCESS_FLUSH_BYTES: usize = 256 * 1024;
/// Buffered lines are written at the latest this long after the first of them. Envoy's default
/// is 10 s; lines a second old are what `kubectl logs -f` users expect, and an idle agent's
/// flush thread sleeps (it wakes only when a buffer gets its first line).
pub const ACCESS_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
/// Most bytes one buffer holds while stdout does not take them (a stalled log reader). Past
/// it new lines are dropped and counted (`mesh_access_log_dropped_total{reason="buffer_full"}`)
/// rather than blocking a gateway worker, or the flow reader, on a pipe: traffic matters more
/// than its log. Envoy's buffer has no bound (memory grows until the writes resume); this one
/// trades the lines past 8 MiB per buffer for a bounded memory.
pub const ACCESS_BUFFER_MAX: usize = 8 * 1024 * 1024;
/// Room past the flush size reserved up front, so the line that crosses it does not regrow.
const ACCESS_LINE_ROOM: usize = 16 * 1024;
/// A buffer's capacity kept after a flush (a burst's large allocation is given back).
const ACCESS_BUFFER_KEEP: usize = 1024 * 1024;

/// What the access-log sink did, exported as `mesh_access_log_*`.
#[derive(Debug, Default)]
pub struct AccessStats {
    /// Lines appended to a buffer, counted when their buffer is written (so up to the flush
    /// interval late).
    pub lines: std::sync::atomic::AtomicU64,
    /// Lines not appended: their buffer was at [`ACCESS_BUFFER_MAX`].
    pub dropped_buffer_full: std::sync::atomic::AtomicU64,
    /// Lines lost because writing them failed (stdout closed).
    pub dropped_write_failed: std::sync::atomic::AtomicU64,
    /// Writes made (each a whole buffer of lines).
    pub writes: std::sync::atomic::AtomicU64,
}

/// The output of access lines: registered buffers, the flush thread and its wake-up.
pub struct AccessSink {
    shared: std::sync::Arc<SinkShared>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

struct SinkShared {
    buffers: std::sync::Mutex<Vec<std::sync::Weak<AccessBuffer>>>,
    /// Held for a whole flush pass, so one buffer's swapped-out lines are written before the
    /// next pass (or a drop's own write) takes more of its lines: order per buffer is kept.
    out: std::sync::Mutex<Box<dyn std::io::Write + Send>>,
    wake: std::sync::Mutex<Wake>,
    cv: std::sync::Condvar,
    interval: std::time::Duration,
    /// Most bytes one buffer holds ([`ACCESS_BUFFER_MAX`] in the process's sink).
    max: usize,
    stats: std::sync::Arc<AccessStats>,
}

#[derive(Default)]
struct Wake {
    /// A buffer got its first line since the last pass.
    pending: bool,
    /// A buffer passed [`ACCESS_FLUSH_BYTES`]: write now, without waiting for the interval.
    urgent: bool,
    stop: bool,
}

/// One writer's buffer of access lines (a gateway worker's thread, the agent's flow reader):
/// its lines are written in the order they were appended, whole.
pub struct AccessBuffer {
    lines: std::sync::Mutex<Pending>,
    /// The other half of a double buffer: the flush thread swaps it with `lines.bytes` and
    /// writes it, so both keep their capacity. A fresh `Vec` per flush made the writer grow its
    /// buffer from nothing every cycle — copies and, past malloc's mmap threshold, page faults
    /// on new pages.
    spare: std::sync::Mutex<Vec<u8>>,
    shared: std::sync::Arc<SinkShared>,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    count: u64,
    /// The last line's second, formatted once per second rather than once per line.
    stamp: Stamp,
}

/// `YYYY-MM-DDTHH:MM:SS.` of one Unix second.
#[derive(Default)]
struct Stamp {
    second: u64,
    prefix: Vec<u8>,
}

impl Stamp {
    /// Appends `"YYYY-MM-DDTHH:MM:SS.uuuuuuZ"` (RFC 3339, microseconds: what `tracing`'s JSON
    /// timestamps looked like) for now.
    fn write(&mut self, out: &mut Vec<u8>) {
        let now = std::time::SystemTime::now();
        let since = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        if self.prefix.is_empty() || since.as_secs() != self.second {
            use std::io::Write as _;
            self.second = since.as_secs();
            self.prefix.clear();
            let _ = write!(self.prefix, "{}", humantime::format_rfc3339_seconds(now));
            // `…SSZ` → `…SS.`
            self.prefix.pop();
            self.prefix.push(b'.');
        }
        out.push(b'"');
        out.extend_from_slice(&self.prefix);
        let micros = since.subsec_micros();
        let mut digits = [b'0'; 6];
        let mut v = micros;
        for d in digits.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out.extend_from_slice(&digits);
        out.extend_from_slice(b"Z\"");
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AccessSink {
    /// A sink writing to `out` at least every `interval`, buffers holding at most `max` bytes;
    /// its flush thread started.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn new(
        out: Box<dyn std::io::Write + Send>,
        interval: std::time::Duration,
        max: usize,
    ) -> std::io::Result<Self> {
        let shared = std::sync::Arc::new(SinkShared {
            buffers: std::sync::Mutex::default(),
            out: std::sync::Mutex::new(out),
            wake: std::sync::Mutex::default(),
            cv: std::sync::Condvar::new(),
            interval,
            max,
            stats: std::sync::Arc::default(),
        });
        let s = std::sync::Arc::clone(&shared);
        let flusher = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || s.flush_loop())?;
        Ok(Self {
            shared,
            flusher: Some(flusher),
        })
    }

    /// A new buffer of this sink (one per writer: lines of one buffer keep their order).
    #[must_use]
    pub fn buffer(&self) -> std::sync::Arc<AccessBuffer> {
        let b = std::sync::Arc::new(AccessBuffer {
            lines: std::sync::Mutex::new(Pending {
                bytes: Vec::with_capacity(ACCESS_FLUSH_BYTES + ACCESS_LINE_ROOM),
                ..Pending::default()
            }),
            spare: std::sync::Mutex::new(Vec::with_capacity(ACCESS_FLUSH_BYTES + ACCESS_LINE_ROOM)),
            shared: std::sync::Arc::clone(&self.shared),
        });
        let mut all = lock(&self.shared.buffers);
        all.retain(|w| w.strong_count() > 0);
        all.push(std::sync::Arc::downgrade(&b));
        b
    }

    /// Writes every buffered line now (the drain and exit paths call it).
    pub fn flush(&self) {
        self.shared.flush_all();
    }

    /// What the sink did.
    #[must_use]
    pub fn stats(&self) -> &std::sync::Arc<AccessStats> {
        &self.shared.stats
    }
}

impl Drop for AccessSink {
    /// Stops the flush thread after its last pass: nothing buffered is lost.
    fn drop(&mut self) {
        lock(&self.shared.wake).stop = true;
        self.shared.cv.notify_one();
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
        self.shared.flush_all();
    }
}

impl SinkShared {
    fn notify(&self, urgent: bool) {
        let mut w = lock(&self.wake);
        w.pending = true;
        w.urgent |= urgent;
        drop(w);
        self.cv.notify_one();
    }

    fn flush_loop(&self) {
        let mut w = lock(&self.wake);
        loop {
            while !(w.pending || w.stop) {
                w = self
                    .cv
                    .wait(w)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            // Let lines gather for the interval, unless a buffer filled up or the sink stops.
            if !(w.urgent || w.stop) {
                w = self
                    .cv
                    .wait_timeout_while(w, self.interval, |w| !(w.urgent || w.stop))
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            let stop = w.stop;
            w.pending = false;
            w.urgent = false;
            drop(w);
            self.flush_all();
            if stop {
                return;
            }
            w = lock(&self.wake);
        }
    }

    fn flush_all(&self) {
        let buffers: Vec<_> = lock(&self.buffers)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        let mut out = lock(&self.out);
        // By reference: a buffer whose writer has gone meanwhile is dropped here last, after
        // `out` is released — its `Drop` writes what it holds through `out` itself.
        for b in &buffers {
            let mut spare = lock(&b.spare);
            let count = {
                let mut p = lock(&b.lines);
                if p.bytes.is_empty() {
                    continue;
                }
                std::mem::swap(&mut p.bytes, &mut *spare);
                std::mem::take(&mut p.count)
            };
            self.write(&mut **out, &spare, count);
            spare.clear();
            // A burst's large allocation (stdout stalled) is given back.
            spare.shrink_to(ACCESS_BUFFER_KEEP);
        }
        let _ = out.flush();
        drop(out);
        drop(buffers);
    }

    fn write(&self, out: &mut dyn std::io::Write, bytes: &[u8], count: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        // Lines are counted here, a buffer at a time, not per line by the writers: one
        // counter shared by the gateway's workers moved its cache line between the CPUs on
        // every request.
        self.stats.lines.fetch_add(count, Relaxed);
        self.stats.writes.fetch_add(1, Relaxed);
        if out.write_all(bytes).is_err() {
            self.stats.dropped_write_failed.fetch_add(count, Relaxed);
        }
    }
}

impl AccessBuffer {
    /// Appends one line: `{"timestamp":…,"level":"INFO","target":"mesh_access","message":MESSAGE,
    /// FIELDS…}` — the keys `tracing`'s flat JSON gave these lines before — with the fields
    /// `fields` writes. A full buffer drops the line and counts it.
    pub fn line(&self, message: &str, fields: impl FnOnce(&mut AccessLine<'_>)) {
        self.append(|bytes| {
            let mut line = AccessLine {
                out: bytes,
                first: false,
            };
            line.str("message", message);
            fields(&mut line);
            bytes.push(b'}');
        });
    }

    /// Appends a line whose message and fields are already a JSON object (from
    /// [`AccessLine::object`], which also serves the OTLP copy of the same record), behind the
    /// line's timestamp, level and target.
    pub fn line_object(&self, object: &[u8]) {
        debug_assert!(object.starts_with(b"{\"") && object.ends_with(b"}"));
        self.append(|bytes| {
            bytes.push(b',');
            bytes.extend_from_slice(object.get(1..).unwrap_or_default());
        });
    }

    /// Appends `{"timestamp":…,"level":"INFO","target":…`, what `rest` writes, and a newline;
    /// or drops the line (counted) when the buffer is full.
    fn append(&self, rest: impl FnOnce(&mut Vec<u8>)) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut p = lock(&self.lines);
        let before = p.bytes.len();
        if before >= self.shared.max {
            drop(p);
            self.shared.stats.dropped_buffer_full.fetch_add(1, Relaxed);
            return;
        }
        let Pending { bytes, stamp, .. } = &mut *p;
        bytes.extend_from_slice(b"{\"timestamp\":");
        stamp.write(bytes);
        let mut line = AccessLine {
            out: bytes,
            first: false,
        };
        line.raw("level", "INFO");
        line.raw("target", ACCESS_TARGET);
        rest(bytes);
        bytes.push(b'\n');
        p.count += 1;
        let after = p.bytes.len();
        drop(p);
        if before == 0 || (before < ACCESS_FLUSH_BYTES && after >= ACCESS_FLUSH_BYTES) {
            self.shared.notify(after >= ACCESS_FLUSH_BYTES);
        }
    }
}

impl Drop for AccessBuffer {
    /// A writer that ends (a worker thread, the flow task) leaves no line behind.
    fn drop(&mut self) {
        let held = self
            .lines
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !held.bytes.is_empty() {
            let mut out = lock(&self.shared.out);
            self.shared.write(&mut **out, &held.bytes, held.count);
            let _ = out.flush();
        }
    }
}

/// The fields of one access line, written as JSON straight into the buffer (no `String` or
/// `serde_json::Value` per field, as `tracing`'s JSON formatter made).
pub struct AccessLine<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> AccessLine<'a> {
    /// Writes `{` the fields `fields` adds `}` to `out`: one record's JSON object, without
    /// the access line's timestamp, level and target.
    pub fn object(out: &'a mut Vec<u8>, fields: impl FnOnce(&mut AccessLine<'_>)) {
        let mut line = AccessLine { out, first: true };
        fields(&mut line);
        if line.first {
            line.out.push(b'{');
        }
        line.out.push(b'}');
    }

    #[inline]
    fn key(&mut self, key: &str) {
        // Keys are the code's own constants: plain ASCII, nothing to escape.
        self.out
            .extend_from_slice(if self.first { b"{\"" } else { b",\"" });
        self.first = false;
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A string field.
    #[inline]
    pub fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        self.out.push(b'"');
        escape_into(self.out, value);
        self.out.push(b'"');
    }

    /// A string field from anything `Display` (addresses, names), formatted in place.
    #[inline]
    pub fn display(&mut self, key: &str, value: impl std::fmt::Display) {
        use std::fmt::Write as _;
        self.key(key);
        self.out.push(b'"');
        let _ = write!(Escaper(self.out), "{value}");
        self.out.push(b'"');
    }

    /// A string field the code itself guarantees needs no escaping (a constant, an HTTP
    /// method token); debug builds check it.
    #[inline]
    pub fn raw(&mut self, key: &str, value: &str) {
        debug_assert!(
            !value.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20),
            "{value:?} needs escaping"
        );
        self.key(key);
        self.out.push(b'"');
        self.out.extend_from_slice(value.as_bytes());
        self.out.push(b'"');
    }

    /// A string field from a `Display` whose text never needs escaping (addresses, numbers,
    /// hex ids): written without the escaping pass.
    #[inline]
    pub fn display_raw(&mut self, key: &str, value: impl std::fmt::Display) {
        use std::io::Write as _;
        self.key(key);
        let _ = write!(self.out, "\"{value}\"");
    }

    /// A duration in milliseconds with microsecond precision (`12.345`): a JSON number made
    /// with integer arithmetic, no float formatting.
    #[inline]
    pub fn millis(&mut self, key: &str, value: std::time::Duration) {
        self.key(key);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        push_u64(self.out, micros / 1000);
        let frac = micros % 1000;
        self.out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }

    /// An unsigned integer field.
    #[inline]
    pub fn u64(&mut self, key: &str, value: u64) {
        self.key(key);
        push_u64(self.out, value);
    }

    /// A signed integer field.
    #[inline]
    pub fn i64(&mut self, key: &str, value: i64) {
        self.key(key);
        if value < 0 {
            self.out.push(b'-');
        }
        push_u64(self.out, value.unsigned_abs());
    }

    /// A number field (`null` if not finite, as JSON has no NaN).
    pub fn f64(&mut self, key: &str, value: f64) {
        self.key(key);
        let _ = serde_json::to_writer(&mut *self.out, &value);
    }

    /// A socket address as a string field (`10.0.0.1:8080`, `[::1]:8080`); IPv4, the usual
    /// case, written digit by digit rather than through `fmt` (padding, a `Formatter` per
    /// octet): a gateway access line has two of them.
    #[inline]
    pub fn socket_addr(&mut self, key: &str, value: std::net::SocketAddr) {
        match value {
            std::net::SocketAddr::V4(a) => {
                self.key(key);
                self.out.push(b'"');
                push_ipv4(self.out, *a.ip());
                self.out.push(b':');
                push_u64(self.out, u64::from(a.port()));
                self.out.push(b'"');
            }
            std::net::SocketAddr::V6(_) => self.display_raw(key, value),
        }
    }

    /// An IP address as a string field (`10.0.0.1`, `::1`); IPv4 digit by digit, as
    /// [`Self::socket_addr`].
    #[inline]
    pub fn ip(&mut self, key: &str, value: std::net::IpAddr) {
        match value {
            std::net::IpAddr::V4(a) => {
                self.key(key);
                self.out.push(b'"');
                push_ipv4(self.out, a);
                self.out.push(b'"');
            }
            std::net::IpAddr::V6(_) => self.display_raw(key, value),
        }
    }

    /// Bytes as a lowercase hex string field (trace ids).
    #[inline]
    pub fn hex(&mut self, key: &str, value: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.key(key);
        self.out.push(b'"');
        for b in value {
            self.out
                .extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
        self.out.push(b'"');
    }

    /// A string field made of `parts` one after the other (`namespace/name`), each escaped.
    #[inline]
    pub fn str_parts(&mut self, key: &str, parts: &[&str]) {
        self.key(key);
        self.out.push(b'"');
        for p in parts {
            escape_into(self.out, p);
        }
        self.out.push(b'"');
    }
}

/// Appends an IPv4 address in dotted decimal.
#[inline]
fn push_ipv4(out: &mut Vec<u8>, ip: std::net::Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        push_u64(out, u64::from(octet));
    }
}

/// Appends the decimal digits of `v` (`itoa`: no `fmt::Formatter` pass).
#[inline]
fn push_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// JSON string escaping (RFC 8259 §7): quote, backslash and control characters.
fn escape_into(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    if !bytes.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b if b < 0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            b => out.push(b),
        }
    }
}

/// `fmt::Write` into a buffer, JSON-escaping what is written.
struct Escaper<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

/// The process's access-log sink, on stdout (made on first use; written out at exit).
///
/// # Panics
/// If the flush thread cannot be spawned when the first access line is written (the process
/// is out of threads or memory).
pub fn access_sink() -> &'static AccessSink {
    SINK.get_or_init(|| {
        // At exit (`main` returning, `process::exit`) the lines still buffered are written:
        // the flush thread does not outlive the process.
        extern "C" fn at_exit() {
            flush_access_log();
        }
        // SAFETY: registers a plain function; `atexit` only fails when out of memory, and
        // then the explicit flushes (drain, buffer drop) still run.
        unsafe {
            libc::atexit(at_exit);
        }
        // A process that cannot start one thread cannot serve either.
        AccessSink::new(
            Box::new(std::io::stdout()),
            FLUSH_INTERVAL
                .get()
                .copied()
                .unwrap_or(ACCESS_FLUSH_INTERVAL),
            ACCESS_BUFFER_MAX,
        )
        .expect("starting the access-log flush thread")
    })
}

static SINK: std::sync::OnceLock<AccessSink> = std::sync::OnceLock::new();

/// The flush interval the sink starts with ([`set_access_flush_interval`]).
static FLUSH_INTERVAL: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// Sets the access-log flush interval (the agent's `telemetry.accessLogFlushInterval`, the
/// gateway's `--access-log-flush-interval`, both checked above zero where they are parsed).
/// Called once at start, before the first access line; unset: [`ACCESS_FLUSH_INTERVAL`].
pub fn set_access_flush_interval(interval: std::time::Duration) {
    if FLUSH_INTERVAL.set(interval).is_err() || SINK.get().is_some() {
        tracing::warn!("the access-log flush interval was set after the sink started; ignored");
    }
}

/// Writes every buffered access line of the process now (drain, SIGTERM, exit); nothing to do
/// when no line was ever written.
pub fn flush_access_log() {
    if let Some(sink) = SINK.get() {
        sink.flush();
    }
}

/// Appends one access line to the calling thread's buffer of the process's sink (for a
/// thread-per-core worker, its lines in its own order).
pub fn access_line(message: &str, fields: impl FnOnce(&mut AccessLine<'_>)) {
    thread_local! {
        static BUFFER: std::sync::Arc<AccessBuffer> = access_sink().buffer();
    }
    let mut fields = Some(fields);
    let written = BUFFER.try_with(|b| {
        if let Some(f) = fields.take() {
            b.line(message, f);
        }
    });
    // A thread past its thread-locals' destruction: a buffer of its own, written as it drops.
    if written.is_err()
        && let Some(f) = fields
    {
        access_sink().buffer().line(message, f);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex, atomic::Ordering},
        time::{Duration, Instant},
    };

    use super::*;

    /// An output the test reads back; `hold` blocks every write while it is locked (a stalled
    /// log reader).
    #[derive(Clone, Default)]
    struct Out {
        bytes: Arc<Mutex<Vec<u8>>>,
        hold: Arc<Mutex<()>>,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _held = self.hold.lock().unwrap();
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Out {
        fn lines(&self) -> Vec<serde_json::Value> {
            String::from_utf8(self.bytes.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect()
        }
    }

    const HOUR: Duration = Duration::from_hours(1);

    #[test]
    fn lines_are_whole_json_in_order_per_writer_and_none_lost_when_the_sink_stops() {
        let out = Out::default();
        let sink = AccessSink::new(Box::new(out.clone()), HOUR, ACCESS_BUFFER_MAX).unwrap();
        // Four writers on four threads, 2,000 lines each, with values that need escaping.
        std::thread::scope(|s| {
            for w in 0..4u64 {
                let b = sink.buffer();
                s.spawn(move || {
                    for i in 0..2_000u64 {
                        b.line("request complete", |l| {
                            l.u64("writer", w);
                            l.u64("seq", i);
                            l.str("path", "/a\"b\\c\nd\u{1}é");
                            l.display("peer", "127.0.0.1:80");
                            l.f64("duration_ms", 1.5);
                            l.i64("grpc_status", -1);
                        });
                    }
                });
            }
        });
        // Far under the flush size and inside the hour: nothing written before the stop…
        assert!(out.bytes.lock().unwrap().len() < 8_000 * 300);
        let stats = Arc::clone(sink.stats());
        drop(sink);
        // …and everything after it.
        let lines = out.lines();
        assert_eq!(lines.len(), 8_000);
        assert_eq!(stats.lines.load(Ordering::Relaxed), 8_000);
        let mut next = [0u64; 4];
        for l in &lines {
            assert_eq!(l["target"], ACCESS_TARGET, "{l}");
            assert_eq!(l["level"], "INFO", "{l}");
            assert_eq!(l["message"], "request complete", "{l}");
            assert_eq!(l["path"], "/a\"b\\c\nd\u{1}é", "{l}");
            assert_eq!(l["duration_ms"], 1.5, "{l}");
            assert_eq!(l["grpc_status"], -1, "{l}");
            assert!(
                l["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
                "{l}"
            );
            let w = usize::try_from(l["writer"].as_u64().unwrap()).unwrap();
            assert_eq!(l["seq"].as_u64(), Some(next[w]), "writer {w} out of order");
            next[w] += 1;
        }
    }

    #[test]
    fn a_buffer_past_the_flush_size_is_written_without_waiting_for_the_interval() {
        let out = Out::default();
        let sink = AccessSink::new(Box::new(out.clone()), HOUR, ACCESS_BUFFER_MAX).unwrap();
        let b = sink.buffer();
        let mut made = 0usize;
        let deadline = Instant::now() + Duration::from_secs(10);
        // Lines until the flush thread writes (an hour before its interval would).
        while out.writes.load(Ordering::Relaxed) == 0 {
            assert!(
                Instant::now() < deadline,
                "nothing written after {made} lines"
            );
            b.line("x", |l| l.str("pad", &"p".repeat(100)));
            made += 1;
            if made.is_multiple_of(256) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
        let bytes = out.bytes.lock().unwrap().len();
        // One write of at least the flush size, not one write per line.
        assert!(bytes >= ACCESS_FLUSH_BYTES, "{bytes}");
        assert_eq!(out.writes.load(Ordering::Relaxed), 1);
        drop(sink);
        assert_eq!(out.lines().len(), made);
    }

    #[test]
    fn the_interval_writes_a_few_lines_and_a_dropped_writer_leaves_none_behind() {
        let out = Out::default();
        let sink =
            AccessSink::new(Box::new(out.clone()), Duration::from_millis(50), 1 << 20).unwrap();
        let b = sink.buffer();
        b.line("one", |l| l.u64("n", 1));
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.lines().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(out.lines().len(), 1, "written after the interval");
        let slow = AccessSink::new(Box::new(out.clone()), HOUR, ACCESS_BUFFER_MAX).unwrap();
        let b2 = slow.buffer();
        b2.line("two", |l| l.u64("n", 2));
        // A writer that goes away (a worker thread ends) writes what it held.
        drop(b2);
        assert_eq!(out.lines().len(), 2);
        drop((sink, slow));
    }

    #[test]
    fn a_full_buffer_drops_and_counts_instead_of_blocking_the_writer() {
        let out = Out::default();
        let max = 16 * 1024;
        let sink = AccessSink::new(Box::new(out.clone()), HOUR, max).unwrap();
        let b = sink.buffer();
        // stdout stalls: the flush thread blocks in its write.
        let held = out.hold.lock().unwrap();
        let start = Instant::now();
        let mut made = 0u64;
        // Past the flush size (the flush thread takes one buffer and blocks), then past `max`.
        while made < 2_000 {
            b.line("x", |l| l.str("pad", &"p".repeat(100)));
            made += 1;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the writer never waited"
        );
        let stats = Arc::clone(sink.stats());
        let dropped = stats.dropped_buffer_full.load(Ordering::Relaxed);
        assert!(dropped > 0, "a stalled stdout fills the buffer");
        drop(held);
        drop(sink);
        // Lines written + lines dropped = lines made: none lost silently.
        let written = out.lines().len() as u64;
        assert_eq!(written + dropped, made, "{written} + {dropped}");
        assert_eq!(stats.lines.load(Ordering::Relaxed), written);
    }

    #[test]
    fn timestamps_are_rfc3339_micros_and_durations_exact_millis() {
        let out = Out::default();
        let sink = AccessSink::new(Box::new(out.clone()), HOUR, ACCESS_BUFFER_MAX).unwrap();
        let b = sink.buffer();
        let before = std::time::SystemTime::now();
        for _ in 0..3 {
            b.line("x", |l| {
                l.millis("d", Duration::from_micros(12_345));
                l.millis("z", Duration::from_micros(7));
                l.raw("m", "GET");
                l.display_raw("a", "10.0.0.1:80");
            });
        }
        drop(sink);
        for l in out.lines() {
            let t = l["timestamp"].as_str().unwrap();
            assert_eq!(t.len(), "2026-11-30T06:07:10.123456Z".len(), "{t}");
            let at = humantime::parse_rfc3339(t).unwrap();
            let skew = before.duration_since(at).unwrap_or_default();
            assert!(skew < Duration::from_secs(1), "{t}");
            assert_eq!(l["d"], 12.345, "{l}");
            assert_eq!(l["z"], 0.007, "{l}");
            assert_eq!(l["m"], "GET", "{l}");
            assert_eq!(l["a"], "10.0.0.1:80", "{l}");
        }
    }

    #[test]
    fn hand_written_numbers_addresses_and_hex_match_what_fmt_writes() {
        let mut out = Vec::new();
        AccessLine::object(&mut out, |l| {
            for (i, v) in [0, 7, 10, 99, 100, 65_535, u64::MAX]
                .into_iter()
                .enumerate()
            {
                l.u64(&format!("u{i}"), v);
            }
            for (i, v) in [-1, 0, i64::MIN, i64::MAX].into_iter().enumerate() {
                l.i64(&format!("i{i}"), v);
            }
            l.millis("ms", Duration::from_micros(1_234_005));
            l.socket_addr("v4", "10.0.255.1:65535".parse().unwrap());
            l.socket_addr("v4z", "0.0.0.0:0".parse().unwrap());
            l.socket_addr("v6", "[fe80::1]:8080".parse().unwrap());
            l.hex("h", &[0x00, 0x0f, 0xa5, 0xff]);
            l.str_parts("s", &["shop", "/", "we\"b"]);
        });
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        for (i, n) in [0, 7, 10, 99, 100, 65_535, u64::MAX]
            .into_iter()
            .enumerate()
        {
            assert_eq!(v[format!("u{i}")].as_u64(), Some(n), "{v}");
        }
        for (i, n) in [-1, 0, i64::MIN, i64::MAX].into_iter().enumerate() {
            assert_eq!(v[format!("i{i}")].as_i64(), Some(n), "{v}");
        }
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#""ms":1234.005"#), "{text}");
        assert_eq!(v["v4"], "10.0.255.1:65535");
        assert_eq!(v["v4z"], "0.0.0.0:0");
        assert_eq!(v["v6"], "[fe80::1]:8080");
        assert_eq!(v["h"], "000fa5ff");
        assert_eq!(v["s"], "shop/we\"b");
    }

    #[test]
    fn a_failed_write_counts_its_lines() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = AccessSink::new(Box::new(Closed), HOUR, ACCESS_BUFFER_MAX).unwrap();
        let b = sink.buffer();
        for _ in 0..3 {
            b.line("x", |l| l.u64("n", 0));
        }
        sink.flush();
        assert_eq!(sink.stats().dropped_write_failed.load(Ordering::Relaxed), 3);
    }
}
