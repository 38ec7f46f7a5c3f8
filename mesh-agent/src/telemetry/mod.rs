//! Telemetry (issue 11): Prometheus metrics on `:15020/metrics` (kernel reason counters, maps,
//! circuits, certificates, reconciliation, process and runtime, Istio's standard TCP and request
//! metrics) and one JSON access-log line per finished connection.
//!
//! Layout: [`server`] answers scrapes; [`kernel`] reads what the data path, the identity manager
//! and the proxies hold at scrape time; [`tcp`] turns the kernel's flow events into
//! `istio_tcp_*`; [`requests`] is the recording API of the gateway and the HBONE proxies
//! (`istio_requests_total`, …); [`access_log`] writes the connection lines; [`process`] reads
//! `/proc/self` and the tokio runtime; [`labels`] builds Istio's label values.

#![expect(
    clippy::cast_precision_loss,
    reason = "Prometheus samples are f64: a count past 2^53 loses its lowest bits there anyway"
)]

pub mod access_log;
pub mod kernel;
pub mod labels;
pub mod otlp;
pub mod process;
pub mod requests;
pub mod server;
pub mod switch;
pub mod tcp;
pub mod traces;

use std::{
    fmt,
    sync::{Arc, OnceLock},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
};
use tracing::info;

use crate::{app::Shared, owner::ReconcileOutcome};

/// Everything telemetry records between scrapes; one per process ([`global`]), so the proxies
/// and the gateway record without being handed it.
#[derive(Debug)]
pub struct Telemetry {
    pub tcp: Arc<tcp::TcpMetrics>,
    pub requests: Arc<requests::RequestMetrics>,
    pub reconcile: Arc<ReconcileMetrics>,
    pub otlp: Arc<otlp::OtlpStats>,
}

static GLOBAL: OnceLock<Telemetry> = OnceLock::new();

/// The process's telemetry (made on first use).
pub fn global() -> &'static Telemetry {
    GLOBAL.get_or_init(|| Telemetry {
        tcp: Arc::new(tcp::TcpMetrics::new(tcp::MAX_SERIES)),
        requests: Arc::new(requests::RequestMetrics::new(requests::MAX_SERIES)),
        reconcile: Arc::new(ReconcileMetrics::default()),
        otlp: Arc::new(otlp::OtlpStats::default()),
    })
}

/// Starts telemetry for a running agent: the metrics endpoint (when `metrics.addr` is set) and
/// the flow subscriber that feeds `istio_tcp_*` and the access log. The one call `app::run`
/// makes.
pub fn start(shared: &Arc<Shared>) {
    let telemetry = global();
    if let Some(addr) = shared.config.metrics.addr {
        tokio::spawn(server::serve(addr, Arc::clone(shared)));
    }
    let access_log = shared.config.telemetry.access_log;
    // A bad endpoint was refused by the config; one tonic cannot dial is logged and not used.
    let otlp = shared
        .config
        .telemetry
        .otlp_endpoint
        .as_deref()
        .and_then(|endpoint| {
            otlp::OtlpLogs::start(endpoint, &shared.config.node, Arc::clone(&telemetry.otlp))
                .map_err(|e| tracing::warn!(error = %e, "OTLP export off"))
                .ok()
        });
    if let Some(endpoint) = shared.config.telemetry.otlp_endpoint.as_deref() {
        match traces::Tracer::start(
            endpoint,
            &shared.config.node,
            shared.config.telemetry.trace_sampling,
            Arc::clone(&telemetry.otlp),
        ) {
            Ok(t) => {
                t.install();
            }
            Err(e) => tracing::warn!(error = %e, "OTLP span export off"),
        }
    }
    info!(
        metrics = ?shared.config.metrics.addr,
        access_log,
        otlp = ?shared.config.telemetry.otlp_endpoint,
        "telemetry started"
    );
    // The flags are the defaults the static file's `telemetry:` section switches live; both
    // outputs exist from the start (an idle buffer and exporter cost nothing), so a switch
    // never builds or tears one down and never loses what either holds.
    switch::init(access_log, otlp.is_some());
    shared.flows.set_observer(Box::new(FlowTelemetry {
        // The stores, not `Shared`: the hub `Shared` holds must not hold `Shared` back.
        stores: Arc::clone(&shared.stores),
        telemetry,
        // The observer's own buffer: its lines are written in the order the flows arrived.
        access: crate::logging::access_sink().buffer(),
        otlp,
        object: Vec::new(),
    }));
    tokio::spawn(expire(Arc::clone(shared), telemetry));
}

/// Telemetry's view of the flows ([`crate::flows::FlowObserver`]): every flow counts in
/// `istio_tcp_*`; a finished connection's record is formatted once and goes to the access log
/// and to OTLP, whichever are on.
struct FlowTelemetry {
    stores: Arc<crate::state::Stores>,
    telemetry: &'static Telemetry,
    access: Arc<crate::logging::AccessBuffer>,
    otlp: Option<otlp::OtlpLogs>,
    /// The record being formatted (its room reused for every connection).
    object: Vec<u8>,
}

