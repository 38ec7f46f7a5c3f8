//! OTLP/gRPC export (issue 11, second part): connection logs — the stdout access line's record
//! ([`super::access_log::object`]) as an OTLP `LogRecord` — and spans ([`super::traces`]),
//! batched to a collector (`--otlp-endpoint http://collector:4317`, `MESH_OTLP_ENDPOINT`,
//! `telemetry.otlpEndpoint`).
//!
//! A connection's record has the access line's JSON object (message and every field) as its
//! string body and a few attributes to index by (`src.workload`, `src.namespace`,
//! `dst.service`, `verdict`): what Istio's OpenTelemetry access-log provider sends (its text
//! format as the body, `labels` as attributes). The JSON is formatted once for both outputs;
//! a record with every field as an attribute cost the agent about 40 allocations and the
//! collector a decode of 19 nested key/values per connection.
//!
//! Never blocks the flow path: records go into a bounded queue ([`QUEUE`]); a full queue drops
//! the record and counts it. The export task makes the request when it sends the batch (a
//! retry makes it again), so no copy of a batch is kept for retries. One task sends batches of up to [`BATCH`]
//! records (or what arrived within [`FLUSH`]), each export retried [`RETRIES`] times with
//! doubling backoff; a batch that still fails is dropped and counted. The OpenTelemetry SDK's
//! `BatchLogProcessor` makes the same choices (512 per batch, 1 s delay, drop when full) with a
//! 2,048 queue; ours is twice that, because a node's flows come at thousands a second (2,048 is
//! a quarter second at 8,000 connections/s: little slack for one slow export and its retries).
//!
//! Connection logs are encoded as protobuf when the flow is seen ([`ConnectionLog::new`]) and
//! sent as bytes (`PreEncoded`): the export task builds no `LogRecord`s for prost.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceResponse,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    logs::v1::{LogRecord, SeverityNumber},
    resource::v1::Resource,
};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};
use tracing::{info, warn};

use super::labels::{UNKNOWN, fqdn_parts};
use crate::flows::FlowRecord;

/// Records waiting for export; past it new records are dropped (counted).
pub const QUEUE: usize = 4096;
/// Most records per export request.
pub const BATCH: usize = 512;
/// A batch is sent at the latest this long after its first record.
pub const FLUSH: Duration = Duration::from_secs(1);
/// Retries of a failed export (then the batch is dropped, counted).
pub const RETRIES: u32 = 3;
/// First retry delay (doubled per retry).
pub const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait for one export answer.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// An endpoint the exporter cannot use.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("OTLP endpoint {endpoint:?} is not a URL tonic can dial: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
}

/// What the exporter of one signal did.
#[derive(Debug, Default)]
pub struct SignalStats {
    pub exported: AtomicU64,
    pub dropped_queue_full: AtomicU64,
    pub dropped_export_failed: AtomicU64,
    pub retries: AtomicU64,
}

/// What the exporters did (exported as `mesh_otlp_*`).
#[derive(Debug, Default)]
pub struct OtlpStats {
    pub logs: SignalStats,
    pub traces: SignalStats,
}

impl Collector for OtlpStats {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let signals = [("logs", &self.logs), ("traces", &self.traces)];
        super::counter_family(
            &mut enc,
            "mesh_otlp_exported",
            "Records the OTLP collector accepted.",
            signals.map(|(n, s)| ([("signal", n)], load(&s.exported))),
        )?;
        super::counter_family(
            &mut enc,
            "mesh_otlp_dropped",
            "Records dropped: the export queue was full, or the export failed after its retries.",
            signals.into_iter().flat_map(|(n, s)| {
                [
                    (
                        [("signal", n), ("reason", "queue_full")],
                        load(&s.dropped_queue_full),
                    ),
                    (
                        [("signal", n), ("reason", "export_failed")],
                        load(&s.dropped_export_failed),
                    ),
                ]
            }),
        )?;
        super::counter_family(
            &mut enc,
            "mesh_otlp_retries",
            "Export attempts retried after a failure.",
            signals.map(|(n, s)| ([("signal", n)], load(&s.retries))),
        )
    }
}

/// A lazily connected channel to `endpoint`.
pub(crate) fn channel(endpoint: &str) -> Result<tonic::transport::Channel, OtlpError> {
    Ok(tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|source| OtlpError::Endpoint {
            endpoint: endpoint.to_owned(),
            source,
        })?
        .connect_timeout(EXPORT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT)
        .connect_lazy())
}

