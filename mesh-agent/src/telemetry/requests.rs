//! Istio's standard request metrics — `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes` — behind
//! one call, [`record`], that the gateway and the HBONE proxies make per finished request.
//!
//! Keys are the `Arc`s the callers already hold (pods and services from the snapshot, SPIFFE
//! ids), the status code and a few enums, so recording allocates nothing once a series exists.
//! Label strings are made at scrape time. The series are sharded by recording thread (Envoy
//! keeps per-worker stats), merged at scrape time: the gateway's workers each take their own
//! shard's lock per request, not one lock between them (threads take shards in turn; past the
//! shard count they share). At most [`MAX_SERIES`] keys (a request past it is
//! dropped and counted in `mesh_telemetry_series_dropped_total{family="requests"}`); keys of
//! deleted pods or services idle for [`super::tcp::IDLE_EXPIRY`] are removed.

use std::{
    cell::Cell,
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

use super::labels::{Common, Peer, Reporter, Security};
use crate::{model::ObjectName, state::Snapshot};

/// Most keys kept (each key is 4 exported families, 3 of them histograms).
pub const MAX_SERIES: usize = 5_000;

/// `istio_request_duration_milliseconds` buckets: Istio's defaults.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
    30000.0,
    60000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];
/// `istio_request_bytes` / `istio_response_bytes` buckets: Istio's (powers of ten to 1 GB).
pub const SIZE_BUCKETS: [f64; 10] = [
    1.0,
    10.0,
    100.0,
    1000.0,
    10_000.0,
    100_000.0,
    1_000_000.0,
    10_000_000.0,
    100_000_000.0,
    1_000_000_000.0,
];

/// `request_protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    Grpc,
}

impl Protocol {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
        }
    }
}

/// One finished request, as the proxy or the gateway saw it.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub reporter: Reporter,
    pub source: Option<&'a Arc<ObjectName>>,
    /// The client's proven SPIFFE id (mTLS); `None` in plaintext.
    pub source_principal: Option<&'a Arc<str>>,
    pub service: Option<&'a Arc<ObjectName>>,
    pub destination: Option<&'a Arc<ObjectName>>,
    pub destination_principal: Option<&'a Arc<str>>,
    pub protocol: Protocol,
    /// HTTP status sent to the client (0: none was, e.g. the connection failed).
    pub response_code: u16,
    /// `grpc-status` of a gRPC response.
    pub grpc_status: Option<u16>,
    pub security: Security,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Records one request in the process's metrics.
pub fn record(r: &Request<'_>) {
    super::global().requests.record(r);
}

/// [`record`] with the time the request ended, which the caller read already (its duration's
/// end): one clock read per request fewer.
pub fn record_at(r: &Request<'_>, now: Instant) {
    super::global().requests.record_at(r, now);
}

/// A series' key. Hashed and compared through [`KeyView`], so a request finds its series
/// by the names it borrows: its `Arc`s are cloned only for a new series. Cloning them per
/// request (to build a `Key` for the lookup) bumped and dropped the reference counts of
/// `Arc`s all the gateway's workers share — three cache lines moved between CPUs per request.
#[derive(Clone, Debug)]
struct Key {
    reporter: Reporter,
    source: Option<Arc<ObjectName>>,
    source_principal: Option<Arc<str>>,
    service: Option<Arc<ObjectName>>,
    destination: Option<Arc<ObjectName>>,
    destination_principal: Option<Arc<str>>,
    protocol: Protocol,
    response_code: u16,
    grpc_status: Option<u16>,
    security: Security,
}

/// What a series is keyed by, borrowed: from a stored [`Key`] or from a [`Request`].
type View<'a> = (
    Reporter,
    Option<&'a ObjectName>,
    Option<&'a str>,
    Option<&'a ObjectName>,
    Option<&'a ObjectName>,
    Option<&'a str>,
    Protocol,
    u16,
    Option<u16>,
    Security,
);

/// Anything a series can be looked up by (the map's `Borrow` target).
trait KeyView {
    fn view(&self) -> View<'_>;
}

