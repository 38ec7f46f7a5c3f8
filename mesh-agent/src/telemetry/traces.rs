//! Spans for gateway requests and tunnel connections, with W3C trace context (`traceparent`) so
//! one trace runs from the gateway through the HBONE tunnel to the destination, exported as OTLP
//! traces over gRPC through the same batching exporter as the logs ([`super::otlp`]).
//!
//! The API the gateway and the proxies call: [`start_span`] with the incoming `traceparent` (or
//! none: a new root), [`ActiveSpan::traceparent`] for the request they send on, then
//! [`ActiveSpan::finish`]. Sampling is parent-based (a sampled parent's children are sampled, an
//! unsampled parent's are not), and roots are sampled by trace id ratio
//! (`--trace-sampling`, default 0.01 = Istio's default 1 %), as OpenTelemetry's
//! `ParentBased(TraceIdRatioBased)`. Unsampled spans still propagate their context.

use std::{
    sync::{Arc, OnceLock},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::KeyValue,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use tracing::info;

use super::otlp::{
    OtlpError, OtlpStats, Sender, batch_loop, channel, kv, kv_int, queue, resource, scope,
};

/// A W3C trace context: which trace, which span, sampled or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Lowercase hex of `bytes`, from a table (a `write!("{b:02x}")` per byte cost the gateway 25
/// formatter calls per request for the `traceparent` it sends on).
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(s: &mut String, bytes: &[u8]) {
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

/// The two lowercase hex digits of each byte value: one lookup per byte written.
const HEX_PAIRS: [[u8; 2]; 256] = {
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < t.len() {
        t[i] = [HEX[i >> 4], HEX[i & 0xf]];
        i += 1;
    }
    t
};

/// Writes the lowercase hex of `bytes` at the start of `out` (twice as long as `bytes`).
fn put_hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

/// A `traceparent` header value, formatted in place: the gateway sends one per request, and a
/// `String` for it was an allocation per request before the header value's own copy.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent([u8; 55]);

impl TraceParent {
    /// The header value's text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written into it (`TraceContext::traceparent`).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl AsRef<[u8]> for TraceParent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::Deref for TraceParent {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<str> for TraceParent {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for TraceParent {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A random id, never all zeros (invalid in W3C). Trace and span ids must be unique, not secret:
/// each thread draws them from its own fast generator (`fastrand`'s wyrand) seeded once from the
/// kernel's CSPRNG, as OpenTelemetry's `RandomIdGenerator` draws from a thread-local `SmallRng`.
/// A `getrandom(2)` per id cost the gateway two system calls per request.
fn random<const N: usize>() -> [u8; N] {
    thread_local! {
        static RNG: std::cell::RefCell<fastrand::Rng> =
            std::cell::RefCell::new(fastrand::Rng::with_seed(os_seed()));
    }
    RNG.with_borrow_mut(|rng| {
        loop {
            let mut out = [0u8; N];
            rng.fill(&mut out);
            if out != [0; N] {
                return out;
            }
        }
    })
}

/// A seed from `getrandom(2)`; should the call fail, the time and the thread id (ids then stay
/// unique per thread, which is all they need).
fn os_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: the pointer and length describe `seed`, which outlives the call.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if usize::try_from(n).is_ok_and(|n| n == seed.len()) {
        return u64::from_ne_bytes(seed);
    }
    let mut h = std::hash::DefaultHasher::new();
    std::hash::Hash::hash(&std::thread::current().id(), &mut h);
    std::hash::Hasher::finish(&h) ^ now_unix_nano()
}

impl TraceContext {
    /// Parses a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`, lower case). Invalid
    /// ones (all-zero ids, version `ff`, wrong lengths) are `None`: the caller starts a new
    /// trace, as the W3C spec says a receiver must.
    #[must_use]
    pub fn parse(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let version = parts.next()?;
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; a later version may add more after them.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        hex_to::<1>(version)?;
        let trace_id = hex_to::<16>(trace).filter(|t| *t != [0; 16])?;
        let span_id = hex_to::<8>(span).filter(|s| *s != [0; 8])?;
        let flags = hex_to::<1>(flags)?[0];
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header value of this context.
    #[must_use]
    pub fn traceparent(&self) -> TraceParent {
        let mut b = [0u8; 55];
        b[..3].copy_from_slice(b"00-");
        put_hex(&mut b[3..35], &self.trace_id);
        b[35] = b'-';
        put_hex(&mut b[36..52], &self.span_id);
        b[52..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        TraceParent(b)
    }

    /// The trace id in hex (what logs print to join them to traces).
    #[must_use]
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The trace id in hex, written where it is displayed (no `String` made).
    #[must_use]
    pub fn trace_id_display(&self) -> impl std::fmt::Display + '_ {
        struct Hex<'a>(&'a [u8]);
        impl std::fmt::Display for Hex<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
        Hex(&self.trace_id)
    }
}

/// `ParentBased(TraceIdRatioBased(ratio))`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    ratio: f64,
}

impl Sampler {
    /// Samples `ratio` (clamped to 0..=1) of new traces.
    #[must_use]
    pub fn new(ratio: f64) -> Self {
        Self {
            ratio: ratio.clamp(0.0, 1.0),
        }
    }

    /// Whether a new trace with this id is sampled: its low 8 bytes below `ratio × 2⁶⁴`, as
    /// OpenTelemetry's `TraceIdRatioBased` (so every service decides alike for one trace id).
    #[must_use]
    pub fn samples(&self, trace_id: &[u8; 16]) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "the ratio's share of the u64 range; rounding moves it by less than 2⁻⁵²"
        )]
        let bound = (self.ratio * u64::MAX as f64) as u64;
        self.ratio >= 1.0 || u64::from_be_bytes(low) < bound
    }
}