/// The resource every record of this agent carries.
pub(crate) fn resource(node: &str) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", "mesh-agent"),
            kv("k8s.node.name", node),
            kv("service.version", env!("CARGO_PKG_VERSION")),
        ],
        ..Resource::default()
    }
}

/// The instrumentation scope of this agent's records.
pub(crate) fn scope(name: &str) -> InstrumentationScope {
    InstrumentationScope {
        name: name.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..InstrumentationScope::default()
    }
}

/// The way to the export task; cheap to clone.
#[derive(Clone, Debug)]
pub struct OtlpLogs {
    tx: Sender<ConnectionLog>,
    stats: Arc<OtlpStats>,
}

impl OtlpLogs {
    /// Starts the export task towards `endpoint` (connects lazily, so a collector that starts
    /// later is reached); `node` names this agent in the resource.
    pub fn start(endpoint: &str, node: &str, stats: Arc<OtlpStats>) -> Result<Self, OtlpError> {
        let grpc = tonic::client::Grpc::new(channel(endpoint)?);
        let (tx, rx) = queue();
        let head = BatchHead::new(&resource(node), &scope("mesh-agent/connections"));
        info!(endpoint, "exporting connection logs over OTLP/gRPC");
        let task_stats = Arc::clone(&stats);
        tokio::spawn(async move {
            batch_loop(rx, &task_stats.logs, "logs", |records| {
                let mut grpc = grpc.clone();
                // The records are protobuf already: the request is their bytes behind the
                // resource and scope, with no `LogRecord` built or encoded per record here.
                let request = head.request(records);
                async move { export_logs(&mut grpc, request).await }
            })
            .await;
        });
        Ok(Self { tx, stats })
    }