impl KeyView for Key {
    fn view(&self) -> View<'_> {
        (
            self.reporter,
            self.source.as_deref(),
            self.source_principal.as_deref(),
            self.service.as_deref(),
            self.destination.as_deref(),
            self.destination_principal.as_deref(),
            self.protocol,
            self.response_code,
            self.grpc_status,
            self.security,
        )
    }
}

impl KeyView for Request<'_> {
    fn view(&self) -> View<'_> {
        (
            self.reporter,
            self.source.map(|a| &**a),
            self.source_principal.map(|a| &**a),
            self.service.map(|a| &**a),
            self.destination.map(|a| &**a),
            self.destination_principal.map(|a| &**a),
            self.protocol,
            self.response_code,
            self.grpc_status,
            self.security,
        )
    }
}

impl std::hash::Hash for dyn KeyView + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.view().hash(state);
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.view() == other.view()
    }
}

impl Eq for dyn KeyView + '_ {}

// `Key`'s hash and equality are its view's, as `Borrow` requires.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.view().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.view() == other.view()
    }
}

impl Eq for Key {}

impl<'a> std::borrow::Borrow<dyn KeyView + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl Key {
    /// The key of a new series (the one place a request's `Arc`s are cloned).
    fn of(r: &Request<'_>) -> Self {
        Self {
            reporter: r.reporter,
            source: r.source.cloned(),
            source_principal: r.source_principal.cloned(),
            service: r.service.cloned(),
            destination: r.destination.cloned(),
            destination_principal: r.destination_principal.cloned(),
            protocol: r.protocol,
            response_code: r.response_code,
            grpc_status: r.grpc_status,
            security: r.security,
        }
    }
}

/// A fixed-bucket histogram (per-bucket counts; the last slot is `+Inf`).
#[derive(Clone, Debug)]
struct Hist<const N: usize> {
    buckets: [u64; N],
    overflow: u64,
    sum: f64,
}

impl<const N: usize> Hist<N> {
    fn new() -> Self {
        Self {
            buckets: [0; N],
            overflow: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, bounds: &[f64; N], v: f64) {
        self.sum += v;
        match bounds.iter().position(|b| v <= *b) {
            Some(i) => self.buckets[i] += 1,
            None => self.overflow += 1,
        }
    }

    fn count(&self) -> u64 {
        self.buckets.iter().sum::<u64>() + self.overflow
    }

    fn add(&mut self, other: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.overflow += other.overflow;
        self.sum += other.sum;
    }

    fn pairs(&self, bounds: &[f64; N]) -> Vec<(f64, u64)> {
        bounds.iter().copied().zip(self.buckets).collect()
    }
}

#[derive(Clone, Debug)]
struct Series {
    duration: Hist<19>,
    request_bytes: Hist<10>,
    response_bytes: Hist<10>,
    last: Instant,
}

impl Series {
    fn new(now: Instant) -> Self {
        Self {
            duration: Hist::new(),
            request_bytes: Hist::new(),
            response_bytes: Hist::new(),
            last: now,
        }
    }

    fn observe(&mut self, r: &Request<'_>, now: Instant) {
        self.last = now;
        self.duration
            .observe(&DURATION_BUCKETS_MS, r.duration.as_secs_f64() * 1000.0);
        self.request_bytes
            .observe(&SIZE_BUCKETS, r.request_bytes as f64);
        self.response_bytes
            .observe(&SIZE_BUCKETS, r.response_bytes as f64);
    }

    fn add(&mut self, other: &Self) {
        self.duration.add(&other.duration);
        self.request_bytes.add(&other.request_bytes);
        self.response_bytes.add(&other.response_bytes);
        self.last = self.last.max(other.last);
    }
}

/// The series by key. Hashed with foldhash (seeded per map), not the std `RandomState`'s
/// `SipHash`: the key's names are hashed on every request, and they come from the snapshot and
/// the response status, not from a client who could choose colliding keys.
type SeriesMap = HashMap<Key, Series, foldhash::fast::RandomState>;

/// Most shards: past this many recording threads, threads share shards (still correct, only
/// contended again). A key can have a series in each shard a thread recorded it in, so memory
/// is at most this many times that of one map.
const MAX_SHARDS: usize = 16;

/// One shard of the series, alone on its cache lines (128 bytes: adjacent-line prefetch), so
/// that one thread's lock does not move another's.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<SeriesMap>);

/// Threads are given shard numbers in turn, on their first request recorded.
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD: Cell<Option<usize>> = const { Cell::new(None) };
}