/// Client or server side of a hop, or work inside the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
    Internal,
}

/// A span being timed; [`ActiveSpan::finish`] records it (when sampled).
#[derive(Clone, Debug)]
pub struct ActiveSpan {
    context: TraceContext,
    parent_span_id: Option<[u8; 8]>,
    /// Span names are fixed by the code (`gateway`, `hbone connect`): not copied per span.
    name: &'static str,
    kind: Kind,
    /// When it started, on the monotonic clock; the wall clock is read once, when a span is
    /// exported (most are not: sampling), and its start is that minus the span's duration.
    start: Instant,
    attributes: Vec<KeyValue>,
}

fn now_unix_nano() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Starts a span: a child of `parent` (the incoming `traceparent`), or a new root sampled by
/// the installed tracer's ratio (all sampled when none is installed: nothing is exported then).
#[must_use]
pub fn start_span(name: &'static str, kind: Kind, parent: Option<&TraceContext>) -> ActiveSpan {
    start_span_at(name, kind, parent, Instant::now())
}

/// [`start_span`] for a span that began at `start`, a time the caller read already (the
/// gateway's request start): no clock read of its own.
#[must_use]
pub fn start_span_at(
    name: &'static str,
    kind: Kind,
    parent: Option<&TraceContext>,
    start: Instant,
) -> ActiveSpan {
    let (trace_id, sampled, parent_span_id) = if let Some(p) = parent {
        (p.trace_id, p.sampled, Some(p.span_id))
    } else {
        let id = random::<16>();
        let sampled = TRACER.get().is_none_or(|t| t.sampler.samples(&id));
        (id, sampled, None)
    };
    ActiveSpan {
        context: TraceContext {
            trace_id,
            span_id: random::<8>(),
            sampled,
        },
        parent_span_id,
        name,
        kind,
        start,
        attributes: Vec::new(),
    }
}

impl ActiveSpan {
    /// This span's context (its children's parent).
    #[must_use]
    pub fn context(&self) -> &TraceContext {
        &self.context
    }

    /// Whether [`Self::finish`] will export this span (sampled, and a tracer is installed):
    /// callers skip building attributes of a span nobody will see.
    #[must_use]
    pub fn recording(&self) -> bool {
        self.context.sampled && TRACER.get().is_some()
    }

    /// The `traceparent` to send on the next hop.
    #[must_use]
    pub fn traceparent(&self) -> TraceParent {
        self.context.traceparent()
    }

    /// Adds a string attribute (`http.request.method`, `server.address`, …).
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.attributes.push(kv(key, value));
    }

    /// Adds an integer attribute (`http.response.status_code`, byte counts).
    pub fn set_int(&mut self, key: &str, value: u64) {
        self.attributes.push(kv_int(key, value));
    }

    /// Ends the span now (`error`: why it failed) and hands it to the exporter if sampled.
    pub fn finish(self, error: Option<&str>) {
        if let (true, Some(tracer)) = (self.context.sampled, TRACER.get()) {
            tracer.record(self.into_proto(error, now_unix_nano()));
        }
    }

    /// The OTLP span, ending now, which is `end_unix_nano` on the wall clock (its start is
    /// that minus the time since [`start_span`], saturating at 0).
    #[must_use]
    pub fn into_proto(self, error: Option<&str>, end_unix_nano: u64) -> Span {
        let took = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let start_unix_nano = end_unix_nano.saturating_sub(took);
        Span {
            trace_id: self.context.trace_id.to_vec(),
            span_id: self.context.span_id.to_vec(),
            parent_span_id: self.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            flags: u32::from(self.context.sampled),
            name: self.name.to_owned(),
            kind: match self.kind {
                Kind::Server => SpanKind::Server,
                Kind::Client => SpanKind::Client,
                Kind::Internal => SpanKind::Internal,
            } as i32,
            start_time_unix_nano: start_unix_nano,
            end_time_unix_nano: end_unix_nano,
            attributes: self.attributes,
            status: Some(match error {
                Some(e) => Status {
                    message: e.to_owned(),
                    code: StatusCode::Error as i32,
                },
                None => Status {
                    message: String::new(),
                    code: StatusCode::Unset as i32,
                },
            }),
            ..Span::default()
        }
    }
}