    /// Queues the record of a finished connection whose access-record JSON is `object`
    /// ([`super::access_log::object`]); never waits: a full queue drops it (counted).
    pub fn record(&self, flow: &FlowRecord, object: &[u8]) {
        if !self.tx.push(ConnectionLog::new(flow, object)) {
            self.stats
                .logs
                .dropped_queue_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `LogsService/Export` with an encoded request (what the generated client's `export` does,
/// with [`PreEncoded`] instead of prost's codec).
async fn export_logs(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    request: bytes::Bytes,
) -> Result<(), tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
    );
    let mut req = tonic::Request::new(request);
    req.extensions_mut().insert(tonic::GrpcMethod::new(
        "opentelemetry.proto.collector.logs.v1.LogsService",
        "Export",
    ));
    grpc.unary(req, path, PreEncoded).await.map(|_| ())
}

/// The gRPC codec of the logs export: the request goes out as the bytes it already is; the
/// answer is decoded by prost.
#[derive(Clone, Copy, Debug, Default)]
struct PreEncoded;

/// Writes an encoded message as it is.
#[derive(Clone, Copy, Debug, Default)]
struct BytesEncoder;

impl tonic::codec::Encoder for BytesEncoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Codec for PreEncoded {
    type Encode = bytes::Bytes;
    type Decode = ExportLogsServiceResponse;
    type Encoder = BytesEncoder;
    type Decoder = tonic_prost::ProstDecoder<ExportLogsServiceResponse>;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// What every export request of this agent's connection logs starts with: the `resource`
/// field of `ResourceLogs` and the `scope` field of `ScopeLogs`, encoded once.
#[derive(Debug)]
struct BatchHead {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl BatchHead {
    fn new(resource: &Resource, scope: &InstrumentationScope) -> Self {
        let field = |tag: u32, m: &dyn Fn(&mut Vec<u8>)| {
            let mut body = Vec::new();
            m(&mut body);
            let mut out = Vec::with_capacity(body.len() + 6);
            len_field(&mut out, tag, body.len());
            out.extend_from_slice(&body);
            out
        };
        Self {
            resource: field(1, &|b| prost::Message::encode_raw(resource, b)),
            scope: field(1, &|b| prost::Message::encode_raw(scope, b)),
        }
    }

    /// `ExportLogsServiceRequest { resource_logs: [ResourceLogs { resource, scope_logs:
    /// [ScopeLogs { scope, log_records }] }] }`, encoded: byte for byte what prost makes of it
    /// (a test holds that).
    fn request(&self, records: &[ConnectionLog]) -> bytes::Bytes {
        let records_len: usize = records.iter().map(|r| field_len(r.encoded.len())).sum();
        let scope_logs = self.scope.len() + records_len;
        let resource_logs = self.resource.len() + field_len(scope_logs);
        let mut out = Vec::with_capacity(field_len(resource_logs));
        len_field(&mut out, 1, resource_logs);
        out.extend_from_slice(&self.resource);
        len_field(&mut out, 2, scope_logs);
        out.extend_from_slice(&self.scope);
        for r in records {
            len_field(&mut out, 2, r.encoded.len());
            out.extend_from_slice(&r.encoded);
        }
        out.into()
    }
}

/// Bytes of a length-delimited field with a one-byte key (tags below 16) and `len` bytes.
fn field_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// The key and length of a length-delimited field (tag below 16); its bytes follow.
fn len_field(out: &mut Vec<u8>, tag: u32, len: usize) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(len as u64, out);
}

/// A length-delimited string field (tag below 16).
fn str_field(out: &mut Vec<u8>, tag: u32, s: &str) {
    len_field(out, tag, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// An `AnyValue { string_value: s }` field (tag below 16).
fn any_string_field(out: &mut Vec<u8>, tag: u32, s: &str) {
    len_field(out, tag, field_len(s.len()));
    str_field(out, 1, s);
}

/// A `KeyValue { key, value: AnyValue { string_value } }` as an `attributes` field (6), the
/// string made of `parts` one after the other (a service's FQDN without a `String` for it).
fn attribute(out: &mut Vec<u8>, key: &str, parts: &[&str]) {
    let value: usize = parts.iter().map(|p| p.len()).sum();
    len_field(out, 6, field_len(key.len()) + field_len(field_len(value)));
    str_field(out, 1, key);
    len_field(out, 2, field_len(value));
    len_field(out, 1, value);
    for p in parts {
        out.extend_from_slice(p.as_bytes());
    }
}

/// A fixed64 field (tag below 16), skipped at 0 as prost does.
fn fixed64_field(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        prost::encoding::encode_key(tag, prost::encoding::WireType::SixtyFourBit, out);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn kv(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

pub(crate) fn kv_int(key: &str, value: u64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::IntValue(value.cast_signed())),
        }),
        ..KeyValue::default()
    }
}

/// A finished connection waiting for export: its OTLP `LogRecord`, encoded when the flow is
/// seen — the time, the access record's JSON as the body, and the attributes to index by.
/// Encoding here (one pass, the JSON copied once) instead of keeping the names and building a
/// `LogRecord` per record for prost in the export task spared the agent ≈ 10 allocations, a
/// copy of the body and prost's length pass per connection (BENCHMARKS.md, telemetry,
/// session 19).
#[derive(Clone, Debug)]
pub struct ConnectionLog {
    encoded: Vec<u8>,
}

impl ConnectionLog {
    /// The record of `flow`, whose access-record JSON is `object`.
    #[must_use]
    pub fn new(flow: &FlowRecord, object: &[u8]) -> Self {
        // The object is made of `&str`s and ASCII: valid UTF-8, checked (the fast, vectorised
        // check) as a protobuf string must be.
        let body = std::str::from_utf8(object).map_or_else(
            |_| String::from_utf8_lossy(object),
            std::borrow::Cow::Borrowed,
        );
        let src = flow.source.as_deref();
        let service = flow
            .service
            .as_deref()
            .map_or([UNKNOWN, "", "", "", ""], fqdn_parts);
        let mut out = Vec::with_capacity(body.len() + 160);
        // `LogRecord` fields in prost's order (by tag); zero numbers are left out as prost does.
        fixed64_field(&mut out, 1, flow.time_unix_nano);
        prost::encoding::int32::encode(2, &(SeverityNumber::Info as i32), &mut out);
        str_field(&mut out, 3, "INFO");
        any_string_field(&mut out, 5, &body);
        attribute(
            &mut out,
            "src.workload",
            &[src.map_or(UNKNOWN, |p| p.name.as_str())],
        );
        attribute(
            &mut out,
            "src.namespace",
            &[src.map_or(UNKNOWN, |p| p.namespace.as_str())],
        );
        attribute(&mut out, "dst.service", &service);
        attribute(&mut out, "verdict", &[flow.verdict()]);
        fixed64_field(&mut out, 11, flow.time_unix_nano);
        Self { encoded: out }
    }

    /// The OTLP record, decoded (tests, and anyone who wants to look at it).
    ///
    /// # Errors
    /// Never for a record [`Self::new`] made.
    pub fn decode(&self) -> Result<LogRecord, prost::DecodeError> {
        prost::Message::decode(self.encoded.as_slice())
    }
}

/// The producers' side of an export queue ([`queue`]); cheap to clone. The export task ends
/// when the last one is dropped and what was queued is sent.
pub(crate) struct Sender<T> {
    queue: Arc<Queue<T>>,
}

/// The export task's side of the queue.
pub(crate) struct Receiver<T> {
    queue: Arc<Queue<T>>,
}

/// Records waiting for one export task, at most [`QUEUE`]. Producers (gateway workers, the flow
/// reader) append under a short lock and wake the task only when the queue gets its first
/// record (which starts the [`FLUSH`] wait) or fills a batch — about once a second at any
/// rate below [`BATCH`] records a second. A channel woke the task for every record: at the
/// gateway's 1 % of 30,000 requests/s, 300 cross-thread wake-ups a second, each a futex wake
/// on the worker and a park/unpark and timer re-registration on the runtime (the OpenTelemetry
/// SDK's batch processors also wake only at a full batch or the scheduled delay).
struct Queue<T> {
    state: std::sync::Mutex<QueueState<T>>,
    wake: tokio::sync::Notify,
}

struct QueueState<T> {
    items: Vec<T>,
    /// Live [`Sender`]s; none left: the task sends what is queued and ends.
    senders: usize,
}

/// A new export queue.
pub(crate) fn queue<T>() -> (Sender<T>, Receiver<T>) {
    let queue = Arc::new(Queue {
        state: std::sync::Mutex::new(QueueState {
            items: Vec::new(),
            senders: 1,
        }),
        wake: tokio::sync::Notify::new(),
    });
    (
        Sender {
            queue: Arc::clone(&queue),
        },
        Receiver { queue },
    )
}

impl<T> Queue<T> {
    fn state(&self) -> std::sync::MutexGuard<'_, QueueState<T>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<T> Sender<T> {
    /// Queues `item`; never waits. `false`: the queue held [`QUEUE`] records, `item` was
    /// dropped (the caller counts it).
    pub(crate) fn push(&self, item: T) -> bool {
        let mut s = self.queue.state();
        if s.items.len() >= QUEUE {
            return false;
        }
        if s.items.capacity() == 0 {
            s.items.reserve(BATCH);
        }
        s.items.push(item);
        let n = s.items.len();
        drop(s);
        if n == 1 || n == BATCH {
            self.queue.wake.notify_one();
        }
        true
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.queue.state().senders += 1;
        Self {
            queue: Arc::clone(&self.queue),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut s = self.queue.state();
        s.senders -= 1;
        let last = s.senders == 0;
        drop(s);
        if last {
            self.queue.wake.notify_one();
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl<T> Receiver<T> {
    /// Waits for the first record; `false`: the queue is empty and every sender gone.
    async fn first(&self) -> bool {
        loop {
            {
                let s = self.queue.state();
                if !s.items.is_empty() {
                    return true;
                }
                if s.senders == 0 {
                    return false;
                }
            }
            // A push between the check and here left a permit: this returns at once.
            self.queue.wake.notified().await;
        }
    }

    /// Waits until a batch is full or every sender is gone.
    async fn full(&self) {
        loop {
            {
                let s = self.queue.state();
                if s.items.len() >= BATCH || s.senders == 0 {
                    return;
                }
            }
            self.queue.wake.notified().await;
        }
    }

    /// Moves up to [`BATCH`] records, oldest first, into `batch`.
    fn take(&self, batch: &mut Vec<T>) {
        let mut s = self.queue.state();
        let n = s.items.len().min(BATCH);
        batch.extend(s.items.drain(..n));
    }
}

/// An export task: takes records from `rx`, sends batches through `export` (which makes its
/// request from the batch, so a retry needs no copy kept), retries, counts.
pub(crate) async fn batch_loop<T, F, Fut>(
    rx: Receiver<T>,
    stats: &SignalStats,
    signal: &'static str,
    mut export: F,
) where
    F: FnMut(&[T]) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let mut batch = Vec::with_capacity(BATCH);
    // Wait for the first record, then until the batch is full or the flush time is up.
    while rx.first().await {
        let deadline = tokio::time::Instant::now() + FLUSH;
        let _ = tokio::time::timeout_at(deadline, rx.full()).await;
        rx.take(&mut batch);
        let n = batch.len() as u64;
        let mut backoff = RETRY_BACKOFF;
        let mut attempt = 0;
        loop {
            match export(&batch).await {
                Ok(()) => {
                    stats.exported.fetch_add(n, Ordering::Relaxed);
                    break;
                }
                Err(failure) if attempt < RETRIES => {
                    attempt += 1;
                    stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%failure, attempt, signal, "OTLP export failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(failure) => {
                    stats.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
                    warn!(%failure, records = n, signal, "OTLP export failed after retries; records dropped");
                    break;
                }
            }
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use mesh_common::{
        FAMILY_V4, PROTO_TCP,
        event::{EV_CLOSE, EV_OPEN, FlowEvent},
    };

    use super::*;
    use crate::{model::ObjectName, state::Snapshot};

    fn flow(kind: u8) -> FlowRecord {
        FlowRecord {
            event: FlowEvent {
                kind,
                family: FAMILY_V4,
                proto: PROTO_TCP,
                bytes_sent: 3,
                bytes_received: 9,
                ..FlowEvent::default()
            },
            time_unix_nano: 42,
            source: Some(Arc::new(ObjectName::new("shop", "client"))),
            service: Some(Arc::new(ObjectName::new("shop", "web"))),
        }
    }

    /// The record `follow`'s observer makes of a flow.
    fn record(flow: &FlowRecord) -> LogRecord {
        let mut object = Vec::new();
        super::super::access_log::object(&mut object, flow, None, &Snapshot::default());
        ConnectionLog::new(flow, &object).decode().unwrap()
    }

    /// The record as the exporter built it with prost's types before it encoded records
    /// itself: what the hand encoding must equal, byte for byte.
    fn reference(flow: &FlowRecord, object: &[u8]) -> LogRecord {
        let src = flow.source.as_deref();
        LogRecord {
            time_unix_nano: flow.time_unix_nano,
            observed_time_unix_nano: flow.time_unix_nano,
            severity_number: SeverityNumber::Info as i32,
            severity_text: "INFO".to_owned(),
            body: Some(AnyValue {
                value: Some(Value::StringValue(
                    String::from_utf8_lossy(object).into_owned(),
                )),
            }),
            attributes: vec![
                kv("src.workload", src.map_or(UNKNOWN, |p| p.name.as_str())),
                kv(
                    "src.namespace",
                    src.map_or(UNKNOWN, |p| p.namespace.as_str()),
                ),
                kv(
                    "dst.service",
                    flow.service
                        .as_deref()
                        .map_or_else(|| UNKNOWN.to_owned(), super::super::labels::service_fqdn),
                ),
                kv("verdict", flow.verdict()),
            ],
            ..LogRecord::default()
        }
    }

    #[test]
    fn records_and_requests_are_encoded_byte_for_byte_as_prost_encodes_them() {
        use opentelemetry_proto::tonic::{
            collector::logs::v1::ExportLogsServiceRequest,
            logs::v1::{ResourceLogs, ScopeLogs},
        };
        use prost::Message as _;
        let mut unnamed = flow(EV_CLOSE);
        unnamed.source = None;
        unnamed.service = None;
        unnamed.time_unix_nano = 0;
        // A body past 127 bytes (two-byte lengths) and past 16 KiB (three-byte lengths).
        let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(20_000));
        let cases: Vec<(FlowRecord, Vec<u8>)> = vec![
            (
                flow(EV_CLOSE),
                br#"{"message":"connection complete"}"#.to_vec(),
            ),
            (unnamed, b"{}".to_vec()),
            (flow(EV_CLOSE), long.into_bytes()),
        ];
        let mut records = Vec::new();
        for (f, object) in &cases {
            let ours = ConnectionLog::new(f, object);
            assert_eq!(ours.encoded, reference(f, object).encode_to_vec());
            records.push(ours);
        }
        let (resource, scope) = (resource("node-a"), scope("mesh-agent/connections"));
        let head = BatchHead::new(&resource, &scope);
        let expected = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(resource),
                scope_logs: vec![ScopeLogs {
                    scope: Some(scope),
                    log_records: cases.iter().map(|(f, o)| reference(f, o)).collect(),
                    ..ScopeLogs::default()
                }],
                ..ResourceLogs::default()
            }],
        };
        assert_eq!(head.request(&records).as_ref(), expected.encode_to_vec());
        assert_eq!(
            ExportLogsServiceRequest::decode(head.request(&records)).unwrap(),
            expected
        );
    }

    #[test]
    fn a_finished_connection_becomes_one_log_record_with_the_access_fields() {
        assert!(!super::super::access_log::finishes(&flow(EV_OPEN)));
        let r = record(&flow(EV_CLOSE));
        let attr = |k: &str| {
            r.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone())
                .and_then(|v| v.value)
        };
        assert_eq!(r.time_unix_nano, 42);
        assert_eq!(
            attr("src.workload"),
            Some(Value::StringValue("client".into()))
        );
        assert_eq!(
            attr("dst.service"),
            Some(Value::StringValue("web.shop.svc.cluster.local".into()))
        );
        assert_eq!(attr("verdict"), Some(Value::StringValue("close".into())));
        // The body is the access line's record: every field, as JSON.
        let Some(AnyValue {
            value: Some(Value::StringValue(body)),
        }) = &r.body
        else {
            panic!("no string body: {r:?}");
        };
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["message"], "connection complete");
        assert_eq!(body["bytes_recv"], 9);
        assert_eq!(body["bytes_sent"], 3);
        assert_eq!(body["src.workload"], "client");
        assert_eq!(body["dst.service"], "web.shop.svc.cluster.local");
        assert_eq!(body["verdict"], "close");
        assert_eq!(body["dst.workload"], "unknown");
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_sends_what_came_within_the_flush_time_a_full_batch_at_once_and_the_rest_at_close()
     {
        let (tx, rx) = queue::<u32>();
        let sent = Arc::new(std::sync::Mutex::new(Vec::<(Duration, usize)>::new()));
        let stats = Arc::new(SignalStats::default());
        let start = tokio::time::Instant::now();
        let task = tokio::spawn({
            let (sent, stats) = (Arc::clone(&sent), Arc::clone(&stats));
            async move {
                batch_loop(rx, &stats, "test", |b: &[u32]| {
                    sent.lock().unwrap().push((start.elapsed(), b.len()));
                    async { Ok(()) }
                })
                .await;
            }
        });
        for i in 0..3 {
            assert!(tx.push(i));
        }
        tokio::time::sleep(FLUSH * 2).await;
        // A full batch goes without waiting for the flush time; what is left waits for it.
        let more = tx.clone();
        for i in 0..u32::try_from(BATCH).unwrap() + 5 {
            assert!(more.push(i));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let full_at = start.elapsed();
        drop((tx, more));
        task.await.unwrap();
        let sent = sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 3, "{sent:?}");
        assert_eq!((sent[0].0, sent[0].1), (FLUSH, 3));
        assert_eq!(sent[1].1, BATCH);
        assert!(sent[1].0 <= full_at, "{sent:?}");
        assert_eq!(sent[2].1, 5, "the rest is sent when the last sender goes");
        assert_eq!(stats.exported.load(Ordering::Relaxed), 3 + BATCH as u64 + 5);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_collector_costs_retries_then_counted_drops_and_a_full_queue_drops() {
        let stats = Arc::new(OtlpStats::default());
        // Nothing listens on port 1 of loopback: every export fails at connect.
        let logs = OtlpLogs::start("http://127.0.0.1:1", "node-a", Arc::clone(&stats)).unwrap();
        let object = br#"{"message":"connection complete"}"#;
        for _ in 0..3 {
            logs.record(&flow(EV_CLOSE), object);
        }
        // Past the flush and every retry (paused time advances while the task sleeps).
        let stats = &stats.logs;
        for _ in 0..200 {
            if stats.dropped_export_failed.load(Ordering::Relaxed) == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(stats.dropped_export_failed.load(Ordering::Relaxed), 3);
        assert_eq!(stats.retries.load(Ordering::Relaxed), u64::from(RETRIES));
        assert_eq!(stats.exported.load(Ordering::Relaxed), 0);
        // The queue is bounded: with the task busy retrying, records past QUEUE are dropped.
        for _ in 0..QUEUE + BATCH + 10 {
            logs.record(&flow(EV_CLOSE), object);
        }
        assert!(stats.dropped_queue_full.load(Ordering::Relaxed) >= 10);
    }
}