fn thread_number() -> usize {
    THREAD.with(|t| {
        t.get().unwrap_or_else(|| {
            let n = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
            t.set(Some(n));
            n
        })
    })
}

/// The request metrics of this process.
#[derive(Debug)]
pub struct RequestMetrics {
    /// The series, one shard per recording thread (in turn, modulo the shard count).
    shards: Box<[Shard]>,
    /// Every key with a series in any shard. Consulted only when a key is new to a shard, it
    /// keeps [`MAX_SERIES`] a bound on distinct keys, as it was with one map. Lock order: this,
    /// then shards.
    keys: Mutex<HashSet<Key, foldhash::fast::RandomState>>,
    max: usize,
    dropped: AtomicU64,
    expired: AtomicU64,
}

impl RequestMetrics {
    /// Shards for the threads this process can run at once (at most [`MAX_SHARDS`]).
    #[must_use]
    pub fn new(max: usize) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self::with_shards(max, cpus.clamp(2, MAX_SHARDS))
    }

    fn with_shards(max: usize, shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
            keys: Mutex::default(),
            max,
            dropped: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        }
    }

    /// Records one request.
    pub fn record(&self, r: &Request<'_>) {
        self.record_at(r, Instant::now());
    }

    /// Records one request that ended at `now` (what marks its series in use, for expiry).
    pub fn record_at(&self, r: &Request<'_>, now: Instant) {
        self.record_in(thread_number() % self.shards.len(), r, now);
    }

    /// [`Self::record_at`] into shard `i`.
    fn record_in(&self, i: usize, r: &Request<'_>, now: Instant) {
        let shard = &self.shards[i].0;
        if let Some(s) = shard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(r as &dyn KeyView)
        {
            s.observe(r, now);
            return;
        }
        // New to this shard: the key set says whether it is a new key, and whether one more
        // fits.
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if !keys.contains(r as &dyn KeyView) {
            if keys.len() >= self.max {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            keys.insert(Key::of(r));
        }
        shard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(Key::of(r))
            .or_insert_with(|| Series::new(now))
            .observe(r, now);
    }

    /// Removes keys naming a deleted pod or service, idle for the TCP metrics' expiry.
    pub fn expire(&self, snapshot: &Snapshot, now: Instant) {
        let gone = |p: &Option<Arc<ObjectName>>, services: bool| {
            p.as_deref().is_some_and(|p| {
                if services {
                    !snapshot.model.services.contains_key(p)
                } else {
                    !snapshot.model.has_pod(p)
                }
            })
        };
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let mut shards: Vec<_> = self
            .shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(PoisonError::into_inner))
            .collect();
        let before = keys.len();
        // A key goes from every shard at once, when it is idle in all of them: a counter
        // never loses the part one thread recorded.
        keys.retain(|k| {
            let last = shards
                .iter()
                .filter_map(|m| m.get(k as &dyn KeyView).map(|s| s.last))
                .max();
            let keep = last.is_some_and(|l| now.duration_since(l) < super::tcp::IDLE_EXPIRY)
                || !(gone(&k.source, false)
                    || gone(&k.destination, false)
                    || gone(&k.service, true));
            if !keep {
                for m in &mut shards {
                    m.remove(k as &dyn KeyView);
                }
            }
            keep
        });
        self.expired
            .fetch_add((before - keys.len()) as u64, Ordering::Relaxed);
    }

    /// Its cardinality bound and what it cost.
    #[must_use]
    pub fn bound(&self) -> super::Bound {
        super::Bound {
            family: "requests",
            len: self
                .keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            max: self.max,
            dropped: self.dropped.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
        }
    }

    fn by_labels(&self) -> BTreeMap<Vec<String>, Series> {
        // The shards merged by key (each locked in turn, never two at once).
        let mut copy = SeriesMap::default();
        for shard in &self.shards {
            let series = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
            for (k, s) in series.iter() {
                match copy.get_mut(k as &dyn KeyView) {
                    Some(sum) => sum.add(s),
                    None => {
                        copy.insert(k.clone(), s.clone());
                    }
                }
            }
        }
        let mut out: BTreeMap<Vec<String>, Series> = BTreeMap::new();
        for (k, s) in copy {
            let mut values = Common::new(
                k.reporter,
                Peer {
                    pod: k.source.as_deref(),
                    principal: k.source_principal.as_deref(),
                },
                k.service.as_deref(),
                Peer {
                    pod: k.destination.as_deref(),
                    principal: k.destination_principal.as_deref(),
                },
                k.protocol.as_str(),
                k.security,
            )
            .values;
            values.push(k.response_code.to_string());
            values.push(k.grpc_status.map(|g| g.to_string()).unwrap_or_default());
            match out.get_mut(&values) {
                Some(sum) => sum.add(&s),
                None => {
                    out.insert(values, s);
                }
            }
        }
        out
    }
}