impl crate::flows::FlowObserver for FlowTelemetry {
    fn observe(&mut self, flows: &[crate::flows::FlowRecord]) {
        let snapshot = self.stores.snapshot.load();
        // Read once per batch: a switch takes effect from the next batch read from the ring.
        let access = switch::access_log();
        let otlp = self.otlp.as_ref().filter(|_| switch::otlp_logs());
        for flow in flows {
            let destination = tcp::destination_pod(flow, &snapshot);
            self.telemetry.tcp.observe(flow, destination.as_ref());
            if (!access && otlp.is_none()) || !access_log::finishes(flow) {
                continue;
            }
            self.object.clear();
            access_log::object(&mut self.object, flow, destination.as_deref(), &snapshot);
            if access {
                self.access.line_object(&self.object);
            }
            if let Some(otlp) = otlp {
                otlp.record(flow, &self.object);
            }
        }
    }
}

/// Forgets idle series of pods and services that are gone, for as long as the agent runs.
async fn expire(shared: Arc<Shared>, telemetry: &'static Telemetry) {
    let mut tick = tokio::time::interval(tcp::EXPIRE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = shared.stores.snapshot.load();
        let now = std::time::Instant::now();
        telemetry.tcp.expire(&snapshot, now);
        telemetry.requests.expire(&snapshot, now);
    }
}

/// Records one reconciliation (duration, errors by kind); the main loop calls it.
pub fn reconciled(outcome: &ReconcileOutcome) {
    global().reconcile.record(outcome);
}

/// Reconciliation duration and errors by kind.
#[derive(Debug)]
pub struct ReconcileMetrics {
    duration: Histogram,
    errors: Family<KindLabel, Counter>,
}

/// `kind` of a reconciliation error (`ReconcileError::kind`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Reconciliation duration buckets, seconds: 1 ms (one service changed) to 60 s (10,000
/// services from scratch on a slow node).
const RECONCILE_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 60.0,
];

impl Default for ReconcileMetrics {
    fn default() -> Self {
        let errors: Family<KindLabel, Counter> = Family::default();
        // Every kind exported from the start (at 0), so `rate()` and alerts see the first error.
        for kind in [
            "apply_service",
            "remove_service",
            "local_endpoints",
            "map_full",
        ] {
            let _ = errors.get_or_create(&KindLabel { kind }).get();
        }
        Self {
            duration: Histogram::new(RECONCILE_BUCKETS),
            errors,
        }
    }
}

impl ReconcileMetrics {
    /// Records one outcome.
    pub fn record(&self, outcome: &ReconcileOutcome) {
        self.duration.observe(outcome.took.as_secs_f64());
        for e in &outcome.errors {
            self.errors
                .get_or_create(&KindLabel { kind: e.kind() })
                .inc();
        }
    }
}

impl Collector for ReconcileMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.duration.encode(encoder.encode_descriptor(
            "mesh_reconcile_duration_seconds",
            "Time to bring the kernel maps to a new model.",
            None,
            MetricType::Histogram,
        )?)?;
        self.errors.encode(encoder.encode_descriptor(
            "mesh_reconcile_errors",
            "Reconciliation errors by kind (the rest of the model still converged).",
            None,
            MetricType::Counter,
        )?)
    }
}

/// A bounded family's limit and what it cost, for `mesh_telemetry_series*`.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub family: &'static str,
    pub len: usize,
    pub max: usize,
    pub dropped: u64,
    pub expired: u64,
}

/// The bounds of the TCP and request families, encoded together (one family per name).
#[derive(Debug)]
pub struct Bounds(pub Vec<Bound>);

impl Collector for Bounds {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let rows =
            |f: fn(&Bound) -> f64| self.0.iter().map(move |b| ([("family", b.family)], f(b)));
        gauge_family(
            &mut enc,
            "mesh_telemetry_series",
            "Keys a bounded telemetry family holds now.",
            rows(|b| b.len as f64),
        )?;
        gauge_family(
            &mut enc,
            "mesh_telemetry_series_limit",
            "Most keys a telemetry family holds; observations past it are dropped and counted.",
            rows(|b| b.max as f64),
        )?;
        counter_family(
            &mut enc,
            "mesh_telemetry_series_dropped",
            "Observations not counted because their family was at its series limit.",
            self.0.iter().map(|b| ([("family", b.family)], b.dropped)),
        )?;
        counter_family(
            &mut enc,
            "mesh_telemetry_series_expired",
            "Series removed because their pod or service was deleted and they were idle.",
            self.0.iter().map(|b| ([("family", b.family)], b.expired)),
        )
    }
}

/// A counter without labels.
pub(crate) fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// A gauge without labels.
pub(crate) fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A counter with one series per label set.
pub(crate) fn counter_family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge with one series per label set.
pub(crate) fn gauge_family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, f64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}