/// The process's tracer: sampler and exporter.
#[derive(Debug)]
pub struct Tracer {
    sampler: Sampler,
    tx: Sender<Span>,
    stats: Arc<OtlpStats>,
}

static TRACER: OnceLock<Tracer> = OnceLock::new();

impl Tracer {
    /// Starts the span exporter towards `endpoint`.
    pub fn start(
        endpoint: &str,
        node: &str,
        sampling: f64,
        stats: Arc<OtlpStats>,
    ) -> Result<Self, OtlpError> {
        let client = TraceServiceClient::new(channel(endpoint)?);
        let (tx, rx) = queue();
        let resource = resource(node);
        info!(endpoint, sampling, "exporting spans over OTLP/gRPC");
        let task_stats = Arc::clone(&stats);
        tokio::spawn(async move {
            batch_loop(rx, &task_stats.traces, "traces", |spans| {
                let mut client = client.clone();
                let request = ExportTraceServiceRequest {
                    resource_spans: vec![ResourceSpans {
                        resource: Some(resource.clone()),
                        scope_spans: vec![ScopeSpans {
                            scope: Some(scope("mesh-agent")),
                            spans: spans.to_vec(),
                            ..ScopeSpans::default()
                        }],
                        ..ResourceSpans::default()
                    }],
                };
                async move { client.export(request).await.map(|_| ()) }
            })
            .await;
        });
        Ok(Self {
            sampler: Sampler::new(sampling),
            tx,
            stats,
        })
    }

    /// Makes this the process's tracer (`false`: one was installed already).
    pub fn install(self) -> bool {
        TRACER.set(self).is_ok()
    }

    /// Queues a finished span (never waits; a full queue drops it, counted).
    pub fn record(&self, span: Span) {
        if !self.tx.push(span) {
            self.stats
                .traces
                .dropped_queue_full
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_across_calls_and_threads_and_never_zero() {
        let draw = || (0..10_000).map(|_| random::<8>()).collect::<Vec<_>>();
        let mut all: Vec<[u8; 8]> = std::thread::scope(|s| {
            let others: Vec<_> = (0..3).map(|_| s.spawn(draw)).collect();
            let mut v = draw();
            for o in others {
                v.extend(o.join().unwrap());
            }
            v
        });
        assert!(all.iter().all(|id| *id != [0; 8]));
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a span id repeated");
    }

    #[test]
    fn traceparent_parses_formats_and_refuses_what_w3c_says_is_invalid() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(tp).unwrap();
        assert!(c.sampled);
        assert_eq!(c.traceparent(), tp);
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(
            !TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .sampled
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        // A later version may carry more fields after the four it shares with 00.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn children_keep_the_trace_and_the_decision_and_roots_sample_by_ratio() {
        let parent =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        let child = start_span("tunnel", Kind::Client, Some(&parent));
        assert_eq!(child.context().trace_id, parent.trace_id);
        assert_ne!(child.context().span_id, parent.span_id);
        assert!(
            !child.context().sampled,
            "an unsampled parent's child is unsampled"
        );
        let span = child.into_proto(Some("refused"), 0);
        assert_eq!(span.parent_span_id, parent.span_id.to_vec());
        assert_eq!(span.status.unwrap().code, StatusCode::Error as i32);
        let (all, none, tenth) = (Sampler::new(1.0), Sampler::new(0.0), Sampler::new(0.1));
        let ids: Vec<[u8; 16]> = (0..10_000).map(|_| random::<16>()).collect();
        assert!(ids.iter().all(|i| all.samples(i)));
        assert!(!ids.iter().any(|i| none.samples(i)));
        let n = ids.iter().filter(|i| tenth.samples(i)).count();
        assert!((800..1200).contains(&n), "{n} of 10,000 at 10 %");
    }
}