/// Reads one histogram of a series: (sum, count, per-bucket counts).
type HistogramOf = fn(&Series) -> (f64, u64, Vec<(f64, u64)>);

/// Label names of the request families: Istio's common ones, then the response's.
fn label_names() -> impl Iterator<Item = &'static str> {
    super::labels::COMMON_LABELS
        .iter()
        .copied()
        .chain(["response_code", "grpc_response_status"])
}

impl Collector for RequestMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let all = self.by_labels();
        let labelled = |values: &Vec<String>| -> Vec<(&'static str, String)> {
            label_names().zip(values.iter().cloned()).collect()
        };
        super::counter_family(
            &mut enc,
            "istio_requests",
            "Requests (Istio standard metric; recorded by the gateway and the HBONE proxies).",
            all.iter().map(|(l, s)| (labelled(l), s.duration.count())),
        )?;
        let histograms: [(&str, &str, HistogramOf); 3] = [
            (
                "istio_request_duration_milliseconds",
                "Request duration in milliseconds (Istio standard metric).",
                |s| {
                    (
                        s.duration.sum,
                        s.duration.count(),
                        s.duration.pairs(&DURATION_BUCKETS_MS),
                    )
                },
            ),
            (
                "istio_request_bytes",
                "Request body sizes in bytes (Istio standard metric).",
                |s| {
                    (
                        s.request_bytes.sum,
                        s.request_bytes.count(),
                        s.request_bytes.pairs(&SIZE_BUCKETS),
                    )
                },
            ),
            (
                "istio_response_bytes",
                "Response body sizes in bytes (Istio standard metric).",
                |s| {
                    (
                        s.response_bytes.sum,
                        s.response_bytes.count(),
                        s.response_bytes.pairs(&SIZE_BUCKETS),
                    )
                },
            ),
        ];
        for (name, help, get) in histograms {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (l, s) in &all {
                let (sum, count, buckets) = get(s);
                let labels = labelled(l);
                m.encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &Arc<RequestMetrics>) -> String {
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(Arc::clone(m)));
        let mut t = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut t, &r).unwrap();
        t
    }

    fn request<'a>(
        source: &'a Arc<ObjectName>,
        service: &'a Arc<ObjectName>,
        code: u16,
    ) -> Request<'a> {
        Request {
            reporter: Reporter::Destination,
            source: Some(source),
            source_principal: None,
            service: Some(service),
            destination: None,
            destination_principal: None,
            protocol: Protocol::Http,
            response_code: code,
            grpc_status: None,
            security: Security::None,
            duration: Duration::from_millis(3),
            request_bytes: 0,
            response_bytes: 100,
        }
    }

    #[test]
    fn shards_scrape_as_one_map_and_the_cap_counts_keys_once() {
        let a = Arc::new(ObjectName::new("shop", "a"));
        let web = Arc::new(ObjectName::new("shop", "web"));
        let now = Instant::now();
        let one = Arc::new(RequestMetrics::with_shards(2, 1));
        let two = Arc::new(RequestMetrics::with_shards(2, 2));
        for (i, code) in [(0, 200), (1, 200), (1, 200), (1, 503), (0, 503)] {
            one.record_in(0, &request(&a, &web, code), now);
            two.record_in(i, &request(&a, &web, code), now);
        }
        let t = scrape(&two);
        assert!(
            t.contains("istio_requests_total{") && t.contains("} 3\n"),
            "{t}"
        );
        assert_eq!(scrape(&one), t);
        // Two keys, each in both shards: the cap of 2 is full, a third key is dropped.
        assert_eq!(two.bound().len, 2);
        two.record_in(0, &request(&a, &web, 404), now);
        assert_eq!(two.bound().dropped, 1);
        assert_eq!(scrape(&one), scrape(&two));
    }

    #[test]
    fn a_key_expires_from_every_shard_once_idle_in_all() {
        let gone = Arc::new(ObjectName::new("shop", "gone"));
        let web = Arc::new(ObjectName::new("shop", "web"));
        let m = Arc::new(RequestMetrics::with_shards(10, 2));
        let snap = Snapshot::build(
            1,
            crate::model::ClusterModel::default(),
            crate::reconcile::AppliedServices::new(),
        );
        let t0 = Instant::now();
        let idle = super::super::tcp::IDLE_EXPIRY;
        m.record_in(0, &request(&gone, &web, 200), t0);
        m.record_in(1, &request(&gone, &web, 200), t0 + idle);
        // Idle in shard 0 only: kept whole.
        m.expire(&snap, t0 + idle + Duration::from_secs(1));
        assert_eq!(m.bound().len, 1);
        assert!(scrape(&m).contains("} 2\n"));
        m.expire(&snap, t0 + idle * 2);
        assert_eq!((m.bound().len, m.bound().expired), (0, 1));
        assert!(!scrape(&m).contains("istio_requests_total{"));
    }

    #[test]
    fn requests_count_per_status_and_histograms_bucket_like_istio() {
        let m = Arc::new(RequestMetrics::new(3));
        let client = Arc::new(ObjectName::new("shop", "client"));
        let web = Arc::new(ObjectName::new("shop", "web"));
        let principal: Arc<str> = Arc::from("spiffe://cluster.local/ns/shop/sa/client");
        let req = |code, ms| Request {
            reporter: Reporter::Destination,
            source: Some(&client),
            source_principal: Some(&principal),
            service: Some(&web),
            destination: None,
            destination_principal: None,
            protocol: Protocol::Http,
            response_code: code,
            grpc_status: None,
            security: Security::MutualTls,
            duration: Duration::from_millis(ms),
            request_bytes: 10,
            response_bytes: 5000,
        };
        for _ in 0..3 {
            m.record(&req(200, 3));
        }
        m.record(&req(503, 70));
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(Arc::clone(&m)));
        let mut t = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut t, &r).unwrap();
        let value = |prefix: &str, code: &str, extra: &str| {
            t.lines()
                .find(|l| {
                    l.starts_with(prefix)
                        && l.contains(&format!("response_code=\"{code}\""))
                        && l.contains(extra)
                })
                .unwrap_or_else(|| panic!("{prefix} {code} {extra} in {t}"))
                .rsplit_once(' ')
                .unwrap()
                .1
                .to_owned()
        };
        assert_eq!(value("istio_requests_total{", "200", ""), "3");
        assert_eq!(value("istio_requests_total{", "503", ""), "1");
        assert_eq!(
            value(
                "istio_request_duration_milliseconds_bucket{",
                "200",
                "le=\"5\""
            ),
            "3"
        );
        assert_eq!(
            value(
                "istio_request_duration_milliseconds_bucket{",
                "503",
                "le=\"50\""
            ),
            "0"
        );
        assert_eq!(
            value(
                "istio_request_duration_milliseconds_bucket{",
                "503",
                "le=\"100\""
            ),
            "1"
        );
        assert_eq!(
            value("istio_response_bytes_bucket{", "200", "le=\"10000\""),
            "3"
        );
        assert!(
            t.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\""),
            "{t}"
        );
        assert!(
            t.contains("connection_security_policy=\"mutual_tls\""),
            "{t}"
        );
    }
}
